-- _prelude.lua: shared by every xflow-dist script and prepended to each at load time, so that
-- every operation reads the budget, its clock and its keys the same way. Not a script by itself.
--
-- One budget named N lives in eight keys, all tagged {xflow:N} so they share one Cluster slot:
--   KEYS[1] state     HASH  rt, tt  theoretical arrival time (TAT) of the request and token buckets,
--                                   seconds of Redis time; the bucket is full when TAT <= now
--                           cu      cooldown deadline, seconds of Redis time
--                           cl      cooldown backoff level (0 = first 429 of a quiet period)
--                           cr      when the backoff level resets (end of the quiet period)
--                           seq     last ticket sequence number handed to the waiting queue
--                           qa      latest time a queued ticket is alive until (the keys outlive it)
--                           kr, kt  requests and tokens taken off the levels so far by provider
--                                   corrections and tighter learned rates (see settle.lua)
--                           cq, ct  requests and tokens charged so far, all grants together
--                           lr, lt  the tightest live request and token limits learned from the
--                                   provider (KEYS[6]), per minute, as last applied (0: none)
--                           lu      the last learned limit is remembered until then (the keys outlive it)
--                           pb      probe: 0 none, 1 one call at a time until the first settle or
--                                   learned limit, 2 over
--                           cf      the limits the keys were made with (see below; configure.lua
--                                   replaces them)
--                           la      the latest expiry any lease was given (the keys outlive it)
--                           xa      when the keys expire, milliseconds of Redis time (see touch())
--                           vt      virtual time of the tenants' fair queuing: the largest place granted
--                           ca      the latest time a cap was written, or TAT it was given (the keys
--                                   outlive it; 0: the budget has had no caps)
--                           rf, tf  what the reservations hold of the request and token buckets: their
--                                   own TAT (each: the later of it and its start, plus its cost's
--                                   refill time); a refund keeps the TAT at or above it (absent: 0,
--                                   none; see grant())
--   KEYS[2] leases    ZSET  lease id -> expiry (seconds of Redis time)
--   KEYS[3] lease_data HASH lease id -> "<requests> <tokens> <start> <request level> <token level>
--                           <kr> <kt> <cq> <ct>": what the lease was charged, the levels just
--                           after at its start ("u" where that bucket had no rate), and the corrections and
--                           charges made by then; then its levels (below), and " p" while provisional
--   KEYS[4] queue     ZSET  ticket id -> place: acquirers waiting, served in order of place. The place
--                           is the arrival's sequence number (seq), FIFO; a priority class's lead L
--                           makes it seq - L - 0.5, ahead of the last L arrivals (ties: by id).
--                           Shared by tenant (a weight w given), it is the call's tag (below), less
--                           L times its cost
--   KEYS[5] tickets   HASH  ticket id -> "<requests> <tokens> <alive until> <ttl> <fit announced>"
--                           then "o" if it is in overdraft, "b" if it books (see advance()); queued by tenant, "v<place>", "w<turn>" (its
--                           cost / weight), "f<finish tag>" and "t:<tenant>"; then its levels (below)
--   KEYS[6] learned   HASH  model (or route; "" unnamed) -> "<rpm> <rpm until> <tpm> <tpm until>": the
--                           limits the provider reported for it, per minute (0: none), each live
--                           until `memory` seconds after its last report
--   KEYS[7] tenants   ZSET  tenant -> finish tag: the virtual time its calls have taken so far, kept
--                           while it is ahead of vt (below it, the tenant starts at vt anyway)
--   KEYS[8] caps      HASH  node -> "<request TAT> <token TAT> <leases held>": the buckets and the
--                           slots of each cap of the hierarchy under the budget (see below), dropped
--                           while full and unused
--
-- Every script starts with the same budget block:
--   ARGV[1] configured request rate, requests per second (0: none configured)
--   ARGV[2] request burst, seconds of credit
--   ARGV[3] configured token rate, tokens per second (0: none configured)
--   ARGV[4] token burst, seconds of credit
--   ARGV[5] max concurrency, leases (0: no concurrency limit)
--   ARGV[6] lease time to live, seconds
--   ARGV[7] idle grace, seconds the keys outlive the last thing they still have to remember
--   ARGV[8] events channel: cooldowns and a lost state are published there, grants and hints to a
--           queued ticket of a connected process on that process's own channel beside it
--           ("<channel>:<process>", see inbox())
--   ARGV[9] claim window, seconds: a grant to a queued ticket is provisional until its holder claims
--           it (acquire.lua with the same id) within this window; unclaimed, it is taken back. A
--           grant to a ticket whose process is connected (it holds "<ARGV[8]>:<process>" subscribed,
--           see connected()) is firm: it needs no claim
--   ARGV[10] "1": the caller has seen this budget's keys so recently (or holds a lease or ticket of
--           it) that they cannot have expired: if they are gone, they were lost (see below); "0" else
--   ARGV[11] give up: the moment (seconds of Redis time) after which the caller no longer waits for
--           this call's reply; "0": it waits as long as it takes (see Late calls below)
-- Operation arguments follow from ARGV[12].
--
-- Lost state. A restart without persistence, FLUSHALL or a failover to a replica that had not caught
-- up lose the keys while calls are in flight. A caller that says it has seen them (ARGV[10]) and
-- finds no state makes it anew as lost state is safely made: both buckets empty (as if a full burst
-- had just been spent: the calls in flight spent it), and a hold of RECOVERY_WINDOWS claim windows
-- (a cooldown that leaves the backoff alone) in which no new grant is made while every process
-- re-registers the leases it still holds (rejoin.lua). It announces "l <now>" on the events channel:
-- each process then rejoins its leases and its waiters ask again. A caller that has not seen the
-- keys makes a fresh budget, full, as on first use.
--
-- Late calls. A client that gives up on a call (its reply did not come within its timeout) takes
-- it as failed and moves on: it may retry it, or decide Redis is out and run on an outage policy.
-- Redis may still run the call later, when it reads it from a connection that client has closed
-- (a server frozen, or stalled, and back): a settle would then free a slot its process is already
-- counting on its own share. So a call carries the moment its client gives up (ARGV[11]), from the
-- Redis time of earlier replies, taken early rather than late; run after that moment, it changes
-- nothing and answers "XFLOW_LATE <now> <give up>", which a client still waiting takes as a timeout.
--
-- Every argument is checked before anything is written (Redis does not roll back a script that
-- fails halfway), and a call with a bad one is refused with the error reply
-- "XFLOW_BADARG ARGV[<i>] <name>: got <value>, expected <what>", changing nothing. Numbers are plain
-- decimals (no hex, nan, inf, spaces or leading +), finite and bounded: units (requests, tokens, rates per
-- second, limits per minute, leases) at most MAX_UNITS, seconds (and the jitter fraction) at most
-- MAX_SECONDS, and a rate or limit that is not 0 (-1) at least MIN_RATE; ids and the channel are 1 to
-- MAX_TEXT bytes with no space or control character; flags are exactly "0" or "1". Only the
-- arguments a script documents are accepted.
--
-- The limits of a budget (ARGV[1..6] and ARGV[9]: not the idle grace nor the channel) are stored in
-- the state (`cf`) when its keys are made. A call with other limits is refused before anything is
-- written with "XFLOW_CONFLICT stored <limits>; given <limits>" (seven numbers each, in the order of
-- the block), so that two deployments never mix their limits silently; only configure.lua replaces
-- them. Once the keys expire (the budget was idle), any limits may start afresh.
--
-- The rate of a bucket is the configured one, lowered to the tightest learned limit still live (of
-- any model: lr / 60, lt / 60); with neither, that dimension is not limited. Expiry is checked
-- whenever the state is loaded. A rate that changes (a report, an expiry) is applied by rescale(),
-- which never invents credit, and the head of the queue is told its new fit time by the advance()
-- that ends the same script.
--
-- A bucket of rate r and burst b (capacity C = r * b) is kept as one number, its TAT: the level
-- at time t is C - r * max(0, TAT - t). A cost c fits once the bucket holds min(c, C) (all of it,
-- or a full bucket when c is more than the burst credit) and is charged when it is granted, so the
-- level may go below zero: that debt is what later arrivals wait out.
--
-- Grants happen now, so credit given back (a refund, a cancel) is used at once; only a reservation
-- (acquire.lua) is granted now for a later start, and credit it holds stays held until then (rf,
-- tf). Whoever cannot be granted now joins one queue (rates and slots alike), FIFO within a
-- priority class; only its head may be granted, so a large request is never overtaken by small ones
-- of its class. An arrival with a lead that would go before the head and fits now is granted at once,
-- and counts as an arrival (seq): no ticket is passed by more than L - its own lead later arrivals.
--
-- Shared by tenant, the queue is start-time fair queuing: a call of cost c (virtual_cost(): the
-- seconds of the binding rate it takes, its dominant share) by a tenant of weight w is tagged
-- S = max(vt, F), F its tenant's finish tag, which becomes S + c / w; vt is the virtual time.
-- Served in order of tag, each backlogged tenant gets its weight's share of the
-- binding dimension, and a tenant that was idle starts at vt: no credit saved, no debt kept. vt moves
-- with the places granted (tag less lead x cost), so that a call of a class with a lead does not push
-- the other tenants behind its own tenant's backlog. The head is told, on its
-- process's events channel, exactly when it will fit ("h <id> <fit> <now>") and comes back then; a release,
-- a refund or that return grants it ("g <id> <now>", or "g <id> <now> f" when firm: see connected())
-- together with every next head that fits too.
-- The first waiter of another process behind it is told to come back a claim window after that fit
-- time, so that a head whose process died is granted (provisionally) and passed over without a wait
-- for its ticket's TTL.
--
-- Caps: a call may pass a hierarchy of caps under the budget (a team, then one of its users), each a
-- node with its own request and token buckets and slots: acquire.lua's levels, "n<request rate>,
-- <request burst>,<token rate>,<token burst>,<max concurrency>,<node>" in its ticket and its lease.
-- A grant must fit the budget and every cap it passes; it is charged there (from now: caps take no
-- late head's credit), and settled, refunded and released there with the lease. The queue stays
-- one: advance() passes over a ticket that only its caps hold back, and every later ticket of the
-- caps that hold it, up to MAX_SCAN tickets deep, so that a capped tenant's backlog never holds the
-- budget back from the others. Such a ticket is told when its caps' rates will fit ("h"); a cap's
-- slot given back serves the queue again.
local K_STATE, K_LEASES, K_DATA, K_QUEUE, K_TICKETS = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local K_LEARNED, K_TENANTS, K_CAPS = KEYS[6], KEYS[7], KEYS[8]
local MAX_UNITS, MAX_SECONDS, MIN_RATE, MAX_TEXT = 1e15, 1e9, 1e-6, 256
-- A call passes at most MAX_LEVELS caps; advance() looks at most MAX_SCAN tickets deep for one its
-- caps do not hold back.
local MAX_LEVELS, MAX_SCAN = 8, 32

-- The kinds of argument, each [lo, hi] (")": hi excluded, "(": lo excluded), with -1 ("unset") or 0
-- accepted where said; "text" (ids, the channel), "flag".
local UNITS, UNITS_OR_UNSET, COUNT = 'a number in [0, 1e15]', '-1 or a number in [0, 1e15]', 'a whole number in [0, 1e15]'
local RATE, LIMIT_OR_UNSET = '0 or a rate in [1e-6, 1e15]', '-1 or a limit in [1e-6, 1e15]'
local SECONDS, POSITIVE_SECONDS = 'seconds in [0, 1e9]', 'seconds in (0, 1e9]'
local SECONDS_OR_UNSET, FACTOR, DRAW = '-1 or seconds in [0, 1e9]', 'a number in [0, 1e9]', 'a number in [0, 1)'
local FLAG = '"0" or "1"'
local LEVEL_COUNT = 'a whole number in [0, 8]'
local NODE = '1 to 256 bytes, no space, comma or control character'
local TEXT = '1 to 256 bytes, no space or control character'
local TEXT_OR_EMPTY = '"" or 1 to 256 bytes, no space or control character'
local CHECKED = 'checked before' -- a limit the same as the stored one

-- The value of argument `s` of `kind`, or nil. Numbers are plain finite decimals: tonumber alone
-- would take hex, nan, inf, 1e309 and surrounding spaces.
local function value_of(kind, s)
  if kind == CHECKED then
    return tonumber(s)
  elseif kind == FLAG then
    if s == '0' or s == '1' then
      return s == '1'
    end
    return nil
  elseif kind == TEXT or kind == TEXT_OR_EMPTY then
    if #s <= MAX_TEXT and (#s > 0 or kind == TEXT_OR_EMPTY) and not s:find('[%s%c]') then
      return s
    end
    return nil
  elseif kind == NODE then
    if #s <= MAX_TEXT and #s > 0 and not s:find('[%s%c,]') then
      return s
    end
    return nil
  end
  local x = tonumber(s)
  if not x or x ~= x or #s > 40 or s:find('[^%d%.eE%+%-]') or s:sub(1, 1) == '+' then
    return nil
  end
  local ok
  if kind == UNITS then
    ok = x >= 0 and x <= MAX_UNITS
  elseif kind == UNITS_OR_UNSET then
    ok = x == -1 or (x >= 0 and x <= MAX_UNITS)
  elseif kind == COUNT then
    ok = x >= 0 and x <= MAX_UNITS and x == math.floor(x)
  elseif kind == LEVEL_COUNT then
    ok = x >= 0 and x <= MAX_LEVELS and x == math.floor(x)
  elseif kind == RATE then
    ok = x == 0 or (x >= MIN_RATE and x <= MAX_UNITS)
  elseif kind == LIMIT_OR_UNSET then
    ok = x == -1 or (x >= MIN_RATE and x <= MAX_UNITS)
  elseif kind == SECONDS or kind == FACTOR then
    ok = x >= 0 and x <= MAX_SECONDS
  elseif kind == POSITIVE_SECONDS then
    ok = x > 0 and x <= MAX_SECONDS
  elseif kind == SECONDS_OR_UNSET then
    ok = x == -1 or (x >= 0 and x <= MAX_SECONDS)
  elseif kind == DRAW then
    ok = x >= 0 and x < 1
  end
  if ok then
    return x
  end
  return nil
end

-- ARGV[first..] checked against `spec`, one {name, kind[, value when absent]} per argument in order:
-- the values, or nil and the refusal. With `more`, arguments may follow (the budget block).
local function checked(first, spec, more)
  local values = {}
  for i, arg in ipairs(spec) do
    local n = first + i - 1
    local raw = ARGV[n] or arg[3]
    local value = nil
    if raw then
      value = value_of(arg[2], raw)
    end
    if value == nil then
      local got = raw and string.format('%q', raw:sub(1, 40)):gsub('%c', '?') or 'nothing'
      return nil, string.format('XFLOW_BADARG ARGV[%d] %s: got %s, expected %s', n, arg[1], got, arg[2])
    end
    values[i] = value
  end
  local last = first + #spec - 1
  if not more and #ARGV > last then
    return nil, string.format('XFLOW_BADARG ARGV[%d]: unexpected, this script takes %d arguments', last + 1, last)
  end
  return values
end

-- The limits of this call as the state keeps them (`cf`): ARGV[1..6] and ARGV[9] as given, joined
-- by spaces. Limits the same as the stored ones were checked when they were stored.
-- The state hash is read once, here: the stored limits first, then what load_state() takes.
local STATE_V = redis.call('HMGET', K_STATE, 'cf', 'rt', 'tt', 'cu', 'cl', 'cr', 'seq', 'qa', 'kr', 'kt', 'cq',
  'ct', 'lr', 'lt', 'lu', 'pb', 'la', 'xa', 'vt', 'ca', 'rf', 'tf')
local STORED = STATE_V[1]
local CONFIG = #ARGV >= 9 and table.concat({ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[9]}, ' ')
local function limit(kind)
  if CONFIG and CONFIG == STORED then
    return CHECKED
  end
  return kind
end

local BLOCK, REFUSAL = checked(1, {
  {'request rate', limit(RATE)},
  {'request burst', limit(SECONDS)},
  {'token rate', limit(RATE)},
  {'token burst', limit(SECONDS)},
  {'max concurrency', limit(COUNT)},
  {'lease ttl', limit(POSITIVE_SECONDS)},
  {'idle grace', SECONDS},
  {'channel', TEXT},
  {'claim window', limit(POSITIVE_SECONDS)},
  {'seen', FLAG},
  {'give up', UNITS},
}, true)
if REFUSAL then
  return redis.error_reply(REFUSAL)
end
local CFG_RATE_REQ, BURST_REQ, CFG_RATE_TOK, BURST_TOK, MAX_CONC, LEASE_TTL, IDLE_GRACE, CHANNEL, CLAIM_WINDOW,
  SEEN, GIVE_UP = unpack(BLOCK)
local RECOVERY_WINDOWS = 3

-- The operation arguments ARGV[12..] checked against `spec` (see checked()), then the limits of this
-- call against the stored ones, by value: the values, or nil and the refusal. Reads only.
local function operation_args(spec)
  local values, refusal = checked(12, spec)
  if refusal then
    return nil, refusal
  end
  if STORED and STORED ~= CONFIG then
    local mine = {CFG_RATE_REQ, BURST_REQ, CFG_RATE_TOK, BURST_TOK, MAX_CONC, LEASE_TTL, CLAIM_WINDOW}
    local n = 0
    for w in string.gmatch(STORED, '%S+') do
      n = n + 1
      if tonumber(w) ~= mine[n] then
        n = -1
        break
      end
    end
    if n ~= 7 then
      return nil, 'XFLOW_CONFLICT stored ' .. STORED .. '; given ' .. CONFIG
    end
  end
  return values
end

local clock = redis.call('TIME')
local NOW = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
if GIVE_UP > 0 and NOW > GIVE_UP then -- its client has given up on it (see Late calls)
  return redis.error_reply(string.format('XFLOW_LATE %.6f %.6f', NOW, GIVE_UP))
end

-- The rates in force and whether the budget probes; set from the state by apply_limits().
local RATE_REQ, RATE_TOK, PROBING = CFG_RATE_REQ, CFG_RATE_TOK, false

local function fmt(x)
  return string.format('%.6f', x)
end

local function words(s)
  local out = {}
  for w in string.gmatch(s, '%S+') do
    out[#out + 1] = w
  end
  return out
end

-- The configured rate, lowered to the learned limit (per minute) if there is one.
local function effective(configured, per_minute)
  local learned = per_minute / 60
  if learned > 0 and (configured <= 0 or learned < configured) then
    return learned
  end
  return configured
end

local function apply_limits(st)
  RATE_REQ = effective(CFG_RATE_REQ, st.lr)
  RATE_TOK = effective(CFG_RATE_TOK, st.lt)
  PROBING = st.pb == 1
end

-- Give credit back; a TAT never goes below now, so a refund never lifts a bucket above capacity.
-- A bucket's TAT once `amount` is given back (never below now), or, below 0, charged as debt from now.
-- ``floor`` (a budget bucket's `rf` or `tf`, nil for a cap): what the reservations made still hold
-- of the bucket; a refund never takes the TAT below it (see acquire.lua), or lower if it already is.
local function given_back(tat, rate, amount, floor)
  if rate <= 0 or amount == 0 then
    return tat
  elseif amount < 0 then
    return math.max(tat, NOW) - amount / rate
  elseif tat > NOW then
    return math.max(NOW, math.min(tat, floor or 0), tat - amount / rate)
  end
  return tat
end

local function refund(st, creq, ctok)
  st.rt = given_back(st.rt, RATE_REQ, creq, st.rf)
  st.tt = given_back(st.tt, RATE_TOK, ctok, st.tf)
end

-- The keys this script may have made (written to while they could be empty): touch() gives them the
-- keys' expiry, which every other key has already.
local WROTE = {}

-- The tickets advance() granted in this script (acquire.lua claims its own at once).
local GRANTED = {}

-- The ticket acquire.lua is queueing in this script: advance() never books it (see advance()).
local ARRIVING = nil

-- Charges of unclaimed provisional grants that reap() removed; load_state() refunds them, as a
-- cancel would, once the rates in force are known.
local REAPED_REQ, REAPED_TOK = 0, 0


-- How far a bucket's TAT may be ahead of now for a cost to fit: while it holds min(cost, capacity)
-- (see the header); in overdraft, while it is not in debt, whatever the cost (XtremeFlow's rule: the
-- whole cost is charged, the excess as debt that delays the next grants).
local function slack_of(cost, rate, burst, overdraft)
  if overdraft then
    return burst
  end
  return math.max(0, burst - cost / rate)
end

-- Earliest time a cost fits one bucket.
local function dim_fit(tat, cost, rate, burst, overdraft)
  if rate <= 0 or cost <= 0 then
    return NOW
  end
  return math.max(NOW, tat - slack_of(cost, rate, burst, overdraft))
end

-- Earliest time a cost fits every dimension and the cooldown is over.
local function fit_time(st, creq, ctok, overdraft)
  return math.max(NOW, st.cu, dim_fit(st.rt, creq, RATE_REQ, BURST_REQ, overdraft),
    dim_fit(st.tt, ctok, RATE_TOK, BURST_TOK, overdraft))
end

-- A free slot: below max concurrency, and none at all in flight while the budget probes.
local function slot_free()
  if MAX_CONC <= 0 and not PROBING then
    return true
  end
  local n = redis.call('ZCARD', K_LEASES)
  return (MAX_CONC <= 0 or n < MAX_CONC) and not (PROBING and n > 0)
end

-- A head of the queue comes back a round trip after the fit time it was told (``fit``). Charging
-- it from now would lose that lateness where its bucket filled up meanwhile: at burst 0 a queue
-- paced at 1/r would run at 1/(1/r + round trip). So, like GCRA's booked start times, a bucket that
-- set the fit time (it held less than min(cost, capacity) until then; a cooldown did not set it) is
-- charged as of then, at most LATE_CREDIT and the cost's own refill time back, never before its TAT.
-- Every other charge starts now: credit back-dated in a bucket that was full would overflow it.
-- Hence in a window [t1, t2] of grant times a bucket admits at most r * (t2 - t1) + max(C, last cost),
-- plus, only when t1 is such a late head's grant, min(its cost, r * lateness, r * LATE_CREDIT).
local LATE_CREDIT = 0.0625

local function charged_from(st, tat, fit, cost, rate, burst, overdraft)
  local slack = slack_of(cost, rate, burst, overdraft)
  if fit < 0 or fit >= NOW or st.cu >= fit - 0.000001 or tat - slack < fit - 0.000001 then
    return math.max(tat, NOW)
  end
  return math.max(tat, fit, NOW - LATE_CREDIT, NOW - cost / rate)
end

-- Charge every dimension: all limits or none. ``fit``: the fit time told to a head of the queue
-- (-1: none, charged from now).
local function charge(st, creq, ctok, fit, overdraft)
  st.cq = st.cq + creq
  st.ct = st.ct + ctok
  if RATE_REQ > 0 then
    st.rt = charged_from(st, st.rt, fit, creq, RATE_REQ, BURST_REQ, overdraft) + creq / RATE_REQ
  end
  if RATE_TOK > 0 then
    st.tt = charged_from(st, st.tt, fit, ctok, RATE_TOK, BURST_TOK, overdraft) + ctok / RATE_TOK
  end
end

-- Credit in a bucket now, or at time `at` if given (below zero: debt).
local function level(tat, rate, burst, at)
  if rate <= 0 then
    return 0
  end
  return rate * burst - rate * math.max(0, tat - (at or NOW))
end

-- A level as the lease data keeps it, at the lease's start: "u" (unknown) where the bucket has no rate.
local function snapshot(tat, rate, burst, at)
  if rate <= 0 then
    return 'u'
  end
  return fmt(level(tat, rate, burst, at))
end

-- The caps' state this script has read (node -> {rt, tt, n}), written back by save_state().
local NODES = {}

local function node(name)
  local s = NODES[name]
  if not s then
    local w = words(redis.call('HGET', K_CAPS, name) or '0 0 0')
    s = {rt = tonumber(w[1]), tt = tonumber(w[2]), n = tonumber(w[3])}
    NODES[name] = s
  end
  return s
end

-- One level as its ticket and lease keep it ("n<rr>,<br>,<rt>,<bt>,<mc>,<node>").
local function level_of(w)
  local rr, br, rt, bt, mc, name = string.match(w, '^n([^,]+),([^,]+),([^,]+),([^,]+),([^,]+),(.+)$')
  return {rr = tonumber(rr), br = tonumber(br), rt = tonumber(rt), bt = tonumber(bt), mc = tonumber(mc),
    node = name, raw = w}
end

-- The levels among the words of a lease or ticket from `from` on (nil: none).
local function levels_in(w, from)
  local out = nil
  for i = from, #w do
    if string.sub(w[i], 1, 1) == 'n' then
      out = out or {}
      out[#out + 1] = level_of(w[i])
    end
  end
  return out
end

-- The spec of the caps an operation takes from ARGV[at]: their count there, then six arguments
-- each (acquire.lua, rejoin.lua), appended to `spec`; and once checked, the levels they give (nil: none).
local function level_spec(spec, at)
  spec[#spec + 1] = {'levels', LEVEL_COUNT, '0'}
  local n = value_of(LEVEL_COUNT, ARGV[at] or '0') or 0
  for i = 1, n do
    for _, arg in ipairs({{'node', NODE}, {'request rate', RATE}, {'request burst', SECONDS},
        {'token rate', RATE}, {'token burst', SECONDS}, {'max concurrency', COUNT}}) do
      spec[#spec + 1] = {arg[1] .. ' of level ' .. i, arg[2]}
    end
  end
  return spec
end

local function levels_at(at)
  local out = nil
  for i = 1, tonumber(ARGV[at] or '0') do
    local a = at + 6 * (i - 1)
    out = out or {}
    out[i] = level_of('n' .. ARGV[a + 2] .. ',' .. ARGV[a + 3] .. ',' .. ARGV[a + 4] .. ',' .. ARGV[a + 5] .. ',' ..
      ARGV[a + 6] .. ',' .. ARGV[a + 1])
  end
  return out
end

local function level_words(levels)
  local s = ''
  for _, l in ipairs(levels or {}) do
    s = s .. ' ' .. l.raw
  end
  return s
end

-- When the caps let a cost through: the earliest time their rates fit (now if they do), and whether
-- each has a slot; `holders` (if given) gets each cap's {node, fit, full}.
local function level_fit(levels, creq, ctok, overdraft, holders)
  local fit, slot = NOW, true
  for _, l in ipairs(levels) do
    local s = node(l.node)
    local f = math.max(dim_fit(s.rt, creq, l.rr, l.br, overdraft), dim_fit(s.tt, ctok, l.rt, l.bt, overdraft))
    local full = l.mc > 0 and s.n >= l.mc
    if full then
      slot = false
    end
    fit = math.max(fit, f)
    if holders then
      holders[#holders + 1] = {node = l.node, f = f, full = full}
    end
  end
  return fit, slot
end

local function charge_levels(levels, creq, ctok)
  for _, l in ipairs(levels) do
    local s = node(l.node)
    if l.rr > 0 and creq > 0 then
      s.rt = math.max(s.rt, NOW) + creq / l.rr
    end
    if l.rt > 0 and ctok > 0 then
      s.tt = math.max(s.tt, NOW) + ctok / l.rt
    end
    s.n = s.n + 1
    s.dirty = true
  end
end

-- A lease ends: its slot at every cap, `creq` and `ctok` given back there as refund() does (ctok
-- below 0: charged as debt, as settle.lua does an under-estimate).
local function release_levels(levels, creq, ctok)
  for _, l in ipairs(levels or {}) do
    local s = node(l.node)
    s.n = math.max(0, s.n - 1)
    s.rt, s.tt = given_back(s.rt, l.rr, creq), given_back(s.tt, l.rt, ctok)
    s.dirty = true
  end
end

-- A grant, now; ``fit``: the fit time told to a head of the queue (see charge()). A grant to a queued
-- ticket is provisional (``provisional`` true) unless its process is connected (advance(), see
-- connected()): it expires after the claim window unless its holder claims it (acquire.lua with the
-- same id), and is then refunded (see reap()). ``levels``: the caps
-- it passes (nil: none), charged too. ``start``: a reservation's later start (nil: now), from which
-- its lease runs; it is charged now as it would be then (see acquire.lua): from its start in a bucket
-- that would be fuller by then, so that the credit it takes is never also the credit of a call made
-- before it; its snapshots are the levels then, when the provider sees the call; and the floors (rf,
-- tf), which no refund goes below before then, are the TATs of the reservations alone: the later of
-- the floor and its start, plus its cost's refill time. (Not its start plus that time: reservations
-- sharing a start would each hold only their own share, and a refund of a call charged before that
-- start, whose debt it forgot, would free what they hold together.)
local function grant(st, id, creq, ctok, fit, provisional, overdraft, levels, start)
  start = start or NOW
  if start > NOW then -- charged from its start in every bucket, not only in those that set it
    if RATE_REQ > 0 and creq > 0 then
      st.rt = math.max(st.rt, start)
    end
    if RATE_TOK > 0 and ctok > 0 then
      st.tt = math.max(st.tt, start)
    end
  end
  charge(st, creq, ctok, fit or -1, overdraft)
  if start > NOW then -- what it holds of each bucket, no refund gives back before then (rf, tf)
    st.reserved = true
    if RATE_REQ > 0 and creq > 0 then
      st.rf = math.max(st.rf, start) + creq / RATE_REQ
    end
    if RATE_TOK > 0 and ctok > 0 then
      st.tf = math.max(st.tf, start) + ctok / RATE_TOK
    end
  end
  local data = creq .. ' ' .. ctok .. ' ' .. fmt(start) .. ' ' ..
    snapshot(st.rt, RATE_REQ, BURST_REQ, start) .. ' ' .. snapshot(st.tt, RATE_TOK, BURST_TOK, start) .. ' ' ..
    fmt(st.kr) .. ' ' .. fmt(st.kt) .. ' ' .. fmt(st.cq) .. ' ' .. fmt(st.ct)
  if levels then
    charge_levels(levels, creq, ctok)
    data = data .. level_words(levels)
    WROTE[K_CAPS] = true
  end
  local expiry = start + LEASE_TTL
  if provisional then
    expiry = NOW + CLAIM_WINDOW
    data = data .. ' p'
  end
  redis.call('ZADD', K_LEASES, expiry, id)
  redis.call('HSET', K_DATA, id, data)
  st.la = math.max(st.la, expiry)
  WROTE[K_LEASES], WROTE[K_DATA] = true, true
end

-- Claim a provisional grant: the lease lives a lease TTL from now and stands charged. True if it was one.
local function claim(st, id, held)
  if string.sub(held, -2) ~= ' p' then
    return false
  end
  redis.call('ZADD', K_LEASES, NOW + LEASE_TTL, id)
  st.la = math.max(st.la, NOW + LEASE_TTL)
  redis.call('HSET', K_DATA, id, string.sub(held, 1, -3))
  return true
end

-- Extend a lease Redis holds to a lease TTL from now, claiming it if it was a provisional grant:
-- its new expiry, or nil where Redis does not hold it (extend.lua, rejoin.lua).
local function prolong(st, id)
  local expiry = redis.call('ZSCORE', K_LEASES, id)
  if not expiry then
    return nil
  end
  claim(st, id, redis.call('HGET', K_DATA, id) or '')
  local new_expiry = math.max(tonumber(expiry), NOW + LEASE_TTL)
  redis.call('ZADD', K_LEASES, new_expiry, id)
  st.la = math.max(st.la, new_expiry)
  return new_expiry
end

-- Seconds rounded up to the microsecond (what the state keeps), so that rounding never adds credit.
local function ceil_us(x)
  return math.ceil(x * 1000000 - 0.001) / 1000000
end

-- The TAT of a bucket whose rate changes from r1 to r2, and how far its level drops, such that no
-- credit is invented. Tighter: the debt (what has not refilled yet, in units) stays and takes longer
-- to refill; the level drops by the capacity lost, (r1 - r2) * burst. Looser: the level stays, and
-- the larger capacity fills at the new rate. From no rate (nothing was known): the bucket starts at
-- its capacity less everything granted so far, `charged`, and never below zero (an empty bucket).
-- A burst that changes too (configure.lua: burst2) follows the same rule: the debt stays, and the
-- level never rises: min(level, new capacity - debt).
local function rescale(tat, r1, r2, burst, charged, burst2)
  burst2 = burst2 or burst
  if r2 <= 0 or (r1 == r2 and burst == burst2) then
    return tat, 0
  end
  if r1 <= 0 then
    local capacity = r2 * burst2
    return NOW + ceil_us(math.min(capacity, charged) / r2), 0
  end
  local debt = math.max(0, tat - NOW)
  if burst2 ~= burst then
    local owed = debt * r1
    local before = r1 * burst - owed
    local after = math.min(before, r2 * burst2 - owed)
    return NOW + ceil_us(burst2 - after / r2), before - after
  end
  if r2 < r1 then
    return NOW + ceil_us(debt * r1 / r2), (r1 - r2) * burst
  end
  return NOW + ceil_us(burst - (burst - debt) * r1 / r2), 0
end

-- The tightest learned limits still live, per minute (0: none), over every model. Nothing is live
-- after lu, the end of the last one remembered.
local function live_limits(st)
  if st.lu <= NOW then
    return 0, 0
  end
  local lr, lt = 0, 0
  local all = redis.call('HGETALL', K_LEARNED)
  for i = 2, #all, 2 do
    local e = words(all[i])
    local r, ru, t, tu = tonumber(e[1]), tonumber(e[2]), tonumber(e[3]), tonumber(e[4])
    if r > 0 and ru > NOW and (lr == 0 or r < lr) then
      lr = r
    end
    if t > 0 and tu > NOW and (lt == 0 or t < lt) then
      lt = t
    end
  end
  return lr, lt
end

-- A bucket rescaled while a reservation waits (its floor ahead of now): no refund takes it below its
-- new TAT until then, so a tighter rate keeps the reservation's share whole (a looser one is safe).
local function refloor(st)
  if st.rf > NOW and st.rt > st.rf then
    st.rf, st.reserved = st.rt, true
  end
  if st.tf > NOW and st.tt > st.tf then
    st.tf, st.reserved = st.tt, true
  end
end

-- Put the learned limits lr, lt (per minute, 0: none) in force, rescaling each bucket whose rate
-- changes. A level dropped by a tighter rate counts as a correction (kr, kt), as settle.lua's
-- provider correction requires.
local function relimit(st, lr, lt)
  if lr == st.lr and lt == st.lt then
    return
  end
  local old_req, old_tok = RATE_REQ, RATE_TOK
  st.lr, st.lt = lr, lt
  apply_limits(st)
  local drop
  st.rt, drop = rescale(st.rt, old_req, RATE_REQ, BURST_REQ, st.cq)
  st.kr = st.kr + drop
  st.tt, drop = rescale(st.tt, old_tok, RATE_TOK, BURST_TOK, st.ct)
  st.kt = st.kt + drop
  refloor(st)
end

-- The state, with the learned limits that expired since the last script taken out of force.
local function load_state()
  local v = STATE_V
  local st = {
    rt = tonumber(v[2]) or 0, tt = tonumber(v[3]) or 0, cu = tonumber(v[4]) or 0,
    cl = tonumber(v[5]) or 0, cr = tonumber(v[6]) or 0, seq = tonumber(v[7]) or 0,
    qa = tonumber(v[8]) or 0, kr = tonumber(v[9]) or 0, kt = tonumber(v[10]) or 0,
    cq = tonumber(v[11]) or 0, ct = tonumber(v[12]) or 0,
    lr = tonumber(v[13]) or 0, lt = tonumber(v[14]) or 0, lu = tonumber(v[15]) or 0, pb = tonumber(v[16]) or 0,
    la = tonumber(v[17]) or 0, xa = tonumber(v[18]) or 0, vt = tonumber(v[19]) or 0, ca = tonumber(v[20]) or 0,
    rf = tonumber(v[21]) or 0, tf = tonumber(v[22]) or 0,
  }
  if v[2] and not v[17] then -- a state an older version made, without la: the leases tell it (once)
    st.la = tonumber(redis.call('ZRANGE', K_LEASES, -1, -1, 'WITHSCORES')[2]) or 0
  end
  st.stored = st.lr > 0 or st.lt > 0 or st.lu > 0 or st.pb > 0
  apply_limits(st)
  if SEEN and not v[2] then -- lost, not expired (see the header): empty buckets and a hold
    st.lost = true
    st.rt, st.tt = NOW + BURST_REQ, NOW + BURST_TOK
    st.cu = NOW + RECOVERY_WINDOWS * CLAIM_WINDOW
  end
  if REAPED_REQ > 0 or REAPED_TOK > 0 then -- at the rates they were charged at, before any expiry
    refund(st, REAPED_REQ, REAPED_TOK)
    REAPED_REQ, REAPED_TOK = 0, 0
  end
  relimit(st, live_limits(st))
  return st
end

local function save_state(st)
  redis.call('HSET', K_STATE, 'rt', fmt(st.rt), 'tt', fmt(st.tt), 'cu', fmt(st.cu),
    'cl', st.cl, 'cr', fmt(st.cr), 'seq', st.seq, 'qa', fmt(st.qa), 'kr', fmt(st.kr), 'kt', fmt(st.kt),
    'cq', fmt(st.cq), 'ct', fmt(st.ct), 'la', fmt(st.la), 'cf', CONFIG)
  if st.stored or st.lr > 0 or st.lt > 0 or st.lu > 0 or st.pb > 0 then -- absent reads as 0
    redis.call('HSET', K_STATE, 'lr', fmt(st.lr), 'lt', fmt(st.lt), 'lu', fmt(st.lu), 'pb', st.pb)
  end
  if st.vt > 0 then
    redis.call('HSET', K_STATE, 'vt', fmt(st.vt))
  end
  if st.reserved then
    redis.call('HSET', K_STATE, 'rf', fmt(st.rf), 'tf', fmt(st.tf))
  end
  for name, s in pairs(NODES) do
    if s.dirty then
      if s.rt <= NOW and s.tt <= NOW and s.n <= 0 then
        redis.call('HDEL', K_CAPS, name) -- full and unused: as good as absent
      else
        redis.call('HSET', K_CAPS, name, fmt(s.rt) .. ' ' .. fmt(s.tt) .. ' ' .. s.n)
        st.ca = math.max(st.ca, NOW, s.rt, s.tt)
        WROTE[K_CAPS] = true
      end
    end
  end
  if st.ca > 0 then
    redis.call('HSET', K_STATE, 'ca', fmt(st.ca))
  end
  if st.lost then
    st.lost = false
    redis.call('PUBLISH', CHANNEL, 'l ' .. fmt(NOW))
  end
end

-- Remember the limits the provider reported for one model (per minute; 0 or less: not reported),
-- each for `memory` seconds, relaxing as well as tightening that model's; the rates in force are
-- the configured ones lowered to the tightest live limit of any model. Expired entries are dropped.
local function learn(st, per_min_req, per_min_tok, memory, model)
  if per_min_req <= 0 and per_min_tok <= 0 then
    return
  end
  local e = words(redis.call('HGET', K_LEARNED, model) or '0 0 0 0')
  local until_ = NOW + memory
  if per_min_req > 0 then
    e[1], e[2] = per_min_req, until_
  end
  if per_min_tok > 0 then
    e[3], e[4] = per_min_tok, until_
  end
  WROTE[K_LEARNED] = true
  redis.call('HSET', K_LEARNED, model, fmt(tonumber(e[1])) .. ' ' .. fmt(tonumber(e[2])) .. ' ' ..
    fmt(tonumber(e[3])) .. ' ' .. fmt(tonumber(e[4])))
  local all = redis.call('HGETALL', K_LEARNED)
  for i = 2, #all, 2 do
    local w = words(all[i])
    if tonumber(w[2]) <= NOW and tonumber(w[4]) <= NOW then
      redis.call('HDEL', K_LEARNED, all[i - 1])
    end
  end
  st.lu = math.max(st.lu, until_)
  if st.pb == 1 then
    st.pb = 2
  end
  relimit(st, live_limits(st))
end

-- Leases past their expiry belong to dead holders: they stand charged at their estimate, except
-- provisional grants never claimed (the holder never called the provider): what they were charged
-- is kept in REAPED_REQ / REAPED_TOK and refunded by load_state(), which every script calls after reap().
local function reap()
  local dead = redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', NOW)
  for _, id in ipairs(dead) do
    local held = redis.call('HGET', K_DATA, id)
    local w = words(held or '')
    local back_req, back_tok = 0, 0 -- what it gives back (at the budget through load_state())
    if held and string.sub(held, -2) == ' p' then
      back_req, back_tok = tonumber(w[1]), tonumber(w[2])
      REAPED_REQ, REAPED_TOK = REAPED_REQ + back_req, REAPED_TOK + back_tok
    end
    release_levels(levels_in(w, 10), back_req, back_tok)
    redis.call('ZREM', K_LEASES, id)
    redis.call('HDEL', K_DATA, id)
  end
end

local function ticket(id)
  local t = words(redis.call('HGET', K_TICKETS, id) or '0 0 0 0 -1')
  local out = {creq = tonumber(t[1]), ctok = tonumber(t[2]), alive = tonumber(t[3]), ttl = tonumber(t[4]),
    fit = tonumber(t[5]), overdraft = false}
  for i = 6, #t do
    if t[i] == 'o' then
      out.overdraft = true
    elseif t[i] == 'b' then
      out.book = true
    elseif string.sub(t[i], 1, 2) == 't:' then
      out.tenant = string.sub(t[i], 3)
    elseif string.sub(t[i], 1, 1) == 'v' then
      out.tag = tonumber(string.sub(t[i], 2))
    elseif string.sub(t[i], 1, 1) == 'w' then
      out.inc = tonumber(string.sub(t[i], 2))
    elseif string.sub(t[i], 1, 1) == 'f' then
      out.fin = tonumber(string.sub(t[i], 2))
    end
  end
  out.levels = levels_in(t, 6)
  return out
end

local function save_ticket(st, id, t)
  st.qa = math.max(st.qa, t.alive)
  redis.call('HSET', K_TICKETS, id, t.creq .. ' ' .. t.ctok .. ' ' .. fmt(t.alive) .. ' ' .. fmt(t.ttl) ..
    ' ' .. fmt(t.fit) .. (t.overdraft and ' o' or '') .. (t.book and ' b' or '') ..
    (t.tag and ' v' .. fmt(t.tag) .. ' w' .. fmt(t.inc or 0) .. ' f' .. fmt(t.fin or 0) .. ' t:' ..
    (t.tenant or '') or '') .. level_words(t.levels))
end

-- Fair queuing by tenant (see the header). The tag of a new call of `tenant`: its finish tag, or the
-- virtual time if later; finish tags the virtual time has passed are dropped first (they no longer
-- matter), so the tenants key holds only the tenants that used the budget of late.
local function tenant_tag(st, tenant)
  redis.call('ZREMRANGEBYSCORE', K_TENANTS, '-inf', fmt(st.vt))
  return math.max(st.vt, tonumber(redis.call('ZSCORE', K_TENANTS, tenant)) or 0)
end

-- A call's cost in virtual time: the seconds of its rates it takes, the larger of the two (its
-- dominant share); where no rate sees it, a slot's share of the concurrency (0: none at all).
local function virtual_cost(creq, ctok)
  local c = 0
  if RATE_REQ > 0 then
    c = math.max(c, creq / RATE_REQ)
  end
  if RATE_TOK > 0 then
    c = math.max(c, ctok / RATE_TOK)
  end
  if c == 0 and MAX_CONC > 0 then
    c = 1 / MAX_CONC
  end
  return c
end

-- The tenant's finish tag after a call tagged `tag`, of `cost`, by weight `weight`, granted or queued.
local function queued_tag(tenant, tag, cost, weight)
  redis.call('ZADD', K_TENANTS, fmt(tag + cost / weight), tenant)
  WROTE[K_TENANTS] = true
end

-- A call tagged `tag` is granted at `place`: the virtual time reaches its place.
local function served(st, tenant, tag, cost, weight, place)
  queued_tag(tenant, tag, cost, weight)
  st.vt = math.max(st.vt, place)
end

-- The head waiting for its rates comes back exactly when it fits; any other ticket comes back
-- to renew itself; the head also comes back when the first lease would expire (a provisional grant
-- left unclaimed gives its slot and charge back then, and nothing else would announce it).
local function wait_hint(id)
  local t = ticket(id)
  local head = redis.call('ZRANGE', K_QUEUE, 0, 0)[1]
  local hint = t.ttl / 2
  if (head == id or t.levels) and t.fit > NOW then -- (its caps' fit, told to a ticket they hold)
    hint = t.fit - NOW
  end
  local first = redis.call('ZRANGE', K_LEASES, 0, 0, 'WITHSCORES')[2]
  if head == id and first then
    hint = math.min(hint, tonumber(first) - NOW)
  end
  return math.max(0.001, hint)
end

-- Queued tickets kept alive in one call, by renew.lua and by a settle that carries them (see both):
-- the ticket TTL at ARGV[at], then 1 to MAX_RENEW ticket ids.
local MAX_RENEW = 1000
local function renewal_spec(spec, at)
  spec[#spec + 1] = {'ticket ttl', POSITIVE_SECONDS}
  for _ = at + 1, math.max(at + 1, math.min(#ARGV, at + MAX_RENEW)) do
    spec[#spec + 1] = {'id', TEXT}
  end
  return spec
end

-- Renew the tickets of A[from + 1 ..] for the TTL A[from], appending one status per id to `reply`
-- (renew.lua says what each means). A ticket never lives shorter than it was to (a Celery re-queue
-- parks one for longer).
local function renew_tickets(st, A, from, reply)
  local ttl = A[from]
  local head = redis.call('ZRANGE', K_QUEUE, 0, 0)[1]
  for i = from + 1, #A do
    local id = A[i]
    local status = '-'
    if redis.call('ZSCORE', K_QUEUE, id) then
      local t = ticket(id)
      t.alive = math.max(t.alive, math.max(NOW, t.fit) + ttl)
      save_ticket(st, id, t)
      status = id == head and 'h' .. fmt(wait_hint(id)) or 'q'
    elseif redis.call('HGET', K_DATA, id) then
      status = 'g'
    end
    reply[#reply + 1] = status
  end
end

-- The process an id belongs to: ids are "<process>.<unique>" (an id without a dot is its own).
local function owner_of(id)
  return string.match(id, '^([^.]+)%.') or id
end

-- The channel the process of ticket `id` holds subscribed beside the budget's: "<events channel>:<process>".
local function own_channel(id)
  return CHANNEL .. ':' .. owner_of(id)
end

-- Whether the process of ticket `id` is connected: it holds its own channel, "<events channel>:
-- <process>", subscribed on the connection that hears its notices. A process that dies closes it (a
-- SIGKILL too: the kernel closes its sockets), so a grant to it needs no claim to prove its waiter
-- alive: it is made firm, and its waiter starts on the notice. A process frozen with its connection
-- open holds a firm grant until its lease expires, like a call in flight. Where Redis cannot say (an
-- ACL without PUBSUB, a subscriber on another Cluster node), the grant is provisional, as before.
local function connected(id)
  local r = redis.pcall('PUBSUB', 'NUMSUB', own_channel(id))
  return type(r) == 'table' and (tonumber(r[2]) or 0) > 0
end

-- Where the notices about ticket `id` ("g", "h") are published, `live` being connected(id): the
-- channel of its process, which only that process holds, so that a notice wakes the one process it
-- is for and not every process of the fleet; else the budget's, which every process holds, as the
-- ticket's waiter may then be anywhere (a ticket away with its Celery task, waiting in place in the
-- process the task came back to) or its process subscribed where this node cannot count it (another
-- Cluster node, or an ACL without PUBSUB).
local function inbox(id, live)
  if live then
    return own_channel(id)
  end
  return CHANNEL
end

local function dequeue(id)
  redis.call('ZREM', K_QUEUE, id)
  redis.call('HDEL', K_TICKETS, id)
end

-- A ticket leaves the queue without a grant (cancelled, or its waiter dead): its tenant gets back
-- the turn it was charged when it queued, so that calls given up never push a tenant back (a tenant
-- whose calls time out would otherwise wait longer each time, and time out again).
local function drop(st, id, t)
  -- (a finish tag the virtual time has passed was forgotten, and the tenant starts at vt anyway)
  if t.tag and t.inc and t.fin and t.fin > st.vt then
    local f = tonumber(redis.call('ZSCORE', K_TENANTS, t.tenant))
    if f then
      redis.call('ZADD', K_TENANTS, fmt(f - t.inc), t.tenant)
    end
  end
  dequeue(id)
end

-- The lease that expires first, if it is a grant to a queued ticket not claimed yet: its id and
-- expiry (its slot comes back then, and no other call may come at that time), else nil.
local function unclaimed()
  local first = redis.call('ZRANGE', K_LEASES, 0, 0, 'WITHSCORES')
  local data = first[1] and redis.call('HGET', K_DATA, first[1])
  if data and string.sub(data, -2) == ' p' then
    return first[1], tonumber(first[2])
  end
  return nil
end

-- Tell ticket `id` to come back at `fit` (once per change of that time); it lives until then plus its TTL.
local function announce(st, id, t, fit)
  if math.abs(fit - t.fit) > 0.0000005 then
    t.fit = fit
    t.alive = math.max(t.alive, fit + t.ttl)
    save_ticket(st, id, t)
    redis.call('PUBLISH', inbox(id, connected(id)), 'h ' .. id .. ' ' .. fmt(fit) .. ' ' .. fmt(NOW))
  end
end

-- How far ahead of its fit time a booking ticket at the head is reserved: two refill times of its
-- own cost, at most a second. Any script run in that window (a settle, an arrival, a renewal) books
-- it, so a busy fleet's waiters seldom come back for their grants; the window is short, so a limit
-- learned or a cancel finds at most about two calls reserved that it cannot move or refund whole.
local function horizon(t)
  local h = 0
  if RATE_REQ > 0 then
    h = math.max(h, t.creq / RATE_REQ)
  end
  if RATE_TOK > 0 then
    h = math.max(h, t.ctok / RATE_TOK)
  end
  return math.min(1, 2 * h)
end

-- Serve the queue in order: grant every head that fits now; book a booking head (acquire.lua's
-- book) of a connected process whose fit time is within its horizon(), unless it is the arrival of
-- this very script (which hears its exact wait and comes back then, so that a lone waiter follows a
-- limit learned while it sleeps, and a cancel before its fit time refunds all); tell the first that
-- does not fit when it will (once per change). A ticket not renewed in time belongs to a dead waiter and is dropped.
-- A ticket that only its caps hold back is told when they will fit and passed over, with every later
-- ticket of those caps (`held`), up to MAX_SCAN tickets deep (`rank`: how many were passed over).
-- True and the caps that hold tickets when no ticket waits for the budget itself (none at all, or
-- only tickets that their caps hold), so that an arrival of other caps may go first.
local function advance(st)
  local rank, held = 0, nil
  while true do
    local head = redis.call('ZRANGE', K_QUEUE, rank, rank)[1]
    if not head then
      return true, held
    end
    local t = ticket(head)
    local pass = false
    if held and t.levels then
      for _, l in ipairs(t.levels) do
        pass = pass or held[l.node] == true
      end
    end
    if t.alive < NOW then
      drop(st, head, t)
    elseif pass then
      rank = rank + 1
    elseif not slot_free() then
      -- A provisional grant left unclaimed frees its slot when its claim window ends, and no other
      -- call may come then: the head is told to come back at that time (once per change).
      -- The first waiter of another process than the grant's is told (that process may be dead
      -- with all its tickets; ids are "<process>.<unique>"), among the first 16, else the head.
      local lease, at = unclaimed()
      if lease then
        local target, tk = head, t
        local owner = owner_of(lease)
        if owner_of(head) == owner then
          for _, id in ipairs(redis.call('ZRANGE', K_QUEUE, rank + 1, rank + 15)) do
            if owner_of(id) ~= owner then
              target, tk = id, ticket(id)
              break
            end
          end
        end
        announce(st, target, tk, at)
      end
      return false
    else
      local fit = fit_time(st, t.creq, t.ctok, t.overdraft)
      local lfit, lslot, holders = NOW, true, {}
      if t.levels then
        lfit, lslot = level_fit(t.levels, t.creq, t.ctok, t.overdraft, holders)
      end
      if not lslot or lfit > fit then
        -- its caps hold it (the budget would let it through sooner): pass over it and the later
        -- tickets of the caps that bind it (those without a slot, else those that fit last)
        held = held or {}
        for _, h in ipairs(holders) do
          if (lslot and h.f >= lfit) or (not lslot and h.full) then
            held[h.node] = true
          end
        end
        if lslot then
          announce(st, head, t, lfit)
        else
          -- as for the budget's slot: a provisional grant left unclaimed frees its slot when its
          -- claim window ends, and no other call may come then (once per change)
          local lease, at = unclaimed()
          if lease then
            announce(st, head, t, at)
          end
        end
        rank = rank + 1
      elseif fit <= NOW then
        dequeue(head)
        local firm = connected(head) -- ("g <id> <now> f": no claim; "g <id> <now>": claim it)
        grant(st, head, t.creq, t.ctok, t.fit, not firm, t.overdraft, t.levels)
        GRANTED[head] = true
        if t.tag then
          st.vt = math.max(st.vt, t.tag)
        end
        redis.call('PUBLISH', inbox(head, firm), 'g ' .. head .. ' ' .. fmt(NOW) .. (firm and ' f' or ''))
      elseif t.book and head ~= ARRIVING and not t.levels and fit > st.cu and fit - NOW <= horizon(t)
          and connected(head) then
        -- Booked: reserved now for its fit time, firm, so that its waiter starts then without coming
        -- back ("g <id> <now> f <start>"; see acquire.lua's reserve)
        dequeue(head)
        grant(st, head, t.creq, t.ctok, t.fit, false, t.overdraft, nil, fit)
        GRANTED[head] = true
        if t.tag then
          st.vt = math.max(st.vt, t.tag)
        end
        redis.call('PUBLISH', inbox(head, true), 'g ' .. head .. ' ' .. fmt(NOW) .. ' f ' .. fmt(fit))
      else
        announce(st, head, t, fit)
        -- A head whose process died never comes back for its grant, and no other call may come:
        -- the first waiter of another process is told to come back a claim window after that fit
        -- time (a live head is served by then, and the waiter told its own time instead).
        local owner = owner_of(head)
        for _, id in ipairs(redis.call('ZRANGE', K_QUEUE, rank + 1, rank + 15)) do
          if owner_of(id) ~= owner then
            announce(st, id, ticket(id), fit + CLAIM_WINDOW)
            break
          end
        end
        return false
      end
    end
    if rank >= MAX_SCAN then
      return false
    end
  end
end

-- Keys live as long as they still remember something that matters, plus the idle grace, and all
-- expire at one time, `xa`. That time moves only when the horizon passes it, and then half an idle
-- grace further, so that most calls set no expiry but on the keys they may have made (WROTE).
-- touch() runs after save_state(), last: it writes `xa` itself when it moves.
local function touch(st)
  local horizon = math.max(NOW, st.rt, st.tt, st.cu, st.cr, st.lu, st.qa, st.la, st.ca)
  -- capped, so that the time stays exact even for a debt of centuries (a rate of 1e-6 owed 1e15)
  local due = math.ceil((NOW + math.min(horizon - NOW, 1e11) + IDLE_GRACE) * 1000)
  local keys = {K_STATE, K_LEASES, K_DATA, K_QUEUE, K_TICKETS, K_LEARNED, K_TENANTS}
  if st.ca > 0 then -- (a budget that never had caps sets no expiry on their key)
    keys[8] = K_CAPS
  end
  if due > st.xa then
    st.xa = due + math.ceil(IDLE_GRACE * 500)
    redis.call('HSET', K_STATE, 'xa', string.format('%.0f', st.xa))
  else
    local made = {}
    for _, k in ipairs(keys) do
      if WROTE[k] then
        made[#made + 1] = k
      end
    end
    keys = made
  end
  -- PEXPIREAT: the same millisecond for every key, whichever call set it (a PEXPIRE counts from
  -- each command's own time)
  local at = string.format('%.0f', st.xa)
  for _, k in ipairs(keys) do
    redis.call('PEXPIREAT', k, at)
  end
end
