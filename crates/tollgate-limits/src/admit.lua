-- Tollgate admission: checks every counter gating one request and debits all or none.
--
-- The rules are those of `tollgate_core::window` (see `docs/limits.md`), transcribed:
--   * SECOND / MINUTE: 10 slots per unit (100 ms, 6 s). A slot keeps its total and the
--     time of its latest debit and counts while `latest > now - U`. Hash fields
--     `s<slot>` (total) and `l<slot>` (latest debit, ms); slots older than the current
--     one minus 10 are deleted on a debit (the in-process ring overwrites them).
--   * DAY: the UTC day `floor(now / 86400000)`; fields `d` (day), `v` (total). A day
--     starts from the stored usage (its baseline), once.
--   * Field `t`: the counter's latest debit (or day start). Time never runs backwards
--     for a counter: a `now` earlier than `t` is read as `t`.
--
-- KEYS: the distinct counters of the request, all with the tree's hash tag.
-- ARGV[1]: '' for the server's time (TIME), or a time in ms: for tests only.
-- ARGV[2]: estimated tokens (debited on every TOKEN counter).
-- ARGV[3]: the UTC day the baselines below are for, or ''.
-- ARGV[4]: number of limits n; then 5 per limit, in resolution order:
--   key index (into KEYS), kind ('R' | 'T'), unit ('S' | 'M' | 'D'), threshold,
--   baseline ('' when not loaded).
--
-- Returns (all strings):
--   {'missing', today, i...}: DAY counters (limit indices, 1-based) with no count for
--     today and no baseline given: load them and call again. Nothing was written.
--   {'refused', now, first, retry_at, used x n, reset_at x n}: nothing was debited.
--   {'admitted', now, used x n, reset_at x n, slot x n}: every counter debited once;
--     `slot` is the debited slot of each TOKEN limit ('' otherwise or when the limit's
--     counter was already debited for an earlier limit).
-- Numbers are Lua doubles: exact up to 2^53.

local DAY = 86400000
local UNIT_MS = { S = 1000, M = 60000, D = DAY }
local SLOT_MS = { S = 100, M = 6000, D = DAY }
-- How long a key outlives its window, so late settlements still find their slot and a
-- slow caller's next request still sees it; keys never grow without bound.
local MARGIN = 60000

local function fmt(n)
  return string.format('%.0f', n)
end

local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end

local function load(key, unit)
  local raw = redis.call('HGETALL', key)
  local c = { key = key, unit = unit, t = nil, d = nil, v = 0, slots = {}, pruned = {}, dirty = false }
  for i = 1, #raw, 2 do
    local field, value = raw[i], tonumber(raw[i + 1])
    local head = string.sub(field, 1, 1)
    if field == 't' then
      c.t = value
    elseif field == 'd' then
      c.d = value
    elseif field == 'v' then
      c.v = value
    elseif head == 's' or head == 'l' then
      local index = tonumber(string.sub(field, 2))
      local slot = c.slots[index] or { value = 0, latest = -math.huge }
      if head == 's' then slot.value = value else slot.latest = value end
      c.slots[index] = slot
    end
  end
  return c
end

local function effective(c)
  if c.t and c.t > now then return c.t end
  return now
end

local function next_midnight(at)
  return (math.floor(at / DAY) + 1) * DAY
end

local function used(c)
  local at = effective(c)
  if c.unit == 'D' then
    if c.d == math.floor(at / DAY) then return c.v end
    return 0
  end
  local horizon = at - UNIT_MS[c.unit]
  local sum = 0
  for _, slot in pairs(c.slots) do
    if slot.latest > horizon then sum = sum + slot.value end
  end
  return sum
end

-- The earliest time the counter has room under `threshold` (WindowCounter::retry_at).
local function retry_at(c, threshold)
  local at = effective(c)
  if c.unit == 'D' then
    if threshold > 0 and used(c) < threshold then return at end
    return next_midnight(at)
  end
  local unit = UNIT_MS[c.unit]
  if threshold == 0 then return at + unit end
  local remaining = used(c)
  if remaining < threshold then return at end
  local live = {}
  for index, slot in pairs(c.slots) do
    if slot.latest > at - unit then table.insert(live, index) end
  end
  table.sort(live)
  local when = at
  for _, index in ipairs(live) do
    local slot = c.slots[index]
    remaining = math.max(remaining - slot.value, 0)
    when = slot.latest + unit
    if remaining < threshold then break end
  end
  return when
end

-- When everything the window holds has left it (WindowCounter::reset_at).
local function reset_at(c)
  local at = effective(c)
  if c.unit == 'D' then
    if c.d == math.floor(at / DAY) and c.v > 0 then return next_midnight(at) end
    return at
  end
  local horizon = at - UNIT_MS[c.unit]
  local newest = nil
  for _, slot in pairs(c.slots) do
    if slot.latest > horizon and slot.value > 0 and (newest == nil or slot.latest > newest) then
      newest = slot.latest
    end
  end
  if newest == nil then return at end
  return newest + UNIT_MS[c.unit]
