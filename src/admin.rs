//! The operator's statements: every read and write the command line makes
//! on `connections`, `credentials`, `schedules`, `runs` and `interactions`
//! (outside what `credentials::store` and `queue` own), and the rows `dev`
//! seeds. They live here once, so the commands, `dev` and the tests share
//! one copy of each statement instead of writing it again.
//!
//! Nothing here prints or decides: a function returns rows, or says what
//! it found (a row inserted or not, a connection missing), and the caller
//! words it.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::vocabulary::{CredentialKind, RunStatus};

/// A `connections` row as the operator sees it.
#[derive(Debug, sqlx::FromRow)]
pub struct ConnectionRow {
    pub id: String,
    pub connector: String,
    pub owner: Option<String>,
    pub enabled: bool,
}

/// Adds a connection; `false` when one with this id exists, which is then
/// left as it is.
pub async fn add_connection(
    pool: &PgPool,
    id: &str,
    connector: &str,
    owner: Option<&str>,
) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query(
        "insert into connections (id, connector, owner) values ($1, $2, $3)
         on conflict (id) do nothing",
    )
    .bind(id)
    .bind(connector)
    .bind(owner)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}

/// Every connection, by id.
pub async fn connections(pool: &PgPool) -> Result<Vec<ConnectionRow>, sqlx::Error> {
    sqlx::query_as("select id, connector, owner, enabled from connections order by id")
        .fetch_all(pool)
        .await
}

/// The connector a connection names; `None` when there is no such
/// connection.
pub async fn connector_of(pool: &PgPool, connection: &str) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("select connector from connections where id = $1")
        .bind(connection)
        .fetch_optional(pool)
        .await
}

/// Whether the connection has any credential row, whatever its status.
pub async fn has_credential(pool: &PgPool, connection: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("select exists (select 1 from credentials where connection_id = $1)")
        .bind(connection)
        .fetch_one(pool)
        .await
}

/// An active credential with what `check` compares it against: never its
/// ciphertext.
#[derive(Debug, sqlx::FromRow)]
pub struct ActiveCredentialRow {
    pub id: i64,
    pub connection_id: String,
    /// The connector its connection names now.
    pub connector: String,
    pub kind: CredentialKind,
    pub key_id: String,
    /// The connector it was stored for; `None` for rows stored before the
    /// connector was part of the associated data.
    pub sealed_for: Option<String>,
}

/// Every active credential, by id.
pub async fn active_credentials(pool: &PgPool) -> Result<Vec<ActiveCredentialRow>, sqlx::Error> {
    sqlx::query_as(
        "select cr.id, cr.connection_id, c.connector, cr.kind, cr.key_id, cr.sealed_for
         from credentials cr join connections c on c.id = cr.connection_id
         where cr.status = 'active' order by cr.id",
    )
    .fetch_all(pool)
    .await
}

/// A `schedules` row as the operator sees it.
#[derive(Debug, sqlx::FromRow)]
pub struct ScheduleRow {
    pub id: i64,
    pub connection_id: String,
    pub cron: String,
    pub timezone: String,
    pub enabled: bool,
    pub overlap: String,
    pub jitter_seconds: i32,
    pub last_fired_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
}

/// Every schedule, by connection and id.
pub async fn schedules(pool: &PgPool) -> Result<Vec<ScheduleRow>, sqlx::Error> {
    sqlx::query_as(
        "select id, connection_id, cron, timezone, enabled, overlap, jitter_seconds,
                last_fired_at, last_error
         from schedules order by connection_id, id",
    )
    .fetch_all(pool)
    .await
}

/// What `schedules set` writes; the caller has checked the cron text and
/// the zone.
#[derive(Debug)]
pub struct ScheduleSpec<'a> {
    pub cron: &'a str,
    pub timezone: &'a str,
    pub overlap: &'a str,
    /// `None` keeps a replaced schedule's jitter (a new one gets 0).
    pub jitter_seconds: Option<i32>,
}

