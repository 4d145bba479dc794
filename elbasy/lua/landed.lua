-- LocalStore.landed: a sent reservation's answer came (or its exchange
-- ended): its units on every bucket limit restore from now on. A bucket
-- that is gone (expired) has nothing flying any more.
-- ARGV (after the limits): slots[n] (the units each bucket limit took). reply: now
local slots = args(n)
for k = 1, n do
  if L[k].kind == BUCKET then
    local r = load(k, true)
    if r then
      r.flying = max(0.0, r.flying - slots[k])
      r.sent = max(r.sent, now) + slots[k] * L[k].interval
      r.dirty = true
    end
  end
end
save()
return reply({now})
