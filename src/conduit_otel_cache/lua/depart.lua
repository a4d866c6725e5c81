-- Take an instance's live gauges (size, instance count, live hit and miss sums, hit rate)
-- out of the cluster totals; its counted events stay. With a max age, only if its
-- heartbeat is older than that.
-- KEYS: instances zset, instance meta hash, instance regions set,
--       then per region: instance stats hash, aggregated hash, hit-rates zset.
-- ARGV: instance id, max heartbeat age in seconds or '' (now), '1' to delete its keys.
local id, max_age, remove = ARGV[1], ARGV[2], ARGV[3] == '1'
if max_age ~= '' then
  local score = redis.pcall('ZSCORE', KEYS[1], id)
  if type(score) == 'string' and num(score) >= server_time() - tonumber(max_age) then
    return 0
  end
end
for k = 4, #KEYS, 3 do
  local skey, akey, rkey = KEYS[k], KEYS[k + 1], KEYS[k + 2]
  ensure_hash(skey)
  ensure_hash(akey)
  if redis.call('HGET', skey, 'live') == '1' then
    local s = redis.call('HMGET', skey, 'size_bytes', 'hit_count', 'miss_count')
    incr(akey, 'size_bytes', -num(s[1]), false)
    incr(akey, 'live_hit_count', -num(s[2]), false)
    incr(akey, 'live_miss_count', -num(s[3]), false)
    incr(akey, 'instance_count', -1, false)
    redis.call('HSET', skey, 'live', '0')
  end
  ensure_type(rkey, 'zset')
  redis.call('ZREM', rkey, id)
  update_drift(akey, rkey)
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
