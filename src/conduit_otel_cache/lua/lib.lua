-- Helpers prepended to every script of this folder.
local function num(x)
  -- A malformed stored value counts as 0 (it is then overwritten), never as an error.
  local n = tonumber(x)
  if n == nil or n ~= n or n < 0 or n == math.huge then return 0 end
  return n
end

local function incr(key, field, delta, is_float)
  -- Add delta to a hash field; returns the new value (nil when delta is 0: nothing sent).
  if delta == 0 then return nil end
  local arg = is_float and string.format('%.17g', delta) or string.format('%.0f', delta)
  local res = redis.pcall(is_float and 'HINCRBYFLOAT' or 'HINCRBY', key, field, arg)
  if type(res) == 'table' and res.err then
    -- the stored field is not a number: restart it from this change
    redis.call('HSET', key, field, arg)
    return tonumber(arg)
  end
  return tonumber(res)
end

local function ensure_type(key, wanted)
  -- A key of the wrong type (foreign or corrupted data) is replaced, never an error.
  local t = redis.call('TYPE', key)['ok']
  if t ~= wanted and t ~= 'none' then redis.call('DEL', key) end
end

local function ensure_hash(key) ensure_type(key, 'hash') end

local function server_time()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local function drift_of(akey, rkey, count, hits, misses)
  -- Drift: the largest distance (percentage points) between the live cluster hit rate
  -- and the lowest or highest live instance hit rate; 0 with fewer than two instances.
  -- `count` is the zset's size, known by the caller: an empty zset no longer exists and
  -- is not touched (in a Redis Cluster slot being migrated that would fail the script).
  -- `hits`, `misses`: the live sums when the caller knows them (else they are read).
  if count < 2 then return '0' end
  if hits == nil or misses == nil then
    local live = redis.call('HMGET', akey, 'live_hit_count', 'live_miss_count')
    hits, misses = live[1], live[2]
  end
  hits, misses = num(hits), num(misses)
  local rate = hits + misses > 0 and 100 * hits / (hits + misses) or 0
  local low = tonumber(redis.call('ZRANGE', rkey, 0, 0, 'WITHSCORES')[2])
  local high = tonumber(redis.call('ZRANGE', rkey, -1, -1, 'WITHSCORES')[2])
  return string.format('%.17g', math.max(math.abs(high - rate), math.abs(rate - low)))
end
