-- LocalStore.observe: what the server reported, merged pessimistically.
-- ARGV (after the limits): m, then m x (limit index from 0, value, reset):
-- value the bucket level in units or the window's used count, reset the
-- seconds nothing departs for (NaN: none of either). reply: now, then for
-- each bucket given a value (limit index, the server's level, this store's
-- level before the merge): what /metrics' drift compares
local m = arg()
local out = {now}
for _ = 1, m do
  local k = arg() + 1
  local val = arg()
  local reset = arg()
  if k >= 1 and k <= n then
    local r, l = load(k, false), L[k]
    if val == val then
      if l.kind == BUCKET then
        local ours = math.max(0.0, r.sent - now) / l.interval + r.flying
        out[#out + 1], out[#out + 2], out[#out + 3] = k - 1, val, ours
        -- what flies is in the server's count, or soon will be
        local clock = now + (val - r.flying) * l.interval
        if clock > r.sent then
          r.sent = clock
          r.dirty = true
        end
      else
        -- outside traffic: what the server counted beyond what left from here
        local i = slot_of(now, l.period)
        local ours = 0.0
        for j = i - l.span + 1, i do ours = ours + wcount(r, j, true) end
        if val > ours + EPS then
          local x = claim(r, l, i)
          if x then r.ext[x] = r.ext[x] + (val - ours) end
        end
      end
    end
    if reset == reset then
      local b = now + reset
      if b > r.blocked then
        r.blocked = b
        r.dirty = true
      end
    end
  end
end
save()
return reply(out)
