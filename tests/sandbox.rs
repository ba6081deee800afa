//! SPEC §12: a connector child learns nothing it was not given. Real
//! sandboxed children (bubblewrap) against real PostgreSQL: a hostile
//! connector attacks a running neighbour, the daemon and its files; what a
//! child sees and may write; nothing outliving its run; and the sandbox
//! missing or disabled.

mod support;

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use support::{cli, recorded_env, run_processes, Config, Connector, Daemon, TestDb, PATIENCE};

const TOKEN: &str = "victim-token-8f2c91d4";

fn script(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/connectors")
        .join(name)
        .display()
        .to_string()
}

/// The scratch dir holds the keys (`keys/`), the daemon's config files and
/// one record directory per connector, each that connector's only writable
/// host path. It lives under the host's temporary directory, where the
/// sandbox puts a private `/tmp` of its own: declared paths there must
/// still show through it (the other tests' scratch dirs are under
/// `target/`).
struct Setup {
    db: TestDb,
    dir: HostTmp,
}

/// A scratch directory under the host's temporary directory.
struct HostTmp {
    path: PathBuf,
}

impl HostTmp {
    fn new() -> HostTmp {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "connectord-sandbox-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&path).expect("scratch dir");
        HostTmp { path }
    }
}

impl Drop for HostTmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

impl Setup {
    async fn new() -> Setup {
        let setup = Setup {
            db: TestDb::new().await,
            dir: HostTmp::new(),
        };
        for sub in ["victim", "attacker", "paths", "rw", "ro", "creds"] {
            std::fs::create_dir_all(setup.path(sub)).expect("record dir");
        }
        std::fs::write(setup.path("ro/readme"), "read me").expect("readme");
        std::fs::write(setup.path("creds/k1.key"), "not a key").expect("creds");
        let keys = setup.path("keys");
        let (code, out, err) = cli(
            &setup.db,
            None,
            &[
                "keys",
                "generate",
                "--id",
                "k1",
                "--dir",
                keys.to_str().expect("utf-8"),
            ],
            "",
        );
        assert_eq!(code, 0, "keys generate: {out}{err}");
        setup
    }

    fn path(&self, sub: &str) -> PathBuf {
        self.dir.path.join(sub)
    }

    /// The config: stand-in connectors, each writing to its own record
    /// directory under the scratch dir.
    fn config(&self) -> Config {
        let dir = &self.dir.path;
        let hostile = script("hostile.sh");
        let attacker = script("attacker.sh");
        let connector = |name: &str, program: &str, record: &str| {
            Connector::recording(name, program, &dir.join(record)).no_retry()
        };
        Config::new(dir, "sandbox")
            .connector(connector("victim", &hostile, "victim").static_secret("VICTIM_TOKEN"))
            .connector(connector("attacker", &attacker, "attacker"))
            // Reads the whole scratch dir, which holds the keys and the
            // daemon's config: those must stay hidden.
            .connector(connector("nosy", &attacker, "attacker").read_only(dir))
            .connector(connector("hasty", &hostile, "victim").timeout("1s"))
            .connector(
                connector("paths", &hostile, "paths")
                    .read_write(&dir.join("rw"))
                    .read_only(dir.join("ro")),
            )
    }

    async fn start(&self, config: &Config, env: &[(&str, &str)]) -> Daemon {
        Daemon::start(&self.db, &self.dir.path, config, env).await
    }

    /// A connection of `connector` whose stand-in behaves as `behaviour`.
    async fn connection(&self, id: &str, connector: &str, record: &str, behaviour: &str) {
        self.db
            .exec(&format!(
                "insert into connections (id, connector) values ('{id}', '{connector}')"
            ))
            .await;
        std::fs::write(self.path(record).join(format!("behaviour.{id}")), behaviour)
            .expect("behaviour");
    }

