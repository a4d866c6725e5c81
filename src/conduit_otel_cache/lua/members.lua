-- Encoded by protocol.members() in protocol.py (KEYS and ARGV as below).
-- The heartbeat set's members with a heartbeat at most instance_timeout old, checked one by
-- one (by the per-instance pass; a read of the totals only counts them, liveness.lua): those
-- with no live instance behind them (stray_member(), member.lua) are returned. A departed
-- one ('0') stays listed until cleanup. It derives each instance's keys (10,000 of them would
-- not fit one call's KEYS), so it only reads: stray.lua checks each returned one again, with
-- its keys declared, and removes it.
-- KEYS: heartbeats zset.  ARGV: instance_timeout seconds, meta key prefix.
local t = redis.call('TIME')
local cutoff = string.format('%.6f', tonumber(t[1]) + tonumber(t[2]) / 1e6 - tonumber(ARGV[1]))
local fresh = redis.pcall('ZRANGEBYSCORE', KEYS[1], cutoff, '+inf')
if type(fresh) == 'table' and fresh.err then return {} end
local bad = {}
for _, id in ipairs(fresh) do
  if stray_member(id, ARGV[2] .. id, ARGV[2] .. id .. ':regions') then bad[#bad + 1] = id end
end
return bad
