-- Facts.put_fact: KEYS[1] the fact (two little-endian doubles), KEYS[2] the
-- facts' generation (one hash tag: one slot). ARGV: the value, its expiry (ms).
-- reply: {1 changed / 0 kept, the generation}
local old = redis.call('GET', KEYS[1])
if old == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {0, tonumber(redis.call('GET', KEYS[2]) or '0')}
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {1, redis.call('INCR', KEYS[2])}
