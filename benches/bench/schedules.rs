//! P3–P5 for connectord: 100,000 schedule rows with varied crons, time
//! zones and jitter. Start to ready, RSS, idle CPU, tick lateness, a burst
//! of 2,000 every-second rows, and edit to effect.
//!
//! The rows are generated so that none fires during the bench on its own
//! (each one's next fire, computed with the daemon's own cron code, is at
//! least two hours away), so "idle" is idle. Lateness and the burst then
//! come from rows edited to fire at known instants; the tokio-cron-scheduler
//! baseline gets the same crons, time zones and instants.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use chrono::{DateTime, TimeZone as _, Timelike as _, Utc};
use connectord::schedule::cron::{jitter_offset, parse_cron, parse_timezone, FireRule};
use sqlx::postgres::PgListener;

use super::daemon::{Daemon, Perf};
use super::procfs;
use super::setup::{realtime_ns, Env};
use super::stats::{Figure, Report, Unit};

/// Time zones the rows are spread over, including a half-hour and a
/// 45-minute offset and both hemispheres' daylight saving.
pub const ZONES: &[&str] = &[
    "UTC",
    "Europe/Berlin",
    "Europe/London",
    "America/New_York",
    "America/Los_Angeles",
    "America/Sao_Paulo",
    "Asia/Tokyo",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "Australia/Sydney",
    "Pacific/Auckland",
    "Africa/Johannesburg",
];

/// One generated schedule row.
#[derive(Debug, Clone)]
pub struct Row {
    pub connection: String,
    pub cron: String,
    pub zone: &'static str,
    pub jitter_seconds: i32,
}

/// Where the rows used for each measurement start (indices into the rows;
/// the row's id is its index + 1). Burst rows sit on 2,000 distinct
/// connections.
pub const LATENESS_FROM: usize = 0;
/// The second lateness pass (no children) uses other rows.
pub const LATENESS_QUIET_FROM: usize = 60_000;
pub const BURST_FROM: usize = 20_000;
pub const EDIT_FROM: usize = 40_000;

