//! `launch()`: the one function that executes every claimed command.
//!
//! Architecture invariant: every child of this daemon is started here, after
//! the same steps for every trigger: admission (the connection exists and is
//! enabled, its connector is known, the overlap policy allows it), the
//! connection's run slot, credential resolution through the shared
//! resolver, the child's environment with the credential injected last, the
//! spawn, supervision, and the `runs` row that records the outcome.

use std::ffi::OsString;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::{Config, ConnectorConfig, RetryPolicy};
use crate::credentials::keys::Keyring;
use crate::credentials::resolver::{self, StoredCredential};
use crate::credentials::state::{self, Owner as StateOwner};
use crate::db::{Backoff, Failure};
use crate::queue::{self, Claimed, Command};
use crate::run::child::{self, Confinement, EndedBy, Exit, Limits};
use crate::run::child_env::{ChildEnv, PrivateDirs, RunMeta};
use crate::run::codes::{self, Serve, Waiting};
use crate::run::dir::RunDirs;
use crate::run::failure::FailureKind;
use crate::run::leases::{Leases, Stops};
use crate::run::protocol::InteractionKind;
use crate::run::record::{
    CredentialUsed, Finish, Outcome, OutcomeWriter, Start, StartWriter, Writer,
};
use crate::run::report::Reports;
use crate::run::state_file::{self, Collected, StateFile};
use crate::sandbox::{self, SandboxState};
use crate::vocabulary::RunStatus;

/// What every launch shares.
pub struct Context {
    pub pool: PgPool,
    pub config: Arc<Config>,
    pub keyring: Option<Arc<Keyring>>,
    pub instance_id: String,
    pub shutdown: CancellationToken,
    /// The runs this daemon has going, and their leases.
    pub leases: Arc<Leases>,
    /// The registry's connector names: the claim takes run slots only for
    /// these.
    pub known_connectors: Vec<String>,
    /// Where run outcomes are written, batched.
    pub outcomes: OutcomeWriter,
    /// Where spawned runs' rows are written, batched.
    pub starts: StartWriter,
    /// Whether children run sandboxed, and how.
    pub sandbox: SandboxState,
    /// Where each run's private directory is made.
    pub run_dirs: Option<RunDirs>,
    /// The code requests waiting on this daemon, woken by answers.
    pub waiting: Arc<Waiting>,
    /// What `/metrics` serves; counted whether or not it is served.
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl Context {
    pub fn writer(&self) -> Writer<'_> {
        Writer {
            pool: &self.pool,
            instance_id: &self.instance_id,
        }
    }
}

/// How long a run's outcome waits for its interactions to be written once
/// the child has ended: they should land first, but a locked table must
/// not hold the outcome (and the connection's next run) back.
const REPORTS_PATIENCE: Duration = Duration::from_secs(1);

/// Executes one claimed command to its recorded outcome.
pub async fn launch(ctx: &Context, claimed: Claimed) -> Result<(), sqlx::Error> {
    let command = &claimed.command;
    // Every field at creation: recording one later makes the JSON log
    // format parse and re-serialise the span's fields, on every run.
    let span = tracing::info_span!(
        "run",
        run_id = claimed.run_id,
        connection = %command.connection_id,
        connector = command.connector.as_deref(),
        trigger = %command.trigger,
        attempt = command.attempt,
    );
    launch_inner(ctx, claimed).instrument(span).await
}