end

local function start_day(c, day, baseline)
  if c.d and c.d >= day then return end
  c.d = day
  c.v = baseline
  local begins = day * DAY
  if c.t == nil or c.t < begins then c.t = begins end
  c.dirty = true
end

local function debit(c, amount)
  local at = effective(c)
  local index = math.floor(at / SLOT_MS[c.unit])
  if c.unit == 'D' then
    if c.d ~= index then
      c.d = index
      c.v = 0
    end
    c.v = c.v + amount
  else
    local slot = c.slots[index]
    if slot == nil then
      slot = { value = 0, latest = at }
      c.slots[index] = slot
    end
    slot.value = slot.value + amount
    if at > slot.latest then slot.latest = at end
    for old, _ in pairs(c.slots) do
      if old < index - 10 then table.insert(c.pruned, old) end
    end
    for _, old in ipairs(c.pruned) do c.slots[old] = nil end
    c.fresh = index
  end
  if c.t == nil or c.t < at then c.t = at end
  c.dirty = true
  return index
end

local function save(c)
  if not c.dirty then return end
  if c.unit == 'D' then
    redis.call('HSET', c.key, 'd', fmt(c.d), 'v', fmt(c.v), 't', fmt(c.t))
    redis.call('PEXPIRE', c.key, fmt(next_midnight(effective(c)) - now + 3600000))
    return
  end
  if c.fresh then
    local slot = c.slots[c.fresh]
    redis.call('HSET', c.key, 's' .. fmt(c.fresh), fmt(slot.value), 'l' .. fmt(c.fresh), fmt(slot.latest), 't', fmt(c.t))
  end
  for _, old in ipairs(c.pruned) do
    redis.call('HDEL', c.key, 's' .. fmt(old), 'l' .. fmt(old))
  end
  local unit = UNIT_MS[c.unit]
  redis.call('PEXPIRE', c.key, fmt(effective(c) - now + unit + SLOT_MS[c.unit] + MARGIN))
end

local estimated = tonumber(ARGV[2])
local baseline_day = nil
if ARGV[3] ~= '' then baseline_day = tonumber(ARGV[3]) end
local n = tonumber(ARGV[4])

local limits = {}
local counters = {}
for i = 1, n do
  local at = 4 + (i - 1) * 5
  local key = tonumber(ARGV[at + 1])
  local limit = {
    key = key,
    kind = ARGV[at + 2],
    unit = ARGV[at + 3],
    threshold = tonumber(ARGV[at + 4]),
    baseline = ARGV[at + 5],
  }
  limits[i] = limit
  if counters[key] == nil then counters[key] = load(KEYS[key], limit.unit) end
end

-- DAY counters not on today: start them from their baselines, or ask for them.
local today = math.floor(now / DAY)
local missing = {}
for i, limit in ipairs(limits) do
  local c = counters[limit.key]
  if limit.unit == 'D' and (c.d == nil or c.d < today) then
    if limit.baseline ~= '' and baseline_day == today then
      start_day(c, today, tonumber(limit.baseline))
    else
      table.insert(missing, tostring(i))
    end
  end
end
if #missing > 0 then
  local answer = { 'missing', fmt(today) }
  for _, i in ipairs(missing) do table.insert(answer, i) end
  return answer
end

local counts = {}
local first = nil
for i, limit in ipairs(limits) do
  counts[i] = used(counters[limit.key])
  if first == nil and not (counts[i] < limit.threshold) then first = i end
end

if first ~= nil then
  local latest_retry = nil
  for i, limit in ipairs(limits) do
    if not (counts[i] < limit.threshold) then
      local at = retry_at(counters[limit.key], limit.threshold)
      if latest_retry == nil or at > latest_retry then latest_retry = at end
    end
  end
  -- Days started from their baselines are kept: that is no debit.
  for _, c in pairs(counters) do save(c) end
  local answer = { 'refused', fmt(now), tostring(first), fmt(latest_retry) }
  for i = 1, n do table.insert(answer, fmt(counts[i])) end
  for i, limit in ipairs(limits) do table.insert(answer, fmt(reset_at(counters[limit.key]))) end
  return answer
end

local slots = {}
local debited = {}
for i, limit in ipairs(limits) do
  local amount = estimated
  if limit.kind == 'R' then amount = 1 end
  counts[i] = counts[i] + amount
  slots[i] = ''
  if not debited[limit.key] then
    debited[limit.key] = true
    local index = debit(counters[limit.key], amount)
    if limit.kind == 'T' then slots[i] = fmt(index) end
  end
end
for _, c in pairs(counters) do save(c) end

local answer = { 'admitted', fmt(now) }
for i = 1, n do table.insert(answer, fmt(counts[i])) end
for i, limit in ipairs(limits) do table.insert(answer, fmt(reset_at(counters[limit.key]))) end
for i = 1, n do table.insert(answer, slots[i]) end
return answer
