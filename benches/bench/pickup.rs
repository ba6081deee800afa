//! P1, pickup latency: from just before a `manual` command is inserted to
//! the probe's own clock reading at its start, one command at a time, with
//! the stored credential in the path: each command sent once the previous
//! run is recorded and a pause has passed, and again back to back, as soon
//! as it is recorded (see [`Pace`]). Rounds alternate the real daemon and
//! the minimal daemon, so a burst of noise from the machine's other work
//! lands on both rather than on one.

use std::time::Duration;

use anyhow::{bail, Context as _};
use sqlx::postgres::PgListener;

use super::daemon::{Daemon, Perf};
use super::minimal::{spawn_one_at_a_time, Minimal, SpawnStyle};
use super::procfs;
use super::setup::{realtime_ns, Env, ProbeRecord};
use super::stats::{Figure, Report, Unit};

/// Samples thrown away at the start of each round (pools and caches warm up).
const WARM_UP: usize = 10;

/// When the next sample's command is sent.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// 2 ms after the previous run is recorded: each sample starts from an
    /// idle daemon.
    Paused,
    /// As soon as the previous run is recorded, while the daemon's
    /// bookkeeping of it may still be in flight: a busy daemon.
    BackToBack,
}

/// What the later sections need from this one.
pub struct Pickup {
    pub connectord: Figure,
    /// The daemon's RSS just after start with no schedules, in MiB.
    pub idle_rss_mib: Option<f64>,
}

pub async fn run(env: &mut Env, report: &mut Report) -> anyhow::Result<Pickup> {
    report.say("");
    report.say("== P1 pickup latency: insert of a manual command -> probe started ==");
    let rounds = env.mode.pickup_rounds;
    let per_round = env.mode.pickup_samples_per_round;
    let mut ours = Vec::with_capacity(rounds * per_round);
    let mut floor = Vec::with_capacity(rounds * per_round);
    let mut ours_b2b = Vec::with_capacity(rounds * per_round);
    let mut floor_b2b = Vec::with_capacity(rounds * per_round);
    let mut phases_ours_b2b = Vec::new();
    let mut phases_floor_b2b = Vec::new();
    let mut idle_rss_mib = None;
    let mut phases_ours = Vec::new();
    let mut phases_floor = Vec::new();
    for round in 0..rounds {
        env.wait_quiet(Duration::from_secs(30)).await?;
        let mut daemon = Daemon::start(env, None, "info", &format!("pickup-{round}"))?;
        daemon.wait_ready(Duration::from_secs(30)).await?;
        if round == 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            idle_rss_mib = procfs::rss_mib(daemon.pid());
        }
        let perf = if round == 0 {
            Perf::attach(env, daemon.pid(), "pickup")
        } else {
            Perf::attach_none()
        };
        let taken = sample(env, per_round, true, Pace::Paused, &mut ours).await?;
        perf.finish();
        phases_ours.extend(phases(env, &taken).await?);
        let taken = sample(env, per_round, true, Pace::BackToBack, &mut ours_b2b).await?;
        phases_ours_b2b.extend(phases(env, &taken).await?);
        daemon.stop().await?;

        env.wait_quiet(Duration::from_secs(30)).await?;
        let minimal = Minimal::start(&env.url, &env.probe, &env.fifo, 32).await?;
        let taken = sample(env, per_round, false, Pace::Paused, &mut floor).await?;
        phases_floor.extend(phases(env, &taken).await?);
        let taken = sample(env, per_round, false, Pace::BackToBack, &mut floor_b2b).await?;
        phases_floor_b2b.extend(phases(env, &taken).await?);
        minimal.stop().await?;
    }
    let baseline = report.add(Figure::new(
        "pickup, minimal daemon (baseline)",
        Unit::Millis,
        &floor,
    ));
    let connectord = report.add(
        Figure::new("pickup, connectord", Unit::Millis, &ours)
            .against(&baseline)
            .note("stored credential resolved on every run"),
    );
    report_phases(report, "minimal", &phases_floor);
    report_phases(report, "connectord", &phases_ours);
    let baseline_b2b = report.add(Figure::new(
        "pickup back to back, minimal daemon (baseline)",
        Unit::Millis,
        &floor_b2b,
    ));
    let connectord_b2b = report.add(
        Figure::new("pickup back to back, connectord", Unit::Millis, &ours_b2b)
            .against(&baseline_b2b)
            .note("each command sent as soon as the previous run is recorded"),
    );
    report_phases(report, "minimal, back to back", &phases_floor_b2b);
    report_phases(report, "connectord, back to back", &phases_ours_b2b);
    let plain = spawn_latency(env, SpawnStyle::Plain).await?;
    let plain = report.add(Figure::new(
        "  spawn -> probe running, posix_spawn",
        Unit::Millis,
        &plain,
    ));
    let ours = spawn_latency(env, SpawnStyle::Connectord).await?;
    report.add(
        Figure::new(
            "  spawn -> probe running, connectord::run::spawn",
            Unit::Millis,
            &ours,
        )
        .against(&plain)
        .note("clone(CLONE_VM|CLONE_VFORK) + PDEATHSIG + own pgid + pipes"),
    );
    let fork = spawn_latency(env, SpawnStyle::ForkHook).await?;
    report.add(
        Figure::new(
            "  spawn -> probe running, fork + pre_exec hook",
            Unit::Millis,
            &fork,
        )
        .against(&plain)
        .note("the same guarantees through std's fork path"),
    );
    for (figure, how) in [(&connectord, ""), (&connectord_b2b, ", back to back")] {
        if let (Some(r50), Some(r99)) = (figure.ratio_p50(), figure.ratio_p99()) {
            report.check(
                format!("P1 pickup p50 <= 1.3x minimal daemon{how}"),
                format!("{r50:.2}x"),
                Some(r50 <= 1.3),
            );
            report.check(
                format!("P1 pickup p99 <= 2x minimal daemon{how}"),
                format!("{r99:.2}x"),
                Some(r99 <= 2.0),
            );
        }
    }
    Ok(Pickup {
        connectord,
        idle_rss_mib,
    })
}