async fn launch_inner(ctx: &Context, claimed: Claimed) -> Result<(), sqlx::Error> {
    let Claimed {
        command,
        enabled,
        run_id,
        credential,
        has_state,
    } = claimed;
    // Admission, decided on what the claim read.
    let (Some(connector_name), Some(enabled)) = (command.connector.clone(), enabled) else {
        let detail = format!("connection {} does not exist", command.connection_id);
        return refuse_unadmitted(ctx, &command, None, FailureKind::ConnectionMissing, &detail)
            .await;
    };
    if !enabled {
        let detail = format!("connection {} is disabled", command.connection_id);
        return refuse_unadmitted(
            ctx,
            &command,
            Some(&connector_name),
            FailureKind::ConnectionDisabled,
            &detail,
        )
        .await;
    }
    let Some(connector) = ctx.config.connectors.get(&connector_name) else {
        let detail = format!(
            "connection {} names connector {connector_name:?}, which the registry lacks",
            command.connection_id
        );
        return refuse_unadmitted(
            ctx,
            &command,
            Some(&connector_name),
            FailureKind::ConnectorUnknown,
            &detail,
        )
        .await;
    };

    // The connection's run slot, taken by the claim.
    let Some(run_id) = run_id else {
        if command.skips_on_overlap() {
            let detail = "the connection had a run going when the schedule fired";
            let run_id = ctx
                .writer()
                .insert_final(
                    &command,
                    Some(&connector_name),
                    RunStatus::Skipped,
                    FailureKind::Overlap,
                    detail,
                )
                .await?;
            ctx.metrics.run_finished(
                Some(&connector_name),
                RunStatus::Skipped.as_str(),
                Some(FailureKind::Overlap.as_str()),
            );
            tracing::info!(event = "run.skipped", run_id, "{detail}");
            return Ok(());
        }
        // Another run of this connection is going; wait for it to end.
        return queue::release(&ctx.pool, command.id).await;
    };
    let stops = Stops::default();
    let result = if ctx.shutdown.is_cancelled() {
        // Claimed just as shutdown began: hand the command back untouched.
        queue::release(&ctx.pool, command.id).await
    } else {
        run_in_slot(
            ctx,
            &command,
            run_id,
            ClaimRead {
                credential: credential.as_ref(),
                has_state,
            },
            &connector_name,
            connector,
            &stops,
        )
        .await
    };
    ctx.leases.release(run_id);
    result
}

