-- Encoded by protocol.depart() in protocol.py (KEYS and ARGV as below).
-- Take an instance's live gauges (size, instance count, live hit and miss sums, hit ratio)
-- out of the cluster totals; its counted events stay. With a max age, only if its
-- heartbeat is older than that (standalone Redis: one script call).
-- KEYS: instances zset, instance meta hash, instance regions set,
--       then per region its REGION_KEYS keys (region_at() in region.lua).
-- ARGV: instance id, max heartbeat age in seconds or '' (now), '1' to delete its keys,
--       'm' when its regions set is lost (the regions are every region: see depart_region).
local id, max_age, remove = ARGV[1], ARGV[2], ARGV[3] == '1'
if not departure_due(KEYS[1], id, max_age) then return 0 end
local live = instance_live(KEYS[2])
if live and ARGV[4] == 'm' then live = 'm' end
for k = 4, #KEYS, REGION_KEYS do
  local skey, akey, ckey, lkey = region_at(k)
  depart_region(skey, akey, ckey, lkey, id, remove, '', live)
end
depart_instance(KEYS[1], KEYS[2], KEYS[3], id, remove)
return 1
