-- Extends leases of one host. KEYS: its slot keys.
-- ARGV[1]: the TTL in milliseconds; ARGV[2] == '1' refreshes every lease on the host,
-- otherwise only those of the owners listed from ARGV[3] on. Checking the owner inside
-- the script keeps a refresh from extending a lease that changed hands since the
-- caller last looked. Returns how many leases were extended.
local wanted = {}
for i = 3, #ARGV do wanted[ARGV[i]] = true end
local n = 0
for _, key in ipairs(KEYS) do
  local owner = redis.call('GET', key)
  if owner and (ARGV[2] == '1' or wanted[owner]) then
    redis.call('PEXPIRE', key, ARGV[1])
    n = n + 1
  end
end
return n
