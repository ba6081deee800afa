//! `connectord dev`: one command for a newcomer. It starts a private
//! PostgreSQL under the project's `target/` (or, as root, somewhere the
//! `postgres` user can reach), creates a key, writes a config whose
//! connectors are the bundled demo connector, seeds demo connections with
//! stored credentials and frequent schedules, and runs the daemon in the
//! foreground until Ctrl-C. The data stays for next time.

// Public for the tests' and the benchmark's private PostgreSQL, which
// they reach as `connectord::dev::pgcluster`; not part of the library's API.
#[doc(hidden)]
pub mod pgcluster;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use self::pgcluster::Cluster;
use crate::admin;
use crate::config::Config;
use crate::credentials::secret::{Plaintext, Secret};

/// The demo connections: (connection id, connector).
const DEMO: [(&str, &str); 5] = [
    ("alice-amazon", "amazon"),
    ("alice-chase", "chase"),
    ("bob-reddit", "reddit"),
    ("bob-usaa", "usaa"),
    ("alice-github", "github"),
];

/// How often the demo connections run: every 15 seconds, so a newcomer
/// sees runs at once.
const DEMO_CRON: &str = "*/15 * * * * *";

/// The directory for dev data: beside the binary's `target/`, else
/// `./target`.
fn target_dir() -> PathBuf {
    if let Ok(exe) = std::env::current_exe() {
        if let Some(target) = exe
            .ancestors()
            .find(|p| p.file_name() == Some("target".as_ref()))
        {
            return target.to_path_buf();
        }
    }
    PathBuf::from("target")
}

fn dev_config(cluster: &Cluster, keys_dir: &Path, exe: &Path) -> String {
    let mut text = format!(
        "# Written by `connectord dev` on every start; edit a copy and use\n\
         # `connectord --config FILE run` to keep changes.\n\n\
         [database]\nurl = {url:?}\nmax_connections = 10\n\n\
         [keys]\ndir = {keys:?}\nprimary = \"k1\"\n\n\
         [daemon]\ninstance_id = \"dev\"\nshutdown_grace = \"5s\"\nkill_grace = \"2s\"\nlease = \"10s\"\n\n",
        url = cluster.url("connectord"),
        keys = keys_dir.display().to_string(),
    );
    for (_, connector) in DEMO {
        let upper = connector.to_uppercase();
        let (credential, vars) = if connector == "github" {
            (
                format!("{{ kind = \"static_secret\", env = \"{upper}_TOKEN\" }}"),
                format!("{upper}_TOKEN"),
            )
        } else {
            (
                format!(
                    "{{ kind = \"username_password\", username_env = \"{upper}_USERNAME\", password_env = \"{upper}_PASSWORD\" }}"
                ),
                format!("{upper}_USERNAME,{upper}_PASSWORD"),
            )
        };
        // The bank asks for a one-time code now and then.
        let asks = if connector == "chase" {
            ", DEMO_ASKS_FOR_CODE = \"1\""
        } else {
            ""
        };
        text.push_str(&format!(
            "[connectors.{connector}]\ncommand = {exe:?}\nargs = [\"demo-connector\"]\n\
             env = {{ DEMO_CREDENTIAL_VARS = \"{vars}\"{asks} }}\ntimeout = \"2m\"\n\
             retry = {{ max_attempts = 2, backoff = \"5s\", max_backoff = \"1m\" }}\n\
             credential = {credential}\n\n",
            exe = exe.display().to_string(),
        ));
    }
    text
}

/// The private clusters of this checkout: `dev`'s, the tests' and the
/// benchmark's, each left running for the next start.
const CLUSTERS: [&str; 3] = [
    "connectord-dev",
    "connectord-test-pg",
    "connectord-bench-pg",
];

/// `connectord dev --stop`: stops every private cluster of this checkout.
pub(crate) fn stop() -> anyhow::Result<()> {
    for name in CLUSTERS {
        let base = pgcluster::cluster_dir(&target_dir().join(name));
        if Cluster::stop_at(&base)? {
            println!(
                "stopped the PostgreSQL cluster in {} (its data stays)",
                base.display()
            );
        }
    }
    Ok(())
}

pub(crate) async fn run() -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating the connectord binary")?;
    let base = pgcluster::cluster_dir(&target_dir().join("connectord-dev"));
    let cluster = {
        let base = base.clone();
        tokio::task::spawn_blocking(move || Cluster::ensure_running(&base))
            .await
            .context("starting PostgreSQL")??
    };
    tracing::info!(port = cluster.port, data = %cluster.data_dir.display(), "private PostgreSQL is running on 127.0.0.1; its password is in the config written below");
    create_database(&cluster, "connectord").await?;

    let keys_dir = base.join("keys");
    if !keys_dir.join("k1.key").exists() {
        crate::credentials::keys::generate(&keys_dir, "k1")?;
    }
    let config_path = base.join("connectord.toml");
    // It holds the cluster's password: readable by its owner alone.
    pgcluster::write_private(&config_path, &dev_config(&cluster, &keys_dir, &exe))?;
    // The private cluster is the point of `dev`: ignore DATABASE_URL here.
    let config = Config::parse(&std::fs::read_to_string(&config_path)?)
        .map_err(|e| anyhow::anyhow!("{}: {e}", config_path.display()))?;
    tracing::info!(config = %config_path.display(), "config written");

    let pool = crate::db::connect(&config.database).await?;
    crate::db::migrate(&pool).await?;
    seed(&pool, &config).await?;
    pool.close().await;

    let shutdown = CancellationToken::new();
    crate::daemon::shutdown::spawn_signal_handler(shutdown.clone());
    let watch = format!("{} --config {} runs", exe.display(), config_path.display());
    let result = crate::daemon::run(config, shutdown, |_| {
        tracing::info!("demo connections run every 15 seconds; Ctrl-C stops. In another terminal, watch them with: {watch}");
    })
    .await;
    let stopped = tokio::task::spawn_blocking(move || cluster.stop()).await;
    match stopped {
        Ok(Ok(())) => tracing::info!("private PostgreSQL stopped; data kept for next time"),
        Ok(Err(e)) => tracing::warn!(error = %e, "stopping PostgreSQL failed"),
        Err(e) => tracing::warn!(error = %e, "stopping PostgreSQL failed"),
    }
    result
}

