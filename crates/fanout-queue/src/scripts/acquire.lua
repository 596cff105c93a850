-- Takes a slot of the global in-flight cap, as a lease that expires unless
-- renewed: a process that dies gives its slots back after the lease time.
--
-- KEYS[1]: the leases (a sorted set: lease id -> expiry, µs since the epoch)
-- ARGV[1]: the cap, ARGV[2]: the lease time (µs), ARGV[3]: this lease's id
-- Returns 1 when taken, 0 when every slot is held.
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now))
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], string.format('%.0f', now + ttl), ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.floor(ttl / 1000) + 1000)
return 1
