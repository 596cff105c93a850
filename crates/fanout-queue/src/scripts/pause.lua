-- Extends the shared pause to `wait` µs from now (a 429's Retry-After);
-- a longer pause already set stays.
--
-- KEYS[1]: the pause; ARGV[1]: wait (µs)
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local wait = tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if now + wait > current then
  redis.call('SET', KEYS[1], string.format('%.0f', now + wait), 'PX', math.floor(wait / 1000) + 1000)
end
return 1
