-- LocalStore.confirm: sent now, or the later time the sent clock asks for.
-- ARGV (after the limits): cost[n], slots[n], positions[n].
-- reply: now, code (0 sent, 1 later), the time, slots[n] (a window booking that moved)
local cost = args(n)
local slots = args(n)
local pos = args(n)
local R = load_all(false)
local t = earliest_in(R, cost, slots, pos)
if t > now + EPS then
  save()
  return reply({now, 1, t})
end
for k = 1, n do
  local r, l = R[k], L[k]
  if l.kind == BUCKET then
    r.queued = max(0.0, r.queued - slots[k])
    r.deq = r.deq + slots[k]
    r.flying = r.flying + slots[k]  -- restoring once it lands (landed.lua)
    r.dirty = true
  else
    local i = slot_of(now, l.period)
    local x = claim(r, l, i)
    if x then
      r.dep[x] = r.dep[x] + cost[k]
      local booked = slots[k]
      if booked ~= i then
        -- it leaves in another window than booked: the booking moves along
        wtake(r, booked, cost[k])
        r.res[x] = r.res[x] + cost[k]
        slots[k] = i
      end
    end
  end
end
save()
local out = {now, 0, now}
for k = 1, n do out[#out + 1] = slots[k] end
return reply(out)
