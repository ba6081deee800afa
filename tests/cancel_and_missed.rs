//! Runs an operator looks for at 3 a.m. (SPEC §15). `connectord runs
//! cancel`, from any host, through the database: the daemon running the
//! run ends the connector's whole process group and records
//! `failed`/`cancelled`, not retried; a run whose daemon is gone is settled
//! `cancelled` by the lease rescue. Ticks a downtime left outside the
//! catch-up window: one `skipped` run of kind `missed` per schedule.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::{
    cli, metric, run_processes, scrape_metrics, Config, Connector, Daemon, Scratch, TestDb,
};

fn hostile() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/connectors/hostile.sh")
}

fn config(dir: &Path, instance: &str) -> Config {
    Config::new(dir, instance)
        .daemon("lease", "3s")
        .daemon("kill_grace", "5s")
        .connector(
            Connector::recording("hostile", hostile(), dir)
                .timeout("2m")
                .retry(3, "100ms", "1s"),
        )
}

/// Starts a run of `connection` (behaving as `behaviour`) and waits until
/// its child and the child's own child run; returns the run id.
async fn running(db: &TestDb, dir: &Path, connection: &str, behaviour: &str) -> i64 {
    std::fs::write(dir.join(format!("behaviour.{connection}")), behaviour).expect("behaviour");
    db.exec(&format!(
        "insert into connections (id, connector) values ('{connection}', 'hostile');
         insert into run_commands (connection_id) values ('{connection}')"
    ))
    .await;
    db.wait_until(&format!(
        "select exists (select 1 from runs where connection_id = '{connection}'
                        and status = 'running' and pid is not null)"
    ))
    .await;
    let run: i64 = db
        .scalar(&format!(
            "select id from runs where connection_id = '{connection}' and status = 'running'"
        ))
        .await;
    let deadline = Instant::now() + support::PATIENCE;
    // Both sleeps of the `family` behaviour, each seen by its environment.
    while run_processes(dir, run)
        .iter()
        .filter(|(_, ns)| !ns.is_empty())
        .count()
        < 2
    {
        assert!(
            Instant::now() < deadline,
            "the connector's processes never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    run
}

/// A long child is cancelled from the CLI with a second daemon up: its
/// whole group is gone within a second and a half, the run is
/// `cancelled`, no retry is queued, and a second cancel names the status.
#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_run_ends_its_group_and_is_not_retried() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    let d = &dir.path;
    let path = config(d, "one").write(&d.join("connectord.toml"));
    let one = Daemon::start(&db, d, &config(d, "one"), &[]).await;
    let two = Daemon::start(&db, d, &config(d, "two"), &[]).await;
    let run = running(&db, d, "hung", "family").await;
    let before = run_processes(d, run).len();

    let asked = Instant::now();
    let (code, out, err) = cli(&db, Some(&path), &["runs", "cancel", &run.to_string()], "");
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("cancelling run {run} of hung")),
        "{out}"
    );
    while !run_processes(d, run).is_empty() {
        assert!(
            asked.elapsed() < Duration::from_millis(1500),
            "{} of the run's {before} processes still run 1.5 s after the cancel",
            run_processes(d, run).len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    db.wait_until(&format!(
        "select status <> 'running' from runs where id = {run}"
    ))
    .await;
    let (status, kind, detail, instance): (String, Option<String>, Option<String>, String) =
        sqlx::query_as(
            "select status, failure_kind, failure_detail, instance_id from runs where id = $1",
        )
        .bind(run)
        .fetch_one(&db.pool)
        .await
        .expect("run");
    assert_eq!(
        (status.as_str(), kind.as_deref()),
        ("failed", Some("cancelled")),
        "{detail:?}"
    );
    let retries: i64 = db
        .scalar("select count(*) from run_commands where trigger = 'retry'")
        .await;
    assert_eq!(retries, 0);
    let runner = if instance == "one" { &one } else { &two };
    runner.wait_for_log("the run was cancelled").await;

    let (code, _, err) = cli(&db, Some(&path), &["runs", "cancel", &run.to_string()], "");
    assert_ne!(code, 0);
    assert!(
        err.contains(&format!(
            "run {run} cannot be cancelled: it has ended (failed, cancelled)"
        )),
        "{err}"
    );
    let (code, _, err) = cli(&db, Some(&path), &["runs", "cancel", "999999"], "");
    assert_ne!(code, 0);
    assert!(err.contains("run 999999 does not exist"), "{err}");
}

/// A run whose daemon was killed is cancelled all the same: the daemon
/// that rescues it records `cancelled`, not `lost`, and does not retry it.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_whose_daemon_died_is_settled_cancelled() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    let d = &dir.path;
    let path = config(d, "one").write(&d.join("connectord.toml"));
    let one = Daemon::start(&db, d, &config(d, "one"), &[]).await;
    let run = running(&db, d, "orphan", "hang").await;
    // SAFETY: kill(2) on the daemon this test started.
    unsafe {
        libc::kill(one.pid() as i32, libc::SIGKILL);
    }
    drop(one);

    let (code, out, err) = cli(&db, Some(&path), &["runs", "cancel", &run.to_string()], "");
    assert_eq!(code, 0, "{out}{err}");
    let two = Daemon::start(&db, d, &config(d, "two"), &[]).await;
    db.wait_until(&format!(
        "select status <> 'running' from runs where id = {run}"
    ))
    .await;
    let (status, kind): (String, Option<String>) =
        sqlx::query_as("select status, failure_kind from runs where id = $1")
            .bind(run)
            .fetch_one(&db.pool)
            .await
            .expect("run");
    assert_eq!(
        (status.as_str(), kind.as_deref()),
        ("failed", Some("cancelled"))
    );
    let retries: i64 = db
        .scalar("select count(*) from run_commands where trigger = 'retry'")
        .await;
    assert_eq!(retries, 0);
    // The row is settled before the rescuing daemon logs it.
    two.wait_for_log("run.cancelled").await;
    assert!(!two.logs().contains("run.lost"));
}

