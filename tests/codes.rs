//! One-time codes (SPEC §14): a connector asks for a code and reads its
//! stdin; `connectord interactions answer` delivers it through the
//! database, encrypted, to the daemon running the run; no answer in time
//! is `interaction_expired`.

#![allow(clippy::type_complexity)]

mod support;

use std::path::{Path, PathBuf};

use support::{cli, generate_key, run_ok, Config, Connector, Daemon, Scratch, TestDb};

const CODE: &str = "493817";

fn code_connector() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/connectors/code.sh")
}

fn config(dir: &Path, instance: &str, timeout: &str) -> Config {
    Config::new(dir, instance).daemon("lease", "3s").connector(
        Connector::recording("chase", code_connector(), dir)
            .env("CODE_TIMEOUT", timeout)
            .timeout("1m")
            .retry(3, "1s", "1s")
            .username_password("CHASE_USERNAME", "CHASE_PASSWORD"),
    )
}

async fn setup(db: &TestDb, dir: &Path, config: &Config) -> PathBuf {
    generate_key(db, dir, "k1");
    let path = config.write(&dir.join("connectord.toml"));
    db.exec("insert into connections (id, connector) values ('alice-chase', 'chase')")
        .await;
    run_ok(
        db,
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
        "hunter2\n",
    );
    path
}

/// Queues a manual run and waits for its code request; returns the
/// command id and the interaction id.
async fn run_until_asked(db: &TestDb) -> (i64, i64) {
    let command: i64 = db
        .scalar("insert into run_commands (connection_id) values ('alice-chase') returning id")
        .await;
    db.wait_until(
        "select exists (select 1 from interactions where kind = 'code_required' and status = 'open')",
    )
    .await;
    let interaction: i64 = db
        .scalar("select id from interactions where kind = 'code_required' and status = 'open'")
        .await;
    (command, interaction)
}

async fn run_of(db: &TestDb, command: i64) -> (i64, String, Option<String>, String) {
    db.wait_until(&format!(
        "select exists (select 1 from runs where command_id = {command} and status <> 'running')"
    ))
    .await;
    sqlx::query_as("select id, status, failure_kind, instance_id from runs where command_id = $1")
        .bind(command)
        .fetch_one(&db.pool)
        .await
        .expect("run")
}

fn answer_file(dir: &Path, run_id: i64) -> String {
    std::fs::read_to_string(dir.join(format!("{run_id}.answer"))).expect("the child's answer")
}

/// Two daemons share the database; the code, answered by the CLI, reaches
/// the child of whichever runs it, exactly, and nowhere else.
#[tokio::test(flavor = "multi_thread")]
async fn an_answered_code_reaches_the_waiting_child_and_nothing_else() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    let d = &dir.path;
    let path = setup(&db, d, &config(d, "one", "30s")).await;
    let one = Daemon::start(&db, d, &config(d, "one", "30s"), &[]).await;
    let two = Daemon::start(&db, d, &config(d, "two", "30s"), &[]).await;

    let (command, interaction) = run_until_asked(&db).await;
    let (message, run_id): (Option<String>, Option<i64>) =
        sqlx::query_as("select message, run_id from interactions where id = $1")
            .bind(interaction)
            .fetch_one(&db.pool)
            .await
            .expect("interaction");
    assert_eq!(message.as_deref(), Some("Code sent to ***1234"));
    let listed = cli(&db, Some(&path), &["interactions", "--open"], "").1;
    assert!(listed.contains("code_required open"), "{listed}");

    let (code, out, err) = cli(
        &db,
        Some(&path),
        &["interactions", "answer", &interaction.to_string()],
        &format!("{CODE}\n"),
    );
    assert_eq!(code, 0, "{out}{err}");
    let (run, status, kind, instance) = run_of(&db, command).await;
    assert_eq!(Some(run), run_id);
    assert_eq!((status.as_str(), kind), ("succeeded", None));
    assert_eq!(
        answer_file(d, run),
        format!(r#"{{"type":"answer","interaction":{interaction},"value":"{CODE}"}}"#)
    );
    let (state, stored): (String, bool) = sqlx::query_as(
        "select status, answer_ciphertext is not null or answer_nonce is not null
         from interactions where id = $1",
    )
    .bind(interaction)
    .fetch_one(&db.pool)
    .await
    .expect("interaction");
    assert_eq!((state.as_str(), stored), ("resolved", false));

    // The daemon that ran it delivered it; neither logged the code.
    let (runner, other) = if instance == "one" {
        (&one, &two)
    } else {
        (&two, &one)
    };
    assert!(runner.logs().contains("interaction.answered"));
    assert!(!other.logs().contains("interaction.answered"));
    for logs in [one.logs(), two.logs()] {
        assert!(!logs.contains(CODE), "the code reached a log");
    }
    let anywhere: bool = db
        .scalar(&format!(
            "select exists (select 1 from (
                 select to_jsonb(t)::text as row from interactions t
                 union all select to_jsonb(t)::text from runs t) rows
             where row like '%{CODE}%')"
        ))
        .await;
    assert!(!anywhere, "the code is in a column");

    // Once answered, it takes no second answer.
    let (code, _, err) = cli(
        &db,
        Some(&path),
        &["interactions", "answer", &interaction.to_string()],
        "111111\n",
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("has ended") || err.contains("already answered"),
        "{err}"
    );
}

