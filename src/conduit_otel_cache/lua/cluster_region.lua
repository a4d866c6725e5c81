-- Redis Cluster flush, one region (slot of {<region>}): the same logic as flush.lua's loop;
-- the token stored in the stats hash tells a restarted process.
-- KEYS: instance stats hash, aggregated hash, hit-rates zset, response-time samples list.
-- ARGV: instance id, process token, ttl seconds, then pairs of field, cumulative value.
local now_s = string.format('%.6f', server_time())
flush_region(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2], false, now_s, tonumber(ARGV[3]),
             ARGV, 4, (#ARGV - 3) / 2)
return 1
