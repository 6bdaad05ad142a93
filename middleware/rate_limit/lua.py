"""The one Lua script of the Redis backend: bucket.py's math, run atomically inside Redis.

KEYS[1]  the (scope, model) hash: r (requests), t (tokens), u (last update, seconds)
KEYS[2]  the in-flight sorted set of the key: member → lease expiry (seconds)
Both carry the same ``{scope}`` hash tag, so one call touches one Redis Cluster slot.

ARGV  1 op: "take" (admit a request) or "give" (only give back, settle, top up)
      2 requests per minute (0: not limited)   3 requests capacity
      4 tokens per minute (0: none)             5 tokens capacity
      6 max in flight (0: none)                 7 in-flight lease seconds
      8 now in seconds ("" = the Redis server's TIME, the one clock all sidecars share)
      9 take: tokens to reserve for the request
     10 requests given back   11 tokens given back (negative: charged, a settlement's debt)
     12 requests wanted ahead 13 tokens wanted ahead (what this sidecar may admit by itself later)
     14 take: the in-flight member the request registers ("": it holds a slot already, or none)
     15… in-flight members freed (any number)
The first seven are constant per bucket, so the sidecar encodes them once (redis_backend.py).

Whatever is given back is added first (a refund never fills a bucket past its capacity; a charge
may take it below zero). A take is then admitted or refused exactly as bucket.admit decides; only
when admitted (and on a give) are requests and tokens handed out ahead, and never more than
SHARE of what the bucket still holds: near its limit a bucket hands out nothing ahead, so every
request comes here and the fleet stays exact; far from it, sidecars admit by themselves and come
back once per lease (redis_backend.py).

The answer is one string of nine big-endian 64-bit integers (Redis' struct library; REPLY):
reason, requests-remaining, requests-reset-ms, tokens-remaining, tokens-reset-ms, wait-ms, requests
handed out, tokens handed out, and the in-flight slots the key has registered (0 without max in
flight: a sidecar keeps freed slots for reuse only far from the limit, allowance.Slots). Reason 0
admitted (or a give), 1 requests, 2 tokens, 3 in flight, 4 too large (wait -1: never). Numbers are
stored with explicit formats (Redis would keep 14 digits).
"""

from __future__ import annotations

import hashlib
import struct
from typing import Final

SHARE: Final = 0.125  # at most this share of what a bucket holds is handed out ahead per call

SCRIPT: Final = """
local now
if ARGV[8] ~= '' then
  now = tonumber(ARGV[8])
else
  local clock = redis.call('TIME')
  now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
end
local rlim, rcap = tonumber(ARGV[2]), tonumber(ARGV[3])
local tlim, tcap = tonumber(ARGV[4]), tonumber(ARGV[5])
local rrate, trate = rlim / 60, tlim / 60
local max_in_flight, lease, amount = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[9])

local state = redis.call('HMGET', KEYS[1], 'r', 't', 'u')
local r = tonumber(state[1]) or rcap
local t = tonumber(state[2]) or tcap
local u = tonumber(state[3]) or now
local elapsed = now - u
if elapsed < 0 then elapsed = 0 else u = now end
-- refill, then what is given back (a charge must not vanish into a refill past capacity)
if rlim > 0 then r = math.min(rcap, math.min(rcap, r + elapsed * rrate) + tonumber(ARGV[10])) end
if tlim > 0 then t = math.min(tcap, math.min(tcap, t + elapsed * trate) + tonumber(ARGV[11])) end
if #ARGV >= 15 then redis.call('ZREM', KEYS[2], unpack(ARGV, 15, #ARGV)) end

local reason, wait = 0, 0
if ARGV[1] == 'take' then
  if tlim > 0 and amount > tcap then
    reason, wait = 4, -1
  else
    if rlim > 0 and r < 1 then reason, wait = 1, (1 - r) / rrate end
    if tlim > 0 and t < amount then
      local tokens_wait = (amount - t) / trate
      if tokens_wait > wait then reason, wait = 2, tokens_wait end
    end
    if reason == 0 and max_in_flight > 0 and ARGV[14] ~= '' then
      redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', string.format('%.6f', now))
      if redis.call('ZCARD', KEYS[2]) >= max_in_flight then reason = 3 end
    end
  end
  if reason == 0 then
    if rlim > 0 then r = r - 1 end
    if tlim > 0 then t = t - amount end
    if max_in_flight > 0 and ARGV[14] ~= '' then
      redis.call('ZADD', KEYS[2], string.format('%.6f', now + lease), ARGV[14])
      redis.call('EXPIRE', KEYS[2], math.ceil(lease) + 1)
    end
  end
end
local gr, gt = 0, 0
if reason == 0 then
  if rlim > 0 then
    gr = math.max(0, math.min(tonumber(ARGV[12]), math.floor(r * SHARE)))
    r = r - gr
  end
  if tlim > 0 then
    gt = math.max(0, math.min(tonumber(ARGV[13]), math.floor(t * SHARE)))
    t = t - gt
  end
end

redis.call('HSET', KEYS[1], 'r', string.format('%.17g', r), 't', string.format('%.17g', t),
           'u', string.format('%.6f', u))
local rreset, treset = 0, 0
if rlim > 0 then rreset = (rcap - r) / rrate end
if tlim > 0 then treset = (tcap - t) / trate end
-- A missing state is a full one: forget this one once it would be full again.
local skew = 0
if u > now then skew = u - now end
redis.call('PEXPIRE', KEYS[1], math.ceil((math.max(rreset, treset) + skew) * 1000) + 1000)
local wait_ms = -1
if wait >= 0 then wait_ms = math.ceil(wait * 1000) end
local held = 0
if max_in_flight > 0 then held = redis.call('ZCARD', KEYS[2]) end
return struct.pack('>i8i8i8i8i8i8i8i8i8', reason, math.max(0, math.floor(r)), math.ceil(rreset * 1000),
                   math.max(0, math.floor(t)), math.ceil(treset * 1000), wait_ms, gr, gt, held)
""".replace("SHARE", repr(SHARE))

SHA: Final = hashlib.sha1(SCRIPT.encode()).hexdigest()
REPLY: Final = struct.Struct(">9q")  # every call's answer
