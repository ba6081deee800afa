//! The bench's world: its own PostgreSQL cluster and a fresh database, a key,
//! the probe connector, the FIFO the probes report to, the daemon's config,
//! and connections that each hold a stored credential.

use std::io::{BufRead, BufReader};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use connectord::credentials::keys::Keyring;
use connectord::credentials::secret::{Plaintext, Secret};
use connectord::dev::pgcluster::{cluster_dir, Cluster};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio::sync::mpsc;

/// How much of everything to do.
#[derive(Debug, Clone)]
pub struct Mode {
    pub full: bool,
    /// Pickup: rounds, each with this many samples per daemon; rounds
    /// alternate connectord and the minimal daemon to spread machine noise.
    pub pickup_rounds: usize,
    pub pickup_samples_per_round: usize,
    /// Throughput: commands per round, and rounds.
    pub throughput_commands: usize,
    pub throughput_rounds: usize,
    pub resolver_samples: usize,
    pub schedules: usize,
    pub idle_window: Duration,
    /// Rows edited to fire inside the lateness window, and its length.
    pub lateness_rows: usize,
    pub lateness_window: Duration,
    pub burst_rows: usize,
    pub burst_ticks: usize,
    pub edit_samples: usize,
    /// Connections, each with a stored credential.
    pub connections: usize,
    /// Also measure a restart with the schedules already loaded.
    pub restart: bool,
    /// Record `perf` profiles of the daemon during pickup and throughput.
    pub perf: bool,
    /// Only these sections (all when empty).
    pub only: Vec<String>,
}

impl Mode {
    pub fn short() -> Mode {
        Mode {
            full: false,
            pickup_rounds: 2,
            pickup_samples_per_round: 150,
            throughput_commands: 4_000,
            throughput_rounds: 1,
            resolver_samples: 1_000,
            schedules: 100_000,
            idle_window: Duration::from_secs(10),
            lateness_rows: 1_200,
            lateness_window: Duration::from_secs(3),
            burst_rows: 2_000,
            burst_ticks: 5,
            edit_samples: 8,
            connections: 2_000,
            restart: true,
            perf: false,
            only: Vec::new(),
        }
    }

    pub fn full() -> Mode {
        Mode {
            full: true,
            pickup_rounds: 4,
            pickup_samples_per_round: 500,
            throughput_commands: 10_000,
            throughput_rounds: 3,
            resolver_samples: 5_000,
            idle_window: Duration::from_secs(30),
            // Under the daemon's edit queue of 4,096 notifications, so the
            // edit is applied row by row rather than by a full re-read.
            lateness_rows: 4_000,
            lateness_window: Duration::from_secs(20),
            edit_samples: 500,
            ..Mode::short()
        }
    }

    pub fn runs(&self, section: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == section)
    }
}

/// Now on `CLOCK_REALTIME`, in nanoseconds: the clock the probe reads and
/// PostgreSQL's `now()` is taken from.
pub fn realtime_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// One probe start, as the probe wrote it.
#[derive(Debug, Clone, Copy)]
pub struct ProbeRecord {
    /// `CONNECTORD_RUN_ID` as the launcher set it.
    pub run_id: i64,
    /// `CLOCK_REALTIME` at the probe's start, in ns.
    pub started_ns: i64,
    /// Whether `PROBE_TOKEN` (the stored credential) reached the probe.
    pub had_token: bool,
}

/// The probes' reports, read from the FIFO by a thread.
pub struct Records {
    rx: mpsc::UnboundedReceiver<ProbeRecord>,
}

impl Records {
    /// The next record, or `None` after `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<ProbeRecord> {
        tokio::time::timeout(timeout, self.rx.recv())
            .await
            .ok()
            .flatten()
    }

    /// Every record already received.
    pub fn drain(&mut self) -> Vec<ProbeRecord> {
        let mut out = Vec::new();
        while let Ok(record) = self.rx.try_recv() {
            out.push(record);
        }
        out
    }

    /// Every record already received, as each run's probe start (ns).
    pub fn started_by_run(&mut self) -> std::collections::HashMap<i64, i64> {
        self.drain()
            .into_iter()
            .map(|r| (r.run_id, r.started_ns))
            .collect()
    }

    /// Collects records until `count` have arrived or `timeout` passes.
    pub async fn collect(&mut self, count: usize, timeout: Duration) -> Vec<ProbeRecord> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut out = Vec::with_capacity(count);
        while out.len() < count {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(record)) => out.push(record),
                _ => break,
            }
        }
        out
    }
}

