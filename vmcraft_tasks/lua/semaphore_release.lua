-- Gives a place back. KEYS as in semaphore_acquire.lua. ARGV[1]: token.
-- Returns 1 if the token held a place.
redis.call('HDEL', KEYS[2], ARGV[1])
return redis.call('ZREM', KEYS[1], ARGV[1])
