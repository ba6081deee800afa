//! Writes to the `runs` table: a run's life from its slot to its outcome.
//!
//! A run that may spawn a child has its row inserted as `running` by the
//! claim (`queue::claim`); the partial unique index on
//! `runs(connection_id) where status = 'running'` makes that insert the
//! database's arbitration of "one run per connection at a time" across
//! every daemon. Every write that ends a run is fenced on
//! the run still being `running` under this instance, so a daemon waking
//! from a long pause cannot overwrite what another daemon decided.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::failure::FailureKind;
use crate::queue::Command;

/// Who is writing: the daemon instance whose runs these are.
pub struct Writer<'a> {
    pub pool: &'a PgPool,
    pub instance_id: &'a str,
}

/// The final state of a run.
#[derive(Debug, Clone, Default)]
pub struct Finish<'a> {
    pub status: &'a str,
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

impl Writer<'_> {
    /// Records a run that never took the slot (refused before it, or
    /// skipped because of overlap) and marks its command done.
    pub async fn insert_final(
        &self,
        command: &Command,
        connector: Option<&str>,
        status: &str,
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
        .bind(&command.trigger)
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

    /// Records the spawned child.
    pub async fn mark_started(
        &self,
        run_id: i64,
        pid: u32,
        started_at: DateTime<Utc>,
        credential_id: Option<i64>,
        credential_source: &str,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "update runs set pid = $2, started_at = $6, credential_id = $3, credential_source = $4
             where id = $1 and status = 'running' and instance_id = $5",
        )
        .bind(run_id)
        .bind(pid as i32)
        .bind(credential_id)
        .bind(credential_source)
        .bind(self.instance_id)
        .bind(started_at)
        .execute(self.pool)
        .await?;
        Ok(())
    }

    /// Ends a running run, settles its command and enqueues a retry, in one
    /// statement. Returns false when the run was no longer ours (fenced).
    pub async fn finish(
        &self,
        run_id: i64,
        command: &Command,
        credential: (Option<i64>, Option<&str>),
        finish: Finish<'_>,
    ) -> Result<bool, sqlx::Error> {
        let updated: i64 = sqlx::query_scalar(
            r#"
            with r as (
                update runs
                set status = $2, failure_kind = $3, failure_detail = $4, exit_code = $5,
                    records = coalesce($6, records), finished_at = now(), lease_expires_at = null,
                    credential_id = coalesce(credential_id, $7),
                    credential_source = coalesce(credential_source, $8),
                    pid = coalesce(pid, $16), started_at = coalesce(started_at, $17)
                where id = $1 and status = 'running' and instance_id = $9
                returning id
            ), c as (
                update run_commands
                set status = case when $10 then 'pending' else 'done' end,
                    claimed_by = case when $10 then null else claimed_by end,
                    claimed_at = case when $10 then null else claimed_at end
                where id = $11 and exists (select 1 from r)
            ), retry as (
                insert into run_commands (connection_id, trigger, schedule_id, attempt,
                                          parent_run_id, not_before)
                select $12, 'retry', $13, $14, $1, now() + $15 * interval '1 millisecond'
                where $15 is not null and exists (select 1 from r)
            )
            select count(*) from r
            "#,
        )
        .bind(run_id)
        .bind(finish.status)
        .bind(finish.failure_kind.map(FailureKind::as_str))
        .bind(finish.detail)
        .bind(finish.exit_code)
        .bind(finish.records)
        .bind(credential.0)
        .bind(credential.1)
        .bind(self.instance_id)
        .bind(finish.requeue)
        .bind(command.id)
        .bind(&command.connection_id)
        .bind(command.schedule_id)
        .bind(command.attempt + 1)
        .bind(finish.retry_after.map(|d| d.as_millis() as f64))
        .bind(finish.pid.map(|p| p as i32))
        .bind(finish.started_at)
        .fetch_one(self.pool)
        .await?;
        Ok(updated > 0)
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

    /// Gives a slot back without a trace, for a launch that stopped before
    /// anything was decided (the database failed mid-way): the placeholder
    /// run is removed and the command is pending again.
    pub async fn abandon(&self, run_id: i64, command_id: i64) -> Result<(), sqlx::Error> {
        sqlx::query(
            "with r as (
                 delete from runs where id = $1 and status = 'running' and instance_id = $2
             )
             update run_commands set status = 'pending', claimed_by = null, claimed_at = null
             where id = $3 and status = 'claimed'",
        )
        .bind(run_id)
        .bind(self.instance_id)
        .bind(command_id)
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
