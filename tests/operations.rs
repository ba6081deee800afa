//! What operators rely on: the systemd notify protocol and unit, log
//! formats that never carry a secret, key rotation end to end, retention,
//! `check`, and the listing commands.

#![allow(clippy::type_complexity)]

mod support;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use support::{
    cli, generate_key, recorded_env, run_ok, stand_in, Config, Connector, Daemon, Scratch, TestDb,
};

/// A registry with a token connector and a browser connector, keys in the
/// scratch dir under `primary`.
fn config(dir: &Path, primary: &str) -> Config {
    Config::new(dir, "ops")
        .set("keys", "primary", primary)
        .daemon("lease", "3s")
        .connector(github(dir, &stand_in()))
        .connector(
            Connector::recording("chase", stand_in(), dir)
                .username_password("CHASE_USERNAME", "CHASE_PASSWORD"),
        )
}

/// The token connector, running `command`.
fn github(dir: &Path, command: &str) -> Connector {
    Connector::recording("github", command, dir).static_secret("GITHUB_TOKEN")
}

/// The daemon speaks systemd's notify protocol: READY=1 after loading,
/// STATUS= lines, WATCHDOG=1 pings, STOPPING=1 on SIGTERM.
#[tokio::test(flavor = "multi_thread")]
async fn notify_protocol() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    let socket_path = dir.path.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind notify socket");
    socket
        .set_read_timeout(Some(support::PATIENCE))
        .expect("timeout");
    let daemon = Daemon::start(
        &db,
        &dir.path,
        &config(&dir.path, "k1"),
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().expect("utf-8")),
            ("WATCHDOG_USEC", "1000000"),
        ],
    )
    .await;
    let mut seen = Vec::new();
    let mut buf = [0u8; 512];
    while !(seen.iter().any(|m: &String| m == "READY=1")
        && seen
            .iter()
            .any(|m| m.starts_with("STATUS=running 0, queued"))
        && seen.iter().filter(|m| *m == "WATCHDOG=1").count() >= 2)
    {
        let n = socket.recv(&mut buf).expect("a notification");
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert_eq!(seen[0], "READY=1", "READY comes first: {seen:?}");
    // SAFETY: kill(2) on the daemon we started.
    unsafe {
        libc::kill(daemon.pid() as i32, libc::SIGTERM);
    }
    loop {
        let n = socket.recv(&mut buf).expect("a notification");
        if &buf[..n] == b"STOPPING=1" {
            break;
        }
    }
    assert!(daemon.stop().success());
}

/// The shipped unit passes `systemd-analyze verify` (pointed at this
/// build's binary) and carries the settings the daemon's shutdown relies on.
#[test]
fn the_systemd_unit_verifies() {
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/connectord.service"),
    )
    .expect("read unit");
    for needed in [
        "Type=notify",
        "WatchdogSec=",
        "KillMode=mixed",
        "TimeoutStopSec=60s",
        "LoadCredential=",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "StateDirectory=",
        "RuntimeDirectory=",
        "PrivateTmp=yes",
        "ProtectHome=yes",
        "RestrictAddressFamilies=",
        "LimitCORE=0",
        "SystemCallArchitectures=native",
        "CapabilityBoundingSet=\n",
        "PrivateMounts=yes",
        "RemoveIPC=yes",
        "TasksMax=",
        "MemoryMax=",
    ] {
        assert!(unit.contains(needed), "the unit lacks {needed}");
    }
    // Settings under which no sandbox could be set up (every run would be
    // refused as sandbox_unavailable).
    for line in unit.lines().filter(|l| !l.starts_with('#')) {
        for breaking in [
            "ProtectKernelTunables=",
            "ProtectProc=",
            "ProcSubset=",
            "RestrictNamespaces=",
            "PrivateUsers=",
        ] {
            assert!(!line.starts_with(breaking), "the unit sets {line}");
        }
    }
    // A system call filter must let bubblewrap mount the sandbox's view,
    // and Chromium install its own filter.
    let filters: Vec<&str> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("SystemCallFilter="))
        .collect();
    assert_eq!(filters.len(), 1, "{filters:?}");
    let groups: Vec<&str> = filters[0].split_whitespace().collect();
    for needed in ["@system-service", "@mount", "seccomp"] {
        assert!(groups.contains(&needed), "SystemCallFilter lacks {needed}");
    }
    let analyze = Path::new("/usr/bin/systemd-analyze");
    if !analyze.exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI installs systemd; systemd-analyze is missing"
        );
        eprintln!("systemd-analyze is not installed; skipping `verify`");
        return;
    }
    let dir = Scratch::new();
    let path = dir.path.join("connectord.service");
    std::fs::write(
        &path,
        unit.replace("/usr/bin/connectord", support::binary()),
    )
    .expect("write unit");
    let output = std::process::Command::new(analyze)
        .arg("verify")
        .arg(&path)
        .output()
        .expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        !stderr.contains("connectord.service:"),
        "warnings about the unit: {stderr}"
    );
}

