//! The daemon: wires the listener, the schedule engine, the command queue
//! and the lease keeper together, and shuts them down in order.
//!
//! Shutdown is a `CancellationToken` passed in, so tests and `dev` can stop
//! the daemon the same way SIGTERM does: stop claiming, let running children
//! finish for `shutdown_grace`, terminate the rest, record them
//! `interrupted` and re-queue their commands.

pub(crate) mod memory;
pub(crate) mod retention;
pub(crate) mod supervisor;
pub(crate) mod systemd;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use sqlx::postgres::PgListener;
use sqlx::{PgConnection, PgPool};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::credentials::keys::Keyring;
use crate::daemon::supervisor::{Ended, Tasks};
use crate::daemon::systemd::{watchdog_interval, Heartbeats, Notifier};
use crate::db::Backoff;
use crate::queue;
use crate::run::dir::RunDirs;
use crate::run::failure::FailureKind;
use crate::run::launch::{self, retry_delay, Context};
use crate::run::record::{OutcomeWriter, StartWriter};
use crate::sandbox::SandboxState;
use crate::schedule::{Edit, Engine};

/// Channels the daemon listens on.
const SCHEDULES_CHANNEL: &str = "connectord_schedules";
const COMMANDS_CHANNEL: &str = "connectord_commands";

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

/// Connects to the database, retrying with backoff until `shutdown`.
pub async fn connect(config: &Config, shutdown: &CancellationToken) -> anyhow::Result<PgPool> {
    let mut backoff = Backoff::new();
    loop {
        match crate::db::connect_daemon(&config.database).await {
            Ok(pool) => return Ok(pool),
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
    tracing::info!(instance_id = %instance_id, "connectord starting");
    if let Some(keyring) = &keyring {
        bind_connectors(&pool, keyring).await?;
    }

    let sandbox = SandboxState::start(&config).await;
    let run_dirs = match &sandbox {
        SandboxState::Ready(sandbox) => match RunDirs::create() {
            Ok(run_dirs) => {
                tracing::info!(bwrap = %sandbox.bwrap().display(), runs = %run_dirs.root().display(), "connector children run in the sandbox");
                Some(run_dirs)
            }
            Err(e) => {
                tracing::error!(error = %e, "the sandbox has no directory for runs' private files; every run will be refused as sandbox_unavailable");
                None
            }
        },
        SandboxState::Unavailable(reason) => {
            tracing::error!("the sandbox cannot be set up: {reason}; every run will be refused as sandbox_unavailable until this is fixed and the daemon restarted");
            None
        }
        SandboxState::Disabled => {
            tracing::warn!("the sandbox is disabled ([sandbox] enabled = false): connector children run with the daemon's account and its view of the machine, and can read each other's credentials");
            None
        }
    };
    let known_connectors = config.connectors.keys().cloned().collect();
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
        running: Mutex::new(HashMap::new()),
        starting: Mutex::new(HashSet::new()),
        known_connectors,
        sandbox,
        run_dirs,
    });
    // Runs this instance id left running before a restart are not ours any
    // more: settle them before renewing leases under the same name.
    rescue(&ctx, true)
        .await
        .context("settling runs left by a previous start")?;

    let notifier = Arc::new(Notifier::from_env());
    let heartbeats = Arc::new(Heartbeats::new());
    let wake = Arc::new(Notify::new());
    let (edits_tx, edits_rx) = mpsc::channel(4096);
    let stop_loops = CancellationToken::new();

    let Some(listener) = connect_listener(&pool, &shutdown).await else {
        return Ok(());
    };
    tasks.spawn(
        "listener",
        listen(listener, edits_tx, wake.clone(), stop_loops.clone()),
    );

    let engine = Engine::new(pool.clone(), ctx.config.daemon.catchup_window);
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
        lease_keeper(ctx.clone(), stop_loops.clone()),
    );
    tasks.spawn(
        "retention",
        crate::daemon::retention::run(
            pool.clone(),
            ctx.config.retention.clone(),
            stop_loops.clone(),
        ),
    );
    tasks.spawn(QUEUE, queue_loop(ctx.clone(), wake, heartbeats.clone()));

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
                let link = supervisor_link(
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

/// Connects the notification listener, retrying until `stop`. The daemon
/// listens before it loads schedules, so no edit made after "ready" can be
/// missed.
async fn connect_listener(pool: &PgPool, stop: &CancellationToken) -> Option<PgListener> {
    let mut backoff = Backoff::new();
    loop {
        let attempt = async {
            let mut listener = PgListener::connect_with(pool).await?;
            listener
                .listen_all([SCHEDULES_CHANNEL, COMMANDS_CHANNEL])
                .await?;
            Ok::<_, sqlx::Error>(listener)
        };
        match attempt.await {
            Ok(listener) => return Some(listener),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for notifications; retrying");
                tokio::select! {
                    () = tokio::time::sleep(backoff.next_delay()) => {}
                    () = stop.cancelled() => return None,
                }
            }
        }
    }
}

