-- elbasy quota in Redis: the arithmetic of elbasy/quota.py's LocalStore (as
-- ext/c/elbasy_shm.h has it in C), one step per script call. This prelude is
-- put in front of every step script (elbasy/redis_store.py joins them).
--
-- Wire format (elbasy/redis_store.py writes and reads it):
--   ARGV[1]  little-endian doubles: the header, then each limit's numbers
--            (elbasy.quota.derived), then the step's own numbers
--   header   clock (1: the server's TIME, 0: the caller's now), the caller's
--            now, the idle grace (s), the queued grace (s), n (limits)
--   limit    kind (0 bucket, 1 window, 2 rolling), span, interval, room,
--            quota, period, guard, capacity
--   reply    one bulk string of little-endian doubles, the step's clock first
--   KEYS     one per limit: its bucket's record (one hash tag per account)
--
-- A record is one string of little-endian doubles:
--   bucket   kind, blocked, sent, interval, queued, enq, deq, flying
--            (flying: units sent whose answer has not come; a record
--            written before it existed reads as 0)
--   window   kind, blocked, live, then 13 x (tag, reserved, departed, extra)
-- A missing record is a fresh bucket (every number 0), which is what an
-- expired one was: keys expire once their bucket is idle (see ttl_of).

local EPS = 1e-9      -- elbasy.quota._EPS
local ROUNDS = 32     -- elbasy.quota._ROUNDS
local WS = 13         -- elbasy.quota.WINDOW_SLOTS
local BUCKET = 0
local WINDOW = 1
local MAX_TTL = 2592000000  -- ms: thirty days, the longest a record is kept idle

local floor = math.floor
local spack = struct.pack
local sunpack = struct.unpack
local srep = string.rep

-- Python's max() and min() of two floats: the first one on a tie
local function max(a, b) if b > a then return b end return a end
local function min(a, b) if b < a then return b end return a end