    /// Queues a manual run and returns its id once it has a row (and,
    /// when it runs, a pid).
    async fn trigger(&self, connection: &str) -> i64 {
        let before: i64 = self
            .db
            .scalar(&format!(
                "select coalesce(max(id), 0) from runs where connection_id = '{connection}'"
            ))
            .await;
        self.db
            .exec(&format!(
                "insert into run_commands (connection_id) values ('{connection}')"
            ))
            .await;
        let newer = format!("connection_id = '{connection}' and id > {before}");
        self.db
            .wait_until(&format!(
                "select count(*) = 1 from runs where {newer} and (status <> 'running' or pid is not null)"
            ))
            .await;
        self.db
            .scalar(&format!("select min(id) from runs where {newer}"))
            .await
    }

    async fn finished(&self, run_id: i64) -> (String, Option<String>, Option<String>) {
        self.db
            .wait_until(&format!(
                "select status <> 'running' from runs where id = {run_id}"
            ))
            .await;
        sqlx::query_as(&format!(
            "select status, failure_kind, failure_detail from runs where id = {run_id}"
        ))
        .fetch_one(&self.db.pool)
        .await
        .expect("run")
    }
}

/// Waits until the file a child writes last appears.
async fn wait_for_file(path: &Path) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !path.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for each process to end, through a pidfd (which becomes readable
/// when it does).
async fn wait_gone(pids: &[i32]) {
    for &pid in pids {
        // SAFETY: pidfd_open takes a pid and flags and returns a descriptor.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            continue; // already gone
        }
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // SAFETY: the descriptor is owned by the AsyncFd until it is dropped.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }
        .expect("register pidfd");
        tokio::time::timeout(PATIENCE, fd.readable())
            .await
            .unwrap_or_else(|_| panic!("process {pid} outlived its run"))
            .expect("pidfd")
            .retain_ready();
    }
}

/// The runs root the daemon logged at start.
fn runs_root(daemon: &Daemon) -> PathBuf {
    let logs = daemon.logs();
    let start = logs
        .find("\"runs\":\"")
        .expect("the daemon logs its runs root")
        + 8;
    let end = logs[start..].find('"').expect("end of the path") + start;
    PathBuf::from(&logs[start..end])
}

fn attacks(dir: &Path, run_id: i64) -> Vec<(String, String)> {
    std::fs::read_to_string(dir.join(format!("{run_id}.attacks")))
        .expect("the attacker's record")
        .lines()
        .map(|l| {
            let (attack, result) = l.split_once(' ').expect("attack result");
            (attack.to_owned(), result.to_owned())
        })
        .collect()
}

/// Starts the victim (its credential stored, holding until released) and
/// writes the attacker's targets. Returns the victim's run id.
async fn victim_and_targets(setup: &Setup, daemon: &Daemon, behaviour: &str) -> i64 {
    let config = setup.path("cli.toml");
    setup.config().write(&config);
    let (code, out, err) = cli(
        &setup.db,
        Some(&config),
        &["credentials", "set", "victim-1", "--kind", "static_secret"],
        &format!("{TOKEN}\n"),
    );
    assert_eq!(code, 0, "{out}{err}");
    std::fs::write(setup.path("victim/hold.victim-1"), "").expect("hold");
    let run_id = setup.trigger("victim-1").await;
    wait_for_file(&setup.path("victim").join(format!("{run_id}.env"))).await;
    let inner: i32 = recorded_env(&setup.path("victim"), run_id)["PID"]
        .parse()
        .expect("pid");
    let victim_pid =
        support::host_pid(&setup.path("victim"), run_id, inner).expect("the victim's process");
    let home = match behaviour {
        "home-hold" => {
            let home = runs_root(daemon).join(run_id.to_string()).join("home");
            wait_for_file(&home.join("secret")).await;
            home
        }
        _ => PathBuf::from("/nonexistent"),
    };
    let targets = [
        ("victim-pid", victim_pid.to_string()),
        ("daemon-pid", daemon.pid().to_string()),
        ("token-var", "VICTIM_TOKEN".to_owned()),
        ("token", TOKEN.to_owned()),
        ("keys", setup.path("keys").display().to_string()),
        ("config", daemon.config_path.display().to_string()),
        ("credentials", setup.path("creds").display().to_string()),
        ("victim-home", home.display().to_string()),
        (
            "runs",
            home.parent()
                .and_then(Path::parent)
                .unwrap_or(Path::new("/nonexistent"))
                .display()
                .to_string(),
        ),
        ("victim-record", setup.path("victim").display().to_string()),
    ];
    let text: String = targets.iter().map(|(k, v)| format!("{k} {v}\n")).collect();
    std::fs::write(setup.path("attacker/targets"), text).expect("targets");
    run_id
}