/// Forwards notifications: schedule edits to the engine, new commands to
/// the queue. A lost connection is re-established by the listener, after
/// which everything is re-read, since notifications sent meanwhile are lost.
async fn listen(
    mut listener: PgListener,
    edits: mpsc::Sender<Edit>,
    wake: Arc<Notify>,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new();
    let mut failing = false;
    loop {
        let received = tokio::select! {
            received = listener.try_recv() => received,
            () = stop.cancelled() => return,
        };
        match received {
            Ok(Some(notification)) => {
                if failing {
                    tracing::info!("listening for notifications again");
                    failing = false;
                    backoff = Backoff::new();
                }
                match notification.channel() {
                    SCHEDULES_CHANNEL => match notification.payload().parse::<i64>() {
                        Ok(id) => {
                            if edits.try_send(Edit::Row(id)).is_err() {
                                // The engine is behind; a full re-read covers
                                // whatever did not fit.
                                let _ = edits.send(Edit::Reconcile).await;
                            }
                        }
                        Err(_) => {
                            let _ = edits.send(Edit::Reconcile).await;
                        }
                    },
                    _ => wake.notify_one(),
                }
            }
            Ok(None) => {
                // Connection lost; the next call reconnects and re-listens.
                if !failing {
                    tracing::warn!("notification connection lost; reconnecting");
                }
                failing = true;
                let _ = edits.send(Edit::Reconcile).await;
                wake.notify_one();
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "notification connection failed; reconnecting with backoff");
                }
                failing = true;
                tokio::select! {
                    () = tokio::time::sleep(backoff.next_delay()) => {}
                    () = stop.cancelled() => return,
                }
            }
        }
    }
}

/// Claims commands while there is capacity and launches each one; waits
/// for a notification, a finished run or the poll interval otherwise.
async fn queue_loop(ctx: Arc<Context>, wake: Arc<Notify>, heartbeats: Arc<Heartbeats>) {
    let max = ctx.config.daemon.max_concurrent_runs as usize;
    let global = Arc::new(Semaphore::new(max));
    let per_connector: HashMap<String, Arc<Semaphore>> = ctx
        .config
        .connectors
        .iter()
        .map(|(name, c)| {
            (
                name.clone(),
                Arc::new(Semaphore::new(c.max_concurrency as usize)),
            )
        })
        .collect();
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut backoff = Backoff::new();
    let mut failing = false;
    // Whether a claim may find work: after a notification or the poll
    // interval, and after a run ends only when the last claim was cut short
    // by a limit. Claims that are sure to come back empty are not sent.
    let mut claim = true;
    let mut limited = false;
    // Claims go through a connection of their own, out of the pool. sqlx
    // pings a pooled connection when it hands it out and again when it
    // takes it back: the first ping is a round trip between a new command
    // and its claim, the second competes with the launch for the CPU.
    let mut session: Option<PgConnection> = None;
    loop {
        if ctx.shutdown.is_cancelled() {
            break;
        }
        heartbeats.queue_alive();
        let mut delay = ctx.config.daemon.poll_interval;
        if claim {
            let round = claim_and_launch(&ctx, &mut session, &global, &per_connector, &mut tasks);
            match round.await {
                Ok(round) => {
                    if failing {
                        tracing::info!("command queue reached the database again");
                    }
                    failing = false;
                    backoff = Backoff::new();
                    limited = round.limited;
                    // A full batch may have left more behind.
                    if round.filled && global.available_permits() > 0 {
                        continue;
                    }
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "command queue cannot reach the database; retrying with backoff");
                    }
                    failing = true;
                    delay = backoff.next_delay();
                }
            }
        }
        claim = tokio::select! {
            () = wake.notified() => true,
            () = tokio::time::sleep(delay) => true,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => limited,
            () = ctx.shutdown.cancelled() => break,
        };
    }
    // Every launch watches the same token and settles its run.
    while tasks.join_next().await.is_some() {}
}