/// Everything the sections share.
pub struct Env {
    pub mode: Mode,
    pub work: PathBuf,
    pub cluster: Cluster,
    pub database: String,
    pub url: String,
    pub pool: PgPool,
    pub probe: PathBuf,
    pub fifo: PathBuf,
    pub records: Records,
    pub keys_dir: PathBuf,
    pub keyring: Arc<Keyring>,
    pub config_path: PathBuf,
    pub connections: Vec<String>,
    pub daemon_bin: PathBuf,
}

impl Env {
    pub async fn new(mode: Mode) -> anyhow::Result<Env> {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let work = manifest.join("target/connectord-bench");
        std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;

        let started = Instant::now();
        let base = cluster_dir(&manifest.join("target/connectord-bench-pg"));
        let cluster = tokio::task::spawn_blocking(move || Cluster::ensure_running(&base))
            .await
            .context("cluster start-up thread")?
            .context("starting the bench's PostgreSQL")?;
        eprintln!(
            "bench: PostgreSQL on port {} ({}), ready in {:.1}s",
            cluster.port,
            cluster.base_dir.display(),
            started.elapsed().as_secs_f64()
        );

        let database = format!("bench_{}", std::process::id());
        let admin = PgPool::connect(&cluster.url("postgres"))
            .await
            .context("connecting to the bench's PostgreSQL")?;
        drop_stale_databases(&admin, "bench").await;
        sqlx::query(&format!("create database {database}"))
            .execute(&admin)
            .await
            .context("creating the bench database")?;
        admin.close().await;
        let url = cluster.url(&database);
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect(&url)
            .await
            .context("connecting to the bench database")?;
        connectord::db::migrate(&pool)
            .await
            .context("migrating the bench database")?;

        let probe = compile(manifest, &work, "probe")?;
        let fifo = work.join("probe.fifo");
        let records = open_fifo(&fifo)?;

        let keys_dir = work.join("keys");
        if keys_dir.exists() {
            std::fs::remove_dir_all(&keys_dir)
                .with_context(|| format!("removing {}", keys_dir.display()))?;
        }
        connectord::credentials::keys::generate(&keys_dir, "k1")
            .context("generating the bench key")?;
        let keyring = Arc::new(Keyring::load(&keys_dir, "k1").context("loading the bench key")?);

        let config_path = work.join("connectord.toml");
        std::fs::write(
            &config_path,
            config_text(&url, &keys_dir, &probe, &fifo, 10),
        )
        .context("writing the daemon config")?;

        let connections = seed_connections(&pool, &keyring, mode.connections).await?;

        Ok(Env {
            mode,
            work,
            cluster,
            database,
            url,
            pool,
            probe,
            fifo,
            records,
            keys_dir,
            keyring,
            config_path,
            connections,
            daemon_bin: PathBuf::from(env!("CARGO_BIN_EXE_connectord")),
        })
    }

    /// The programs the spawn-only baselines start.
    pub fn programs(&self) -> super::minimal::Programs {
        super::minimal::Programs {
            probe: self.probe.clone(),
            fifo: self.fifo.clone(),
        }
    }

