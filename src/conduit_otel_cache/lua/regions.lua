-- Region entries of one write without the heartbeat: one call per hash slot on a Redis
-- Cluster (after beat.lua, which records the region names, in the same pipeline), and the
-- entries after the first batch_size of a large standalone write. Argument layout: see
-- lib.lua. Encoded by protocol.regions() in protocol.py.
-- KEYS: per region entry: instance stats hash, aggregated hash, counts hash,
--       response-time samples list; then, when they share the slot (standalone), the
--       regions set and the instance regions set, which record the entries' names.
-- Returns the regions that need a full entry (nothing written for them), and region, epoch
-- pairs of the full entries written.
local now_s = string.format('%.6f', server_time())
local h = header()
local need_full, epochs = {}, {}
local es = entries()
local gkey, ikey = KEYS[4 * #es + 1], KEYS[4 * #es + 2]
local _, listed = listed_regions(es, h)
local sadd = {}
for _, region in ipairs(listed) do sadd[region] = true end
for i, e in ipairs(es) do
  local k = 4 * i - 3
  local done, epoch = write_region(KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], h, e, now_s)
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
