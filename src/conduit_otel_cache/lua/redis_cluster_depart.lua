-- Encoded by protocol.redis_cluster_depart() in protocol.py (KEYS and ARGV as below).
-- Redis Cluster departure, instance part (slot of {global}).
-- KEYS: instances zset, instance meta hash, instance regions set.
-- ARGV: instance id, max heartbeat age in seconds or '', phase:
--   'check': whether it is live ('1'/'0') and its regions when it may depart, else false
--     (changes nothing);
--   'keep' / 'remove' (after its regions): mark it not live / delete it; returns 1, or 0
--   when its heartbeat is no longer old enough.
local id, max_age, phase = ARGV[1], ARGV[2], ARGV[3]
if not departure_due(KEYS[1], id, max_age) then return false end
if phase == 'check' then
  local live = instance_live(KEYS[2]) and '1' or '0'
  if redis.call('TYPE', KEYS[3])['ok'] ~= 'set' then return {live, {}} end
  return {live, redis.call('SMEMBERS', KEYS[3])}
end
depart_instance(KEYS[1], KEYS[2], KEYS[3], id, phase == 'remove')
return 1
