-- Renews the leases still held (those not yet expired and taken back).
--
-- KEYS[1]: the leases; ARGV[1]: the lease time (µs); ARGV[2..]: lease ids
-- Returns how many were renewed.
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local ttl = tonumber(ARGV[1])
local expiry = string.format('%.0f', now + ttl)
local renewed = 0
for i = 2, #ARGV do
  renewed = renewed + redis.call('ZADD', KEYS[1], 'XX', 'CH', expiry, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], math.floor(ttl / 1000) + 1000)
return renewed