/// A hostile connector, run next to a victim connection's run, tries every
/// attack of the issue: the victim's and the daemon's environment, memory
/// and signals, any process's environment holding the victim's token, the
/// key files (read, list, write), the config file, the systemd credentials
/// directory, the victim's HOME and the runs' directories, the victim's
/// declared files; and it leaves a double-forked process behind. Every
/// attempt fails, nothing of it survives the run, and the victim still gets
/// its own credential and succeeds.
#[tokio::test(flavor = "multi_thread")]
async fn a_hostile_connector_learns_nothing_of_its_neighbour() {
    let setup = Setup::new().await;
    setup
        .connection("victim-1", "victim", "victim", "home-hold")
        .await;
    setup
        .connection("attacker-1", "attacker", "attacker", "")
        .await;
    setup.connection("nosy-1", "nosy", "attacker", "").await;
    let creds = setup.path("creds").display().to_string();
    let daemon = setup
        .start(
            &setup.config(),
            &[("CREDENTIALS_DIRECTORY", creds.as_str())],
        )
        .await;
    let victim = victim_and_targets(&setup, &daemon, "home-hold").await;

    let attacker = setup.trigger("attacker-1").await;
    let (status, kind, detail) = setup.finished(attacker).await;
    assert_eq!(
        status,
        "succeeded",
        "{kind:?} {detail:?}\n{}",
        daemon.logs()
    );
    let attempts = attacks(&setup.path("attacker"), attacker);
    assert_eq!(attempts.len(), 15, "{attempts:?}");
    let succeeded: Vec<_> = attempts.iter().filter(|(_, r)| r != "denied").collect();
    assert!(succeeded.is_empty(), "attacks that worked: {succeeded:?}");
    assert!(
        !setup.path("keys/k9.key").exists(),
        "a key was written into the key directory"
    );
    assert!(
        run_processes(&setup.path("attacker"), attacker).is_empty(),
        "a process of the attacker's run outlived it"
    );

    // A connector that may read the whole directory holding the keys and
    // the config still cannot read those.
    let nosy = setup.trigger("nosy-1").await;
    let (status, _, _) = setup.finished(nosy).await;
    assert_eq!(status, "succeeded");
    let attempts = attacks(&setup.path("attacker"), nosy);
    for (attack, expected) in [
        ("key-read", "denied"),
        ("key-write", "denied"),
        ("key-list", "denied"),
        ("config-read", "denied"),
        // What it was allowed to read, it reads.
        ("victim-record-read", "ok"),
    ] {
        assert!(
            attempts.contains(&(attack.to_owned(), expected.to_owned())),
            "{attack} should be {expected}: {attempts:?}"
        );
    }

    std::fs::remove_file(setup.path("victim/hold.victim-1")).expect("release");
    let (status, _, _) = setup.finished(victim).await;
    assert_eq!(status, "succeeded");
    let env = recorded_env(&setup.path("victim"), victim);
    assert_eq!(env.get("VICTIM_TOKEN").map(String::as_str), Some(TOKEN));
    assert!(
        !runs_root(&daemon).join(victim.to_string()).exists(),
        "the victim's private directory outlived its run"
    );
    assert!(
        !daemon.logs().contains(TOKEN),
        "the token reached the daemon's log"
    );
}

