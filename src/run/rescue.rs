//! Settling the runs of a daemon that stopped: their leases expired, or
//! they were left by this instance's previous start.
//!
//! Two kinds of leftovers are recorded `lost` and retried as the policy of
//! their connector allows (or `cancelled`, not retried, when an operator
//! had cancelled the run): a `running` row whose lease expired, and a claim
//! that took a run slot but whose daemon stopped before recording the run's
//! start (its child, if it was spawned, died with it: children never
//! outlive their daemon). A claim that took no slot (a skip or a refusal
//! being recorded) is handed back to the queue as it was, since nothing ran.
//!
//! Each kind is found first and then settled in one statement, with its
//! retries: the policy lives in the config, not the database, and a daemon
//! that dies between the two leaves the runs to the next rescue rather
//! than settled without their retry.

use std::time::Duration;

use crate::run::failure::FailureKind;
use crate::run::launch::{retry_delay, Context};
use crate::run::record::enqueue_retries;

/// Settles runs whose leases expired, whoever ran them. Our own live runs
/// are never lost, even when an outage kept us from renewing their leases:
/// their outcome is written once the database answers.
pub async fn expired(ctx: &Context) -> Result<(), sqlx::Error> {
    rescue(ctx, Scope::Expired).await
}

/// Settles what this instance id left running or claimed before a restart,
/// whatever its leases say: those runs are not ours any more, and must be
/// settled before leases are renewed under the same name.
pub async fn leftovers_of_previous_start(ctx: &Context) -> Result<(), sqlx::Error> {
    rescue(ctx, Scope::OwnLeftovers).await
}

#[derive(Clone, Copy, PartialEq)]
enum Scope {
    Expired,
    OwnLeftovers,
}

/// A leftover with a run id, and what its retry will be.
#[derive(sqlx::FromRow)]
struct Leftover {
    run_id: i64,
    /// Set for a claim whose run row was never written.
    command_id: Option<i64>,
    connector: Option<String>,
    attempt: i32,
}

/// A leftover as it was settled, for the log.
#[derive(sqlx::FromRow)]
struct Lost {
    id: i64,
    connection_id: String,
    connector: Option<String>,
    instance_id: Option<String>,
    failure_kind: String,
    retry_ms: Option<f64>,
}

async fn rescue(ctx: &Context, scope: Scope) -> Result<(), sqlx::Error> {
    let own = scope == Scope::OwnLeftovers;
    let live = ctx.leases.live_ids();
    let stale_claim_ms = ctx.config.daemon.lease.as_millis() as f64 * 2.0;
    let leftovers: Vec<Leftover> = sqlx::query_as(
        "select r.id as run_id, null::bigint as command_id, r.connector, r.attempt
         from runs r
         where r.status = 'running'
           and (r.lease_expires_at < now() or ($1 and r.instance_id = $2))
           and not (r.id = any($3))
         union all
         select rc.run_id, rc.id, c.connector, rc.attempt
         from run_commands rc left join connections c on c.id = rc.connection_id
         where rc.status = 'claimed' and rc.run_id is not null
           and (rc.claimed_at < now() - $4 * interval '1 millisecond' or ($1 and rc.claimed_by = $2))
           and not (rc.run_id = any($3))
           and not exists (select 1 from runs r where r.id = rc.run_id)",
    )
    .bind(own)
    .bind(&ctx.instance_id)
    .bind(&live)
    .bind(stale_claim_ms)
    .fetch_all(&ctx.pool)
    .await?;
    if !leftovers.is_empty() {
        let (running, orphaned): (Vec<_>, Vec<_>) =
            leftovers.into_iter().partition(|l| l.command_id.is_none());
        let mut lost = settle_running(ctx, own, &running).await?;
        lost.extend(settle_orphaned(ctx, own, stale_claim_ms, &orphaned).await?);
        // A code request of a lost run waits for nothing any more: an
        // answer given for it is deleted unread.
        let lost_ids: Vec<i64> = lost.iter().map(|run| run.id).collect();
        sqlx::query(
            "update interactions set status = 'expired', resolved_at = now(),
                    answer_key_id = null, answer_nonce = null, answer_ciphertext = null
             where kind = 'code_required' and status = 'open' and run_id = any($1)",
        )
        .bind(&lost_ids)
        .execute(&ctx.pool)
        .await?;
        for run in lost {
            ctx.metrics
                .run_rescued(run.connector.as_deref(), &run.failure_kind);
            if run.failure_kind == FailureKind::Cancelled.as_str() {
                tracing::warn!(
                    event = "run.cancelled",
                    run_id = run.id,
                    connection = %run.connection_id,
                    owner = run.instance_id.as_deref().unwrap_or("?"),
                    "cancelled run settled: its daemon had stopped"
                );
                continue;
            }
            tracing::warn!(
                event = "run.lost",
                run_id = run.id,
                connection = %run.connection_id,
                owner = run.instance_id.as_deref().unwrap_or("?"),
                retry_in_ms = run.retry_ms.map(|ms| ms as u64),
                "run lost: its daemon stopped"
            );
        }
    }
    // A claim that took no slot whose daemon died: nothing ran, so the
    // command is claimed again as it was.
    sqlx::query(
        "update run_commands
         set status = 'pending', claimed_by = null, claimed_at = null
         where status = 'claimed' and run_id is null
           and (claimed_at < now() - $1 * interval '1 millisecond' or ($2 and claimed_by = $3))",
    )
    .bind(stale_claim_ms)
    .bind(own)
    .bind(&ctx.instance_id)
    .execute(&ctx.pool)
    .await?;
    Ok(())
}

