//! `connectord credentials`: storing, revoking, deleting and re-encrypting
//! credentials. Secrets come from stdin, never argv, where every local
//! user could read them.

use std::io::Read;

use anyhow::{bail, Context as _};
use sqlx::PgPool;

use super::{exit, keyring, pool, CredentialsCommand};
use crate::admin;
use crate::config::Config;
use crate::credentials::secret::{Plaintext, Secret};
use crate::vocabulary::CredentialKind;

/// Reads stdin to EOF, at most `limit` bytes: a larger input is refused
/// without being held in memory. The buffer is wiped when dropped.
fn read_stdin(limit: usize, too_long: &str) -> anyhow::Result<zeroize::Zeroizing<Vec<u8>>> {
    let mut bytes = zeroize::Zeroizing::new(Vec::with_capacity(limit + 1));
    std::io::stdin()
        .take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .context("reading stdin")?;
    if bytes.len() > limit {
        bail!("{too_long}; nothing was stored");
    }
    Ok(bytes)
}

/// `text` without one trailing newline (`\n` or `\r\n`).
fn chomp(text: &[u8]) -> &[u8] {
    let text = text.strip_suffix(b"\n").unwrap_or(text);
    text.strip_suffix(b"\r").unwrap_or(text)
}

fn secret_field(bytes: &[u8], what: &str) -> anyhow::Result<Secret> {
    let text =
        std::str::from_utf8(bytes).with_context(|| format!("the {what} on stdin is not UTF-8"))?;
    if text.is_empty() {
        bail!("the {what} on stdin is empty; nothing was stored");
    }
    Ok(Secret::new(text.to_owned()))
}

/// Reads the secret from stdin: everything up to EOF, less one trailing
/// newline, so `echo secret |` and a file both work. At most
/// `store::MAX_SECRET_BYTES` (and its newline) are read.
fn read_secret_from_stdin() -> anyhow::Result<Secret> {
    use std::io::IsTerminal;
    if std::io::stdin().is_terminal() {
        eprintln!("Enter the secret, then press Enter and Ctrl-D:");
    }
    let limit = crate::credentials::store::MAX_SECRET_BYTES + 2;
    let bytes = read_stdin(limit, "the secret on stdin is longer than 64 KiB")?;
    secret_field(chomp(&bytes), "secret")
}

/// Reads a username (the first line) and a password (the rest, less one
/// trailing newline) from stdin, for `--username -`: neither then appears
/// in argv, where every local user can read it.
fn read_login_from_stdin() -> anyhow::Result<(Secret, Secret)> {
    use std::io::IsTerminal;
    if std::io::stdin().is_terminal() {
        eprintln!("Enter the username, Enter, the password, Enter and Ctrl-D:");
    }
    let limit = 2 * crate::credentials::store::MAX_SECRET_BYTES + 4;
    let too_long = "the username and password on stdin are longer than 64 KiB each";
    let bytes = read_stdin(limit, too_long)?;
    let Some(newline) = bytes.iter().position(|&b| b == b'\n') else {
        bail!("with --username -, stdin holds the username on its first line and the password after it; no newline was found, nothing was stored");
    };
    let username = secret_field(chomp(&bytes[..=newline]), "username")?;
    let password = secret_field(chomp(&bytes[newline + 1..]), "password")?;
    Ok((username, password))
}

pub(crate) async fn run(config: &Config, command: CredentialsCommand) -> anyhow::Result<u8> {
    match command {
        CredentialsCommand::Set {
            connection,
            kind,
            username,
        } => {
            let keyring = keyring(config)?;
            let plaintext = match (kind.as_str(), username) {
                ("static_secret", None) => Plaintext::StaticSecret(read_secret_from_stdin()?),
                ("static_secret", Some(_)) => {
                    bail!("--username goes with --kind username_password only")
                }
                (_, Some(username)) if username == "-" => {
                    let (username, password) = read_login_from_stdin()?;
                    Plaintext::UsernamePassword { username, password }
                }
                (_, Some(username)) if !username.is_empty() => Plaintext::UsernamePassword {
                    username: Secret::new(username),
                    password: read_secret_from_stdin()?,
                },
                _ => bail!("--kind username_password needs --username NAME, or --username - to read it from stdin's first line (the password is read from stdin)"),
            };
            let pool = pool(config).await?;
            warn_on_kind_mismatch(config, &pool, &connection, plaintext.kind()).await?;
            let id =
                crate::credentials::store::set(&pool, &keyring, &connection, &plaintext).await?;
            println!(
                "stored credential {id} ({}) for {connection} under key {}",
                plaintext.kind(),
                keyring.primary_id()
            );
        }
        CredentialsCommand::Revoke { connection } => {
            let pool = pool(config).await?;
            let id = crate::credentials::store::revoke(&pool, &connection).await?;
            println!("revoked credential {id} of {connection}");
        }
        CredentialsCommand::Delete { connection } => {
            let pool = pool(config).await?;
            let n = crate::credentials::store::delete(&pool, &connection).await?;
            println!("deleted {n} credential(s) of {connection}");
        }
        CredentialsCommand::Rotate => {
            let keyring = keyring(config)?;
            let pool = pool(config).await?;
            let rotation = crate::credentials::store::rotate(&pool, &keyring).await?;
            println!(
                "re-encrypted {} credential(s) under key {}; {} already used it",
                rotation.rotated,
                keyring.primary_id(),
                rotation.already_current
            );
            for (id, reason) in &rotation.failed {
                eprintln!("error: credential {id} could not be re-encrypted: {reason}");
            }
            let states = crate::credentials::state::rotate(&pool, &keyring).await?;
            println!(
                "re-encrypted {} connector state(s) under key {}",
                states.rotated,
                keyring.primary_id()
            );
            for (connection, reason) in &states.failed {
                eprintln!("error: the state of {connection} could not be re-encrypted: {reason}");
            }
            if !rotation.failed.is_empty() || !states.failed.is_empty() {
                return Ok(exit::ERROR);
            }
        }
    }
    Ok(exit::OK)
}

/// Storing a kind the connector does not accept is allowed (the registry
/// may be about to change), but it is said loudly: runs will be refused.
async fn warn_on_kind_mismatch(
    config: &Config,
    pool: &PgPool,
    connection: &str,
    kind: CredentialKind,
) -> anyhow::Result<()> {
    let Some(connector) = admin::connector_of(pool, connection).await? else {
        return Ok(());
    };
    match config.connectors.get(&connector) {
        None => eprintln!(
            "warning: connector {connector:?} of {connection} is not in the registry of this config; runs will be refused with connector_unknown until it is"
        ),
        Some(entry) if entry.credential.is_none() => eprintln!(
            "warning: connector {connector} needs no credential; the stored one is not used"
        ),
        Some(entry) if entry.mapping_for(kind).is_none() => eprintln!(
            "warning: connector {connector} does not accept {kind} credentials; runs of {connection} will be refused with credential_kind_mismatch"
        ),
        Some(_) => {}
    }
    Ok(())
}
