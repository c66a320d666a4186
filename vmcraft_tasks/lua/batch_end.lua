-- Releases a VM's place in its batch, the first time only.
-- KEYS[1]: ended set, KEYS[2]: inflight counter, KEYS[3..]: the batch's other keys
-- (their TTL is refreshed with the rest). All tagged by the batch.
-- ARGV[1]: the VM id, ARGV[2]: the batch TTL in seconds. Returns 1 the first time.
if redis.call('SADD', KEYS[1], ARGV[1]) == 1 then
  local left = redis.call('DECR', KEYS[2])
  if left < 0 then redis.call('SET', KEYS[2], 0) end
  for _, key in ipairs(KEYS) do
    redis.call('EXPIRE', key, ARGV[2])
  end
  return 1
end
return 0
