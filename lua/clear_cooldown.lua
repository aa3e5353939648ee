-- clear_cooldown.lua: end the fleet-wide pause now (an operator, or a caller who knows the provider is back).
--
-- KEYS and ARGV[1..11]: the budget block described in _prelude.lua. No operation arguments.
--
-- The pause ends now; the backoff level and the quiet period are reset, so the next 429 counts as a
-- first one (the provider's retry-after, or `base`), not as a repeat of the episode just ended. The
-- buckets are left as they are: the 429 that began the pause emptied them, so dispatch resumes
-- paced (what has refilled, then the rate), not as a herd. The head of the queue is granted if it
-- fits now, else told its new fit time (advance()). Clearing a budget with no pause changes nothing
-- but the backoff level.
--
-- Reply: {"cleared", until (Redis time: the end the pause had, or 0 if there was none), now,
--         backoff level it had}
-- Also published on the events channel as "c <now> <now>": a pause that ends now.
reap()
local st = load_state()
local was_until, was_level = st.cu, st.cl
if st.cu > NOW then
  st.cu = NOW
end
if st.cr > NOW then
  st.cr = NOW
end
st.cl = 0
advance(st)
save_state(st)
touch(st)
redis.call('PUBLISH', CHANNEL, 'c ' .. fmt(NOW) .. ' ' .. fmt(NOW))
return {'cleared', fmt(was_until), fmt(NOW), tostring(was_level)}
