-- Takes a place for a VM among a batch's VMs in flight on one host (max_per_host).
-- KEYS[1]: the (batch, host) set (keys.batch_host_key), KEYS[2]: the set of hosts
-- the batch has such sets on (so a new batch of the same name can drop them).
-- Both tagged by the batch.
-- ARGV[1]: the VM id, ARGV[2]: the limit (0: unlimited), ARGV[3]: TTL in seconds,
-- ARGV[4]: the host id.
-- Returns 1 if the VM holds a place now (it already held one, or there was room).
local limit = tonumber(ARGV[2])
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1
   or limit <= 0
   or redis.call('SCARD', KEYS[1]) < limit then
  redis.call('SADD', KEYS[1], ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  redis.call('SADD', KEYS[2], ARGV[4])
  redis.call('EXPIRE', KEYS[2], ARGV[3])
  return 1
end
return 0