/// Ticks a downtime left older than `catchup_window` are one `skipped`
/// run of kind `missed` per schedule, recorded on restart, not one per
/// tick, and not again on the next restart.
#[tokio::test(flavor = "multi_thread")]
async fn a_downtime_past_the_catchup_window_records_one_missed_run() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    let d = &dir.path;
    let config = config(d, "one").daemon("catchup_window", "1m");
    let path = config.write(&d.join("connectord.toml"));
    std::fs::write(d.join("behaviour.hourly"), "ok").expect("behaviour");
    // Hourly, half an hour away from now: its latest tick is never inside
    // the window.
    let minute: i64 = db
        .scalar("select ((extract(minute from now())::int + 30) % 60)::bigint")
        .await;
    db.exec(&format!(
        "insert into connections (id, connector) values ('hourly', 'hostile');
         insert into schedules (connection_id, cron) values ('hourly', '{minute} * * * *')"
    ))
    .await;
    Daemon::start(&db, d, &config, &[]).await.stop();

    // A downtime of five hours: the row was last fired, and last edited,
    // before it.
    db.exec(
        "update schedules set last_fired_at = now() - interval '5 hours',
                              updated_at = now() - interval '5 hours'",
    )
    .await;
    let daemon = Daemon::start(
        &db,
        d,
        &config.clone().set("metrics", "listen", "127.0.0.1:0"),
        &[],
    )
    .await;
    db.wait_until("select exists (select 1 from runs where failure_kind = 'missed')")
        .await;
    let scraped = scrape_metrics(&daemon.metrics_address().await).await;
    assert_eq!(
        metric(
            &scraped,
            r#"connectord_runs_finished_total{connector="hostile",status="skipped",failure_kind="missed"}"#
        ),
        Some(1.0),
        "{scraped}"
    );
    let (status, trigger, detail, scheduled_for_is_latest): (String, String, String, bool) =
        sqlx::query_as(
            "select r.status, r.trigger, r.failure_detail,
                    r.scheduled_for = (select last_fired_at from schedules)
             from runs r where r.failure_kind = 'missed'",
        )
        .fetch_one(&db.pool)
        .await
        .expect("the missed run");
    assert_eq!(
        (status.as_str(), trigger.as_str()),
        ("skipped", "scheduled")
    );
    assert!(scheduled_for_is_latest);
    assert!(
        detail.starts_with("the ticks from ") && detail.contains("older than catchup_window (1m)"),
        "{detail}"
    );
    let listed = cli(&db, Some(&path), &["runs", "--status", "skipped"], "").1;
    assert!(listed.contains("missed"), "{listed}");
    assert!(daemon
        .logs()
        .contains("skipping missed ticks older than the catch-up window"));
    daemon.stop();

    // The same downtime is not reported twice.
    let daemon = Daemon::start(&db, d, &config, &[]).await;
    drop(daemon);
    let missed: i64 = db
        .scalar("select count(*) from runs where failure_kind = 'missed'")
        .await;
    assert_eq!(missed, 1);
    let ran: i64 = db
        .scalar("select count(*) from runs where failure_kind is distinct from 'missed'")
        .await;
    assert_eq!(ran, 0, "a tick outside the window ran");
}
