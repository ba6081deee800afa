//! The daemon's row in `daemons`: written at start, refreshed with every
//! lease renewal, marked stopped at a clean shutdown, so `connectord
//! status` shows which daemons share the database and when each was last
//! seen.

use sqlx::PgPool;

/// Writes this daemon's row as started now.
pub async fn announce(pool: &PgPool, instance_id: &str) -> Result<(), sqlx::Error> {
    let hostname = hostname();
    sqlx::query(
        "insert into daemons (instance_id, hostname, pid, version, started_at, last_seen_at, stopped_at)
         values ($1, $2, $3, $4, now(), now(), null)
         on conflict (instance_id) do update
         set hostname = excluded.hostname, pid = excluded.pid, version = excluded.version,
             started_at = now(), last_seen_at = now(), stopped_at = null",
    )
    .bind(instance_id)
    .bind(hostname)
    .bind(std::process::id() as i32)
    .bind(env!("CARGO_PKG_VERSION"))
    .execute(pool)
    .await?;
    Ok(())
}

/// This daemon is alive.
pub async fn seen(pool: &PgPool, instance_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("update daemons set last_seen_at = now() where instance_id = $1")
        .bind(instance_id)
        .execute(pool)
        .await?;
    Ok(())
}

/// This daemon stopped cleanly.
pub async fn stopped(pool: &PgPool, instance_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "update daemons set stopped_at = now(), last_seen_at = now() where instance_id = $1",
    )
    .bind(instance_id)
    .execute(pool)
    .await?;
    Ok(())
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}
