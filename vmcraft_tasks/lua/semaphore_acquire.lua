-- Takes a place of a host-wide semaphore.
-- KEYS[1]: the holders zset (keys.semaphore_key), scored by expiry in ms of Redis
-- server time; KEYS[2]: token -> holder hash (keys.semaphore_holders_key). One host tag.
-- ARGV: token, limit, TTL in ms, the holder as JSON ('' for none). Returns 1 if taken.
-- A token that already holds is renewed, not counted twice: a retried task must not
-- eat a second place (its holder record is replaced: the new run owns the place).
-- The keys' own TTL only lets a semaphore whose holders all vanished disappear.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- Expired places go first, with their holder records.
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, token in ipairs(expired) do redis.call('HDEL', KEYS[2], token) end
if #expired > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now) end
local ttl = tonumber(ARGV[3])
if redis.call('ZSCORE', KEYS[1], ARGV[1])
   or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  if ARGV[4] ~= '' then
    redis.call('HSET', KEYS[2], ARGV[1], ARGV[4])
  else
    redis.call('HDEL', KEYS[2], ARGV[1])
  end
  for _, key in ipairs(KEYS) do
    if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
  end
  return 1
end
return 0
