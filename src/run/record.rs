//! Writes to the `runs` table: a run's life from its slot to its outcome.
//!
//! A run that may spawn a child takes its connection's slot in the claim
//! (`queue::claim`): a run id kept on the claimed command, one per
//! connection by a partial unique index. Its row is inserted as `running`
//! just after the spawn ([`start_many`], through a [`StartWriter`]), or
//! directly with its outcome when it ends before that landed or never
//! spawned. Every write is fenced on the command still holding this run's
//! slot under this instance, and the row still being `running`, so a
//! daemon waking from a long pause cannot overwrite what another daemon
//! decided. The write that ends a run frees the slot in the same statement.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};

use crate::db::Failure;
use crate::queue::Command;
use crate::run::failure::FailureKind;
use crate::vocabulary::{CredentialSource, RunStatus};

/// A spawned child's run, as its row records it.
#[derive(Debug, Clone)]
pub struct Start {
    pub run_id: i64,
    pub command_id: i64,
    pub connector: String,
    pub pid: u32,
    pub started_at: DateTime<Utc>,
    pub credential_id: Option<i64>,
    pub credential_source: CredentialSource,
    pub lease: Duration,
}

/// Who is writing: the daemon instance whose runs these are.
pub struct Writer<'a> {
    pub pool: &'a PgPool,
    pub instance_id: &'a str,
}

/// The final state of a run.
#[derive(Debug, Clone)]
pub struct Finish {
    pub status: RunStatus,
    pub failure_kind: Option<FailureKind>,
    pub detail: Option<String>,
    pub exit_code: Option<i32>,
    pub records: Option<i64>,
    /// The child's pid and start, in case recording the start did not land
    /// (or was not needed: a short run records both here).
    pub pid: Option<u32>,
    pub started_at: Option<DateTime<Utc>>,
    /// Put the command back as it was (shutdown), instead of marking it done.
    pub requeue: bool,
    /// Delay before the retry command, when the policy grants one.
    pub retry_after: Option<Duration>,
}

impl Finish {
    /// A run that ended without a child: refused, or its spawn failed.
    pub fn without_child(status: RunStatus, kind: FailureKind, detail: String) -> Finish {
        Finish {
            status,
            failure_kind: Some(kind),
            detail: Some(detail),
            exit_code: None,
            records: None,
            pid: None,
            started_at: None,
            requeue: false,
            retry_after: None,
        }
    }
}

/// The credential a run used, as its row records it.
#[derive(Debug, Clone, Copy, Default)]
pub struct CredentialUsed {
    /// The stored row resolved (or refused).
    pub id: Option<i64>,
    /// Where the injected variables came from; `None` when nothing was
    /// injected (a refusal).
    pub source: Option<CredentialSource>,
}

impl Writer<'_> {
    /// Records a run that never took the slot (refused before it, or
    /// skipped because of overlap) and marks its command done.
    pub async fn insert_final(
        &self,
        command: &Command,
        connector: Option<&str>,
        status: RunStatus,
        kind: FailureKind,
        detail: &str,
    ) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar(
            "with r as (
                 insert into runs (command_id, connection_id, connector, trigger, schedule_id,
                                   scheduled_for, attempt, status, failure_kind, failure_detail,
                                   instance_id, finished_at)
                 values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, now())
                 returning id
             ), c as (
                 update run_commands set status = 'done' where id = $1
             )
             select id from r",
        )
        .bind(command.id)
        .bind(&command.connection_id)
        .bind(connector)
        .bind(command.trigger)
        .bind(command.schedule_id)
        .bind(command.scheduled_for)
        .bind(command.attempt)
        .bind(status)
        .bind(kind.as_str())
        .bind(detail)
        .bind(self.instance_id)
        .fetch_one(self.pool)
        .await
    }

    /// Keeps the latest progress count on a running run.
    pub async fn record_progress(&self, run_id: i64, records: i64) -> Result<(), sqlx::Error> {
        sqlx::query(
            "update runs set records = $2 where id = $1 and status = 'running' and instance_id = $3",
        )
        .bind(run_id)
        .bind(records)
        .bind(self.instance_id)
        .execute(self.pool)
        .await?;
        Ok(())
    }

    /// Opens a `credentials_required` (or other) interaction, at most one
    /// open per connection and kind.
    pub async fn open_interaction(
        &self,
        connection_id: &str,
        run_id: i64,
        kind: &str,
        message: &str,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "insert into interactions (connection_id, run_id, kind, message)
             select $1, $2, $3, $4 where exists (select 1 from connections where id = $1)
             on conflict (connection_id, kind) where status = 'open' do nothing",
        )
        .bind(connection_id)
        .bind(run_id)
        .bind(kind)
        .bind(message)
        .execute(self.pool)
        .await?;
        Ok(())
    }
}

