//! What the tests that take PostgreSQL away share: a cluster of the test's
//! own, and a daemon holding a run while a schedule ticks every second.

use std::path::{Path, PathBuf};

use connectord::dev::pgcluster::{cluster_dir, Cluster};

use super::{Config, Connector, Daemon, Scratch, TestDb};

/// A cluster of one test's own, for a test that stops it; stopped and
/// removed when dropped, however the test ends.
pub struct OwnCluster {
    pub cluster: Cluster,
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let _ = Cluster::stop_at(&self.cluster.base_dir);
        let _ = std::fs::remove_dir_all(&self.cluster.base_dir);
    }
}

/// The directory for a cluster of this test process named `name`.
pub fn own_cluster_dir(name: &str) -> PathBuf {
    cluster_dir(
        &Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-pg-{}", std::process::id())),
    )
}

/// Starts a cluster of the test's own with a migrated database `name`.
pub async fn own_cluster(name: &str) -> (OwnCluster, TestDb) {
    let base = own_cluster_dir(name);
    let cluster = tokio::task::spawn_blocking(move || Cluster::ensure_running(&base))
        .await
        .expect("join")
        .unwrap_or_else(|e| panic!("start the {name} cluster: {e}"));
    connectord::dev::create_database(&cluster, name)
        .await
        .expect("create database");
    let db = TestDb::open(cluster.url(name), name.to_owned()).await;
    (OwnCluster { cluster }, db)
}

/// A daemon whose run of 'steady' holds until released, while 'ticker'
/// ticks every second and its runs succeed. The connections in `spare`
/// exist, without schedules, for the test to schedule later.
pub struct Held {
    pub dir: Scratch,
    pub daemon: Daemon,
    hold: PathBuf,
}

impl Held {
    /// Starts the daemon and waits until the held run's child runs and a
    /// tick has run.
    pub async fn start(db: &TestDb, spare: &[&str]) -> Held {
        let dir = Scratch::new();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/connectors/hostile.sh");
        let config = Config::new(&dir.path, "a")
            .connector(Connector::recording("hostile", &script, &dir.path));
        db.exec(
            "insert into connections (id, connector) values ('steady', 'hostile'), ('ticker', 'hostile');
             insert into schedules (connection_id, cron, overlap) values ('ticker', '* * * * * *', 'queue');",
        )
        .await;
        std::fs::write(dir.path.join("behaviour.steady"), "hold").expect("behaviour");
        std::fs::write(dir.path.join("behaviour.ticker"), "ok").expect("behaviour");
        for connection in spare {
            db.exec(&format!(
                "insert into connections (id, connector) values ('{connection}', 'hostile')"
            ))
            .await;
            std::fs::write(dir.path.join(format!("behaviour.{connection}")), "ok")
                .expect("behaviour");
        }
        let hold = dir.path.join("hold.steady");
        std::fs::write(&hold, "").expect("hold");

        let daemon = Daemon::start(db, &dir.path, &config, &[]).await;
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
        Held { dir, daemon, hold }
    }

    /// Lets the held child finish.
    pub fn release(&self) {
        std::fs::remove_file(&self.hold).expect("release the child");
    }
}

/// After the database is back (`db` connected to it again): everything
/// [`assert_recovered`] checks, then the schedule fires again and its runs
/// succeed, and the daemon listens again: each of `spare` (of
/// [`Held::start`]) scheduled now, in turn, is heard. The daemon re-reads
/// the schedules only once it listens, and the periodic re-read is minutes
/// away: the first may still be caught by that re-read, but by the time it
/// fires the re-read is done, so the next can only be heard by NOTIFY.
pub async fn assert_back(
    db: &TestDb,
    held: &Held,
    away_from: chrono::DateTime<chrono::Utc>,
    back_at: chrono::DateTime<chrono::Utc>,
    spare: &[&str],
) {
    assert_recovered(db, away_from, back_at).await;
    // The queue claims and runs the ticks again: its connections from
    // before are gone.
    db.wait_until(&format!(
        "select count(*) >= 2 from runs where connection_id = 'ticker' and status = 'succeeded'
         and scheduled_for > '{back_at}'"
    ))
    .await;
    held.daemon
        .wait_for_log("listening for notifications again")
        .await;
    for connection in spare {
        db.exec(&format!(
            "insert into schedules (connection_id, cron) values ('{connection}', '* * * * * *')"
        ))
        .await;
        db.wait_until(&format!(
            "select count(*) >= 1 from run_commands where connection_id = '{connection}'"
        ))
        .await;
    }
}

/// After the database is back: the held run's outcome is written, and the
/// ticks of the time it was away were not replayed as a burst (at most the
/// most recent one fired, once), and no run was lost.
pub async fn assert_recovered(
    db: &TestDb,
    away_from: chrono::DateTime<chrono::Utc>,
    back_at: chrono::DateTime<chrono::Utc>,
) {
    db.wait_until(
        "select count(*) = 1 from runs where connection_id = 'steady' and status = 'succeeded'",
    )
    .await;
    let during: i64 = db
        .scalar(&format!(
            "select count(*) from run_commands where connection_id = 'ticker'
             and scheduled_for > '{}' and scheduled_for < '{}'",
            away_from + chrono::Duration::seconds(1),
            back_at - chrono::Duration::seconds(1),
        ))
        .await;
    assert!(
        during <= 1,
        "{during} ticks from the time away were replayed"
    );
    let lost: i64 = db
        .scalar("select count(*) from runs where failure_kind = 'lost'")
        .await;
    assert_eq!(lost, 0, "the daemon's own live run is never lost");
}
