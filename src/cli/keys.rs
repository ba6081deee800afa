//! `connectord keys`: key files.

use super::{exit, KeysCommand};
use crate::config::Config;

pub(crate) fn run(config: &Config, command: KeysCommand) -> anyhow::Result<u8> {
    match command {
        KeysCommand::Generate { id, dir } => {
            let dir = dir.unwrap_or_else(|| config.keys.resolved_dir());
            let path = crate::credentials::keys::generate(&dir, &id)?;
            println!("wrote {}", path.display());
        }
    }
    Ok(exit::OK)
}
