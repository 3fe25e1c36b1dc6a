//! The Lua scripts of the bus. Each touches the keys of one queue only (one hash tag, so one
//! Cluster slot) and runs atomically: a crash between two of its steps cannot happen.

use std::sync::LazyLock;

use redis::Script;

/// Enqueue one job, once: its entry — on the stream when due, else in the delayed set — and its
/// marker (on the queue's job hash), together. A job id that already has a marker is
/// not enqueued again (the reconciler's re-enqueues use ids derived from what they recover).
/// Returns 1 when enqueued, 0 when the job was there already.
/// KEYS: stream, delayed, marks. ARGV: job id, now_ms, due_ms (0: now), envelope.
pub static ENQUEUE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then return 0 end
if tonumber(ARGV[3]) > tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
else
  redis.call('XADD', KEYS[1], '*', 'j', ARGV[4])
end
-- (last: a failed XADD leaves no marker behind)
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
return 1
"#,
    )
});

/// Acknowledge handled entries: `XACK` + `XDEL` of each entry this consumer still owns (an
/// entry reclaimed by another worker meanwhile is left to its new owner — a run that stalled
/// past the visibility timeout may have been superseded, and its `Ok` does not say it did the
/// work), and the job's marker with it. Returns how many.
///
/// Ownership is checked per entry (`XPENDING <id> <id> 1`); then one `XACK`, one `XDEL` and one
/// `HDEL` for the batch. (A single `XPENDING` over the batch's id range returned every entry
/// the consumer had in flight in that range, which with a worker's concurrency cost more:
/// `docs/bench-bus.md`.)
/// Jobs that count against their org's concurrency cap (fair admission: the run-org hash
/// names their run set) leave it here, so their org may go again. Returns `{acked, freed}`.
/// KEYS: stream, marks, and for a fair queue its run orgs (a queue without leaves it out: a
/// call from a script costs about as much as a small command). ARGV: group, consumer, n, then
/// the n entry ids, then their n job ids in the same order.
pub static ACK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local n = tonumber(ARGV[3])
local ids, jobs = {}, {}
for i = 4, 3 + n do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #p > 0 and p[1][2] == ARGV[2] then
    ids[#ids + 1] = ARGV[i]
    jobs[#jobs + 1] = ARGV[i + n]
  end
end
if #ids == 0 then return {0, 0} end
local acked = redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
redis.call('XDEL', KEYS[1], unpack(ids))
redis.call('HDEL', KEYS[2], unpack(jobs))
local freed = 0
if KEYS[3] and redis.call('EXISTS', KEYS[3]) == 1 then
  local sets = redis.call('HMGET', KEYS[3], unpack(jobs))
  for i, set in ipairs(sets) do
    if set then freed = freed + redis.call('ZREM', set, jobs[i]) end
  end
  redis.call('HDEL', KEYS[3], unpack(jobs))
end
return {acked, freed}
"#,
    )
});

/// The retry step: put the next attempt in the delayed set and acknowledge the delivered entry,
/// together — but only while this consumer still owns the entry (if a slow worker's entry was
/// reclaimed, the new owner decides its fate).
/// KEYS: stream, delayed. ARGV: group, consumer, id, due_ms, envelope.
pub static RETRY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return 0 end
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[5])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
"#,
    )
});

/// Keep a delivered entry claimed while its handler runs: reset its idle time (`XCLAIM` with
/// min-idle 0 and `JUSTID`, which does not count a delivery) — only while this consumer owns
/// it, so a heartbeat never steals an entry another worker reclaimed. Returns 1 if still owned.
/// KEYS: stream. ARGV: group, consumer, id.
pub static TOUCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
"#,
    )
});

/// Dead-letter a delivered entry: append it with its last error to the dead stream, acknowledge
/// it and clear its job's marker (and its place in its org's run set, as `ACK` does), together,
/// while this consumer owns it. Returns 0 when not owned, 1 when dead-lettered, 2 when that
/// also freed a slot of its org's concurrency cap.
/// KEYS: stream, dead, marks, run orgs. ARGV: group, consumer, id, envelope, error, reason,
/// failed_at_ms, job id ('' when unknown: then the envelope's own `id`, if it has one).
pub static DEAD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return 0 end
redis.call('XADD', KEYS[2], '*', 'j', ARGV[4], 'error', ARGV[5], 'reason', ARGV[6],
  'failed_at', ARGV[7], 'source', ARGV[3])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
