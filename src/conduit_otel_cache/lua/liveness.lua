-- Encoded by protocol.liveness() in protocol.py (KEYS and ARGV as below).
-- Liveness at one server time: the number of live instances, the expired ones with their
-- scores, and the region names. Only an instance that has written statistics and not
-- departed (its meta hash says live, or is lost while its regions set is not) counts; members that are no instance id or have no
-- live meta hash are removed and counted as malformed. A key of the wrong type gives
-- {false, error} in its place, so the other parts are still read.
-- KEYS: heartbeats zset, regions set, flush errors hash (returned last).  ARGV: instance_timeout seconds, meta key prefix.
local t = redis.call('TIME')
local cutoff = string.format('%.6f', tonumber(t[1]) + tonumber(t[2]) / 1e6 - tonumber(ARGV[1]))
local function read(...)
  local reply = redis.pcall(...)
  if type(reply) == 'table' and reply.err then
    return {false, reply.err}
  end
  return {true, reply}
end
local active = read('ZRANGEBYSCORE', KEYS[1], cutoff, '+inf')
local bad = {}
if active[1] then
  local n = 0
  for _, id in ipairs(active[2]) do
    local valid = #id <= 128 and string.match(id, '^[%w_%.%-]+$') ~= nil and id ~= 'aggregated'
    local live = valid and redis.pcall('HGET', ARGV[2] .. id, 'live')
    if valid and live == false and redis.pcall('EXISTS', ARGV[2] .. id .. ':regions') == 1 then
      live = '1'  -- its meta hash is lost, not its regions: live until reaped or replaced
    end
    if live == '1' then
      n = n + 1
    elseif live ~= '0' then  -- '0': departed, still listed until cleanup
      bad[#bad + 1] = id
    end
  end
  active = {true, n}
  for i = 1, #bad, 500 do
    redis.call('ZREM', KEYS[1], unpack(bad, i, math.min(i + 499, #bad)))
  end
end
return {t[1], t[2], active,
        read('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. cutoff, 'WITHSCORES'),
        read('SMEMBERS', KEYS[2]), bad, read('HGETALL', KEYS[3])}
