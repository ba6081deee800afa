//! The command line of SPEC §9. Each subcommand is a small function over
//! the library; errors are one sentence naming what is wrong and where.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::credentials::keys::Keyring;
use crate::credentials::secret::{Plaintext, Secret};
use crate::logging::LogFormat;
use crate::printable::printable;
use crate::vocabulary::CredentialKind;

/// Exit statuses, documented in `--help`.
pub mod exit {
    /// Success; for `trigger --wait`, the run succeeded.
    pub const OK: u8 = 0;
    /// The command could not do its job (bad config, database, input).
    pub const ERROR: u8 = 1;
    /// `check` found a defect.
    pub const DEFECT: u8 = 1;
    /// `trigger --wait`: the run failed.
    pub const RUN_FAILED: u8 = 3;
    /// `trigger --wait`: the launch was refused (no child was started).
    pub const RUN_REFUSED: u8 = 4;
    /// `trigger --wait`: the run was skipped.
    pub const RUN_SKIPPED: u8 = 5;
}

#[derive(Debug, Parser)]
#[command(
    name = "connectord",
    version,
    about = "Runs data connectors on cron schedules, on retries and on demand.",
    after_help = "Exit status: 0 success; 1 error or defect found; 2 bad usage; \
                  for `trigger --wait`: 3 run failed, 4 launch refused, 5 run skipped."
)]
pub struct Cli {
    /// Config file (TOML). Also CONNECTORD_CONFIG; default
    /// /etc/connectord/connectord.toml when it exists.
    #[arg(long, global = true, env = "CONNECTORD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value = "auto")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a private PostgreSQL, seed demo connections and run the daemon.
    Dev {
        /// Instead, stop this checkout's private PostgreSQL clusters (dev,
        /// tests, benchmark), which stay up between runs; data is kept.
        #[arg(long)]
        stop: bool,
    },
    /// Run the daemon (systemd ExecStart).
    Run,
    /// Apply database migrations.
    Migrate,
    /// Validate config, registry, keys, database, schedules and credentials.
    Check {
        #[arg(long)]
        json: bool,
    },
    /// Manage key files.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Manage connections.
    #[command(subcommand)]
    Connections(ConnectionsCommand),
    /// Manage stored credentials.
    #[command(subcommand)]
    Credentials(CredentialsCommand),
    /// Manage schedules.
    #[command(subcommand)]
    Schedules(SchedulesCommand),
    /// Queue a manual run.
    Trigger {
        connection: String,
        /// Wait for the run and exit with its outcome.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this long ("30s", "10m") with exit
        /// status 1; the command stays queued.
        #[arg(long, requires = "wait", value_parser = humantime::parse_duration)]
        timeout: Option<std::time::Duration>,
    },
    /// List runs, newest first.
    Runs {
        #[arg(long)]
        connection: Option<String>,
        #[arg(long)]
        status: Option<String>,
        /// Only runs created since this long ago ("1h") or this RFC 3339 time.
        #[arg(long, value_parser = parse_since)]
        since: Option<DateTime<Utc>>,
        #[arg(long, default_value_t = 20)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// List interactions.
    Interactions {
        #[arg(long)]
        open: bool,
        #[arg(long)]
        json: bool,
    },
    /// The bundled demo connector (what `dev` runs as a child).
    #[command(hide = true)]
    DemoConnector,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Write a new random key file `<ID>.key` with mode 0600.
    Generate {
        #[arg(long)]
        id: String,
        /// Key directory (default: keys.dir of the config).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConnectionsCommand {
    Add {
        id: String,
        #[arg(long)]
        connector: String,
        #[arg(long)]
        owner: Option<String>,
    },
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum CredentialsCommand {
    /// Store a credential; the secret (token or password) is read from stdin.
    Set {
        connection: String,
        #[arg(long, value_parser = ["static_secret", "username_password"])]
        kind: String,
        /// The username; `-` reads it from stdin's first line, before the
        /// password, so it stays out of argv.
        #[arg(long)]
        username: Option<String>,
    },
    Revoke {
        connection: String,
    },
    Delete {
        connection: String,
    },
    /// Re-encrypt every credential under the primary key.
    Rotate,
}

#[derive(Debug, Subcommand)]
pub enum SchedulesCommand {
    /// Create or replace the connection's schedule.
    Set {
        connection: String,
        cron: String,
        #[arg(long, default_value = "UTC")]
        tz: String,
        #[arg(long, value_parser = ["skip", "queue"], default_value = "skip")]
        overlap: String,
        /// Fixed per-connection offset spread over [0, N) seconds; kept
        /// as it is when omitted.
        #[arg(long)]
        jitter: Option<i32>,
    },
    Pause {
        connection: String,
    },
    Resume {
        connection: String,
    },
    List {
        #[arg(long)]
        json: bool,
    },
}

/// Loads the config named on the command line, or the default file, or
/// built-in defaults; `DATABASE_URL` applies in every case.
pub fn load_config(path: Option<&Path>) -> anyhow::Result<Config> {
    let default = Path::new("/etc/connectord/connectord.toml");
    match path {
        Some(path) => Ok(Config::load(path)?),
        None if default.exists() => Ok(Config::load(default)?),
        None => {
            let mut config = Config::default();
            config.apply_env();
            Ok(config)
        }
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::DemoConnector) {
        return crate::dev::demo_connector();
    }
    crate::logging::init(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::ERROR);
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit::ERROR)
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<u8> {
    if let Command::Dev { stop } = cli.command {
        if stop {
            return crate::dev::stop().map(|()| exit::OK);
        }
        return crate::dev::run().await.map(|()| exit::OK);
    }
    let config = load_config(cli.config.as_deref())?;
    match cli.command {
        Command::Dev { .. } | Command::DemoConnector => unreachable!("handled above"),
        Command::Run => {
            let shutdown = CancellationToken::new();
            spawn_signal_handler(shutdown.clone());
            crate::daemon::run(config, shutdown, |_| {}).await?;
            Ok(exit::OK)
        }
        Command::Migrate => {
            let pool = pool(&config).await?;
            crate::db::migrate(&pool)
                .await
                .context("applying migrations")?;
            println!("migrations applied");
            Ok(exit::OK)
        }
        Command::Check { json } => crate::check::run(&config, json).await,
        Command::Keys(KeysCommand::Generate { id, dir }) => {
            let dir = dir.unwrap_or_else(|| config.keys.resolved_dir());
            let path = crate::credentials::keys::generate(&dir, &id)?;
            println!("wrote {}", path.display());
            Ok(exit::OK)
        }
        Command::Connections(command) => connections(&config, command).await,
        Command::Credentials(command) => credentials(&config, command).await,
        Command::Schedules(command) => schedules(&config, command).await,
        Command::Trigger {
            connection,
            wait,
            timeout,
        } => {
            let wait = match (wait, timeout) {
                (false, _) => Wait::No,
                (true, None) => Wait::Forever,
                (true, Some(timeout)) => Wait::Until(timeout),
            };
            trigger(&config, &connection, wait).await
        }
        Command::Runs {
            connection,
            status,
            since,
            limit,
            json,
        } => {
            runs(
                &config,
                RunFilter {
                    connection,
                    status,
                    since,
                    limit,
                },
                json,
            )
            .await
        }
        Command::Interactions { open, json } => interactions(&config, open, json).await,
    }
}

/// SIGTERM and SIGINT cancel `shutdown`.
pub fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        shutdown.cancel();
    });
}