/// The same attacker with `[sandbox] enabled = false` gets the victim's
/// token and the keys: what the sandbox test above sees denied is real.
/// The daemon warns at start, and `check` reports the defect.
#[tokio::test(flavor = "multi_thread")]
async fn unsandboxed_the_same_attacks_work_with_a_warning_and_a_check_defect() {
    let setup = Setup::new().await;
    setup
        .connection("victim-1", "victim", "victim", "hold")
        .await;
    setup
        .connection("attacker-1", "attacker", "attacker", "")
        .await;
    let disabled = setup.config().set("sandbox", "enabled", false);
    let daemon = setup.start(&disabled, &[]).await;
    assert!(
        daemon.logs().contains("the sandbox is disabled"),
        "{}",
        daemon.logs()
    );
    let victim = victim_and_targets(&setup, &daemon, "hold").await;
    let attacker = setup.trigger("attacker-1").await;
    let (status, _, _) = setup.finished(attacker).await;
    assert_eq!(status, "succeeded");
    let attacks = attacks(&setup.path("attacker"), attacker);
    for attack in [
        "victim-environ",
        "victim-signal",
        "daemon-environ",
        "daemon-signal",
        "token-in-any-environ",
        "key-read",
        "config-read",
    ] {
        assert!(
            attacks.contains(&(attack.to_owned(), "ok".to_owned())),
            "{attack} should work unsandboxed: {attacks:?}"
        );
    }
    // As before: the child keeps the daemon's HOME.
    let env = recorded_env(&setup.path("victim"), victim);
    assert_eq!(env.get("HOME"), std::env::var("HOME").ok().as_ref());
    std::fs::remove_file(setup.path("victim/hold.victim-1")).expect("release");
    setup.finished(victim).await;

    let config = setup.path("disabled.toml");
    disabled.write(&config);
    let (code, out, _) = cli(&setup.db, Some(&config), &["check"], "");
    assert_eq!(code, 1, "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("DEFECT") && l.contains("sandbox is disabled")),
        "{out}"
    );
}

/// What a child sees: a private, empty HOME and TMPDIR (also on /tmp) and
/// /dev/shm; its connector's read_write_paths writable and read_only_paths
/// readable but not writable; nothing else of the host writable; a /proc
/// of its own processes. Its private files are gone after the run, and the
/// next run starts empty again.
#[tokio::test(flavor = "multi_thread")]
async fn a_child_sees_its_own_directories_and_its_declared_paths_only() {
    let setup = Setup::new().await;
    let (rw, ro) = (setup.path("rw"), setup.path("ro"));
    std::fs::write(setup.path("paths/rw-path"), rw.display().to_string()).expect("rw");
    std::fs::write(setup.path("paths/ro-path"), ro.display().to_string()).expect("ro");
    setup
        .connection("paths-1", "paths", "paths", "probe-paths")
        .await;
    let daemon = setup.start(&setup.config(), &[]).await;
    let root = runs_root(&daemon);
    for round in 0..2 {
        let run_id = setup.trigger("paths-1").await;
        let (status, kind, detail) = setup.finished(run_id).await;
        assert_eq!(status, "succeeded", "round {round}: {kind:?} {detail:?}");
        let seen = std::fs::read_to_string(setup.path("paths").join(format!("{run_id}.paths")))
            .expect("the child's record");
        let line = |key: &str| {
            seen.lines()
                .find_map(|l| l.strip_prefix(&format!("{key} ")))
                .unwrap_or_else(|| panic!("{key} missing in {seen}"))
                .to_owned()
        };
        assert_eq!(line("home"), "/run/connector/home");
        assert_eq!(line("tmpdir"), "/run/connector/tmp");
        assert_eq!(line("home-empty"), "0", "round {round}: HOME was not empty");
        assert_eq!(
            line("tmpdir-empty"),
            "0",
            "round {round}: TMPDIR was not empty"
        );
        assert_eq!(line("ro-readable"), "yes");
        let processes: usize = line("processes").parse().expect("count");
        assert!(
            processes <= 6,
            "the child sees {processes} processes:\n{seen}"
        );
        let writable: Vec<&str> = seen
            .lines()
            .filter_map(|l| l.strip_prefix("writable "))
            .collect();
        assert_eq!(
            writable,
            [
                "/run/connector/home",
                "/run/connector/tmp",
                "/tmp",
                "/dev/shm",
                rw.to_str().expect("utf-8"),
                // Inside the sandbox's own /tmp, where it made the mount
                // points of the declared paths: not the host's.
                &format!("{}/paths/../", setup.dir.path.display()),
            ],
            "{seen}"
        );
        assert!(
            rw.join(".written").exists(),
            "a write to the declared path did not reach the host"
        );
        for host in [&setup.dir.path, &ro] {
            assert!(
                !host.join(".written").exists(),
                "the child wrote into {}",
                host.display()
            );
        }
        assert!(
            !root.join(run_id.to_string()).exists(),
            "the run's private directory outlived it"
        );
    }
}

