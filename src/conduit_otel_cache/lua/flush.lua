-- Encoded by protocol.flush() in protocol.py (KEYS and ARGV as below), decoded by beat_result().
-- One write of one instance, standalone Redis: the heartbeat and every region entry in one
-- script call (one round trip). Argument layout: see lib.lua.
-- KEYS: instances zset, regions set, instance meta hash, instance regions set, flush
--       errors hash, then per region entry its REGION_KEYS keys (region_at() in region.lua).
-- Returns beat()'s reply (instance.lua), the regions that need a full entry, and region,
-- epoch pairs of the full entries written; nothing is written unless the status is 'ok'.
local now = server_time()
local now_s = string.format('%.6f', now)
local h = header()
local es = entries()
local names, listed = listed_regions(es, h)
local reply = beat(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], h, now, names, h.refresh,
                   listed)
local need_full, epochs = {}, {}
if reply[2] == 'ok' then
  -- a new incarnation takes the live gauges of a live earlier one out of the regions it
  -- writes now (the others leave through depart_regions.lua): also where the earlier
  -- one's stats hash is gone, which only its regions set still tells
  local earlier = {}
  if not h.known and reply[5] ~= '0' then
    for _, r in ipairs(reply[3]) do earlier[r] = true end
  end
  local was_live = reply[5] == '1' or 'm'
  for i, e in ipairs(es) do
    local skey, akey, ckey, lkey = region_at(6 + REGION_KEYS * (i - 1))
    if earlier[e.region] then
      depart_region(skey, akey, ckey, lkey, h.id, false, h.token, was_live)
    end
    local done, epoch = write_region(skey, akey, ckey, lkey, h, e, now_s)
    if done == 'full' then
      need_full[#need_full + 1] = e.region
    elseif e.full then
      epochs[#epochs + 1] = e.region
      epochs[#epochs + 1] = epoch
    end
  end
end
reply[6] = need_full
reply[7] = epochs
return reply
