-- Token bucket per principal, shared by every api process. KEYS: 1 bucket.
-- ARGV: 1 rate/s, 2 burst, 3 cost (needed now), 4 want (a lease: cost plus tokens to keep).
-- Returns the tokens granted (>= cost, <= want), or -(milliseconds until `cost` is available).
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local cost, want = tonumber(ARGV[3]), tonumber(ARGV[4])
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call("HMGET", KEYS[1], "tokens", "at")
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + (now - at) * rate / 1000)
if tokens < cost then
  return -math.ceil((cost - tokens) * 1000 / rate)
end
local grant = math.max(cost, math.min(want, math.floor(tokens)))
redis.call("HSET", KEYS[1], "tokens", tokens - grant, "at", now)
redis.call("PEXPIRE", KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return grant