async fn pool(config: &Config) -> anyhow::Result<PgPool> {
    crate::db::connect(&config.database).await.with_context(|| {
        format!(
            "cannot connect to the database at {}",
            redact_url(&config.database.url)
        )
    })
}

/// The URL without its password (in the user part or a `password=`
/// parameter), for messages.
pub fn redact_url(url: &str) -> String {
    let Some(scheme) = url.find("://") else {
        return redact_keywords(url).unwrap_or_else(|| UNPARSABLE.to_owned());
    };
    // The user part ends at the last '@': a password may hold an unencoded
    // '@', '?' or '/', so nothing after the scheme can be split off first.
    let (prefix, rest) = match url[scheme + 3..].rfind('@') {
        Some(at) => {
            let at = scheme + 3 + at;
            let userinfo = &url[scheme + 3..at];
            let prefix = match userinfo.find(':') {
                Some(colon) => format!("{}{}:[redacted]@", &url[..scheme + 3], &userinfo[..colon]),
                None => url[..=at].to_owned(),
            };
            (prefix, &url[at + 1..])
        }
        None => (url[..scheme + 3].to_owned(), &url[scheme + 3..]),
    };
    let mut out = prefix;
    match rest.split_once('?') {
        None => out.push_str(rest),
        Some((base, query)) => {
            out.push_str(base);
            let params: Vec<String> = query
                .split('&')
                .map(|param| match param.split_once('=') {
                    Some((key, _)) if key.eq_ignore_ascii_case("password") => {
                        format!("{key}=[redacted]")
                    }
                    _ => param.to_owned(),
                })
                .collect();
            out.push('?');
            out.push_str(&params.join("&"));
        }
    }
    out
}

