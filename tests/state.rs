//! Connector state (SPEC §13): what a run writes to `CONNECTORD_STATE_FILE`
//! is what the connection's next run finds there, on every trigger and
//! from any daemon; it is kept encrypted, bound to its connection, and
//! discarded whenever the connection's credential changes.

#![allow(clippy::type_complexity)]

mod support;

use std::path::{Path, PathBuf};

use support::{
    cli, generate_key, recorded_env, run_ok, Config, Connector, Daemon, Scratch, TestDb,
};

const USERNAME: &str = "alice.chase";
const PASSWORD: &str = "correct-horse-42";

fn state_connector() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/connectors/state.sh")
}

/// A browser connector (username and password) and a connector that
/// takes no credential, both the state stand-in.
fn config(dir: &Path, instance: &str) -> Config {
    Config::new(dir, instance)
        .connector(
            Connector::recording("chase", state_connector(), dir)
                .retry(2, "1s", "1s")
                .username_password("CHASE_USERNAME", "CHASE_PASSWORD"),
        )
        .connector(Connector::recording("weather", state_connector(), dir).no_retry())
}

/// Keys, the config written to the scratch dir, and connection `id` of
/// `connector` (with a stored username and password for chase).
async fn setup(db: &TestDb, dir: &Path, config: &Config, connections: &[(&str, &str)]) -> PathBuf {
    generate_key(db, dir, "k1");
    let path = config.write(&dir.join("connectord.toml"));
    for (id, connector) in connections {
        run_ok(
            db,
            &path,
            &["connections", "add", id, "--connector", connector],
            "",
        );
        if *connector == "chase" {
            set_password(db, &path, id);
        }
    }
    path
}

fn set_password(db: &TestDb, config: &Path, connection: &str) {
    run_ok(
        db,
        config,
        &[
            "credentials",
            "set",
            connection,
            "--kind",
            "username_password",
            "--username",
            USERNAME,
        ],
        &format!("{PASSWORD}\n"),
    );
}

/// Queues a manual run of `connection`, waits for it to end and returns
/// its id.
async fn manual_run(db: &TestDb, connection: &str) -> i64 {
    let command: i64 = db
        .scalar(&format!(
            "insert into run_commands (connection_id) values ('{connection}') returning id"
        ))
        .await;
    db.wait_until(&format!(
        "select exists (select 1 from runs where command_id = {command} and status <> 'running')"
    ))
    .await;
    db.scalar(&format!("select id from runs where command_id = {command}"))
        .await
}

