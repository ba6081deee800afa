//! Prometheus metrics (SPEC §15): `/metrics` at `[metrics] listen`, with
//! counters moved by exactly the runs that happened, histograms filled,
//! and no connection id or secret in the text; a bad address is a config
//! error and a port in use a start-up error, each naming it.

mod support;

use std::path::Path;

use support::{
    cli, generate_key, http_get, metric, run_ok, scrape_metrics, Config, Connector, Daemon,
    Scratch, TestDb,
};

const SECRET: &str = "tok-9f8e7d6c5b4a";

fn metrics_config(dir: &Path, listen: &str) -> Config {
    let record = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/connectors/record-env.sh");
    Config::new(dir, "one")
        .set("metrics", "listen", listen)
        .connector(Connector::recording("plain", &record, dir).no_retry())
        .connector(
            Connector::recording("token", &record, dir)
                .no_retry()
                .static_secret("API_TOKEN"),
        )
        .connector(Connector::new("broken", "/bin/false").no_retry())
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_the_runs_and_name_no_connection_or_secret() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    let d = &dir.path;
    generate_key(&db, d, "k1");
    let config = metrics_config(d, "127.0.0.1:0");
    let path = config.write(&d.join("connectord.toml"));
    db.exec(
        "insert into connections (id, connector) values
             ('conn-alpha-7', 'plain'), ('conn-bravo-8', 'broken'),
             ('conn-charlie-9', 'token'), ('conn-delta-0', 'token')",
    )
    .await;
    run_ok(
        &db,
        &path,
        &[
            "credentials",
            "set",
            "conn-charlie-9",
            "--kind",
            "static_secret",
        ],
        &format!("{SECRET}\n"),
    );
    let daemon = Daemon::start(&db, d, &config, &[]).await;
    let address = daemon.metrics_address().await;

    let before = scrape_metrics(&address).await;
    assert_eq!(
        metric(
            &before,
            r#"connectord_runs_finished_total{connector="plain",status="succeeded",failure_kind=""}"#
        ),
        None,
        "{before}"
    );
    assert_eq!(
        metric(&before, "connectord_database_up"),
        Some(1.0),
        "{before}"
    );

    // A success, a failure and a refusal (and a success with a secret).
    db.exec(
        "insert into run_commands (connection_id) values
             ('conn-alpha-7'), ('conn-bravo-8'), ('conn-charlie-9'), ('conn-delta-0')",
    )
    .await;
    db.wait_until("select count(*) = 4 from runs where status <> 'running'")
        .await;
    // A run is counted once its outcome is written: the row may be seen
    // a moment before the count.
    let finished_total = |text: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with("connectord_runs_finished_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let deadline = std::time::Instant::now() + support::PATIENCE;
    let after = loop {
        let text = scrape_metrics(&address).await;
        if finished_total(&text) >= 4.0 || std::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let finished = |connector: &str, status: &str, kind: &str| {
        metric(
            &after,
            &format!(
                r#"connectord_runs_finished_total{{connector="{connector}",status="{status}",failure_kind="{kind}"}}"#
            ),
        )
    };
    assert_eq!(finished("plain", "succeeded", ""), Some(1.0), "{after}");
    assert_eq!(finished("token", "succeeded", ""), Some(1.0), "{after}");
    assert_eq!(
        finished("broken", "failed", "exit_nonzero"),
        Some(1.0),
        "{after}"
    );
    assert_eq!(
        finished("token", "refused", "credential_missing"),
        Some(1.0),
        "{after}"
    );
    assert_eq!(finished_total(&after), 4.0, "{after}");
    // Three children ran: each has its pickup and its duration.
    for connector in ["plain", "broken", "token"] {
        for histogram in ["pickup_seconds", "run_duration_seconds"] {
            assert_eq!(
                metric(
                    &after,
                    &format!(r#"connectord_{histogram}_count{{connector="{connector}"}}"#)
                ),
                Some(1.0),
                "{histogram} of {connector}:\n{after}"
            );
        }
    }
    assert!(
        after.contains("connectord_pickup_seconds_bucket{"),
        "{after}"
    );
    assert_eq!(metric(&after, "connectord_runs_running"), Some(0.0));
    assert_eq!(metric(&after, "connectord_commands_pending"), Some(0.0));
    assert!(metric(&after, "connectord_commands_oldest_pending_age_seconds").is_some());
    assert_eq!(metric(&after, "connectord_schedules_loaded"), Some(0.0));
    assert_eq!(metric(&after, "connectord_schedule_leader"), Some(1.0));
    assert_eq!(metric(&after, "connectord_schedules_in_error"), Some(0.0));
    for private in [
        "conn-alpha-7",
        "conn-bravo-8",
        "conn-charlie-9",
        "conn-delta-0",
        SECRET,
    ] {
        assert!(
            !after.contains(private),
            "{private} is in the metrics:\n{after}"
        );
    }

    // Anything but /metrics is not found.
    let response = http_get(&address, "/").await;
    assert!(response.starts_with("HTTP/1.1 404"), "{response}");

    // The address in use: a second daemon does not start, and says why.
    let busy = metrics_config(d, &address).set("daemon", "instance_id", "two");
    let busy_path = busy.write(&d.join("busy.toml"));
    let (code, out, err) = cli(&db, Some(&busy_path), &["run"], "");
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        err.contains(&format!("cannot serve metrics on {address}")),
        "{err}"
    );
}

#[test]
fn a_bad_listen_address_is_a_config_error_naming_it() {
    let dir = Scratch::new();
    let path = metrics_config(&dir.path, "localhost-ish").write(&dir.path.join("connectord.toml"));
    let output = std::process::Command::new(support::binary())
        .args(["--config", path.to_str().expect("utf-8"), "check"])
        .output()
        .expect("run the CLI");
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        err.contains("localhost-ish") && err.contains("listen"),
        "{err}"
    );
}
