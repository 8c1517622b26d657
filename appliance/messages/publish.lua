-- One publish (one message or a batch), atomically, in one round trip.
-- KEYS: 1 seq counter, 2 tail stream, 3 shard ingest stream, 4 idempotency key (or a dummy)
-- ARGV: 1 conversation, 2 channel, 3 count n, 4 idempotency hash ("" = none), 5 idempotency ttl ms,
--       6 acks meta (stored for replays), 7 the highest seq indexed in PostgreSQL (-1: not
--       looked up), then per message i: head, rest, reply_to (0 = none)
-- Returns {"ok", first_seq} | {"dup", stored} | {"conflict"} | {"reply_to", i, current} | {"seed"}
local seq_key, tail, ingest, idem = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local conversation, channel, n = ARGV[1], ARGV[2], tonumber(ARGV[3])
local idem_hash = ARGV[4]

if idem_hash ~= "" then
  local stored = redis.call("GET", idem)
  if stored then
    if string.sub(stored, 1, 64) == idem_hash then return {"dup", stored} end
    return {"conflict"}
  end
end

-- The counter is missing after a Redis restart or eviction: re-seed it from the tail's last
-- generated id (tail ids are "<seq>-0"; it outlives trimming, unlike the newest entry) and
-- the highest seq indexed in PostgreSQL (what was flushed before Redis lost its data), so a
-- seq is never handed out twice and every XADD below is above the stream's top. Without a
-- tail the caller must look the indexed seq up first ({"seed"}; a new conversation too).
-- Every check comes before the first write: a refused publish changes nothing.
local current = tonumber(redis.call("GET", seq_key) or "-1")
local seeded = current >= 0
if not seeded then
  local durable = tonumber(ARGV[7])
  current = 0
  if redis.call("EXISTS", tail) == 1 then
    local info = redis.call("XINFO", "STREAM", tail)
    for i = 1, #info, 2 do
      if info[i] == "last-generated-id" then
        current = tonumber(string.match(info[i + 1], "^(%d+)"))
      end
    end
  elseif durable < 0 then
    return {"seed"}
  end
  if durable > current then current = durable end
end

for i = 1, n do
  local reply_to = tonumber(ARGV[7 + 3 * i])
  if reply_to > current + i - 1 then return {"reply_to", i, current + i - 1} end
end

if not seeded then redis.call("SET", seq_key, current) end

local first = redis.call("INCRBY", seq_key, n) - n + 1
for i = 1, n do
  local seq = first + i - 1
  local message = ARGV[5 + 3 * i] .. seq .. ARGV[6 + 3 * i]
  redis.call("XADD", tail, seq .. "-0", "m", message)
  redis.call("XADD", ingest, "*", "c", conversation, "s", seq, "m", message)
  redis.call("PUBLISH", channel, '{"event":"message","message":' .. message .. "}")
end

if idem_hash ~= "" then
  redis.call("SET", idem, idem_hash .. first .. "\n" .. ARGV[6], "PX", ARGV[5])
end
return {"ok", first}
