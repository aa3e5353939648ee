-- settle.lua: close a lease with the actual usage and what the provider said about its limits; its
-- slot and any refund go to the queue at once. Without a lease (id ""), only learn.
--
-- KEYS and ARGV[1..11]: the budget block described in _prelude.lua.
-- ARGV[12]  lease id; "" for a reply that was not leased (limiter.learn): learn from it, settle nothing
-- ARGV[13] actual tokens used ("-1": keep the estimate)
-- ARGV[14] requests the provider said remain in its bucket when it admitted this call ("-1": unknown)
-- ARGV[15] tokens the provider said remain ("-1": unknown)
-- ARGV[16] the provider's request limit, requests per minute ("-1": not reported)
-- ARGV[17] the provider's token limit, tokens per minute ("-1": not reported)
-- ARGV[18] seconds the limits reported here are remembered (the keys outlive them)
-- ARGV[19] the model (or route) the call went to, whose limits these are ("" or absent: unnamed)
-- ARGV[20] "1": count the processes holding the budget's channel (its PUBSUB NUMSUB) into the reply,
--          the census an outage shares the budget by, carried by a call the process makes anyway
--          ("0" or absent: no)
-- ARGV[21] and on, optional: queued tickets of the process to keep alive, as renew.lua takes them
--          (the ticket TTL, then 1 to 1000 ids), so that a busy process renews its waiters' tickets
--          with the settles it sends anyway rather than in calls of their own
--
-- First the limits are learned for that model (see learn() in _prelude.lua), replacing what it
-- reported before, looser or tighter: the rates in force become the configured ones lowered to the
-- tightest live limit of any model, so two models on one budget do not flip it back and forth, and
-- a bucket whose rate changes is rescaled without inventing credit. A settle of a lease, learned or
-- not, ends a probe.
--
-- Then the provider's word corrects the shared level down, never up. When the provider admitted this
-- call it had SEEN left; it may already have charged any call granted after this one (calls overtake
-- each other on the way), so only a lead beyond all of them is surely real: the level just after this
-- grant, less every charge granted and correction made since (a tighter rate's drop included), less
-- SEEN and one unit of the provider's rounding. That much is taken off now. Where the bucket had no
-- rate when the lease was granted, and for a reply without a lease, there is no level after the
-- grant to start from: the level is only capped at SEEN plus that unit.
--
-- Last, the difference to the estimate is settled on the token bucket: an over-estimate is refunded
-- (never above capacity), an under-estimate is charged as debt that later arrivals wait out; so it is
-- at every cap the lease passed (see Caps in _prelude.lua), whose slots it gives back.
-- Idempotent: a lease already settled, cancelled or expired is left alone; the limits it reports are
-- still learned (they are facts whatever became of the lease), the remaining counts are not.
--
-- Reply: {"settled" | "unknown" | "learned", tokens refunded (negative: debt charged; "0" unless
-- settled), now, request limit in force, token limit in force} with limits per minute, "0": none;
-- then, counted (ARGV[20]), the processes holding the budget's channel ("0" where Redis cannot say,
-- or not asked but tickets follow); then, with tickets to renew, one status each as renew.lua replies.
-- A bad argument or other stored limits: an error reply (XFLOW_BADARG, XFLOW_CONFLICT; see _prelude.lua),
-- nothing changed.
local spec = {
  {'id', TEXT_OR_EMPTY},
  {'actual tokens', UNITS_OR_UNSET},
  {'remaining requests', UNITS_OR_UNSET},
  {'remaining tokens', UNITS_OR_UNSET},
  {'request limit', LIMIT_OR_UNSET},
  {'token limit', LIMIT_OR_UNSET},
  {'limit memory', SECONDS},
  {'model', TEXT_OR_EMPTY, ''},
  {'census', FLAG, '0'},
}
local RENEWING = #ARGV >= 21
local A, REFUSED = operation_args(RENEWING and renewal_spec(spec, 21) or spec)
if REFUSED then
  return redis.error_reply(REFUSED)
end
local ID, ACTUAL, SEEN_REQ, SEEN_TOK, LIMIT_REQ, LIMIT_TOK, MEMORY, MODEL, CENSUS = unpack(A)

-- Providers report whole units (rounded down), so only a lead of more than one unit is a lead.
-- `snap` is the level just after the grant (nil: unknown), `k0` and `c0` the corrections and
-- charges made by then; with no snapshot the level is capped at seen + 1.
local function corrected(tat, rate, burst, k, seen, snap, k0, c, c0)
  if seen < 0 or rate <= 0 then
    return tat, k
  end
  local ahead
  if snap then
    ahead = snap - (k - k0) - (c - c0) - (seen + 1)
  else
    ahead = level(tat, rate, burst) - (seen + 1)
  end
  if ahead > 0 then
    return math.max(tat, NOW) + ahead / rate, k + ahead
  end
  return tat, k
end

local function correct(st, w)
  local cq, ct = tonumber(w[8]), tonumber(w[9])
  if not ct then
    return
  end
  st.rt, st.kr = corrected(st.rt, RATE_REQ, BURST_REQ, st.kr, SEEN_REQ, tonumber(w[4]), tonumber(w[6]), st.cq, cq)
  st.tt, st.kt = corrected(st.tt, RATE_TOK, BURST_TOK, st.kt, SEEN_TOK, tonumber(w[5]), tonumber(w[7]), st.ct, ct)
end

reap()
local st = load_state()
learn(st, LIMIT_REQ, LIMIT_TOK, MEMORY, MODEL)
local held = ID ~= '' and redis.call('HGET', K_DATA, ID)
local reply = {'unknown', '0', fmt(NOW)}
if ID == '' then
  st.rt, st.kr = corrected(st.rt, RATE_REQ, BURST_REQ, st.kr, SEEN_REQ)
  st.tt, st.kt = corrected(st.tt, RATE_TOK, BURST_TOK, st.kt, SEEN_TOK)
  reply = {'learned', '0', fmt(NOW)}
elseif held then
  redis.call('ZREM', K_LEASES, ID)
  redis.call('HDEL', K_DATA, ID)
  if st.pb == 1 then
    st.pb = 2
    apply_limits(st)
  end
  local w = words(held)
  correct(st, w)
  local diff = 0 -- over the estimate: refunded; under it: charged as debt; -1 actual: kept
  if ACTUAL >= 0 then
    diff = tonumber(w[2]) - ACTUAL
  end
  st.tt = given_back(st.tt, RATE_TOK, diff, st.tf)
  release_levels(levels_in(w, 10), 0, diff) -- the same difference at every cap, and its slots
  reply = {'settled', ACTUAL >= 0 and fmt(diff) or '0', fmt(NOW)}
end
reply[4] = fmt(RATE_REQ * 60)
reply[5] = fmt(RATE_TOK * 60)
if CENSUS then
  local r = redis.pcall('PUBSUB', 'NUMSUB', CHANNEL)
  reply[6] = tostring(type(r) == 'table' and tonumber(r[2]) or 0)
elseif RENEWING then
  reply[6] = '0'
end
advance(st)
if RENEWING then
  renew_tickets(st, A, 10, reply)
end
save_state(st)
touch(st)
return reply
