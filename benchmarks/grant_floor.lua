-- grant_floor.lua: a reference point for benchmarks/script_cost.py, not a limiter. Called with
-- acquire.lua's KEYS and ARGV, it does only the work any grant must do on the fast path (read the
-- clock and the two bucket levels, check the queue and the slots, add the lease and its data,
-- charge the buckets, keep the three written keys alive) and none of acquire's generality: no
-- reaping, no queue service, no re-poll lookups, no full-state save, no TTL horizon lookups.
local K_STATE, K_LEASES, K_DATA, K_QUEUE = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local RATE_REQ, RATE_TOK = tonumber(ARGV[1]), tonumber(ARGV[3])
local MAX_CONC, LEASE_TTL, IDLE_GRACE = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local ID, CREQ, CTOK = ARGV[12], tonumber(ARGV[13]), tonumber(ARGV[14]) -- the operation args follow the 11 of the budget block
local clock = redis.call('TIME')
local NOW = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local v = redis.call('HMGET', K_STATE, 'rt', 'tt')
local rt, tt = tonumber(v[1]) or 0, tonumber(v[2]) or 0
if redis.call('ZCARD', K_QUEUE) > 0 or (MAX_CONC > 0 and redis.call('ZCARD', K_LEASES) >= MAX_CONC) then
  return {'queued', '1', '1'}
end
if RATE_REQ > 0 then
  rt = math.max(rt, NOW) + CREQ / RATE_REQ
end
if RATE_TOK > 0 then
  tt = math.max(tt, NOW) + CTOK / RATE_TOK
end
local now = string.format('%.6f', NOW)
redis.call('ZADD', K_LEASES, NOW + LEASE_TTL, ID)
redis.call('HSET', K_DATA, ID, CREQ .. ' ' .. CTOK .. ' ' .. now)
redis.call('HSET', K_STATE, 'rt', string.format('%.6f', rt), 'tt', string.format('%.6f', tt))
local ms = math.ceil((LEASE_TTL + IDLE_GRACE) * 1000)
for _, k in ipairs({K_STATE, K_LEASES, K_DATA}) do
  redis.call('PEXPIRE', k, ms)
end
return {'granted', now, now, string.format('%.6f', NOW + LEASE_TTL)}
