-- The per-instance pass's read: for the hit-ratio sorted set of one region (KEYS[1]), every
-- member's hit_count and miss_count, as one flat array {member, hits, misses, ...};
-- ARGV[1] .. member .. ':' .. ARGV[2] is a member's statistics hash (standalone Redis only:
-- a Redis Cluster pipelines HMGET). A key of the wrong type gives {false, error}; a
-- statistics hash of the wrong type gives 'x' for its counts.
local members = redis.pcall('ZRANGE', KEYS[1], 0, -1)
if members.err then
  return {false, members.err}
end
local flat, n = {}, 0
local prefix, suffix = ARGV[1], ':' .. ARGV[2]
for _, member in ipairs(members) do
  local ok, v = pcall(redis.call, 'HMGET', prefix .. member .. suffix, 'hit_count', 'miss_count')
  if not ok then
    v = {'x', 'x'}
  end
  flat[n + 1], flat[n + 2], flat[n + 3] = member, v[1] or '', v[2] or ''
  n = n + 3
end
return {true, flat}
