-- Redis Cluster departure, one region (slot of {<region>}).
-- KEYS: instance stats hash, aggregated hash, hit-rates zset, response-time samples list.
-- ARGV: instance id, '1' to delete the stats hash.
depart_region(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2] == '1')
return 1
