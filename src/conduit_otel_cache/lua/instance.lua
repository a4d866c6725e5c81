-- The instance-level keys: heartbeat zset, regions set, instance meta hash and instance
-- regions set (one hash slot in Redis Cluster: the keys share the tag {global}).

local function beat(zkey, gkey, mkey, ikey, id, token, ttl, timeout, now, regions)
  -- Beat the heartbeat, record the token and the regions; returns whether the token
  -- changed (reset) and whether another live process flushes as the same id (duplicate).
  local now_s = string.format('%.6f', now)
  ensure_type(zkey, 'zset')
  ensure_type(gkey, 'set')
  ensure_hash(mkey)
  ensure_type(ikey, 'set')
  local old_token = redis.call('HGET', mkey, 'token')
  local last_beat = redis.call('ZSCORE', zkey, id)
  local reset = old_token ~= token
  local duplicate = 0
  if old_token and reset and last_beat and now - num(last_beat) < timeout then duplicate = 1 end

  redis.call('HSET', mkey, 'token', token, 'live', '1', 'last_flush', now_s)
  redis.call('EXPIRE', mkey, ttl)
  redis.call('ZADD', zkey, now_s, id)
  redis.call('EXPIRE', zkey, ttl)
  for _, region in ipairs(regions) do
    redis.call('SADD', gkey, region)
    redis.call('SADD', ikey, region)
  end
  if #regions > 0 then
    redis.call('EXPIRE', gkey, ttl)
    redis.call('EXPIRE', ikey, ttl)
  end
  return reset, duplicate
end

local function departure_due(zkey, id, max_age)
  -- True when the instance may depart: max_age is '' (now) or its heartbeat is older.
  if max_age ~= '' then
    local score = redis.pcall('ZSCORE', zkey, id)
    if type(score) == 'string' and num(score) >= server_time() - tonumber(max_age) then
      return false
    end
  end
  return true
end

local function depart_instance(zkey, mkey, ikey, id, remove)
  -- After its regions: delete the instance (remove) or mark it not live.
  if remove then
    redis.call('DEL', mkey, ikey)
    redis.pcall('ZREM', zkey, id)
  elseif redis.call('EXISTS', mkey) == 1 then
    ensure_hash(mkey)
    redis.call('HSET', mkey, 'live', '0')
  end
end