/// Creates or replaces the connection's schedule; `false`, and nothing
/// written, when the connection does not exist. The connection's row is
/// locked meanwhile, so two concurrent calls do not both insert.
pub async fn set_schedule(
    pool: &PgPool,
    connection: &str,
    spec: &ScheduleSpec<'_>,
) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let exists: Option<String> =
        sqlx::query_scalar("select id from connections where id = $1 for update")
            .bind(connection)
            .fetch_optional(&mut *tx)
            .await?;
    if exists.is_none() {
        return Ok(false);
    }
    let updated = sqlx::query(
        "update schedules set cron = $2, timezone = $3, overlap = $4,
                              jitter_seconds = coalesce($5, jitter_seconds)
         where connection_id = $1",
    )
    .bind(connection)
    .bind(spec.cron)
    .bind(spec.timezone)
    .bind(spec.overlap)
    .bind(spec.jitter_seconds)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if updated == 0 {
        sqlx::query(
            "insert into schedules (connection_id, cron, timezone, overlap, jitter_seconds)
             values ($1, $2, $3, $4, coalesce($5, 0))",
        )
        .bind(connection)
        .bind(spec.cron)
        .bind(spec.timezone)
        .bind(spec.overlap)
        .bind(spec.jitter_seconds)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(true)
}

/// Gives the connection a schedule of `cron` (UTC, no jitter, the other
/// columns' defaults) unless it has one: `dev`'s seed, which leaves an
/// operator's edit alone.
pub async fn add_schedule_unless_any(
    pool: &PgPool,
    connection: &str,
    cron: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "insert into schedules (connection_id, cron, jitter_seconds)
         select $1, $2, 0
         where not exists (select 1 from schedules where connection_id = $1)",
    )
    .bind(connection)
    .bind(cron)
    .execute(pool)
    .await?;
    Ok(())
}

/// Pauses every schedule of the connection; returns how many it has.
pub async fn pause_schedules(pool: &PgPool, connection: &str) -> Result<u64, sqlx::Error> {
    set_schedules_enabled(pool, connection, false).await
}

/// Resumes every schedule of the connection; returns how many it has.
pub async fn resume_schedules(pool: &PgPool, connection: &str) -> Result<u64, sqlx::Error> {
    set_schedules_enabled(pool, connection, true).await
}

async fn set_schedules_enabled(
    pool: &PgPool,
    connection: &str,
    enabled: bool,
) -> Result<u64, sqlx::Error> {
    Ok(
        sqlx::query("update schedules set enabled = $2 where connection_id = $1")
            .bind(connection)
            .bind(enabled)
            .execute(pool)
            .await?
            .rows_affected(),
    )
}

/// Which runs to list, newest first.
#[derive(Debug)]
pub struct RunFilter {
    pub connection: Option<String>,
    pub status: Option<RunStatus>,
    /// Only runs created at or after this instant.
    pub since: Option<DateTime<Utc>>,
    pub limit: i64,
}

/// The `where` clause runs are listed with; `$1`..`$4` are connection,
/// status, limit and since.
const RUNS_FILTER: &str =
    "where ($1::text is null or connection_id = $1) and ($2::text is null or status = $2)
       and ($4::timestamptz is null or created_at >= $4)
     order by id desc limit $3";

/// A `runs` row as the operator's table shows it.
#[derive(Debug, sqlx::FromRow)]
pub struct RunRow {
    pub id: i64,
    pub connection_id: String,
    pub trigger: String,
    pub attempt: i32,
    pub status: String,
    pub failure_kind: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// The runs `filter` selects.
pub async fn runs(pool: &PgPool, filter: &RunFilter) -> Result<Vec<RunRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "select id, connection_id, trigger, attempt, status, failure_kind, created_at, started_at,
                finished_at
         from runs {RUNS_FILTER}"
    ))
    .bind(&filter.connection)
    .bind(filter.status)
    .bind(filter.limit)
    .bind(filter.since)
    .fetch_all(pool)
    .await
}

/// The runs `filter` selects, each as a JSON object: every column under
/// its name, plus `duration_ms`.
pub async fn runs_json(pool: &PgPool, filter: &RunFilter) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(&format!(
        "select (to_jsonb(r) || jsonb_build_object('duration_ms',
                 (extract(epoch from finished_at - started_at) * 1000)::bigint))::text
         from runs r {RUNS_FILTER}"
    ))
    .bind(&filter.connection)
    .bind(filter.status)
    .bind(filter.limit)
    .bind(filter.since)
    .fetch_all(pool)
    .await
}

/// How the run that settled a command ended.
#[derive(Debug, sqlx::FromRow)]
pub struct RunOutcome {
    pub run_id: i64,
    pub status: RunStatus,
    pub failure_kind: Option<String>,
    pub failure_detail: Option<String>,
}

