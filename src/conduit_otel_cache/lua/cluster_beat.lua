-- Redis Cluster flush, instance part (slot of {global}); the regions follow in the same
-- pipeline, one cluster_region.lua call each. Alone (no regions): a heartbeat, in either
-- mode (heartbeat_interval).
-- KEYS: instances zset, regions set, instance meta hash, instance regions set.
-- ARGV: instance id, process token, ttl seconds, instance timeout seconds, regions...
local now = server_time()
local id, token = ARGV[1], ARGV[2]
local regions = {}
for i = 5, #ARGV do regions[#regions + 1] = ARGV[i] end
local _, duplicate = beat(KEYS[1], KEYS[2], KEYS[3], KEYS[4], id, token, tonumber(ARGV[3]),
                          tonumber(ARGV[4]), now, regions)
return {string.format('%.6f', now), duplicate}
