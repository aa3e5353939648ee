-- status.lua: a read-only snapshot of one budget; writes nothing, not even expired leases.
--
-- KEYS and ARGV[1..8]: the budget block described in _prelude.lua.
--
-- Reply, all strings: {now, request level, token level, leases in flight, tickets queued,
--   cooldown seconds remaining, backoff level}. A level is credit left in the bucket (requests or
--   tokens); below zero it is debt left by a cost larger than the burst credit.
local st = load_state()
return {
  fmt(NOW),
  fmt(level(st.rt, RATE_REQ, BURST_REQ)),
  fmt(level(st.tt, RATE_TOK, BURST_TOK)),
  tostring(redis.call('ZCOUNT', K_LEASES, '(' .. fmt(NOW), '+inf')),
  tostring(redis.call('ZCARD', K_QUEUE)),
  fmt(math.max(0, st.cu - NOW)),
  tostring(st.cl),
}
