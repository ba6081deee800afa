//! `connectord trigger` and `connectord runs`: queueing a manual run (and
//! waiting for its outcome), listing runs, and cancelling one.

use anyhow::bail;
use chrono::{DateTime, Utc};

use super::output::{self, Table};
use super::{exit, pool};
use crate::admin::{self, RunFilter};
use crate::config::Config;
use crate::printable::printable;
use crate::vocabulary::RunStatus;

/// The columns of `runs`.
const TABLE: Table = Table::new(&[8, 20, 10, 3, 10, 26, 9]);

/// Whether `trigger` waits for the run's outcome.
pub(crate) enum Wait {
    No,
    Forever,
    Until(std::time::Duration),
}

pub(crate) async fn trigger(config: &Config, connection: &str, wait: Wait) -> anyhow::Result<u8> {
    let pool = pool(config).await?;
    if admin::connector_of(&pool, connection).await?.is_none() {
        bail!("connection {connection:?} does not exist");
    }
    let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await?;
    listener.listen("connectord_runs").await?;
    let command_id = crate::queue::enqueue_manual(&pool, connection).await?;
    println!("queued manual run of {connection} (command {command_id})");
    let deadline = match wait {
        Wait::No => return Ok(exit::OK),
        Wait::Forever => None,
        Wait::Until(timeout) => Some(tokio::time::Instant::now() + timeout),
    };
    loop {
        if let Some(outcome) = admin::command_outcome(&pool, command_id).await? {
            let kind = outcome.failure_kind.unwrap_or_default();
            println!("run {}: {} {kind}", outcome.run_id, outcome.status);
            if let Some(detail) = outcome.failure_detail {
                println!("{}", printable(&detail));
            }
            return Ok(match outcome.status {
                RunStatus::Succeeded => exit::OK,
                RunStatus::Refused => exit::RUN_REFUSED,
                RunStatus::Skipped => exit::RUN_SKIPPED,
                RunStatus::Failed | RunStatus::Running => exit::RUN_FAILED,
            });
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            bail!("no outcome for command {command_id} of {connection} within the timeout; it stays queued");
        }
        // Woken by any run's outcome; the timeout covers a lost connection.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), listener.recv()).await;
    }
}

pub(crate) async fn cancel(config: &Config, run_id: i64) -> anyhow::Result<u8> {
    let pool = pool(config).await?;
    let requested = admin::cancel_run(&pool, run_id).await?;
    let daemon = printable(requested.instance_id.as_deref().unwrap_or("?"));
    let connection = printable(&requested.connection_id);
    if requested.already {
        println!("run {run_id} of {connection} was already being cancelled (daemon {daemon})");
    } else {
        println!("cancelling run {run_id} of {connection} (daemon {daemon})");
    }
    Ok(exit::OK)
}

/// `--since`: a duration back from now, or an RFC 3339 instant.
pub(crate) fn parse_since(text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(duration) = humantime::parse_duration(text) {
        let duration = chrono::Duration::from_std(duration).map_err(|e| e.to_string())?;
        return Ok(Utc::now() - duration);
    }
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| format!("{text:?} is neither a duration like \"1h\" nor an RFC 3339 time"))
}

pub(crate) async fn list(config: &Config, filter: RunFilter, json: bool) -> anyhow::Result<u8> {
    let pool = pool(config).await?;
    if json {
        for object in admin::runs_json(&pool, &filter).await? {
            output::json_text_line(&object);
        }
        return Ok(exit::OK);
    }
    let rows = admin::runs(&pool, &filter).await?;
    TABLE.header(&[
        "ID",
        "CONNECTION",
        "TRIGGER",
        "ATT",
        "STATUS",
        "FAILURE",
        "DURATION",
        "CREATED",
    ]);
    for row in rows {
        let duration = match (row.started_at, row.finished_at) {
            (Some(s), Some(f)) => format!("{}ms", (f - s).num_milliseconds()),
            _ => String::new(),
        };
        TABLE.row(&[
            &row.id,
            &row.connection_id,
            &row.trigger,
            &row.attempt,
            &row.status,
            &row.failure_kind.unwrap_or_default(),
            &duration,
            &row.created_at.to_rfc3339(),
        ]);
    }
    Ok(exit::OK)
}
