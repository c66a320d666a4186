-- Moves a job to a new status unless it already ended (or its record is gone).
-- KEYS[1]: the job record (keys.job_key).
-- ARGV[1]: the record's TTL in seconds (a `ttl` field of the record wins);
-- ARGV[2..]: field, value pairs, the first pair being ('status', <new status>).
-- Returns 1 when it moved. `done` drops the error a failed attempt may have left.
local current = redis.call('HGET', KEYS[1], 'status')
if not current then
  return 0
end
if current == 'done' or current == 'failed' or current == 'cancelled' then
  return 0
end
for i = 2, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
if ARGV[3] == 'done' then
  redis.call('HDEL', KEYS[1], 'error')
end
redis.call('EXPIRE', KEYS[1], tonumber(redis.call('HGET', KEYS[1], 'ttl') or ARGV[1]))
return 1
