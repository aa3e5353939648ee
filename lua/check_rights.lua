-- check_rights.lua: may the user of this connection run everything a limiter sends? Reads and writes
-- nothing, so that a missing right is found before the first operation, not halfway through one
-- (Redis does not roll back a script that an ACL refusal stops after it wrote). Standalone: the
-- prelude is not prepended.
--
-- KEYS     the budget's keys, as every operation passes them: running this script at all proves
--          EVALSHA on them, and a Cluster runs it on their shard. The checks only name them.
-- ARGV     checks, one after another, each "<n>" then n words: a command and its arguments as an
--          operation (or the client, for SCRIPT LOAD, SUBSCRIBE, PING) sends them
--
-- Each check asks redis.acl_check_cmd (Redis 7.0 and later), which tests the command, its keys
-- and its channels against the caller's ACL, as the call itself would be tested.
-- Reply: {"unchecked"} where the server has no redis.acl_check_cmd; else {"checked", i...}: the
-- 1-based numbers of the checks refused, none when everything is allowed.
if not redis.acl_check_cmd then
  return {'unchecked'}
end
local reply = {'checked'}
local i, n = 1, 0
while i <= #ARGV do
  n = n + 1
  local size = tonumber(ARGV[i])
  if not redis.acl_check_cmd(unpack(ARGV, i + 1, i + size)) then
    reply[#reply + 1] = tostring(n)
  end
  i = i + 1 + size
end
return reply
