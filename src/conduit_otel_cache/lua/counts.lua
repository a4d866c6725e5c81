-- Encoded by protocol.counts() in protocol.py (KEYS and ARGV as below).
-- The per-instance pass's read: for the hit-ratio sorted set of one region (KEYS[1]), every
-- member's stored ratio (x 100), hit_count and miss_count, as one flat array {member, ratio,
-- hits, misses, ...}; ARGV[1] .. member .. ':' .. ARGV[2] is a member's statistics hash
-- (standalone Redis only: a Redis Cluster pipelines HMGET). A key of the wrong type gives
-- {false, error}; a statistics hash of the wrong type gives 'x' for its counts.
local members = redis.pcall('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
if members.err then
  return {false, members.err}
end
local flat, n = {}, 0
local prefix, suffix = ARGV[1], ':' .. ARGV[2]
for i = 1, #members, 2 do
  local member = members[i]
  local ok, v = pcall(redis.call, 'HMGET', prefix .. member .. suffix, 'hit_count', 'miss_count')
  if not ok then
    v = {'x', 'x'}
  end
  flat[n + 1], flat[n + 2], flat[n + 3], flat[n + 4] = member, members[i + 1], v[1] or '',
    v[2] or ''
  n = n + 4
end
return {true, flat}
