-- cancel.lua: give back a grant or a ticket that was never used (a timeout or a cancelled caller).
--
-- KEYS and ARGV[1..11]: the budget block described in _prelude.lua.
-- ARGV[12] lease or ticket id
--
-- A queued ticket leaves the queue (its tenant, if it has one, gets back the turn it was charged). A
-- granted lease is removed and its whole charge, requests and tokens, is refunded (never above
-- capacity), at the budget and at every cap it passed; its slot and credit go to the queue at once.
-- Idempotent: an unknown id changes nothing.
--
-- Reply: {"cancelled" | "dequeued" | "unknown", now}
-- A bad argument or other stored limits: an error reply (XFLOW_BADARG, XFLOW_CONFLICT; see _prelude.lua),
-- nothing changed.
local A, REFUSED = operation_args({
  {'id', TEXT},
})
if REFUSED then
  return redis.error_reply(REFUSED)
end
local ID = A[1]

reap()
local st = load_state()
local reply = {'unknown', fmt(NOW)}
if redis.call('ZSCORE', K_QUEUE, ID) then
  drop(st, ID, ticket(ID))
  reply = {'dequeued', fmt(NOW)}
else
  local held = redis.call('HGET', K_DATA, ID)
  if held then
    local w = words(held)
    redis.call('ZREM', K_LEASES, ID)
    redis.call('HDEL', K_DATA, ID)
    refund(st, tonumber(w[1]), tonumber(w[2]))
    release_levels(levels_in(w, 10), tonumber(w[1]), tonumber(w[2]))
    reply = {'cancelled', fmt(NOW)}
  end
end
advance(st)
save_state(st)
touch(st)
return reply
