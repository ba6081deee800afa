//! Test support: a private PostgreSQL (or `DATABASE_URL`), a fresh database
//! per test, the real daemon binary as a child process, and a stand-in
//! connector that records the environment it received.

#![allow(dead_code)]

mod config;
pub mod outages;

#[allow(unused_imports)]
pub use config::{Config, Connector};

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::PgPool;

/// How long a test waits for something the daemon should do promptly.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// The server every test database lives on.
fn server_url() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        if let Ok(url) = std::env::var("DATABASE_URL") {
            if !url.is_empty() {
                return url;
            }
        }
        let preferred = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/connectord-test-pg");
        let base = connectord::dev::pgcluster::cluster_dir(&preferred);
        let cluster = connectord::dev::pgcluster::Cluster::ensure_running(&base)
            .unwrap_or_else(|e| panic!("cannot start the test PostgreSQL: {e}"));
        cluster.url("postgres")
    })
}

/// `url` with its database replaced by `database`.
pub fn with_database(url: &str, database: &str) -> String {
    let scheme_end = url.find("://").map_or(0, |i| i + 3);
    let (base, query) = match url.find('?') {
        Some(q) => (&url[..q], &url[q..]),
        None => (url, ""),
    };
    let host_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    format!("{}/{database}{query}", &base[..host_end])
}

/// A fresh, migrated database for one test.
pub struct TestDb {
    pub url: String,
    pub pool: PgPool,
    pub name: String,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The suite counts the rows statements read, which needs
/// `pg_stat_force_next_flush` (PostgreSQL 15): on an older server a test
/// could not make its assertion, so the suite refuses to run at all.
async fn require_postgresql_15(admin: &PgPool) {
    let version: i32 = sqlx::query_scalar("select current_setting('server_version_num')::int")
        .fetch_one(admin)
        .await
        .expect("read the server's version");
    assert!(
        version >= 150_000,
        "the tests need PostgreSQL 15 or later; the test server is {version}"
    );
}

impl TestDb {
    pub async fn new() -> TestDb {
        let server = server_url().to_owned();
        let admin = sqlx::PgPool::connect(&server)
            .await
            .expect("connect to the test server");
        require_postgresql_15(&admin).await;
        drop_stale_databases(&admin).await;
        let name = format!(
            "t_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        sqlx::query(&format!("create database {name}"))
            .execute(&admin)
            .await
            .expect("create test database");
        admin.close().await;
        TestDb::open(with_database(&server, &name), name).await
    }

    /// Connects to the database `name` at `url` and migrates it.
    pub async fn open(url: String, name: String) -> TestDb {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(5)
            .connect(&url)
            .await
            .expect("connect to the test database");
        connectord::db::migrate(&pool).await.expect("migrate");
        TestDb { url, pool, name }
    }

    /// Waits until `sql` (a query returning one boolean) is true, re-checking
    /// whenever a run settles or a command is queued, and at least every
    /// 100 ms for state no notification announces.
    pub async fn wait_until(&self, sql: &str) {
        let mut listener = PgListener::connect_with(&self.pool)
            .await
            .expect("listener");
        listener
            .listen_all(["connectord_runs", "connectord_commands"])
            .await
            .expect("listen");
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let done: bool = sqlx::query_scalar(sql)
                .fetch_one(&self.pool)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
            if done {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("timed out waiting for: {sql}");
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), listener.recv()).await;
        }
    }