/// What is printed for a database address that cannot be parsed.
const UNPARSABLE: &str = "(unparsable URL)";

/// A keyword/value connection string (`host=h password='x y'`) with its
/// password redacted; `None` if it is not one.
fn redact_keywords(text: &str) -> Option<String> {
    let mut out = Vec::new();
    let mut rest = text.trim_start();
    while !rest.is_empty() {
        let eq = rest.find('=')?;
        let key = rest[..eq].trim();
        if key.is_empty() || key.contains(char::is_whitespace) {
            return None;
        }
        let after = rest[eq + 1..].trim_start();
        let value_len = if let Some(inner) = after.strip_prefix('\'') {
            let mut end = None;
            let mut escaped = false;
            for (i, c) in inner.char_indices() {
                match c {
                    '\\' if !escaped => escaped = true,
                    '\'' if !escaped => {
                        end = Some(i);
                        break;
                    }
                    _ => escaped = false,
                }
            }
            end? + 2
        } else {
            after.find(char::is_whitespace).unwrap_or(after.len())
        };
        let value = &after[..value_len];
        out.push(if key.eq_ignore_ascii_case("password") {
            format!("{key}=[redacted]")
        } else {
            format!("{key}={value}")
        });
        rest = after[value_len..].trim_start();
    }
    (!out.is_empty()).then(|| out.join(" "))
}

fn keyring(config: &Config) -> anyhow::Result<Keyring> {
    match crate::daemon::load_keyring(config)? {
        Some(keyring) => Ok(keyring),
        None => bail!(
            "key directory {} does not exist; create a key with `connectord keys generate --id {} --dir {}`",
            config.keys.resolved_dir().display(),
            config.keys.primary,
            config.keys.resolved_dir().display()
        ),
    }
}

async fn connections(config: &Config, command: ConnectionsCommand) -> anyhow::Result<u8> {
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
            let inserted = sqlx::query(
                "insert into connections (id, connector, owner) values ($1, $2, $3)
                 on conflict (id) do nothing",
            )
            .bind(&id)
            .bind(&connector)
            .bind(&owner)
            .execute(&pool)
            .await?
            .rows_affected();
            if inserted == 0 {
                bail!("connection {id:?} already exists");
            }
            println!("added connection {id} ({connector})");
        }
        ConnectionsCommand::List { json } => {
            let rows: Vec<(String, String, Option<String>, bool)> =
                sqlx::query_as("select id, connector, owner, enabled from connections order by id")
                    .fetch_all(&pool)
                    .await?;
            if json {
                for (id, connector, owner, enabled) in rows {
                    println!(
                        "{}",
                        serde_json::json!({"id": id, "connector": connector, "owner": owner, "enabled": enabled})
                    );
                }
            } else {
                println!("{:<24} {:<16} {:<16} ENABLED", "ID", "CONNECTOR", "OWNER");
                for (id, connector, owner, enabled) in rows {
                    println!(
                        "{:<24} {:<16} {:<16} {enabled}",
                        printable(&id),
                        printable(&connector),
                        printable(&owner.unwrap_or_default())
                    );
                }
            }
        }
    }
    Ok(exit::OK)
}

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

