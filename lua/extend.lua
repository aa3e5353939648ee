-- extend.lua: heartbeat of a long call; the lease lives another lease TTL from now.
--
-- KEYS and ARGV[1..11]: the budget block described in _prelude.lua.
-- ARGV[12] lease id
--
-- A lease that already expired is lost for good (its slot may have gone to someone else). A
-- provisional grant is claimed by its first heartbeat, as by acquire.lua.
-- Reply: {"extended", expiry, now} or {"lost", "0", now}
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
advance(st)
local reply = {'lost', '0', fmt(NOW)}
local new_expiry = prolong(st, ID)
if new_expiry then
  reply = {'extended', fmt(new_expiry), fmt(NOW)}
end
save_state(st)
touch(st)
return reply
