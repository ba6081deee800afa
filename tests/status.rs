//! `connectord status` (SPEC §15): what an operator reads first, from the
//! tables the daemons write.

mod support;

use std::path::Path;

use support::{cli, run_ok, Config, Connector, Daemon, Scratch, TestDb};

fn config(dir: &Path) -> Config {
    let record = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/connectors/record-env.sh");
    Config::new(dir, "one")
        .connector(Connector::recording("plain", &record, dir).no_retry())
        .connector(
            Connector::recording("chase", &record, dir)
                .no_retry()
                .username_password("CHASE_USERNAME", "CHASE_PASSWORD"),
        )
}

#[tokio::test(flavor = "multi_thread")]
async fn status_shows_daemons_queue_errors_interactions_and_refusals() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    let config = config(&dir.path);
    let path = config.write(&dir.path.join("connectord.toml"));
    db.exec(
        "insert into connections (id, connector) values ('fine', 'plain'), ('nocred', 'chase');
         insert into schedules (connection_id, cron) values ('fine', 'every tuesday')",
    )
    .await;
    let daemon = Daemon::start(&db, &dir.path, &config, &[]).await;
    db.exec(
        "insert into run_commands (connection_id) values ('fine'), ('nocred');
         insert into run_commands (connection_id, not_before) values ('fine', now() + interval '1 day')",
    )
    .await;
    db.wait_until("select count(*) = 2 from runs where status <> 'running'")
        .await;
    db.wait_until("select count(*) = 1 from schedules where last_error is not null")
        .await;
    let refused: i64 = db
        .scalar("select id from runs where status = 'refused'")
        .await;

    let out = run_ok(&db, &path, &["status", "--json"], "");
    let status: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let daemons = status["daemons"].as_array().expect("daemons");
    assert_eq!(daemons.len(), 1, "{status}");
    assert_eq!(daemons[0]["instance_id"], "one");
    assert!(daemons[0]["stopped_at"].is_null());
    assert_eq!(daemons[0]["pid"], daemon.pid());
    assert_eq!(status["schedule_leader"]["holder"], "one", "{status}");
    assert_eq!(status["schedule_leader"]["current"], true, "{status}");
    assert_eq!(status["running"], serde_json::json!([]));
    assert_eq!(status["pending_due"], 0);
    assert_eq!(status["pending_later"], 1);
    assert_eq!(status["schedules_in_error"], 1);
    assert_eq!(status["schedule_errors"][0]["connection_id"], "fine");
    assert_eq!(
        status["open_interactions"],
        serde_json::json!([{"name": "credentials_required", "count": 1}])
    );
    let refusals = status["refusals"].as_array().expect("refusals");
    assert_eq!(refusals.len(), 1, "{status}");
    assert_eq!(refusals[0]["failure_kind"], "credential_missing");
    assert_eq!(refusals[0]["last_run_id"], refused);
    assert_eq!(refusals[0]["last_day"], 1);

    let text = run_ok(&db, &path, &["status"], "");
    assert!(text.contains("one") && text.contains("live"), "{text}");
    assert!(text.contains("schedules in error: 1"), "{text}");
    assert!(text.contains("schedules fired by: one (term 1"), "{text}");
    assert!(
        text.contains("credential_missing") && text.contains(&format!("run {refused}")),
        "{text}"
    );

    // A clean stop is said; a due command waiting is counted with its age.
    assert!(daemon.stop().success());
    db.exec("insert into run_commands (connection_id) values ('fine')")
        .await;
    let out = run_ok(&db, &path, &["status", "--json"], "");
    let status: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert!(!status["daemons"][0]["stopped_at"].is_null(), "{status}");
    assert_eq!(status["pending_due"], 1);
    assert!(status["oldest_pending_seconds"].as_f64().is_some());
    // It gave up firing the schedules as it stopped.
    assert_eq!(status["schedule_leader"]["current"], false, "{status}");
    let text = cli(&db, Some(&path), &["status"], "").1;
    assert!(text.contains("stopped"), "{text}");
    assert!(text.contains("no daemon has taken over"), "{text}");
}