/// A small deterministic generator, so every run loads the same rows.
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> XorShift {
        XorShift(seed.max(1))
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// Generates `count` rows whose next fire is at least `horizon` away.
///
/// About 2,600 distinct expressions: minutes on the quarter hour, any hour,
/// daily, weekday, weekly, monthly, yearly, twice-daily, with seconds, and
/// the `@` macros. How many distinct strings there are matters: the daemon
/// compiles each distinct string once at load (see `parse_cost`).
pub fn generate(count: usize, connections: &[String], horizon: Duration) -> Vec<Row> {
    const MINUTES: &[u32] = &[0, 15, 30, 45];
    let now = Utc::now();
    let earliest = now + chrono::Duration::from_std(horizon).unwrap_or(chrono::Duration::hours(2));
    let mut rng = XorShift::new(0x5eed_c0de_2024);
    let mut rows = Vec::with_capacity(count);
    for i in 0..count {
        let connection = connections[i % connections.len()].clone();
        let zone = *rng.pick(ZONES);
        let jitter_seconds = if rng.below(10) == 0 { 300 } else { 0 };
        let mut cron = String::new();
        for _ in 0..50 {
            let m = *rng.pick(MINUTES);
            let h = rng.below(24);
            let h2 = (h + 12) % 24;
            let d = *rng.pick(&[1, 15]);
            let dow = rng.below(7);
            cron = match rng.below(12) {
                0..=2 => format!("{m} {h} * * *"),
                3 | 4 => format!("{m} {h} * * 1-5"),
                5 => format!("{m} {h} * * {dow}"),
                6 => format!("{m} {h} {d} * *"),
                7 => format!("{m} {h},{h2} * * *"),
                8 => format!("{} {m} {h} * * *", rng.pick(&[0, 30])),
                9 => format!("{m} {h} * * 0,6"),
                10 => (*rng.pick(&["@daily", "@weekly", "@monthly", "@yearly"])).to_owned(),
                _ => format!("{m} {h} 1 {} *", 1 + rng.below(12)),
            };
            if fires_after(&cron, zone, &connection, jitter_seconds, now, earliest) {
                break;
            }
            // The last resort (once a year, in the middle of the year) is
            // never near any bench run in practice.
            cron = "0 12 1 7 *".to_owned();
        }
        rows.push(Row {
            connection,
            cron,
            zone,
            jitter_seconds,
        });
    }
    rows
}

/// What compiling one new distinct expression costs in
/// `connectord::schedule::cron::parse_cron` (strings no generated row uses).
fn parse_cost(count: usize) -> f64 {
    let started = Instant::now();
    let mut parsed = 0usize;
    for i in 0..count {
        let (m, h, d) = (1 + i % 14, (i / 14) % 24, 2 + (i / 336) % 12);
        if parse_cron(&format!("{m} {h} {d} * *")).is_ok() {
            parsed += 1;
        }
    }
    started.elapsed().as_secs_f64() * 1e6 / parsed.max(1) as f64
}

/// Whether the rule's next fire after `now` is at or after `earliest`.
fn fires_after(
    cron: &str,
    zone: &str,
    connection: &str,
    jitter_seconds: i32,
    now: DateTime<Utc>,
    earliest: DateTime<Utc>,
) -> bool {
    let (Ok(expr), Ok(tz)) = (parse_cron(cron), parse_timezone(zone)) else {
        return false;
    };
    let rule = FireRule {
        expr,
        tz,
        jitter: jitter_offset(connection, jitter_seconds),
    };
    rule.next_after(now).is_some_and(|next| next >= earliest)
}

/// A cron that fires once a day at `at`'s wall-clock time in `zone`, with
/// seconds: the lateness rows' edit.
pub fn daily_at(at: DateTime<Utc>, zone: &str) -> String {
    let tz = parse_timezone(zone).unwrap_or(chrono_tz::UTC);
    let local = tz.from_utc_datetime(&at.naive_utc());
    format!(
        "{} {} {} * * *",
        local.second(),
        local.minute(),
        local.hour()
    )
}

/// Inserts the rows with ids 1..=n.
async fn insert(env: &Env, rows: &[Row]) -> anyhow::Result<()> {
    for (chunk_index, chunk) in rows.chunks(20_000).enumerate() {
        let first = (chunk_index * 20_000) as i64 + 1;
        let ids: Vec<i64> = (first..first + chunk.len() as i64).collect();
        let connections: Vec<&str> = chunk.iter().map(|r| r.connection.as_str()).collect();
        let crons: Vec<&str> = chunk.iter().map(|r| r.cron.as_str()).collect();
        let zones: Vec<&str> = chunk.iter().map(|r| r.zone).collect();
        let jitters: Vec<i32> = chunk.iter().map(|r| r.jitter_seconds).collect();
        sqlx::query(
            "insert into schedules (id, connection_id, cron, timezone, jitter_seconds)
             select * from unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::int[])",
        )
        .bind(&ids)
        .bind(&connections)
        .bind(&crons)
        .bind(&zones)
        .bind(&jitters)
        .execute(&env.pool)
        .await?;
    }
    sqlx::query(
        "select setval(pg_get_serial_sequence('schedules', 'id'), (select max(id) from schedules))",
    )
    .execute(&env.pool)
    .await?;
    Ok(())
}

/// The columns the daemon's schedule engine reads at start (the engine now
/// reads them a page at a time; one query here prices the reading).
type LoadRow = (
    i64,
    String,
    String,
    String,
    bool,
    i32,
    Option<DateTime<Utc>>,
    Option<String>,
    DateTime<Utc>,
);

/// The connectord figures the baseline section compares against.
pub struct Scale {
    pub ready: Figure,
    pub rss: Figure,
    pub rss_growth: Option<Figure>,
    pub idle_cpu: Figure,
    pub lateness: Figure,
    pub burst_missing: usize,
    pub burst_to_last_child: Figure,
    pub rows: Vec<Row>,
}