/// Spawn latency, one probe at a time, from this process.
async fn spawn_latency(env: &mut Env, style: SpawnStyle) -> anyhow::Result<Vec<f64>> {
    const COUNT: usize = 200;
    env.records.drain();
    let programs = env.programs();
    let spawned = tokio::task::spawn_blocking(move || spawn_one_at_a_time(&programs, COUNT, style))
        .await
        .context("spawn latency thread")??;
    let started: std::collections::HashMap<i64, i64> = env
        .records
        .collect(COUNT, Duration::from_secs(10))
        .await
        .into_iter()
        .map(|r| (r.run_id, r.started_ns))
        .collect();
    Ok(spawned
        .iter()
        .filter_map(|(id, before)| Some((started.get(id)? - before) as f64 / 1e6))
        .collect())
}

/// One sample: the command, when the bench began inserting it, and the
/// probe's report.
pub struct Taken {
    command_id: i64,
    inserted_ns: i64,
    probe: ProbeRecord,
}

/// Takes `count` samples (plus warm-up) against whichever daemon is running.
pub async fn sample(
    env: &mut Env,
    count: usize,
    expect_token: bool,
    pace: Pace,
    out: &mut Vec<f64>,
) -> anyhow::Result<Vec<Taken>> {
    let mut taken = Vec::with_capacity(count);
    let mut db = env.pool.acquire().await?;
    let mut settled = PgListener::connect_with(&env.pool).await?;
    settled.listen("connectord_runs").await?;
    env.records.drain();
    for i in 0..count + WARM_UP {
        let connection = &env.connections[i % env.connections.len()];
        let inserted_at = realtime_ns();
        let command_id: i64 = sqlx::query_scalar(
            "insert into run_commands (connection_id, trigger) values ($1, 'manual') returning id",
        )
        .bind(connection)
        .fetch_one(&mut *db)
        .await?;
        let record = env
            .records
            .next(Duration::from_secs(10))
            .await
            .context("no probe started within 10 s of a manual command")?;
        if expect_token && !record.had_token {
            bail!("the probe started without the stored credential in PROBE_TOKEN");
        }
        if i >= WARM_UP {
            out.push((record.started_ns - inserted_at) as f64 / 1e6);
            taken.push(Taken {
                command_id,
                inserted_ns: inserted_at,
                probe: record,
            });
        }
        // The next command goes in only after this run is recorded, so
        // samples never overlap.
        tokio::time::timeout(Duration::from_secs(10), settled.recv())
            .await
            .context("the run was not recorded within 10 s of its start")??;
        if pace == Pace::Paused {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    Ok(taken)
}

/// Where one sample's time went, from the timestamps PostgreSQL recorded
/// (`now()` is the start of each statement's transaction), in ms.
struct Phases {
    /// Bench starts the insert -> the daemon's claim statement starts:
    /// insert and commit, NOTIFY delivery, the daemon's wake-up.
    to_claim: f64,
    /// Claim statement starts -> probe running: the claim's round trip,
    /// for connectord the credential's decryption and the env build, and
    /// the spawn.
    to_probe: f64,
}

async fn phases(env: &Env, taken: &[Taken]) -> anyhow::Result<Vec<Phases>> {
    let ids: Vec<i64> = taken.iter().map(|t| t.command_id).collect();
    let rows: Vec<(i64, i64)> = sqlx::query_as(
        "select id, (extract(epoch from claimed_at) * 1e9)::bigint
         from run_commands where id = any($1) and claimed_at is not null",
    )
    .bind(&ids)
    .fetch_all(&env.pool)
    .await?;
    let claimed_at: std::collections::HashMap<i64, i64> = rows.into_iter().collect();
    let ms = |from: i64, to: i64| (to - from) as f64 / 1e6;
    Ok(taken
        .iter()
        .filter_map(|t| {
            let claimed = *claimed_at.get(&t.command_id)?;
            Some(Phases {
                to_claim: ms(t.inserted_ns, claimed),
                to_probe: ms(claimed, t.probe.started_ns),
            })
        })
        .collect())
}

fn report_phases(report: &mut Report, who: &str, phases: &[Phases]) {
    let to_claim: Vec<f64> = phases.iter().map(|p| p.to_claim).collect();
    let to_probe: Vec<f64> = phases.iter().map(|p| p.to_probe).collect();
    report.add(Figure::new(
        format!("  {who}: insert -> claim starts"),
        Unit::Millis,
        &to_claim,
    ));
    report.add(Figure::new(
        format!("  {who}: claim -> probe running"),
        Unit::Millis,
        &to_probe,
    ));
}
