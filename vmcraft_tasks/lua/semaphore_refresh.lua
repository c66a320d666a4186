-- Extends a token's place to TTL from now. KEYS as in semaphore_acquire.lua.
-- ARGV: token, TTL in ms. Returns 1 if it still held a place.
-- An expired holder is not renewed: its place may already belong to someone else.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) > now then
  redis.call('ZADD', KEYS[1], 'XX', now + ttl, ARGV[1])
  for _, key in ipairs(KEYS) do
    if redis.call('EXISTS', key) == 1 and redis.call('PTTL', key) < ttl then
      redis.call('PEXPIRE', key, ttl)
    end
  end
  return 1
end
return 0
