-- rejoin.lua: a process comes back to the shared budget with what it did while it could not reach
-- it: it charges what it spent on its own (an outage run on a local share) and re-registers a lease
-- it still holds, whose call is in flight whatever Redis remembers of it.
--
-- KEYS and ARGV[1..11]: the budget block described in _prelude.lua.
-- ARGV[12] lease id ("": none, only charge)
-- ARGV[13] requests the lease was charged (its estimate)
-- ARGV[14] tokens the lease was charged (its estimate)
-- ARGV[15] requests spent outside the budget, charged now as debt (0: none)
-- ARGV[16] tokens spent outside the budget, charged now as debt (0: none)
-- ARGV[17] hold, seconds (absent: 0): no new grant before now + hold (the cooldown deadline, the
--          backoff left alone). A process back from an outage sets it, so that every other process
--          back from the same outage registers its share's calls before anyone takes a slot again.
-- ARGV[18] levels (0 to 8, absent 0), then six arguments each, as acquire.lua's: the caps the lease
--          passes. A lease added here takes its slot at each of them too (charged nothing there).
--
-- Spending is charged on top of the levels Redis kept, unless this very call finds the state lost
-- and makes it anew with empty buckets, which already stand for it.
--
-- A lease Redis still holds is extended (and claimed, if provisional), as by extend.lua. A lease it
-- does not hold (its keys were lost, or it was granted by a local share) is added as held for a lease
-- TTL without being charged again: what it was charged is in the spending charged here or in the
-- empty buckets a lost state is made with (see _prelude.lua). It takes its slot even past max
-- concurrency, since its call runs anyway; new grants wait until the in-flight count is below it.
-- Its later settle refunds or charges the difference to its estimate as for any lease.
--
-- Reply: {"extended" | "adopted" | "charged", now}
-- A bad argument or other stored limits: an error reply (XFLOW_BADARG, XFLOW_CONFLICT; see _prelude.lua),
-- nothing changed.
local A, REFUSED = operation_args(level_spec({
  {'id', TEXT_OR_EMPTY},
  {'requests', UNITS},
  {'tokens', UNITS},
  {'spent requests', UNITS},
  {'spent tokens', UNITS},
  {'hold', SECONDS, '0'},
}, 18))
if REFUSED then
  return redis.error_reply(REFUSED)
end
local ID, CREQ, CTOK, SPENT_REQ, SPENT_TOK, HOLD = unpack(A)
local LEVELS = levels_at(18)

reap()
local st = load_state()
if (SPENT_REQ > 0 or SPENT_TOK > 0) and not st.lost then -- a lost state's buckets start empty anyway
  charge(st, SPENT_REQ, SPENT_TOK, -1)
end
if HOLD > 0 then
  st.cu = math.max(st.cu, NOW + HOLD)
end
local reply = {'charged', fmt(NOW)}
if ID ~= '' then
  if prolong(st, ID) then
    reply = {'extended', fmt(NOW)}
  else
    redis.call('ZADD', K_LEASES, NOW + LEASE_TTL, ID)
    st.la = math.max(st.la, NOW + LEASE_TTL)
    WROTE[K_LEASES], WROTE[K_DATA] = true, true
    redis.call('HSET', K_DATA, ID, CREQ .. ' ' .. CTOK .. ' ' .. fmt(NOW) .. ' u u ' .. fmt(st.kr) .. ' ' ..
      fmt(st.kt) .. ' ' .. fmt(st.cq) .. ' ' .. fmt(st.ct) .. level_words(LEVELS))
    if LEVELS then
      charge_levels(LEVELS, 0, 0) -- its slot at each cap; what it was charged there is not known again
      WROTE[K_CAPS] = true
    end
    reply = {'adopted', fmt(NOW)}
  end
end
advance(st)
save_state(st)
touch(st)
return reply
