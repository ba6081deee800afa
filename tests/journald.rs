//! `--log-format journald` (SPEC §15): a run's lines are native journal
//! entries carrying RUN_ID, CONNECTION, CONNECTOR, TRIGGER, ATTEMPT and
//! EVENT, so `journalctl RUN_ID=N` finds them and nothing else; without a
//! journal socket the daemon says so and logs JSON lines to stderr.
//!
//! The journal is a real systemd-journald, started beside the daemon in a
//! private mount namespace (`tests/support/private-journal.sh`), which
//! needs root; where that cannot be done the test says why and passes,
//! except in CI, which installs systemd and runs as root.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;
use support::{binary, generate_key, stand_in, Config, Connector, Daemon, Scratch, TestDb};

fn config(dir: &Path) -> Config {
    Config::new(dir, "journald")
        .connector(Connector::recording("plain", stand_in(), dir).no_retry())
}

/// Why a private journald cannot be run here, if it cannot.
fn private_journal_unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("a private journal needs root (mount namespaces and tmpfs)".into());
    }
    let journald = [
        "/usr/lib/systemd/systemd-journald",
        "/lib/systemd/systemd-journald",
    ];
    if !journald.iter().any(|p| Path::new(p).exists()) {
        return Some("systemd-journald is not installed (apt-get install systemd)".into());
    }
    for tool in ["unshare", "journalctl"] {
        let found = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!("{tool} is not on PATH"));
        }
    }
    None
}

/// The journal entries under `journal` that match `filters`
/// (`FIELD=value`), as JSON objects.
fn entries(journal: &Path, filters: &[String]) -> Vec<Value> {
    let output = Command::new("journalctl")
        .arg("--directory")
        .arg(journal)
        .args(["--output", "json", "--no-pager"])
        .args(filters)
        .output()
        .expect("run journalctl");
    assert!(
        output.status.success(),
        "journalctl {filters:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("journalctl prints one JSON object per line"))
        .collect()
}

fn field<'a>(entry: &'a Value, name: &str) -> &'a str {
    entry[name].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_runs_lines_are_found_by_run_id_in_the_journal() {
    if let Some(why) = private_journal_unavailable() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the journald test, but {why}"
        );
        eprintln!("journald test skipped: {why}");
        return;
    }
    let db = TestDb::new().await;
    let dir = Scratch::new();
    let d = &dir.path;
    generate_key(&db, d, "k1");
    let path = config(d).write(&d.join("connectord.toml"));
    db.exec(
        "insert into connections (id, connector) values ('conn-a', 'plain'), ('conn-b', 'plain')",
    )
    .await;
    // conn-a's connector prints output and a log message of its own.
    std::fs::write(d.join("behaviour.conn-a"), "chatty").expect("write behaviour");
    let journal: PathBuf = d.join("journal");
    std::fs::create_dir(&journal).expect("journal dir");
    let stderr_path = d.join("stderr");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/private-journal.sh");
    let mut daemon = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh"])
        .arg(&script)
        .arg(&journal)
        .arg(binary())
        .arg("--config")
        .arg(&path)
        .args(["--log-format", "journald", "run"])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("DATABASE_URL", &db.url)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).expect("stderr file"))
        .spawn()
        .expect("start the daemon beside a private journald");
    let stderr = || std::fs::read_to_string(&stderr_path).unwrap_or_default();

    db.exec("insert into run_commands (connection_id) values ('conn-a'), ('conn-b')")
        .await;
    db.wait_until("select count(*) = 2 from runs where status = 'succeeded'")
        .await;
    let run_a: i64 = db
        .scalar("select id from runs where connection_id = 'conn-a'")
        .await;
    // SAFETY: kill(2) on our own child's pid; the script passes it on.
    unsafe {
        libc::kill(daemon.id() as i32, libc::SIGTERM);
    }
    let status = daemon.wait().expect("wait for the daemon");
    assert!(status.success(), "{status}; stderr:\n{}", stderr());
    assert!(
        !stderr().contains("no journal"),
        "the daemon fell back to stderr:\n{}",
        stderr()
    );

    let lines = entries(&journal, &[format!("RUN_ID={run_a}")]);
    let messages: Vec<&str> = lines.iter().map(|e| field(e, "MESSAGE")).collect();
    assert!(lines.len() >= 4, "run {run_a}'s lines: {messages:#?}");
    for entry in &lines {
        for (name, want) in [
            ("RUN_ID", run_a.to_string().as_str()),
            ("CONNECTION", "conn-a"),
            ("CONNECTOR", "plain"),
            ("TRIGGER", "manual"),
            ("ATTEMPT", "1"),
            ("SYSLOG_IDENTIFIER", "connectord"),
        ] {
            assert_eq!(field(entry, name), want, "{name} of {entry}");
        }
    }
    let events: Vec<&str> = lines.iter().map(|e| field(e, "EVENT")).collect();
    for event in ["run.started", "run.finished"] {
        assert!(events.contains(&event), "{event} not in {events:?}");
    }
    // What the connector printed is the run's too.
    for printed in ["plain output line", "from the connector", "to stderr"] {
        assert!(
            lines.iter().any(|e| e.to_string().contains(printed)),
            "{printed:?} not in run {run_a}'s lines: {lines:#?}"
        );
    }
    // conn-b's run is its own: none of its lines answer RUN_ID=run_a.
    assert!(entries(&journal, &["CONNECTION=conn-b".into()])
        .iter()
        .all(|e| field(e, "RUN_ID") != run_a.to_string()));
    assert!(!entries(&journal, &["CONNECTION=conn-b".into()]).is_empty());
    // The daemon's own lines are there too, without a run.
    let daemon_lines = entries(&journal, &["SYSLOG_IDENTIFIER=connectord".into()]);
    assert!(
        daemon_lines
            .iter()
            .any(|e| field(e, "MESSAGE").contains("connectord ready")
                && field(e, "RUN_ID").is_empty()),
        "no ready line"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_journal_the_daemon_says_so_and_logs_json() {
    if Path::new("/run/systemd/journal/socket").exists() {
        // This machine has a journal: the daemon rightly writes to it, and
        // the test above shows what it writes.
        eprintln!("fallback test skipped: this machine has a journal socket");
        return;
    }
    let db = TestDb::new().await;
    let dir = Scratch::new();
    let d = &dir.path;
    generate_key(&db, d, "k1");
    db.exec("insert into connections (id, connector) values ('conn-a', 'plain')")
        .await;
    let daemon = Daemon::start_with_format(&db, d, &config(d), &[], "journald").await;
    db.exec("insert into run_commands (connection_id) values ('conn-a')")
        .await;
    db.wait_until("select count(*) = 1 from runs where status = 'succeeded'")
        .await;
    daemon.wait_for_log("run.finished").await;
    let logs = daemon.logs();
    let warning: Value = logs
        .lines()
        .find(|l| l.contains("no journal to write to"))
        .map(|l| serde_json::from_str(l).expect("the warning is a JSON line"))
        .unwrap_or_else(|| panic!("no warning about the journal:\n{logs}"));
    assert_eq!(warning["level"], "WARN", "{warning}");
    let run: i64 = db
        .scalar("select id from runs where connection_id = 'conn-a'")
        .await;
    let started: Value = logs
        .lines()
        .find(|l| l.contains("run.started"))
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .unwrap_or_else(|| panic!("no run.started line:\n{logs}"));
    assert_eq!(started["span"]["run_id"], run, "{started}");
    assert_eq!(started["span"]["connection"], "conn-a", "{started}");
}
