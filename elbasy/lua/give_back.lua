-- LocalStore.give_back: a place in line returned whole (the caller checked
-- it was neither sent nor given back). A bucket that is gone (expired idle)
-- holds nothing of it. ARGV (after the limits): cost[n], slots[n]. reply: now
local cost = args(n)
local slots = args(n)
for k = 1, n do
  local r = load(k, true)
  if r then
    if L[k].kind == BUCKET then
      r.queued = max(0.0, r.queued - slots[k])
      r.deq = r.deq + slots[k]
      r.dirty = true
    else
      wtake(r, slots[k], cost[k])
    end
  end
end
save()
return reply({now})