/// The state run `run_id` was given ("ABSENT" when it had none).
fn got(dir: &Path, run_id: i64) -> String {
    let path = dir.join(format!("{run_id}.got"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// What `state.sh` writes by default.
fn written_by(connection: &str, run_id: i64) -> String {
    format!("{connection}-run{run_id}")
}

fn state_json(db: &TestDb, config: &Path, connection: &str) -> serde_json::Value {
    let out = run_ok(db, config, &["state", "show", connection, "--json"], "");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{out}: {e}"))
}

async fn status_of(db: &TestDb, run_id: i64) -> (String, Option<String>, Option<String>) {
    sqlx::query_as("select status, failure_kind, failure_detail from runs where id = $1")
        .bind(run_id)
        .fetch_one(&db.pool)
        .await
        .expect("run row")
}

/// Manual, failed-then-retried and scheduled runs, on one daemon and then
/// another: each run finds exactly what the run before it wrote.
#[tokio::test(flavor = "multi_thread")]
async fn state_written_by_one_run_is_what_the_next_gets_on_every_trigger_and_daemon() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    let d = &dir.path;
    let path = setup(&db, d, &config(d, "first"), &[("alice-chase", "chase")]).await;
    let first = Daemon::start(&db, d, &config(d, "first"), &[]).await;

    // No state yet: the file does not exist, and the variable still names it.
    let r1 = manual_run(&db, "alice-chase").await;
    assert_eq!(got(d, r1), "ABSENT");
    let env = recorded_env(d, r1);
    assert_eq!(
        env.get("CONNECTORD_STATE_FILE").map(String::as_str),
        Some("/run/connector/state")
    );
    assert_eq!(status_of(&db, r1).await, ("succeeded".into(), None, None));
    let shown = state_json(&db, &path, "alice-chase");
    assert_eq!(shown["connection"], "alice-chase");
    assert_eq!(shown["run_id"], r1);
    assert_eq!(
        shown["size_bytes"],
        written_by("alice-chase", r1).len() as i64
    );
    assert!(shown["updated_at"].is_string(), "{shown}");

    // A failed run gets the state and its own is kept; its retry gets that.
    std::fs::write(d.join("exit.alice-chase"), "fail-first").expect("write");
    let r2 = manual_run(&db, "alice-chase").await;
    assert_eq!(got(d, r2), written_by("alice-chase", r1));
    assert_eq!(status_of(&db, r2).await.0, "failed");
    db.wait_until(&format!(
        "select exists (select 1 from runs where trigger = 'retry' and attempt = 2
                        and status = 'succeeded' and id > {r2})"
    ))
    .await;
    let r3: i64 = db
        .scalar("select id from runs where trigger = 'retry'")
        .await;
    assert_eq!(got(d, r3), written_by("alice-chase", r2));
    std::fs::remove_file(d.join("exit.alice-chase")).expect("remove");
    assert!(first.stop().success());

    // Another daemon's scheduled run finds what the first daemon stored.
    let second = Daemon::start(&db, d, &config(d, "second"), &[]).await;
    db.exec("insert into schedules (connection_id, cron) values ('alice-chase', '* * * * * *')")
        .await;
    db.wait_until(
        "select exists (select 1 from runs where trigger = 'scheduled' and status <> 'running')",
    )
    .await;
    db.exec("delete from schedules").await;
    let r4: i64 = db
        .scalar("select min(id) from runs where trigger = 'scheduled'")
        .await;
    assert_eq!(got(d, r4), written_by("alice-chase", r3));
    let instance: String = db
        .scalar(&format!("select instance_id from runs where id = {r4}"))
        .await;
    assert_eq!(instance, "second");

    let logs = second.logs();
    for run in [r1, r2, r3] {
        assert!(!logs.contains(&written_by("alice-chase", run)), "{logs}");
    }
}

/// A run that does not touch its state keeps it; one whose file is too
/// large or is a link stores nothing, says why, and the old state stays.
#[tokio::test(flavor = "multi_thread")]
async fn an_untouched_oversized_or_linked_state_file_leaves_the_old_state() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    let d = &dir.path;
    let config = config(d, "limits").set("state", "max_bytes", "1KiB");
    let path = setup(&db, d, &config, &[("alice-chase", "chase")]).await;
    std::fs::write(d.join("secret"), "a file of the daemon's").expect("write");
    let daemon = Daemon::start(&db, d, &config, &[]).await;

    let r1 = manual_run(&db, "alice-chase").await;
    let kept = written_by("alice-chase", r1);

    std::fs::write(d.join("write.alice-chase"), "none").expect("write");
    let r2 = manual_run(&db, "alice-chase").await;
    assert_eq!(got(d, r2), kept);
    assert_eq!(state_json(&db, &path, "alice-chase")["run_id"], r1);

    std::fs::write(d.join("write.alice-chase"), "big").expect("write");
    let r3 = manual_run(&db, "alice-chase").await;
    assert_eq!(got(d, r3), kept);
    let (status, kind, detail) = status_of(&db, r3).await;
    assert_eq!((status.as_str(), kind), ("succeeded", None));
    let detail = detail.expect("the run says why its state was not stored");
    assert!(
        detail.contains("max_bytes") && detail.contains("2048"),
        "{detail}"
    );
    let logs = daemon.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("\"ERROR\"") && l.contains("max_bytes")),
        "{logs}"
    );

    std::fs::write(d.join("write.alice-chase"), "symlink").expect("write");
    let r4 = manual_run(&db, "alice-chase").await;
    assert_eq!(got(d, r4), kept);
    let detail = status_of(&db, r4).await.2.expect("detail");
    assert!(detail.contains("symbolic link"), "{detail}");

    std::fs::remove_file(d.join("write.alice-chase")).expect("remove");
    let r5 = manual_run(&db, "alice-chase").await;
    assert_eq!(got(d, r5), kept);
    let shown = state_json(&db, &path, "alice-chase");
    assert_eq!(shown["run_id"], r5);
}