    /// Writes a variant of the daemon config (another pool size) and
    /// returns its path.
    pub fn config_variant(&self, name: &str, max_connections: u32) -> anyhow::Result<PathBuf> {
        let path = self.work.join(format!("connectord-{name}.toml"));
        std::fs::write(
            &path,
            config_text(
                &self.url,
                &self.keys_dir,
                &self.probe,
                &self.fifo,
                max_connections,
            ),
        )
        .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// The daemon config with `/metrics` served on `port`; returns its
    /// path.
    pub fn metrics_config(&self, port: u16) -> anyhow::Result<PathBuf> {
        let path = self.work.join("connectord-metrics.toml");
        let text = format!(
            "{}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n",
            config_text(&self.url, &self.keys_dir, &self.probe, &self.fifo, 10)
        );
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// The daemon config with the sandbox on (SPEC §12); returns its path.
    pub fn sandboxed_config(&self) -> anyhow::Result<PathBuf> {
        let path = self.work.join("connectord-sandboxed.toml");
        let text = config_text(&self.url, &self.keys_dir, &self.probe, &self.fifo, 10)
            .replace("enabled = false", "enabled = true");
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// Cancels retry commands still pending: they come from runs the daemon
    /// lost (see the warnings), and would otherwise run during the next
    /// measurement. Returns how many there were.
    pub async fn cancel_retries(&self) -> anyhow::Result<u64> {
        Ok(sqlx::query(
            "update run_commands set status = 'done'
             where status = 'pending' and trigger = 'retry'",
        )
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    /// Non-succeeded runs of the commands `first..=last`, by status and
    /// failure kind, e.g. "failed/lost: 1".
    pub async fn outcomes(&self, first: i64, last: i64) -> anyhow::Result<String> {
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "select status, coalesce(failure_kind, ''), count(*) from runs
             where command_id between $1 and $2 and status <> 'succeeded'
             group by 1, 2 order by 3 desc",
        )
        .bind(first)
        .bind(last)
        .fetch_all(&self.pool)
        .await?;
        if rows.is_empty() {
            return Ok("none".to_owned());
        }
        Ok(rows
            .iter()
            .map(|(status, kind, n)| format!("{status}/{kind}: {n}"))
            .collect::<Vec<_>>()
            .join(", "))
    }

    /// Waits until no command is pending or claimed and no run is going,
    /// so one measurement does not pay for the tail of the previous one.
    /// A pending retry does not count: waiting out its backoff would only
    /// stall the bench (retries come from lost runs; see `cancel_retries`).
    pub async fn wait_quiet(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let busy: bool = sqlx::query_scalar(
                "select exists (select 1 from run_commands
                                where status <> 'done'
                                  and not (status = 'pending' and trigger = 'retry'))
                     or exists (select 1 from runs where status = 'running')",
            )
            .fetch_one(&self.pool)
            .await?;
            if !busy {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("commands or runs still in flight after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Drops the bench database (the cluster stays up for the next run, as
    /// the test cluster does).
    pub async fn cleanup(self) {
        self.pool.close().await;
        if let Ok(admin) = PgPool::connect(&self.cluster.url("postgres")).await {
            let _ = sqlx::query(&format!(
                "drop database if exists {} with (force)",
                self.database
            ))
            .execute(&admin)
            .await;
            admin.close().await;
        }
    }
}

/// The daemon config: unsandboxed, so P1 and P2 measure the daemon's own
/// work without the sandbox's; the sandbox section writes its own variant
/// (`Env::sandboxed_config`).
fn config_text(url: &str, keys: &Path, probe: &Path, fifo: &Path, max_connections: u32) -> String {
    // max_concurrency is above max_concurrent_runs so the daemon-wide limit
    // of 32 is the one that binds.
    format!(
        r#"[database]
url = "{url}"
max_connections = {max_connections}

[keys]
dir = "{keys}"
primary = "k1"

[daemon]
instance_id = "bench"
max_concurrent_runs = 32

{probe_connector}

# P9: the probe asking for a one-time code.
[connectors.asker]
command = "{probe}"
env = {{ PROBE_OUT = "{fifo}", PROBE_ASK = "1" }}
timeout = "5m"
max_concurrency = 64
read_write_paths = ["{fifo}"]

[sandbox]
enabled = false
"#,
        keys = keys.display(),
        probe = probe.display(),
        fifo = fifo.display(),
        probe_connector = probe_connector(probe, fifo),
    )
}

/// The `probe` connector: the static probe, reporting to the FIFO, with a
/// stored static secret as `PROBE_TOKEN`.
pub fn probe_connector(probe: &Path, fifo: &Path) -> String {
    format!(
        r#"[connectors.probe]
command = "{probe}"
env = {{ PROBE_OUT = "{fifo}" }}
timeout = "1m"
max_concurrency = 64
credential = {{ kind = "static_secret", env = "PROBE_TOKEN" }}
read_write_paths = ["{fifo}"]
"#,
        probe = probe.display(),
        fifo = fifo.display(),
    )
}

/// Compiles `benches/<name>.c`, statically when the toolchain can.
fn compile(manifest: &Path, work: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let source = manifest.join(format!("benches/{name}.c"));
    let out = work.join(name);
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    for static_link in [true, false] {
        let mut command = Command::new(&cc);
        command.arg("-O2");
        if static_link {
            command.arg("-static");
        }
        let status = command
            .arg("-o")
            .arg(&out)
            .arg(&source)
            .status()
            .with_context(|| format!("running {cc} to build {name}"))?;
        if status.success() {
            if !static_link {
                eprintln!("bench: static linking failed; {name} is linked dynamically");
            }
            return Ok(out);
        }
    }
    bail!("{cc} could not compile {}", source.display())
}

/// Makes the FIFO and starts the thread that reads it.
fn open_fifo(path: &Path) -> anyhow::Result<Records> {
    let _ = std::fs::remove_file(path);
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .context("the FIFO path contains a NUL byte")?;
    // SAFETY: mkfifo reads a NUL-terminated path that outlives the call.
    if unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("mkfifo {}", path.display()));
    }
    // Opened for reading and writing, so the open does not wait for a
    // writer and reads never see end-of-file between probes.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    // Unbounded on purpose: the producers are probes this bench started
    // itself (at most a few tens of thousands per phase), and a bounded
    // channel would make a slow consumer stall probes mid-measurement.
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::Builder::new()
        .name("probe-fifo".into())
        .spawn(move || {
            for line in BufReader::new(file).lines() {
                let Ok(line) = line else { break };
                let mut fields = line.split_whitespace();
                let (Some(run), Some(ns), Some(token)) =
                    (fields.next(), fields.next(), fields.next())
                else {
                    continue;
                };
                let (Ok(run_id), Ok(started_ns)) = (run.parse(), ns.parse()) else {
                    continue;
                };
                let record = ProbeRecord {
                    run_id,
                    started_ns,
                    had_token: token == "1",
                };
                if tx.send(record).is_err() {
                    break;
                }
            }
        })
        .context("starting the FIFO reader")?;
    Ok(Records { rx })
}

/// `bench-0000`… with a stored `static_secret` each, set through the store
/// like `connectord credentials set` does.
async fn seed_connections(
    pool: &PgPool,
    keyring: &Arc<Keyring>,
    count: usize,
) -> anyhow::Result<Vec<String>> {
    let started = Instant::now();
    let ids: Vec<String> = (0..count).map(|i| format!("bench-{i:04}")).collect();
    sqlx::query(
        "insert into connections (id, connector, owner) select id, 'probe', 'bench' from unnest($1::text[]) as id",
    )
    .bind(&ids)
    .execute(pool)
    .await
    .context("inserting connections")?;
    // A few at a time: store::set is one short transaction each.
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in ids.chunks(count.div_ceil(4).max(1)) {
        let chunk = chunk.to_vec();
        let pool = pool.clone();
        let keyring = keyring.clone();
        tasks.spawn(async move {
            for id in chunk {
                let token = Plaintext::StaticSecret(Secret::new(format!("token-of-{id}")));
                connectord::credentials::store::set(&pool, &keyring, &id, &token)
                    .await
                    .with_context(|| format!("storing the credential of {id}"))?;
            }
            Ok::<(), anyhow::Error>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.context("credential seeding task")??;
    }
    eprintln!(
        "bench: {count} connections with stored credentials in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(ids)
}

/// Drops the databases named `<prefix>_<pid>` of bench processes that no
/// longer run.
pub async fn drop_stale_databases(admin: &PgPool, prefix: &str) {
    let names: Vec<String> =
        sqlx::query_scalar("select datname from pg_database where starts_with(datname, $1 || '_')")
            .bind(prefix)
            .fetch_all(admin)
            .await
            .unwrap_or_default();
    for name in names {
        let alive = name
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix('_'))
            .and_then(|p| p.parse::<u32>().ok())
            .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if !alive {
            let _ = sqlx::query(&format!("drop database if exists {name} with (force)"))
                .execute(admin)
                .await;
        }
    }
}