/// One run's outcome with what the outcome writer needs of its command.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub run_id: i64,
    pub finish: Finish,
    pub credential: CredentialUsed,
    pub command_id: i64,
    pub connection_id: String,
    pub connector: Option<String>,
    pub schedule_id: Option<i64>,
    /// The retry's attempt number.
    pub next_attempt: i32,
}

impl Outcome {
    pub fn new(
        run_id: i64,
        command: &Command,
        credential: CredentialUsed,
        finish: Finish,
    ) -> Outcome {
        Outcome {
            run_id,
            finish,
            credential,
            command_id: command.id,
            connection_id: command.connection_id.clone(),
            connector: command.connector.clone(),
            schedule_id: command.schedule_id,
            next_attempt: command.attempt + 1,
        }
    }
}

/// One field of every row, as an array parameter for `unnest`.
fn column<'a, R, T>(rows: &'a [R], f: impl Fn(&'a R) -> T) -> Vec<T> {
    rows.iter().map(f).collect()
}

/// Inserts spawned children's run rows as `running`, with their first
/// leases, in one statement for any number of runs. Returns the ids it
/// recorded; a run missing from it no longer holds its slot under this
/// instance (the claim was rescued while we could not reach the database),
/// or already has its outcome.
pub async fn start_many(
    pool: &PgPool,
    instance_id: &str,
    starts: &[Start],
) -> Result<Vec<i64>, sqlx::Error> {
    sqlx::query_scalar(
        r#"
        insert into runs as ru (id, command_id, connection_id, connector, trigger, schedule_id,
                                scheduled_for, attempt, status, instance_id, pid, started_at,
                                credential_id, credential_source, lease_expires_at)
        select i.run_id, rc.id, rc.connection_id, i.connector, rc.trigger, rc.schedule_id,
               rc.scheduled_for, rc.attempt, 'running', $1, i.pid, i.started_at,
               i.credential_id, i.credential_source, now() + i.lease_ms * interval '1 millisecond'
        from unnest($2::bigint[], $3::bigint[], $4::text[], $5::int[], $6::timestamptz[],
                    $7::bigint[], $8::text[], $9::float8[])
            as i(run_id, command_id, connector, pid, started_at, credential_id,
                 credential_source, lease_ms)
        -- By primary key, whatever the statistics say (see `finish_many`).
        cross join lateral (select * from run_commands rc where rc.id = i.command_id offset 0) rc
        where rc.status = 'claimed' and rc.claimed_by = $1 and rc.run_id = i.run_id
        -- A retry of a write that landed without its answer is ours; a row
        -- that already has its outcome (the run ended first) stays as it is.
        on conflict (id) do update set pid = excluded.pid
            where ru.status = 'running' and ru.instance_id = $1
        returning ru.id
        "#,
    )
    .bind(instance_id)
    .bind(column(starts, |s| s.run_id))
    .bind(column(starts, |s| s.command_id))
    .bind(column(starts, |s| s.connector.as_str()))
    .bind(column(starts, |s| s.pid as i32))
    .bind(column(starts, |s| s.started_at))
    .bind(column(starts, |s| s.credential_id))
    .bind(column(starts, |s| s.credential_source))
    .bind(column(starts, |s| s.lease.as_millis() as f64))
    .fetch_all(pool)
    .await
}

/// The one statement that enqueues retries, for a `with` clause: `$ended`
/// is a relation of ended runs with columns `run_id`, `connection_id`,
/// `schedule_id`, `next_attempt` and `retry_ms` (null: the policy grants
/// no retry). Both ways a run ends, its outcome and its rescue, enqueue
/// through it, in the statement that ends the run.
macro_rules! enqueue_retries {
    ($ended:literal) => {
        concat!(
            "insert into run_commands (connection_id, trigger, schedule_id, attempt,
                                       parent_run_id, not_before)
             select connection_id, 'retry', schedule_id, next_attempt, run_id,
                    now() + retry_ms * interval '1 millisecond'
             from ",
            $ended,
            " where retry_ms is not null"
        )
    };
}
pub(crate) use enqueue_retries;