/// What one claim round found.
struct Round {
    /// The claim returned as many commands as it asked for.
    filled: bool,
    /// A daemon-wide or connector limit kept commands back.
    limited: bool,
}

/// One claim round.
async fn claim_and_launch(
    ctx: &Arc<Context>,
    session: &mut Option<PgConnection>,
    global: &Arc<Semaphore>,
    per_connector: &HashMap<String, Arc<Semaphore>>,
    tasks: &mut JoinSet<()>,
) -> Result<Round, sqlx::Error> {
    let available = global.available_permits();
    if available == 0 {
        return Ok(Round {
            filled: false,
            limited: true,
        });
    }
    let full: Vec<String> = per_connector
        .iter()
        .filter(|(_, s)| s.available_permits() == 0)
        .map(|(name, _)| name.clone())
        .collect();
    let limit = available.min(64) as i64;
    let conn = match session {
        Some(conn) => conn,
        None => session.insert(crate::db::claim_session(&ctx.pool).await?),
    };
    let claimed = queue::claim(conn, &ctx.instance_id, limit, &full, &ctx.known_connectors);
    let commands = match claimed.await {
        Ok(commands) => commands,
        // Another daemon took a slot this claim wanted: nothing was
        // claimed, and the next claim sees that connection busy.
        Err(e) if queue::lost_slot_race(&e) => {
            tracing::debug!("another daemon claimed a run slot first; claiming again");
            return Ok(Round {
                filled: true,
                limited: false,
            });
        }
        Err(e) => {
            // The connection may be the problem; the next round takes a
            // fresh one.
            *session = None;
            return Err(e);
        }
    };
    if !commands.is_empty() {
        crate::daemon::supervisor::fault("queue.claimed");
    }
    let mut round = Round {
        filled: commands.len() as i64 == limit,
        limited: !full.is_empty(),
    };
    for command in commands {
        let connector_semaphore = command
            .command
            .connector
            .as_ref()
            .and_then(|c| per_connector.get(c));
        let permits = match (global.clone().try_acquire_owned(), connector_semaphore) {
            (Ok(global_permit), None) => Some((global_permit, None)),
            (Ok(global_permit), Some(semaphore)) => semaphore
                .clone()
                .try_acquire_owned()
                .ok()
                .map(|permit| (global_permit, Some(permit))),
            (Err(_), _) => None,
        };
        let Some(permits) = permits else {
            // Claimed in the same batch as others of its connector beyond
            // the connector's limit: give it back for later.
            queue::release(&ctx.pool, command.command.id).await?;
            round.limited = true;
            continue;
        };
        let ctx = ctx.clone();
        tasks.spawn(async move {
            let _permits: (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>) = permits;
            let command_id = command.command.id;
            if let Err(e) = launch::launch(&ctx, command).await {
                tracing::error!(command_id, error = %e, "launch failed on a database error; the command will be retried by lease rescue");
            }
        });
    }
    round.limited |= global.available_permits() == 0;
    Ok(round)
}

/// Renews the leases of this daemon's running runs and settles runs whose
/// owner stopped renewing (`lost`), about three times per lease.
async fn lease_keeper(ctx: Arc<Context>, stop: CancellationToken) {
    let period = ctx.config.daemon.lease / 3;
    let mut failing = false;
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = stop.cancelled() => return,
        }
        // Said once when it starts failing and once when it recovers: an
        // outage must not write a line every few seconds.
        let result = match renew_leases(&ctx).await {
            Ok(()) => rescue(&ctx, false).await.map_err(|e| ("rescue", e)),
            Err(e) => Err(("renewal", e)),
        };
        match result {
            Ok(()) if failing => {
                tracing::info!("lease renewal and rescue work again");
                failing = false;
            }
            Ok(()) => {}
            Err((what, e)) if !failing => {
                tracing::warn!(error = %e, "lease {what} failed; running runs may be taken for lost by another daemon if this lasts past their lease");
                failing = true;
            }
            Err(_) => {}
        }
    }
}

