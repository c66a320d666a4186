-- Live places and their holders. KEYS as in semaphore_acquire.lua.
-- Returns token, holder JSON ('' for none), token, holder, ...
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local live = redis.call('ZRANGEBYSCORE', KEYS[1], string.format('(%d', now), '+inf')
local out = {}
for _, token in ipairs(live) do
  table.insert(out, token)
  table.insert(out, redis.call('HGET', KEYS[2], token) or '')
end
return out
