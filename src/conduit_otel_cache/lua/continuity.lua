-- Encoded by protocol.continuity() in protocol.py (KEYS and ARGV as below).
-- Advance a region's continuity record (what Redis data losses took from its totals, carried
-- over by every reader: continuity.py) unless another reader has since the caller read it:
-- a compare-and-set on its epoch, so that two readers that see one loss add it once.
-- KEYS: the continuity record, the region's aggregated hash (whose TTL the record takes).
-- ARGV: the epoch the caller read in the record ('' when there was none), then the new
-- record's field/value pairs.  Returns 1 when written, else the record as it is (flat).
local epoch = redis.pcall('HGET', KEYS[1], 'epoch')
if failed(epoch) then
  redis.call('DEL', KEYS[1])  -- not a hash: written again
  epoch = false
end
if (epoch or '') ~= ARGV[1] then return redis.call('HGETALL', KEYS[1]) end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
local ttl = redis.call('PTTL', KEYS[2])
if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
