-- Encoded by protocol.depart_regions() in protocol.py (KEYS and ARGV as below).
-- Regions leaving the live gauges: one call per hash slot on a Redis Cluster (a departure),
-- and the regions an earlier incarnation under the same id left behind (a restart in
-- place), in either topology.
-- KEYS: per region its REGION_KEYS keys (region_at() in region.lua).
-- ARGV: instance id, '1' to delete the stats hash, a token: when not '', only regions
--       last written by another incarnation than that token leave; and '1' when the
--       instance was live (a departure: a stats hash that is gone is reported), 'm' when
--       it was live but Redis lost its regions set (see depart_region()).
local was_live = ARGV[4] == '1' or (ARGV[4] == 'm' and 'm')
for k = 1, #KEYS, REGION_KEYS do
  local skey, akey, ckey, lkey = region_at(k)
  depart_region(skey, akey, ckey, lkey, ARGV[1], ARGV[2] == '1', ARGV[3], was_live)
end
return 1
