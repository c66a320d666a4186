-- A scan cache GET and the matching counter in one call: a pipeline cannot choose the
-- counter field from the GET's answer, and two round trips would double the cost of a
-- hit. KEYS[1]: the entry, KEYS[2]: the stats hash (one namespace tag).
-- ARGV[1]: the entry's kind. Returns the value, or nil.
local value = redis.call('GET', KEYS[1])
if value then
  redis.call('HINCRBY', KEYS[2], ARGV[1] .. '_hits', 1)
else
  redis.call('HINCRBY', KEYS[2], ARGV[1] .. '_misses', 1)
end
return value
