-- Encoded by protocol.aggregates() in protocol.py (KEYS and ARGV as below).
-- The hashes in KEYS (regions' aggregated hashes and continuity records) as flat
-- field/value arrays: one reply for many instead of one per hash (standalone Redis; a Redis Cluster pipelines
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
