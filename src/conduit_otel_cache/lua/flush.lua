-- One write of one instance, standalone Redis: the heartbeat and every region entry in one
-- script call (one round trip). Argument layout: see lib.lua.
-- KEYS: instances zset, regions set, instance meta hash, instance regions set,
--       then per region entry: instance stats hash, aggregated hash, hit-rates zset,
--       response-time samples list (every key is declared, so Redis Cluster checks them
--       all before the script runs: a script never stops half way).
-- Returns beat()'s reply (instance.lua) and the regions that need a full entry; nothing is
-- written unless the status is 'ok'.
local now = server_time()
local now_s = string.format('%.6f', now)
local h = header()
local es = entries()
local names = {}
for _, e in ipairs(es) do
  if e.full then names[#names + 1] = e.region end
end
local reply = beat(KEYS[1], KEYS[2], KEYS[3], KEYS[4], h, now, names, h.refresh)
local need_full = {}
if reply[2] == 'ok' then
  for i, e in ipairs(es) do
    local k = 1 + 4 * i
    if write_region(KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], h, e, now_s) == 'full' then
      need_full[#need_full + 1] = e.region
    end
  end
end
reply[5] = need_full
return reply
