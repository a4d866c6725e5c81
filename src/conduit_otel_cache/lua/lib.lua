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