/// Every log format carries the run lifecycle events, and none carries a
/// secret.
#[tokio::test(flavor = "multi_thread")]
async fn no_log_format_carries_a_secret() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    generate_key(&db, &dir.path, "k1");
    let config = config(&dir.path, "k1");
    let config_path = config.write(&dir.path.join("c.toml"));
    db.exec("insert into connections (id, connector) values ('alice-chase', 'chase'), ('bob-github', 'github'), ('carol-github', 'github')")
        .await;
    run_ok(
        &db,
        &config_path,
        &[
            "credentials",
            "set",
            "alice-chase",
            "--kind",
            "username_password",
            "--username",
            "alice.user-7731",
        ],
        "hunter2-chase-pw\n",
    );
    run_ok(
        &db,
        &config_path,
        &[
            "credentials",
            "set",
            "bob-github",
            "--kind",
            "static_secret",
        ],
        "ghp_tokenBOB4242\n",
    );
    let secrets = ["alice.user-7731", "hunter2-chase-pw", "ghp_tokenBOB4242"];
    for (i, format) in ["json", "compact", "pretty"].into_iter().enumerate() {
        let daemon =
            Daemon::start_with_format(&db, &dir.path, &config, &[("GITHUB_TOKEN", "")], format)
                .await;
        db.exec("insert into run_commands (connection_id) values ('alice-chase'), ('bob-github'), ('carol-github')")
            .await;
        db.wait_until(&format!(
            "select count(*) = {} from runs where status <> 'running'",
            3 * (i + 1)
        ))
        .await;
        let logs = daemon.logs();
        assert!(daemon.stop().success());
        for secret in secrets {
            assert!(
                !logs.contains(secret),
                "{format} log leaks a secret:\n{logs}"
            );
        }
        for event in ["run.started", "run.finished", "run.refused"] {
            assert!(logs.contains(event), "{format} log lacks {event}:\n{logs}");
        }
        if format == "json" {
            let started = logs
                .lines()
                .find(|l| l.contains("run.started"))
                .expect("a run.started line");
            let line: serde_json::Value =
                serde_json::from_str(started).expect("one JSON object per line");
            let span = &line["span"];
            for field in ["run_id", "connection", "connector", "trigger", "attempt"] {
                assert!(
                    !span[field].is_null(),
                    "run.started lacks {field}: {started}"
                );
            }
        }
    }
}

