-- LocalStore.throttled: the server refused; every limit is full now and
-- nothing departs for `retry` seconds. ARGV (after the limits): retry (>= 0).
-- reply: now, until
local retry = arg()
local untl = now + retry
local R = load_all(false)
for k = 1, n do
  local r, l = R[k], L[k]
  r.blocked = max(r.blocked, untl)
  r.dirty = true
  if l.kind == BUCKET then
    r.sent = max(r.sent, now + max(0.0, l.capacity - r.flying) * l.interval)
  elseif l.kind == WINDOW then
    local i = slot_of(now, l.period)
    local seen = wcount(r, i, true)
    if seen < l.capacity then
      local x = claim(r, l, i)
      if x then r.ext[x] = r.ext[x] + (l.capacity - seen) end
    end
  end
end
save()
return reply({now, untl})
