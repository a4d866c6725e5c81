-- Encoded by protocol.depart_regions() in protocol.py (KEYS and ARGV as below).
-- Regions leaving the live gauges: one call per hash slot on a Redis Cluster (a departure),
-- and the regions an earlier incarnation under the same id left behind (a restart in
-- place), in either topology.
-- KEYS: per region: instance stats hash, aggregated hash, counts hash, samples list.
-- ARGV: instance id, '1' to delete the stats hash, a token: when not '', only regions
--       last written by another incarnation than that token leave; and '1' when the
--       instance was live (a departure: a stats hash that is gone is reported), 'm' when
--       it was live but Redis lost its regions set (see depart_region()).
local was_live = ARGV[4] == '1' or (ARGV[4] == 'm' and 'm')
for k = 1, #KEYS, 4 do
  depart_region(KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], ARGV[1], ARGV[2] == '1', ARGV[3],
                was_live)
end
return 1