/// Key rotation end to end: generate k2, make it primary, rotate, remove
/// k1, and runs still get their credential.
#[tokio::test(flavor = "multi_thread")]
async fn key_rotation_end_to_end() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    generate_key(&db, &dir.path, "k1");
    let k1 = config(&dir.path, "k1").write(&dir.path.join("k1.toml"));
    db.exec("insert into connections (id, connector) values ('alice-chase', 'chase'), ('bob-github', 'github')")
        .await;
    run_ok(
        &db,
        &k1,
        &[
            "credentials",
            "set",
            "alice-chase",
            "--kind",
            "username_password",
            "--username",
            "alice",
        ],
        "pw-alice\n",
    );
    run_ok(
        &db,
        &k1,
        &[
            "credentials",
            "set",
            "bob-github",
            "--kind",
            "static_secret",
        ],
        "tok-bob\n",
    );

    generate_key(&db, &dir.path, "k2");
    let k2_config = config(&dir.path, "k2");
    let k2 = k2_config.write(&dir.path.join("k2.toml"));
    let out = run_ok(&db, &k2, &["credentials", "rotate"], "");
    assert!(out.contains("re-encrypted 2"), "{out}");
    let keys: Vec<String> = sqlx::query_scalar("select distinct key_id from credentials")
        .fetch_all(&db.pool)
        .await
        .expect("key ids");
    assert_eq!(keys, ["k2"]);
    std::fs::remove_file(dir.path.join("keys/k1.key")).expect("retire k1");
    let out = run_ok(&db, &k2, &["check"], "");
    assert!(out.contains("0 defect(s)"), "{out}");

    let _daemon = Daemon::start(&db, &dir.path, &k2_config, &[]).await;
    db.exec("insert into run_commands (connection_id) values ('alice-chase'), ('bob-github')")
        .await;
    db.wait_until("select count(*) = 2 from runs where status = 'succeeded'")
        .await;
    let runs: Vec<(i64, String)> =
        sqlx::query_as("select id, connection_id from runs order by connection_id")
            .fetch_all(&db.pool)
            .await
            .expect("runs");
    let chase = recorded_env(&dir.path, runs[0].0);
    assert_eq!(
        (
            chase["CHASE_USERNAME"].as_str(),
            chase["CHASE_PASSWORD"].as_str()
        ),
        ("alice", "pw-alice")
    );
    assert_eq!(
        recorded_env(&dir.path, runs[1].0)["GITHUB_TOKEN"],
        "tok-bob"
    );
}

/// Old history is pruned in the background; the last success and the last
/// failure of every connection, and open interactions, are kept.
#[tokio::test(flavor = "multi_thread")]
async fn retention_keeps_what_matters() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    db.exec(
        "insert into connections (id, connector) values ('old', 'github');
         insert into runs (connection_id, trigger, status, failure_kind, created_at, finished_at)
         select 'old', 'scheduled', s, case when s = 'failed' then 'exit_nonzero' end,
                now() - (n || ' days')::interval, now() - (n || ' days')::interval
         from (values (40, 'succeeded'), (39, 'failed'), (38, 'succeeded'), (37, 'failed'), (36, 'refused')) v(n, s);
         insert into runs (connection_id, trigger, status, created_at, finished_at)
         values ('old', 'manual', 'succeeded', now() - interval '1 hour', now() - interval '1 hour');
         insert into run_commands (connection_id, status, created_at, not_before)
         values ('old', 'done', now() - interval '40 days', now() - interval '40 days'),
                ('old', 'pending', now() - interval '40 days', now() + interval '1 day');
         insert into interactions (connection_id, kind, status, created_at, resolved_at)
         values ('old', 'credentials_required', 'resolved', now() - interval '40 days', now() - interval '40 days'),
                ('old', 'credentials_required', 'open', now() - interval '40 days', null);",
    )
    .await;
    let _daemon = Daemon::start(
        &db,
        &dir.path,
        &config(&dir.path, "k1")
            .set("retention", "runs", "7d")
            .set("retention", "commands", "7d")
            .set("retention", "interactions", "7d")
            .set("retention", "batch", 1),
        &[],
    )
    .await;
    db.wait_until("select count(*) = 0 from interactions where status = 'resolved'")
        .await;
    db.wait_until("select count(*) = 2 from runs").await;
    let kept: Vec<(String, i32)> = sqlx::query_as(
        "select status, extract(day from now() - created_at)::int from runs order by created_at",
    )
    .fetch_all(&db.pool)
    .await
    .expect("runs");
    // The newest of each class stays: the refused run (36 days) for
    // failures, the recent run for successes.
    assert_eq!(
        kept,
        [("refused".to_owned(), 36), ("succeeded".to_owned(), 0)]
    );
    let commands: Vec<String> = sqlx::query_scalar("select status from run_commands")
        .fetch_all(&db.pool)
        .await
        .expect("commands");
    assert_eq!(commands, ["pending"]);
    let open: i64 = db
        .scalar("select count(*) from interactions where status = 'open'")
        .await;
    assert_eq!(open, 1);
}

