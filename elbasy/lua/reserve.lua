-- LocalStore.reserve: a place in line on every limit, or none at all.
-- ARGV (after the limits): cost per limit, the max wait.
-- reply: now, code (0 a place, 1 shed), depart, which, slots[n], positions[n]
local cost = args(n)
local max_wait = arg()
local R = load_all(false)
local depart, which, found = earliest_in(R, cost, nil, nil)
if not found or depart - now > max_wait + EPS then
  save()
  return reply({now, 1, depart, which})
end
local slots, pos = {}, {}
for k = 1, n do
  local r, l = R[k], L[k]
  if l.kind == BUCKET then
    local units = min(cost[k], l.room)
    pos[k] = r.enq
    r.enq = r.enq + units
    r.queued = r.queued + units
    slots[k] = units
    r.dirty = true
  else
    local i = slot_of(depart, l.period)
    local x = claim(r, l, i)
    if x then r.res[x] = r.res[x] + cost[k] end
    slots[k] = i
    pos[k] = 0.0
  end
end
save()
local out = {now, 0, depart, which}
for k = 1, n do out[#out + 1] = slots[k] end
for k = 1, n do out[#out + 1] = pos[k] end
return reply(out)
