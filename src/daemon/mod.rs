//! The daemon: wires the listener, the schedule engine, the command queue
//! and the lease keeper together, and shuts them down in order.
//!
//! Shutdown is a `CancellationToken` passed in, so tests and `dev` can stop
//! the daemon the same way SIGTERM does: stop claiming, let running children
//! finish for `shutdown_grace`, terminate the rest, record them
//! `interrupted` and re-queue their commands.

pub(crate) mod listener;
pub(crate) mod memory;
pub(crate) mod presence;
pub(crate) mod retention;
pub(crate) mod shutdown;
pub(crate) mod supervisor;
pub(crate) mod systemd;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use sqlx::PgPool;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::credentials::keys::Keyring;
use crate::daemon::supervisor::{Ended, Tasks};
use crate::daemon::systemd::{Heartbeats, Notifier};
use crate::db::Backoff;
use crate::metrics::Metrics;
use crate::queue::dispatch;
use crate::run::dir::RunDirs;
use crate::run::launch::Context;
use crate::run::leases::{self, Leases};
use crate::run::record::{OutcomeWriter, StartWriter};
use crate::run::rescue;
use crate::sandbox::SandboxState;
use crate::schedule::Engine;

/// Loads the key directory. A directory that does not exist is not fatal
/// (connectors that need no credential still run, and stored credentials are
/// refused as unrecoverable), but a key file with a loose mode or the wrong
/// length stops start-up.
pub fn load_keyring(config: &Config) -> anyhow::Result<Option<Keyring>> {
    let dir = config.keys.resolved_dir();
    if !dir.exists() {
        tracing::warn!(dir = %dir.display(), "key directory does not exist; stored credentials cannot be decrypted");
        return Ok(None);
    }
    let keyring = Keyring::load(&dir, &config.keys.primary)?;
    Ok(Some(keyring))
}

/// Re-encrypts the credentials stored before they were bound to their
/// connector, which are refused until then. Only a daemon holds the keys,
/// so this is its start's work rather than a migration's.
async fn bind_connectors(pool: &PgPool, keyring: &Keyring) -> anyhow::Result<()> {
    let bound = crate::credentials::store::bind_connectors(pool, keyring)
        .await
        .context("binding stored credentials to their connector")?;
    if bound.rotated > 0 {
        tracing::info!(
            credentials = bound.rotated,
            "re-encrypted credentials stored before they were bound to their connector"
        );
    }
    for (id, reason) in &bound.failed {
        tracing::error!(
            credential_id = id,
            "a credential stored before credentials were bound to their connector does not decrypt, and will be refused as credential_unrecoverable: {reason}"
        );
    }
    Ok(())
}

/// Connects to the database, retrying with backoff until `shutdown`, and
/// refuses an address that does not keep sessions (see
/// [`crate::db::keeps_sessions`]).
pub async fn connect(config: &Config, shutdown: &CancellationToken) -> anyhow::Result<PgPool> {
    let mut backoff = Backoff::new();
    loop {
        let attempt = async {
            let pool = crate::db::connect_daemon(&config.database).await?;
            let kept = crate::db::keeps_sessions(&pool).await?;
            Ok::<_, sqlx::Error>((pool, kept))
        };
        match attempt.await {
            Ok((pool, true)) => return Ok(pool),
            Ok((_, false)) => anyhow::bail!(crate::db::sessions_not_kept(&config.database.url)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach the database; retrying");
                tokio::select! {
                    () = tokio::time::sleep(backoff.next_delay()) => {}
                    () = shutdown.cancelled() => anyhow::bail!("shut down before the database was reachable"),
                }
            }
        }
    }
}

