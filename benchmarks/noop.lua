-- noop.lua: the floor for benchmarks/throughput.py. Called with exactly the KEYS (6) and ARGV (18)
-- of acquire.lua, it reads the Redis clock as every real operation does, touches no key, and
-- returns a reply of the same shape as acquire's grant: {"granted", start, now, expiry}.
local clock = redis.call('TIME')
local now = string.format('%.6f', tonumber(clock[1]) + tonumber(clock[2]) / 1000000)
return {'granted', now, now, now}
