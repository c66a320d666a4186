-- Compare-and-move of one of kombu's unacknowledged messages: a message another host
-- restored, or its worker acked meanwhile, is left alone.
-- KEYS: kombu's `unacked` hash, its `unacked_index` zset, the message's queue (kombu's
-- own key names: untagged, like kombu's Redis transport, which needs a single Redis).
-- ARGV: delivery tag, the entry exactly as read, what to push ('' drops the message).
-- Returns 1 if it moved.
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if ARGV[3] ~= '' then redis.call('RPUSH', KEYS[3], ARGV[3]) end
return 1
