-- acquire.lua: reserve requests, tokens and a concurrency lease jointly, all or nothing.
--
-- KEYS and ARGV[1..8]: the budget block described in _prelude.lua.
-- ARGV[9]  id: lease id, also the ticket id while queued; calling again with the same id is a
--          re-poll that keeps the ticket's place in the queue
-- ARGV[10] requests to charge (count, usually 1)
-- ARGV[11] tokens to charge (estimate)
-- ARGV[12] max wait, seconds: refuse, charging nothing, when the start would be later (-1: any)
-- ARGV[13] "1" to queue for a concurrency slot when none is free, "0" to refuse instead
-- ARGV[14] ticket time to live, seconds: a queued ticket not polled again within it is dropped
--
-- Reply, all strings:
--   {"granted", start, now, expiry}  the lease exists; the caller may start at `start` (Redis time,
--                                    maybe later than now: the caller sleeps start - now once)
--   {"queued", poll, now}            no slot: the ticket waits in FIFO order; its grant is published
--                                    on the events channel as "g <id> <start> <now>"; poll again
--                                    after `poll` seconds in case a holder died or the message was lost
--   {"refused", retry_after, now}    nothing charged; retry_after is exact for rate limits, "-1" when
--                                    the refusal is for a concurrency slot
local ID = ARGV[9]
local CREQ = tonumber(ARGV[10])
local CTOK = tonumber(ARGV[11])
local MAX_WAIT = tonumber(ARGV[12])
local MAY_QUEUE = ARGV[13] == '1'
local TICKET_TTL = tonumber(ARGV[14])

reap()
local st = load_state()
hand_over(st)

local function finish(reply)
  save_state(st)
  touch(st)
  return reply
end

local held = redis.call('HGET', K_DATA, ID)
if held then
  local start = tonumber(words(held)[3])
  return finish({'granted', fmt(start), fmt(NOW), fmt(redis.call('ZSCORE', K_LEASES, ID))})
end

local poll = math.max(0.001, math.min(TICKET_TTL / 2, next_expiry()))

if redis.call('ZSCORE', K_QUEUE, ID) then
  redis.call('HSET', K_TICKETS, ID, CREQ .. ' ' .. CTOK .. ' ' .. fmt(NOW + TICKET_TTL))
  return finish({'queued', fmt(poll), fmt(NOW)})
end

if MAX_CONC > 0 and (redis.call('ZCARD', K_LEASES) >= MAX_CONC or redis.call('ZCARD', K_QUEUE) > 0) then
  if not MAY_QUEUE then
    return finish({'refused', '-1', fmt(NOW)})
  end
  st.seq = st.seq + 1
  redis.call('ZADD', K_QUEUE, st.seq, ID)
  redis.call('HSET', K_TICKETS, ID, CREQ .. ' ' .. CTOK .. ' ' .. fmt(NOW + TICKET_TTL))
  return finish({'queued', fmt(poll), fmt(NOW)})
end

local s = joint_start(st, CREQ, CTOK)
if MAX_WAIT >= 0 and s - NOW > MAX_WAIT then
  return finish({'refused', fmt(s - NOW), fmt(NOW)})
end
charge(st, s, CREQ, CTOK)
grant(ID, s, CREQ, CTOK)
return finish({'granted', fmt(s), fmt(NOW), fmt(s + LEASE_TTL)})