/// Extends the leases of our running runs. A run whose lease could not be
/// extended belongs to another daemon now (ours expired while we could not
/// reach the database, and it was rescued): its child is stopped, so no two
/// runs of one connection overlap.
async fn renew_leases(ctx: &Context) -> Result<(), sqlx::Error> {
    // Only runs whose row is recorded: one still starting has no lease yet.
    let ids = running_runs(ctx);
    if ids.is_empty() {
        return Ok(());
    }
    let renewed: Vec<i64> = sqlx::query_scalar(
        "update runs set lease_expires_at = now() + $3 * interval '1 millisecond'
         where id = any($1) and status = 'running' and instance_id = $2
         returning id",
    )
    .bind(&ids)
    .bind(&ctx.instance_id)
    .bind(ctx.config.daemon.lease.as_millis() as f64)
    .fetch_all(&ctx.pool)
    .await?;
    if renewed.len() < ids.len() {
        // Only runs that were asked about and not renewed are lost to us;
        // runs that started after the snapshot were not asked about.
        let running = ctx.running();
        for id in ids.iter().filter(|id| !renewed.contains(id)) {
            if let Some(superseded) = running.get(id) {
                superseded.cancel();
            }
        }
    }
    Ok(())
}

/// Ids of the runs this daemon has going whose rows are recorded.
fn running_runs(ctx: &Context) -> Vec<i64> {
    ctx.running().keys().copied().collect()
}

/// Ids of the runs this daemon has going, including those whose start is
/// still being recorded (its write may have landed without its answer).
fn live_runs(ctx: &Context) -> Vec<i64> {
    let mut ids = running_runs(ctx);
    ids.extend(ctx.starting().iter().copied());
    ids
}

#[derive(sqlx::FromRow)]
struct LostRun {
    id: i64,
    connection_id: String,
    connector: Option<String>,
    schedule_id: Option<i64>,
    attempt: i32,
    instance_id: Option<String>,
}

/// Marks expired runs (or, at start-up, this instance's leftovers) `lost`,
/// and so runs whose daemon died before recording their start, applies the
/// retry policy, and frees commands claimed by a daemon that died before
/// deciding them.
async fn rescue(ctx: &Context, own_leftovers: bool) -> Result<(), sqlx::Error> {
    // Our own live runs are never lost, even when an outage kept us from
    // renewing their leases: their outcome is written once the database
    // answers.
    let live = live_runs(ctx);
    let mut lost: Vec<LostRun> = sqlx::query_as(
        "with lost as (
             update runs
             set status = 'failed', failure_kind = 'lost', finished_at = now(), lease_expires_at = null,
                 failure_detail = 'the daemon running it (' || coalesce(instance_id, '?') || ') stopped renewing its lease'
             where status = 'running'
               and (lease_expires_at < now() or ($1 and instance_id = $2))
               and not (id = any($3))
             returning id, command_id, connection_id, connector, schedule_id, attempt, instance_id
         ), freed as (
             update run_commands rc set status = 'done'
             from lost
             where rc.id = lost.command_id and rc.status = 'claimed' and rc.run_id = lost.id
         )
         select id, connection_id, connector, schedule_id, attempt, instance_id from lost",
    )
    .bind(own_leftovers)
    .bind(&ctx.instance_id)
    .bind(&live)
    .fetch_all(&ctx.pool)
    .await?;
    let stale_claim_ms = ctx.config.daemon.lease.as_millis() as f64 * 2.0;
    // A claim that took a slot but whose daemon stopped before recording
    // the run's start: its child, if it was spawned, died with it (children
    // never outlive their daemon). It is recorded as `lost` under the run
    // id the claim reserved, so it counts as an attempt. Inserting that row
    // is also what arbitrates against a start write landing late: the
    // run's primary key lets only one of the two in.
    let orphaned: Vec<LostRun> = sqlx::query_as(
        "with orphaned as (
             select rc.id, rc.connection_id, rc.trigger, rc.schedule_id, rc.scheduled_for,
                    rc.attempt, rc.run_id, rc.claimed_by
             from run_commands rc
             where rc.status = 'claimed' and rc.run_id is not null
               and (rc.claimed_at < now() - $1 * interval '1 millisecond' or ($2 and rc.claimed_by = $3))
               and not (rc.run_id = any($4))
               and not exists (select 1 from runs r where r.id = rc.run_id)
             for update of rc skip locked
         ), lost as (
             insert into runs (id, command_id, connection_id, connector, trigger, schedule_id,
                               scheduled_for, attempt, status, failure_kind, failure_detail,
                               instance_id, finished_at)
             select o.run_id, o.id, o.connection_id, c.connector, o.trigger, o.schedule_id,
                    o.scheduled_for, o.attempt, 'failed', 'lost',
                    'the daemon that claimed it (' || coalesce(o.claimed_by, '?') || ') stopped before recording its start',
                    o.claimed_by, now()
             from orphaned o left join connections c on c.id = o.connection_id
             on conflict (id) do nothing
             returning id, command_id, connection_id, connector, schedule_id, attempt, instance_id
         ), freed as (
             update run_commands rc set status = 'done'
             from lost
             where rc.id = lost.command_id
         )
         select id, connection_id, connector, schedule_id, attempt, instance_id from lost",
    )
    .bind(stale_claim_ms)
    .bind(own_leftovers)
    .bind(&ctx.instance_id)
    .bind(&live)
    .fetch_all(&ctx.pool)
    .await?;
    lost.extend(orphaned);
    for run in lost {
        let policy = run
            .connector
            .as_ref()
            .and_then(|c| ctx.config.connectors.get(c))
            .map(|c| c.retry)
            .unwrap_or_default();
        let retry_after = retry_delay(&policy, run.attempt, FailureKind::Lost);
        tracing::warn!(
            event = "run.lost",
            run_id = run.id,
            connection = %run.connection_id,
            owner = run.instance_id.as_deref().unwrap_or("?"),
            retry_in_ms = retry_after.map(|d| d.as_millis() as u64),
            "run lost: its daemon stopped"
        );
        sqlx::query(
            "insert into run_commands (connection_id, trigger, schedule_id, attempt, parent_run_id, not_before)
             select $1, 'retry', $2, $3, $4, now() + $5 * interval '1 millisecond'
             where $5 is not null",
        )
        .bind(&run.connection_id)
        .bind(run.schedule_id)
        .bind(run.attempt + 1)
        .bind(run.id)
        .bind(retry_after.map(|d| d.as_millis() as f64))
        .execute(&ctx.pool)
        .await?;
    }
    // A claim that took no slot (a skip or a refusal being recorded) whose
    // daemon died: nothing ran, so the command is claimed again as it was.
    sqlx::query(
        "update run_commands
         set status = 'pending', claimed_by = null, claimed_at = null
         where status = 'claimed' and run_id is null
           and (claimed_at < now() - $1 * interval '1 millisecond' or ($2 and claimed_by = $3))",
    )
    .bind(stale_claim_ms)
    .bind(own_leftovers)
    .bind(&ctx.instance_id)
    .execute(&ctx.pool)
    .await?;
    Ok(())
}

