-- One region of one instance: the stats hash, the region's aggregated hash and its
-- hit-rates zset (one hash slot in Redis Cluster: the keys share the tag {<region>}).

local LIVE = {size_bytes = 'size_bytes', hit_count = 'live_hit_count',
              miss_count = 'live_miss_count'}

local function append_samples(lkey, csv, cap, sample_ttl)
  -- The last `cap` raw response times (seconds) of the instance in the region, as the
  -- design's `...:<instance>:<region>:response_times` list.
  ensure_type(lkey, 'list')
  local items = {}
  for x in string.gmatch(csv, '[^,]+') do
    items[#items + 1] = x
    if #items == 1000 then
      redis.call('RPUSH', lkey, unpack(items))
      items = {}
    end
  end
  if #items > 0 then redis.call('RPUSH', lkey, unpack(items)) end
  redis.call('LTRIM', lkey, -cap, -1)
  redis.call('EXPIRE', lkey, sample_ttl)
end

local function flush_region(skey, akey, rkey, lkey, id, token, untokened_reset, now_s, ttl,
                            argv, first, n)
  -- Store the cumulative values argv[first], argv[first + 1], ... (n field, value pairs)
  -- and add their change since the last flush to the aggregated hash. The stats hash
  -- keeps the process token: another token (a restarted process) starts a new series.
  -- A hash written before tokens were stored there uses untokened_reset.
  ensure_hash(skey)
  ensure_hash(akey)
  ensure_type(rkey, 'zset')
  local old = {}
  local raw = redis.call('HGETALL', skey)
  for i = 1, #raw, 2 do old[raw[i]] = raw[i + 1] end
  local was_live = old['live'] == '1'
  local reset = untokened_reset
  if old['token'] ~= nil then reset = old['token'] ~= token end

  local new = {}
  local flat = {'live', '1', 'last_updated', now_s, 'token', token}
  for j = first, first + 2 * n - 1, 2 do
    local f, v = argv[j], argv[j + 1]
    local cap, sample_ttl = string.match(f, '^samples:(%d+):(%d+)$')
    if cap then
      append_samples(lkey, v, tonumber(cap), tonumber(sample_ttl))
    else
      new[f] = tonumber(v)
      flat[#flat + 1] = f
      flat[#flat + 1] = v
    end
  end
  for f, nv in pairs(new) do
    if f ~= 'size_bytes' then  -- a counter: add what happened since the last flush
      local prev = reset and 0 or num(old[f])
      if nv < prev then prev = 0 end
      incr(akey, f, nv - prev, f == 'rt_sum')
    end
  end
  for f, live_field in pairs(LIVE) do  -- a live gauge: replace the previous contribution
    incr(akey, live_field, (new[f] or 0) - (was_live and num(old[f]) or 0), false)
  end
  if not was_live then incr(akey, 'instance_count', 1, false) end

  -- The instance's hit rate, updated in place (drift and the per-instance series are
  -- computed from these rates by the reader's per-instance pass). Removing the last member
  -- deletes the zset: it is then not touched again in this script (in a Redis Cluster slot
  -- being migrated that would fail).
  local requests = (new['hit_count'] or 0) + (new['miss_count'] or 0)
  local rated = requests > 0
  if rated then
    redis.call('ZADD', rkey, string.format('%.17g', 100 * (new['hit_count'] or 0) / requests), id)
  else
    redis.call('ZREM', rkey, id)
  end

  -- Rewrite the stats hash in place: a key deleted mid-script could not be written again
  -- in a Redis Cluster slot being migrated, and the script would stop half way.
  local keep = {}
  for i = 1, #flat, 2 do keep[flat[i]] = true end
  local stale = {}
  for f in pairs(old) do
    if not keep[f] then stale[#stale + 1] = f end
  end
  redis.call('HSET', skey, unpack(flat))
  if #stale > 0 then redis.call('HDEL', skey, unpack(stale)) end
  redis.call('EXPIRE', skey, ttl)
  redis.call('HSET', akey, 'last_aggregated', now_s)
  redis.call('EXPIRE', akey, ttl)
  if rated then redis.call('EXPIRE', rkey, ttl) end
end

local function depart_region(skey, akey, rkey, lkey, id, remove)
  -- Take the instance's live gauges of this region out of the totals; counters stay.
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
  if remove then redis.call('DEL', skey, lkey) end
end