/// Records the spawned child's run row, waiting out a database outage, and
/// then hands the run's lease to the lease keeper. Should the slot no
/// longer be ours, or the row be refused, the child is stopped: another
/// daemon may be running the connection.
async fn record_start(ctx: &Context, start: Start, stops: &Stops, reports: &Reports) {
    let _starting = ctx.leases.starting(start.run_id);
    let mut backoff = Backoff::new();
    loop {
        match ctx.starts.record(start.clone()).await {
            Ok(true) => {
                ctx.leases.hold(start.run_id, stops.clone());
                reports.row_recorded();
                return;
            }
            Ok(false) => {
                tracing::warn!("the run's slot was given to another daemon while this one could not reach the database; stopping the connector");
                stops.superseded.cancel();
                return;
            }
            Err(e) if Failure::is_transient(&e) => {
                if backoff.attempts() == 0 {
                    tracing::warn!(error = %e, "cannot record the run's start; retrying until the database answers");
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(e) => {
                tracing::error!(error = %e, "the database refused the run's start; stopping the connector");
                stops.superseded.cancel();
                return;
            }
        }
    }
}

/// What the claim read about the connection, for its run.
struct ClaimRead<'a> {
    /// Its active credential.
    credential: Option<&'a StoredCredential>,
    /// Whether it keeps a state.
    has_state: bool,
}

/// Everything after the slot is taken: resolve, build, spawn, supervise,
/// record.
async fn run_in_slot(
    ctx: &Context,
    command: &Command,
    run_id: i64,
    claim: ClaimRead<'_>,
    connector_name: &str,
    connector: &ConnectorConfig,
    stops: &Stops,
) -> Result<(), sqlx::Error> {
    let ClaimRead {
        credential: stored,
        has_state,
    } = claim;
    // A run that needs the sandbox is refused when the machine cannot give
    // it one, before anything is decrypted.
    let sandbox = match (&ctx.sandbox, &ctx.run_dirs) {
        (SandboxState::Ready(sandbox), Some(_)) => Some(sandbox),
        (SandboxState::Disabled, _) => None,
        (state, _) => {
            let reason = match state {
                SandboxState::Unavailable(reason) => reason.as_str(),
                _ => "there is no directory for runs' private files",
            };
            let detail = format!("the sandbox cannot be set up on this machine: {reason}");
            let kind = FailureKind::SandboxUnavailable;
            return refuse(ctx, run_id, command, None, kind, detail).await;
        }
    };
    // The claim read only an active credential. Without one, the run is
    // refused, or runs on the host's variables if the connection has no
    // credential at all: which, and why, the latest row says.
    let latest = match (stored, &connector.credential) {
        (None, Some(_)) => queue::latest_credential(&ctx.pool, &command.connection_id).await?,
        _ => None,
    };
    // Credential resolution: the one seam, right before the environment.
    let resolved = match resolver::resolve(
        stored.or(latest.as_ref()),
        ctx.keyring.as_deref(),
        connector_name,
        connector,
        &command.connection_id,
        host_var,
    ) {
        Ok(resolved) => resolved,
        Err(refusal) => {
            if refusal.kind.needs_owner() {
                ctx.writer()
                    .open_interaction(
                        &command.connection_id,
                        run_id,
                        InteractionKind::CredentialsRequired.as_str(),
                        &refusal.detail,
                    )
                    .await?;
            }
            return refuse(
                ctx,
                run_id,
                command,
                refusal.credential_id,
                refusal.kind,
                refusal.detail,
            )
            .await;
        }
    };
    let source = resolved.source;
    let credential = CredentialUsed {
        id: resolved.credential_id,
        source: Some(source),
    };

    let owner = StateOwner {
        connection_id: &command.connection_id,
        connector: connector_name,
        credential_id: resolved.credential_id,
    };
    // The stored state is read, like the credential, right before the
    // environment, and only for a run that resolved the credential it was
    // written under.
    let state = match (has_state, ctx.keyring.as_deref()) {
        (true, Some(keyring)) => match state::fetch(&ctx.pool, owner).await? {
            Some(stored) => match state::open(keyring, owner, &stored) {
                Ok(state) => Some(state),
                Err(e) => {
                    tracing::error!(error = %e, "the connection's stored state cannot be decrypted; the run starts without it");
                    None
                }
            },
            None => None,
        },
        _ => None,
    };

    // Every run gets its private directory, for its state file and, in
    // the sandbox, its HOME and TMPDIR.
    let placed = match &ctx.run_dirs {
        None => Err("there is no directory for runs' private files".to_owned()),
        Some(run_dirs) => run_dirs
            .create_run(run_id, sandbox.is_some())
            .and_then(
                |run_dir| match StateFile::place(run_dir.path(), state.as_ref()) {
                    Ok(state_file) => Ok((run_dir, state_file)),
                    Err(e) => {
                        let _ = std::fs::remove_dir_all(run_dir.path());
                        Err(e)
                    }
                },
            )
            .map_err(|e| format!("cannot create the run's private directory: {e}")),
    };
    // The plaintext leaves our memory as soon as it is in the file.
    drop(state);
    let (run_dir, state_file) = match placed {
        Ok(placed) => placed,
        Err(e) => return fail_spawn(ctx, run_id, command, connector, credential, e).await,
    };
    let state_path_inside = match sandbox {
        Some(_) => Path::new(sandbox::RUN_DIR_INSIDE).join(state_file::FILE_NAME),
        None => state_file.path().to_owned(),
    };
    let env = ChildEnv::build(
        &ctx.config,
        connector,
        &RunMeta {
            run_id,
            connection_id: &command.connection_id,
            trigger: command.trigger,
            attempt: command.attempt,
            private: sandbox.map(|_| PrivateDirs {
                home: sandbox::HOME_INSIDE,
                tmp: sandbox::TMP_INSIDE,
            }),
            state_file: Some(state_path_inside.as_os_str()),
        },
        resolved.vars,
        host_var,
    );
    let confinement = match sandbox {
        Some(sandbox) => Confinement::Sandboxed {
            sandbox,
            run_dir: run_dir.path(),
        },
        None => Confinement::Unconfined,
    };
    let spawned = child::spawn(connector, &env, confinement, ctx.config.daemon.spawn).await;
    // The plaintext leaves our memory as soon as the child has it.
    drop(env);
    let mut running = match spawned {
        Ok(running) => running,
        Err(e) => {
            run_dir.remove().await;
            return fail_spawn(ctx, run_id, command, connector, credential, e.to_string()).await;
        }
    };
    let pid = running.pid;
    let started_at = chrono::Utc::now();
    ctx.metrics.picked_up(
        connector_name,
        (started_at - command.due).to_std().unwrap_or_default(),
    );
    tracing::info!(
        event = "run.started",
        pid,
        credential_source = source.as_str(),
        "connector started"
    );
    let started = std::time::Instant::now();
    // The child runs whether or not this write lands; a run that ends
    // first has its row written by its outcome.
    let start = Start {
        run_id,
        command_id: command.id,
        connector: connector_name.to_owned(),
        pid,
        started_at,
        credential_id: resolved.credential_id,
        credential_source: source,
        lease: ctx.config.daemon.lease,
    };
    // The child's stdin stays open for the run, for the answers to its
    // code requests.
    let (codes_tx, codes_rx) = tokio::sync::mpsc::unbounded_channel();
    let code_expired = Arc::new(AtomicBool::new(false));
    let codes_done = CancellationToken::new();
    let serve_codes = running.take_stdin().map(|stdin| {
        let serve = Serve {
            pool: ctx.pool.clone(),
            keyring: ctx.keyring.clone(),
            instance_id: ctx.instance_id.clone(),
            waiting: ctx.waiting.clone(),
            connection_id: command.connection_id.clone(),
            run_id,
            expired: code_expired.clone(),
        };
        tokio::spawn(codes::serve(serve, codes_rx, stdin, codes_done.clone()).in_current_span())
    });
    let (reports, pending) = Reports::new(run_id, Some(codes_tx));
    let reports = Arc::new(reports);
    let record_start = record_start(ctx, start, stops, &reports);
    // Written by a task of its own: supervision never waits on the
    // database, and interactions still land when it is slow.
    let mut write_reports = tokio::spawn(
        reports
            .clone()
            .write(
                pending,
                ctx.pool.clone(),
                ctx.instance_id.clone(),
                command.connection_id.clone(),
            )
            .in_current_span(),
    );
    let supervise = running.supervise(
        Limits {
            timeout: connector.timeout,
            kill_grace: ctx.config.daemon.kill_grace,
            shutdown_grace: ctx.config.daemon.shutdown_grace,
            shutdown: &ctx.shutdown,
            superseded: &stops.superseded,
            cancelled: &stops.cancelled,
        },
        |message| reports.take(message),
    );
    let outcome = {
        tokio::pin!(supervise, record_start);
        tokio::select! {
            outcome = &mut supervise => outcome,
            () = &mut record_start => (&mut supervise).await,
        }
    };
    reports.close();
    codes_done.cancel();
    if let Some(serve_codes) = serve_codes {
        let _ = tokio::time::timeout(REPORTS_PATIENCE, serve_codes).await;
    }
    let code_expired = code_expired.load(Ordering::SeqCst);
    let (records, raised_interaction, problems) = reports.summary();
    // The interactions should land before the outcome, but a locked table
    // must not hold the outcome (and the connection's next run) back: the
    // task goes on writing them on its own.
    if tokio::time::timeout(REPORTS_PATIENCE, &mut write_reports)
        .await
        .is_err()
    {
        tracing::warn!("the database is slow to record the connector's interactions; recording the outcome first");
    }

    // The state is collected whatever the outcome: a failed run's state is
    // a checkpoint too. A run another daemon took over stores nothing (the
    // save is fenced on the run's slot).
    let state_problem = keep_state(ctx, run_id, owner, state_file).await;
    run_dir.remove().await;
    let exit_code = match outcome.exit {
        Exit::Code(code) => Some(code),
        Exit::Signal(_) => None,
    };
    let (status, kind, mut detail) = match classify(outcome, raised_interaction, code_expired) {
        Verdict::Succeeded => (RunStatus::Succeeded, None, String::new()),
        Verdict::Failed { kind, detail } => (RunStatus::Failed, Some(kind), detail),
    };
    if let Some(problems) = problems
        .describe()
        .filter(|_| status != RunStatus::Succeeded)
    {
        detail = format!("{detail}; {problems}");
    }
    // A state that was not stored is said even on a run that succeeded:
    // the next run will not find what this one saved.
    if let Some(problem) = state_problem {
        detail = if detail.is_empty() {
            problem
        } else {
            format!("{detail}; {problem}")
        };
    }
    let retry_after = kind.and_then(|k| retry_delay(&connector.retry, command.attempt, k));
    let duration_ms = started.elapsed().as_millis() as u64;
    ctx.metrics.ran(connector_name, started.elapsed());
    if status == RunStatus::Succeeded {
        tracing::info!(
            event = "run.finished",
            status = status.as_str(),
            duration_ms,
            records,
            "run succeeded"
        );
    } else {
        tracing::warn!(
            event = "run.finished",
            status = status.as_str(),
            failure_kind = kind.map(FailureKind::as_str),
            exit_code,
            duration_ms,
            retry_in_ms = retry_after.map(|d| d.as_millis() as u64),
            "run failed: {detail}"
        );
    }
    let finish = Finish {
        status,
        failure_kind: kind,
        detail: (!detail.is_empty()).then_some(detail),
        exit_code,
        records,
        pid: Some(pid),
        started_at: Some(started_at),
        requeue: kind == Some(FailureKind::Interrupted),
        retry_after,
    };
    settle(ctx, run_id, command, credential, finish).await?;
    Ok(())
}

/// Stores what the child left in its state file as the connection's new
/// state; returns why it was not stored, for the run's `failure_detail`,
/// when that is the connector's or the operator's to fix.
async fn keep_state(
    ctx: &Context,
    run_id: i64,
    owner: StateOwner<'_>,
    state_file: StateFile,
) -> Option<String> {
    let max_bytes = ctx.config.state.max_bytes;
    let state = match state_file.collect(max_bytes).await {
        Collected::Unchanged => return None,
        Collected::Written(state) => state,
        Collected::TooLarge(size) => {
            let problem = format!(
                "the state file ({size} bytes) is larger than [state] max_bytes ({max_bytes} bytes) and was not stored; the connection keeps its previous state"
            );
            tracing::error!(event = "state.refused", "{problem}");
            return Some(problem);
        }
        Collected::Refused(reason) => {
            let problem =
                format!("{reason}, so it was not stored; the connection keeps its previous state");
            tracing::error!(event = "state.refused", "{problem}");
            return Some(problem);
        }
    };
    let Some(keyring) = ctx.keyring.as_deref() else {
        let problem =
            "the state file was not stored: the daemon has no key to encrypt it with ([keys] dir)"
                .to_owned();
        tracing::error!(event = "state.refused", "{problem}");
        return Some(problem);
    };
    let mut backoff = Backoff::new();
    loop {
        match state::save(&ctx.pool, keyring, &ctx.instance_id, run_id, owner, &state).await {
            Ok(true) => {
                tracing::debug!(
                    event = "state.stored",
                    size_bytes = state.len(),
                    "connector state stored"
                );
                return None;
            }
            Ok(false) => {
                tracing::warn!("the state file was not stored: the run's slot was given to another daemon, or its credential changed while it ran");
                return None;
            }
            Err(state::SaveError::Database(e))
                if Failure::is_transient(&e) && !ctx.shutdown.is_cancelled() =>
            {
                if backoff.attempts() == 0 {
                    tracing::warn!(error = %e, "cannot store the connector's state; retrying until the database answers");
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(e) => {
                tracing::error!(error = %e, "the connector's state could not be stored");
                return Some(format!("the state file could not be stored: {e}"));
            }
        }
    }
}

/// Records a launch refused after the run took its slot: no child.
async fn refuse(
    ctx: &Context,
    run_id: i64,
    command: &Command,
    credential_id: Option<i64>,
    kind: FailureKind,
    detail: String,
) -> Result<(), sqlx::Error> {
    let operator_error = matches!(
        kind,
        FailureKind::CredentialUnrecoverable
            | FailureKind::CredentialKindMismatch
            | FailureKind::SandboxUnavailable
    );
    if operator_error {
        tracing::error!(event = "run.refused", failure_kind = %kind, "launch refused: {detail}");
    } else {
        tracing::warn!(event = "run.refused", failure_kind = %kind, "launch refused: {detail}");
    }
    let finish = Finish::without_child(RunStatus::Refused, kind, detail);
    let credential = CredentialUsed {
        id: credential_id,
        source: None,
    };
    settle(ctx, run_id, command, credential, finish).await
}

/// Records a child that could not be started, retried by policy.
async fn fail_spawn(
    ctx: &Context,
    run_id: i64,
    command: &Command,
    connector: &ConnectorConfig,
    credential: CredentialUsed,
    detail: String,
) -> Result<(), sqlx::Error> {
    let retry_after = retry_delay(&connector.retry, command.attempt, FailureKind::SpawnFailed);
    tracing::warn!(
        event = "run.finished",
        status = RunStatus::Failed.as_str(),
        failure_kind = FailureKind::SpawnFailed.as_str(),
        retry_in_ms = retry_after.map(|d| d.as_millis() as u64),
        "{detail}"
    );
    let finish = Finish {
        retry_after,
        ..Finish::without_child(RunStatus::Failed, FailureKind::SpawnFailed, detail)
    };
    settle(ctx, run_id, command, credential, finish).await
}

/// Writes a run's outcome, waiting out a database outage: an outcome is
/// never dropped because PostgreSQL was briefly away. Once shutdown has
/// begun it keeps trying for `kill_grace` more, then gives up and leaves
/// the run to lease rescue.
async fn settle(
    ctx: &Context,
    run_id: i64,
    command: &Command,
    credential: CredentialUsed,
    finish: Finish,
) -> Result<(), sqlx::Error> {
    let (status, kind) = (finish.status, finish.failure_kind);
    let outcome = Outcome::new(run_id, command, credential, finish);
    let mut backoff = Backoff::new();
    let mut give_up_at = None;
    loop {
        match ctx.outcomes.record(outcome.clone()).await {
            Ok(true) => {
                ctx.metrics.run_finished(
                    command.connector.as_deref(),
                    status.as_str(),
                    kind.map(FailureKind::as_str),
                );
                return Ok(());
            }
            Ok(false) => {
                tracing::warn!("the run was settled by another daemon while it ran (its lease expired); this outcome is discarded");
                return Ok(());
            }
            Err(e) if Failure::is_transient(&e) => {
                if backoff.attempts() == 0 {
                    tracing::warn!(error = %e, "cannot record the run's outcome; retrying until the database answers");
                }
                if ctx.shutdown.is_cancelled() {
                    let deadline = *give_up_at.get_or_insert_with(|| {
                        tokio::time::Instant::now() + ctx.config.daemon.kill_grace
                    });
                    if tokio::time::Instant::now() >= deadline {
                        return Err(e);
                    }
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// How a child's end reads as a run's outcome.
enum Verdict {
    Succeeded,
    Failed { kind: FailureKind, detail: String },
}

/// Maps how the child ended onto the run's outcome.
fn classify(outcome: child::Outcome, raised_interaction: bool, code_expired: bool) -> Verdict {
    let failed = |kind, detail: String| Verdict::Failed { kind, detail };
    match (outcome.ended_by, outcome.exit) {
        (Some(EndedBy::Shutdown), Exit::Code(0)) | (None, Exit::Code(0)) => Verdict::Succeeded,
        (Some(EndedBy::Shutdown), _) => failed(
            FailureKind::Interrupted,
            "the daemon shut down while the connector ran; the command is re-queued".to_owned(),
        ),
        (Some(EndedBy::Superseded), _) => failed(
            FailureKind::Lost,
            "another daemon took the run over after its lease expired".to_owned(),
        ),
        (Some(EndedBy::Cancelled), _) => failed(
            FailureKind::Cancelled,
            "an operator cancelled the run".to_owned(),
        ),
        // The owner must act before another attempt can succeed, however
        // the child then ended.
        (ended_by, exit) if raised_interaction => failed(
            FailureKind::InteractionRequired,
            match ended_by {
                Some(EndedBy::Timeout) => {
                    "the connector asked for the owner and then ran past its timeout".to_owned()
                }
                _ => format!(
                    "the connector asked for the owner and ended with {}",
                    describe(exit)
                ),
            },
        ),
        // A code that never came explains the failure that followed.
        (ended_by, exit) if code_expired => failed(
            FailureKind::InteractionExpired,
            match ended_by {
                Some(EndedBy::Timeout) => "the connector's one-time code did not come in time, and it then ran past its timeout".to_owned(),
                _ => format!(
                    "the connector's one-time code did not come in time, and it ended with {}",
                    describe(exit)
                ),
            },
        ),
        (Some(EndedBy::Timeout), _) => failed(
            FailureKind::TimedOut,
            "the connector ran past its timeout and was terminated".to_owned(),
        ),
        (None, Exit::Code(code)) => failed(
            FailureKind::ExitNonzero,
            format!("the connector exited with code {code}"),
        ),
        (None, Exit::Signal(signal)) => failed(
            FailureKind::Signaled,
            format!("the connector was killed by signal {signal}"),
        ),
    }
}

fn describe(exit: Exit) -> String {
    match exit {
        Exit::Code(code) => format!("exit code {code}"),
        Exit::Signal(signal) => format!("signal {signal}"),
    }
}

/// Records a refusal decided before the run took its slot.
async fn refuse_unadmitted(
    ctx: &Context,
    command: &Command,
    connector: Option<&str>,
    kind: FailureKind,
    detail: &str,
) -> Result<(), sqlx::Error> {
    let run_id = ctx
        .writer()
        .insert_final(command, connector, RunStatus::Refused, kind, detail)
        .await?;
    ctx.metrics
        .run_finished(connector, RunStatus::Refused.as_str(), Some(kind.as_str()));
    if kind == FailureKind::ConnectorUnknown {
        // A registry that lacks a connector in use is the operator's to fix.
        tracing::error!(event = "run.refused", run_id, failure_kind = %kind, "launch refused: {detail}");
    } else {
        tracing::warn!(event = "run.refused", run_id, failure_kind = %kind, "launch refused: {detail}");
    }
    Ok(())
}

/// The delay before the next attempt, or `None` when the policy is spent
/// or the failure is not retryable: capped exponential backoff with jitter
/// (a random factor in [0.5, 1.0]) so retries of many runs spread out.
pub fn retry_delay(policy: &RetryPolicy, attempt: i32, kind: FailureKind) -> Option<Duration> {
    if !kind.is_retryable() || attempt < 1 || attempt as u32 >= policy.max_attempts {
        return None;
    }
    let exponent = (attempt - 1).min(30) as u32;
    let base = policy
        .backoff
        .saturating_mul(1u32 << exponent)
        .min(policy.max_backoff);
    Some(base.mul_f64(0.5 + 0.5 * random_unit()))
}

/// A uniform random number in [0, 1) from the OS generator.
fn random_unit() -> f64 {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

fn host_var(name: &str) -> Option<OsString> {
    std::env::var_os(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_policy() {
        let policy = RetryPolicy {
            max_attempts: 3,
            backoff: Duration::from_secs(10),
            max_backoff: Duration::from_secs(15),
        };
        let first = retry_delay(&policy, 1, FailureKind::ExitNonzero).expect("attempt 1 retries");
        assert!(first >= Duration::from_secs(5) && first <= Duration::from_secs(10));
        let second = retry_delay(&policy, 2, FailureKind::TimedOut).expect("attempt 2 retries");
        assert!(second >= Duration::from_millis(7500) && second <= Duration::from_secs(15));
        assert_eq!(retry_delay(&policy, 3, FailureKind::ExitNonzero), None);
        assert_eq!(
            retry_delay(&policy, 1, FailureKind::CredentialRevoked),
            None
        );
        assert_eq!(
            retry_delay(&policy, 1, FailureKind::InteractionRequired),
            None
        );
        assert_eq!(retry_delay(&policy, 1, FailureKind::Interrupted), None);
    }
}