local id = ARGV[8]
if id == '' then
  -- (an envelope this build cannot read may still hold its org's slot, under its id)
  local ok, env = pcall(cjson.decode, ARGV[4])
  if not (ok and type(env) == 'table' and type(env.id) == 'string') then return 1 end
  id = env.id
end
redis.call('HDEL', KEYS[3], id)
local set = redis.call('HGET', KEYS[4], id)
if not set then return 1 end
redis.call('HDEL', KEYS[4], id)
return 1 + redis.call('ZREM', set, id)
"#,
    )
});

/// Remove a consumer name from the group only while it holds no pending entry, in one step:
/// `XGROUP DELCONSUMER` drops a consumer's pending entries, and such an entry would stay in the
/// stream, never delivered again, its marker telling the reconciler it is on the bus.
/// KEYS: stream. ARGV: group, consumer. Returns 1 when removed, 0 when it holds entries.
pub static DELETE_IDLE_CONSUMER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return 0 end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
"#,
    )
});

/// Move due delayed envelopes to the stream: `ZRANGEBYSCORE` + `XADD` + `ZREM` in one step, so
/// any number of workers may run it at once and each entry moves exactly once. Returns
/// `{moved, next_due_ms or -1}`.
/// KEYS: stream, delayed. ARGV: now_ms, limit.
pub static MOVE_DUE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, m in ipairs(due) do
  redis.call('XADD', KEYS[1], '*', 'j', m)
  redis.call('ZREM', KEYS[2], m)
end
local nxt = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
local next_due = -1
if #nxt == 2 then next_due = tonumber(nxt[2]) end
return {#due, next_due}
"#,
    )
});

/// Reclaim entries idle past the visibility timeout (`XAUTOCLAIM`) and report each one's
/// delivery count (from `XPENDING`), which `XAUTOCLAIM` itself does not return. Nothing is
/// claimed (and no consumer name created) when no entry is idle that long.
/// Returns `{next_cursor, {{id, envelope, deliveries}...}}`.
/// KEYS: stream. ARGV: group, consumer, min_idle_ms, cursor, count.
pub static RECLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local idle = redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', tonumber(ARGV[3]), '-', '+', 1)
if #idle == 0 then return {'0-0', {}} end
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4],
  'COUNT', tonumber(ARGV[5]))
local out = {}
for _, e in ipairs(r[2]) do
  if e and e[2] then
    local body = ''
    for i = 1, #e[2], 2 do
      if e[2][i] == 'j' then body = e[2][i + 1] end
    end
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], e[1], e[1], 1)
    local n = 1
    if #p > 0 then n = p[1][4] end
    table.insert(out, {e[1], body, n})
  end
end
return {r[1], out}
"#,
    )
});

/// Put a dead letter back on its stream (with a fresh envelope built by the caller), once:
/// only if the dead entry still exists; it is deleted and the job's marker set in the same step.
/// KEYS: stream, dead, marks. ARGV: dead_id, envelope, job id ('' when unknown), now_ms.
pub static REPLAY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if #redis.call('XRANGE', KEYS[2], ARGV[1], ARGV[1]) == 0 then return 0 end
redis.call('XADD', KEYS[1], '*', 'j', ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[1])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[3], ARGV[3], ARGV[4]) end
return 1
"#,
    )
});

/// Fire a scheduler tick once: mark interval `n` (`SET NX PX`) and enqueue its job (with its
/// marker), together.
/// KEYS: tick marker, stream, marks. ARGV: owner, ttl_ms, envelope, job id, now_ms.
pub static TICK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
redis.call('XADD', KEYS[2], '*', 'j', ARGV[3])
redis.call('HSET', KEYS[3], ARGV[4], ARGV[5])
return 1
"#,
    )
});

/// Take or keep the leader lease: extend it when we hold it, take it when nobody does.
/// KEYS: lease. ARGV: owner, ttl_ms. Returns 1 when we hold the lease afterwards.
pub static LEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"#,
    )
});

/// Give the lease up, only if we hold it. KEYS: lease. ARGV: owner.
pub static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#,
    )
});

