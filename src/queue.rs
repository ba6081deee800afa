//! The command queue: every trigger (schedule tick, retry, manual insert)
//! is a `run_commands` row, claimed here with `FOR UPDATE SKIP LOCKED` so
//! that any number of daemons can share one table without double work.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

/// A claimed command, with the overlap policy of its schedule as of the
/// claim.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Command {
    pub id: i64,
    pub connection_id: String,
    pub trigger: String,
    pub schedule_id: Option<i64>,
    pub scheduled_for: Option<DateTime<Utc>>,
    pub attempt: i32,
    pub parent_run_id: Option<i64>,
    pub overlap: Option<String>,
    /// The connection's connector as of the claim, for concurrency limits.
    pub connector: Option<String>,
}

impl Command {
    /// A scheduled command whose schedule says to skip, not wait, when the
    /// connection already has a run going.
    pub fn skips_on_overlap(&self) -> bool {
        self.trigger == "scheduled" && self.overlap.as_deref() != Some("queue")
    }
}

/// Claims up to `limit` due commands for `instance_id`.
///
/// A command waits (is not claimed) while its connection has a run going,
/// unless it is a scheduled tick of an `overlap = 'skip'` schedule, which is
/// claimed so it can be recorded as skipped. Commands of connectors in
/// `full_connectors` (at their concurrency limit here) are left for later
/// or for another daemon.
pub async fn claim(
    pool: &PgPool,
    instance_id: &str,
    limit: i64,
    full_connectors: &[String],
) -> Result<Vec<Command>, sqlx::Error> {
    sqlx::query_as::<_, Command>(
        r#"
        with picked as (
            select rc.id
            from run_commands rc
            left join connections c on c.id = rc.connection_id
            left join schedules s on s.id = rc.schedule_id
            where rc.status = 'pending'
              and rc.not_before <= now()
              and (c.connector is null or not (c.connector = any($3)))
              and ((rc.trigger = 'scheduled' and coalesce(s.overlap, 'skip') = 'skip')
                   or not exists (select 1 from runs r
                                  where r.connection_id = rc.connection_id
                                    and r.status = 'running'))
            order by rc.not_before, rc.id
            limit $2
            for update of rc skip locked
        )
        update run_commands rc
        set status = 'claimed', claimed_by = $1, claimed_at = now()
        from picked
        where rc.id = picked.id
        returning rc.id, rc.connection_id, rc.trigger, rc.schedule_id, rc.scheduled_for,
                  rc.attempt, rc.parent_run_id,
                  (select s.overlap from schedules s where s.id = rc.schedule_id) as overlap,
                  (select c.connector from connections c where c.id = rc.connection_id) as connector
        "#,
    )
    .bind(instance_id)
    .bind(limit)
    .bind(full_connectors)
    .fetch_all(pool)
    .await
}

/// Puts a claimed command back, untouched, for whoever can run it next.
pub async fn release(pool: &PgPool, command_id: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "update run_commands set status = 'pending', claimed_by = null, claimed_at = null
         where id = $1 and status = 'claimed'",
    )
    .bind(command_id)
    .execute(pool)
    .await?;
    Ok(())
}

/// Inserts a manual command and returns its id.
pub async fn enqueue_manual(pool: &PgPool, connection_id: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "insert into run_commands (connection_id, trigger) values ($1, 'manual') returning id",
    )
    .bind(connection_id)
    .fetch_one(pool)
    .await
}
