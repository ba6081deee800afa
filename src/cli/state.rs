//! `connectord state`: what a connection keeps between runs, by size, time
//! and writing run; never the content.

use anyhow::bail;
use chrono::SecondsFormat;

use super::{exit, output, pool, StateCommand};
use crate::admin;
use crate::config::Config;
use crate::credentials::state;

pub(crate) async fn run(config: &Config, command: StateCommand) -> anyhow::Result<u8> {
    let pool = pool(config).await?;
    match command {
        StateCommand::Show { connection, json } => {
            if admin::connector_of(&pool, &connection).await?.is_none() {
                bail!("connection {connection:?} does not exist");
            }
            let summary = state::summary(&pool, &connection).await?;
            if json {
                output::json_line(&serde_json::json!({
                    "connection": connection,
                    "size_bytes": summary.as_ref().map(|s| s.size_bytes),
                    "updated_at": summary.as_ref()
                        .map(|s| s.updated_at.to_rfc3339_opts(SecondsFormat::Micros, true)),
                    "run_id": summary.as_ref().and_then(|s| s.run_id),
                }))?;
            } else {
                match summary {
                    None => println!("{connection} has no stored state"),
                    Some(s) => println!(
                        "{connection}: {} bytes, written {} by run {}",
                        s.size_bytes,
                        s.updated_at.to_rfc3339_opts(SecondsFormat::Secs, true),
                        s.run_id.map_or_else(|| "-".to_owned(), |id| id.to_string()),
                    ),
                }
            }
        }
        StateCommand::Clear { connection } => {
            if admin::connector_of(&pool, &connection).await?.is_none() {
                bail!("connection {connection:?} does not exist");
            }
            if state::clear(&pool, &connection).await? {
                println!("cleared the stored state of {connection}");
            } else {
                println!("{connection} had no stored state");
            }
        }
    }
    Ok(exit::OK)
}
