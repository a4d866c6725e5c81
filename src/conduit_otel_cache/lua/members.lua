-- Encoded by protocol.members() in protocol.py (KEYS and ARGV as below).
-- The heartbeat set's members with a heartbeat at most instance_timeout old, checked one by
-- one (by the per-instance pass; a read of the totals only counts them, liveness.lua): a
-- member is a live instance when it is an instance id whose meta hash says live, or whose
-- meta hash is lost while its regions set is not (live until reaped or replaced). The
-- others, no instance id or no instance behind it, are removed and returned (reported as
-- malformed); a departed one ('0') stays listed until cleanup.
-- KEYS: heartbeats zset.  ARGV: instance_timeout seconds, meta key prefix.
local t = redis.call('TIME')
local cutoff = string.format('%.6f', tonumber(t[1]) + tonumber(t[2]) / 1e6 - tonumber(ARGV[1]))
local fresh = redis.pcall('ZRANGEBYSCORE', KEYS[1], cutoff, '+inf')
if type(fresh) == 'table' and fresh.err then return {} end
local bad = {}
for _, id in ipairs(fresh) do
  local valid = #id <= 128 and string.match(id, '^[%w_%.%-]+$') ~= nil and id ~= 'aggregated'
  local live = valid and redis.pcall('HGET', ARGV[2] .. id, 'live')
  if valid and live == false and redis.pcall('EXISTS', ARGV[2] .. id .. ':regions') == 1 then
    live = '1'
  end
  if live ~= '1' and live ~= '0' then bad[#bad + 1] = id end
end
for i = 1, #bad, 500 do
  redis.call('ZREM', KEYS[1], unpack(bad, i, math.min(i + 499, #bad)))
end
return bad
