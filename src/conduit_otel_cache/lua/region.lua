-- One region of one instance: the stats hash, the region's aggregated hash, its counts
-- hash and the instance's raw samples list (one hash slot in Redis Cluster: the keys share
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

-- The writes a region's totals hold (`<aggregated hash>:writes`, in its slot): per instance
-- id 'token:seq' of the last write of the region applied to them; 'epoch': the totals it
-- belongs to (created with them). A departed instance's record stays ('removed' counts
-- them; at REMOVED_CAP the records start again, 'reset'). Read only when the stats hash
-- that would tell is gone: a writer's reply was lost, or Redis went back to an older
-- snapshot.
local REMOVED_CAP = 1000

-- A region's keys, declared in KEYS from k on (protocol.region_keys() in protocol.py):
-- stats hash, aggregated hash, counts hash, samples list, then the totals' record of writes
-- and continuity record, which the functions below find by the aggregated hash. Every key
-- is declared, so that Redis Cluster routes a call by all of them: a slot in migration
-- answers ASK or TRYAGAIN, and no key is ever written on a node that does not own it.
local REGION_KEYS = 6
local DECLARED = {}
local function region_at(k)
  DECLARED[KEYS[k + 1]] = {writes = KEYS[k + 4], continuity = KEYS[k + 5]}
  return KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
end
local function writes_key(akey) return DECLARED[akey].writes end

