//! P2, throughput: N `manual` commands inserted in one statement, with
//! `max_concurrent_runs = 32`; runs per second from just before the insert
//! to the last `runs.finished_at` among them. Baselines: the minimal daemon
//! (32 in flight) and a spawn-only loop of the probe (32 in flight), the
//! ceiling. A second spawn-only loop spawns the way `connectord::run::child`
//! does, to price that difference on its own. Each daemon runs a batch
//! from each of two states of the planner's statistics (see
//! [`Statistics`]).

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use super::daemon::{Daemon, Perf};
use super::minimal::{spawn_only, Minimal, SpawnStyle};
use super::setup::{realtime_ns, Env};
use super::stats::{Figure, Report, Unit};

/// The statistics a batch starts from.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Statistics {
    /// Taken while the queue was idle with history: the state an
    /// autovacuum leaves most often.
    IdleWithHistory,
    /// Taken after the history was emptied: a fresh install, or a quiet
    /// night after retention pruned everything.
    Emptied,
}

pub async fn run(env: &mut Env, report: &mut Report) -> anyhow::Result<()> {
    let count = env.mode.throughput_commands;
    report.say("");
    report.say(&format!(
        "== P2 throughput: {count} manual commands inserted at once, 32 in flight =="
    ));
    let mut ours = Vec::new();
    let mut ours_emptied = Vec::new();
    let mut floor_emptied = Vec::new();
    let mut rss_after = Vec::new();
    let mut ours_big_pool = Vec::new();
    let mut ours_quiet_log = Vec::new();
    let mut floor = Vec::new();
    let mut ceiling = Vec::new();
    let mut ceiling_ours = Vec::new();
    let mut ceiling_fork = Vec::new();
    let mut ballast_ours = Vec::new();
    let mut ballast_fork = Vec::new();
    let big_pool = env.config_variant("pool40", 40)?;
    for round in 0..env.mode.throughput_rounds {
        let mut daemon = Daemon::start(env, None, "info", &format!("throughput-{round}"))?;
        daemon.wait_ready(Duration::from_secs(30)).await?;
        let perf = if round == 0 {
            Perf::attach(env, daemon.pid(), "throughput")
        } else {
            Perf::attach_none()
        };
        ours.push(once(env, report, count, true, Statistics::IdleWithHistory).await?);
        perf.finish();
        if let Some(rss) = super::procfs::rss_mib(daemon.pid()) {
            rss_after.push(rss);
        }
        ours_emptied.push(once(env, report, count, true, Statistics::Emptied).await?);
        daemon.stop().await?;

        if env.mode.full {
            // Configuration experiments (no code change): a pool larger
            // than the 32 runs, and the per-run log lines turned off.
            let tag = format!("throughput-pool40-{round}");
            let mut daemon = Daemon::start(env, Some(&big_pool), "info", &tag)?;
            daemon.wait_ready(Duration::from_secs(30)).await?;
            ours_big_pool.push(once(env, report, count, true, Statistics::IdleWithHistory).await?);
            daemon.stop().await?;

            let tag = format!("throughput-warn-{round}");
            // The daemon module stays at info: its "ready" line is how the
            // bench knows the daemon is up.
            let log = "warn,connectord::daemon=info";
            let mut daemon = Daemon::start(env, None, log, &tag)?;
            daemon.wait_ready(Duration::from_secs(30)).await?;
            ours_quiet_log.push(once(env, report, count, true, Statistics::IdleWithHistory).await?);
            daemon.stop().await?;
        }

        let minimal = Minimal::start(&env.url, &env.probe, &env.fifo, 32).await?;
        floor.push(once(env, report, count, false, Statistics::IdleWithHistory).await?);
        floor_emptied.push(once(env, report, count, false, Statistics::Emptied).await?);
        minimal.stop().await?;

        ceiling.push(spawn_loop(env, count, SpawnStyle::Plain).await?);
        ceiling_ours.push(spawn_loop(env, count, SpawnStyle::Connectord).await?);
        ceiling_fork.push(spawn_loop(env, count, SpawnStyle::ForkHook).await?);
        if env.mode.full {
            // The fork path copies the page tables of the whole process
            // and then takes copy-on-write faults, so its cost grows with
            // the spawner's memory: repeat with 64 MiB of touched ballast,
            // about what the daemon holds at 100k schedules.
            let ballast = vec![1u8; 64 << 20];
            std::hint::black_box(&ballast);
            ballast_ours.push(spawn_loop(env, count, SpawnStyle::Connectord).await?);
            ballast_fork.push(spawn_loop(env, count, SpawnStyle::ForkHook).await?);
            drop(ballast);
        }
    }
    let ceiling = report.add(Figure::new(
        "throughput, spawn-only ceiling (baseline)",
        Unit::PerSecond,
        &ceiling,
    ));
    let ceiling_ours = report.add(
        Figure::new(
            "throughput, spawn-only, connectord::run::spawn",
            Unit::PerSecond,
            &ceiling_ours,
        )
        .against(&ceiling)
        .note("clone(CLONE_VM|CLONE_VFORK), PDEATHSIG, own pgid, piped stdio"),
    );
    report.add(
        Figure::new(
            "throughput, spawn-only, fork + pre_exec hook",
            Unit::PerSecond,
            &ceiling_fork,
        )
        .against(&ceiling_ours)
        .note("the same guarantees through std's fork path"),
    );
    if !ballast_ours.is_empty() {
        let ours = report.add(
            Figure::new(
                "throughput, connectord::run::spawn, +64 MiB RSS",
                Unit::PerSecond,
                &ballast_ours,
            )
            .against(&ceiling_ours),
        );
        report.add(
            Figure::new(
                "throughput, fork + pre_exec hook, +64 MiB RSS",
                Unit::PerSecond,
                &ballast_fork,
            )
            .against(&ours),
        );
    }
    let floor = report.add(
        Figure::new(
            "throughput, minimal daemon (baseline)",
            Unit::PerSecond,
            &floor,
        )
        .against(&ceiling),
    );
    let connectord = report.add(
        Figure::new("throughput, connectord", Unit::PerSecond, &ours)
            .against(&floor)
            .note(format!(
                "daemon RSS after the batch: {}",
                rss_after
                    .iter()
                    .map(|r| format!("{r:.1} MiB"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
    );
    let floor_emptied = report.add(Figure::new(
        "throughput, minimal daemon, statistics of emptied tables (baseline)",
        Unit::PerSecond,
        &floor_emptied,
    ));
    let connectord_emptied = report.add(
        Figure::new(
            "throughput, connectord, statistics of emptied tables",
            Unit::PerSecond,
            &ours_emptied,
        )
        .against(&floor_emptied)
        .note("truncate runs, run_commands; analyze; then the batch"),
    );
    if !ours_big_pool.is_empty() {
        report.add(
            Figure::new(
                "throughput, connectord, pool of 40",
                Unit::PerSecond,
                &ours_big_pool,
            )
            .against(&connectord)
            .note("[database] max_connections = 40 instead of 10"),
        );
    }
    if !ours_quiet_log.is_empty() {
        report.add(
            Figure::new(
                "throughput, connectord, RUST_LOG=warn",
                Unit::PerSecond,
                &ours_quiet_log,
            )
            .against(&connectord)
            .note("no per-run log lines"),
        );
    }
    report.add(Figure::new("throughput, connectord", Unit::PerSecond, &ours).against(&ceiling));
    if let Some(ratio) = connectord.ratio_p50() {
        report.check(
            "P2 throughput >= 0.8x minimal daemon",
            format!("{ratio:.2}x"),
            Some(ratio >= 0.8),
        );
    }
    if let Some(ratio) = connectord_emptied.ratio_p50() {
        report.check(
            "P2 throughput >= 0.8x minimal daemon, statistics of emptied tables",
            format!("{ratio:.2}x"),
            Some(ratio >= 0.8),
        );
    }
    Ok(())
}

/// One batch through whichever daemon is running; returns runs per second.
pub async fn once(
    env: &mut Env,
    report: &mut Report,
    count: usize,
    expect_token: bool,
    statistics: Statistics,
) -> anyhow::Result<f64> {
    let cancelled = env.cancel_retries().await?;
    if cancelled > 0 {
        report.say(&format!(
            "(cancelled {cancelled} retry commands of lost runs before this batch)"
        ));
    }
    env.wait_quiet(Duration::from_secs(60)).await?;
    // Every batch, whichever daemon runs it, starts from statistics the
    // bench chose: a bench that left them to autovacuum's timing could
    // neither show what they cost nor compare the daemons fairly.
    if statistics == Statistics::Emptied {
        sqlx::query("truncate runs, run_commands cascade")
            .execute(&env.pool)
            .await?;
    }
    sqlx::query("analyze run_commands, runs")
        .execute(&env.pool)
        .await?;
    env.records.drain();
    let started_ns = realtime_ns();
    let (first, last): (i64, i64) = sqlx::query_as(
        "with c as (
             insert into run_commands (connection_id, trigger)
             select ($1::text[])[1 + g % cardinality($1::text[])], 'manual'
             from generate_series(0, $2 - 1) as g
             returning id
         )
         select min(id), max(id) from c",
    )
    .bind(&env.connections)
    .bind(count as i64)
    .fetch_one(&env.pool)
    .await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let done: i64 = sqlx::query_scalar(
            "select count(*) from run_commands where id between $1 and $2 and status = 'done'",
        )
        .bind(first)
        .bind(last)
        .fetch_one(&env.pool)
        .await?;
        if done as usize == count {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {done} of {count} commands were done after 10 minutes");
        }
    }
    let (succeeded, finished_ns): (i64, i64) = sqlx::query_as(
        "select count(*) filter (where status = 'succeeded'),
                (extract(epoch from max(finished_at)) * 1e9)::bigint
         from runs where command_id between $1 and $2",
    )
    .bind(first)
    .bind(last)
    .fetch_one(&env.pool)
    .await?;
    if succeeded as usize != count {
        // A daemon bug, not a bench failure: report it and go on.
        let outcomes = env.outcomes(first, last).await?;
        report.say(&format!(
            "WARNING: {succeeded} of {count} runs succeeded; the others: {outcomes}"
        ));
        report.check(
            "every run of a throughput batch succeeded",
            format!("{} did not", count - succeeded as usize),
            Some(false),
        );
    }
    let records = env.records.collect(count, Duration::from_secs(10)).await;
    if records.len() < count {
        report.say(&format!(
            "WARNING: {} of {count} probes reported their start",
            records.len()
        ));
    }
    if expect_token && records.iter().any(|r| !r.had_token) {
        bail!("a probe started without the stored credential");
    }
    let seconds = (finished_ns - started_ns) as f64 / 1e9;
    Ok(count as f64 / seconds)
}

async fn spawn_loop(env: &mut Env, count: usize, style: SpawnStyle) -> anyhow::Result<f64> {
    env.records.drain();
    let programs = env.programs();
    let elapsed = tokio::task::spawn_blocking(move || spawn_only(&programs, count, 32, style))
        .await
        .context("spawn-only thread")??;
    let records = env.records.collect(count, Duration::from_secs(10)).await;
    if records.len() != count {
        bail!("{} of {count} spawned probes reported", records.len());
    }
    Ok(count as f64 / elapsed.as_secs_f64())
}