/// The Lua helpers of fair admission (prepended to the scripts that use them): `undelivered`
/// (entries in the stream no consumer took yet: its length less the group's pending count),
/// `weight` (an org's weight, 1 when unset or not positive), `full` (whether an org runs as
/// many jobs as its cap allows) and `admit` (move up to `n` jobs from the orgs' lists to the
/// stream, the lowest virtual finish tag first, passing over orgs at their cap: each org's
/// next job is tagged its previous tag + 1/weight, so orgs take turns in proportion to their
/// weights, whatever their backlogs).
///
/// `fair(...)` reads the context the scripts share from KEYS/ARGV at given positions: ring,
/// virtual time, weights, stream, marks, caps, run orgs (KEYS); org list prefix, group, run
/// set prefix, default cap, now_ms, stale_ms (ARGV).
///
/// A capped org's admitted job is in its run set (`<runs><org>`, scored by admission time) and
/// the run-org hash (job id → that set) until `ACK` or `DEAD` takes it out; `full` drops
/// members older than `stale_ms` and, when the org looks full, its oldest member if that job
/// has no marker any more — a backstop for jobs Redis lost, one check per capped org.
const FAIR_LUA: &str = r#"
local function undelivered(stream, group)
  local len = redis.call('XLEN', stream)
  if len == 0 then return 0 end
  local ok, p = pcall(redis.call, 'XPENDING', stream, group)
  local pending = 0
  if ok and type(p) == 'table' then pending = tonumber(p[1]) or 0 end
  return len - pending
end
local function weight(weights, org)
  local w = tonumber(redis.call('HGET', weights, org) or '1') or 1
  if w <= 0 then w = 1 end
  return w
end
local function fair(k, a)
  return {ring = KEYS[k], vt = KEYS[k + 1], weights = KEYS[k + 2], stream = KEYS[k + 3],
    marks = KEYS[k + 4], caps = KEYS[k + 5], run_orgs = KEYS[k + 6],
    lists = ARGV[a], group = ARGV[a + 1], runs = ARGV[a + 2], cap = tonumber(ARGV[a + 3]) or 0,
    now = tonumber(ARGV[a + 4]), stale = tonumber(ARGV[a + 5])}
end
-- an org's cap: its own, else the queue's; 0: none
local function cap_of(f, org)
  return tonumber(redis.call('HGET', f.caps, org) or f.cap) or 0
end
-- whether an org runs `cap` jobs already (see above)
local function full(f, org, cap)
  if cap <= 0 then return false end
  local set = f.runs .. org
  local n = redis.call('ZCARD', set)
  if n < cap then return false end
  local old = redis.call('ZRANGEBYSCORE', set, '-inf', f.now - f.stale, 'LIMIT', 0, 1000)
  if #old > 0 then
    redis.call('ZREM', set, unpack(old))
    redis.call('HDEL', f.run_orgs, unpack(old))
    n = n - #old
  end
  if n >= cap then
    local oldest = redis.call('ZRANGE', set, 0, 0)[1]
    if oldest and redis.call('HEXISTS', f.marks, oldest) == 0 then
      redis.call('ZREM', set, oldest)
      redis.call('HDEL', f.run_orgs, oldest)
      n = n - 1
    end
  end
  return n >= cap