/// Replacing, revoking or deleting the credential (by the CLI or by hand)
/// discards the state at once; the next run, or refusal, gets none.
#[tokio::test(flavor = "multi_thread")]
async fn a_credential_change_discards_the_state() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    let d = &dir.path;
    let config = config(d, "discard");
    let path = setup(&db, d, &config, &[("alice-chase", "chase")]).await;
    let _daemon = Daemon::start(&db, d, &config, &[]).await;
    let has_state =
        "select exists (select 1 from connection_states where connection_id = 'alice-chase')";

    // Replaced.
    manual_run(&db, "alice-chase").await;
    assert!(db.scalar::<bool>(has_state).await);
    set_password(&db, &path, "alice-chase");
    assert!(!db.scalar::<bool>(has_state).await);
    assert!(state_json(&db, &path, "alice-chase")["size_bytes"].is_null());
    let r = manual_run(&db, "alice-chase").await;
    assert_eq!(got(d, r), "ABSENT");

    // Revoked: the refused run gets no state and stores none.
    assert!(db.scalar::<bool>(has_state).await);
    run_ok(&db, &path, &["credentials", "revoke", "alice-chase"], "");
    assert!(!db.scalar::<bool>(has_state).await);
    let r = manual_run(&db, "alice-chase").await;
    assert_eq!(
        status_of(&db, r).await.1.as_deref(),
        Some("credential_revoked")
    );
    assert!(!d.join(format!("{r}.got")).exists());
    assert!(!db.scalar::<bool>(has_state).await);

    // Deleted.
    set_password(&db, &path, "alice-chase");
    let r = manual_run(&db, "alice-chase").await;
    assert_eq!(got(d, r), "ABSENT");
    assert!(db.scalar::<bool>(has_state).await);
    run_ok(&db, &path, &["credentials", "delete", "alice-chase"], "");
    assert!(!db.scalar::<bool>(has_state).await);

    // Revoked by hand, in SQL.
    set_password(&db, &path, "alice-chase");
    manual_run(&db, "alice-chase").await;
    assert!(db.scalar::<bool>(has_state).await);
    db.exec(
        "update credentials set status = 'revoked', revoked_at = now() where status = 'active'",
    )
    .await;
    assert!(!db.scalar::<bool>(has_state).await);

    // Cleared by the operator.
    set_password(&db, &path, "alice-chase");
    manual_run(&db, "alice-chase").await;
    let out = run_ok(&db, &path, &["state", "clear", "alice-chase"], "");
    assert!(out.contains("cleared"), "{out}");
    assert!(!db.scalar::<bool>(has_state).await);
    let r = manual_run(&db, "alice-chase").await;
    assert_eq!(got(d, r), "ABSENT");

    let (code, _, err) = cli(&db, Some(&path), &["state", "show", "nobody"], "");
    assert_ne!(code, 0);
    assert!(err.contains("\"nobody\" does not exist"), "{err}");
}

