-- Reserves one call: a request and `cost` tokens, by GCRA (the generic cell
-- rate algorithm) on the server's clock, so every process sees one time.
-- A bucket's state is one number, its theoretical arrival time (TAT): the
-- moment it would be empty again. A call of `cost` units moves it on by
-- cost x interval and may start once the TAT lies within the burst of now.
--
-- KEYS[1]: the shared pause (microseconds since the epoch it lasts until)
-- KEYS[2], KEYS[3]: the requests' and the tokens' TATs
-- ARGV, for each bucket in turn: interval (µs per unit; 0: no such limit),
-- burst (µs: burst units x interval), cost (units)
-- Returns {1, wait µs, now} when reserved: the call starts after `wait`;
-- {0, wait µs, now} while paused: nothing is reserved, ask again after `wait`.
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local paused = tonumber(redis.call('GET', KEYS[1]) or '0')
if paused > now then
  return {0, paused - now, now}
end
local wait = 0
local after = {}
for i = 1, 2 do
  local interval = tonumber(ARGV[i * 3 - 2])
  if interval > 0 then
    local burst = tonumber(ARGV[i * 3 - 1])
    local cost = tonumber(ARGV[i * 3])
    local tat = math.max(tonumber(redis.call('GET', KEYS[i + 1]) or '0'), now)
    after[i] = tat + cost * interval
    wait = math.max(wait, after[i] - burst - now)
  end
end
for i = 1, 2 do
  if after[i] then
    -- '%.0f': Lua's tostring would write 1.7e+15 and lose the microseconds.
    local ttl = math.floor((after[i] - now) / 1000) + 1000
    redis.call('SET', KEYS[i + 1], string.format('%.0f', after[i]), 'PX', ttl)
  end
end
return {1, math.floor(wait), now}
