-- Reserves one call: a request and `cost` tokens, by GCRA (the generic cell
-- rate algorithm) on the server's clock, so every process sees one time.
-- A bucket's state is one number, its theoretical arrival time (TAT): the
-- moment it would be empty again. A call of `cost` units moves it on by
-- cost x interval and may start once the TAT lies within the burst of now.
--
-- KEYS[1]: the shared pause (microseconds since the epoch it lasts until)
-- KEYS[2], KEYS[3]: the requests' and the tokens' TATs
-- KEYS[4]: the limits the provider stated (a hash: requests_interval,
-- requests_burst, tokens_interval, tokens_burst), for a bucket given none
-- KEYS[5], KEYS[6]: the requests and tokens reserved while a bucket had no
-- limit at all, charged to it once it has one: the provider counted those
-- calls too. At most a full bucket's worth is charged, as that is all they
-- can have spent.
-- ARGV, for each bucket in turn: interval (µs per unit; 0: the stated one, if
-- any), burst (µs: burst units x interval), cost (units)
-- Returns {1, wait µs, now, requests interval, tokens interval} when
-- reserved: the call starts after `wait`, and the intervals (µs per unit, as
-- text: they have fractions; '0' for no limit) are those it was reserved at;
-- {0, wait µs, now, '0', '0'} while paused: nothing is reserved, ask again
-- after `wait`.
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local paused = tonumber(redis.call('GET', KEYS[1]) or '0')
if paused > now then
  return {0, paused - now, now, '0', '0'}
end
local names = {'requests', 'tokens'}
local wait = 0
local after = {}
local used = {'0', '0'}
for i = 1, 2 do
  local interval = tonumber(ARGV[i * 3 - 2])
  local burst = tonumber(ARGV[i * 3 - 1])
  if interval <= 0 then
    local stated = redis.call('HMGET', KEYS[4], names[i] .. '_interval', names[i] .. '_burst')
    interval = tonumber(stated[1] or '0') or 0
    burst = tonumber(stated[2] or '0') or 0
  end
  if interval > 0 then
    local cost = tonumber(ARGV[i * 3])
    local tat = math.max(tonumber(redis.call('GET', KEYS[i + 1]) or '0'), now)
    local unmetered = tonumber(redis.call('GET', KEYS[i + 4]) or '0')
    if unmetered > 0 then
      tat = math.max(tat, math.min(tat + unmetered * interval, now + burst))
      redis.call('DEL', KEYS[i + 4])
    end
    after[i] = tat + cost * interval
    wait = math.max(wait, after[i] - burst - now)
    used[i] = string.format('%.6f', interval)
  else
    redis.call('INCRBY', KEYS[i + 4], ARGV[i * 3])
    redis.call('PEXPIRE', KEYS[i + 4], 60000)
  end
end
for i = 1, 2 do
  if after[i] then
    -- '%.0f': Lua's tostring would write 1.7e+15 and lose the microseconds.
    local ttl = math.floor((after[i] - now) / 1000) + 1000
    redis.call('SET', KEYS[i + 1], string.format('%.0f', after[i]), 'PX', ttl)
  end
end
return {1, math.floor(wait), now, used[1], used[2]}
