-- configure.lua: change the limits of a budget live, for the whole fleet: this call's budget block
-- replaces the limits stored in the state (`cf`, see _prelude.lua).
--
-- KEYS and ARGV[1..11]: the budget block described in _prelude.lua, with the new limits.
-- No operation arguments.
--
-- The one script that does not refuse a call whose limits differ from the stored ones: it stores
-- them instead, and every later call with the old limits is refused ("XFLOW_CONFLICT"). Each bucket
-- is rescaled from the rate and burst in force under the old limits to those under the new ones
-- (a learned limit still lowers both) without inventing credit: the debt stays, the level never
-- rises (rescale() in _prelude.lua); a level that drops counts as a correction (kr, kt) as for a
-- learned limit. Leases keep their expiry, a new lease TTL and claim window apply to later grants,
-- and the queue is served at once (advance()): a looser limit grants its head now, a tighter one
-- tells it its new fit time. On a budget without keys the limits are simply stored.
--
-- Reply: {"configured" | "unchanged", now, previous limits ("": none stored)}, the limits as the
-- state keeps them: seven numbers in the order of the block (ARGV[1..6], ARGV[9]).
-- A bad argument: an error reply (XFLOW_BADARG; see _prelude.lua), nothing changed.
local _, REFUSED = checked(12, {})
if REFUSED then
  return redis.error_reply(REFUSED)
end

local previous = STORED or ''
local old = {}
for i, w in ipairs(words(previous)) do
  old[i] = tonumber(w)
end

reap()
local st = load_state()
if previous ~= CONFIG and #old == 7 then
  local drop
  st.rt, drop = rescale(st.rt, effective(old[1], st.lr), RATE_REQ, old[2], st.cq, BURST_REQ)
  st.kr = st.kr + drop
  st.tt, drop = rescale(st.tt, effective(old[3], st.lt), RATE_TOK, old[4], st.ct, BURST_TOK)
  st.kt = st.kt + drop
  refloor(st)
end
advance(st)
save_state(st)
touch(st)
return {previous == CONFIG and 'unchanged' or 'configured', fmt(NOW), previous}
