-- acquire.lua: grant requests, tokens and a concurrency lease jointly, now, all or nothing; or
-- queue for them, first come first served within a priority class.
--
-- KEYS and ARGV[1..11]: the budget block described in _prelude.lua.
-- ARGV[12]  id: lease id, also the ticket id while queued; calling again with the same id is a
--          return to the queue that keeps the ticket's place (and renews it), or, once the ticket
--          was granted, the claim of that grant if it was provisional (the lease then lives a lease
--          TTL; a firm grant is only reported)
-- ARGV[13] requests to charge (count, usually 1)
-- ARGV[14] tokens to charge (estimate)
-- ARGV[15] max wait, seconds: a new arrival whose exact wait is longer is refused, charging
--          nothing (-1: any wait)
-- ARGV[16] "1" to queue when it cannot be granted now, "0" to refuse instead
-- ARGV[17] ticket time to live, seconds: a queued ticket not renewed within it is dropped
-- ARGV[18] "1": the budget probes: while it has learned no limit, it grants one call at a time
--          until the first settle or learned limit (see settle.lua); "0" (or absent): no probe
-- ARGV[19] "1": overdraft: the cost fits once every bucket is out of debt, whatever its size (a
--          cost larger than a bucket is granted when that bucket is full, not refused), and is
--          charged in full, the excess as debt (XtremeFlow's admission); "0" (or absent): it fits
--          once every bucket holds it (or is full)
-- ARGV[20] lead (a whole number, "0" or absent: none): the priority class's lead. A new ticket is
--          queued ahead of the tickets of the last `lead` arrivals (see the queue in _prelude.lua),
--          and one that would be the head and fits now is granted at once, passing the queue
-- ARGV[21] tenant ("" or absent: the budget's untagged calls)
-- ARGV[22] tenant weight (0 or absent: the budget shares nothing by tenant): with a weight, places
--          are tenants' virtual times (start-time fair queuing; see the queue in _prelude.lua), and
--          a lead moves a call ahead by `lead` calls of its own cost
-- ARGV[23] levels (a whole number in [0, 8], "0" or absent: none): how many caps of the hierarchy
--          under the budget the call passes (see Caps in _prelude.lua), each then given by six
--          arguments from ARGV[24]: node (its name, 1 to 256 bytes without space, control character
--          or comma), request rate, request burst, token rate, token burst (rates per second, 0:
--          none; bursts in seconds) and max concurrency (0: none). A grant fits the budget and each
--          of them, and is charged at each; a cost no cap can ever hold is "too_large"
-- ARGV[23 + 6 x levels] "1": reserve (the top priority class's calls; "0" or absent: no). A new
--          arrival that passes no cap, goes first, has a slot and waits only for the rates (not for
--          a cooldown) is granted now for its fit time: charged now as it would be then, its lease
--          running from then. Its caller starts then without coming back, so its wait is the fit
--          time plus one round trip; no later arrival can pass it, and no refund takes the buckets
--          below what it holds (state rf, tf)
-- ARGV[24 + 6 x levels] "1": book (the calls of a budget with no priority classes, tenants or caps;
--          "0" or absent: no). Once queued, the ticket of a connected process is reserved for its
--          fit time, firm ("g <id> <now> f <start>"), by any later script that finds it at the head
--          within two refill times of its cost (at most 1 s) of that time: its waiter starts then
--          without coming back (see advance() in _prelude.lua)
--
-- Reply, all strings:
--   {"granted", start, now, expiry}  the lease exists, charged now; start: its grant time, or for
--                                    a reservation the later time its call may start
--   {"queued", wait, now}            the ticket waits in its turn; come back after `wait` seconds:
--                                    exact for the head waiting for its rates, else a renewal
--                                    interval. Meanwhile its process's channel announces "h <id> <fit>
--                                    <now>" (the ticket is head and fits at <fit>), "g <id> <now>"
--                                    (granted provisionally: the holder claims it by calling again
--                                    with the same id within the claim window, or it is taken back
--                                    and refunded), "g <id> <now> f" (granted firm to a connected
--                                    process: the holder starts, no claim; see connected()) or
--                                    "g <id> <now> f <start>" (booked: granted firm for a later start,
--                                    when the holder starts)
--   {"refused", retry_after, now}    nothing charged; retry_after is exact when the refusal is for
--                                    the rates, "-1" when it is for a slot or a queue ahead
--   {"too_large", most, now, what}   nothing charged: a new arrival's cost of `what` ("requests" or
--                                    "tokens") is more than the limits in force, learned ones included,
--                                    can ever grant: `most`, a minute of the rate or the burst if
--                                    longer (the configured limits alone are checked by the client)
-- A bad argument or other stored limits: an error reply (XFLOW_BADARG, XFLOW_CONFLICT; see _prelude.lua),
-- nothing changed.
local SPEC = {
  {'id', TEXT},
  {'requests', UNITS},
  {'tokens', UNITS},
  {'max wait', SECONDS_OR_UNSET},
  {'may queue', FLAG},
  {'ticket ttl', POSITIVE_SECONDS},
  {'probe', FLAG, '0'},
  {'overdraft', FLAG, '0'},
  {'lead', COUNT, '0'},
  {'tenant', TEXT_OR_EMPTY, ''},
  {'weight', RATE, '0'},
}
level_spec(SPEC, 23)
SPEC[#SPEC + 1] = {'reserve', FLAG, '0'}
SPEC[#SPEC + 1] = {'book', FLAG, '0'}
local A, REFUSED = operation_args(SPEC)
if REFUSED then
  return redis.error_reply(REFUSED)
end
local ID, CREQ, CTOK, MAX_WAIT, MAY_QUEUE, TICKET_TTL, PROBE, OVERDRAFT, LEAD, TENANT, WEIGHT = unpack(A)
local RESERVE, BOOK = A[#SPEC - 1], A[#SPEC]
local LEVELS = levels_at(23) -- the caps this call passes (nil: none), as its ticket and lease keep them

reap()
local st = load_state()
if PROBE and st.pb == 0 then
  st.pb = 1
  if st.lr > 0 or st.lt > 0 then
    st.pb = 2 -- limits are known already: nothing to probe
  end
  apply_limits(st)
end
local open, held_caps = advance(st)

local function finish(reply)
  save_state(st)
  touch(st)
  return reply
end

local held = redis.call('HGET', K_DATA, ID)
if held then
  claim(st, ID, held)
  return finish({'granted', words(held)[3], fmt(NOW), fmt(redis.call('ZSCORE', K_LEASES, ID))})
end

if redis.call('ZSCORE', K_QUEUE, ID) then
  local t = ticket(ID)
  t.ttl = TICKET_TTL -- the caller's: a waiter that leaves the queue for a while (a Celery task
  -- re-queued with a countdown) keeps its place that long, and renews with its usual TTL on return
  t.alive = math.max(NOW, t.fit) + t.ttl
  save_ticket(st, ID, t)
  return finish({'queued', fmt(wait_hint(ID)), fmt(NOW)})
end

-- The most one grant may cost (providers' buckets hold one minute), -1 where nothing limits it.
local function most(rate, burst, floor)
  if rate <= 0 then
    return -1
  end
  return math.max(floor, rate * math.max(burst, 60))
end

local most_req, most_tok = most(RATE_REQ, BURST_REQ, 1), most(RATE_TOK, BURST_TOK, 0)
if not OVERDRAFT and most_req >= 0 and CREQ > most_req then
  return finish({'too_large', fmt(most_req), fmt(NOW), 'requests'})
end
if not OVERDRAFT and most_tok >= 0 and CTOK > most_tok then
  return finish({'too_large', fmt(most_tok), fmt(NOW), 'tokens'})
end
for _, l in ipairs(LEVELS or {}) do
  local lreq, ltok = most(l.rr, l.br, 1), most(l.rt, l.bt, 0)
  if not OVERDRAFT and lreq >= 0 and CREQ > lreq then
    return finish({'too_large', fmt(lreq), fmt(NOW), 'requests', l.node})
  end
  if not OVERDRAFT and ltok >= 0 and CTOK > ltok then
    return finish({'too_large', fmt(ltok), fmt(NOW), 'tokens', l.node})
  end
end

-- Its place: its sequence number, or with a lead that less the lead and a half (ahead of the ticket
-- that holds that number). Shared by tenant: its tag (its tenant's finish tag, or the virtual time
-- if later) less `lead` times its cost. It is first when nothing waits, or when it goes before the head.
local waiting = redis.call('ZCARD', K_QUEUE)
local seq = st.seq + 1
local score, first, tag, cost = seq, waiting == 0, nil, nil
if WEIGHT > 0 then
  tag, cost = tenant_tag(st, TENANT), virtual_cost(CREQ, CTOK)
  score = tonumber(fmt(tag - LEAD * cost))
elseif LEAD > 0 then
  score = seq - LEAD - 0.5
end
if not first and (WEIGHT > 0 or LEAD > 0) then
  first = score < tonumber(redis.call('ZRANGE', K_QUEUE, 0, 0, 'WITHSCORES')[2])
end
if not first and open then
  -- every ticket waits for its caps alone: first, unless one of its own caps holds one of them
  first = true
  for _, l in ipairs(LEVELS or {}) do
    first = first and not held_caps[l.node]
  end
end

local lfit, lslot = NOW, true -- what its caps allow (a cap's slots all held: refused or queued)
if first and LEVELS then
  lfit, lslot = level_fit(LEVELS, CREQ, CTOK, OVERDRAFT)
end
if first and lslot and slot_free() then
  local fit = math.max(fit_time(st, CREQ, CTOK, OVERDRAFT), lfit)
  if fit > NOW and (not MAY_QUEUE or (MAX_WAIT >= 0 and fit - NOW > MAX_WAIT)) then
    return finish({'refused', fmt(fit - NOW), fmt(NOW)})
  end
  -- A reservation: the rates set its fit time (a cooldown may yet be extended; it is not reserved).
  -- A refund made before its start must not hand out its share again: each bucket's TAT stays at
  -- least at the reservations' own TAT (rf, tf: see grant(); given_back() keeps to them).
  local start = NOW
  if RESERVE and not LEVELS and fit > NOW and fit > st.cu then
    start = fit
  end
  if fit <= start then
    grant(st, ID, CREQ, CTOK, nil, false, OVERDRAFT, LEVELS, start)
    if tag then
      served(st, TENANT, tag, cost, WEIGHT, score)
    end
    if waiting > 0 then
      -- It passed the queue: counted as an arrival (or its tenant's tag moved on), so that no
      -- ticket is passed more than a lead's worth of times; the head is told its new fit time.
      if not tag then
        st.seq = seq
      end
      advance(st)
    end
    return finish({'granted', fmt(start), fmt(NOW), fmt(start + LEASE_TTL)})
  end
elseif not MAY_QUEUE then
  return finish({'refused', '-1', fmt(NOW)})
end

if tag then
  queued_tag(TENANT, tag, cost, WEIGHT)
  score = fmt(score)
else
  st.seq = seq
  if LEAD > 0 then
    score = string.format('%.1f', score)
  end
end
redis.call('ZADD', K_QUEUE, score, ID)
WROTE[K_QUEUE], WROTE[K_TICKETS] = true, true
save_ticket(st, ID, {creq = CREQ, ctok = CTOK, alive = NOW + TICKET_TTL, ttl = TICKET_TTL, fit = -1,
  overdraft = OVERDRAFT, book = BOOK and not LEVELS, tag = tag and score, inc = tag and cost / WEIGHT, fin = tag and tag + cost / WEIGHT,
  tenant = TENANT, levels = LEVELS})
ARRIVING = ID
advance(st)
if GRANTED[ID] then
  -- Behind tickets that only their caps hold back, it was granted just now: claimed at once.
  claim(st, ID, redis.call('HGET', K_DATA, ID))
  return finish({'granted', fmt(NOW), fmt(NOW), fmt(NOW + LEASE_TTL)})
end
return finish({'queued', fmt(wait_hint(ID)), fmt(NOW)})