/// Keeps systemd informed: `WATCHDOG=1` at half the watchdog interval
/// while the timer and queue loops make progress, and `STATUS=` with the
/// running and queued counts.
async fn supervisor_link(
    ctx: Arc<Context>,
    notifier: Arc<Notifier>,
    heartbeats: Arc<Heartbeats>,
    stop: CancellationToken,
) {
    if !notifier.is_enabled() {
        // Nothing to tell; a supervised task ends only when asked to.
        return stop.cancelled().await;
    }
    let watchdog = watchdog_interval();
    let period = watchdog
        .map(|w| w / 2)
        .unwrap_or(std::time::Duration::from_secs(10))
        .min(std::time::Duration::from_secs(10));
    // Both loops wake every few seconds, or within a pool timeout plus a
    // capped backoff while the database is away (about 20 s); a loop silent
    // for longer than this is stuck, not waiting out an outage.
    let stall = std::time::Duration::from_secs(30)
        .max(ctx.config.daemon.poll_interval * 3)
        .max(watchdog.unwrap_or_default());
    let mut ticker = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = stop.cancelled() => return,
        }
        if watchdog.is_some() {
            if heartbeats.healthy(stall) {
                notifier.notify("WATCHDOG=1");
            } else {
                tracing::error!(
                    "a daemon loop stopped making progress; withholding the watchdog ping"
                );
            }
        }
        let running = ctx.running().len();
        // Bounded, so an outage never holds up the watchdog pings.
        let queued = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            sqlx::query_scalar::<_, i64>(
                "select count(*) from run_commands where status = 'pending' and not_before <= now()",
            )
            .fetch_one(&ctx.pool),
        )
        .await;
        let queued = match queued {
            Ok(Ok(queued)) => queued.to_string(),
            _ => "unknown".to_owned(),
        };
        notifier.notify(&format!("STATUS=running {running}, queued {queued}"));
    }
}