pub async fn run(
    env: &mut Env,
    report: &mut Report,
    idle_rss_mib: Option<f64>,
) -> anyhow::Result<Scale> {
    let n = env.mode.schedules;
    report.say("");
    report.say(&format!(
        "== P3 schedule scale: {n} schedule rows, varied crons, {} time zones ==",
        ZONES.len()
    ));
    let generated_at = Instant::now();
    let rows = generate(n, &env.connections, Duration::from_secs(2 * 3600));
    let distinct: std::collections::HashSet<&str> = rows.iter().map(|r| r.cron.as_str()).collect();
    let generated = generated_at.elapsed();
    let inserted_at = Instant::now();
    insert(env, &rows).await?;
    report.say(&format!(
        "rows: {n} ({} distinct cron strings), generated in {:.1}s, inserted in {:.1}s; \
         compiling one new distinct expression costs {:.0} us in-process",
        distinct.len(),
        generated.as_secs_f64(),
        inserted_at.elapsed().as_secs_f64(),
        parse_cost(300)
    ));
    let cancelled = env.cancel_retries().await?;
    if cancelled > 0 {
        report.say(&format!(
            "(cancelled {cancelled} retry commands of lost runs left by earlier sections)"
        ));
    }
    env.wait_quiet(Duration::from_secs(30)).await?;
    let query_started = Instant::now();
    let loaded: Vec<LoadRow> = sqlx::query_as(
        "select id, connection_id, cron, timezone, enabled, jitter_seconds, last_fired_at,
                last_error, updated_at from schedules",
    )
    .fetch_all(&env.pool)
    .await?;
    report.say(&format!(
        "reading every schedule row's columns in one query, from this process: {:.3}s for {} rows",
        query_started.elapsed().as_secs_f64(),
        loaded.len()
    ));
    drop(loaded);

    // Start to ready: first with every next_fire_at still null, as after a
    // bulk load, then (restart) with them written.
    let phase = std::cell::Cell::new(Instant::now());
    let took = |name: &str| {
        eprintln!(
            "bench:   {name} took {:.1}s",
            phase.get().elapsed().as_secs_f64()
        );
        phase.set(Instant::now());
    };
    let mut daemon = Daemon::start(env, None, "info", "schedules")?;
    let ready = daemon.wait_ready(Duration::from_secs(120)).await?;
    let mut ready_samples = vec![ready.as_secs_f64()];
    let ready_fig = report.add(
        Figure::single(
            "start -> ready, first start after load",
            Unit::Seconds,
            ready.as_secs_f64(),
        )
        .note("every next_fire_at still null"),
    );
    if env.mode.restart {
        daemon.stop().await?;
        took("first start and stop");
        daemon = Daemon::start(env, None, "info", "schedules-restart")?;
        let again = daemon.wait_ready(Duration::from_secs(120)).await?;
        ready_samples.push(again.as_secs_f64());
        report.add(Figure::single(
            "start -> ready, restart",
            Unit::Seconds,
            again.as_secs_f64(),
        ));
    }
    let ready_worst = ready_samples.iter().copied().fold(0.0, f64::max);
    report.check(
        "P3 ready <= 1.5 s at 100k schedules",
        format!("{ready_worst:.2}s"),
        Some(ready_worst <= 1.5),
    );

    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = daemon.pid();
    let rss = procfs::rss_mib(pid).context("reading the daemon's RSS")?;
    let rss_fig = report.add(Figure::single(
        "RSS at 100k schedules, whole daemon",
        Unit::MiB,
        rss,
    ));
    let rss_growth = idle_rss_mib.map(|idle| {
        report.add(
            Figure::single("RSS growth, 0 -> 100k schedules", Unit::MiB, rss - idle)
                .note(format!("{idle:.1} MiB with no schedules")),
        )
    });
    report.check(
        "P3 RSS <= 40 MiB at 100k schedules",
        format!("{rss:.1} MiB"),
        Some(rss <= 40.0),
    );

    let pg = procfs::postgres_pids(&env.cluster.data_dir);
    let window = env.mode.idle_window;
    let pg_start = procfs::CpuMark::take(&pg);
    let (ticks_pct, sched_pct) = procfs::idle_cpu(&[pid], window).await;
    let (_, pg_pct) = procfs::CpuMark::take(&pg).percent_since(&pg_start);
    let idle_fig = report.add(
        Figure::single(
            format!("idle CPU over {}s (schedstat)", window.as_secs()),
            Unit::Percent,
            sched_pct,
        )
        .note(format!(
            "utime+stime {ticks_pct:.3}%; PostgreSQL meanwhile {pg_pct:.3}%"
        )),
    );
    report.check(
        "P3 idle CPU <= 0.1% of a core",
        format!("{sched_pct:.3}% (ticks {ticks_pct:.3}%)"),
        Some(sched_pct <= 0.1),
    );

    took("restart, RSS, idle");
    let _ = lateness(env, report, &rows, LATENESS_FROM, false).await?;
    took("lateness with children");
    let lateness = lateness(env, report, &rows, LATENESS_QUIET_FROM, true).await?;
    took("lateness without children");
    let perf = Perf::attach(env, pid, "burst");
    let (burst_missing, burst_to_last_child) = burst(env, report, &rows).await?;
    took("burst");
    perf.finish();
    edit_to_effect(env, report).await?;
    took("edits");
    daemon.stop().await?;
    took("stop");
    env.wait_quiet(Duration::from_secs(60)).await?;
    Ok(Scale {
        ready: ready_fig,
        rss: rss_fig,
        rss_growth,
        idle_cpu: idle_fig,
        lateness,
        burst_missing,
        burst_to_last_child,
        rows,
    })
}