/// Runs the daemon until `shutdown` is cancelled and every run has been
/// settled. `on_ready` is called once schedules are loaded and the queue
/// is listening.
pub async fn run(
    config: Config,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(usize),
) -> anyhow::Result<()> {
    crate::daemon::memory::configure();
    let keyring = load_keyring(&config)?;
    let pool = connect(&config, &shutdown).await?;
    crate::db::migrate(&pool)
        .await
        .context("applying migrations")?;
    let instance_id = config.daemon.resolved_instance_id();
    // How children are created is logged because a child started either
    // way looks the same from inside.
    tracing::info!(
        instance_id = %instance_id,
        spawn = config.daemon.spawn.as_str(),
        "connectord starting"
    );
    if let Some(keyring) = &keyring {
        bind_connectors(&pool, keyring).await?;
    }

    let sandbox = SandboxState::start(&config).await;
    let run_dirs = match RunDirs::create() {
        Ok(run_dirs) => Some(run_dirs),
        Err(e) => {
            tracing::error!(error = %e, "there is no directory for runs' private files; every run will fail to start");
            None
        }
    };
    match (&sandbox, &run_dirs) {
        (SandboxState::Ready(sandbox), Some(run_dirs)) => {
            tracing::info!(bwrap = %sandbox.bwrap().display(), runs = %run_dirs.root().display(), "connector children run in the sandbox");
        }
        (SandboxState::Ready(_), None) => {
            tracing::error!("the sandbox has no directory for runs' private files; every run will be refused as sandbox_unavailable");
        }
        (SandboxState::Unavailable(reason), _) => {
            tracing::error!("the sandbox cannot be set up: {reason}; every run will be refused as sandbox_unavailable until this is fixed and the daemon restarted");
        }
        (SandboxState::Disabled, _) => {
            tracing::warn!("the sandbox is disabled ([sandbox] enabled = false): connector children run with the daemon's account and its view of the machine, and can read each other's credentials");
        }
    }
    let known_connectors = config.connectors.keys().cloned().collect();
    // Bound before anything else starts, so a port in use stops the start
    // with a sentence rather than leaving a daemon without its metrics.
    let metrics_listener =
        match config.metrics.listen {
            Some(address) => Some(tokio::net::TcpListener::bind(address).await.with_context(
                || format!("cannot serve metrics on {address} ([metrics] listen)"),
            )?),
            None => None,
        };
    let mut tasks = Tasks::default();
    let (outcomes, write_outcomes) = OutcomeWriter::new(pool.clone(), instance_id.clone());
    let (starts, write_starts) = StartWriter::new(pool.clone(), instance_id.clone());
    tasks.spawn("outcome writer", write_outcomes);
    tasks.spawn("start writer", write_starts);
    let ctx = Arc::new(Context {
        pool: pool.clone(),
        config: Arc::new(config),
        keyring: keyring.map(Arc::new),
        outcomes,
        starts,
        instance_id,
        shutdown: shutdown.clone(),
        leases: Arc::new(Leases::default()),
        known_connectors,
        sandbox,
        run_dirs,
        waiting: Default::default(),
        metrics: Arc::new(Metrics::new()),
    });
    // Runs this instance id left running before a restart are not ours any
    // more: settle them before renewing leases under the same name.
    rescue::leftovers_of_previous_start(&ctx)
        .await
        .context("settling runs left by a previous start")?;
    presence::announce(&pool, &ctx.instance_id)
        .await
        .context("recording this daemon in the daemons table")?;
    let instance_id = ctx.instance_id.clone();

    let notifier = Arc::new(Notifier::from_env());
    let heartbeats = Arc::new(Heartbeats::new());
    let wake = Arc::new(Notify::new());
    let (edits_tx, edits_rx) = mpsc::channel(4096);
    let stop_loops = CancellationToken::new();

    let Some(listener) = listener::connect(&pool, &shutdown).await else {
        return Ok(());
    };
    tasks.spawn(
        "listener",
        listener::listen(
            listener,
            pool.clone(),
            edits_tx,
            wake.clone(),
            ctx.waiting.clone(),
            ctx.leases.clone(),
            stop_loops.clone(),
        ),
    );

    if let Some(listener) = metrics_listener {
        let address = listener
            .local_addr()
            .map_or_else(|_| "?".to_owned(), |a| a.to_string());
        tracing::info!(%address, "serving Prometheus metrics at /metrics");
        tasks.spawn(
            "metrics",
            crate::metrics::serve(
                listener,
                ctx.metrics.clone(),
                pool.clone(),
                ctx.leases.clone(),
                stop_loops.clone(),
            ),
        );
    }
    let engine = Engine::new(
        pool.clone(),
        ctx.config.daemon.catchup_window,
        ctx.instance_id.clone(),
        ctx.config.daemon.lease,
        ctx.metrics.clone(),
    );
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    tasks.spawn(
        "schedule engine",
        engine.run(
            edits_rx,
            ctx.config.daemon.reconcile_interval,
            stop_loops.clone(),
            ready_tx,
            heartbeats.clone(),
        ),
    );
    tasks.spawn(
        "lease keeper",
        leases::keep(ctx.clone(), stop_loops.clone()),
    );
    tasks.spawn(
        "retention",
        retention::run(
            pool.clone(),
            ctx.config.retention.clone(),
            stop_loops.clone(),
        ),
    );
    tasks.spawn(QUEUE, dispatch::run(ctx.clone(), wake, heartbeats.clone()));

    // Until shutdown, every task's end is a failure.
    let mut failed: Option<&'static str> = None;
    let mut ready_rx = Some(ready_rx);
    let mut heartbeats = Some(heartbeats);
    let mut on_ready = Some(on_ready);
    loop {
        tokio::select! {
            // First: the queue loop returns once it sees shutdown, which
            // is then no failure.
            biased;
            () = shutdown.cancelled() => break,
            loaded = async { ready_rx.as_mut().expect("guarded").await }, if ready_rx.is_some() => {
                ready_rx = None;
                let schedules = loaded.unwrap_or(0);
                tracing::info!(schedules, "connectord ready");
                notifier.notify("READY=1");
                let link = systemd::link(
                    ctx.clone(),
                    notifier.clone(),
                    heartbeats.take().expect("ready once"),
                    stop_loops.clone(),
                );
                tasks.spawn("systemd link", link);
                if let Some(on_ready) = on_ready.take() {
                    on_ready(schedules);
                }
            }
            Some(ended) = tasks.next_ended() => {
                unexpected(&ended);
                failed = Some(ended.name);
                if ended.name == QUEUE {
                    stop_loops.cancel();
                }
                shutdown.cancel();
                break;
            }
        }
    }

    notifier.notify("STOPPING=1");
    tracing::info!("shutting down: no new runs are claimed; running connectors may finish");
    // The queue loop returns once every launch has settled its run; then
    // the loops stop, and the writers once the last handle is gone. Each
    // of those steps is bounded, so the whole drain is too.
    let daemon = &ctx.config.daemon;
    let deadline = daemon.shutdown_grace + daemon.kill_grace * 4 + Duration::from_secs(10);
    drop(ctx);
    let drain = async {
        while let Some(ended) = tasks.next_ended().await {
            if !ended.returned {
                unexpected(&ended);
                failed.get_or_insert(ended.name);
            }
            if ended.name == QUEUE {
                stop_loops.cancel();
            }
        }
    };
    let stuck = tokio::time::timeout(deadline, drain).await.is_err();
    if stuck {
        tracing::error!(
            ?deadline,
            "the daemon's tasks did not stop in time; abandoning them"
        );
        tasks.abort_all();
    }
    if let Err(e) = presence::stopped(&pool, &instance_id).await {
        tracing::warn!(error = %e, "could not record this daemon's stop in the daemons table");
    }
    pool.close().await;
    if stuck {
        anyhow::bail!("the daemon's tasks did not stop within {deadline:?} of shutdown");
    }
    if let Some(task) = failed {
        anyhow::bail!("the daemon stopped because its {task} task ended unexpectedly");
    }
    tracing::info!("connectord stopped");
    Ok(())
}

/// The name of the queue loop's task: the drain waits for it first.
const QUEUE: &str = "queue";

fn unexpected(ended: &Ended) {
    let how = if ended.returned {
        "returned"
    } else {
        "panicked"
    };
    tracing::error!(
        task = ended.name,
        "the daemon's {} task {how} unexpectedly; stopping so the service manager restarts the daemon",
        ended.name
    );
}