/// Runs `check --json` with `config`, which must fail (exit 1), and
/// returns the messages of its defects (one JSON object per line).
fn check_defects(db: &TestDb, config: &Path) -> Vec<String> {
    let (code, out, _) = cli(db, Some(config), &["check", "--json"], "");
    assert_eq!(code, 1, "{out}");
    out.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("one JSON object per line"))
        .filter(|f| f["ok"] == false)
        .map(|f| f["message"].as_str().expect("message").to_owned())
        .collect()
}

/// `check` passes a sound set-up and reports each defect with a non-zero
/// exit: a missing program, a bad schedule row, a credential under a key
/// that is gone; `--json` gives one object per finding.
#[tokio::test(flavor = "multi_thread")]
async fn check_reports_defects() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    generate_key(&db, &dir.path, "k1");
    let good = config(&dir.path, "k1").write(&dir.path.join("good.toml"));
    db.exec("insert into connections (id, connector) values ('bob-github', 'github');
             insert into schedules (connection_id, cron, timezone) values ('bob-github', '0 9 * * 1-5', 'Europe/Berlin');")
        .await;
    run_ok(
        &db,
        &good,
        &[
            "credentials",
            "set",
            "bob-github",
            "--kind",
            "static_secret",
        ],
        "tok\n",
    );
    let out = run_ok(&db, &good, &["check"], "");
    assert!(out.contains("0 defect(s)"), "{out}");
    assert!(
        out.contains("0 9 * * 1-5") && out.matches("T0").count() >= 3,
        "next three fire times: {out}"
    );

    db.exec(
        "insert into schedules (connection_id, cron) values ('bob-github', '61 * * * *');
             update credentials set key_id = 'k7';",
    )
    .await;
    let broken = config(&dir.path, "k1")
        .connector(github(&dir.path, "/nonexistent/github"))
        .write(&dir.path.join("broken.toml"));
    let defects = check_defects(&db, &broken);
    assert!(
        defects.iter().any(|d| d.contains("/nonexistent/github")),
        "{defects:?}"
    );
    assert!(
        defects.iter().any(|d| d.contains("61 * * * *")),
        "{defects:?}"
    );
    assert!(defects.iter().any(|d| d.contains("\"k7\"")), "{defects:?}");
}

/// `check` looks a connector's program up the way its spawn does: through
/// the PATH the child gets, not the one `check` itself runs with.
#[tokio::test(flavor = "multi_thread")]
async fn check_finds_programs_on_the_childs_path() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    generate_key(&db, &dir.path, "k1");
    let script = PathBuf::from(stand_in());
    let (script_dir, script_name) = (
        script.parent().expect("dir").display().to_string(),
        script
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned(),
    );
    // Found only through its own PATH; and `sh`, on every daemon's PATH,
    // under a child PATH that lacks it.
    let path = config(&dir.path, "k1")
        .connector(Connector::new("own_path", &script_name).env("PATH", script_dir.as_str()))
        .connector(Connector::new("no_sh", "sh").env("PATH", "/nonexistent"))
        .write(&dir.path.join("c.toml"));
    let defects = check_defects(&db, &path);
    assert!(
        defects.iter().any(|d| d.contains("connector no_sh")),
        "{defects:?}"
    );
    assert!(
        !defects.iter().any(|d| d.contains("connector own_path")),
        "{defects:?}"
    );
}

