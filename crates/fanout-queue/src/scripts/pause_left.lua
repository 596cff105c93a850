-- How long the shared pause still lasts, in µs (0: none).
--
-- KEYS[1]: the pause
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local paused = tonumber(redis.call('GET', KEYS[1]) or '0')
return math.max(0, math.floor(paused - now))
