//! PostgreSQL goes away for seconds while a connector runs and
//! schedules fire. The daemon stays up, the child keeps running, its outcome
//! is written once the database is back, schedules keep firing and their
//! commands run, a tick missed during the outage fires once, and the log
//! does not flood. The daemon listens for notifications again, so edits made
//! afterwards take effect at once.

mod support;

use std::path::Path;

use connectord::dev::pgcluster::{cluster_dir, Cluster};
use support::{Config, Connector, Daemon, Scratch, TestDb};

/// How long the database stays down: the ticks that fall in the outage
/// are what the test checks are not replayed.
const OUTAGE_SECONDS: i64 = 5;

#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_rides_out_a_database_outage() {
    // A cluster of its own, since this test stops it.
    let preferred =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("outage-pg-{}", std::process::id()));
    let base = cluster_dir(&preferred);
    let cluster = {
        let base = base.clone();
        tokio::task::spawn_blocking(move || Cluster::ensure_running(&base))
            .await
            .expect("join")
            .expect("start the outage cluster")
    };
    connectord::dev::create_database(&cluster, "outage")
        .await
        .expect("create database");
    let url = cluster.url("outage");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .expect("connect");
    connectord::db::migrate(&pool).await.expect("migrate");
    let db = TestDb {
        url,
        pool,
        name: "outage".into(),
    };

    let dir = Scratch::new();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/connectors/hostile.sh");
    let config =
        Config::new(&dir.path, "a").connector(Connector::recording("hostile", &script, &dir.path));
    db.exec(
        "insert into connections (id, connector) values ('steady', 'hostile'), ('ticker', 'hostile'),
           ('late', 'hostile'), ('later', 'hostile');
         insert into schedules (connection_id, cron, overlap) values ('ticker', '* * * * * *', 'queue');",
    )
    .await;
    std::fs::write(dir.path.join("behaviour.steady"), "hold").expect("behaviour");
    for connection in ["ticker", "late", "later"] {
        std::fs::write(dir.path.join(format!("behaviour.{connection}")), "ok").expect("behaviour");
    }
    let hold = dir.path.join("hold.steady");
    std::fs::write(&hold, "").expect("hold");

    let daemon = Daemon::start(&db, &dir.path, &config, &[]).await;
    db.exec("insert into run_commands (connection_id) values ('steady')")
        .await;
    db.wait_until(
        "select count(*) = 1 from runs where connection_id = 'steady' and pid is not null",
    )
    .await;
    db.wait_until(
        "select count(*) >= 1 from runs where connection_id = 'ticker' and status = 'succeeded'",
    )
    .await;
    db.pool.close().await;

    let log_before = daemon.logs().lines().count();
    let stopped_at = chrono::Utc::now();
    {
        let cluster = cluster.clone();
        tokio::task::spawn_blocking(move || cluster.stop())
            .await
            .expect("join")
            .expect("stop PostgreSQL");
    }
    // The outage: the daemon notices it, then the child finishes in the
    // middle of it, and it lasts several of the schedule's ticks.
    daemon
        .wait_for_log("schedule engine cannot reach the database")
        .await;
    std::fs::remove_file(&hold).expect("release the child");
    daemon
        .wait_for_log("cannot record the run's outcome; retrying until the database answers")
        .await;
    let ticks = (stopped_at + chrono::Duration::seconds(OUTAGE_SECONDS) - chrono::Utc::now())
        .to_std()
        .unwrap_or_default();
    tokio::time::sleep(ticks).await;
    let restarted_at = chrono::Utc::now();
    {
        let base = base.clone();
        tokio::task::spawn_blocking(move || Cluster::ensure_running(&base))
            .await
            .expect("join")
            .expect("restart PostgreSQL");
    }
    let pool = sqlx::PgPool::connect(&db.url).await.expect("reconnect");
    let db = TestDb { pool, ..db };

    // The outcome of the run that ended during the outage is written.
    db.wait_until(
        "select count(*) = 1 from runs where connection_id = 'steady' and status = 'succeeded'",
    )
    .await;
    // Schedules fire again after the outage.
    db.wait_until(&format!(
        "select count(*) >= 2 from run_commands where connection_id = 'ticker' and scheduled_for > '{restarted_at}'"
    ))
    .await;
    // And the queue claims and runs them again: its connections from
    // before the outage are gone.
    db.wait_until(&format!(
        "select count(*) >= 1 from runs where connection_id = 'ticker' and status = 'succeeded'
         and created_at > '{restarted_at}'"
    ))
    .await;
    // The daemon listens again, and re-reads the schedules only once it
    // does: a row added after that reaches the engine by NOTIFY alone, the
    // periodic re-read being minutes away. 'late' may still be caught by
    // the re-read; by the time it fires the re-read is done, so 'later'
    // can only be heard.
    daemon
        .wait_for_log("listening for notifications again")
        .await;
    for connection in ["late", "later"] {
        db.exec(&format!(
            "insert into schedules (connection_id, cron) values ('{connection}', '* * * * * *')"
        ))
        .await;
        db.wait_until(&format!(
            "select count(*) >= 1 from run_commands where connection_id = '{connection}'"
        ))
        .await;
    }
    // Ticks missed during the outage were not replayed as a burst: at most
    // the most recent one fired, once.
    let during: i64 = db
        .scalar(&format!(
            "select count(*) from run_commands where connection_id = 'ticker'
             and scheduled_for > '{}' and scheduled_for < '{}'",
            stopped_at + chrono::Duration::seconds(1),
            restarted_at - chrono::Duration::seconds(1),
        ))
        .await;
    assert!(during <= 1, "{during} ticks from the outage were replayed");
    let lost: i64 = db
        .scalar("select count(*) from runs where failure_kind = 'lost'")
        .await;
    assert_eq!(lost, 0, "the daemon's own live run is never lost");

    let outage_lines = daemon.logs().lines().count() - log_before;
    assert!(
        outage_lines < 60,
        "the log flooded with {outage_lines} lines:\n{}",
        daemon.logs()
    );
    assert!(
        daemon.stop().success(),
        "the daemon stayed up and exits cleanly"
    );

    tokio::task::spawn_blocking(move || {
        let _ = cluster.stop();
        let _ = std::fs::remove_dir_all(&cluster.base_dir);
    })
    .await
    .expect("join");
}
