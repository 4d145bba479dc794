-- LocalStore.settle: refund[k] units back on each bucket limit (0: none).
-- A bucket that is gone (expired idle) has its clock before now already.
-- ARGV (after the limits): refund[n]. reply: now
local refund = args(n)
for k = 1, n do
  if L[k].kind == BUCKET and refund[k] > 0 then
    local r = load(k, true)
    if r then
      r.sent = max(now, r.sent - refund[k] * L[k].interval)
      r.dirty = true
    end
  end
end
save()
return reply({now})
