//! P9, one-time codes: an answer given with `interactions answer` reaching
//! the waiting child's stdin. Each sample queues a run of the asking probe
//! (`PROBE_ASK`), waits for its code request to open, lets the daemon
//! settle into its wait, then calls the library function the CLI calls
//! and takes the instant the probe's read of the answer line returned.
//! The clock starts when `answer` is called, so the figure includes the
//! answer's own sealing and statement: an upper bound on "after `answer`
//! returned". The baseline is the least any answer through the database
//! can cost: a NOTIFY committed on one connection reaching a listener on
//! another.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use connectord::credentials::secret::Secret;
use sqlx::postgres::PgListener;

use super::daemon::Daemon;
use super::setup::{realtime_ns, Env};
use super::stats::{Figure, Report, Unit};

/// The idle moment between the request opening and the answer: long
/// enough for the daemon to be parked in its wait, as an owner's answer
/// finds it.
const SETTLE: Duration = Duration::from_millis(20);

pub async fn run(env: &mut Env, report: &mut Report) -> anyhow::Result<()> {
    report.say("");
    report.say("== P9 one-time codes: `interactions answer` called -> the answer line read by the child ==");
    let samples = env.mode.pickup_samples_per_round * env.mode.pickup_rounds / 2;
    sqlx::query(
        "insert into connections (id, connector, owner) values ('asker', 'asker', 'bench')
         on conflict do nothing",
    )
    .execute(&env.pool)
    .await?;
    env.wait_quiet(Duration::from_secs(30)).await?;
    let baseline = notify_round_trips(env, samples).await?;
    let mut daemon = Daemon::start(env, None, "info", "codes")?;
    daemon.wait_ready(Duration::from_secs(30)).await?;
    let mut answered = Vec::with_capacity(samples);
    for _ in 0..samples {
        answered.push(answer_once(env).await?);
    }
    daemon.stop().await?;
    let baseline = report.add(Figure::new(
        "NOTIFY committed -> listener (baseline)",
        Unit::Millis,
        &baseline,
    ));
    let ours = report.add(
        Figure::new(
            "answer called -> child read the line",
            Unit::Millis,
            &answered,
        )
        .against(&baseline)
        .note("seal + store + NOTIFY, the daemon's fenced take, the pipe write"),
    );
    if let Some(summary) = ours.summary {
        report.check(
            "P9 an answer reaches the child within 1 s at p99",
            format!("{:.1} ms", summary.p99),
            Some(summary.p99 <= 1000.0),
        );
    }
    Ok(())
}

/// One answered code request: milliseconds from calling `answer` to the
/// probe's read returning.
async fn answer_once(env: &mut Env) -> anyhow::Result<f64> {
    sqlx::query("insert into run_commands (connection_id) values ('asker')")
        .execute(&env.pool)
        .await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let id: i64 = loop {
        let open: Option<i64> = sqlx::query_scalar(
            "select id from interactions
             where connection_id = 'asker' and kind = 'code_required' and status = 'open'",
        )
        .fetch_optional(&env.pool)
        .await?;
        if let Some(id) = open {
            break id;
        }
        if Instant::now() > deadline {
            bail!("no code request opened within 10 s of a run of the asking probe");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    tokio::time::sleep(SETTLE).await;
    let code = Secret::new("482913".to_owned());
    let called = realtime_ns();
    connectord::admin::answer(&env.pool, &env.keyring, id, &code)
        .await
        .map_err(|e| anyhow::anyhow!("answering {id}: {e}"))?;
    let record = env
        .records
        .next(Duration::from_secs(10))
        .await
        .context("the asking probe did not read an answer within 10 s")?;
    env.wait_quiet(Duration::from_secs(10)).await?;
    Ok((record.started_ns - called) as f64 / 1e6)
}

/// NOTIFY round trips between two connections of the bench database.
async fn notify_round_trips(env: &Env, samples: usize) -> anyhow::Result<Vec<f64>> {
    let mut listener = PgListener::connect(&env.url).await?;
    listener.listen("bench_codes_baseline").await?;
    let mut out = Vec::with_capacity(samples);
    for i in 0..samples {
        tokio::time::sleep(SETTLE).await;
        let sent = Instant::now();
        sqlx::query("select pg_notify('bench_codes_baseline', $1)")
            .bind(i.to_string())
            .execute(&env.pool)
            .await?;
        let note = tokio::time::timeout(Duration::from_secs(10), listener.recv())
            .await
            .context("no notification within 10 s")??;
        if note.payload() != i.to_string() {
            bail!("an unexpected notification: {}", note.payload());
        }
        out.push(sent.elapsed().as_secs_f64() * 1e3);
    }
    Ok(out)
}