/// When each lateness row fires: spread evenly over the window, starting a
/// few seconds from now so the edit has long been applied.
pub fn lateness_plan(count: usize, window: Duration) -> Vec<DateTime<Utc>> {
    let start = Utc::now().timestamp() + 2;
    let seconds = window.as_secs().max(1) as i64;
    (0..count)
        .map(|j| {
            let at = start + (j as i64 % seconds);
            Utc.timestamp_opt(at, 0).single().unwrap_or_else(Utc::now)
        })
        .collect()
}

/// One lateness pass. With `quiet`, the rows' connections are disabled
/// meanwhile, so each command is refused at claim (one statement, no
/// child): tick -> command then measures the schedule engine alone, as the
/// baseline's callbacks do. Without it, every tick also starts a child, as
/// in production.
async fn lateness(
    env: &mut Env,
    report: &mut Report,
    rows: &[Row],
    from: usize,
    quiet: bool,
) -> anyhow::Result<Figure> {
    let count = env.mode.lateness_rows;
    let window = env.mode.lateness_window;
    let label = if quiet {
        "tick lateness, connectord, no children"
    } else {
        "tick lateness, connectord, with children"
    };
    report.say(&format!(
        "lateness: {count} rows edited to fire once each over {}s{}",
        window.as_secs(),
        if quiet {
            ", their connections disabled"
        } else {
            ""
        }
    ));
    let ids: Vec<i64> = (from..from + count).map(|i| i as i64 + 1).collect();
    let connections: Vec<&str> = (from..from + count)
        .map(|i| rows[i].connection.as_str())
        .collect();
    if quiet {
        sqlx::query("update connections set enabled = false where id = any($1)")
            .bind(&connections)
            .execute(&env.pool)
            .await?;
    }
    let plan = lateness_plan(count, window);
    let crons: Vec<String> = plan
        .iter()
        .enumerate()
        .map(|(j, at)| daily_at(*at, rows[from + j].zone))
        .collect();
    sqlx::query(
        "update schedules s set cron = u.cron, jitter_seconds = 0
         from unnest($1::bigint[], $2::text[]) as u(id, cron) where s.id = u.id",
    )
    .bind(&ids)
    .bind(&crons)
    .execute(&env.pool)
    .await?;
    let end = plan.iter().max().copied().unwrap_or_else(Utc::now);
    sleep_until(end + chrono::Duration::milliseconds(1500)).await;
    let first = plan.iter().min().copied().unwrap_or_else(Utc::now);
    let late_ms: Vec<f64> = sqlx::query_scalar(
        "select (extract(epoch from created_at - scheduled_for) * 1000)::float8
         from run_commands where trigger = 'scheduled' and schedule_id = any($1) and scheduled_for >= $2",
    )
    .bind(&ids)
    .bind(first)
    .fetch_all(&env.pool)
    .await?;
    if late_ms.len() != count {
        report.say(&format!(
            "lateness: {} of {count} ticks fired",
            late_ms.len()
        ));
    }
    // Every row due in the same second is fired by one statement, so the
    // samples of a second share one value: the independent samples are the
    // ticks, one per second of the window.
    let figure = report.add(Figure::new(label, Unit::Millis, &late_ms).note(format!(
        "created_at - scheduled_for; {} ticks of {} rows",
        window.as_secs(),
        count as u64 / window.as_secs().max(1)
    )));
    if let Some(s) = figure.summary {
        report.check(
            format!(
                "P3 tick -> command p99 <= 5 ms ({})",
                if quiet {
                    "no children"
                } else {
                    "with children"
                }
            ),
            format!("{:.2} ms", s.p99),
            Some(s.p99 <= 5.0),
        );
    }
    env.wait_quiet(Duration::from_secs(60)).await?;
    if quiet {
        sqlx::query("update connections set enabled = true where id = any($1)")
            .bind(&connections)
            .execute(&env.pool)
            .await?;
    }
    Ok(figure)
}

