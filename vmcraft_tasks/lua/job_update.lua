-- Sets fields of an existing job record only, and refreshes its TTL.
-- KEYS[1]: the job record. ARGV[1]: TTL in seconds; ARGV[2..]: field, value pairs.
-- Returns 1 when it wrote.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
for i = 2, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('EXPIRE', KEYS[1], tonumber(redis.call('HGET', KEYS[1], 'ttl') or ARGV[1]))
return 1