/// The state is in no log, no plaintext column and no other connection's
/// run; its ciphertext copied to another connection does not decrypt; key
/// rotation keeps it readable under the new key alone.
#[tokio::test(flavor = "multi_thread")]
async fn state_is_kept_secret_and_survives_key_rotation() {
    const SESSION: &str = "session-cookie-7f3a9b2c";
    let db = TestDb::new().await;
    let dir = Scratch::new();
    let d = &dir.path;
    let config = config(d, "secret");
    let path = setup(
        &db,
        d,
        &config,
        &[
            ("alice-chase", "chase"),
            ("bob-chase", "chase"),
            ("town", "weather"),
        ],
    )
    .await;
    let daemon = Daemon::start(&db, d, &config, &[]).await;

    std::fs::write(d.join("write.alice-chase"), format!("text:{SESSION}")).expect("write");
    manual_run(&db, "alice-chase").await;
    std::fs::remove_file(d.join("write.alice-chase")).expect("remove");
    let r = manual_run(&db, "bob-chase").await;
    assert_eq!(got(d, r), "ABSENT");
    // A connector with no credential keeps state too.
    manual_run(&db, "town").await;
    let r = manual_run(&db, "town").await;
    assert!(got(d, r).starts_with("town-run"));

    let hex: String = SESSION.bytes().map(|b| format!("{b:02x}")).collect();
    let everywhere: bool = db
        .scalar(&format!(
            "select exists (
                 select 1 from (
                     select to_jsonb(t)::text as row from runs t
                     union all select to_jsonb(t)::text from connection_states t
                     union all select to_jsonb(t)::text from interactions t
                     union all select to_jsonb(t)::text from run_commands t
                     union all select to_jsonb(t)::text from credentials t
                 ) rows
                 where row like '%{SESSION}%' or row like '%{hex}%')"
        ))
        .await;
    assert!(!everywhere, "the state's plaintext is in a column");
    assert!(!daemon.logs().contains(SESSION));

    // Alice's ciphertext, put on Bob's row under Bob's credential, does not
    // open: Bob's run starts without it and it is said.
    db.exec(
        "delete from connection_states where connection_id = 'bob-chase';
         insert into connection_states (connection_id, run_id, credential_id, key_id, nonce,
                                        ciphertext, size_bytes)
         select 'bob-chase', s.run_id,
                (select id from credentials where connection_id = 'bob-chase' and status = 'active'),
                s.key_id, s.nonce, s.ciphertext, s.size_bytes
         from connection_states s where s.connection_id = 'alice-chase'",
    )
    .await;
    let r = manual_run(&db, "bob-chase").await;
    assert_eq!(got(d, r), "ABSENT");
    daemon
        .wait_for_log("the connection's stored state cannot be decrypted")
        .await;
    assert!(daemon.stop().success());

    // Rotation: re-encrypted under k2, then readable with k1 gone.
    generate_key(&db, d, "k2");
    let rotated = config.clone().set("keys", "primary", "k2");
    let rotated_path = rotated.write(&d.join("rotated.toml"));
    let out = run_ok(&db, &rotated_path, &["credentials", "rotate"], "");
    assert!(out.contains("connector state(s) under key k2"), "{out}");
    let old_keys: i64 = db
        .scalar("select count(*) from connection_states where key_id <> 'k2'")
        .await;
    assert_eq!(old_keys, 0);
    std::fs::remove_file(d.join("keys/k1.key")).expect("remove k1");
    let _daemon = Daemon::start(&db, d, &rotated, &[]).await;
    let r = manual_run(&db, "alice-chase").await;
    assert_eq!(got(d, r), SESSION);
    let _ = path;
}

/// Unsandboxed, the state file is a path in the daemon's run directory,
/// removed when the run ends.
#[tokio::test(flavor = "multi_thread")]
async fn an_unsandboxed_run_keeps_state_too() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    let d = &dir.path;
    let config = config(d, "plain").set("sandbox", "enabled", false);
    setup(&db, d, &config, &[("alice-chase", "chase")]).await;
    let _daemon = Daemon::start(&db, d, &config, &[]).await;
    let r1 = manual_run(&db, "alice-chase").await;
    let r2 = manual_run(&db, "alice-chase").await;
    assert_eq!(got(d, r2), written_by("alice-chase", r1));
    let file = recorded_env(d, r2)["CONNECTORD_STATE_FILE"].clone();
    assert!(file.starts_with('/') && file.ends_with("/state"), "{file}");
    assert!(!Path::new(&file).exists(), "{file} outlived its run");
}
