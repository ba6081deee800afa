//! The command line of SPEC §9: the clap types and the dispatch to one
//! file per command group. Each subcommand is a small function over the
//! library; errors are one sentence naming what is wrong and where.
//!
//! Nothing else in the crate depends on this module: it is the top layer,
//! over `admin` (the operator's statements), `dev`, `daemon` and the rest.

mod check;
mod connections;
mod credentials;
mod exit;
mod interactions;
mod keys;
mod logging;
mod output;
mod runs;
mod schedules;
mod state;
mod status;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use self::logging::LogFormat;
use self::runs::{parse_since, Wait};
use crate::admin::RunFilter;
use crate::config::Config;
use crate::credentials::keys::Keyring;
use crate::vocabulary::RunStatus;

#[derive(Debug, Parser)]
#[command(
    name = "connectord",
    version,
    about = "Runs data connectors on cron schedules, on retries and on demand.",
    after_help = "Exit status: 0 success; 1 error or defect found; 2 bad usage; \
                  for `trigger --wait`: 3 run failed, 4 launch refused, 5 run skipped."
)]
pub(crate) struct Cli {
    /// Config file (TOML). Also CONNECTORD_CONFIG; default
    /// /etc/connectord/connectord.toml when it exists.
    #[arg(long, global = true, env = "CONNECTORD_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// Log format on stderr (filtered by RUST_LOG, default info).
    #[arg(long, global = true, value_enum, default_value = "auto")]
    pub(crate) log_format: LogFormat,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
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
        /// Print one JSON object per line, one per finding ({"ok", "area",
        /// "message"}), instead of text.
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
    /// Show or clear a connection's stored state (never its content).
    #[command(subcommand)]
    State(StateCommand),
    /// Queue a manual run.
    Trigger {
        /// The connection to run.
        connection: String,
        /// Wait for the run and exit with its outcome.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this long ("30s", "10m") with exit
        /// status 1; the command stays queued.
        #[arg(long, requires = "wait", value_parser = humantime::parse_duration)]
        timeout: Option<std::time::Duration>,
    },
    /// What an operator reads first: daemons seen, runs running, commands
    /// pending, schedules in error, open interactions, the latest
    /// refusals.
    Status {
        /// Print one JSON object instead of a screen.
        #[arg(long)]
        json: bool,
    },
    /// List runs, newest first, or cancel one.
    #[command(args_conflicts_with_subcommands = true)]
    Runs {
        #[command(subcommand)]
        action: Option<RunsCommand>,
        /// Only runs of this connection.
        #[arg(long)]
        connection: Option<String>,
        /// Only runs with this status: running, succeeded, failed, refused
        /// or skipped.
        #[arg(long)]
        status: Option<RunStatus>,
        /// Only runs created since this long ago ("1h") or this RFC 3339 time.
        #[arg(long, value_parser = parse_since)]
        since: Option<DateTime<Utc>>,
        /// At most this many runs, the newest.
        #[arg(long, default_value_t = 20)]
        limit: i64,
        /// Print one JSON object per line, one per run (every column of
        /// its row, and duration_ms), instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List interactions, or answer one.
    #[command(args_conflicts_with_subcommands = true)]
    Interactions {
        #[command(subcommand)]
        action: Option<InteractionsCommand>,
        /// Only open interactions, which still wait for their owner.
        #[arg(long)]
        open: bool,
        /// Print one JSON object per line, one per interaction (every
        /// column of its row), instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The bundled demo connector (what `dev` runs as a child).
    #[command(hide = true)]
    DemoConnector,
}

#[derive(Debug, Subcommand)]
pub(crate) enum KeysCommand {
    /// Write a new random key file `<ID>.key` with mode 0600.
    Generate {
        /// The key's id: the file's name without `.key`, and what
        /// `keys.primary` names.
        #[arg(long)]
        id: String,
        /// Key directory (default: keys.dir of the config).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum ConnectionsCommand {
    /// Add a connection: one owner's instance of a connector.
    Add {
        /// The connection's id, a slug operators type (`alice-chase`).
        id: String,
        /// The connector it runs: a `[connectors.NAME]` of the config.
        #[arg(long)]
        connector: String,
        /// Who owns it.
        #[arg(long)]
        owner: Option<String>,
    },
    /// List connections, by id.
    List {
        /// Print one JSON object per line, one per connection, instead of
        /// a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum CredentialsCommand {
    /// Store a credential; the secret (token or password) is read from stdin.
    Set {
        /// The connection the credential is for.
        connection: String,
        /// The credential's kind: a token (static_secret) or a username
        /// and password.
        #[arg(long, value_parser = ["static_secret", "username_password"])]
        kind: String,
        /// The username; `-` reads it from stdin's first line, before the
        /// password, so it stays out of argv.
        #[arg(long)]
        username: Option<String>,
    },
    /// Revoke the connection's active credential; its runs are refused
    /// until a new one is set.
    Revoke {
        /// The connection whose credential is revoked.
        connection: String,
    },
    /// Delete every credential of the connection, destroying their
    /// ciphertext; its runs are refused until a new one is set.
    Delete {
        /// The connection whose credentials are deleted.
        connection: String,
    },
    /// Re-encrypt every credential and connector state under the primary
    /// key.
    Rotate,
}

#[derive(Debug, Subcommand)]
pub(crate) enum RunsCommand {
    /// Cancel a running run: the daemon running it terminates the
    /// connector (SIGTERM, then SIGKILL after kill_grace) and records it
    /// failed/cancelled, not retried.
    Cancel {
        /// The run's id (`connectord runs --status running`).
        run_id: i64,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum InteractionsCommand {
    /// Answer a code_required interaction: the code is read from stdin
    /// (never argv) and reaches the waiting connector encrypted.
    Answer {
        /// The interaction's id (`connectord interactions --open`).
        id: i64,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum StateCommand {
    /// Print the state's size, when and by which run it was written.
    Show {
        /// The connection whose state is described.
        connection: String,
        /// Print one JSON object (connection, size_bytes, updated_at,
        /// run_id) instead of a sentence.
        #[arg(long)]
        json: bool,
    },
    /// Discard the state: the next run starts without one.
    Clear {
        /// The connection whose state is discarded.
        connection: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum SchedulesCommand {
    /// Create or replace the connection's schedule.
    Set {
        /// The connection to run.
        connection: String,
        /// When: 5 cron fields, or 6 with leading seconds, or @hourly,
        /// @daily, @weekly, @monthly, @yearly.
        cron: String,
        /// The IANA time zone the cron is read in.
        #[arg(long, default_value = "UTC")]
        tz: String,
        /// A tick while the connection has a run going: skip records a
        /// skipped run, queue waits for the running one.
        #[arg(long, value_parser = ["skip", "queue"], default_value = "skip")]
        overlap: String,
        /// Fixed per-connection offset spread over [0, N) seconds; kept
        /// as it is when omitted.
        #[arg(long)]
        jitter: Option<i32>,
    },
    /// Pause every schedule of the connection.
    Pause {
        /// The connection whose schedules stop firing.
        connection: String,
    },
    /// Resume every schedule of the connection.
    Resume {
        /// The connection whose schedules fire again.
        connection: String,
    },
    /// List schedules with their next fire time.
    List {
        /// Print one JSON object per line, one per schedule, instead of a
        /// table.
        #[arg(long)]
        json: bool,
    },
}

/// Loads the config named on the command line, or the default file, or
/// built-in defaults; `DATABASE_URL` applies in every case.
pub(crate) fn load_config(path: Option<&Path>) -> anyhow::Result<Config> {
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

/// The `connectord` command line: parses the arguments, runs the command
/// and returns its exit status.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::DemoConnector) {
        return crate::dev::demo_connector();
    }
    logging::init(cli.log_format);
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
            crate::daemon::shutdown::spawn_signal_handler(shutdown.clone());
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
        Command::Check { json } => check::run(&config, json).await,
        Command::Keys(command) => keys::run(&config, command),
        Command::Connections(command) => connections::run(&config, command).await,
        Command::Credentials(command) => credentials::run(&config, command).await,
        Command::Schedules(command) => schedules::run(&config, command).await,
        Command::State(command) => state::run(&config, command).await,
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
            runs::trigger(&config, &connection, wait).await
        }
        Command::Status { json } => status::show(&config, json).await,
        Command::Runs {
            action: Some(RunsCommand::Cancel { run_id }),
            ..
        } => runs::cancel(&config, run_id).await,
        Command::Runs {
            action: None,
            connection,
            status,
            since,
            limit,
            json,
        } => {
            runs::list(
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
        Command::Interactions {
            action: Some(InteractionsCommand::Answer { id }),
            ..
        } => interactions::answer(&config, id).await,
        Command::Interactions {
            action: None,
            open,
            json,
        } => interactions::list(&config, open, json).await,
    }
}

/// The database of `config`; the error names its address, without the
/// password.
pub(crate) async fn pool(config: &Config) -> anyhow::Result<PgPool> {
    crate::db::connect(&config.database).await.with_context(|| {
        format!(
            "cannot connect to the database at {}",
            crate::db::redact_url(&config.database.url)
        )
    })
}

/// The key directory of `config`; a missing one is an error that says how
/// to create it.
pub(crate) fn keyring(config: &Config) -> anyhow::Result<Keyring> {
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
