-- Helpers prepended to every script of this folder.
local function num(x)
  -- A malformed stored value counts as 0 (it is then overwritten), never as an error.
  local n = tonumber(x)
  if n == nil or n ~= n or n < 0 or n == math.huge then return 0 end
  return n
end

local function failed(reply) return type(reply) == 'table' and reply.err ~= nil end

local function incr(key, field, delta, is_float)
  if delta == 0 then return end
  local arg = is_float and string.format('%.17g', delta) or string.format('%.0f', delta)
  if failed(redis.pcall(is_float and 'HINCRBYFLOAT' or 'HINCRBY', key, field, arg)) then
    -- the stored field is not a number: restart it from this change (and a key that is
    -- no hash, foreign or corrupted data, is replaced)
    if failed(redis.pcall('HSET', key, field, arg)) then
      redis.call('DEL', key)
      redis.call('HSET', key, field, arg)
    end
  end
end

local function call_on(key, ...)
  -- redis.call(...) on key; a key of the wrong type is replaced first, never an error.
  if failed(redis.pcall(...)) then
    redis.call('DEL', key)
    return redis.call(...)
  end
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

local function server_time_s() return string.format('%.6f', server_time()) end

-- The one argument layout of the write scripts (flush.lua, beat.lua, regions.lua), encoded
-- by Writer.header() and entry_args() in protocol.py:
--   ARGV[1..12] instance id, incarnation token, owner (host:pid[:pid namespace]), ttl
--               seconds, instance timeout seconds, sample cap, sample ttl seconds, '1' to
--               refresh (TTLs of every key the write names are renewed, key types
--               checked; it checks regions too), 'c' when the write checks regions (every
--               region it names is listed in the regions sets) or '0', the write's number (it increases with every write of the
--               incarnation), and '1' when Redis has acknowledged this incarnation before
--               (a continuing writer: another token under its id means it was displaced),
--               the incarnation's failed flushes so far by kind ('Kind=n,...', '' none) and
--               the kind of the last one (carried by the next write Redis accepts)
--   ARGV[13]    the region entries, a JSON array of [region, full ('1': every field;
--               '0': changed fields only), after (the number of the last write of the
--               region the writer knows Redis applied; 0: none), epoch (of the totals
--               that hold the writer's last acknowledged write of the region; '' none),
--               fields (an object of field -> cumulative value), base (the same of the
--               values Redis acknowledged, null none: a full entry of a writer that had
--               written the region; field 'live' = '1' when its live gauges are still in
--               the totals), raw samples csv]. A '0' entry with no field and no sample is
--               a check.
local HEADER = 12

local function header()
  return {id = ARGV[1], token = ARGV[2], owner = ARGV[3], ttl = tonumber(ARGV[4]),
          timeout = tonumber(ARGV[5]), cap = tonumber(ARGV[6]), sample_ttl = tonumber(ARGV[7]),
          refresh = ARGV[8] == '1', checks = ARGV[8] ~= '0', seq = ARGV[9], known = ARGV[10] == '1',
          errors = ARGV[11], last_error = ARGV[12]}
end

local function entries()
  -- The region entries (ARGV[HEADER + 1]), in order.
  local out = {}
  for i, e in ipairs(cjson.decode(ARGV[HEADER + 1])) do
    out[i] = {region = e[1], full = e[2] == '1', after = e[3], epoch = e[4], fields = e[5],
              base = e[6] ~= cjson.null and e[6] or nil, samples = e[7]}
  end
  return out
end

local function is_check(e) return not e.full and next(e.fields) == nil and e.samples == '' end

local function listed_regions(es, h)
  -- The names of the full entries; of every entry when the write checks regions (every
  -- CHECK_EVERY-th write: h.checks), so that a lost regions set is whole again within that
  -- bound.
  local names, all = {}, {}
  for _, e in ipairs(es) do
    if e.full then names[#names + 1] = e.region end
    all[#all + 1] = e.region
  end
  return names, h.checks and all or names
end

local function mark_lost(akey, now_s)
  -- Redis lost part of this region's totals that cannot be rebuilt (contributions of
  -- ended incarnations, or live gauges no departure can take out): counted once per
  -- loss found, with the time of the first and of the last; read by serve (health, conduit_cache_data_lost_total).
  redis.call('HINCRBY', akey, 'lost_count', 1)
  redis.call('HSETNX', akey, 'lost_since', now_s)
  redis.call('HSET', akey, 'lost_at', now_s)
end