async fn credentials(config: &Config, command: CredentialsCommand) -> anyhow::Result<u8> {
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
            if !rotation.failed.is_empty() {
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
    let connector: Option<String> =
        sqlx::query_scalar("select connector from connections where id = $1")
            .bind(connection)
            .fetch_optional(pool)
            .await?;
    let Some(connector) = connector else {
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

async fn schedules(config: &Config, command: SchedulesCommand) -> anyhow::Result<u8> {
    let pool = pool(config).await?;
    match command {
        SchedulesCommand::Set {
            connection,
            cron,
            tz,
            overlap,
            jitter,
        } => {
            crate::schedule::cron::parse_cron(&cron)?;
            crate::schedule::cron::parse_timezone(&tz)?;
            if jitter.is_some_and(|j| j < 0) {
                bail!("--jitter must not be negative");
            }
            let mut tx = pool.begin().await?;
            let exists: Option<String> =
                sqlx::query_scalar("select id from connections where id = $1 for update")
                    .bind(&connection)
                    .fetch_optional(&mut *tx)
                    .await?;
            if exists.is_none() {
                bail!("connection {connection:?} does not exist");
            }
            let updated = sqlx::query(
                "update schedules set cron = $2, timezone = $3, overlap = $4,
                                      jitter_seconds = coalesce($5, jitter_seconds)
                 where connection_id = $1",
            )
            .bind(&connection)
            .bind(&cron)
            .bind(&tz)
            .bind(&overlap)
            .bind(jitter)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if updated == 0 {
                sqlx::query(
                    "insert into schedules (connection_id, cron, timezone, overlap, jitter_seconds)
                     values ($1, $2, $3, $4, coalesce($5, 0))",
                )
                .bind(&connection)
                .bind(&cron)
                .bind(&tz)
                .bind(&overlap)
                .bind(jitter)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            println!("schedule of {connection}: {cron:?} in {tz}, overlap {overlap}");
        }
        SchedulesCommand::Pause { connection } => set_enabled(&pool, &connection, false).await?,
        SchedulesCommand::Resume { connection } => set_enabled(&pool, &connection, true).await?,
        SchedulesCommand::List { json } => list_schedules(&pool, json).await?,
    }
    Ok(exit::OK)
}

/// Pauses or resumes every schedule of a connection.
async fn set_enabled(pool: &PgPool, connection: &str, enabled: bool) -> anyhow::Result<()> {
    let changed = sqlx::query("update schedules set enabled = $2 where connection_id = $1")
        .bind(connection)
        .bind(enabled)
        .execute(pool)
        .await?
        .rows_affected();
    if changed == 0 {
        bail!("connection {connection:?} has no schedule");
    }
    let verb = if enabled { "resumed" } else { "paused" };
    println!("{verb} {changed} schedule(s) of {connection}");
    Ok(())
}

#[derive(sqlx::FromRow)]
struct ScheduleListRow {
    id: i64,
    connection_id: String,
    cron: String,
    timezone: String,
    enabled: bool,
    overlap: String,
    jitter_seconds: i32,
    last_fired_at: Option<DateTime<Utc>>,
    last_error: Option<String>,
}

async fn list_schedules(pool: &PgPool, json: bool) -> anyhow::Result<()> {
    let rows: Vec<ScheduleListRow> = sqlx::query_as(
        "select id, connection_id, cron, timezone, enabled, overlap, jitter_seconds,
                last_fired_at, last_error
         from schedules order by connection_id, id",
    )
    .fetch_all(pool)
    .await?;
    let now = Utc::now();
    if !json {
        println!(
            "{:<6} {:<20} {:<20} {:<18} {:<7} {:<6} {:<25} ERROR",
            "ID", "CONNECTION", "CRON", "TIMEZONE", "ENABLED", "OVERLAP", "NEXT FIRE"
        );
    }
    for row in rows {
        let next = next_fire(&row, now);
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "id": row.id, "connection_id": row.connection_id, "cron": row.cron,
                    "timezone": row.timezone, "enabled": row.enabled, "overlap": row.overlap,
                    "jitter_seconds": row.jitter_seconds,
                    "next_fire_at": next.as_ref().ok().filter(|_| row.enabled),
                    "last_fired_at": row.last_fired_at, "last_error": row.last_error,
                })
            );
        } else {
            let next = match &next {
                Ok(Some(at)) if row.enabled => at.to_rfc3339(),
                Ok(_) => "-".to_owned(),
                Err(_) => "invalid".to_owned(),
            };
            println!(
                "{:<6} {:<20} {:<20} {:<18} {:<7} {:<6} {:<25} {}",
                row.id,
                printable(&row.connection_id),
                printable(&row.cron),
                printable(&row.timezone),
                row.enabled,
                printable(&row.overlap),
                next,
                printable(&row.last_error.unwrap_or_default())
            );
        }
    }
    Ok(())
}

