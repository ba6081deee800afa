//! P10, metrics: what serving `/metrics` costs the runs, and what a scrape
//! costs. Rounds alternate a daemon with metrics off and one serving them,
//! in turns of which goes first,
//! while a scraper reads `/metrics` every five seconds (a stress: scrapes
//! come every 15 s or more); each measures P1's paused pickup and one P2
//! throughput batch. The daemon counts its series whether or not they are
//! served, so what differs is the server and the scrapes.
//!
//! Then the scrape itself, staged at its hardest: 100,000 schedule rows
//! and 10,000 due commands queued behind a run that holds its connection
//! (the asking probe, waiting for a code that does not come), scraped
//! once per queue-read interval so that every scrape reads the queue.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::daemon::Daemon;
use super::pickup::{sample, Pace};
use super::setup::Env;
use super::stats::{Figure, Report, Unit};
use super::throughput::{once, Statistics};

/// How often the bench scrapes the serving daemon: three times as often as
/// the common 15 s scrape interval (Prometheus's own default is a minute).
const SCRAPE_EVERY: Duration = Duration::from_secs(5);

pub async fn run(env: &mut Env, report: &mut Report) -> anyhow::Result<()> {
    report.say("");
    report.say("== P10 metrics: pickup and throughput with /metrics served and scraped, against metrics off ==");
    let port = free_port()?;
    let address = format!("127.0.0.1:{port}");
    let config = env.metrics_config(port)?;
    // P1's samples and P2's commands, cut into four times as many rounds:
    // the machine's speed drifts between rounds by more than the 3 % the
    // comparison must resolve, and short rounds that alternate often give
    // both arms the same drift.
    const SPLIT: usize = 4;
    let rounds = env.mode.pickup_rounds * SPLIT;
    let per_round = env.mode.pickup_samples_per_round.div_ceil(SPLIT);
    let batch = env.mode.throughput_commands / SPLIT;
    let (mut pickup_off, mut pickup_on) = (Vec::new(), Vec::new());
    let (mut throughput_off, mut throughput_on) = (Vec::new(), Vec::new());
    let scrapes = Arc::new(AtomicUsize::new(0));
    // Which goes first alternates, so neither always meets the tables the
    // other just grew.
    for round in 0..rounds * 2 {
        let served = (round % 2 == 1) == (round / 2 % 2 == 0);
        env.wait_quiet(Duration::from_secs(60)).await?;
        let (path, tag) = if served {
            (Some(config.as_path()), "metrics-on")
        } else {
            (None, "metrics-off")
        };
        let mut daemon = Daemon::start(env, path, "info", tag)?;
        daemon.wait_ready(Duration::from_secs(30)).await?;
        let scraper = served.then(|| tokio::spawn(scrape_every(address.clone(), scrapes.clone())));
        let (pickup, throughput) = if served {
            (&mut pickup_on, &mut throughput_on)
        } else {
            (&mut pickup_off, &mut throughput_off)
        };
        sample(env, per_round, true, Pace::Paused, pickup).await?;
        throughput.push(once(env, report, batch, true, Statistics::IdleWithHistory).await?);
        if let Some(scraper) = scraper {
            scraper.abort();
        }
        daemon.stop().await?;
    }
    let off = report.add(Figure::new(
        "pickup, metrics off (baseline)",
        Unit::Millis,
        &pickup_off,
    ));
    let on = report.add(
        Figure::new(
            "pickup, metrics served and scraped",
            Unit::Millis,
            &pickup_on,
        )
        .against(&off)
        .note(format!(
            "{} scrapes in all",
            scrapes.load(Ordering::Relaxed)
        )),
    );
    if let Some(ratio) = on.ratio_p50() {
        report.check(
            "P10 pickup p50 with metrics within 3 % of without",
            format!("{ratio:.3}x"),
            Some(ratio <= 1.03),
        );
    }
    let tput_off = report.add(Figure::new(
        "throughput, metrics off (baseline)",
        Unit::PerSecond,
        &throughput_off,
    ));
    let tput_on = report.add(
        Figure::new(
            "throughput, metrics served and scraped",
            Unit::PerSecond,
            &throughput_on,
        )
        .against(&tput_off),
    );
    if let Some(ratio) = tput_on.ratio_p50() {
        report.check(
            "P10 throughput with metrics within 3 % of without",
            format!("{ratio:.3}x"),
            Some(ratio >= 0.97),
        );
    }
    scrape_cost(env, report, &config, &address).await
}

