-- One region of one instance: the stats hash, the region's aggregated hash, its hit-rates
-- zset and the instance's raw samples list (one hash slot in Redis Cluster: the keys share
-- the tag {<region>}).

local LIVE = {size_bytes = 'size_bytes', hit_count = 'live_hit_count',
              miss_count = 'live_miss_count'}

local function append_samples(lkey, csv, cap, only_these)
  -- The last `cap` raw response times (seconds) of the instance in the region
  -- (`...:<instance>:<region>:response_times`); only_these: drop what was there before.
  local items, n = {}, 0
  for x in string.gmatch(csv, '[^,]+') do
    items[#items + 1] = x
    n = n + 1
    if #items == 1000 then
      call_on(lkey, 'RPUSH', lkey, unpack(items))
      items = {}
    end
  end
  if #items > 0 then call_on(lkey, 'RPUSH', lkey, unpack(items)) end
  if only_these and n < cap then cap = n end
  redis.call('LTRIM', lkey, -cap, -1)
end

local function refresh_region(skey, akey, rkey, lkey, h)
  redis.call('EXPIRE', skey, h.ttl)
  redis.call('EXPIRE', akey, h.ttl)
  redis.pcall('EXPIRE', rkey, h.ttl)
  redis.pcall('EXPIRE', lkey, h.sample_ttl)
end

local function check_region(skey, akey, rkey, lkey, h, e)
  -- A check: Redis still holds every write of the region up to e.after for h.token (an
  -- evicted or deleted key, or a failover that lost writes, fails it: 'full').
  local got = redis.pcall('HMGET', skey, 'token', 'seq')
  if failed(got) or got[1] ~= h.token or num(got[2]) < e.after then return 'full' end
  if h.refresh then refresh_region(skey, akey, rkey, lkey, h) end
  return 'ok'
end

local function write_region(skey, akey, rkey, lkey, h, e, now_s)
  -- Apply one region entry e of incarnation h.token. Counters are cumulative per
  -- incarnation: only an increase is added to the aggregated hash, so a repeated or late
  -- (older) write adds nothing; a field left out is unchanged. Another token (a restart
  -- under the same id) starts new series and replaces the earlier incarnation's live
  -- gauges; it needs a full entry: returns 'full' (nothing written) when e is partial, and
  -- so does a partial entry that continues from a write Redis does not hold (e.after).
  -- TTLs are renewed by new regions and by refreshing writes (h.refresh), not by every write.
  if not e.full and e.n == 0 and e.samples == '' then
    return check_region(skey, akey, rkey, lkey, h, e)
  end
  local names = {'token', 'live', 'hit_count', 'miss_count', 'size_bytes', 'seq'}
  for f in pairs(e.fields) do names[#names + 1] = f end
  local got = redis.pcall('HMGET', skey, unpack(names))
  if failed(got) then  -- not a hash: foreign or corrupted data, replaced
    redis.call('DEL', skey)
    got = {}
  end
  local old = {}
  for i, f in ipairs(names) do if got[i] then old[f] = got[i] end end
  local same = old['token'] == h.token
  if not e.full and not (same and num(old['seq']) >= e.after) then return 'full' end
  local was_live = old['live'] == '1'

  local cur = {}  -- the incarnation's values after this write
  local flat = {'last_updated', now_s, 'seq', h.seq}
  if not (same and was_live) then
    flat[5], flat[6], flat[7], flat[8] = 'live', '1', 'token', h.token
  end
  for f, v in pairs(e.fields) do
    local nv = num(v)
    local prev = same and num(old[f]) or 0
    if f == 'size_bytes' then
      cur[f] = nv
    elseif nv > prev or not same then  -- a counter: add what happened since the last write
      incr(akey, f, nv - prev, f == 'rt_sum')
      cur[f] = nv
    end
    if cur[f] ~= nil then
      flat[#flat + 1] = f
      flat[#flat + 1] = v
    end
  end
  local function value(f)
    if cur[f] ~= nil then return cur[f] end
    return same and num(old[f]) or 0
  end
  for f, live_field in pairs(LIVE) do  -- a live gauge: replace the previous contribution
    incr(akey, live_field, value(f) - (was_live and num(old[f]) or 0), false)
  end
  if not was_live then incr(akey, 'instance_count', 1, false) end

  -- The instance's hit ratio (x 100), updated in place when it changed (drift and the
  -- per-instance series are computed from these rates by the reader's per-instance pass).
  -- Removing the last member deletes the zset: it is then not touched again in this
  -- script (in a Redis Cluster slot being migrated that would fail).
  local hits, misses = value('hit_count'), value('miss_count')
  local rated = hits + misses > 0
  if cur['hit_count'] or cur['miss_count'] or not (same and was_live) then
    if rated then
      call_on(rkey, 'ZADD', rkey, string.format('%.17g', 100 * hits / (hits + misses)), h.id)
    else
      redis.pcall('ZREM', rkey, h.id)
    end
  end

  -- The stats hash is rewritten in place (a key deleted mid-script could not be written
  -- again in a Redis Cluster slot being migrated, and the script would stop half way);
  -- an earlier incarnation's fields that this one does not have are dropped.
  if not same and next(old) ~= nil then
    local stale = {}
    local all = redis.call('HKEYS', skey)
    for _, f in ipairs(all) do
      if e.fields[f] == nil and f ~= 'live' and f ~= 'last_updated' and f ~= 'token'
         and f ~= 'seq' then
        stale[#stale + 1] = f
      end
    end
    if #stale > 0 then redis.call('HDEL', skey, unpack(stale)) end
  end
  redis.call('HSET', skey, unpack(flat))
  if e.samples ~= '' then
    append_samples(lkey, e.samples, h.cap, not same)
  elseif not same then
    redis.call('DEL', lkey)
  end
  call_on(akey, 'HSET', akey, 'last_aggregated', now_s)
  if e.full or h.refresh then refresh_region(skey, akey, rkey, lkey, h) end
  return 'ok'
end

local function depart_region(skey, akey, rkey, lkey, id, remove, unless_token)
  -- Take the instance's live gauges of this region out of the totals; counters stay.
  -- With unless_token, only when the region was last written by another incarnation.
  ensure_hash(skey)
  ensure_hash(akey)
  local s = redis.call('HMGET', skey, 'live', 'size_bytes', 'hit_count', 'miss_count', 'token')
  if unless_token ~= '' and s[5] == unless_token then return end
  if s[1] == '1' then
    incr(akey, 'size_bytes', -num(s[2]), false)
    incr(akey, 'live_hit_count', -num(s[3]), false)
    incr(akey, 'live_miss_count', -num(s[4]), false)
    incr(akey, 'instance_count', -1, false)
    redis.call('HSET', skey, 'live', '0')
  end
  ensure_type(rkey, 'zset')
  redis.call('ZREM', rkey, id)
  if remove or unless_token ~= '' then redis.call('DEL', lkey) end
  if remove then redis.call('DEL', skey) end
end
