-- LocalStore.earliest for a reservation heading its line (not sent yet).
-- ARGV (after the limits): cost[n], slots[n], positions[n]. reply: now, the time
local cost = args(n)
local units = args(n)
local pos = args(n)
local R = load_all(false)
local t = earliest_in(R, cost, units, pos)
save()
return reply({now, t})
