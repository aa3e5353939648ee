-- status.lua: a read-only snapshot of one budget; writes nothing, not even expired leases.
--
-- KEYS and ARGV[1..11]: the budget block described in _prelude.lua.
--
-- Reply, all strings: {now, request level, token level, leases in flight, tickets queued,
--   cooldown seconds remaining, backoff level, request limit in force, token limit in force,
--   request limit learned, token limit learned, probing}. A level is credit left in the bucket
--   (requests or tokens); below zero it is debt left by a cost larger than the burst credit. Limits
--   are per minute, "0" where there is none; the limit in force is the configured one lowered to the
--   learned one. Probing is "1" while the budget grants one call at a time to learn its limits.
-- A bad argument or other stored limits: an error reply (XFLOW_BADARG, XFLOW_CONFLICT; see _prelude.lua),
-- nothing changed.
local _, REFUSED = operation_args({})
if REFUSED then
  return redis.error_reply(REFUSED)
end
local st = load_state()
return {
  fmt(NOW),
  fmt(level(st.rt, RATE_REQ, BURST_REQ)),
  fmt(level(st.tt, RATE_TOK, BURST_TOK)),
  tostring(redis.call('ZCOUNT', K_LEASES, '(' .. fmt(NOW), '+inf')),
  tostring(redis.call('ZCARD', K_QUEUE)),
  fmt(math.max(0, st.cu - NOW)),
  tostring(st.cl),
  fmt(RATE_REQ * 60),
  fmt(RATE_TOK * 60),
  fmt(st.lr),
  fmt(st.lt),
  PROBING and '1' or '0',
}
