-- Region entries of one write without the heartbeat: one call per hash slot on a Redis
-- Cluster (after beat.lua, which records the region names, in the same pipeline), and the
-- entries after the first batch_size of a large standalone write. Argument layout: see
-- lib.lua.
-- KEYS: (standalone only: regions set, instance regions set,) then per region entry:
--       instance stats hash, aggregated hash, hit-rates zset, response-time samples list.
-- Returns the regions that need a full entry (nothing written for them), and region, epoch
-- pairs of the full entries written.
local now_s = string.format('%.6f', server_time())
local h = header()
local sets = #KEYS % 4 == 2 and 2 or 0
local need_full, epochs = {}, {}
local es = entries()
local _, listed = listed_regions(es, h)
local sadd = {}
for _, region in ipairs(listed) do sadd[region] = true end
for i, e in ipairs(es) do
  local k = sets + 4 * i - 3
  local done, epoch = write_region(KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], h, e, now_s)
  if done == 'full' then
    need_full[#need_full + 1] = e.region
  else
    if e.full then
      epochs[#epochs + 1] = e.region
      epochs[#epochs + 1] = epoch
    end
    if sets == 2 and sadd[e.region] then
      call_on(KEYS[1], 'SADD', KEYS[1], e.region)
      call_on(KEYS[2], 'SADD', KEYS[2], e.region)
    end
  end
end
if sets == 2 and h.refresh then
  redis.call('EXPIRE', KEYS[1], h.ttl)
  redis.call('EXPIRE', KEYS[2], h.ttl)
end
return {need_full, epochs}
