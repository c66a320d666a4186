-- Adds to a counter of an existing job record, and refreshes its TTL.
-- KEYS[1]: the job record. ARGV: field, amount, TTL in seconds.
-- Returns the new value, or nil when the record is gone.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return false
end
local value = redis.call('HINCRBY', KEYS[1], ARGV[1], tonumber(ARGV[2]))
redis.call('EXPIRE', KEYS[1], tonumber(redis.call('HGET', KEYS[1], 'ttl') or ARGV[3]))
return value
