-- _prelude.lua: shared by every xflow-dist script and prepended to each at load time, so that
-- every operation reads the budget, its clock and its keys the same way. Not a script by itself.
--
-- One budget named N lives in five keys, all tagged {xflow:N} so they share one Cluster slot:
--   KEYS[1] state     HASH  rt, tt  theoretical arrival time (TAT) of the request and token buckets,
--                                   seconds of Redis time; the bucket is full when TAT <= now
--                           cu      cooldown deadline, seconds of Redis time
--                           cl      cooldown backoff level (0 = first 429 of a quiet period)
--                           cr      when the backoff level resets (end of the quiet period)
--                           seq     last ticket sequence number handed to the waiting queue
--   KEYS[2] leases    ZSET  lease id -> expiry (seconds of Redis time)
--   KEYS[3] lease_data HASH lease id -> "<requests> <tokens> <start>": what the lease was charged
--   KEYS[4] queue     ZSET  ticket id -> sequence number: FIFO of acquirers waiting for a slot
--   KEYS[5] tickets   HASH  ticket id -> "<requests> <tokens> <alive until>"
--
-- Every script starts with the same budget block:
--   ARGV[1] request rate, requests per second (0: no request limit)
--   ARGV[2] request burst, seconds of credit
--   ARGV[3] token rate, tokens per second (0: no token limit)
--   ARGV[4] token burst, seconds of credit
--   ARGV[5] max concurrency, leases (0: no concurrency limit)
--   ARGV[6] lease time to live, seconds
--   ARGV[7] idle grace, seconds the keys outlive the last thing they still have to remember
--   ARGV[8] events channel: grants to queued tickets and cooldowns are published there
-- Operation arguments follow from ARGV[9].
--
-- A bucket of rate r and burst b (capacity C = r * b) is kept as one number, its TAT: the level
-- at time t is C - r * max(0, TAT - t). A cost c starts once the bucket holds min(c, C) (all of it,
-- or a full bucket when c is more than the burst credit) and is charged at its start, so the
-- level may go below zero: that debt is what later arrivals wait out, first come first served.

local K_STATE, K_LEASES, K_DATA, K_QUEUE, K_TICKETS = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local RATE_REQ = tonumber(ARGV[1])
local BURST_REQ = tonumber(ARGV[2])
local RATE_TOK = tonumber(ARGV[3])
local BURST_TOK = tonumber(ARGV[4])
local MAX_CONC = tonumber(ARGV[5])
local LEASE_TTL = tonumber(ARGV[6])
local IDLE_GRACE = tonumber(ARGV[7])
local CHANNEL = ARGV[8]

local clock = redis.call('TIME')
local NOW = tonumber(clock[1]) + tonumber(clock[2]) / 1000000

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

local function load_state()
  local v = redis.call('HMGET', K_STATE, 'rt', 'tt', 'cu', 'cl', 'cr', 'seq')
  return {
    rt = tonumber(v[1]) or 0, tt = tonumber(v[2]) or 0, cu = tonumber(v[3]) or 0,
    cl = tonumber(v[4]) or 0, cr = tonumber(v[5]) or 0, seq = tonumber(v[6]) or 0,
  }
end

local function save_state(st)
  redis.call('HSET', K_STATE, 'rt', fmt(st.rt), 'tt', fmt(st.tt), 'cu', fmt(st.cu),
    'cl', st.cl, 'cr', fmt(st.cr), 'seq', st.seq)
end

-- Earliest time a cost fits one bucket (see the header): wait for min(cost, capacity).
local function dim_start(tat, cost, rate, burst)
  if rate <= 0 or cost <= 0 then
    return NOW
  end
  local slack = burst - cost / rate
  if slack < 0 then
    slack = 0
  end
  return math.max(NOW, tat - slack)
end

local function joint_start(st, creq, ctok)
  return math.max(NOW, st.cu, dim_start(st.rt, creq, RATE_REQ, BURST_REQ),
    dim_start(st.tt, ctok, RATE_TOK, BURST_TOK))
end

-- Charge every dimension at the one joint start s: all limits or none.
local function charge(st, s, creq, ctok)
  if RATE_REQ > 0 then
    st.rt = math.max(st.rt, s) + creq / RATE_REQ
  end
  if RATE_TOK > 0 then
    st.tt = math.max(st.tt, s) + ctok / RATE_TOK
  end
end

-- Give credit back; a TAT never goes below now, so a refund never lifts a bucket above capacity.
local function refund(st, creq, ctok)
  if RATE_REQ > 0 and st.rt > NOW then
    st.rt = math.max(NOW, st.rt - creq / RATE_REQ)
  end
  if RATE_TOK > 0 and st.tt > NOW then
    st.tt = math.max(NOW, st.tt - ctok / RATE_TOK)
  end
end

local function grant(id, s, creq, ctok)
  redis.call('ZADD', K_LEASES, s + LEASE_TTL, id)
  redis.call('HSET', K_DATA, id, creq .. ' ' .. ctok .. ' ' .. fmt(s))
end

-- Leases past their expiry belong to dead holders: they stand charged at their estimate.
local function reap()
  local dead = redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', NOW)
  for _, id in ipairs(dead) do
    redis.call('ZREM', K_LEASES, id)
    redis.call('HDEL', K_DATA, id)
  end
end

-- Free slots go to the head of the queue, in order; each grant is reserved and published.
local function hand_over(st)
  while MAX_CONC <= 0 or redis.call('ZCARD', K_LEASES) < MAX_CONC do
    local head = redis.call('ZRANGE', K_QUEUE, 0, 0)[1]
    if not head then
      return
    end
    local t = words(redis.call('HGET', K_TICKETS, head) or '0 0 0')
    redis.call('ZREM', K_QUEUE, head)
    redis.call('HDEL', K_TICKETS, head)
    if tonumber(t[3]) >= NOW then
      local creq, ctok = tonumber(t[1]), tonumber(t[2])
      local s = joint_start(st, creq, ctok)
      charge(st, s, creq, ctok)
      grant(head, s, creq, ctok)
      redis.call('PUBLISH', CHANNEL, 'g ' .. head .. ' ' .. fmt(s) .. ' ' .. fmt(NOW))
    end
  end
end

-- Keys live as long as they still remember something that matters, plus a grace period.
local function touch(st)
  local horizon = math.max(NOW, st.rt, st.tt, st.cu, st.cr)
  local last = redis.call('ZRANGE', K_LEASES, -1, -1, 'WITHSCORES')[2]
  if last then
    horizon = math.max(horizon, tonumber(last))
  end
  local ms = math.ceil((horizon - NOW + IDLE_GRACE) * 1000)
  if redis.call('ZCARD', K_QUEUE) > 0 then
    ms = math.max(ms, math.ceil((LEASE_TTL + IDLE_GRACE) * 1000))
  end
  for _, k in ipairs({K_STATE, K_LEASES, K_DATA, K_QUEUE, K_TICKETS}) do
    redis.call('PEXPIRE', k, ms)
  end
end

-- Seconds until the earliest lease would expire: when a waiter must look again for a dead holder.
local function next_expiry()
  local first = redis.call('ZRANGE', K_LEASES, 0, 0, 'WITHSCORES')[2]
  if first then
    return math.max(0, tonumber(first) - NOW)
  end
  return LEASE_TTL
end
