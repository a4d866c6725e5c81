-- Encoded by protocol.stray() in protocol.py (KEYS and ARGV as below).
-- Remove a member of the heartbeat set that members.lua found no live instance behind, if
-- it still has none. Its keys are declared, so that a Redis Cluster slot in migration
-- routes the call by all of them (ASK or TRYAGAIN) instead of the check reading an
-- instance's keys on a node they have left.
-- KEYS: heartbeats zset, the member's meta hash, its regions set.  ARGV: the member.
-- Returns 1 when it removed the member.
if not stray_member(ARGV[1], KEYS[2], KEYS[3]) then return 0 end
return redis.call('ZREM', KEYS[1], ARGV[1])
