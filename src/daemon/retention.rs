//! Pruning old history in small batches, so the tables stay small without
//! long locks: finished runs and done commands past their age, and resolved
//! interactions. The last success and the last failure of every connection
//! are always kept, and open interactions are kept until resolved or
//! expired.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::RetentionConfig;

/// Rows removed by one pass.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    pub runs: u64,
    pub commands: u64,
    pub interactions: u64,
    /// Rows of daemons not seen for as long as runs are kept.
    pub daemons: u64,
}

/// A run's outcome class: the newest run of each class per connection is
/// kept forever.
const CLASS: &str = "case status when 'succeeded' then 1 when 'skipped' then 3 else 2 end";

/// Prunes until nothing old is left, one batch per statement.
pub async fn prune(pool: &PgPool, config: &RetentionConfig) -> Result<Pruned, sqlx::Error> {
    let batch = i64::from(config.batch);
    let runs_sql = format!(
        "delete from runs where id in (
             select r.id from runs r
             where r.status <> 'running'
               and coalesce(r.finished_at, r.created_at) < now() - $1 * interval '1 millisecond'
               and exists (select 1 from runs n
                           where n.connection_id = r.connection_id and n.id > r.id
                             and n.status <> 'running'
                             and ({n}) = ({r}))
             limit $2)",
        n = CLASS.replace("status", "n.status"),
        r = CLASS.replace("status", "r.status"),
    );
    let pruned = Pruned {
        runs: in_batches(pool, &runs_sql, config.runs, batch).await?,
        commands: in_batches(
            pool,
            "delete from run_commands where id in (
                 select id from run_commands
                 where status = 'done' and created_at < now() - $1 * interval '1 millisecond'
                 limit $2)",
            config.commands,
            batch,
        )
        .await?,
        interactions: in_batches(
            pool,
            "delete from interactions where id in (
                 select id from interactions
                 where status in ('resolved', 'expired')
                   and resolved_at < now() - $1 * interval '1 millisecond'
                 limit $2)",
            config.interactions,
            batch,
        )
        .await?,
        daemons: in_batches(
            pool,
            "delete from daemons where instance_id in (
                 select instance_id from daemons
                 where last_seen_at < now() - $1 * interval '1 millisecond'
                 limit $2)",
            config.runs,
            batch,
        )
        .await?,
    };
    Ok(pruned)
}

/// Runs a pruning `sql` (age in ms as `$1`, batch size as `$2`) until a
/// batch comes back short; an age of zero keeps everything.
async fn in_batches(
    pool: &PgPool,
    sql: &str,
    age: Duration,
    batch: i64,
) -> Result<u64, sqlx::Error> {
    let mut total = 0;
    if age.is_zero() {
        return Ok(total);
    }
    loop {
        let deleted = sqlx::query(sql)
            .bind(age.as_millis() as f64)
            .bind(batch)
            .execute(pool)
            .await?
            .rows_affected();
        total += deleted;
        if deleted < batch as u64 {
            return Ok(total);
        }
        // Let other work have the table between batches.
        tokio::task::yield_now().await;
    }
}

/// Runs `prune` every `config.interval` until `stop`.
pub async fn run(pool: PgPool, config: RetentionConfig, stop: CancellationToken) {
    if config.interval.is_zero() {
        // Retention is off; a supervised task ends only when asked to.
        return stop.cancelled().await;
    }
    let mut ticker = tokio::time::interval(config.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = stop.cancelled() => return,
        }
        match prune(&pool, &config).await {
            Ok(pruned) if pruned != Pruned::default() => tracing::info!(
                runs = pruned.runs,
                commands = pruned.commands,
                interactions = pruned.interactions,
                daemons = pruned.daemons,
                "pruned old history"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "pruning failed; retrying next interval"),
        }
    }
}
