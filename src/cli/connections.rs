//! `connectord connections`: adding and listing connections.

use anyhow::bail;

use super::output::{self, Table};
use super::{exit, pool, ConnectionsCommand};
use crate::admin;
use crate::config::Config;

/// The columns of `connections list`.
const TABLE: Table = Table::new(&[24, 16, 16]);

pub(crate) async fn run(config: &Config, command: ConnectionsCommand) -> anyhow::Result<u8> {
    let pool = pool(config).await?;
    match command {
        ConnectionsCommand::Add {
            id,
            connector,
            owner,
        } => {
            if !config.connectors.contains_key(&connector) {
                eprintln!("warning: connector {connector:?} is not in the registry of this config");
            }
            if !admin::add_connection(&pool, &id, &connector, owner.as_deref()).await? {
                bail!("connection {id:?} already exists");
            }
            println!("added connection {id} ({connector})");
        }
        ConnectionsCommand::List { json } => {
            let rows = admin::connections(&pool).await?;
            if json {
                for row in rows {
                    output::json_line(&serde_json::json!({
                        "id": row.id, "connector": row.connector, "owner": row.owner,
                        "enabled": row.enabled,
                    }))?;
                }
            } else {
                TABLE.header(&["ID", "CONNECTOR", "OWNER", "ENABLED"]);
                for row in rows {
                    TABLE.row(&[
                        &row.id,
                        &row.connector,
                        &row.owner.unwrap_or_default(),
                        &row.enabled,
                    ]);
                }
            }
        }
    }
    Ok(exit::OK)
}