/// Ends runs, frees their slots (settles their commands) and enqueues their
/// retries, in one statement for any number of runs. Returns the ids of the
/// runs it ended; a run missing from it was no longer ours (fenced: its
/// command no longer holds its slot under this instance, or its row is no
/// longer `running`).
pub async fn finish_many(
    pool: &PgPool,
    instance_id: &str,
    outcomes: &[Outcome],
) -> Result<Vec<i64>, sqlx::Error> {
    sqlx::query_scalar(concat!(
        r#"
        with input as (
            select * from unnest($2::bigint[], $3::text[], $4::text[], $5::text[], $6::int[],
                                 $7::bigint[], $8::bigint[], $9::text[], $10::bool[],
                                 $11::bigint[], $12::text[], $13::bigint[], $14::int[],
                                 $15::float8[], $16::int[], $17::timestamptz[], $18::text[])
                as i(run_id, status, failure_kind, detail, exit_code, records, credential_id,
                     credential_source, requeue, command_id, connection_id, schedule_id,
                     next_attempt, retry_ms, pid, started_at, connector)
        ), r as (
            -- The row exists when the start was recorded; otherwise (a
            -- refusal, a failed spawn, a run that ended first) it is
            -- inserted here, with its outcome.
            insert into runs as ru (id, command_id, connection_id, connector, trigger, schedule_id,
                                    scheduled_for, attempt, status, failure_kind, failure_detail,
                                    exit_code, records, credential_id, credential_source,
                                    instance_id, pid, started_at, finished_at)
            select i.run_id, rc.id, rc.connection_id, i.connector, rc.trigger, rc.schedule_id,
                   rc.scheduled_for, rc.attempt, i.status, i.failure_kind, i.detail,
                   i.exit_code, i.records, i.credential_id, i.credential_source,
                   $1, i.pid, i.started_at, now()
            from input i
            -- Each command by its primary key: the fence (`offset 0`)
            -- keeps the planner from walking every claimed command instead,
            -- a plan `auto_explain` showed it picking (through the former
            -- `run_commands_claimed` index) from statistics taken while few
            -- were claimed.
            cross join lateral (select * from run_commands rc where rc.id = i.command_id offset 0) rc
            where rc.status = 'claimed' and rc.claimed_by = $1 and rc.run_id = i.run_id
            on conflict (id) do update
            set status = excluded.status, failure_kind = excluded.failure_kind,
                failure_detail = excluded.failure_detail, exit_code = excluded.exit_code,
                records = coalesce(excluded.records, ru.records),
                finished_at = now(), lease_expires_at = null,
                credential_id = coalesce(ru.credential_id, excluded.credential_id),
                credential_source = coalesce(ru.credential_source, excluded.credential_source),
                pid = coalesce(ru.pid, excluded.pid),
                started_at = coalesce(ru.started_at, excluded.started_at)
            where ru.status = 'running' and ru.instance_id = $1
            returning ru.id
        ), c as (
            update run_commands rc
            set status = case when i.requeue then 'pending' else 'done' end,
                claimed_by = case when i.requeue then null else rc.claimed_by end,
                claimed_at = case when i.requeue then null else rc.claimed_at end,
                run_id = case when i.requeue then null else rc.run_id end
            from input i join r on r.id = i.run_id
            where rc.id = i.command_id
        ), retry as ("#,
        enqueue_retries!("(select i.* from input i join r on r.id = i.run_id) ended"),
        r#")
        select id from r
        "#,
    ))
    .bind(instance_id)
    .bind(column(outcomes, |o| o.run_id))
    .bind(column(outcomes, |o| o.finish.status))
    .bind(column(outcomes, |o| {
        o.finish.failure_kind.map(FailureKind::as_str)
    }))
    .bind(column(outcomes, |o| o.finish.detail.as_deref()))
    .bind(column(outcomes, |o| o.finish.exit_code))
    .bind(column(outcomes, |o| o.finish.records))
    .bind(column(outcomes, |o| o.credential.id))
    .bind(column(outcomes, |o| o.credential.source))
    .bind(column(outcomes, |o| o.finish.requeue))
    .bind(column(outcomes, |o| o.command_id))
    .bind(column(outcomes, |o| o.connection_id.as_str()))
    .bind(column(outcomes, |o| o.schedule_id))
    .bind(column(outcomes, |o| o.next_attempt))
    .bind(column(outcomes, |o| {
        o.finish.retry_after.map(|d| d.as_millis() as f64)
    }))
    .bind(column(outcomes, |o| o.finish.pid.map(|p| p as i32)))
    .bind(column(outcomes, |o| o.finish.started_at))
    .bind(column(outcomes, |o| o.connector.as_deref()))
    .fetch_all(pool)
    .await
}

/// Most rows one batched statement writes.
const MAX_BATCH: usize = 64;

/// A run write that [`BatchWriter`] groups: many go out as one statement,
/// which answers with the ids of the runs it wrote.
pub trait Batched: Clone + Send + Sync + 'static {
    fn run_id(&self) -> i64;
    fn write<'a>(
        pool: &'a PgPool,
        instance_id: &'a str,
        batch: &'a [Self],
    ) -> impl std::future::Future<Output = Result<Vec<i64>, sqlx::Error>> + Send + 'a;
}

