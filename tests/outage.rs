//! PostgreSQL goes away for seconds while a connector runs and
//! schedules fire. The daemon stays up, the child keeps running, its outcome
//! is written once the database is back, schedules keep firing and their
//! commands run, a tick missed during the outage fires once, and the log
//! does not flood. The daemon listens for notifications again, so edits made
//! afterwards take effect at once.

mod support;

use connectord::dev::pgcluster::Cluster;
use support::outages::{assert_back, own_cluster, Held};

/// How long the database stays down: the ticks that fall in the outage
/// are what the test checks are not replayed.
const OUTAGE_SECONDS: i64 = 5;

#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_rides_out_a_database_outage() {
    let (own, db) = own_cluster("outage").await;
    let held = Held::start(&db, &["late", "later"]).await;
    let daemon = &held.daemon;
    db.pool.close().await;

    let log_before = daemon.logs().lines().count();
    let stopped_at = chrono::Utc::now();
    {
        let cluster = own.cluster.clone();
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
    held.release();
    daemon
        .wait_for_log("cannot record the run's outcome; retrying until the database answers")
        .await;
    let ticks = (stopped_at + chrono::Duration::seconds(OUTAGE_SECONDS) - chrono::Utc::now())
        .to_std()
        .unwrap_or_default();
    tokio::time::sleep(ticks).await;
    let restarted_at = chrono::Utc::now();
    {
        let base = own.cluster.base_dir.clone();
        tokio::task::spawn_blocking(move || Cluster::ensure_running(&base))
            .await
            .expect("join")
            .expect("restart PostgreSQL");
    }
    let pool = sqlx::PgPool::connect(&db.url).await.expect("reconnect");
    let db = support::TestDb { pool, ..db };

    // The outcome of the run that ended during the outage is written, the
    // outage's ticks were not replayed, schedules fire and run again, and
    // edits are heard again.
    assert_back(&db, &held, stopped_at, restarted_at, &["late", "later"]).await;

    let outage_lines = daemon.logs().lines().count() - log_before;
    assert!(
        outage_lines < 60,
        "the log flooded with {outage_lines} lines:\n{}",
        daemon.logs()
    );
    assert!(
        held.daemon.stop().success(),
        "the daemon stayed up and exits cleanly"
    );
    db.pool.close().await;
}
