//! `connectord schedules`: setting, pausing, resuming and listing the
//! schedules operators may as well edit with SQL.

use anyhow::bail;
use chrono::{DateTime, Utc};

use super::output::{self, Table};
use super::{exit, pool, SchedulesCommand};
use crate::admin::{self, ScheduleRow, ScheduleSpec};
use crate::config::Config;
use crate::schedule::cron;

/// The columns of `schedules list`.
const TABLE: Table = Table::new(&[6, 20, 20, 18, 7, 6, 25]);

pub(crate) async fn run(config: &Config, command: SchedulesCommand) -> anyhow::Result<u8> {
    let pool = pool(config).await?;
    match command {
        SchedulesCommand::Set {
            connection,
            cron,
            tz,
            overlap,
            jitter,
        } => {
            cron::parse_cron(&cron)?;
            cron::parse_timezone(&tz)?;
            if jitter.is_some_and(|j| j < 0) {
                bail!("--jitter must not be negative");
            }
            let spec = ScheduleSpec {
                cron: &cron,
                timezone: &tz,
                overlap: &overlap,
                jitter_seconds: jitter,
            };
            if !admin::set_schedule(&pool, &connection, &spec).await? {
                bail!("connection {connection:?} does not exist");
            }
            println!("schedule of {connection}: {cron:?} in {tz}, overlap {overlap}");
        }
        SchedulesCommand::Pause { connection } => {
            let changed = admin::pause_schedules(&pool, &connection).await?;
            report_enabled(&connection, changed, "paused")?;
        }
        SchedulesCommand::Resume { connection } => {
            let changed = admin::resume_schedules(&pool, &connection).await?;
            report_enabled(&connection, changed, "resumed")?;
        }
        SchedulesCommand::List { json } => list(&pool, json).await?,
    }
    Ok(exit::OK)
}

/// Says how many schedules were paused or resumed; none is an error.
fn report_enabled(connection: &str, changed: u64, verb: &str) -> anyhow::Result<()> {
    if changed == 0 {
        bail!("connection {connection:?} has no schedule");
    }
    println!("{verb} {changed} schedule(s) of {connection}");
    Ok(())
}

async fn list(pool: &sqlx::PgPool, json: bool) -> anyhow::Result<()> {
    let rows = admin::schedules(pool).await?;
    let now = Utc::now();
    if !json {
        TABLE.header(&[
            "ID",
            "CONNECTION",
            "CRON",
            "TIMEZONE",
            "ENABLED",
            "OVERLAP",
            "NEXT FIRE",
            "ERROR",
        ]);
    }
    for row in rows {
        let next = next_fire(&row, now);
        if json {
            output::json_line(&serde_json::json!({
                "id": row.id, "connection_id": row.connection_id, "cron": row.cron,
                "timezone": row.timezone, "enabled": row.enabled, "overlap": row.overlap,
                "jitter_seconds": row.jitter_seconds,
                "next_fire_at": next.as_ref().ok().filter(|_| row.enabled),
                "last_fired_at": row.last_fired_at, "last_error": row.last_error,
            }))?;
        } else {
            let next = match &next {
                Ok(Some(at)) if row.enabled => at.to_rfc3339(),
                Ok(_) => "-".to_owned(),
                Err(_) => "invalid".to_owned(),
            };
            TABLE.row(&[
                &row.id,
                &row.connection_id,
                &row.cron,
                &row.timezone,
                &row.enabled,
                &row.overlap,
                &next,
                &row.last_error.unwrap_or_default(),
            ]);
        }
    }
    Ok(())
}

fn next_fire(row: &ScheduleRow, now: DateTime<Utc>) -> Result<Option<DateTime<Utc>>, String> {
    let rule = cron::FireRule {
        expr: cron::parse_cron(&row.cron).map_err(|e| e.to_string())?,
        tz: cron::parse_timezone(&row.timezone).map_err(|e| e.to_string())?,
        jitter: cron::jitter_offset(&row.connection_id, row.jitter_seconds),
    };
    Ok(rule.next_after(now))
}
