-- Helpers prepended to every script of this folder.
local function num(x)
  -- A malformed stored value counts as 0 (it is then overwritten), never as an error.
  local n = tonumber(x)
  if n == nil or n ~= n or n < 0 or n == math.huge then return 0 end
  return n
end

local function incr(key, field, delta, is_float)
  if delta == 0 then return end
  local arg = is_float and string.format('%.17g', delta) or string.format('%.0f', delta)
  local res = redis.pcall(is_float and 'HINCRBYFLOAT' or 'HINCRBY', key, field, arg)
  if type(res) == 'table' and res.err then
    -- the stored field is not a number: restart it from this change
    redis.call('HSET', key, field, arg)
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
--   ARGV[1..7]  instance id, incarnation token, owner (host:pid), ttl seconds,
--               instance timeout seconds, sample cap, sample ttl seconds
--   then per region: region, full ('1': every field; '0': changed fields only),
--               field count n, n pairs of field and cumulative value, raw samples csv.
local HEADER = 7

local function header()
  return {id = ARGV[1], token = ARGV[2], owner = ARGV[3], ttl = tonumber(ARGV[4]),
          timeout = tonumber(ARGV[5]), cap = tonumber(ARGV[6]), sample_ttl = tonumber(ARGV[7])}
end

local function entries()
  -- The region entries after the header, in order.
  local out, a = {}, HEADER + 1
  while a <= #ARGV do
    local n = tonumber(ARGV[a + 2])
    local fields = {}
    for j = a + 3, a + 2 + 2 * n, 2 do fields[ARGV[j]] = ARGV[j + 1] end
    out[#out + 1] = {region = ARGV[a], full = ARGV[a + 1] == '1', fields = fields,
                     samples = ARGV[a + 3 + 2 * n]}
    a = a + 4 + 2 * n
  end
  return out
end