/// Scrapes at the hardest: every scrape reads the queue, with 10,000 due
/// commands in it and 100,000 schedule rows loaded.
async fn scrape_cost(
    env: &mut Env,
    report: &mut Report,
    config: &std::path::Path,
    address: &str,
) -> anyhow::Result<()> {
    const PENDING: i64 = 10_000;
    const SCHEDULES: i64 = 100_000;
    env.wait_quiet(Duration::from_secs(60)).await?;
    // Far-future crons: loaded, never firing during the bench.
    sqlx::query(
        "insert into schedules (connection_id, cron)
         select ($1::text[])[1 + g % cardinality($1::text[])], '0 0 1 1 *'
         from generate_series(0, $2 - 1) as g",
    )
    .bind(&env.connections)
    .bind(SCHEDULES)
    .execute(&env.pool)
    .await?;
    sqlx::query(
        "insert into connections (id, connector, owner) values ('asker', 'asker', 'bench')
         on conflict do nothing",
    )
    .execute(&env.pool)
    .await?;
    let mut daemon = Daemon::start(env, Some(config), "info", "metrics-scrape")?;
    daemon.wait_ready(Duration::from_secs(60)).await?;
    // The asking probe holds its connection while it waits for a code.
    sqlx::query("insert into run_commands (connection_id) values ('asker')")
        .execute(&env.pool)
        .await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let run_id: i64 = loop {
        let open: Option<i64> = sqlx::query_scalar(
            "select run_id from interactions where connection_id = 'asker' and status = 'open'",
        )
        .fetch_optional(&env.pool)
        .await?;
        if let Some(id) = open {
            break id;
        }
        if Instant::now() > deadline {
            bail!("the asking probe did not ask within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    sqlx::query(
        "insert into run_commands (connection_id) select 'asker' from generate_series(1, $1)",
    )
    .bind(PENDING)
    .execute(&env.pool)
    .await?;
    sqlx::query("analyze run_commands, schedules")
        .execute(&env.pool)
        .await?;
    let samples = if env.mode.full { 60 } else { 15 };
    let mut took = Vec::with_capacity(samples);
    let mut text = String::new();
    for _ in 0..samples {
        // Past the queue-read interval, so this scrape reads the queue.
        tokio::time::sleep(Duration::from_millis(1050)).await;
        let started = Instant::now();
        text = scrape(address).await?;
        took.push(started.elapsed().as_secs_f64() * 1e3);
    }
    let pending_seen = text
        .lines()
        .find_map(|l| l.strip_prefix("connectord_commands_pending "))
        .map(str::to_owned);
    // Let go of the backlog and the held run.
    sqlx::query(
        "update run_commands set status = 'done' where connection_id = 'asker' and status = 'pending'",
    )
    .execute(&env.pool)
    .await?;
    connectord::admin::cancel_run(&env.pool, run_id)
        .await
        .map_err(|e| anyhow::anyhow!("cancelling the asking run: {e}"))?;
    env.wait_quiet(Duration::from_secs(30)).await?;
    daemon.stop().await?;
    sqlx::query("delete from schedules")
        .execute(&env.pool)
        .await?;
    if pending_seen.as_deref() != Some(&PENDING.to_string()) {
        bail!("the scrape saw {pending_seen:?} pending commands, not {PENDING}");
    }
    let scrape = report.add(
        Figure::new(
            "scrape with 10,000 due commands and 100k schedules",
            Unit::Millis,
            &took,
        )
        .note("each reads the queue: one statement on partial indexes"),
    );
    if let Some(summary) = scrape.summary {
        report.check(
            "P10 a scrape takes < 10 ms (p99)",
            format!("{:.2} ms", summary.p99),
            Some(summary.p99 < 10.0),
        );
    }
    Ok(())
}

async fn scrape_every(address: String, count: Arc<AtomicUsize>) {
    let mut ticker = tokio::time::interval(SCRAPE_EVERY);
    loop {
        ticker.tick().await;
        if scrape(&address).await.is_ok() {
            count.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// GET /metrics over a fresh connection, as Prometheus does.
async fn scrape(address: &str) -> anyhow::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .with_context(|| format!("connecting to {address}"))?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    if !response.starts_with("HTTP/1.1 200") {
        bail!("the scrape was answered {:?}", response.lines().next());
    }
    Ok(response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default())
}

/// A loopback port free now.
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}
