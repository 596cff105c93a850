-- Corrects a bucket's TAT by `delta` units (a call used more tokens than it
-- reserved, or fewer: a refund). A refund never makes the bucket fuller than
-- full: the TAT stays at least now.
--
-- KEYS[1]: the bucket's TAT
-- ARGV[1]: interval (µs per unit), ARGV[2]: delta (units, may be negative)
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), now)
local after = math.max(tat + tonumber(ARGV[2]) * tonumber(ARGV[1]), now)
local ttl = math.floor((after - now) / 1000) + 1000
redis.call('SET', KEYS[1], string.format('%.0f', after), 'PX', ttl)
return 1