    pub async fn scalar<T>(&self, sql: &str) -> T
    where
        T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
    {
        sqlx::query_scalar(sql)
            .fetch_one(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    pub async fn exec(&self, sql: &str) {
        sqlx::raw_sql(sql)
            .execute(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

/// Drops databases left by test processes that no longer run.
async fn drop_stale_databases(admin: &PgPool) {
    static DONE: OnceLock<()> = OnceLock::new();
    if DONE.set(()).is_err() {
        return;
    }
    let names: Vec<String> =
        sqlx::query_scalar("select datname from pg_database where datname like 't\\_%\\_%'")
            .fetch_all(admin)
            .await
            .unwrap_or_default();
    for name in names {
        let pid = name.split('_').nth(1).and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = sqlx::query(&format!("drop database if exists {name} with (force)"))
                    .execute(admin)
                    .await;
            }
        }
    }
}

/// A scratch directory under the target dir, removed on drop.
pub struct Scratch {
    pub path: PathBuf,
}

impl Scratch {
    pub fn new() -> Scratch {
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "scratch-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&path).expect("create scratch dir");
        Scratch { path }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The stand-in connector script.
pub fn stand_in() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/connectors/record-env.sh")
        .display()
        .to_string()
}

/// The environment a stand-in child recorded for `run_id`.
pub fn recorded_env(dir: &Path, run_id: i64) -> BTreeMap<String, String> {
    let path = dir.join(format!("{run_id}.env"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    bytes
        .split(|b| *b == 0)
        .filter(|entry| !entry.is_empty())
        .filter_map(|entry| {
            let text = String::from_utf8_lossy(entry);
            let (k, v) = text.split_once('=')?;
            Some((k.to_owned(), v.to_owned()))
        })
        .collect()
}

/// Run ids whose stand-in recorded an environment.
pub fn recorded_runs(dir: &Path) -> Vec<i64> {
    let mut ids: Vec<i64> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str()?.strip_suffix(".env")?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    ids.sort_unstable();
    ids
}

/// The daemon binary under test.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_connectord")
}

/// A running daemon process with its log captured.
pub struct Daemon {
    child: Child,
    log: Arc<Mutex<String>>,
    /// Woken at every line logged.
    logged: Arc<tokio::sync::Notify>,
    pub config_path: PathBuf,
}

impl Daemon {
    /// Starts `connectord run` with `config` and extra host environment, and
    /// waits until it logs that it is ready. Logs are JSON lines.
    pub async fn start(db: &TestDb, dir: &Path, config: &Config, env: &[(&str, &str)]) -> Daemon {
        Daemon::start_with_format(db, dir, config, env, "json").await
    }

    /// As `start`, with the given `--log-format`.
    pub async fn start_with_format(
        db: &TestDb,
        dir: &Path,
        config: &Config,
        env: &[(&str, &str)],
        log_format: &str,
    ) -> Daemon {
        static N: AtomicU32 = AtomicU32::new(0);
        let config_path = dir.join(format!("daemon-{}.toml", N.fetch_add(1, Ordering::SeqCst)));
        config.write(&config_path);
        let mut command = Command::new(binary());
        // The daemon's environment is exactly what the test says it is: a
        // credential variable set where the tests run must not leak in.
        command.env_clear();
        for name in ["PATH", "HOME", "LANG", "TMPDIR"] {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        command
            .arg("--config")
            .arg(&config_path)
            .arg("--log-format")
            .arg(log_format)
            .arg("run")
            .env("DATABASE_URL", &db.url)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("spawn connectord");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let logged = Arc::new(tokio::sync::Notify::new());
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        {
            let log = log.clone();
            let logged = logged.clone();
            std::thread::spawn(move || {
                let mut ready = Some(ready_tx);
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if line.contains("connectord ready") {
                        if let Some(tx) = ready.take() {
                            let _ = tx.send(());
                        }
                    }
                    if std::env::var_os("CONNECTORD_TEST_ECHO").is_some() {
                        eprintln!("{line}");
                    }
                    let mut log = log.lock().expect("log lock");
                    log.push_str(&line);
                    log.push('\n');
                    drop(log);
                    logged.notify_waiters();
                }
            });
        }
        let daemon = Daemon {
            child,
            log,
            logged,
            config_path,
        };
        if !matches!(tokio::time::timeout(PATIENCE, ready_rx).await, Ok(Ok(()))) {
            panic!("daemon did not become ready; log:\n{}", daemon.logs());
        }
        daemon
    }

    pub fn logs(&self) -> String {
        self.log.lock().expect("log lock").clone()
    }

    /// Waits until the daemon has logged a line containing `text`.
    pub async fn wait_for_log(&self, text: &str) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            // Registered before the check, so a line logged in between
            // still wakes it.
            let next_line = self.logged.notified();
            if self.logs().contains(text) {
                return;
            }
            if tokio::time::timeout_at(deadline, next_line).await.is_err() {
                panic!("the daemon never logged {text:?}; log:\n{}", self.logs());
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The address `/metrics` is served on, as the daemon logged it.
    pub async fn metrics_address(&self) -> String {
        self.wait_for_log("serving Prometheus metrics").await;
        let logs = self.logs();
        let line = logs
            .lines()
            .find(|l| l.contains("serving Prometheus metrics"))
            .expect("the line");
        let start = line.find("127.0.0.1:").expect("a loopback address");
        line[start..]
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
            .collect()
    }

    /// Waits for the daemon to exit on its own, for at most [`PATIENCE`].
    pub async fn exited(&mut self) -> std::process::ExitStatus {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for connectord") {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the daemon is still running; log:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then waits for the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        self.child.wait().expect("wait for connectord")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the CLI to completion with `stdin` and returns (status, stdout, stderr).
pub fn cli(
    db: &TestDb,
    config: Option<&Path>,
    args: &[&str],
    stdin: &str,
) -> (i32, String, String) {
    use std::io::Write;
    let mut command = Command::new(binary());
    if let Some(config) = config {
        command.arg("--config").arg(config);
    }
    let mut child = command
        .args(args)
        .env_remove("CONNECTORD_CONFIG")
        .env("DATABASE_URL", &db.url)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn connectord");
    // A command may stop reading stdin early (a bounded read that refuses
    // the rest): that is its answer, not the test's failure.
    match child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(stdin.as_bytes())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => panic!("write stdin: {e}"),
        _ => {}
    }
    let output = child.wait_with_output().expect("wait for connectord");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Writes a new key `id` to `dir/keys` with the CLI.
pub fn generate_key(db: &TestDb, dir: &Path, id: &str) {
    let keys = dir.join("keys");
    let (code, out, err) = cli(
        db,
        None,
        &[
            "keys",
            "generate",
            "--id",
            id,
            "--dir",
            keys.to_str().expect("utf-8"),
        ],
        "",
    );
    assert_eq!(code, 0, "{out}{err}");
}

/// Runs the CLI with `config` and returns its stdout, asserting success.
pub fn run_ok(db: &TestDb, config: &Path, args: &[&str], stdin: &str) -> String {
    let (code, out, err) = cli(db, Some(config), args, stdin);
    assert_eq!(code, 0, "{args:?}: {out}{err}");
    out
}

/// Every process still carrying run `run_id` of the test recording into
/// `record_dir` in its environment: the connector, whatever it started,
/// and for a sandboxed run bubblewrap and the sandbox's init. Each is its
/// pid here with its pids in nested PID namespaces (`NSpid`), the last
/// being the pid it sees for itself.
pub fn run_processes(record_dir: &Path, run_id: i64) -> Vec<(i32, Vec<i32>)> {
    let run = format!("CONNECTORD_RUN_ID={run_id}");
    let record = format!("RECORD_DIR={}", record_dir.display());
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let has = |wanted: &str| environ.split(|b| *b == 0).any(|v| v == wanted.as_bytes());
        if !has(&run) || !has(&record) {
            continue;
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let nspids = status
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .map(|l| {
                l.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        found.push((pid, nspids));
    }
    found
}

/// The pid here of the process that calls itself `inner_pid` in run
/// `run_id` (the pid a sandboxed connector records is its namespace's).
pub fn host_pid(record_dir: &Path, run_id: i64, inner_pid: i32) -> Option<i32> {
    run_processes(record_dir, run_id)
        .into_iter()
        .find(|(_, nspids)| nspids.last() == Some(&inner_pid))
        .map(|(pid, _)| pid)
}

/// GET `path` from the HTTP server at `address`; the whole response.
pub async fn http_get(address: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .unwrap_or_else(|e| panic!("connect to {address}: {e}"));
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("response");
    response
}

/// GET /metrics from the daemon at `address`; the body.
pub async fn scrape_metrics(address: &str) -> String {
    let response = http_get(address, "/metrics").await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let (_, body) = response.split_once("\r\n\r\n").expect("a body");
    body.to_owned()
}

/// The value of the series line of `text` starting with `series` (its
/// name and labels).
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// The uid and gid of the `postgres` user, which servers the tests start
/// run as when the tests run as root (PostgreSQL and PgBouncer refuse
/// root); `None` when the tests do not run as root.
pub fn server_user() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions; getpwnam reads a NUL-terminated
    // name and returns a pointer into static storage, read at once.
    unsafe {
        if libc::geteuid() != 0 {
            return None;
        }
        let name = std::ffi::CString::new("postgres").expect("no NUL");
        let pw = libc::getpwnam(name.as_ptr());
        assert!(
            !pw.is_null(),
            "running as root, but there is no postgres user to run servers as"
        );
        Some(((*pw).pw_uid, (*pw).pw_gid))
    }
}
