//! P7, the sandbox's price (SPEC §12): pickup and throughput of the daemon
//! with the sandbox on, against the minimal daemon (unsandboxed, as in P1
//! and P2) plus the bare sandbox: the same mechanism (a run directory,
//! bubblewrap, the init, the probe; `connectord::run::child::spawn` with
//! `Confinement::Sandboxed`) started from this process with no daemon.
//! Rounds alternate the sandboxed daemon and the minimal daemon.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use connectord::config::Config;
use connectord::credentials::secret::Secret;
use connectord::run::child::{self, Confinement, Limits};
use connectord::run::child_env::{ChildEnv, PrivateDirs, RunMeta};
use connectord::run::dir::RunDirs;
use connectord::sandbox::{self, SandboxState};

use super::daemon::Daemon;
use super::minimal::{spawn_one_at_a_time, Minimal, SpawnStyle};
use super::pickup::{sample, Pace};
use super::setup::{realtime_ns, Env};
use super::stats::{Figure, Report, Unit};
use super::throughput::{once, Statistics};

pub async fn run(env: &mut Env, report: &mut Report) -> anyhow::Result<()> {
    report.say("");
    report.say("== P7 the sandbox: pickup and throughput with every child in bubblewrap ==");
    let config_path = env.sandboxed_config()?;
    let config = Config::load(&config_path)?;
    let bare = Arc::new(Bare::new(config, &env.daemon_bin).await?);
    let rounds = env.mode.pickup_rounds;
    let per_round = env.mode.pickup_samples_per_round;
    let (mut ours, mut minimal, mut bare_pickup, mut plain) = (vec![], vec![], vec![], vec![]);
    let (mut ours_tput, mut bare_tput) = (vec![], vec![]);
    for round in 0..rounds {
        env.wait_quiet(Duration::from_secs(30)).await?;
        let tag = format!("sandbox-{round}");
        let mut daemon = Daemon::start(env, Some(&config_path), "info", &tag)?;
        daemon.wait_ready(Duration::from_secs(30)).await?;
        sample(env, per_round, true, Pace::Paused, &mut ours).await?;
        if round < env.mode.throughput_rounds {
            ours_tput.push(
                once(
                    env,
                    report,
                    env.mode.throughput_commands / 4,
                    true,
                    Statistics::IdleWithHistory,
                )
                .await?,
            );
        }
        daemon.stop().await?;

        env.wait_quiet(Duration::from_secs(30)).await?;
        let daemon = Minimal::start(&env.url, &env.probe, &env.fifo, 32).await?;
        sample(env, per_round, false, Pace::Paused, &mut minimal).await?;
        daemon.stop().await?;

        bare_pickup.extend(bare_latency(env, &bare, 100).await?);
        plain.extend(plain_latency(env, 100).await?);
        if round < env.mode.throughput_rounds {
            bare_tput.push(bare_throughput(env, &bare, env.mode.throughput_commands / 4).await?);
        }
    }
    let plain = report.add(Figure::new(
        "  spawn -> probe running, posix_spawn",
        Unit::Millis,
        &plain,
    ));
    let bare_figure = report.add(
        Figure::new(
            "  spawn -> probe running, bare sandbox",
            Unit::Millis,
            &bare_pickup,
        )
        .against(&plain)
        .note("run directory + bubblewrap + init, no daemon"),
    );
    let minimal = report.add(Figure::new(
        "pickup, minimal daemon, unsandboxed (baseline)",
        Unit::Millis,
        &minimal,
    ));
    let ours = report.add(
        Figure::new("pickup, connectord, sandboxed", Unit::Millis, &ours)
            .against(&minimal)
            .note("stored credential resolved on every run"),
    );
    let p50 = |figure: &Figure| figure.summary.map(|s| s.p50);
    let (Some(ours50), Some(min50), Some(bare50), Some(plain50)) =
        (p50(&ours), p50(&minimal), p50(&bare_figure), p50(&plain))
    else {
        bail!("a pickup figure has no samples");
    };
    let floor = min50 + bare50;
    report.say(&format!(
        "  floor: minimal daemon + bare sandbox = {min50:.3} + {bare50:.3} = {floor:.3} ms p50; \
         without counting the plain spawn twice: {:.3} ms",
        floor - plain50
    ));
    report.check(
        "P7 sandboxed pickup p50 <= 1.3x (minimal daemon + bare sandbox)",
        format!("{:.2}x", ours50 / floor),
        Some(ours50 <= 1.3 * floor),
    );
    if !ours_tput.is_empty() {
        let bare = report.add(Figure::new(
            "throughput, bare sandbox, spawn-only, 32 in flight (ceiling)",
            Unit::PerSecond,
            &bare_tput,
        ));
        report.add(
            Figure::new(
                "throughput, connectord, sandboxed",
                Unit::PerSecond,
                &ours_tput,
            )
            .against(&bare),
        );
    }
    Ok(())
}

