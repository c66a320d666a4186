-- Pops the best waiting VM of a batch if the batch has room.
-- KEYS[1]: pending zset, KEYS[2]: inflight counter, KEYS[3]: meta hash, KEYS[4..]: the
-- batch's other keys (their TTL is refreshed with the rest). All tagged by the batch.
-- ARGV[1]: the batch TTL in seconds. Returns the VM id, or nil.
local limit = tonumber(redis.call('HGET', KEYS[3], 'max_parallel') or '0')
local inflight = tonumber(redis.call('GET', KEYS[2]) or '0')
if limit > 0 and inflight >= limit then
  return false
end
local popped = redis.call('ZPOPMAX', KEYS[1])
if #popped == 0 then
  return false
end
redis.call('INCR', KEYS[2])
for _, key in ipairs(KEYS) do
  redis.call('EXPIRE', key, ARGV[1])
end
return popped[1]