/// The first whole second at least `lead` from now.
pub fn next_second_after(lead: Duration) -> DateTime<Utc> {
    let at = Utc::now() + chrono::Duration::from_std(lead).unwrap_or_default();
    Utc.timestamp_opt(at.timestamp() + 1, 0)
        .single()
        .unwrap_or(at)
}

pub async fn sleep_until(at: DateTime<Utc>) {
    if let Ok(wait) = (at - Utc::now()).to_std() {
        tokio::time::sleep(wait).await;
    }
}

async fn burst(
    env: &mut Env,
    report: &mut Report,
    rows: &[Row],
) -> anyhow::Result<(usize, Figure)> {
    let count = env.mode.burst_rows;
    let ticks = env.mode.burst_ticks;
    report.say("");
    report.say(&format!(
        "== P4 burst: {count} rows set to '* * * * * *' for {ticks} ticks (overlap = queue) =="
    ));
    let ids: Vec<i64> = (BURST_FROM..BURST_FROM + count)
        .map(|i| i as i64 + 1)
        .collect();
    let distinct: std::collections::HashSet<&str> = ids
        .iter()
        .map(|id| rows[*id as usize - 1].connection.as_str())
        .collect();
    if distinct.len() != count {
        bail!("burst rows must be on distinct connections");
    }
    env.records.drain();
    // The edit lands 0.6 s before the first counted tick, as the baseline's
    // jobs are added 0.6 s before theirs.
    let first_tick = next_second_after(Duration::from_millis(700));
    sleep_until(first_tick - chrono::Duration::milliseconds(600)).await;
    sqlx::query(
        "update schedules set cron = '* * * * * *', overlap = 'queue', jitter_seconds = 0
         where id = any($1)",
    )
    .bind(&ids)
    .execute(&env.pool)
    .await?;
    let after_last = first_tick + chrono::Duration::seconds(ticks as i64);
    sleep_until(after_last - chrono::Duration::milliseconds(500)).await;
    sqlx::query("update schedules set enabled = false where id = any($1)")
        .bind(&ids)
        .execute(&env.pool)
        .await?;
    env.wait_quiet(Duration::from_secs(120)).await?;

    let per_tick: Vec<(DateTime<Utc>, i64)> = sqlx::query_as(
        "select scheduled_for, count(*) from run_commands
         where schedule_id = any($1) and scheduled_for >= $2 and scheduled_for < $3
         group by scheduled_for order by scheduled_for",
    )
    .bind(&ids)
    .bind(first_tick)
    .bind(after_last)
    .fetch_all(&env.pool)
    .await?;
    let found: i64 = per_tick.iter().map(|(_, c)| c).sum();
    let missing = count * ticks - found as usize;
    report.say(&format!(
        "burst: {found} of {} commands inserted, {missing} missing; per tick: {}",
        count * ticks,
        per_tick
            .iter()
            .map(|(_, c)| c.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    ));
    report.check(
        "P4 burst: all commands inserted, zero missing",
        format!("{missing} missing"),
        Some(missing == 0),
    );

    let late_ms: Vec<f64> = sqlx::query_scalar(
        "select (extract(epoch from created_at - scheduled_for) * 1000)::float8 from run_commands
         where schedule_id = any($1) and scheduled_for >= $2 and scheduled_for < $3",
    )
    .bind(&ids)
    .bind(first_tick)
    .bind(after_last)
    .fetch_all(&env.pool)
    .await?;
    report.add(Figure::new(
        "burst tick -> command inserted",
        Unit::Millis,
        &late_ms,
    ));

    // Tick -> child started, from the probes' own clocks.
    let runs: Vec<(i64, DateTime<Utc>)> = sqlx::query_as(
        "select r.id, c.scheduled_for from runs r join run_commands c on c.id = r.command_id
         where c.schedule_id = any($1) and c.scheduled_for >= $2 and c.scheduled_for < $3",
    )
    .bind(&ids)
    .bind(first_tick)
    .bind(after_last)
    .fetch_all(&env.pool)
    .await?;
    let started: HashMap<i64, i64> = env.records.started_by_run();
    let mut to_start = Vec::new();
    let mut last_per_tick: HashMap<i64, f64> = HashMap::new();
    for (run_id, tick) in &runs {
        let Some(ns) = started.get(run_id) else {
            continue;
        };
        let tick_ns = tick.timestamp_nanos_opt().unwrap_or(0);
        let ms = (ns - tick_ns) as f64 / 1e6;
        to_start.push(ms);
        let last = last_per_tick.entry(tick.timestamp()).or_insert(0.0);
        *last = last.max(ms);
    }
    let unhappy: Vec<(String, String, i64)> = sqlx::query_as(
        "select r.status, coalesce(r.failure_kind, ''), count(*)
         from runs r join run_commands c on c.id = r.command_id
         where c.schedule_id = any($1) and c.scheduled_for >= $2 and c.scheduled_for < $3
           and r.status <> 'succeeded'
         group by 1, 2",
    )
    .bind(&ids)
    .bind(first_tick)
    .bind(after_last)
    .fetch_all(&env.pool)
    .await?;
    report.say(&format!(
        "burst: {} runs, {} children started; not succeeded: {}",
        runs.len(),
        to_start.len(),
        if unhappy.is_empty() {
            "none".to_owned()
        } else {
            unhappy
                .iter()
                .map(|(status, kind, n)| format!("{status}/{kind}: {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    ));
    report.add(Figure::new(
        "burst tick -> child started (every child)",
        Unit::Millis,
        &to_start,
    ));
    let per_tick_last: Vec<f64> = last_per_tick.into_values().collect();
    let last = report.add(Figure::new(
        "burst tick -> LAST child of the tick started",
        Unit::Millis,
        &per_tick_last,
    ));
    Ok((missing, last))
}

async fn edit_to_effect(env: &mut Env, report: &mut Report) -> anyhow::Result<()> {
    let samples = env.mode.edit_samples;
    report.say("");
    report.say(&format!(
        "== P5 edit -> effect: UPDATE a row to fire at the coming second, {samples} samples =="
    ));
    let mut listener = PgListener::connect_with(&env.pool).await?;
    listener.listen("connectord_commands").await?;
    let mut db = env.pool.acquire().await?;
    let mut raw = Vec::with_capacity(samples);
    let mut slipped = 0;
    let mut row = EDIT_FROM;
    while raw.len() < samples {
        if slipped > samples + 10 {
            bail!("the bench could not time its updates: {slipped} slipped past the second");
        }
        row += 1;
        let id = row as i64;
        // Update about 3 ms before a second boundary: the new cron's first
        // tick is then at once, and what is measured is the edit reaching
        // the engine, not the wait for the tick.
        let tick = next_second_after(Duration::from_millis(150));
        sleep_until(tick - chrono::Duration::milliseconds(15)).await;
        let aim = tick.timestamp_nanos_opt().unwrap_or(0) - 3_000_000;
        while realtime_ns() < aim {
            std::hint::spin_loop();
        }
        let updated_ns: i64 = sqlx::query_scalar(
            "update schedules set cron = '* * * * * *', jitter_seconds = 0, enabled = true
             where id = $1 returning (extract(epoch from updated_at) * 1e9)::bigint",
        )
        .bind(id)
        .fetch_one(&mut *db)
        .await?;
        let deadline = Instant::now() + Duration::from_secs(5);
        let created_ns = loop {
            let created: Option<i64> = sqlx::query_scalar(
                "select (extract(epoch from min(created_at)) * 1e9)::bigint
                 from run_commands where schedule_id = $1",
            )
            .bind(id)
            .fetch_one(&mut *db)
            .await?;
            if let Some(created) = created {
                break created;
            }
            if Instant::now() > deadline {
                bail!("schedule {id} never fired after its edit");
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), listener.recv()).await;
        };
        sqlx::query("update schedules set enabled = false where id = $1")
            .bind(id)
            .execute(&mut *db)
            .await?;
        let first_tick_ns = (updated_ns / 1_000_000_000 + 1) * 1_000_000_000;
        if first_tick_ns - updated_ns > 20_000_000 {
            // The update landed too early (the bench was descheduled
            // before its spin), so the sample would time the wait.
            slipped += 1;
            continue;
        }
        raw.push((created_ns - updated_ns) as f64 / 1e6);
    }
    let figure = report.add(
        Figure::new("edit -> command inserted", Unit::Millis, &raw).note(format!(
            "updated_at -> created_at; {slipped} mistimed updates retried"
        )),
    );
    if let Some(s) = figure.summary {
        report.check(
            "P5 edit -> effect p99 <= 100 ms",
            format!("{:.1} ms", s.p99),
            Some(s.p99 <= 100.0),
        );
    }
    env.wait_quiet(Duration::from_secs(30)).await?;
    Ok(())
}