fn next_fire(row: &ScheduleListRow, now: DateTime<Utc>) -> Result<Option<DateTime<Utc>>, String> {
    let rule = crate::schedule::cron::FireRule {
        expr: crate::schedule::cron::parse_cron(&row.cron).map_err(|e| e.to_string())?,
        tz: crate::schedule::cron::parse_timezone(&row.timezone).map_err(|e| e.to_string())?,
        jitter: crate::schedule::cron::jitter_offset(&row.connection_id, row.jitter_seconds),
    };
    Ok(rule.next_after(now))
}

/// Whether `trigger` waits for the run's outcome.
enum Wait {
    No,
    Forever,
    Until(std::time::Duration),
}

async fn trigger(config: &Config, connection: &str, wait: Wait) -> anyhow::Result<u8> {
    let pool = pool(config).await?;
    let exists: Option<String> = sqlx::query_scalar("select id from connections where id = $1")
        .bind(connection)
        .fetch_optional(&pool)
        .await?;
    if exists.is_none() {
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
        // The command is done once a run settled it; an interrupted run puts
        // it back to pending and another run follows.
        let outcome: Option<(i64, String, Option<String>, Option<String>)> = sqlx::query_as(
            "select r.id, r.status, r.failure_kind, r.failure_detail
             from run_commands c join runs r on r.command_id = c.id
             where c.id = $1 and c.status = 'done' and r.status <> 'running'
             order by r.id desc limit 1",
        )
        .bind(command_id)
        .fetch_optional(&pool)
        .await?;
        if let Some((run_id, status, kind, detail)) = outcome {
            let kind = kind.unwrap_or_default();
            println!("run {run_id}: {status} {kind}");
            if let Some(detail) = detail {
                println!("{}", printable(&detail));
            }
            return Ok(match status.as_str() {
                "succeeded" => exit::OK,
                "refused" => exit::RUN_REFUSED,
                "skipped" => exit::RUN_SKIPPED,
                _ => exit::RUN_FAILED,
            });
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            bail!("no outcome for command {command_id} of {connection} within the timeout; it stays queued");
        }
        // Woken by any run's outcome; the timeout covers a lost connection.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), listener.recv()).await;
    }
}

/// `--since`: a duration back from now, or an RFC 3339 instant.
fn parse_since(text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(duration) = humantime::parse_duration(text) {
        let duration = chrono::Duration::from_std(duration).map_err(|e| e.to_string())?;
        return Ok(Utc::now() - duration);
    }
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| format!("{text:?} is neither a duration like \"1h\" nor an RFC 3339 time"))
}

/// Which runs `runs` lists.
struct RunFilter {
    connection: Option<String>,
    status: Option<String>,
    since: Option<DateTime<Utc>>,
    limit: i64,
}

/// The `where` clause `runs` filters with; `$1`..`$4` are connection,
/// status, limit and since.
const RUNS_FILTER: &str =
    "where ($1::text is null or connection_id = $1) and ($2::text is null or status = $2)
       and ($4::timestamptz is null or created_at >= $4)
     order by id desc limit $3";

