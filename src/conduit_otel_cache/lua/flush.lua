-- Write one instance's cumulative statistics and apply their change to the cluster totals.
-- KEYS: instances zset, regions set, instance meta hash, instance regions set,
--       then per region: instance stats hash, aggregated hash, hit-rates zset.
-- ARGV: instance id, process token, ttl seconds, instance timeout seconds,
--       then per region: region, field count n, n pairs of field, cumulative value.
-- Idempotent: the same values sent twice change nothing. A new token (a restarted
-- process) or a lower value starts a new series, so cluster counters never go back.
-- Gauges (size, instance count, the live hit and miss sums behind drift) replace the
-- instance's previous contribution instead of adding to it.
local now = server_time()
local now_s = string.format('%.6f', now)
local id, token = ARGV[1], ARGV[2]
local ttl, timeout = tonumber(ARGV[3]), tonumber(ARGV[4])

ensure_type(KEYS[1], 'zset')
ensure_type(KEYS[2], 'set')
ensure_hash(KEYS[3])
ensure_type(KEYS[4], 'set')
local old_token = redis.call('HGET', KEYS[3], 'token')
local last_beat = redis.call('ZSCORE', KEYS[1], id)
local reset = old_token ~= token
local duplicate = 0
if old_token and reset and last_beat and now - num(last_beat) < timeout then duplicate = 1 end

redis.call('HSET', KEYS[3], 'token', token, 'live', '1', 'last_flush', now_s)
redis.call('EXPIRE', KEYS[3], ttl)
redis.call('ZADD', KEYS[1], now_s, id)
redis.call('EXPIRE', KEYS[1], ttl)

local LIVE = {size_bytes = 'size_bytes', hit_count = 'live_hit_count',
              miss_count = 'live_miss_count'}

local a, k = 5, 5
while a <= #ARGV do
  local region, n = ARGV[a], tonumber(ARGV[a + 1])
  local skey, akey, rkey = KEYS[k], KEYS[k + 1], KEYS[k + 2]
  ensure_hash(skey)
  ensure_hash(akey)
  ensure_type(rkey, 'zset')
  local old = {}
  local raw = redis.call('HGETALL', skey)
  for i = 1, #raw, 2 do old[raw[i]] = raw[i + 1] end
  local was_live = old['live'] == '1'

  local new = {}
  local flat = {'live', '1', 'last_updated', now_s}
  for j = a + 2, a + 1 + 2 * n, 2 do
    local f, v = ARGV[j], ARGV[j + 1]
    new[f] = tonumber(v)
    flat[#flat + 1] = f
    flat[#flat + 1] = v
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

  local requests = (new['hit_count'] or 0) + (new['miss_count'] or 0)
  if requests > 0 then
    redis.call('ZADD', rkey, string.format('%.17g', 100 * (new['hit_count'] or 0) / requests), id)
  else
    redis.call('ZREM', rkey, id)
  end

  update_drift(akey, rkey)

  redis.call('DEL', skey)
  redis.call('HSET', skey, unpack(flat))
  redis.call('EXPIRE', skey, ttl)
  redis.call('HSET', akey, 'last_aggregated', now_s)
  redis.call('EXPIRE', akey, ttl)
  redis.call('EXPIRE', rkey, ttl)
  redis.call('SADD', KEYS[2], region)
  redis.call('SADD', KEYS[4], region)
  a, k = a + 2 + 2 * n, k + 3
end
redis.call('EXPIRE', KEYS[2], ttl)
redis.call('EXPIRE', KEYS[4], ttl)
return {now_s, duplicate}
