-- Encoded by protocol.liveness() in protocol.py (KEYS and ARGV as below).
-- Liveness at one server time: the number of instances whose heartbeat is at most
-- instance_timeout old (counted, not read one by one: the heartbeat set holds only
-- incarnations that have written statistics, and a departure removes its member or lets
-- its heartbeat age; members that are no live instance, foreign or left by a loss of Redis
-- data, are removed by members.lua, which the per-instance pass runs), the expired ones
-- with their scores, and the region names. A key of the wrong type gives {false, error}
-- in its place, so the other parts are still read.
-- KEYS: heartbeats zset, regions set, flush errors hash (returned last).
-- ARGV: instance_timeout seconds.
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
        read('SMEMBERS', KEYS[2]), read('HGETALL', KEYS[3])}
