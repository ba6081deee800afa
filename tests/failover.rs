//! A failover of PostgreSQL (SPEC §16): the primary stops, a streaming
//! standby of it comes up at the primary's address still in recovery, and
//! is promoted a moment later. The daemon, holding a running child through
//! it all, refuses the standby's sessions rather than failing writes on
//! them, and once the promoted server answers: writes the child's outcome,
//! fires its schedule again without a burst, and hears edits again.

mod support;

use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::Command;

use connectord::dev::pgcluster::Cluster;
use support::outages::{assert_back, own_cluster, own_cluster_dir, Held};
use support::TestDb;

/// A PostgreSQL program of the installed server, run as the server user
/// when we are root (as the cluster itself is).
fn server_program(name: &str) -> Command {
    let dirs = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.flatten()
                .map(|e| e.path().join("bin"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let program = dirs
        .iter()
        .map(|d| d.join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name));
    let mut command = Command::new(program);
    if let Some((uid, gid)) = support::server_user() {
        command.uid(uid).gid(gid).env("HOME", "/tmp");
    }
    command.current_dir("/tmp");
    command
}

fn run(mut command: Command, what: &str) {
    let output = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        output.status.success(),
        "{what}: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_waits_out_a_failover_to_a_promoted_standby() {
    let (primary, db) = own_cluster("failover").await;
    let primary = &primary.cluster;
    let password = std::fs::read_to_string(primary.base_dir.join("password"))
        .expect("the primary's password")
        .trim()
        .to_owned();
    // The standby: a base backup streaming from the primary, which starts
    // in recovery (`-R`), on a port of its own until the failover.
    let standby_base = own_cluster_dir("failover-standby");
    let _standby_guard = OwnClusterDir(standby_base.clone());
    std::fs::create_dir_all(&standby_base).expect("standby base");
    let standby_data = standby_base.join("data");
    {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&standby_data)
            .expect("standby data");
    }
    if let Some((uid, gid)) = support::server_user() {
        std::os::unix::fs::chown(&standby_data, Some(uid), Some(gid)).expect("chown");
    }
    let mut backup = server_program("pg_basebackup");
    backup
        .arg("-D")
        .arg(&standby_data)
        .args([
            "-R",
            "-X",
            "stream",
            "-c",
            "fast",
            "-h",
            "127.0.0.1",
            "-U",
            "connectord",
        ])
        .arg("-p")
        .arg(primary.port.to_string())
        .env("PGPASSWORD", &password);
    run(backup, "pg_basebackup");
    connectord::dev::pgcluster::write_private(&standby_base.join("password"), &password)
        .expect("password");
    let standby = {
        let base = standby_base.clone();
        tokio::task::spawn_blocking(move || Cluster::ensure_running(&base))
            .await
            .expect("join")
            .expect("start the standby")
    };

    let held = Held::start(&db, &["late"]).await;
    let daemon = &held.daemon;
    db.pool.close().await;

    // The failover: the primary stops (sending the standby all it wrote);
    // the standby comes up at its address, still in recovery, and the
    // child finishes meanwhile.
    let stopped_at = chrono::Utc::now();
    let standby = {
        let (primary, standby) = (primary.clone(), standby.clone());
        let base = standby_base.clone();
        tokio::task::spawn_blocking(move || {
            primary.stop().expect("stop the primary");
            standby.stop().expect("stop the standby");
            std::fs::write(base.join("port"), primary.port.to_string()).expect("port");
            Cluster::ensure_running(&base)
        })
        .await
        .expect("join")
        .expect("start the standby at the primary's address")
    };
    assert_eq!(standby.port, primary.port, "the standby took the address");
    held.release();
    // The daemon reaches the standby and will not work on it.
    daemon.wait_for_log("is a standby (in recovery)").await;
    let mut promote = server_program("pg_ctl");
    promote.arg("-D").arg(&standby_data).args(["promote", "-w"]);
    run(promote, "pg_ctl promote");
    let promoted_at = chrono::Utc::now();

    let pool = sqlx::PgPool::connect(&db.url).await.expect("reconnect");
    let db = TestDb { pool, ..db };
    // On the new primary: the held run's outcome, no burst, the schedule
    // firing and running again, and edits heard again.
    assert_back(&db, &held, stopped_at, promoted_at, &["late"]).await;
    assert!(
        held.daemon.stop().success(),
        "the daemon stayed up and exits cleanly"
    );
    db.pool.close().await;
}

/// Stops the standby's cluster and removes it, however the test ends.
struct OwnClusterDir(PathBuf);

impl Drop for OwnClusterDir {
    fn drop(&mut self) {
        let _ = Cluster::stop_at(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
