//! `connectord interactions`: what connectors asked their owners for, and
//! the answer to a one-time code.

use std::io::Read;

use anyhow::bail;

use super::output::{self, Table};
use super::{exit, keyring, pool};
use crate::admin;
use crate::config::Config;
use crate::credentials::secret::Secret;

/// The columns of `interactions`.
const TABLE: Table = Table::new(&[6, 20, 8, 28, 8]);

/// The longest code read from stdin.
const MAX_CODE: u64 = 1024;

pub(crate) async fn list(config: &Config, open: bool, json: bool) -> anyhow::Result<u8> {
    let pool = pool(config).await?;
    let rows = admin::interactions(&pool, open).await?;
    if !json {
        TABLE.header(&["ID", "CONNECTION", "RUN", "KIND STATUS", "AGE", "MESSAGE"]);
    }
    for row in rows {
        if json {
            output::json_text_line(&row.json);
        } else {
            let age = humantime::format_duration(std::time::Duration::from_secs(
                row.age_seconds.max(0) as u64,
            ));
            TABLE.row(&[
                &row.id,
                &row.connection_id,
                &row.run_id
                    .map_or_else(|| "-".to_owned(), |id| id.to_string()),
                &format!("{} {}", row.kind, row.status),
                &age,
                &row.message.unwrap_or_default(),
            ]);
        }
    }
    Ok(exit::OK)
}

/// `interactions answer ID`: the code comes on stdin, never in argv.
pub(crate) async fn answer(config: &Config, id: i64) -> anyhow::Result<u8> {
    let code = read_code()?;
    let keyring = keyring(config)?;
    let pool = pool(config).await?;
    let run_id = admin::answer(&pool, &keyring, id, &code).await?;
    println!("answered interaction {id}; the daemon running run {run_id} hands the code to its connector");
    Ok(exit::OK)
}

/// The first line of stdin, without surrounding white space.
fn read_code() -> anyhow::Result<Secret> {
    let mut buf = zeroize::Zeroizing::new(Vec::new());
    std::io::stdin().take(MAX_CODE + 1).read_to_end(&mut buf)?;
    let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
    if line.len() as u64 > MAX_CODE {
        bail!("the code on stdin is longer than {MAX_CODE} bytes");
    }
    let Ok(text) = std::str::from_utf8(line) else {
        bail!("the code on stdin is not UTF-8 text");
    };
    let code = text.trim();
    if code.is_empty() {
        bail!("no code on stdin: write it there, as in `echo 123456 | connectord interactions answer ID`");
    }
    Ok(Secret::new(code.to_owned()))
}