/// The outcome of the command's latest run, once the command is done;
/// `None` while it is pending, claimed or running. An interrupted run puts
/// its command back to pending and another run follows, so only a done
/// command has its outcome.
pub async fn command_outcome(
    pool: &PgPool,
    command_id: i64,
) -> Result<Option<RunOutcome>, sqlx::Error> {
    sqlx::query_as(
        "select r.id as run_id, r.status, r.failure_kind, r.failure_detail
         from run_commands c join runs r on r.command_id = c.id
         where c.id = $1 and c.status = 'done' and r.status <> 'running'
         order by r.id desc limit 1",
    )
    .bind(command_id)
    .fetch_optional(pool)
    .await
}

/// An `interactions` row as the operator sees it.
#[derive(Debug, sqlx::FromRow)]
pub struct InteractionRow {
    pub id: i64,
    pub connection_id: String,
    pub run_id: Option<i64>,
    pub kind: String,
    pub status: String,
    pub message: Option<String>,
    /// Seconds since it was opened.
    pub age_seconds: i64,
    /// The whole row as a JSON object, every column under its name.
    pub json: String,
}

/// Interactions, newest first; only the open ones with `open_only`.
pub async fn interactions(
    pool: &PgPool,
    open_only: bool,
) -> Result<Vec<InteractionRow>, sqlx::Error> {
    sqlx::query_as(
        "select id, connection_id, run_id, kind, status, message,
                extract(epoch from now() - created_at)::bigint as age_seconds,
                (to_jsonb(i) - 'answer_key_id' - 'answer_nonce' - 'answer_ciphertext'
                 || jsonb_build_object('age_seconds',
                                       extract(epoch from now() - created_at)::bigint))::text
                    as json
         from interactions i where (not $1 or status = 'open') order by id desc",
    )
    .bind(open_only)
    .fetch_all(pool)
    .await
}

