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

-- The one argument layout of the write scripts (flush.lua, beat.lua, regions.lua):
--   ARGV[1..9]  instance id, incarnation token, owner (host:pid), ttl seconds,
--               instance timeout seconds, sample cap, sample ttl seconds, '1' to refresh
--               (TTLs of every key the write names are renewed, key types checked), and
--               the write's number (it increases with every write of the incarnation)
--   then per region: region, full ('1': every field; '0': changed fields only), after
--               (the number of the last write of the region the writer knows Redis
--               applied; 0: none), field count n, n pairs of field and cumulative value,
--               raw samples csv. A '0' entry with no field and no sample is a check.
local HEADER = 9

local function header()
  return {id = ARGV[1], token = ARGV[2], owner = ARGV[3], ttl = tonumber(ARGV[4]),
          timeout = tonumber(ARGV[5]), cap = tonumber(ARGV[6]), sample_ttl = tonumber(ARGV[7]),
          refresh = ARGV[8] == '1', seq = ARGV[9]}
end

local function entries()
  -- The region entries after the header, in order.
  local out, a = {}, HEADER + 1
  while a <= #ARGV do
    local n = tonumber(ARGV[a + 3])
    local fields = {}
    for j = a + 4, a + 3 + 2 * n, 2 do fields[ARGV[j]] = ARGV[j + 1] end
    out[#out + 1] = {region = ARGV[a], full = ARGV[a + 1] == '1', after = tonumber(ARGV[a + 2]),
                     fields = fields, n = n, samples = ARGV[a + 4 + 2 * n]}
    a = a + 5 + 2 * n
  end
  return out
end