impl Batched for Start {
    fn run_id(&self) -> i64 {
        self.run_id
    }
    fn write<'a>(
        pool: &'a PgPool,
        instance_id: &'a str,
        batch: &'a [Self],
    ) -> impl std::future::Future<Output = Result<Vec<i64>, sqlx::Error>> + Send + 'a {
        start_many(pool, instance_id, batch)
    }
}

impl Batched for Outcome {
    fn run_id(&self) -> i64 {
        self.run_id
    }
    fn write<'a>(
        pool: &'a PgPool,
        instance_id: &'a str,
        batch: &'a [Self],
    ) -> impl std::future::Future<Output = Result<Vec<i64>, sqlx::Error>> + Send + 'a {
        finish_many(pool, instance_id, batch)
    }
}

type Request<T> = (T, oneshot::Sender<Result<bool, sqlx::Error>>);

/// Writes runs' starts or outcomes in batches, group-commit style: a write
/// that arrives while the writer is idle goes out at once, alone; writes
/// that arrive while a statement is in flight go out together in the next
/// one. Nothing waits on a timer, so a lone run is never delayed, and under
/// load the per-statement cost (parse, plan, commit) is shared: one
/// statement per run was the largest cost PostgreSQL paid per run (see the
/// design decisions in docs/PERFORMANCE.md).
///
/// A caller that stops waiting does not cancel its write: the statement is
/// the writer's, so a connection is never dropped mid-statement.
pub struct BatchWriter<T> {
    requests: mpsc::Sender<Request<T>>,
}

impl<T> Clone for BatchWriter<T> {
    fn clone(&self) -> Self {
        BatchWriter {
            requests: self.requests.clone(),
        }
    }
}

/// Where run outcomes are written.
pub type OutcomeWriter = BatchWriter<Outcome>;

/// Where spawned runs' rows are written.
pub type StartWriter = BatchWriter<Start>;

impl<T: Batched> BatchWriter<T> {
    /// A writer, and the task that writes for it, for the caller to run;
    /// the task ends when the last handle is dropped.
    pub fn new(
        pool: PgPool,
        instance_id: String,
    ) -> (
        BatchWriter<T>,
        impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let (requests, receiver) = mpsc::channel(1024);
        let task = write_batches(pool, instance_id, receiver);
        (BatchWriter { requests }, task)
    }

    /// Writes one run's row; `Ok(false)` when the run was no longer ours.
    pub async fn record(&self, item: T) -> Result<bool, sqlx::Error> {
        let (reply, answer) = oneshot::channel();
        if self.requests.send((item, reply)).await.is_err() {
            return Err(sqlx::Error::PoolClosed);
        }
        answer.await.unwrap_or(Err(sqlx::Error::PoolClosed))
    }
}

async fn write_batches<T: Batched>(
    pool: PgPool,
    instance_id: String,
    mut requests: mpsc::Receiver<Request<T>>,
) {
    let mut batch: Vec<Request<T>> = Vec::with_capacity(MAX_BATCH);
    while requests.recv_many(&mut batch, MAX_BATCH).await > 0 {
        // Rows locked in one order by every writer cannot deadlock.
        batch.sort_unstable_by_key(|(item, _)| item.run_id());
        let (items, replies): (Vec<T>, Vec<_>) = batch.drain(..).unzip();
        match T::write(&pool, &instance_id, &items).await {
            Ok(written) => {
                for (item, reply) in items.iter().zip(replies) {
                    let _ = reply.send(Ok(written.contains(&item.run_id())));
                }
            }
            // The database is away: every caller retries with its backoff.
            Err(e) if Failure::is_transient(&e) => {
                let reason = e.to_string();
                for reply in replies {
                    let _ = reply.send(Err(sqlx::Error::Io(std::io::Error::other(reason.clone()))));
                }
            }
            // Each write on its own, so none fails for another's sake and
            // each caller gets its own error.
            Err(_) => {
                for (item, reply) in items.chunks(1).zip(replies) {
                    let result = T::write(&pool, &instance_id, item).await;
                    let _ = reply.send(result.map(|written| !written.is_empty()));
                }
            }
        }
    }
}
