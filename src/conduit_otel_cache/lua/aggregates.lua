-- Encoded by protocol.aggregates() in protocol.py (KEYS and ARGV as below).
-- The aggregated hashes of the regions in KEYS as flat field/value arrays: one reply for
-- many regions instead of one per region (standalone Redis; a Redis Cluster pipelines
-- HGETALL per slot). A key of the wrong type gives {false, error} in its place.
local out = {}
for i, key in ipairs(KEYS) do
  local reply = redis.pcall('HGETALL', key)
  if reply.err then
    out[i] = {false, reply.err}
  else
    out[i] = {true, reply}
  end
end
return out
