-- Encoded by protocol.beat() in protocol.py (KEYS and ARGV as below), decoded by beat_result().
-- The instance part of a write on a Redis Cluster (slot of {global}); the region entries
-- follow in regions.lua calls. With no entries: a heartbeat (heartbeat_interval), which
-- never registers an incarnation that has written nothing. Argument layout: see lib.lua
-- (only the region names of the entries are read here).
-- KEYS: instances zset, regions set, instance meta hash, instance regions set, flush errors
--       hash.
-- Returns beat()'s reply (instance.lua).
local h = header()
local names, listed = listed_regions(entries(), h)
return beat(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], h, server_time(), names, h.refresh,
            listed)
