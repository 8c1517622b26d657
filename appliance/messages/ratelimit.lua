-- Token bucket per principal. KEYS: 1 bucket. ARGV: 1 rate/s, 2 burst, 3 cost.
-- Returns 0 when allowed, else the milliseconds until `cost` tokens are available.
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call("HMGET", KEYS[1], "tokens", "at")
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + (now - at) * rate / 1000)
if tokens < cost then
  return math.ceil((cost - tokens) * 1000 / rate)
end
redis.call("HSET", KEYS[1], "tokens", tokens - cost, "at", now)
redis.call("PEXPIRE", KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return 0
