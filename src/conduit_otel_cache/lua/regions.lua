-- Standalone flush, the regions after the first batch_size of a large flush: flush.lua's
-- loop without the heartbeat, sent in the same pipeline (one round trip), so that no
-- single script call holds Redis for long.
-- KEYS: regions set, instance regions set, then per region: instance stats hash,
--       aggregated hash, hit-rates zset, response-time samples list.
-- ARGV: instance id, process token, ttl seconds,
--       then per region: region, field count n, n pairs of field, cumulative value.
local now_s = string.format('%.6f', server_time())
local id, token, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
ensure_type(KEYS[1], 'set')
ensure_type(KEYS[2], 'set')
local a, k = 4, 3
while a <= #ARGV do
  local n = tonumber(ARGV[a + 1])
  redis.call('SADD', KEYS[1], ARGV[a])
  redis.call('SADD', KEYS[2], ARGV[a])
  flush_region(KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], id, token, false, now_s, ttl,
               ARGV, a + 2, n)
  a, k = a + 2 + 2 * n, k + 4
end
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
return 1
