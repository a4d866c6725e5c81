-- Encoded by protocol.settled() in protocol.py (KEYS and ARGV as below).
-- After the regions of earlier incarnations left (depart_regions.lua): stop listing them.
-- KEYS: instance meta hash.  ARGV: the token of the incarnation that had them leave.
if redis.call('TYPE', KEYS[1])['ok'] == 'hash' and redis.call('HGET', KEYS[1], 'token') == ARGV[1] then
  redis.call('HDEL', KEYS[1], 'stale')
end
return 1