/// Why an interaction cannot take an answer.
#[derive(Debug, thiserror::Error)]
pub enum AnswerRefused {
    #[error("interaction {0} does not exist")]
    NotFound(i64),
    #[error("interaction {id} is a {kind} interaction, which is answered by storing a new credential (connectord credentials set), not with a code")]
    NotACode { id: i64, kind: String },
    #[error("interaction {id} cannot be answered: its run {run_id} has ended ({status})")]
    RunEnded {
        id: i64,
        run_id: i64,
        status: String,
    },
    #[error("interaction {id} cannot be answered: it expired{} with no answer", .at.map(|t| format!(" at {}", t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))).unwrap_or_default())]
    Expired { id: i64, at: Option<DateTime<Utc>> },
    #[error("interaction {0} cannot be answered: it was already answered")]
    Resolved(i64),
    #[error("interaction {0} has no run to answer")]
    NoRun(i64),
    #[error("encrypting the answer failed: {0}")]
    Seal(#[from] crate::credentials::keys::SealError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

#[derive(sqlx::FromRow)]
struct Answerable {
    kind: String,
    status: String,
    connection_id: String,
    run_id: Option<i64>,
    expires_at: Option<DateTime<Utc>>,
    answered: bool,
    run_status: Option<String>,
}

/// Stores `code` as the answer to `code_required` interaction `id`,
/// encrypted and bound to the interaction, its connection and its run;
/// the daemon running the run takes it from there. Returns the run id.
pub async fn answer(
    pool: &PgPool,
    keyring: &crate::credentials::keys::Keyring,
    id: i64,
    code: &crate::credentials::secret::Secret,
) -> Result<i64, AnswerRefused> {
    // Twice at most: a row that changed between the read and the write is
    // read again, to say why it no longer takes the answer.
    for _ in 0..2 {
        let row: Option<Answerable> = sqlx::query_as(
            "select i.kind, i.status, i.connection_id, i.run_id, i.expires_at,
                    i.answer_ciphertext is not null as answered, r.status as run_status
             from interactions i left join runs r on r.id = i.run_id
             where i.id = $1",
        )
        .bind(id)
        .fetch_optional(pool)
        .await?;
        let row = row.ok_or(AnswerRefused::NotFound(id))?;
        if row.kind != "code_required" {
            return Err(AnswerRefused::NotACode { id, kind: row.kind });
        }
        let run_id = row.run_id.ok_or(AnswerRefused::NoRun(id))?;
        match row.run_status.as_deref() {
            Some("running") | None => {}
            Some(status) => {
                return Err(AnswerRefused::RunEnded {
                    id,
                    run_id,
                    status: status.to_owned(),
                })
            }
        }
        match row.status.as_str() {
            "expired" => {
                return Err(AnswerRefused::Expired {
                    id,
                    at: row.expires_at,
                })
            }
            "open" if !row.answered => {}
            _ => return Err(AnswerRefused::Resolved(id)),
        }
        let binding = crate::credentials::keys::AnswerBinding {
            interaction_id: id,
            connection_id: &row.connection_id,
            run_id,
            key_id: keyring.primary_id(),
        };
        let sealed = keyring.seal_answer(&binding, code.expose().as_bytes())?;
        let stored = sqlx::query(
            "update interactions
             set answer_key_id = $2, answer_nonce = $3, answer_ciphertext = $4, answered_at = now()
             where id = $1 and status = 'open' and answer_ciphertext is null
               and run_id = $5 and connection_id = $6",
        )
        .bind(id)
        .bind(&sealed.key_id)
        .bind(&sealed.nonce)
        .bind(&sealed.ciphertext)
        .bind(run_id)
        .bind(&row.connection_id)
        .execute(pool)
        .await?
        .rows_affected();
        if stored == 1 {
            return Ok(run_id);
        }
    }
    Err(AnswerRefused::Resolved(id))
}

/// Why `runs cancel` did not cancel a run.
#[derive(Debug, thiserror::Error)]
pub enum CancelRefused {
    #[error("run {0} does not exist")]
    NotFound(i64),
    #[error("run {0} is still starting; try again in a moment")]
    Starting(i64),
    #[error("run {id} cannot be cancelled: it has ended ({status}{})", .kind.as_deref().map(|k| format!(", {k}")).unwrap_or_default())]
    Ended {
        id: i64,
        status: String,
        kind: Option<String>,
    },
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// A cancellation as it was requested.
#[derive(Debug, sqlx::FromRow)]
pub struct CancelRequested {
    pub connection_id: String,
    /// The daemon running it.
    pub instance_id: Option<String>,
    /// Whether it had been requested before.
    pub already: bool,
}

/// Asks the daemon running run `id` to cancel it; the daemon is told by
/// the column's trigger (and its next lease renewal), and should it be
/// gone, the lease rescue records the run `cancelled`.
pub async fn cancel_run(pool: &PgPool, id: i64) -> Result<CancelRequested, CancelRefused> {
    let requested: Option<CancelRequested> = sqlx::query_as(
        "with old as (
             select id, cancel_requested_at from runs
             where id = $1 and status = 'running'
             for update
         )
         update runs r set cancel_requested_at = coalesce(old.cancel_requested_at, now())
         from old where r.id = old.id
         returning r.connection_id, r.instance_id, old.cancel_requested_at is not null as already",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?;
    if let Some(requested) = requested {
        return Ok(requested);
    }
    let ended: Option<(String, Option<String>)> =
        sqlx::query_as("select status, failure_kind from runs where id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await?;
    if let Some((status, kind)) = ended {
        return Err(CancelRefused::Ended { id, status, kind });
    }
    let starting: bool = sqlx::query_scalar(
        "select exists (select 1 from run_commands where run_id = $1 and status = 'claimed')",
    )
    .bind(id)
    .fetch_one(pool)
    .await?;
    Err(if starting {
        CancelRefused::Starting(id)
    } else {
        CancelRefused::NotFound(id)
    })
}

/// A daemon as `status` shows it.
#[derive(Debug, sqlx::FromRow, serde::Serialize)]
pub struct DaemonRow {
    pub instance_id: String,
    pub hostname: Option<String>,
    pub pid: Option<i32>,
    pub version: Option<String>,
    pub started_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
    pub stopped_at: Option<DateTime<Utc>>,
    pub last_seen_seconds: f64,
}

/// A schedule in error.
#[derive(Debug, sqlx::FromRow, serde::Serialize)]
pub struct ScheduleError {
    pub id: i64,
    pub connection_id: String,
    pub last_error: String,
}

/// Counts by a name (a kind or a connector).
#[derive(Debug, sqlx::FromRow, serde::Serialize)]
pub struct Count {
    pub name: String,
    pub count: i64,
}

/// The latest refusals of one kind.
#[derive(Debug, sqlx::FromRow, serde::Serialize)]
pub struct Refusals {
    pub failure_kind: String,
    pub last_run_id: i64,
    pub last_at: DateTime<Utc>,
    /// Refusals of this kind in the last 24 hours, counted among its
    /// latest 1,000 (so at most 1,000).
    pub last_day: i64,
}

/// The `schedule_leader` row.
#[derive(Debug, sqlx::FromRow, serde::Serialize)]
pub struct ScheduleLeader {
    pub holder: String,
    pub term: i64,
    pub acquired_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// Whether its lease is still current.
    pub current: bool,
}

/// What an operator reads first (`connectord status`).
#[derive(Debug, serde::Serialize)]
pub struct Status {
    /// Daemons seen in the last day, the latest first.
    pub daemons: Vec<DaemonRow>,
    /// The daemon firing the schedules (SPEC §16), if one ever has.
    pub schedule_leader: Option<ScheduleLeader>,
    /// Runs running, by connector.
    pub running: Vec<Count>,
    /// Commands pending and due now, and the age of the oldest of them.
    pub pending_due: i64,
    pub oldest_pending_seconds: Option<f64>,
    /// Commands pending with a later `not_before` (retries backing off).
    pub pending_later: i64,
    pub schedules_in_error: i64,
    /// The first few of them.
    pub schedule_errors: Vec<ScheduleError>,
    /// Open interactions, by kind.
    pub open_interactions: Vec<Count>,
    /// The latest refusal of each kind.
    pub refusals: Vec<Refusals>,
}

/// Reads the status: a few small queries, each on an index.
pub async fn status(pool: &PgPool) -> Result<Status, sqlx::Error> {
    let daemons = sqlx::query_as(
        "select instance_id, hostname, pid, version, started_at, last_seen_at, stopped_at,
                extract(epoch from now() - last_seen_at)::float8 as last_seen_seconds
         from daemons where last_seen_at > now() - interval '1 day'
         order by last_seen_at desc, instance_id",
    )
    .fetch_all(pool)
    .await?;
    let schedule_leader = sqlx::query_as(
        "select holder, term, acquired_at, expires_at, expires_at > now() as current
         from schedule_leader",
    )
    .fetch_optional(pool)
    .await?;
    let running = sqlx::query_as(
        "select coalesce(connector, '?') as name, count(*) as count
         from runs where status = 'running' group by 1 order by 1",
    )
    .fetch_all(pool)
    .await?;
    let (pending_due, oldest_pending_seconds, pending_later): (i64, Option<f64>, i64) =
        sqlx::query_as(
            "select count(*) filter (where not_before is null or not_before <= now()),
                    extract(epoch from now() - min(coalesce(not_before, created_at))
                        filter (where not_before is null or not_before <= now()))::float8,
                    count(*) filter (where not_before > now())
             from run_commands where status = 'pending'",
        )
        .fetch_one(pool)
        .await?;
    let schedules_in_error: i64 =
        sqlx::query_scalar("select count(*) from schedules where last_error is not null")
            .fetch_one(pool)
            .await?;
    let schedule_errors = sqlx::query_as(
        "select id, connection_id, last_error from schedules
         where last_error is not null order by id limit 10",
    )
    .fetch_all(pool)
    .await?;
    let open_interactions = sqlx::query_as(
        "select kind as name, count(*) as count from interactions
         where status = 'open' group by 1 order by 1",
    )
    .fetch_all(pool)
    .await?;
    // Per kind, its newest refusal through the partial index.
    let refusals = sqlx::query_as(
        "select k.kind as failure_kind, last.id as last_run_id, last.created_at as last_at,
                (select count(*) from (
                     select created_at from runs r
                     where r.status = 'refused' and r.failure_kind = k.kind
                     order by id desc limit 1000) recent
                 where recent.created_at > now() - interval '1 day') as last_day
         from unnest($1::text[]) as k(kind)
         cross join lateral (
             select id, created_at from runs
             where status = 'refused' and failure_kind = k.kind
             order by id desc limit 1
         ) last
         order by last.id desc",
    )
    .bind(
        crate::run::failure::FailureKind::ALL
            .iter()
            .map(|k| k.as_str())
            .collect::<Vec<_>>(),
    )
    .fetch_all(pool)
    .await?;
    Ok(Status {
        daemons,
        schedule_leader,
        running,
        pending_due,
        oldest_pending_seconds,
        pending_later,
        schedules_in_error,
        schedule_errors,
        open_interactions,
        refusals,
    })
}
