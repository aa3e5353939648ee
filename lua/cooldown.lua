-- cooldown.lua: a 429 was seen; pause the whole fleet until the provider allows again.
--
-- KEYS and ARGV[1..11]: the budget block described in _prelude.lua.
-- ARGV[12]  retry-after from the provider, seconds ("-1": none given)
-- ARGV[13] base backoff, seconds: the pause without a retry-after, doubled per repeated 429
-- ARGV[14] max backoff, seconds: caps the doubling, never a provider's retry-after
-- ARGV[15] quiet period, seconds after a pause ends within which another 429 counts as a repeat
-- ARGV[16] jitter fraction: the pause is lengthened by up to this share of itself
-- ARGV[17] jitter draw in [0, 1), chosen by the caller (scripts stay deterministic)
-- ARGV[18] max pause, seconds (finite, more than zero): no pause this call sets is longer, retry-after
--          and jitter included
--
-- The pause honours retry-after as given for a first 429 (up to the max pause) and backs off
-- exponentially from `base` when 429s repeat; 429s of calls sent before the pause began do not count
-- as repeats; jitter only ever lengthens it; an existing longer pause is never shortened (only
-- clear_cooldown.lua ends one early). Nothing is granted before it ends.
-- A 429 means the provider's bucket is empty now: both buckets drop to zero credit now and refill
-- during the pause, so that dispatch resumes paced (the refill, then the rate), not as a herd.
-- Reservations still to start (a top-class call's, a booking's) start no sooner than the pause's
-- end, their waiters held until then: the buckets hold them as charged then, after the zero credit
-- of now (and no refund goes below that before then: the floors rf, tf), so that the queue's next
-- grant comes paced after them.
--
-- Reply: {"cooldown", until (Redis time), now, backoff level, started ("1": no pause was in force,
-- this 429 began one; "0": it met a pause and at most lengthened it)}
-- Also published on the events channel as "c <now> <until>".
-- A bad argument or other stored limits: an error reply (XFLOW_BADARG, XFLOW_CONFLICT; see _prelude.lua),
-- nothing changed.
local A, REFUSED = operation_args({
  {'retry after', SECONDS_OR_UNSET},
  {'base backoff', POSITIVE_SECONDS},
  {'max backoff', POSITIVE_SECONDS},
  {'quiet period', SECONDS},
  {'jitter fraction', FACTOR},
  {'jitter draw', DRAW},
  {'max pause', POSITIVE_SECONDS},
})
if REFUSED then
  return redis.error_reply(REFUSED)
end
local RETRY_AFTER, BASE, MAX_BACKOFF, QUIET, JITTER, DRAW, MAX_PAUSE = unpack(A)

reap()
local st = load_state()
local level = 0
if st.cu > NOW then
  level = st.cl -- 429s of calls sent before this pause belong to the same episode
elseif st.cr > NOW then
  level = st.cl + 1
end
local backoff = 0
if RETRY_AFTER < 0 or level > 0 then
  backoff = math.min(MAX_BACKOFF, BASE * 2 ^ level)
end
local pause = math.min(MAX_PAUSE, math.max(RETRY_AFTER, backoff) * (1 + JITTER * DRAW))
local started = st.cu <= NOW
st.cu = math.max(st.cu, NOW + pause)
if RATE_REQ > 0 then
  st.rt = math.max(st.rt, NOW + BURST_REQ)
end
if RATE_TOK > 0 then
  st.tt = math.max(st.tt, NOW + BURST_TOK)
end
-- (every lease: a 429 is rare, and a lease TTL changed by configure.lua leaves older expiries)
local held_req, held_tok = 0, 0
for _, id in ipairs(redis.call('ZRANGE', K_LEASES, 0, -1)) do
  local w = words(redis.call('HGET', K_DATA, id) or '')
  local start = tonumber(w[3])
  if start and start > NOW then
    held_req, held_tok = held_req + tonumber(w[1]), held_tok + tonumber(w[2])
  end
end
if RATE_REQ > 0 and held_req > 0 then
  st.rt = math.max(st.rt, math.max(NOW + BURST_REQ, st.cu) + held_req / RATE_REQ)
  st.rf, st.reserved = math.max(st.rf, st.rt), true
end
if RATE_TOK > 0 and held_tok > 0 then
  st.tt = math.max(st.tt, math.max(NOW + BURST_TOK, st.cu) + held_tok / RATE_TOK)
  st.tf, st.reserved = math.max(st.tf, st.tt), true
end
st.cl = level
st.cr = st.cu + QUIET
advance(st)
save_state(st)
touch(st)
redis.call('PUBLISH', CHANNEL, 'c ' .. fmt(NOW) .. ' ' .. fmt(st.cu))
return {'cooldown', fmt(st.cu), fmt(NOW), tostring(level), started and '1' or '0'}