/// The sandbox as the daemon sets it up, driven from here.
struct Bare {
    config: Config,
    sandbox: SandboxState,
    run_dirs: RunDirs,
    shutdown: CancellationToken,
    fifo: PathBuf,
}

impl Bare {
    async fn new(config: Config, daemon_bin: &std::path::Path) -> anyhow::Result<Bare> {
        let sandbox = SandboxState::start_with_init(&config, daemon_bin).await;
        if let SandboxState::Unavailable(reason) = &sandbox {
            bail!("the sandbox is unavailable here: {reason}");
        }
        let fifo = config.connectors["probe"]
            .env
            .get("PROBE_OUT")
            .context("the probe's PROBE_OUT")?
            .into();
        Ok(Bare {
            config,
            sandbox,
            run_dirs: RunDirs::create()?,
            shutdown: CancellationToken::new(),
            fifo,
        })
    }

    /// One probe, start to end, as `launch` runs it.
    async fn run(&self, id: i64) -> anyhow::Result<()> {
        let sandbox = self.sandbox.ready().context("the sandbox is not ready")?;
        let connector = &self.config.connectors["probe"];
        let run_dir = self.run_dirs.create_run(id, true)?;
        let env = ChildEnv::build(
            &self.config,
            connector,
            &RunMeta {
                run_id: id,
                connection_id: "bench-0000",
                trigger: connectord::vocabulary::Trigger::Manual,
                attempt: 1,
                private: Some(PrivateDirs {
                    home: sandbox::HOME_INSIDE,
                    tmp: sandbox::TMP_INSIDE,
                }),
                state_file: None,
            },
            vec![("PROBE_TOKEN".to_owned(), Secret::new("token".to_owned()))],
            |name| (name == "PATH").then(|| "/usr/bin:/bin".into()),
        );
        let confinement = Confinement::Sandboxed {
            sandbox,
            run_dir: run_dir.path(),
        };
        let running = child::spawn(connector, &env, confinement, self.config.daemon.spawn).await?;
        drop(env);
        let (superseded, cancelled) = (CancellationToken::new(), CancellationToken::new());
        let outcome = running
            .supervise(
                Limits {
                    timeout: Duration::from_secs(60),
                    kill_grace: Duration::from_secs(1),
                    shutdown_grace: Duration::from_secs(1),
                    shutdown: &self.shutdown,
                    superseded: &superseded,
                    cancelled: &cancelled,
                },
                |_| {},
            )
            .await;
        run_dir.remove().await;
        anyhow::ensure!(
            outcome.exit == child::Exit::Code(0),
            "the sandboxed probe ended with {:?} (fifo {})",
            outcome.exit,
            self.fifo.display()
        );
        Ok(())
    }
}

/// Spawn -> probe running through the bare sandbox, one at a time.
async fn bare_latency(env: &mut Env, bare: &Arc<Bare>, count: usize) -> anyhow::Result<Vec<f64>> {
    env.records.drain();
    let mut before = Vec::with_capacity(count);
    for i in 0..count {
        let id = 3_000_000_000 + i as i64;
        before.push((id, realtime_ns()));
        bare.run(id).await?;
    }
    latencies(env, before).await
}

async fn plain_latency(env: &mut Env, count: usize) -> anyhow::Result<Vec<f64>> {
    env.records.drain();
    let programs = env.programs();
    let before = tokio::task::spawn_blocking(move || {
        spawn_one_at_a_time(&programs, count, SpawnStyle::Plain)
    })
    .await
    .context("spawn latency thread")??;
    latencies(env, before).await
}

/// Pairs (probe id, instant before its spawn) with the probes' own reports.
async fn latencies(env: &mut Env, before: Vec<(i64, i64)>) -> anyhow::Result<Vec<f64>> {
    let started: std::collections::HashMap<i64, i64> = env
        .records
        .collect(before.len(), Duration::from_secs(10))
        .await
        .into_iter()
        .map(|r| (r.run_id, r.started_ns))
        .collect();
    Ok(before
        .iter()
        .filter_map(|(id, at)| Some((started.get(id)? - at) as f64 / 1e6))
        .collect())
}

/// Bare sandboxed probes, 32 in flight; runs per second.
async fn bare_throughput(env: &mut Env, bare: &Arc<Bare>, count: usize) -> anyhow::Result<f64> {
    env.records.drain();
    let slots = Arc::new(Semaphore::new(32));
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    for i in 0..count {
        let permit = slots.clone().acquire_owned().await?;
        let bare = bare.clone();
        tasks.spawn(async move {
            let _permit = permit;
            bare.run(4_000_000_000 + i as i64).await
        });
        while let Some(done) = tasks.try_join_next() {
            done??;
        }
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let elapsed = started.elapsed();
    let records = env.records.collect(count, Duration::from_secs(10)).await;
    if records.len() != count {
        bail!("{} of {count} sandboxed probes reported", records.len());
    }
    Ok(count as f64 / elapsed.as_secs_f64())
}
