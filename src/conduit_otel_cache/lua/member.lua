-- Whether a member of the heartbeat set has no live instance behind it: no instance id, or
-- an instance whose meta hash says neither live nor departed ('1' / '0'), unless the meta
-- hash is lost while its regions set is not (live until reaped or replaced).
local function stray_member(id, mkey, rkey)
  local valid = #id <= 128 and string.match(id, '^[%w_%.%-]+$') ~= nil and id ~= 'aggregated'
  if not valid then return true end
  local live = redis.pcall('HGET', mkey, 'live')
  if live == false and redis.pcall('EXISTS', rkey) == 1 then return false end
  return live ~= '1' and live ~= '0'
end
