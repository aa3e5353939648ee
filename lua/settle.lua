-- settle.lua: close a lease with the actual usage; its slot and any refund go to the queue at once.
--
-- KEYS and ARGV[1..8]: the budget block described in _prelude.lua.
-- ARGV[9]  lease id
-- ARGV[10] actual tokens used ("-1": keep the estimate)
-- ARGV[11] requests the provider said remain in its bucket when it admitted this call ("-1": unknown)
-- ARGV[12] tokens the provider said remain ("-1": unknown)
--
-- The difference to the estimate is settled on the token bucket: an over-estimate is refunded
-- (never above capacity), an under-estimate is charged as debt that later arrivals wait out.
-- The provider's word corrects the shared level down, never up. When the provider admitted this
-- call it had SEEN left; it may already have charged any call granted after this one (calls
-- overtake each other on the way), so only a lead beyond all of them is surely real: the level
-- just after this grant, less every charge granted and correction made since, less SEEN and one
-- unit of the provider's rounding. That much is taken off now.
-- Idempotent: a lease already settled, cancelled or expired is left alone.
--
-- Reply: {"settled", tokens refunded (negative: debt charged), now} or {"unknown", "0", now}
local ID = ARGV[9]
local ACTUAL = tonumber(ARGV[10])
local SEEN_REQ = tonumber(ARGV[11] or '-1')
local SEEN_TOK = tonumber(ARGV[12] or '-1')

-- Providers report whole units (rounded down), so only a lead of more than one unit is a lead.
local function correct(st, w)
  local lr, lt, kr, kt = tonumber(w[4]), tonumber(w[5]), tonumber(w[6]), tonumber(w[7])
  local cq, ct = tonumber(w[8]), tonumber(w[9])
  if not ct then
    return
  end
  if SEEN_REQ >= 0 and RATE_REQ > 0 then
    local ahead = lr - (st.kr - kr) - (st.cq - cq) - (SEEN_REQ + 1)
    if ahead > 0 then
      st.rt = math.max(st.rt, NOW) + ahead / RATE_REQ
      st.kr = st.kr + ahead
    end
  end
  if SEEN_TOK >= 0 and RATE_TOK > 0 then
    local ahead = lt - (st.kt - kt) - (st.ct - ct) - (SEEN_TOK + 1)
    if ahead > 0 then
      st.tt = math.max(st.tt, NOW) + ahead / RATE_TOK
      st.kt = st.kt + ahead
    end
  end
end

reap()
local st = load_state()
local held = redis.call('HGET', K_DATA, ID)
local reply = {'unknown', '0', fmt(NOW)}
if held then
  redis.call('ZREM', K_LEASES, ID)
  redis.call('HDEL', K_DATA, ID)
  local w = words(held)
  correct(st, w)
  local est = tonumber(w[2])
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
