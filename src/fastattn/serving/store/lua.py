"""The Redis store's server-side scripts: each runs to completion or not at all, so a
batched compare-and-set write, a snapshot and a rollback are atomic."""
from __future__ import annotations

# Compare-and-set of many users, atomic on the server (a script runs to completion or not
# at all, whatever happens to the client). ARGV: n, then (field, expected, blob) n times;
# expected is the SHA-1 hex of the current blob, "" for "must not exist", "*" for any.


_LUA_CAS = """
local n = tonumber(ARGV[1])
local bad = {}
for i = 0, n - 1 do
  local exp = ARGV[3 + 3 * i]
  if exp ~= '*' then
    local cur = redis.call('HGET', KEYS[1], ARGV[2 + 3 * i])
    if exp == '' then
      if cur then bad[#bad + 1] = ARGV[2 + 3 * i] end
    elseif (not cur) or redis.sha1hex(cur) ~= exp then
      bad[#bad + 1] = ARGV[2 + 3 * i]
    end
  end
end
if #bad > 0 then return bad end
for i = 0, n - 1 do redis.call('HSET', KEYS[1], ARGV[2 + 3 * i], ARGV[4 + 3 * i]) end
return bad
"""

# KEYS: users hash, snapshot index (zset tag -> seq), snapshot info hash, sequence counter,
# the new snapshot's hash. ARGV: tag, keep, created, snapshot key prefix.
_LUA_SNAPSHOT = """
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then return redis.error_reply('EXISTS') end
local seq = redis.call('INCR', KEYS[4])
redis.call('DEL', KEYS[5])
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('COPY', KEYS[1], KEYS[5]) end
redis.call('ZADD', KEYS[2], seq, ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3] .. ' ' .. redis.call('HLEN', KEYS[1]))
local n = redis.call('ZCARD', KEYS[2])
local keep = tonumber(ARGV[2])
if n > keep then
  for _, t in ipairs(redis.call('ZRANGE', KEYS[2], 0, n - keep - 1)) do
    redis.call('DEL', ARGV[4] .. t)
    redis.call('ZREM', KEYS[2], t)
    redis.call('HDEL', KEYS[3], t)
  end
end
return seq
"""

# KEYS: users hash, snapshot index, the snapshot's hash. ARGV: tag.
_LUA_ROLLBACK = """
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('COPY', KEYS[3], KEYS[1]) end
return 1
"""