async fn runs(config: &Config, filter: RunFilter, json: bool) -> anyhow::Result<u8> {
    let pool = pool(config).await?;
    if json {
        // Every column of the row, under its table name, plus the duration.
        let lines: Vec<String> = sqlx::query_scalar(&format!(
            "select (to_jsonb(r) || jsonb_build_object('duration_ms',
                     (extract(epoch from finished_at - started_at) * 1000)::bigint))::text
             from runs r {RUNS_FILTER}"
        ))
        .bind(&filter.connection)
        .bind(&filter.status)
        .bind(filter.limit)
        .bind(filter.since)
        .fetch_all(&pool)
        .await?;
        for line in lines {
            println!("{line}");
        }
        return Ok(exit::OK);
    }
    #[derive(sqlx::FromRow)]
    struct Row {
        id: i64,
        connection_id: String,
        trigger: String,
        attempt: i32,
        status: String,
        failure_kind: Option<String>,
        created_at: DateTime<Utc>,
        started_at: Option<DateTime<Utc>>,
        finished_at: Option<DateTime<Utc>>,
    }
    let rows: Vec<Row> = sqlx::query_as(&format!(
        "select id, connection_id, trigger, attempt, status, failure_kind, created_at, started_at,
                finished_at
         from runs {RUNS_FILTER}"
    ))
    .bind(filter.connection)
    .bind(filter.status)
    .bind(filter.limit)
    .bind(filter.since)
    .fetch_all(&pool)
    .await?;
    println!(
        "{:<8} {:<20} {:<10} {:<3} {:<10} {:<26} {:<9} CREATED",
        "ID", "CONNECTION", "TRIGGER", "ATT", "STATUS", "FAILURE", "DURATION"
    );
    for row in rows {
        let duration = match (row.started_at, row.finished_at) {
            (Some(s), Some(f)) => format!("{}ms", (f - s).num_milliseconds()),
            _ => String::new(),
        };
        println!(
            "{:<8} {:<20} {:<10} {:<3} {:<10} {:<26} {:<9} {}",
            row.id,
            printable(&row.connection_id),
            row.trigger,
            row.attempt,
            row.status,
            printable(&row.failure_kind.unwrap_or_default()),
            duration,
            row.created_at.to_rfc3339()
        );
    }
    Ok(exit::OK)
}

async fn interactions(config: &Config, open: bool, json: bool) -> anyhow::Result<u8> {
    let pool = pool(config).await?;
    let rows: Vec<(String, String, String, String, Option<String>)> = sqlx::query_as(
        "select to_jsonb(i)::text, id::text, connection_id, kind || ' ' || status, message
         from interactions i where (not $1 or status = 'open') order by id desc",
    )
    .bind(open)
    .fetch_all(&pool)
    .await?;
    if !json {
        println!(
            "{:<6} {:<20} {:<31} MESSAGE",
            "ID", "CONNECTION", "KIND STATUS"
        );
    }
    for (object, id, connection, kind_status, message) in rows {
        if json {
            println!("{object}");
        } else {
            println!(
                "{id:<6} {:<20} {:<31} {}",
                printable(&connection),
                printable(&kind_status),
                printable(&message.unwrap_or_default())
            );
        }
    }
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn urls_lose_their_passwords() {
        for (url, expected) in [
            ("postgres://u:pw@h/db", "postgres://u:[redacted]@h/db"),
            ("postgres://u@h/db", "postgres://u@h/db"),
            (
                "postgres://u@h/db?sslmode=require&password=qsecret",
                "postgres://u@h/db?sslmode=require&password=[redacted]",
            ),
            (
                "postgres://u:p%40ss@h:5432/db?PASSWORD=x",
                "postgres://u:[redacted]@h:5432/db?PASSWORD=[redacted]",
            ),
            ("not a url", "(unparsable URL)"),
            // An unencoded '?', '@' or '/' in the password.
            ("postgres://u:pa?ss@h/db", "postgres://u:[redacted]@h/db"),
            (
                "postgres://u:p@ss/w?rd@h/db?sslmode=disable",
                "postgres://u:[redacted]@h/db?sslmode=disable",
            ),
            (
                "host=h user=u password=s3cret dbname=d",
                "host=h user=u password=[redacted] dbname=d",
            ),
            (
                "host=h password='it\\'s a secret' dbname=d",
                "host=h password=[redacted] dbname=d",
            ),
            ("host=h password='unterminated", "(unparsable URL)"),
        ] {
            assert_eq!(redact_url(url), expected, "{url}");
        }
    }
}
