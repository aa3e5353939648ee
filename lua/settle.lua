-- settle.lua: close a lease with the actual usage; its slot and any refund go to the queue at once.
--
-- KEYS and ARGV[1..8]: the budget block described in _prelude.lua.
-- ARGV[9]  lease id
-- ARGV[10] actual tokens used ("-1": keep the estimate)
--
-- The difference to the estimate is settled on the token bucket: an over-estimate is refunded
-- (never above capacity), an under-estimate is charged as debt that later arrivals wait out.
-- Idempotent: a lease already settled, cancelled or expired is left alone.
--
-- Reply: {"settled", tokens refunded (negative: debt charged), now} or {"unknown", "0", now}
local ID = ARGV[9]
local ACTUAL = tonumber(ARGV[10])

reap()
local st = load_state()
local held = redis.call('HGET', K_DATA, ID)
local reply = {'unknown', '0', fmt(NOW)}
if held then
  redis.call('ZREM', K_LEASES, ID)
  redis.call('HDEL', K_DATA, ID)
  local est = tonumber(words(held)[2])
  if ACTUAL >= 0 then
    local diff = est - ACTUAL
    if diff > 0 then
      refund(st, 0, diff)
    elseif diff < 0 and RATE_TOK > 0 then
      st.tt = math.max(st.tt, NOW) - diff / RATE_TOK
    end
    reply = {'settled', fmt(diff), fmt(NOW)}
  else
    reply = {'settled', '0', fmt(NOW)}
  end
end
advance(st)
save_state(st)
touch(st)
return reply
