-- acquire.lua: grant requests, tokens and a concurrency lease jointly, now, all or nothing; or
-- queue for them, first come first served.
--
-- KEYS and ARGV[1..8]: the budget block described in _prelude.lua.
-- ARGV[9]  id: lease id, also the ticket id while queued; calling again with the same id is a
--          return to the queue that keeps the ticket's place (and renews it)
-- ARGV[10] requests to charge (count, usually 1)
-- ARGV[11] tokens to charge (estimate)
-- ARGV[12] max wait, seconds: a new arrival whose exact wait is longer is refused, charging
--          nothing (-1: any wait)
-- ARGV[13] "1" to queue when it cannot be granted now, "0" to refuse instead
-- ARGV[14] ticket time to live, seconds: a queued ticket not renewed within it is dropped
--
-- Reply, all strings:
--   {"granted", start, now, expiry}  the lease exists, charged now (start = its grant time)
--   {"queued", wait, now}            the ticket waits in FIFO order; come back after `wait` seconds:
--                                    exact for the head waiting for its rates, else a renewal
--                                    interval. Meanwhile the events channel announces "h <id> <fit>
--                                    <now>" (the ticket is head and fits at <fit>) or "g <id> <now>"
--                                    (granted: the lease exists)
--   {"refused", retry_after, now}    nothing charged; retry_after is exact when the refusal is for
--                                    the rates, "-1" when it is for a slot or a queue ahead
local ID = ARGV[9]
local CREQ = tonumber(ARGV[10])
local CTOK = tonumber(ARGV[11])
local MAX_WAIT = tonumber(ARGV[12])
local MAY_QUEUE = ARGV[13] == '1'
local TICKET_TTL = tonumber(ARGV[14])

reap()
local st = load_state()
advance(st)

local function finish(reply)
  save_state(st)
  touch(st)
  return reply
end

-- The head waiting for its rates comes back exactly when it fits; any other ticket comes back
-- to renew itself, and the head waiting for a slot also when the first lease would expire.
local function wait_hint(id)
  local t = ticket(id)
  local head = redis.call('ZRANGE', K_QUEUE, 0, 0)[1]
  if head == id and t.fit > NOW then
    return t.fit - NOW
  end
  local hint = t.ttl / 2
  local first = redis.call('ZRANGE', K_LEASES, 0, 0, 'WITHSCORES')[2]
  if head == id and first then
    hint = math.min(hint, tonumber(first) - NOW)
  end
  return math.max(0.001, hint)
end

local held = redis.call('HGET', K_DATA, ID)
if held then
  return finish({'granted', words(held)[3], fmt(NOW), fmt(redis.call('ZSCORE', K_LEASES, ID))})
end

if redis.call('ZSCORE', K_QUEUE, ID) then
  local t = ticket(ID)
  t.alive = math.max(NOW, t.fit) + t.ttl
  save_ticket(st, ID, t)
  return finish({'queued', fmt(wait_hint(ID)), fmt(NOW)})
end

if redis.call('ZCARD', K_QUEUE) == 0 and slot_free() then
  local fit = fit_time(st, CREQ, CTOK)
  if fit <= NOW then
    grant(st, ID, CREQ, CTOK)
    return finish({'granted', fmt(NOW), fmt(NOW), fmt(NOW + LEASE_TTL)})
  end
  if not MAY_QUEUE or (MAX_WAIT >= 0 and fit - NOW > MAX_WAIT) then
    return finish({'refused', fmt(fit - NOW), fmt(NOW)})
  end
elseif not MAY_QUEUE then
  return finish({'refused', '-1', fmt(NOW)})
end

st.seq = st.seq + 1
redis.call('ZADD', K_QUEUE, st.seq, ID)
save_ticket(st, ID, {creq = CREQ, ctok = CTOK, alive = NOW + TICKET_TTL, ttl = TICKET_TTL, fit = -1})
advance(st)
return finish({'queued', fmt(wait_hint(ID)), fmt(NOW)})
