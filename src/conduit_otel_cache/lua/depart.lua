-- Take an instance's gauges (size, instance count) out of the cluster totals; its counted
-- events stay in the totals. With a max age, only if its heartbeat is older than that.
-- KEYS: instances zset, instance meta hash, instance regions set,
--       then per region: instance stats hash, aggregated hash.
-- ARGV: instance id, max heartbeat age in seconds or '' (now), '1' to delete its keys.
local id, max_age, remove = ARGV[1], ARGV[2], ARGV[3] == '1'
if max_age ~= '' then
  local score = redis.pcall('ZSCORE', KEYS[1], id)
  if type(score) == 'string' and num(score) >= server_time() - tonumber(max_age) then
    return 0
  end
end
for k = 4, #KEYS, 2 do
  local skey, akey = KEYS[k], KEYS[k + 1]
  ensure_hash(skey)
  ensure_hash(akey)
  if redis.call('HGET', skey, 'live') == '1' then
    incr(akey, 'size_bytes', -num(redis.call('HGET', skey, 'size_bytes')), false)
    incr(akey, 'instance_count', -1, false)
    redis.call('HSET', skey, 'live', '0')
  end
  if remove then redis.call('DEL', skey) end
end
if remove then
  redis.call('DEL', KEYS[2], KEYS[3])
  redis.pcall('ZREM', KEYS[1], id)
elseif redis.call('EXISTS', KEYS[2]) == 1 then
  ensure_hash(KEYS[2])
  redis.call('HSET', KEYS[2], 'live', '0')
end
return 1
