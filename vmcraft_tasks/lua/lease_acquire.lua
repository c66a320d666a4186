-- Takes the lowest free NBD slot of a host, or renews the one the owner holds.
-- KEYS: the host's slot keys in slot order (keys.slot_key; tagged by the host).
-- ARGV[1]: the owner id, ARGV[2]: the TTL in milliseconds.
-- Returns the slot number (the index into KEYS), or -1 when every slot is taken.
-- A retried task must get back the slot it already holds, not a second one, so the
-- owner's existing lease is looked for (and renewed) before any free slot is taken.
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
    return i - 1
  end
end
for i, key in ipairs(KEYS) do
  if redis.call('SET', key, ARGV[1], 'NX', 'PX', ARGV[2]) then
    return i - 1
  end
end
return -1
