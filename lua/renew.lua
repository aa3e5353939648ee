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
local MAX_IDS = 1000
local spec = {{'ticket ttl', POSITIVE_SECONDS}}
for _ = 13, math.max(13, math.min(#ARGV, 12 + MAX_IDS)) do
  spec[#spec + 1] = {'id', TEXT}
end
local A, REFUSED = operation_args(spec)
if REFUSED then
  return redis.error_reply(REFUSED)
end
local TTL = A[1]

reap()
local st = load_state()
advance(st)
local reply = {fmt(NOW)}
local head = redis.call('ZRANGE', K_QUEUE, 0, 0)[1]
for i = 2, #A do
  local id = A[i]
  if redis.call('ZSCORE', K_QUEUE, id) then
    local t = ticket(id)
    -- never shortened: a ticket parked for longer (a Celery re-queue) keeps its own time
    t.alive = math.max(t.alive, math.max(NOW, t.fit) + TTL)
    save_ticket(st, id, t)
    reply[i] = 'q'
    if id == head then
      reply[i] = 'h' .. fmt(wait_hint(id))
    end
  elseif redis.call('HGET', K_DATA, id) then
    reply[i] = 'g'
  else
    reply[i] = '-'
  end
end
save_state(st)
touch(st)
return reply
