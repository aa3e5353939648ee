-- renew.lua: keep a process's queued tickets alive, all in one call, so that its waiters need not
-- come back one by one to renew themselves (acquire.lua with the same id does the same for one).
--
-- KEYS and ARGV[1..11]: the budget block described in _prelude.lua.
-- ARGV[12]  ticket time to live, seconds: each ticket named lives at least until max(now, its fit)
--           + this (a ticket that was to live longer keeps its time)
-- ARGV[13..] ticket ids, 1 to 1000
--
-- Reply, all strings: {now, status, ...}, one status per id, in order:
--   "q"  still queued, and renewed
--   "h<seconds>"  still queued, renewed, and the head: it comes back after <seconds> (acquire.lua's
--        wait for it: its fit time, or when the first lease would expire, or the renewal interval)
--   "g"  granted in the queue: its waiter asks again (acquire.lua with the same id), which claims
--        the grant if it is provisional
--   "-"  neither (dropped as not renewed in time, or never queued): its waiter asks again
-- A bad argument or other stored limits: an error reply (XFLOW_BADARG, XFLOW_CONFLICT; see _prelude.lua),
-- nothing changed.
local A, REFUSED = operation_args(renewal_spec({}, 12))
if REFUSED then
  return redis.error_reply(REFUSED)
end

reap()
local st = load_state()
advance(st)
local reply = {fmt(NOW)}
renew_tickets(st, A, 1, reply)
save_state(st)
touch(st)
return reply
