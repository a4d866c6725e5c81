-- Write one instance's cumulative statistics and apply their change to the cluster totals
-- (standalone Redis: every key in one script call, one round trip).
-- KEYS: instances zset, regions set, instance meta hash, instance regions set,
--       then per region: instance stats hash, aggregated hash, hit-rates zset,
--       response-time samples list (every key is declared, so Redis Cluster checks
--       them all before the script runs: a script never stops half way).
-- ARGV: instance id, process token, ttl seconds, instance timeout seconds,
--       then per region: region, field count n, n pairs of field, cumulative value.
-- Idempotent: the same values sent twice change nothing. A new token (a restarted
-- process) or a lower value starts a new series, so cluster counters never go back.
-- Gauges (size, instance count, the live hit and miss sums behind drift) replace the
-- instance's previous contribution instead of adding to it.
local now = server_time()
local now_s = string.format('%.6f', now)
local id, token = ARGV[1], ARGV[2]
local ttl, timeout = tonumber(ARGV[3]), tonumber(ARGV[4])

local regions = {}
local a = 5
while a <= #ARGV do
  regions[#regions + 1] = ARGV[a]
  a = a + 2 + 2 * tonumber(ARGV[a + 1])
end
local reset, duplicate = beat(KEYS[1], KEYS[2], KEYS[3], KEYS[4], id, token, ttl, timeout,
                              now, regions)

local k
a, k = 5, 5
while a <= #ARGV do
  local n = tonumber(ARGV[a + 1])
  flush_region(KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], id, token, reset, now_s, ttl,
               ARGV, a + 2, n)
  a, k = a + 2 + 2 * n, k + 4
end
return {now_s, duplicate}
