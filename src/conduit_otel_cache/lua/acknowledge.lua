-- Encoded by protocol.acknowledge() in protocol.py (KEYS and ARGV as below).
-- An operator acknowledges a region's data losses (cleanup --acknowledge-losses): health is
-- no longer Degraded for them; lost_count (conduit_cache_data_losses_total) is unchanged.
-- KEYS: the region's aggregated hash.  Returns 1 when it had losses to acknowledge, else 0.
if redis.call('TYPE', KEYS[1])['ok'] ~= 'hash' then return 0 end
local lost = redis.call('HGET', KEYS[1], 'lost_count')
if not lost or lost == redis.call('HGET', KEYS[1], 'lost_acknowledged') then return 0 end
redis.call('HSET', KEYS[1], 'lost_acknowledged', lost)
return 1