/// An answer given for a run whose daemon was killed is never delivered:
/// the daemon that takes the run over settles it `lost`, closes its code
/// request and deletes the answer unread; the retry asks anew, and only
/// the answer to its own request reaches its child.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_taken_over_does_not_get_the_dead_daemons_answer() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    let d = &dir.path;
    let path = setup(&db, d, &config(d, "one", "30s")).await;
    let one = Daemon::start(&db, d, &config(d, "one", "30s"), &[]).await;
    let (command, old) = run_until_asked(&db).await;
    let run: i64 = db
        .scalar(&format!("select run_id from interactions where id = {old}"))
        .await;
    // SAFETY: kill(2) on the daemon this test started.
    unsafe {
        libc::kill(one.pid() as i32, libc::SIGKILL);
    }
    drop(one);

    // Nobody has taken the run over yet, so the answer is accepted, and
    // waits, encrypted, for a daemon that is gone.
    let (code, out, err) = cli(
        &db,
        Some(&path),
        &["interactions", "answer", &old.to_string()],
        "111111\n",
    );
    assert_eq!(code, 0, "{out}{err}");

    let two = Daemon::start(&db, d, &config(d, "two", "30s"), &[]).await;
    let (lost, status, kind, _) = run_of(&db, command).await;
    assert_eq!(lost, run);
    assert_eq!((status.as_str(), kind.as_deref()), ("failed", Some("lost")));
    db.wait_until(&format!(
        "select exists (select 1 from interactions
                        where kind = 'code_required' and status = 'open' and id <> {old})"
    ))
    .await;
    let (state, stored): (String, bool) = sqlx::query_as(
        "select status, answer_ciphertext is not null or answer_nonce is not null
         from interactions where id = $1",
    )
    .bind(old)
    .fetch_one(&db.pool)
    .await
    .expect("the old request");
    assert_eq!((state.as_str(), stored), ("expired", false));

    let (new, retry): (i64, i64) = sqlx::query_as(
        "select id, run_id from interactions where kind = 'code_required' and status = 'open'",
    )
    .fetch_one(&db.pool)
    .await
    .expect("the retry's request");
    run_ok(
        &db,
        &path,
        &["interactions", "answer", &new.to_string()],
        &format!("{CODE}\n"),
    );
    db.wait_until(&format!(
        "select status = 'succeeded' from runs where id = {retry}"
    ))
    .await;
    // The retry's child read one line, and it was its own answer.
    assert_eq!(
        answer_file(d, retry),
        format!(r#"{{"type":"answer","interaction":{new},"value":"{CODE}"}}"#)
    );
    // The killed daemon's child saw at most its stdin close as it died.
    let first = std::fs::read_to_string(d.join(format!("{run}.answer"))).unwrap_or_default();
    assert!(first.is_empty() || first == "EOF", "{first}");
    assert!(two.logs().contains("run.lost"));
}

