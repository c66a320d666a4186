-- Evicts only the holder the caller judged dead: a new run of the same step may have
-- taken the same token since. KEYS as in semaphore_acquire.lua.
-- ARGV: token, the dead holder as JSON. Returns 1 if evicted.
if redis.call('HGET', KEYS[2], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[2], ARGV[1])
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
