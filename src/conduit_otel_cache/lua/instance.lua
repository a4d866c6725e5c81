-- The instance-level keys: heartbeat zset, regions set, instance meta hash and instance
-- regions set (one hash slot in Redis Cluster: the keys share the tag {global}).

local function beat(zkey, gkey, mkey, ikey, h, now, regions, refresh)
  -- Beat the heartbeat of incarnation h.token and record its regions. Returns the server
  -- time, a status, the regions an earlier incarnation under this id has yet to leave, and
  -- '1' when Redis did not hold this incarnation as live (it was reaped, or Redis lost
  -- it): the caller then writes every region whole. Statuses:
  --   'ok';
  --   'duplicate': another live process (other token and owner, fresh heartbeat) writes
  --     as this id: nothing is written, the caller takes another id;
  --   'unregistered': an incarnation Redis does not know, with nothing to write yet or a
  --     write that is not full: it is not live (the caller writes whole if it has data).
  -- regions: the names of the full entries (recorded in the regions sets); refresh: the
  -- write renews TTLs and checks key types (a new incarnation registers only so).
  local now_s = string.format('%.6f', now)
  if refresh then
    ensure_type(zkey, 'zset')
    ensure_type(gkey, 'set')
    ensure_type(ikey, 'set')
  end
  local m = redis.pcall('HMGET', mkey, 'token', 'live', 'owner', 'stale')
  if failed(m) then
    redis.call('DEL', mkey)
    m = {}
  end
  local old_token, live, owner, stale = m[1], m[2], m[3], m[4]
  if old_token ~= h.token then
    if old_token and live == '1' and owner ~= h.owner then
      local last = redis.call('ZSCORE', zkey, h.id)
      if last and now - num(last) < h.timeout then return {now_s, 'duplicate', {}, '0'} end
    end
    if not refresh or #regions == 0 then return {now_s, 'unregistered', {}, '0'} end
    -- a new incarnation: the regions of the earlier ones must leave the live gauges
    if old_token and redis.call('SCARD', ikey) > 0 then stale = '1' end
  end
  local rebuild = (old_token ~= h.token or live ~= '1') and '1' or '0'
  if rebuild == '1' then
    redis.call('HSET', mkey, 'token', h.token, 'live', '1', 'owner', h.owner, 'last_flush', now_s)
  else
    redis.call('HSET', mkey, 'last_flush', now_s)
  end
  if stale == '1' then redis.call('HSET', mkey, 'stale', '1') end
  call_on(zkey, 'ZADD', zkey, now_s, h.id)
  if #regions > 0 then
    call_on(gkey, 'SADD', gkey, unpack(regions))
    call_on(ikey, 'SADD', ikey, unpack(regions))
  end
  if refresh then
    redis.call('EXPIRE', mkey, h.ttl)
    redis.call('EXPIRE', zkey, h.ttl)
    redis.call('EXPIRE', gkey, h.ttl)
    redis.call('EXPIRE', ikey, h.ttl)
  end
  if stale == '1' then return {now_s, 'ok', redis.call('SMEMBERS', ikey), rebuild} end
  return {now_s, 'ok', {}, rebuild}
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