local function refresh_region(skey, akey, ckey, lkey, h)
  redis.call('EXPIRE', skey, h.ttl)
  redis.call('EXPIRE', akey, h.ttl)
  redis.pcall('EXPIRE', writes_key(akey), h.ttl)
  redis.pcall('EXPIRE', ckey, h.ttl)
  -- what data losses took from the totals (serve's continuity record) lives as long
  redis.pcall('EXPIRE', DECLARED[akey].continuity, h.ttl)
  redis.pcall('EXPIRE', lkey, h.sample_ttl)
end

local function totals_epoch(akey, now_s, h)
  -- The epoch of the region's totals: it names one life of the aggregated hash, so that a
  -- lost (deleted, evicted, expired) and recreated hash is told from the one that holds
  -- what was written. Totals without an epoch (written before epochs) adopt one.
  local ep = redis.pcall('HGET', akey, 'epoch')
  if failed(ep) then
    redis.call('DEL', akey)
    ep = false
  end
  if ep then return ep end
  ep = now_s .. '-' .. string.sub(h.token, 1, 8)
  redis.call('HSET', akey, 'epoch', ep)
  redis.call('EXPIRE', akey, h.ttl)
  local wkey = writes_key(akey)
  redis.call('DEL', wkey)
  redis.call('HSET', wkey, 'epoch', ep)
  redis.call('EXPIRE', wkey, h.ttl)
  return ep
end

local function count_removed(akey)
  -- One more record kept for a writer that may write again (removed by cleanup, or
  -- displaced by another incarnation under its id); at REMOVED_CAP they start again.
  local wkey = writes_key(akey)
  local n = redis.pcall('HINCRBY', wkey, 'removed', 1)
  if type(n) == 'number' and n >= REMOVED_CAP then
    local ep, ttl = redis.pcall('HGET', wkey, 'epoch'), redis.call('TTL', akey)
    redis.call('DEL', wkey)
    if type(ep) == 'string' then
      redis.call('HSET', wkey, 'epoch', ep, 'reset', '1')
      if ttl > 0 then redis.call('EXPIRE', wkey, ttl) end
    end
  end
end

local function keep_record(akey, id, token)
  -- Another incarnation takes id over: the record of token's writes moves to 'id#token'
  -- (it may have moved aside to another id, and write again).
  local wkey = writes_key(akey)
  local rec = redis.pcall('HGET', wkey, id)
  if type(rec) == 'string' and string.sub(rec, 1, #token + 1) == token .. ':' then
    redis.pcall('HSET', wkey, id .. '#' .. token, rec)
    count_removed(akey)
  end
end

local function write_fate(akey, id, token, seq, epoch)
  -- Do these totals hold write number seq of incarnation token under id? 'yes', 'older'
  -- (an earlier write of it is the last they hold), 'none' (nothing of it), or 'unknown'
  -- (the record of their writes is lost, or cleanup removed the writer's).
  local got = redis.pcall('HMGET', writes_key(akey), 'epoch', 'reset', id, id .. '#' .. token)
  if failed(got) or got[1] ~= epoch then return 'unknown' end
  local tok, last = nil, nil
  if got[3] then tok, last = string.match(got[3], '^(.*):(%d+)$') end
  if tok ~= token and got[4] then tok, last = string.match(got[4], '^(.*):(%d+)$') end
  if tok == token then return num(last) >= num(seq) and 'yes' or 'older' end
  return got[2] and 'unknown' or 'none'
end

local function written_to(akey, id)
  -- Whether these totals may hold live gauges of id: false only when the record of their
  -- writes (of the same epoch, never started again) lists no write of it, as after the
  -- totals were lost and rebuilt from the live instances alone.
  local got = redis.pcall('HMGET', writes_key(akey), 'epoch', 'reset', id)
  if failed(got) or got[2] or got[3] or got[1] ~= redis.call('HGET', akey, 'epoch') then
    return true
  end
  return false
end

local function unsure_fate(akey, h, b, epoch)
  -- Did Redis apply the writer's write b.unsure (its reply was lost) to these totals?
  -- 'yes', 'no', or 'unknown'.
  -- (b.uid, b.utoken: the id and token it was written with, before the writer moved aside)
  local fate = write_fate(akey, b['uid'] or h.id, b['utoken'] or h.token, b['unsure'], epoch)
  if fate == 'older' or fate == 'none' then return 'no' end
  return fate
end

local function unsure_values(b)
  -- The values of the writer's write whose reply was lost ('u:<field>' in its base).
  local v = {live = b['live']}
  for f, x in pairs(b) do
    if string.sub(f, 1, 2) == 'u:' then v[string.sub(f, 3)] = x end
  end
  return v
end

local function check_region(skey, akey, ckey, lkey, h, e)
  -- A check: Redis still holds every write of the region up to e.after for h.token, in the
  -- totals it was written to (an evicted or deleted key, or a failover that lost writes,
  -- fails it: 'full').
  local got = redis.pcall('HMGET', skey, 'token', 'seq', 'epoch')
  if failed(got) or got[1] ~= h.token or num(got[2]) < e.after then return 'full' end
  if got[3] and redis.pcall('HGET', akey, 'epoch') ~= got[3] then return 'full' end
  if h.refresh then refresh_region(skey, akey, ckey, lkey, h) end
  return 'ok'
end

local function write_region(skey, akey, ckey, lkey, h, e, now_s)
  -- Apply one region entry e of incarnation h.token. Counters are cumulative per
  -- incarnation: only an increase is added to the aggregated hash, so a repeated or late
  -- (older) write adds nothing; a field left out is unchanged. Another token (a restart
  -- under the same id) starts new series and replaces the earlier incarnation's live
  -- gauges; it needs a full entry: returns 'full' (nothing written) when e is partial, and
  -- so does a partial entry that continues from a write Redis does not hold (e.after), or
  -- whose stats hash was written to totals that were lost since (another epoch).
  -- A full entry whose stats hash is gone while the totals still hold its writer's last
  -- acknowledged write (e.epoch) continues from e.base: only what is new is added.
  -- TTLs are renewed by new regions and by refreshing writes (h.refresh), not by every write.
  -- Returns 'ok', 'full' and the epoch of the totals.
  if is_check(e) then
    return check_region(skey, akey, ckey, lkey, h, e)
  end
  local names = {'token', 'live', 'hit_count', 'miss_count', 'size_bytes', 'seq', 'epoch'}
  for f in pairs(e.fields) do names[#names + 1] = f end
  local got = redis.pcall('HMGET', skey, unpack(names))
  if failed(got) then  -- not a hash: foreign or corrupted data, replaced
    redis.call('DEL', skey)
    got = {}
  end
  local old = {}
  for i, f in ipairs(names) do if got[i] then old[f] = got[i] end end
  if old['token'] and old['token'] ~= h.token and h.known and (e.after > 0 or e.epoch ~= '') then
    return 'full'  -- another incarnation took over a region this one wrote: displaced
  end
  local epoch = totals_epoch(akey, now_s, h)
  if old['token'] and old['token'] ~= h.token then keep_record(akey, h.id, old['token']) end
  -- the stats hash's contribution is in these totals (a hash without an epoch predates them)
  local counted = old['token'] ~= nil and (old['epoch'] == nil or old['epoch'] == epoch)
  local same = old['token'] == h.token and counted
  if not e.full and not (same and num(old['seq']) >= e.after) then return 'full' end
  local was_live = counted and old['live'] == '1'
  local resumed = false
  -- what the totals hold of this writer when its stats hash is gone: what Redis
  -- acknowledged (e.base, in the totals of e.epoch); or, when the reply of a later write
  -- was lost (base 'unsure': its number, 'u:<field>' its values, 'uepoch' its totals or
  -- '*' unknown), that write's, if the totals' record of their writes says it was applied
  local from, from_epoch, unknown = e.base, e.epoch, false
  if not same and e.base and e.base['unsure'] then
    local fate = unsure_fate(akey, h, e.base, epoch)
    if fate == 'yes' then
      from, from_epoch = unsure_values(e.base), epoch
    elseif fate == 'unknown' then
      -- Redis lost the only record of it: counted as applied (never twice), reported
      from, unknown = unsure_values(e.base), true
      from_epoch = e.base['uepoch'] == '*' and epoch or e.base['uepoch']
    end
  end
  -- A Redis back from an older snapshot (an RDB saved before, a replica promoted before it
  -- caught up) lost the acknowledged write (b.aseq) with the stats hash: when the totals'
  -- record holds nothing of this incarnation, they hold none of its values either
  if not same and from == e.base and from and from['aseq']
     and write_fate(akey, h.id, h.token, from['aseq'], epoch) == 'none' then
    from = nil
  end
  if not same and from_epoch ~= '' then
    if from_epoch == epoch and from then
      -- the stats hash is gone, the totals hold what Redis acknowledged: continue from it
      old, same, resumed = from, true, true
      -- its live gauges are still in the totals unless it departed: the writer saw it
      -- live, or it is still listed in the region's counts hash (a departure
      -- takes it out of both)
      was_live = from['live'] == '1' or redis.pcall('HEXISTS', ckey, h.id) == 1
      if unknown then mark_lost(akey, now_s) end
    elseif redis.call('HSETNX', akey, 'rebuilt', '1') == 1 then
      mark_lost(akey, now_s)  -- the totals were lost: rebuilt whole from the live writers
    end
  elseif old['epoch'] and old['epoch'] ~= epoch
         and redis.call('HSETNX', akey, 'rebuilt', '1') == 1 then
    mark_lost(akey, now_s)
  end

  local cur = {}  -- the incarnation's values after this write
  local flat = {'last_updated', now_s, 'seq', h.seq, 'epoch', epoch}
  if not (same and was_live and old['token'] == h.token) then
    flat[7], flat[8], flat[9], flat[10] = 'live', '1', 'token', h.token
  end
  for f, v in pairs(e.fields) do
    local nv = num(v)
    local prev = same and num(old[f]) or 0
    if f == 'size_bytes' then
      cur[f] = nv
    elseif nv > prev or not same then  -- a counter: add what happened since the last write
      incr(akey, f, nv - prev, f == 'rt_sum')
      cur[f] = nv
    elseif resumed then  -- the stats hash is written again whole
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

  -- The instance's hit and miss counts in the region's counts hash ('<hits> <misses>'),
  -- updated in place when they changed: the reader's per-instance pass reads one hash per
  -- region for drift and the per-instance hit ratios. Removing the last field deletes the
  -- hash: it is then not touched again in this script (in a Redis Cluster slot being
  -- migrated that would fail).
  local hits, misses = value('hit_count'), value('miss_count')
  local rated = hits + misses > 0
  if cur['hit_count'] or cur['miss_count'] or not (same and was_live) then
    if rated then
      call_on(ckey, 'HSET', ckey, h.id, string.format('%.0f %.0f', hits, misses))
    else
      redis.pcall('HDEL', ckey, h.id)
    end
  end

  -- The stats hash is rewritten in place (a key deleted mid-script could not be written
  -- again in a Redis Cluster slot being migrated, and the script would stop half way);
  -- an earlier incarnation's fields that this one does not have are dropped.
  if old['token'] ~= h.token and got[1] then
    local stale = {}
    local all = redis.call('HKEYS', skey)
    for _, f in ipairs(all) do
      if e.fields[f] == nil and f ~= 'live' and f ~= 'last_updated' and f ~= 'token'
         and f ~= 'seq' and f ~= 'epoch' then
        stale[#stale + 1] = f
      end
    end
    if #stale > 0 then redis.call('HDEL', skey, unpack(stale)) end
  end
  redis.call('HSET', skey, unpack(flat))
  if e.samples ~= '' then
    append_samples(lkey, e.samples, h.cap, old['token'] ~= h.token)
  elseif old['token'] ~= h.token then
    redis.call('DEL', lkey)
  end
  call_on(akey, 'HSET', akey, 'last_aggregated', now_s)
  call_on(writes_key(akey), 'HSET', writes_key(akey), h.id, h.token .. ':' .. h.seq)
  if e.full or h.refresh then refresh_region(skey, akey, ckey, lkey, h) end
  return 'ok', epoch
end

local function leave_gauges(akey, size, hits, misses, counted)
  -- Take one instance's live gauges out of the totals (counted: its instance count too),
  -- never below zero; when no live instance is left, every live gauge is zero.
  incr(akey, 'size_bytes', -size, false)
  incr(akey, 'live_hit_count', -hits, false)
  incr(akey, 'live_miss_count', -misses, false)
  if counted then incr(akey, 'instance_count', -1, false) end
  local g = redis.call('HMGET', akey, 'instance_count', 'size_bytes', 'live_hit_count',
                       'live_miss_count')
  local nobody = (tonumber(g[1]) or 0) <= 0
  local fix = {}
  for i, f in ipairs({'instance_count', 'size_bytes', 'live_hit_count', 'live_miss_count'}) do
    local v = tonumber(g[i])
    if v and (v < 0 or (nobody and v ~= 0)) then
      fix[#fix + 1] = f
      fix[#fix + 1] = '0'
    end
  end
  if #fix > 0 then redis.call('HSET', akey, unpack(fix)) end
end

local function depart_region(skey, akey, ckey, lkey, id, remove, unless_token, was_live)
  -- Take the instance's live gauges of this region out of the totals; counters stay.
  -- With unless_token, only when the region was last written by another incarnation.
  -- was_live: the instance was live, so a stats hash that is gone took its live gauges
  -- with it (deleted, evicted, expired): its instance count leaves, and the rest is
  -- reported (mark_lost) until no live instance is left in the region. was_live 'm': it
  -- was live, but Redis lost the list of its regions, so this region may not be one of
  -- them: only when the region's counts hash still lists it.
  ensure_hash(skey)
  ensure_hash(akey)
  local s = redis.call('HMGET', skey, 'live', 'size_bytes', 'hit_count', 'miss_count', 'token',
                       'epoch')
  if unless_token ~= '' and s[5] == unless_token then return end
  local totals = redis.call('EXISTS', akey) == 1
  if s[1] == '1' then
    if totals and (not s[6] or s[6] == redis.call('HGET', akey, 'epoch')) then
      leave_gauges(akey, num(s[2]), num(s[3]), num(s[4]), true)
    end
    redis.call('HSET', skey, 'live', '0')
  elseif not s[5] and totals and (was_live == true or (was_live == 'm'
         and redis.pcall('HEXISTS', ckey, id) == 1)) and written_to(akey, id) then
    leave_gauges(akey, 0, 0, 0, true)
    local left = tonumber(redis.call('HGET', akey, 'instance_count')) or 0
    if left > 0 then mark_lost(akey, server_time_s()) end
  end
  ensure_type(ckey, 'hash')
  redis.call('HDEL', ckey, id)
  if remove or unless_token ~= '' then redis.call('DEL', lkey) end
  if remove then
    redis.call('DEL', skey)
    -- its record stays: removed for its age it may write again, and after its own
    -- shutdown another incarnation may write under the id (a Redis back from an older
    -- snapshot tells by the record whether the totals hold a writer's acknowledged write)
    if redis.call('EXISTS', writes_key(akey)) == 1 then count_removed(akey) end
  end
end
