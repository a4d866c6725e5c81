-- Liveness at one server time without listing the live instances, so that reading the
-- cluster totals costs the same whatever the fleet size: the number of live heartbeats,
-- the expired ones with their scores, and the region names. A key of the wrong type
-- gives {false, error} in its place, so the other parts are still read.
-- KEYS: heartbeats zset, regions set.  ARGV: instance_timeout seconds.
local t = redis.call('TIME')
local cutoff = string.format('%.6f', tonumber(t[1]) + tonumber(t[2]) / 1e6 - tonumber(ARGV[1]))
local function read(...)
  local reply = redis.pcall(...)
  if type(reply) == 'table' and reply.err then
    return {false, reply.err}
  end
  return {true, reply}
end
return {t[1], t[2], read('ZCOUNT', KEYS[1], cutoff, '+inf'),
        read('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. cutoff, 'WITHSCORES'),
        read('SMEMBERS', KEYS[2])}