/// The listing and steering commands an operator uses day to day.
#[tokio::test(flavor = "multi_thread")]
async fn operator_commands() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    generate_key(&db, &dir.path, "k1");
    let config = config(&dir.path, "k1");
    let path = config.write(&dir.path.join("c.toml"));
    run_ok(
        &db,
        &path,
        &[
            "connections",
            "add",
            "alice-chase",
            "--connector",
            "chase",
            "--owner",
            "alice",
        ],
        "",
    );
    let (code, _, err) = cli(
        &db,
        Some(&path),
        &["connections", "add", "alice-chase", "--connector", "chase"],
        "",
    );
    assert_eq!(code, 1, "a duplicate is refused: {err}");
    let out = run_ok(&db, &path, &["connections", "list"], "");
    assert!(
        out.contains("alice-chase") && out.contains("chase") && out.contains("alice"),
        "{out}"
    );

    let (code, _, err) = cli(
        &db,
        Some(&path),
        &["schedules", "set", "alice-chase", "every day"],
        "",
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("every day"), "{err}");
    run_ok(
        &db,
        &path,
        &[
            "schedules",
            "set",
            "alice-chase",
            "30 2 * * *",
            "--tz",
            "Europe/Berlin",
            "--overlap",
            "queue",
        ],
        "",
    );
    run_ok(
        &db,
        &path,
        &[
            "schedules",
            "set",
            "alice-chase",
            "0 3 * * *",
            "--tz",
            "Europe/Berlin",
        ],
        "",
    );
    let count: i64 = db.scalar("select count(*) from schedules").await;
    assert_eq!(count, 1, "set replaces the connection's schedule");
    let out = run_ok(&db, &path, &["schedules", "list", "--json"], "");
    let row: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(row["cron"], "0 3 * * *");
    assert!(
        row["next_fire_at"]
            .as_str()
            .is_some_and(|t| t.contains("T01:00:00") || t.contains("T02:00:00")),
        "{row}"
    );
    run_ok(&db, &path, &["schedules", "pause", "alice-chase"], "");
    let enabled: bool = db.scalar("select enabled from schedules").await;
    assert!(!enabled);
    run_ok(&db, &path, &["schedules", "resume", "alice-chase"], "");
    let enabled: bool = db.scalar("select enabled from schedules").await;
    assert!(enabled);

    // With no daemon running, a bounded wait gives up and leaves the
    // command queued.
    let (code, _, err) = cli(
        &db,
        Some(&path),
        &["trigger", "alice-chase", "--wait", "--timeout", "300ms"],
        "",
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("within the timeout"), "{err}");
    let pending: i64 = db
        .scalar("select count(*) from run_commands where status = 'pending'")
        .await;
    assert_eq!(pending, 1);

    // A refused run (no credential) and its interaction, seen through the CLI.
    let _daemon = Daemon::start(&db, &dir.path, &config, &[]).await;
    let (code, out, _) = cli(&db, Some(&path), &["trigger", "alice-chase", "--wait"], "");
    assert_eq!(code, 4, "{out}");
    let out = run_ok(
        &db,
        &path,
        &[
            "runs",
            "--connection",
            "alice-chase",
            "--status",
            "refused",
            "--since",
            "1h",
            "--json",
        ],
        "",
    );
    let run: serde_json::Value =
        serde_json::from_str(out.lines().next().expect("a run")).expect("json");
    assert_eq!(run["failure_kind"], "credential_missing");
    // A status no run can have is bad usage, not an empty list.
    let (code, _, err) = cli(&db, Some(&path), &["runs", "--status", "refusd"], "");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("\"refusd\" is not a RunStatus"), "{err}");
    let out = run_ok(&db, &path, &["runs", "--since", "2000-01-01T00:00:00Z"], "");
    assert!(out.contains("credential_missing"), "{out}");
    let out = run_ok(&db, &path, &["interactions", "--open"], "");
    assert!(out.contains("credentials_required"), "{out}");
    run_ok(
        &db,
        &path,
        &[
            "credentials",
            "set",
            "alice-chase",
            "--kind",
            "username_password",
            "--username",
            "alice",
        ],
        "pw\n",
    );
    let out = run_ok(&db, &path, &["interactions", "--open"], "");
    assert!(
        !out.contains("credentials_required"),
        "setting a credential resolves it: {out}"
    );
    let (code, out, _) = cli(&db, Some(&path), &["trigger", "alice-chase", "--wait"], "");
    assert_eq!(code, 0, "{out}");
}

