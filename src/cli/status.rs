//! `connectord status`: the one screen an operator reads first.

use chrono::SecondsFormat;

use super::{exit, output, pool};
use crate::admin::{self, Count};
use crate::config::Config;
use crate::printable::printable;

pub(crate) async fn show(config: &Config, json: bool) -> anyhow::Result<u8> {
    let pool = pool(config).await?;
    let status = admin::status(&pool).await?;
    if json {
        output::json_line(&status)?;
        return Ok(exit::OK);
    }
    // A daemon renews its row three times per lease; one a lease late is
    // silent (dead, or cut off from the database).
    let lease = config.daemon.lease.as_secs_f64();
    println!("daemons (seen in the last day):");
    if status.daemons.is_empty() {
        println!("  none");
    }
    for d in &status.daemons {
        let state = if d.stopped_at.is_some() {
            "stopped"
        } else if d.last_seen_seconds > lease {
            "silent"
        } else {
            "live"
        };
        println!(
            "  {:<28} {:<7} last seen {} ago, started {}{}",
            printable(&d.instance_id),
            state,
            age(d.last_seen_seconds),
            d.started_at.to_rfc3339_opts(SecondsFormat::Secs, true),
            d.version
                .as_deref()
                .map(|v| format!(", version {}", printable(v)))
                .unwrap_or_default(),
        );
    }
    match &status.schedule_leader {
        Some(l) => println!(
            "schedules fired by: {} (term {}, since {}){}",
            printable(&l.holder),
            l.term,
            l.acquired_at.to_rfc3339_opts(SecondsFormat::Secs, true),
            if l.current {
                ""
            } else {
                "; its lease has expired and no daemon has taken over"
            }
        ),
        None => println!("schedules fired by: no daemon yet"),
    }
    println!("runs running: {}", counts(&status.running));
    println!(
        "commands pending: {} due{}, {} waiting for their time",
        status.pending_due,
        status
            .oldest_pending_seconds
            .map(|s| format!(" (oldest {} old)", age(s)))
            .unwrap_or_default(),
        status.pending_later
    );
    println!("schedules in error: {}", status.schedules_in_error);
    for e in &status.schedule_errors {
        println!(
            "  schedule {} of {}: {}",
            e.id,
            printable(&e.connection_id),
            printable(&e.last_error)
        );
    }
    println!("open interactions: {}", counts(&status.open_interactions));
    println!("refusals (latest of each kind):");
    if status.refusals.is_empty() {
        println!("  none");
    }
    for r in &status.refusals {
        println!(
            "  {:<26} run {} at {}; {} in the last day",
            r.failure_kind,
            r.last_run_id,
            r.last_at.to_rfc3339_opts(SecondsFormat::Secs, true),
            r.last_day
        );
    }
    Ok(exit::OK)
}

fn counts(counts: &[Count]) -> String {
    if counts.is_empty() {
        return "0".to_owned();
    }
    let total: i64 = counts.iter().map(|c| c.count).sum();
    let each: Vec<String> = counts
        .iter()
        .map(|c| format!("{} {}", printable(&c.name), c.count))
        .collect();
    format!("{total} ({})", each.join(", "))
}

fn age(seconds: f64) -> String {
    humantime::format_duration(std::time::Duration::from_secs(seconds.max(0.0) as u64)).to_string()
}