/// No answer in time: the child is told, the interaction is `expired`, a
/// late answer is refused with the reason, and the failed run is
/// `interaction_expired`, not retried.
#[tokio::test(flavor = "multi_thread")]
async fn an_unanswered_code_expires_and_the_run_is_not_retried() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    let d = &dir.path;
    let config = config(d, "expiry", "1s");
    let path = setup(&db, d, &config).await;
    let _daemon = Daemon::start(&db, d, &config, &[]).await;
    std::fs::write(d.join("hold"), "").expect("hold");

    let (command, interaction) = run_until_asked(&db).await;
    db.wait_until(&format!(
        "select status = 'expired' from interactions where id = {interaction}"
    ))
    .await;
    let (code, _, err) = cli(
        &db,
        Some(&path),
        &["interactions", "answer", &interaction.to_string()],
        &format!("{CODE}\n"),
    );
    assert_ne!(code, 0);
    assert!(err.contains("expired"), "{err}");

    std::fs::remove_file(d.join("hold")).expect("release");
    let (run, status, kind, _) = run_of(&db, command).await;
    assert_eq!(
        (status.as_str(), kind.as_deref()),
        ("failed", Some("interaction_expired"))
    );
    assert_eq!(
        answer_file(d, run),
        format!(r#"{{"type":"answer","interaction":{interaction},"expired":true}}"#)
    );
    let retries: i64 = db
        .scalar("select count(*) from run_commands where trigger = 'retry'")
        .await;
    assert_eq!(retries, 0);

    // Its run has ended: that is the reason now.
    let (code, _, err) = cli(
        &db,
        Some(&path),
        &["interactions", "answer", &interaction.to_string()],
        &format!("{CODE}\n"),
    );
    assert_ne!(code, 0);
    assert!(
        err.contains(&format!("its run {run} has ended (failed)")),
        "{err}"
    );
    let (code, _, err) = cli(
        &db,
        Some(&path),
        &["interactions", "answer", "999999"],
        "1\n",
    );
    assert_ne!(code, 0);
    assert!(err.contains("interaction 999999 does not exist"), "{err}");
    let (code, _, err) = cli(
        &db,
        Some(&path),
        &["interactions", "answer", &interaction.to_string()],
        "",
    );
    assert_ne!(code, 0);
    assert!(err.contains("no code on stdin"), "{err}");
}

/// A child that reads its stdin to the end waits: the pipe stays open for
/// the run, and closes only when the run is over.
#[tokio::test(flavor = "multi_thread")]
async fn stdin_stays_open_for_the_run() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    let d = &dir.path;
    let script = d.join("reads-stdin.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\nif IFS= read -r line; then exit 0; fi\nexit 9\n",
    )
    .expect("script");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let config = Config::new(d, "stdin").connector(
        Connector::new("reader", &script)
            .read_only(d)
            .timeout("2s")
            .no_retry(),
    );
    generate_key(&db, d, "k1");
    let _daemon = Daemon::start(&db, d, &config, &[]).await;
    db.exec("insert into connections (id, connector) values ('r', 'reader')")
        .await;
    let command: i64 = db
        .scalar("insert into run_commands (connection_id) values ('r') returning id")
        .await;
    db.wait_until(&format!(
        "select exists (select 1 from runs where command_id = {command} and status <> 'running')"
    ))
    .await;
    let kind: Option<String> = db
        .scalar(&format!(
            "select failure_kind from runs where command_id = {command}"
        ))
        .await;
    // It waited on its open stdin until its timeout, rather than reading
    // an end of input.
    assert_eq!(kind.as_deref(), Some("timed_out"));
}