/// A secret no child's environment could carry is refused by
/// `credentials set` (NUL byte, over 64 KiB, a huge stdin read only up to
/// the bound), nothing is stored, and the connection keeps its credential;
/// 64 KiB exactly is stored.
#[tokio::test(flavor = "multi_thread")]
async fn credentials_set_refuses_secrets_no_child_could_receive() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    generate_key(&db, &dir.path, "k1");
    let config = config(&dir.path, "k1").write(&dir.path.join("c.toml"));
    db.exec("insert into connections (id, connector) values ('bob-github', 'github')")
        .await;
    let set = |secret: &str| {
        cli(
            &db,
            Some(&config),
            &[
                "credentials",
                "set",
                "bob-github",
                "--kind",
                "static_secret",
            ],
            secret,
        )
    };
    let (code, out, err) = set("good-token\n");
    assert_eq!(code, 0, "{out}{err}");
    let max = "x".repeat(64 * 1024);
    let huge = "y".repeat(8 << 20);
    for (secret, said) in [
        ("tok\0en\n", "NUL byte"),
        (&*format!("{max}z"), "longer than 64 KiB"),
        (&*huge, "longer than 64 KiB"),
    ] {
        let (code, out, err) = set(secret);
        assert_eq!(code, 1, "{out}{err}");
        assert!(
            err.contains(said) && err.contains("nothing was stored"),
            "{err}"
        );
    }
    let rows: i64 = db.scalar("select count(*) from credentials").await;
    assert_eq!(rows, 1, "a refused secret was stored");
    let (code, out, err) = set(&format!("{max}\n"));
    assert_eq!(code, 0, "64 KiB is allowed: {out}{err}");
    let active: i64 = db
        .scalar("select count(*) from credentials where status = 'active'")
        .await;
    assert_eq!(active, 1);
}

/// `credentials delete` destroys the ciphertext (the row stays, for audit),
/// and `credentials rotate` leaves deleted rows alone.
#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_credential_is_destroyed_and_not_rotated() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    generate_key(&db, &dir.path, "k1");
    let k1 = config(&dir.path, "k1").write(&dir.path.join("k1.toml"));
    db.exec("insert into connections (id, connector) values ('bob-github', 'github'), ('eve-github', 'github')")
        .await;
    for connection in ["bob-github", "eve-github"] {
        run_ok(
            &db,
            &k1,
            &["credentials", "set", connection, "--kind", "static_secret"],
            "token\n",
        );
    }
    run_ok(&db, &k1, &["credentials", "delete", "bob-github"], "");
    let (status, nonce, ciphertext): (String, i32, i32) = sqlx::query_as(
        "select status, octet_length(nonce), octet_length(ciphertext) from credentials
         where connection_id = 'bob-github'",
    )
    .fetch_one(&db.pool)
    .await
    .expect("row");
    assert_eq!((status.as_str(), nonce, ciphertext), ("deleted", 0, 0));

    generate_key(&db, &dir.path, "k2");
    let k2 = config(&dir.path, "k2").write(&dir.path.join("k2.toml"));
    run_ok(&db, &k2, &["credentials", "rotate"], "");
    let keys: Vec<(String, String)> =
        sqlx::query_as("select connection_id, key_id from credentials order by connection_id")
            .fetch_all(&db.pool)
            .await
            .expect("rows");
    assert_eq!(
        keys,
        [
            ("bob-github".to_owned(), "k1".to_owned()),
            ("eve-github".to_owned(), "k2".to_owned())
        ]
    );
}