end
-- the most orgs at their cap one admission passes over before it gives up
local MAX_PASSED = 100
-- returns the jobs moved
local function admit(f, n)
  local moved, passed = 0, {}
  local v0 = tonumber(redis.call('GET', f.vt) or '0') or 0
  local v = v0
  while moved < n and #passed < MAX_PASSED do
    local top = redis.call('ZRANGE', f.ring, #passed, #passed, 'WITHSCORES')
    if #top == 0 then break end
    local org, tag = top[1], tonumber(top[2])
    local cap = cap_of(f, org)
    if full(f, org, cap) then
      passed[#passed + 1] = org
    else
      local list = f.lists .. org
      -- (the entry first: a failed XADD leaves the job in its list)
      local body = redis.call('LINDEX', list, 0)
      if body then
        redis.call('XADD', f.stream, '*', 'j', body)
        redis.call('LPOP', list)
        moved = moved + 1
        if cap > 0 then
          local ok, env = pcall(cjson.decode, body)
          if ok and type(env) == 'table' and type(env.id) == 'string' then
            local set = f.runs .. org
            redis.call('ZADD', set, f.now, env.id)
            redis.call('PEXPIRE', set, f.stale)
            redis.call('HSET', f.run_orgs, env.id, set)
            redis.call('PEXPIRE', f.run_orgs, f.stale)
          end
        end
      end
      if tag > v then v = tag end
      if redis.call('LLEN', list) > 0 then
        -- (from the virtual time at least: an org held back at its cap while others went
        -- gets no more than this one turn of credit for it)
        redis.call('ZADD', f.ring, math.max(tag, v) + 1 / weight(f.weights, org), org)
      else
        redis.call('ZREM', f.ring, org)
      end
    end
  end
  if v ~= v0 then redis.call('SET', f.vt, string.format('%.17g', v)) end
  -- the orgs passed over keep their place, but not behind the virtual time (so their backlog
  -- does not count ahead of the others' turns in `FAIR_POSITION`, nor win them extra turns)
  for _, org in ipairs(passed) do
    local s = tonumber(redis.call('ZSCORE', f.ring, org))
    if s and s < v then redis.call('ZADD', f.ring, v, org) end
  end
  return moved
end
"#;

/// Enqueue a job of a fair queue: its envelope at the end of its org's list, the org among
/// those waiting (tagged the virtual time + 1/weight when it was not), and its marker; then,
/// when no entry waits in the stream (the consumers are idle), one job admitted at once.
/// With `once`, a job id that already has a marker is not enqueued again. Returns 1 when
/// enqueued, 0 when the job was there already.
/// KEYS: fair ring, virtual time, weights, stream, marks, caps, run orgs. ARGV: org list
/// prefix, group, run set prefix, default cap, now_ms, stale_ms, job id, org, envelope, once
/// (1/0).
pub static ENQUEUE_FAIR: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{FAIR_LUA}{}",
        r#"
local f = fair(1, 1)
local id, org = ARGV[7], ARGV[8]
if ARGV[10] == '1' and redis.call('HEXISTS', f.marks, id) == 1 then return 0 end
-- (read before any write: a stream that cannot be read fails the script with nothing written)
local idle = undelivered(f.stream, f.group) == 0
redis.call('RPUSH', f.lists .. org, ARGV[9])
if not redis.call('ZSCORE', f.ring, org) then
  local v = tonumber(redis.call('GET', f.vt) or '0') or 0
  redis.call('ZADD', f.ring, v + 1 / weight(f.weights, org), org)
end
redis.call('HSET', f.marks, id, ARGV[5])
if idle then admit(f, 1) end
return 1
"#
    ))
});

/// Admit waiting jobs of a fair queue into its stream for a consumer about to read `n`: as many
/// as the stream does not already hold undelivered (entries that skipped the lists — retries,
/// replays, jobs given back — are read first, and do not make the stream grow a FIFO backlog
/// of admitted jobs behind them). Returns how many moved.
/// KEYS: fair ring, virtual time, weights, stream, marks, caps, run orgs. ARGV: org list
/// prefix, group, run set prefix, default cap, now_ms, stale_ms, n.
pub static ADMIT_FAIR: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{FAIR_LUA}{}",
        r#"
local f = fair(1, 1)
if redis.call('ZCARD', f.ring) == 0 then return 0 end
local room = tonumber(ARGV[7]) - undelivered(f.stream, f.group)
if room <= 0 then return 0 end
return admit(f, room)
"#
    ))
});

/// Where a job waiting in a fair queue stands: 1 + the jobs that go before it (those already in
/// the stream no consumer took, its org's jobs ahead of it, and the other orgs' jobs tagged
/// before it; at most 1000 other orgs are looked at). Exact while nothing else arrives: a
/// newly waiting org's jobs may still go before it.
/// -1 when it no longer waits in its org's list (admitted, or not there).
/// KEYS: fair ring, weights, stream. ARGV: org, envelope, org list prefix, group.
pub static FAIR_POSITION: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{FAIR_LUA}{}",
        r#"
local idx = redis.call('LPOS', ARGV[3] .. ARGV[1], ARGV[2])
if not idx then return -1 end
local first = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]) or '0') or 0
local tag = first + idx / weight(KEYS[2], ARGV[1])
local ahead = idx + undelivered(KEYS[3], ARGV[4])
local orgs = redis.call('ZRANGE', KEYS[1], 0, 999, 'WITHSCORES')
for i = 1, #orgs, 2 do
  local o, s = orgs[i], tonumber(orgs[i + 1])
  if o ~= ARGV[1] and s <= tag + 1e-9 then
    -- its jobs j = 0, 1, ... are tagged s + j/w: those tagged before this one go first, and
    -- one tagged the same when its org sorts first (the sorted set's order for equal scores)
    local x = (tag - s) * weight(KEYS[2], o)
    local k = math.max(0, math.ceil(x - 1e-9))
    if o < ARGV[1] and math.abs(x - math.floor(x + 0.5)) < 1e-9 then k = k + 1 end
    ahead = ahead + math.min(k, redis.call('LLEN', ARGV[3] .. o))
  end
end
return ahead + 1
"#
    ))
});