/// Creates `name` on the cluster unless it exists. Public for the tests.
#[doc(hidden)]
pub async fn create_database(cluster: &Cluster, name: &str) -> anyhow::Result<()> {
    let admin = sqlx::PgPool::connect(&cluster.url("postgres")).await?;
    let exists: bool =
        sqlx::query_scalar("select exists (select 1 from pg_database where datname = $1)")
            .bind(name)
            .fetch_one(&admin)
            .await?;
    if !exists {
        sqlx::query(&format!("create database \"{name}\""))
            .execute(&admin)
            .await?;
    }
    admin.close().await;
    Ok(())
}

/// Demo connections with stored credentials and frequent schedules; rows
/// that exist are left as they are.
async fn seed(pool: &sqlx::PgPool, config: &Config) -> anyhow::Result<()> {
    let keyring =
        crate::daemon::load_keyring(config)?.context("the dev key directory is missing")?;
    for (id, connector) in DEMO {
        let owner = id.split('-').next().unwrap_or("demo");
        admin::add_connection(pool, id, connector, Some(owner)).await?;
        if !admin::has_credential(pool, id).await? {
            let plaintext = if connector == "github" {
                Plaintext::StaticSecret(Secret::new(format!("demo-token-for-{id}")))
            } else {
                Plaintext::UsernamePassword {
                    username: Secret::new(format!("{id}@example.com")),
                    password: Secret::new(format!("demo-password-for-{id}")),
                }
            };
            crate::credentials::store::set(pool, &keyring, id, &plaintext).await?;
        }
        admin::add_schedule_unless_any(pool, id, DEMO_CRON).await?;
    }
    tracing::info!(connections = DEMO.len(), "demo connections seeded");
    Ok(())
}

/// The bundled demo connector: reports which credential variables it
/// received (names and lengths, never values), counts its visits in the
/// connection's state, reports some progress, and exits 0.
pub(crate) fn demo_connector() -> ExitCode {
    let connection = std::env::var("CONNECTORD_CONNECTION_ID").unwrap_or_default();
    let names = std::env::var("DEMO_CREDENTIAL_VARS").unwrap_or_default();
    let mut received = Vec::new();
    for name in names.split(',').filter(|n| !n.is_empty()) {
        match std::env::var(name) {
            Ok(value) if !value.is_empty() => {
                received.push(format!("{name} ({} chars)", value.chars().count()))
            }
            _ => received.push(format!("{name} (missing)")),
        }
    }
    let (visit, number) = match count_visit() {
        Ok(visit) => (format!("visit {visit} (counted in its state)"), visit),
        Err(e) => (format!("no visit counted: {e}"), 0),
    };
    let message = format!(
        "demo connector for {connection} received {}; {visit}",
        received.join(", ")
    );
    println!(
        "{}",
        serde_json::json!({"type": "log", "level": "info", "message": message})
    );
    // Every fourth visit but the first, as a bank would now and then.
    if std::env::var_os("DEMO_ASKS_FOR_CODE").is_some() && number % 4 == 1 && number > 1 {
        if let Err(message) = ask_for_code() {
            println!(
                "{}",
                serde_json::json!({"type": "log", "level": "warn", "message": message})
            );
            return ExitCode::FAILURE;
        }
    }
    for records in [10, 20, 30] {
        println!(
            "{}",
            serde_json::json!({"type": "progress", "records": records})
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    ExitCode::SUCCESS
}

/// Asks the owner for a one-time code, as a bank's login would, and waits
/// for the answer on stdin.
fn ask_for_code() -> Result<(), String> {
    use std::io::{BufRead, Write};
    println!(
        "{}",
        serde_json::json!({"type": "interaction", "kind": "code_required",
                           "message": "Code sent to ***1234", "timeout": "90s"})
    );
    let _ = std::io::stdout().flush();
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| format!("cannot read the answer: {e}"))?;
    let answer: serde_json::Value =
        serde_json::from_str(&line).map_err(|_| "no answer came".to_owned())?;
    if answer["expired"] == true {
        return Err("no code came in time; the login is abandoned".to_owned());
    }
    let length = answer["value"].as_str().map_or(0, |v| v.chars().count());
    let message = format!("received a one-time code ({length} characters)");
    println!(
        "{}",
        serde_json::json!({"type": "log", "level": "info", "message": message})
    );
    Ok(())
}

/// Reads the visit counter from `CONNECTORD_STATE_FILE` (absent on the
/// first run), and writes it back one higher, by rename as a connector
/// should, so a run killed half way leaves the old state whole.
fn count_visit() -> std::io::Result<u64> {
    let path = std::env::var_os("CONNECTORD_STATE_FILE")
        .map(PathBuf::from)
        .ok_or_else(|| std::io::Error::other("CONNECTORD_STATE_FILE is not set"))?;
    let previous = match std::fs::read_to_string(&path) {
        Ok(text) => text
            .trim()
            .strip_prefix("visits=")
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e),
    };
    let visit = previous + 1;
    let temporary = path.with_extension("new");
    std::fs::write(&temporary, format!("visits={visit}\n"))?;
    std::fs::rename(&temporary, &path)?;
    Ok(visit)
}
