-- Region entries of one write without the heartbeat: one call per hash slot on a Redis
-- Cluster (after beat.lua, which records the region names, in the same pipeline), and the
-- entries after the first batch_size of a large standalone write. Argument layout: see
-- lib.lua. Encoded by protocol.regions() in protocol.py.
-- KEYS: per region entry its REGION_KEYS keys (region_at() in region.lua); then, when they
--       share the slot (standalone), the regions set and the instance regions set, which
--       record the entries' names.
-- Returns the regions that need a full entry (nothing written for them), and region, epoch
-- pairs of the full entries written.
local now_s = string.format('%.6f', server_time())
local h = header()
local need_full, epochs = {}, {}
local es = entries()
local gkey, ikey = KEYS[REGION_KEYS * #es + 1], KEYS[REGION_KEYS * #es + 2]
local _, listed = listed_regions(es, h)
local sadd = {}
for _, region in ipairs(listed) do sadd[region] = true end
for i, e in ipairs(es) do
  local skey, akey, ckey, lkey = region_at(1 + REGION_KEYS * (i - 1))
  local done, epoch = write_region(skey, akey, ckey, lkey, h, e, now_s)
  if done == 'full' then
    need_full[#need_full + 1] = e.region
  else
    if e.full then
      epochs[#epochs + 1] = e.region
      epochs[#epochs + 1] = epoch
    end
    if ikey and sadd[e.region] then
      call_on(gkey, 'SADD', gkey, e.region)
      call_on(ikey, 'SADD', ikey, e.region)
    end
  end
end
if ikey and h.refresh then
  redis.call('EXPIRE', gkey, h.ttl)
  redis.call('EXPIRE', ikey, h.ttl)
end
return {need_full, epochs}
