//! PgBouncer between the daemon and PostgreSQL (SPEC §16). In session mode
//! a client keeps its server session, and the daemon works through it:
//! runs, and schedule edits heard by NOTIFY. In transaction mode a client's
//! LISTEN, session settings and prepared statements stay behind on a server
//! session it no longer holds, so the daemon refuses to start, and `check`
//! reports it, with a sentence saying why.

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use support::{cli, run_ok, Config, Connector, Daemon, Scratch, TestDb};

/// A PgBouncer of the test's own, in front of the test database's server.
struct Bouncer {
    child: Child,
    dir: PathBuf,
    url: String,
    /// host:port, as the refusal names it.
    address: String,
}

impl Bouncer {
    /// Starts PgBouncer with `pool_mode` in front of `db`'s server and
    /// waits until it listens. `None` where PgBouncer is not installed
    /// (CI installs it).
    fn start(db: &TestDb, pool_mode: &str) -> Option<Bouncer> {
        let program = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
            .into_iter()
            .find(|p| Path::new(p).exists())?;
        let server: sqlx::postgres::PgConnectOptions = db.url.parse().expect("test URL");
        let (user, password) = credentials(&db.url);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        // PgBouncer will not run as root; as root it is told to become the
        // `postgres` user, which the test cluster runs as, so its files
        // (the password among them) belong to that user and no one else.
        let dir = std::env::temp_dir().join(format!(
            "connectord-bouncer-{}-{pool_mode}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        {
            use std::os::unix::fs::DirBuilderExt as _;
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&dir)
                .expect("bouncer dir");
        }
        let write = |name: &str, text: String| {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            let path = dir.join(name);
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .and_then(|mut file| file.write_all(text.as_bytes()))
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            path
        };
        let userlist = write("userlist.txt", format!("\"{user}\" \"{password}\"\n"));
        let ini = write(
            "pgbouncer.ini",
            format!(
                "[databases]\n* = host={host} port={server_port}\n\
                 [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
                 auth_type = trust\nauth_file = {userlist}\npool_mode = {pool_mode}\n\
                 max_client_conn = 200\ndefault_pool_size = 40\n\
                 ignore_startup_parameters = extra_float_digits,options\n",
                host = server.get_host(),
                server_port = server.get_port(),
                userlist = userlist.display(),
            ),
        );
        let mut command = Command::new(program);
        if let Some((uid, gid)) = support::server_user() {
            for file in [&dir, &userlist, &ini] {
                std::os::unix::fs::chown(file, Some(uid), Some(gid)).expect("chown");
            }
            command.args(["-u", "postgres"]);
        }
        let mut child = command
            .arg(&ini)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn pgbouncer");
        // It logs to stderr; it is ready once it says it listens.
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let mut seen = String::new();
        loop {
            match lines.next() {
                Some(Ok(line)) => {
                    let listening = line.contains("listening on 127.0.0.1");
                    seen.push_str(&line);
                    seen.push('\n');
                    if listening {
                        break;
                    }
                }
                _ => panic!("PgBouncer stopped before listening:\n{seen}"),
            }
        }
        // Keep draining its log, so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let address = format!("127.0.0.1:{port}");
        let url = format!(
            "postgres://{user}@{address}/{}",
            server.get_database().expect("test URL names its database")
        );
        Some(Bouncer {
            child,
            dir,
            url,
            address,
        })
    }

    /// The test database, as the daemon and the CLI reach it: through the
    /// bouncer. Assertions still read PostgreSQL directly.
    fn in_front_of(&self, db: &TestDb) -> TestDb {
        TestDb {
            url: self.url.clone(),
            pool: db.pool.clone(),
            name: db.name.clone(),
        }
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The user and password of a `postgres://user:password@…` URL.
fn credentials(url: &str) -> (String, String) {
    let rest = &url[url.find("://").expect("a URL") + 3..];
    let userinfo = &rest[..rest.rfind('@').expect("the URL names its user")];
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    (user.to_owned(), password.to_owned())
}

fn bouncer_or_skip(db: &TestDb, pool_mode: &str) -> Option<Bouncer> {
    let bouncer = Bouncer::start(db, pool_mode);
    if bouncer.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI installs PgBouncer for the pooler tests"
        );
        eprintln!("skipping the pooler test: PgBouncer is not installed");
    }
    bouncer
}

fn config(dir: &Path) -> Config {
    let record = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/connectors/record-env.sh");
    Config::new(dir, "pooled").connector(Connector::recording("plain", &record, dir).no_retry())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_works_through_a_session_mode_pooler() {
    let db = TestDb::new().await;
    let Some(bouncer) = bouncer_or_skip(&db, "session") else {
        return;
    };
    let pooled = bouncer.in_front_of(&db);
    let dir = Scratch::new();
    let config = config(&dir.path);
    let path = config.write(&dir.path.join("connectord.toml"));
    db.exec(
        "insert into connections (id, connector) values ('manual', 'plain'), ('ticking', 'plain')",
    )
    .await;
    let daemon = Daemon::start(&pooled, &dir.path, &config, &[]).await;

    let out = run_ok(&pooled, &path, &["trigger", "manual", "--wait"], "");
    assert!(out.contains("succeeded"), "{out}");
    // A schedule added after start reaches the engine only by NOTIFY (the
    // periodic re-read is minutes away), through the pooler.
    run_ok(
        &pooled,
        &path,
        &["schedules", "set", "ticking", "* * * * * *"],
        "",
    );
    db.wait_until(
        "select count(*) >= 1 from runs where connection_id = 'ticking' and status = 'succeeded'",
    )
    .await;
    assert!(daemon.stop().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_mode_pooler_is_refused_with_a_reason() {
    let db = TestDb::new().await;
    let Some(bouncer) = bouncer_or_skip(&db, "transaction") else {
        return;
    };
    let pooled = bouncer.in_front_of(&db);
    let dir = Scratch::new();
    let path = config(&dir.path).write(&dir.path.join("connectord.toml"));
    db.exec(
        "insert into connections (id, connector) values ('manual', 'plain');
             insert into run_commands (connection_id) values ('manual')",
    )
    .await;

    // Run to its end, or killed if it starts: it must refuse, not run.
    let daemon = Command::new(support::binary())
        .arg("--config")
        .arg(&path)
        .arg("run")
        .env("DATABASE_URL", &pooled.url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn connectord");
    let pid = daemon.id() as libc::pid_t;
    let waited = tokio::time::timeout(
        support::PATIENCE,
        tokio::task::spawn_blocking(move || daemon.wait_with_output()),
    )
    .await;
    let Ok(output) = waited else {
        unsafe { libc::kill(pid, libc::SIGKILL) };
        panic!("the daemon started behind a transaction pooler");
    };
    let output = output.expect("join").expect("wait for connectord");
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{err}");
    for words in [
        "does not keep a session per connection",
        "pool_mode = transaction",
        "session mode",
        bouncer.address.as_str(),
    ] {
        assert!(err.contains(words), "the refusal lacks {words:?}:\n{err}");
    }
    let started: i64 = db.scalar("select count(*) from runs").await;
    assert_eq!(started, 0, "nothing ran");

    let (code, out, _) = cli(&pooled, Some(&path), &["check"], "");
    assert_ne!(code, 0, "{out}");
    assert!(
        out.lines().any(
            |l| l.starts_with("DEFECT") && l.contains("does not keep a session per connection")
        ),
        "{out}"
    );
    // Straight to PostgreSQL, the same config is fine on that point.
    let (_, out, _) = cli(&db, Some(&path), &["check"], "");
    assert!(!out.contains("does not keep a session"), "{out}");
}
