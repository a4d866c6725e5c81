-- The instance-level keys: heartbeat zset, regions set, instance meta hash and instance
-- regions set (one hash slot in Redis Cluster: the keys share the tag {global}).

local function carry_errors(mkey, ekey, h, same)
  -- Add the increase of the incarnation's failed flushes (cumulative per kind) to the
  -- cluster's flush errors hash; at most 32 kinds, the rest count as 'Other'.
  local old = {}
  if same then
    for k, n in string.gmatch(redis.call('HGET', mkey, 'flush_errors') or '', '([%w_]+)=(%d+)') do
      old[k] = tonumber(n)
    end
  end
  ensure_type(ekey, 'hash')
  for k, n in string.gmatch(h.errors, '([%w_]+)=(%d+)') do
    local d = tonumber(n) - (old[k] or 0)
    if d > 0 then
      if redis.call('HEXISTS', ekey, k) == 0 and redis.call('HLEN', ekey) >= 32 then k = 'Other' end
      redis.call('HINCRBY', ekey, k, d)
    end
  end
  redis.call('HSET', mkey, 'flush_errors', h.errors, 'last_error', h.last_error)
  redis.call('EXPIRE', ekey, h.ttl)
end

local function beat(zkey, gkey, mkey, ikey, ekey, h, now, regions, refresh, listed)
  -- Beat the heartbeat of incarnation h.token and record its regions. Returns the server
  -- time, a status, the regions an earlier incarnation under this id has yet to leave,
  -- '1' when Redis did not hold this incarnation as live (it was reaped, or Redis lost
  -- it): the caller then writes every region whole, and '1' when that earlier incarnation
  -- was live when this one took over ('m': it was, but Redis lost its regions set, so the
  -- regions returned are every region, and leave only where Redis still shows it live).
  -- Statuses:
  --   'ok';
  --   'duplicate': another process writes as this id: nothing is written, the caller
  --     takes another id. Either this incarnation is new and another live one (other
  --     token and owner, fresh heartbeat) holds the id, or this one was acknowledged
  --     before (h.known) and another token has taken the id since (told by token, so two
  --     processes with one owner, such as PID 1 of two containers, are told apart too);
  --   'unregistered': an incarnation Redis does not know, with nothing to write yet or a
  --     write that is not full: it is not live (the caller writes whole if it has data).
  -- regions: the names of the full entries; listed: the regions to record in the regions
  -- sets (listed_regions() in lib.lua: so that a lost set is rebuilt); refresh: the write
  -- renews TTLs and checks key types (a new incarnation registers only so).
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
    if old_token and h.known then return {now_s, 'duplicate', {}, '0', '0'} end
    if old_token and live == '1' and owner ~= h.owner then
      local last = redis.call('ZSCORE', zkey, h.id)
      if last and now - num(last) < h.timeout then return {now_s, 'duplicate', {}, '0', '0'} end
    end
    if not refresh or #regions == 0 then return {now_s, 'unregistered', {}, '0', '0'} end
    -- a new incarnation: the regions of the earlier ones must leave the live gauges
    -- ('2': the earlier one was live, so a stats hash of it that is gone left its gauges)
    local listed_before = redis.call('SCARD', ikey) > 0
    if old_token and listed_before then
      stale = (live == '1' or stale == '2') and '2' or '1'
    elseif old_token and (live == '1' or stale == '2' or stale == '3') then
      -- it was live and Redis lost its regions set: every region is looked at, and it
      -- leaves those where Redis still shows it live ('3')
      stale = '3'
    elseif not old_token and not h.known and redis.call('ZSCORE', zkey, h.id) then
      -- still listed, its meta hash lost: its regions (or every region), where Redis
      -- still shows it live ('4', '3')
      stale = listed_before and '4' or '3'
    end
  end
  local rebuild = (old_token ~= h.token or live ~= '1') and '1' or '0'
  if rebuild == '1' then
    redis.call('HSET', mkey, 'token', h.token, 'live', '1', 'owner', h.owner, 'last_flush', now_s)
  else
    redis.call('HSET', mkey, 'last_flush', now_s)
  end
  if stale then redis.call('HSET', mkey, 'stale', stale) end
  local left = stale and redis.call('SMEMBERS', stale == '3' and gkey or ikey)
  if h.errors ~= '' then carry_errors(mkey, ekey, h, old_token == h.token) end
  call_on(zkey, 'ZADD', zkey, now_s, h.id)
  if #listed > 0 then
    call_on(gkey, 'SADD', gkey, unpack(listed))
    call_on(ikey, 'SADD', ikey, unpack(listed))
  end
  if refresh then
    redis.call('EXPIRE', mkey, h.ttl)
    redis.call('EXPIRE', zkey, h.ttl)
    redis.call('EXPIRE', gkey, h.ttl)
    redis.call('EXPIRE', ikey, h.ttl)
  end
  if stale then
    local how = stale == '2' and '1' or (stale == '3' or stale == '4') and 'm' or '0'
    return {now_s, 'ok', left, rebuild, how}
  end
  return {now_s, 'ok', {}, rebuild, '0'}
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

local function instance_live(mkey)
  -- The instance's meta hash says it is live (it has not departed).
  return redis.pcall('HGET', mkey, 'live') == '1'
end

local function depart_instance(zkey, mkey, ikey, id, remove)
  -- After its regions: delete the instance (remove) or mark it not live (a meta hash that
  -- was lost is written again, expiring with the heartbeats, so it departs once).
  if remove then
    redis.call('DEL', mkey, ikey)
    redis.pcall('ZREM', zkey, id)
  elseif redis.call('EXISTS', mkey) == 1 then
    ensure_hash(mkey)
    redis.call('HSET', mkey, 'live', '0')
  else
    redis.call('HSET', mkey, 'live', '0')
    local ttl = redis.pcall('TTL', zkey)
    if type(ttl) == 'number' and ttl > 0 then redis.call('EXPIRE', mkey, ttl) end
  end
end