/// The retry delay each leftover's policy grants, in milliseconds (`None`:
/// no retry), in the order of `leftovers`.
fn retries(ctx: &Context, leftovers: &[Leftover]) -> Vec<Option<f64>> {
    leftovers
        .iter()
        .map(|l| {
            let policy = l
                .connector
                .as_ref()
                .and_then(|c| ctx.config.connectors.get(c))
                .map(|c| c.retry)
                .unwrap_or_default();
            retry_delay(&policy, l.attempt, FailureKind::Lost)
                .map(|d: Duration| d.as_millis() as f64)
        })
        .collect()
}

/// The end of both settling statements: the retries of the runs in their
/// `lost` relation (`id`, `connection_id`, `schedule_id`, `attempt`,
/// `instance_id`, `retry_ms`), and those runs for the log.
macro_rules! enqueue_lost_retries {
    () => {
        concat!(
            ", retry as (",
            enqueue_retries!(
                "(select id as run_id, connection_id, schedule_id, attempt + 1 as next_attempt,
                         retry_ms
                  from lost) ended"
            ),
            ") select id, connection_id, connector, instance_id, failure_kind, retry_ms from lost"
        )
    };
}

/// Records expired `running` rows `lost`, frees their slots and enqueues
/// their retries. The conditions are read again under the row locks, so a
/// lease renewed since they were found keeps its run.
async fn settle_running(
    ctx: &Context,
    own: bool,
    running: &[Leftover],
) -> Result<Vec<Lost>, sqlx::Error> {
    if running.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = running.iter().map(|l| l.run_id).collect();
    sqlx::query_as(concat!(
        "with input as (
             select * from unnest($1::bigint[], $2::float8[]) as i(run_id, retry_ms)
         ), lost as (
             update runs r
             set status = 'failed', finished_at = now(), lease_expires_at = null,
                 failure_kind = case when r.cancel_requested_at is null then 'lost' else 'cancelled' end,
                 failure_detail = case when r.cancel_requested_at is null
                     then 'the daemon running it (' || coalesce(r.instance_id, '?') || ') stopped renewing its lease'
                     else 'an operator cancelled the run; the daemon running it (' || coalesce(r.instance_id, '?') || ') had stopped'
                 end
             from input i
             where r.id = i.run_id and r.status = 'running'
               and (r.lease_expires_at < now() or ($3 and r.instance_id = $4))
             returning r.id, r.command_id, r.connection_id, r.schedule_id, r.attempt,
                       r.instance_id, r.failure_kind, r.connector,
                       case when r.failure_kind = 'cancelled' then null else i.retry_ms end as retry_ms
         ), freed as (
             update run_commands rc set status = 'done'
             from lost
             where rc.id = lost.command_id and rc.status = 'claimed' and rc.run_id = lost.id
         )",
        enqueue_lost_retries!()
    ))
    .bind(&ids)
    .bind(retries(ctx, running))
    .bind(own)
    .bind(&ctx.instance_id)
    .fetch_all(&ctx.pool)
    .await
}

/// Records claims whose daemon stopped before recording the run's start as
/// `lost` runs under the run id the claim reserved, so each counts as an
/// attempt, frees their slots and enqueues their retries. Inserting that
/// row is also what arbitrates against a start write landing late: the
/// run's primary key lets only one of the two in.
async fn settle_orphaned(
    ctx: &Context,
    own: bool,
    stale_claim_ms: f64,
    orphaned: &[Leftover],
) -> Result<Vec<Lost>, sqlx::Error> {
    if orphaned.is_empty() {
        return Ok(Vec::new());
    }
    let commands: Vec<Option<i64>> = orphaned.iter().map(|l| l.command_id).collect();
    let run_ids: Vec<i64> = orphaned.iter().map(|l| l.run_id).collect();
    sqlx::query_as(concat!(
        "with input as (
             select * from unnest($1::bigint[], $2::bigint[], $3::float8[])
                 as i(command_id, run_id, retry_ms)
         ), orphaned as (
             select rc.id, rc.connection_id, rc.trigger, rc.schedule_id, rc.scheduled_for,
                    rc.attempt, rc.run_id, rc.claimed_by, i.retry_ms
             from input i join run_commands rc on rc.id = i.command_id
             where rc.status = 'claimed' and rc.run_id = i.run_id
               and (rc.claimed_at < now() - $4 * interval '1 millisecond' or ($5 and rc.claimed_by = $6))
               and not exists (select 1 from runs r where r.id = rc.run_id)
             for update of rc skip locked
         ), inserted as (
             insert into runs (id, command_id, connection_id, connector, trigger, schedule_id,
                               scheduled_for, attempt, status, failure_kind, failure_detail,
                               instance_id, finished_at)
             select o.run_id, o.id, o.connection_id, c.connector, o.trigger, o.schedule_id,
                    o.scheduled_for, o.attempt, 'failed', 'lost',
                    'the daemon that claimed it (' || coalesce(o.claimed_by, '?') || ') stopped before recording its start',
                    o.claimed_by, now()
             from orphaned o left join connections c on c.id = o.connection_id
             on conflict (id) do nothing
             returning id, command_id, connection_id, schedule_id, attempt, instance_id, failure_kind,
                       connector
         ), lost as (
             select n.*, o.retry_ms from inserted n join orphaned o on o.run_id = n.id
         ), freed as (
             update run_commands rc set status = 'done'
             from lost
             where rc.id = lost.command_id
         )",
        enqueue_lost_retries!()
    ))
    .bind(&commands)
    .bind(&run_ids)
    .bind(retries(ctx, orphaned))
    .bind(stale_claim_ms)
    .bind(own)
    .bind(&ctx.instance_id)
    .fetch_all(&ctx.pool)
    .await
}