/// Nothing a child started outlives its run: a double-forked process in a
/// session of its own is gone when the run ends by timeout, by SIGTERM of
/// the daemon, and by `kill -9` of the daemon (normal exit: the attacker
/// test above).
#[tokio::test(flavor = "multi_thread")]
async fn no_process_outlives_its_run() {
    let setup = Setup::new().await;
    setup
        .connection("hasty-1", "hasty", "victim", "escape-hang")
        .await;
    setup
        .connection("victim-2", "victim", "victim", "escape-hang")
        .await;
    let config = setup.path("cli.toml");
    setup.config().write(&config);
    let (code, out, err) = cli(
        &setup.db,
        Some(&config),
        &["credentials", "set", "victim-2", "--kind", "static_secret"],
        &format!("{TOKEN}\n"),
    );
    assert_eq!(code, 0, "{out}{err}");
    let record = setup.path("victim");

    // Timeout.
    let daemon = setup.start(&setup.config(), &[]).await;
    let run_id = setup.trigger("hasty-1").await;
    let (status, kind, _) = setup.finished(run_id).await;
    assert_eq!(
        (status.as_str(), kind.as_deref()),
        ("failed", Some("timed_out"))
    );
    assert!(run_processes(&record, run_id).is_empty());

    // SIGTERM, then `kill -9`, of the daemon mid-run. The run SIGTERM
    // interrupts is re-queued, so the next daemon starts it again: that
    // run is the one `kill -9` interrupts.
    let mut interrupted = 0;
    let mut restarted = None;
    for signal in [libc::SIGTERM, libc::SIGKILL] {
        let (daemon, run_id) = if signal == libc::SIGTERM {
            (&daemon, setup.trigger("victim-2").await)
        } else {
            let daemon = restarted.insert(setup.start(&setup.config(), &[]).await);
            let again = format!("connection_id = 'victim-2' and id > {interrupted}");
            setup
                .db
                .wait_until(&format!(
                    "select count(*) = 1 from runs where {again} and pid is not null"
                ))
                .await;
            let run_id = setup
                .db
                .scalar(&format!("select id from runs where {again}"))
                .await;
            (&*daemon, run_id)
        };
        wait_for_file(&record.join(format!("{run_id}.env"))).await;
        // bubblewrap, the init, the connector and its leftover at least.
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let pids = loop {
            let found = run_processes(&record, run_id);
            if found.len() >= 4 || tokio::time::Instant::now() > deadline {
                break found;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(pids.len() >= 4, "{pids:?}");
        // SAFETY: kill(2) on the daemon this test started.
        unsafe {
            libc::kill(daemon.pid() as i32, signal);
        }
        let pids: Vec<i32> = pids.iter().map(|(pid, _)| *pid).collect();
        wait_gone(&pids).await;
        assert!(run_processes(&record, run_id).is_empty());
        if signal == libc::SIGTERM {
            let (status, kind, _) = setup.finished(run_id).await;
            assert_eq!(
                (status.as_str(), kind.as_deref()),
                ("failed", Some("interrupted"))
            );
            interrupted = run_id;
        }
    }
}

/// A connector killed by a signal inside the sandbox is `signaled`, not an
/// exit code; one whose interpreter the sandbox does not show fails to
/// spawn (`spawn_failed`, no pid), decided inside the sandbox; and a script
/// handed to an interpreter by absolute path is part of the program.
#[tokio::test(flavor = "multi_thread")]
async fn a_signal_and_a_failed_exec_inside_the_sandbox_are_typed() {
    let setup = Setup::new().await;
    setup
        .connection("victim-3", "hasty", "victim", "segfault")
        .await;
    let interpreter = setup.path("interp");
    std::fs::copy("/bin/sh", &interpreter).expect("copy sh");
    let program = setup.path("needs-interp");
    std::fs::write(&program, format!("#!{}\nexit 0\n", interpreter.display())).expect("script");
    std::fs::set_permissions(
        &program,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let script = setup.path("by-interpreter.sh");
    std::fs::write(&script, "exit 0\n").expect("script");
    let config = setup
        .config()
        .connector(Connector::new("hidden_interp", &program).no_retry())
        .connector(
            Connector::new("by_interpreter", "sh")
                .args(&[script.to_str().expect("UTF-8")])
                .no_retry(),
        );
    setup
        .db
        .exec("insert into connections (id, connector) values ('interp-1', 'hidden_interp'), ('script-1', 'by_interpreter')")
        .await;
    let _daemon = setup.start(&config, &[]).await;
    let run_id = setup.trigger("victim-3").await;
    let (status, kind, detail) = setup.finished(run_id).await;
    assert_eq!(
        (status.as_str(), kind.as_deref()),
        ("failed", Some("signaled")),
        "{detail:?}"
    );
    let run_id = setup.trigger("interp-1").await;
    let (status, kind, detail) = setup.finished(run_id).await;
    assert_eq!(
        (status.as_str(), kind.as_deref()),
        ("failed", Some("spawn_failed")),
        "{detail:?}"
    );
    let pid: Option<i32> = setup
        .db
        .scalar(&format!("select pid from runs where id = {run_id}"))
        .await;
    assert_eq!(pid, None);
    let run_id = setup.trigger("script-1").await;
    let (status, kind, detail) = setup.finished(run_id).await;
    assert_eq!(status, "succeeded", "{kind:?} {detail:?}");
}

/// A machine without the sandbox's tool (bubblewrap missing from PATH, or
/// a configured path that does not exist): the daemon says what is missing
/// at start and `check` reports it; a run is refused as
/// `sandbox_unavailable`, no child spawned, not retried.
#[tokio::test(flavor = "multi_thread")]
async fn without_bubblewrap_runs_are_refused_as_sandbox_unavailable() {
    let setup = Setup::new().await;
    setup.connection("victim-4", "hasty", "victim", "ok").await;
    let missing = setup.config().set("sandbox", "bwrap", "/nonexistent/bwrap");
    let no_bwrap_on_path = [("PATH", "/nonexistent/bin")];
    for (config, env, said) in [
        (&missing, &[][..], "/nonexistent/bwrap"),
        (
            &setup.config(),
            &no_bwrap_on_path[..],
            "was not found on PATH",
        ),
    ] {
        let daemon = setup.start(config, env).await;
        assert!(
            daemon
                .logs()
                .lines()
                .any(|l| l.contains("\"ERROR\"") && l.contains(said)),
            "{}",
            daemon.logs()
        );
        let run_id = setup.trigger("victim-4").await;
        let (status, kind, detail) = setup.finished(run_id).await;
        assert_eq!(
            (status.as_str(), kind.as_deref()),
            ("refused", Some("sandbox_unavailable"))
        );
        assert!(detail.unwrap_or_default().contains(said));
        let (pid, started): (Option<i32>, Option<chrono::DateTime<chrono::Utc>>) = sqlx::query_as(
            &format!("select pid, started_at from runs where id = {run_id}"),
        )
        .fetch_one(&setup.db.pool)
        .await
        .expect("run");
        assert_eq!((pid, started), (None, None));
        assert!(
            !setup.path("victim").join(format!("{run_id}.env")).exists(),
            "a child ran"
        );
        let pending: i64 = setup
            .db
            .scalar("select count(*) from run_commands where status <> 'done'")
            .await;
        assert_eq!(pending, 0, "a refusal is not retried");
        drop(daemon);
    }
    let config = setup.path("missing.toml");
    missing.write(&config);
    let (code, out, _) = cli(&setup.db, Some(&config), &["check"], "");
    assert_eq!(code, 1, "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("DEFECT") && l.contains("/nonexistent/bwrap")),
        "{out}"
    );
}
