-- Tollgate settlement: replaces a reservation's tokens in exactly the slots its admission
-- debited (WindowCounter::adjust). A slot no longer there (left the window, key expired,
-- DAY counter on a later day) is not touched; a value never goes below 0. Latest-debit
-- times are unchanged: tokens count from the admission that reserved them.
--
-- KEYS: the TOKEN counters the admission debited, all with the tree's hash tag.
-- ARGV: 4 per key: unit ('S' | 'M' | 'D'), slot, reserved, actual.

for i, key in ipairs(KEYS) do
  local at = (i - 1) * 4
  local unit, slot = ARGV[at + 1], ARGV[at + 2]
  local reserved, actual = tonumber(ARGV[at + 3]), tonumber(ARGV[at + 4])
  local field = 's' .. slot
  if unit == 'D' then
    field = 'v'
    if redis.call('HGET', key, 'd') ~= slot then field = nil end
  end
  if field then
    local current = redis.call('HGET', key, field)
    if current then
      local value = math.max(tonumber(current) + actual - reserved, 0)
      redis.call('HSET', key, field, string.format('%.0f', value))
    end
  end
end
return 0
