//! A failover of PostgreSQL (SPEC §16): the primary stops, a streaming
//! standby of it comes up at the primary's address still in recovery, and
//! is promoted a moment later. The daemon, holding a running child through
//! it all, refuses the standby's sessions rather than failing writes on
//! them, and once the promoted server answers: writes the child's outcome,
//! fires its schedule again without a burst, and hears edits again.

mod support;

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use connectord::dev::pgcluster::{cluster_dir, Cluster};
use support::{Config, Connector, Daemon, Scratch, TestDb};

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

/// Stops the test's clusters and removes them, however the test ends.
struct Clusters(Vec<PathBuf>);

impl Drop for Clusters {
    fn drop(&mut self) {
        for base in &self.0 {
            let _ = Cluster::stop_at(base);
            let _ = std::fs::remove_dir_all(base);
        }
    }
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
    // Two clusters of the test's own: the primary, and the directory its
    // standby is copied into.
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let primary_base = cluster_dir(&target.join(format!("failover-a-{}", std::process::id())));
    let standby_base = cluster_dir(&target.join(format!("failover-b-{}", std::process::id())));
    let _clusters = Clusters(vec![primary_base.clone(), standby_base.clone()]);
    let primary = {
        let base = primary_base.clone();
        tokio::task::spawn_blocking(move || Cluster::ensure_running(&base))
            .await
            .expect("join")
            .expect("start the primary")
    };
    connectord::dev::create_database(&primary, "failover")
        .await
        .expect("create database");
    let url = primary.url("failover");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .expect("connect");
    connectord::db::migrate(&pool).await.expect("migrate");
    let db = TestDb {
        url: url.clone(),
        pool,
        name: "failover".into(),
    };

    let password = std::fs::read_to_string(primary.base_dir.join("password"))
        .expect("the primary's password")
        .trim()
        .to_owned();
    // The standby: a base backup streaming from the primary, which starts
    // in recovery (`-R`).
    std::fs::create_dir_all(&standby_base).expect("standby base");
    let standby_data = standby_base.join("data");
    std::fs::create_dir_all(&standby_data).expect("standby data");
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&standby_data, std::fs::Permissions::from_mode(0o700)).expect("chmod");
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
    // The standby streams from the primary, on a port of its own until
    // the failover.
    connectord::dev::pgcluster::write_private(&standby_base.join("password"), &password)
        .expect("password");
    let standby = {
        let base = standby_base.clone();
        tokio::task::spawn_blocking(move || Cluster::ensure_running(&base))
            .await
            .expect("join")
            .expect("start the standby")
    };

    let dir = Scratch::new();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/connectors/hostile.sh");
    let config =
        Config::new(&dir.path, "a").connector(Connector::recording("hostile", &script, &dir.path));
    db.exec(
        "insert into connections (id, connector) values ('steady', 'hostile'), ('ticker', 'hostile'),
           ('late', 'hostile');
         insert into schedules (connection_id, cron, overlap) values ('ticker', '* * * * * *', 'queue');",
    )
    .await;
    std::fs::write(dir.path.join("behaviour.steady"), "hold").expect("behaviour");
    for connection in ["ticker", "late"] {
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

    // The failover: the primary stops (sending the standby all it wrote);
    // the standby comes up at its address, still in recovery, and the
    // child finishes meanwhile.
    let stopped_at = chrono::Utc::now();
    let standby = {
        let (primary, standby) = (primary.clone(), standby.clone());
        let base = standby_base.clone();
        let port = primary.port;
        tokio::task::spawn_blocking(move || {
            primary.stop().expect("stop the primary");
            standby.stop().expect("stop the standby");
            std::fs::write(base.join("port"), port.to_string()).expect("port");
            Cluster::ensure_running(&base)
        })
        .await
        .expect("join")
        .expect("start the standby at the primary's address")
    };
    assert_eq!(standby.port, primary.port, "the standby took the address");
    std::fs::remove_file(&hold).expect("release the child");
    // The daemon reaches the standby and will not work on it.
    daemon.wait_for_log("is a standby (in recovery)").await;
    let mut promote = server_program("pg_ctl");
    promote.arg("-D").arg(&standby_data).args(["promote", "-w"]);
    run(promote, "pg_ctl promote");
    let promoted_at = chrono::Utc::now();

    let pool = sqlx::PgPool::connect(&url).await.expect("reconnect");
    let db = TestDb { pool, ..db };
    // The outcome of the run that ended during the failover is written, on
    // the new primary.
    db.wait_until(
        "select count(*) = 1 from runs where connection_id = 'steady' and status = 'succeeded'",
    )
    .await;
    // The schedule fires again, and its commands run.
    db.wait_until(&format!(
        "select count(*) >= 2 from runs where connection_id = 'ticker' and status = 'succeeded'
         and scheduled_for > '{promoted_at}'"
    ))
    .await;
    // It listens again: a schedule added now is heard (the periodic
    // re-read is minutes away).
    daemon
        .wait_for_log("listening for notifications again")
        .await;
    db.exec("insert into schedules (connection_id, cron) values ('late', '* * * * * *')")
        .await;
    db.wait_until("select count(*) >= 1 from run_commands where connection_id = 'late'")
        .await;
    // The ticks of the failover were not replayed as a burst.
    let during: i64 = db
        .scalar(&format!(
            "select count(*) from run_commands where connection_id = 'ticker'
             and scheduled_for > '{}' and scheduled_for < '{}'",
            stopped_at + chrono::Duration::seconds(1),
            promoted_at - chrono::Duration::seconds(1),
        ))
        .await;
    assert!(
        during <= 1,
        "{during} ticks from the failover were replayed"
    );
    let lost: i64 = db
        .scalar("select count(*) from runs where failure_kind = 'lost'")
        .await;
    assert_eq!(lost, 0, "the daemon's own live run is never lost");
    assert!(
        daemon.stop().success(),
        "the daemon stayed up and exits cleanly"
    );

    db.pool.close().await;
}
