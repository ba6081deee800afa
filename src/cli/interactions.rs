//! `connectord interactions`: what connectors asked their owners for.

use super::output::{self, Table};
use super::{exit, pool};
use crate::admin;
use crate::config::Config;

/// The columns of `interactions`.
const TABLE: Table = Table::new(&[6, 20, 31]);

pub(crate) async fn list(config: &Config, open: bool, json: bool) -> anyhow::Result<u8> {
    let pool = pool(config).await?;
    let rows = admin::interactions(&pool, open).await?;
    if !json {
        TABLE.header(&["ID", "CONNECTION", "KIND STATUS", "MESSAGE"]);
    }
    for row in rows {
        if json {
            output::json_text_line(&row.json);
        } else {
            TABLE.row(&[
                &row.id,
                &row.connection_id,
                &format!("{} {}", row.kind, row.status),
                &row.message.unwrap_or_default(),
            ]);
        }
    }
    Ok(exit::OK)
}