local A = {sunpack('<' .. srep('d', #ARGV[1] / 8), ARGV[1])}
local at = 1
local function arg()
  local v = A[at]
  at = at + 1
  return v
end

local now
local clock_mode = arg()
local caller_now = arg()
if clock_mode == 1 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
else
  now = caller_now
end
local idle_grace = arg()
local queued_grace = arg()
local n = arg()

local L = {}
for k = 1, n do
  L[k] = {kind = arg(), span = arg(), interval = arg(), room = arg(), quota = arg(),
          period = arg(), guard = arg(), capacity = arg()}
end
local function args(count)
  local out = {}
  for k = 1, count do out[k] = arg() end
  return out
end

-- ------------------------------------------------------------------ records

local recs = {}   -- key -> record, each loaded once per step
local order = {}  -- keys in the order loaded

local function fresh(kind)
  local r = {kind = kind, blocked = 0.0, dirty = false}
  if kind == BUCKET then
    r.sent, r.interval, r.queued, r.enq, r.deq, r.flying = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
  else
    r.live = 0.0
    r.tag, r.res, r.dep, r.ext = {}, {}, {}, {}
    for x = 1, WS do r.tag[x], r.res[x], r.dep[x], r.ext[x] = 0, 0.0, 0.0, 0.0 end
  end
  return r
end

local function decode(raw, kind)
  if not raw then return fresh(kind), false end
  local v = {sunpack('<' .. srep('d', #raw / 8), raw)}
  if v[1] ~= kind then return fresh(kind), false end  -- a limit that changed its kind
  local r = {kind = kind, blocked = v[2], dirty = false}
  if kind == BUCKET then
    r.sent, r.interval, r.queued, r.enq, r.deq = v[3], v[4], v[5], v[6], v[7]
    r.flying = v[8] or 0.0
  else
    r.live = v[3]
    r.tag, r.res, r.dep, r.ext = {}, {}, {}, {}
    for x = 1, WS do
      local b = 4 * x
      r.tag[x], r.res[x], r.dep[x], r.ext[x] = v[b], v[b + 1], v[b + 2], v[b + 3]
    end
  end
  return r, true
end

-- The record of KEYS[k] for limit k, rescaled to the limit's interval as
-- LocalStore._state does. only_found: nil when there is none (give back,
-- settle: a missing bucket is an idle one, nothing to take from it).
local function load(k, only_found)
  local key = KEYS[k]
  local l = L[k]
  local r = recs[key]
  if r == nil then
    local existed
    r, existed = decode(redis.call('GET', key), l.kind)
    if only_found and not existed then return nil end
    recs[key] = r
    order[#order + 1] = key
  end
  if l.kind == BUCKET and r.interval ~= l.interval then
    -- a plan learned (or changed): the bucket keeps its level in units
    if r.interval ~= 0 then
      r.sent = now + max(0.0, r.sent - now) * (l.interval / r.interval)
      r.dirty = true
    end
    r.interval = l.interval
  end
  return r
end

-- Milliseconds a record is kept: until it is a fresh bucket's equal again
-- (nothing queued, its clocks and any block in the past), plus the idle
-- grace. Units still queued keep it the queued grace longer (the longest a
-- reservation waits): their owner may be gone (another machine that died),
-- and expiring is what finally drops them.
local function ttl_of(r)
  local untl
  if r.kind == BUCKET then
    untl = max(r.sent, r.blocked)
    if r.queued + r.flying > EPS then
      -- units queued or in flight keep it the queued grace longer: their
      -- owner may be a machine that died, and expiring drops them
      untl = max(untl, max(r.sent, now) + (r.flying + r.queued) * r.interval + queued_grace)
    end
  else
    untl = max(r.live, r.blocked)
  end
  local ms = math.ceil((max(untl, now) - now + idle_grace) * 1000)
  if ms < 1 then ms = 1 end
  if ms > MAX_TTL then ms = MAX_TTL end
  return ms
end

local function encode(r)
  if r.kind == BUCKET then
    return spack('<dddddddd', r.kind, r.blocked, r.sent, r.interval, r.queued, r.enq, r.deq,
                 r.flying)
  end
  local v = {r.kind, r.blocked, r.live}
  for x = 1, WS do
    local b = 4 * x
    v[b], v[b + 1], v[b + 2], v[b + 3] = r.tag[x], r.res[x], r.dep[x], r.ext[x]
  end
  return spack('<' .. srep('d', #v), unpack(v))
end

-- Write back every record the step changed, each with its expiry.
local function save()
  for _, key in ipairs(order) do
    local r = recs[key]
    if r.dirty then
      redis.call('SET', key, encode(r), 'PX', string.format('%d', ttl_of(r)))
    end
  end
end

local function reply(values)
  return spack('<' .. srep('d', #values), unpack(values))
end

-- ------------------------------------------------------------------ windows

local function slot_of(t, period) return floor(t / period + EPS) end
local function place(j) return j % WS + 1 end

local function wheld(r, x) return r.res[x] > 0 or r.dep[x] > 0 or r.ext[x] > 0 end

-- what window j counts: booked (reserved + outside) or seen (departed + outside)
local function wcount(r, j, seen)
  local x = place(j)
  if r.tag[x] ~= j then return 0.0 end
  if seen then return r.dep[x] + r.ext[x] end
  return r.res[x] + r.ext[x]
end

-- may window s hold counts (elbasy.quota._claimable)?
local function claimable(r, l, s)
  local x = place(s)
  return r.tag[x] == s or not (r.tag[x] >= slot_of(now, l.period) - l.span + 1 and wheld(r, x))
end

-- window s's place, taken for it (elbasy.quota._claim), or nil
local function claim(r, l, s)
  if not claimable(r, l, s) then return nil end
  local x = place(s)
  if r.tag[x] ~= s then
    r.tag[x], r.res[x], r.dep[x], r.ext[x] = s, 0.0, 0.0, 0.0
  end
  local live = (s + l.span) * l.period
  if live > r.live then r.live = live end
  r.dirty = true
  return x
end

-- elbasy.quota._take on the reserved count of window j
local function wtake(r, j, units)
  local x = place(j)
  if r.tag[x] ~= j then return end
  local left = r.res[x] - units
  if left > EPS then r.res[x] = left else r.res[x] = 0.0 end
  r.dirty = true
end

-- LocalStore._window_earliest: (time, found) for cost more units from t
local function window_earliest(r, l, cost, t, seen)
  local period = l.period
  local room = l.quota - min(cost, l.quota)
  local span = l.span
  local last = nil
  for x = 1, WS do
    if wheld(r, x) and (last == nil or r.tag[x] > last) then last = r.tag[x] end
  end
  for _ = 1, WS do
    local i = slot_of(t, period)
    if l.guard ~= 0 and t > (i + 1) * period - l.guard then
      t = (i + 1) * period
    else
      local hi = i
      if last ~= nil then hi = max(i, min(last, i + span - 1)) end
      local ok = claimable(r, l, i)
      local k = i
      while ok and k <= hi do
        local sum = 0.0
        for j = k - span + 1, k do sum = sum + wcount(r, j, seen) end
        if not (sum <= room + EPS) then ok = false end
        k = k + 1
      end
      if ok then return t, true end
      t = (i + 1) * period
    end
  end
  return t, false
end

-- ------------------------------------------------------------------ the line

-- LocalStore._earliest over records R: units/pos nil for a newcomer (behind
-- everything queued), else for a reservation heading its line. Returns
-- (time, index of the limit that set it from 0, found).
local function earliest_in(R, cost, units, pos)
  local t = now
  local which = 0
  for _ = 1, ROUNDS do
    local moved = false
    for k = 1, n do
      local r, l = R[k], L[k]
      local start = max(t, r.blocked)
      local e
      if l.kind == BUCKET then
        local clock
        if pos == nil then
          clock = max(r.sent, now) + (r.flying + r.queued) * r.interval
        else
          local ahead = max(0.0, min(pos[k] - r.deq, r.queued - units[k]))
          clock = max(r.sent, now) + (r.flying + ahead) * r.interval
        end
        e = max(start, clock + (min(cost[k], l.room) - l.room) * l.interval)
      else
        local found
        e, found = window_earliest(r, l, cost[k], start, pos ~= nil)
        if not found then return e, k - 1, false end
      end
      if e > t + EPS then
        t, which, moved = e, k - 1, true
      end
    end
    if not moved then break end
  end
  return t, which, true
end

local function load_all(only_found)
  local R = {}
  for k = 1, n do R[k] = load(k, only_found) end
  return R
end
