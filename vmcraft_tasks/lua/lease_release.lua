-- Compare-and-delete: a lease that expired and was taken by someone else must not be
-- deleted by its former owner.
-- KEYS: slot keys of one host. ARGV[1]: the owner id. Returns how many were released.
local n = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('DEL', key)
    n = n + 1
  end
end
return n
