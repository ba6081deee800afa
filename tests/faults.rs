//! Faults, each a tested behaviour: SIGTERM and `kill -9` of the daemon,
//! PostgreSQL going away, floods of output, overlapping ticks, bad input,
//! and several daemons racing for the same work.

#![allow(clippy::type_complexity)]

mod support;

use std::path::Path;
use std::time::Duration;

use support::{cli, recorded_env, Config, Connector, Daemon, Scratch, TestDb};

fn hostile() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/connectors/hostile.sh")
        .display()
        .to_string()
}

/// A config with one `hostile` connector whose behaviour is chosen per
/// connection by a file, plus `missing` and `not-executable` connectors.
fn config(dir: &Path, instance: &str) -> Config {
    let not_executable = dir.join("not-executable");
    std::fs::write(&not_executable, "#!/bin/sh\nexit 0\n").expect("write file");
    let scripted = |name: &str, timeout: &str| {
        Connector::recording(name, hostile(), dir)
            .timeout(timeout)
            .retry(3, "100ms", "1s")
    };
    let mut missing_retry = toml::Table::new();
    missing_retry.insert("max_attempts".into(), 2.into());
    missing_retry.insert("backoff".into(), "100ms".into());
    Config::new(dir, instance)
        .connector(scripted("hostile", "2m"))
        .connector(scripted("hasty", "1s"))
        .connector(Connector::new("missing", "/nonexistent/connector").set("retry", missing_retry))
        .connector(Connector::new("not-executable", &not_executable).no_retry())
}

/// Adds a connection of the hostile connector with a behaviour.
async fn connection(db: &TestDb, dir: &Path, id: &str, behaviour: &str) {
    db.exec(&format!(
        "insert into connections (id, connector) values ('{id}', 'hostile')"
    ))
    .await;
    behave(dir, id, behaviour);
}

fn behave(dir: &Path, id: &str, behaviour: &str) {
    std::fs::write(dir.join(format!("behaviour.{id}")), behaviour).expect("write behaviour");
}

fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // An orphan killed after its parent died may stay a zombie where the
        // machine's init does not reap; it runs no code.
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

async fn wait_for_gone(pid: i32) {
    let deadline = tokio::time::Instant::now() + support::PATIENCE;
    while !process_gone(pid) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "process {pid} still runs"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The host pid of run `run_id`'s connector, from the pid it recorded.
fn child_pid(dir: &Path, run_id: i64) -> i32 {
    let inner = recorded_env(dir, run_id)["PID"].parse().expect("pid");
    support::host_pid(dir, run_id, inner).expect("the connector's process")
}

async fn wait_for_child(db: &TestDb, dir: &Path, connection: &str) -> (i64, i32) {
    db.wait_until(&format!(
        "select count(*) = 1 from runs where connection_id = '{connection}' and status = 'running' and pid is not null"
    ))
    .await;
    let run_id: i64 = db
        .scalar(&format!(
            "select id from runs where connection_id = '{connection}' and status = 'running'"
        ))
        .await;
    (run_id, started_child(dir, run_id).await)
}

/// Waits until run `run_id`'s child has recorded its environment (it has
/// started), and returns its pid.
async fn started_child(dir: &Path, run_id: i64) -> i32 {
    let path = dir.join(format!("{run_id}.env"));
    let deadline = tokio::time::Instant::now() + support::PATIENCE;
    while !path.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "child never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child_pid(dir, run_id)
}

/// SIGTERM mid-run: claiming stops, the child gets `shutdown_grace`, then
/// SIGTERM; the run is `interrupted`, its command re-queued without using
/// an attempt, and the daemon exits 0. A second daemon runs the command.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_interrupts_and_requeues() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    connection(&db, &dir.path, "hung", "hang").await;
    let daemon = Daemon::start(&db, &dir.path, &config(&dir.path, "a"), &[]).await;
    db.exec("insert into run_commands (connection_id) values ('hung')")
        .await;
    let (run_id, pid) = wait_for_child(&db, &dir.path, "hung").await;
    let status = daemon.stop();
    assert!(status.success(), "exit status {status:?}");
    wait_for_gone(pid).await;
    let (run_status, kind): (String, Option<String>) = sqlx::query_as(&format!(
        "select status, failure_kind from runs where id = {run_id}"
    ))
    .fetch_one(&db.pool)
    .await
    .expect("run");
    assert_eq!(
        (run_status.as_str(), kind.as_deref()),
        ("failed", Some("interrupted"))
    );
    let (command_status, attempt, commands): (String, i32, i64) =
        sqlx::query_as("select status, attempt, count(*) over () from run_commands")
            .fetch_one(&db.pool)
            .await
            .expect("command");
    assert_eq!(
        (command_status.as_str(), attempt, commands),
        ("pending", 1, 1)
    );

    behave(&dir.path, "hung", "ok");
    let _next = Daemon::start(&db, &dir.path, &config(&dir.path, "b"), &[]).await;
    db.wait_until("select count(*) = 1 from runs where status = 'succeeded' and attempt = 1 and instance_id = 'b'")
        .await;
}

/// A child that finishes inside `shutdown_grace` is let finish.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_a_running_child_finish_within_grace() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    connection(&db, &dir.path, "held", "hold").await;
    let hold = dir.path.join("hold.held");
    std::fs::write(&hold, "").expect("hold file");
    let daemon = Daemon::start(
        &db,
        &dir.path,
        &config(&dir.path, "a").daemon("shutdown_grace", "1m"),
        &[],
    )
    .await;
    db.exec("insert into run_commands (connection_id) values ('held')")
        .await;
    wait_for_child(&db, &dir.path, "held").await;
    // SIGTERM while the child runs, then let the child finish.
    // SAFETY: kill(2) on the daemon we started.
    unsafe {
        libc::kill(daemon.pid() as i32, libc::SIGTERM);
    }
    std::fs::remove_file(&hold).expect("release the child");
    assert!(daemon.stop().success());
    let status: String = db.scalar("select status from runs").await;
    assert_eq!(status, "succeeded");
}

/// `kill -9` of the daemon: its child dies with it, and another daemon
/// marks the run `lost` once the lease expires and retries it.
#[tokio::test(flavor = "multi_thread")]
async fn kill_9_loses_the_run_and_another_daemon_retries_it() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    connection(&db, &dir.path, "victim", "hang").await;
    let a = Daemon::start(&db, &dir.path, &config(&dir.path, "a"), &[]).await;
    db.exec("insert into run_commands (connection_id) values ('victim')")
        .await;
    let (run_id, pid) = wait_for_child(&db, &dir.path, "victim").await;
    // SAFETY: kill(2) on the daemon we started.
    unsafe {
        libc::kill(a.pid() as i32, libc::SIGKILL);
    }
    wait_for_gone(pid).await;
    drop(a);

    behave(&dir.path, "victim", "ok");
    let b = Daemon::start(&db, &dir.path, &config(&dir.path, "b"), &[]).await;
    db.wait_until(&format!(
        "select status = 'failed' and failure_kind = 'lost' from runs where id = {run_id}"
    ))
    .await;
    db.wait_until(
        "select count(*) = 1 from runs where status = 'succeeded' and attempt = 2 and trigger = 'retry' and instance_id = 'b'",
    )
    .await;
    let parent: i64 = db
        .scalar("select parent_run_id from run_commands where trigger = 'retry'")
        .await;
    assert_eq!(parent, run_id);
    assert!(b.logs().contains("run.lost"));
}

/// Floods of output: 200 MiB without a newline, a million lines and
/// invalid UTF-8 leave the daemon's peak memory where it was, and the log
/// is rate-limited with a count of what was dropped.
#[tokio::test(flavor = "multi_thread")]
async fn output_floods_do_not_grow_memory() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    connection(&db, &dir.path, "bytes", "flood-bytes").await;
    connection(&db, &dir.path, "lines", "flood-lines").await;
    connection(&db, &dir.path, "utf8", "invalid-utf8").await;
    connection(&db, &dir.path, "chatty", "chatty").await;
    let daemon = Daemon::start(&db, &dir.path, &config(&dir.path, "a"), &[]).await;
    // Warm up with one ordinary run so the baseline includes a launch.
    db.exec("insert into run_commands (connection_id) values ('utf8'), ('chatty')")
        .await;
    db.wait_until("select count(*) = 2 from runs where status = 'succeeded'")
        .await;
    let before = peak_rss_kib(daemon.pid());
    db.exec("insert into run_commands (connection_id) values ('bytes'), ('lines')")
        .await;
    db.wait_until("select count(*) = 4 from runs where status = 'succeeded'")
        .await;
    let after = peak_rss_kib(daemon.pid());
    assert!(
        after <= before + 8 * 1024,
        "peak RSS grew from {before} KiB to {after} KiB"
    );
    let logs = daemon.logs();
    let flood_lines = logs
        .lines()
        .filter(|l| l.contains("a line of output"))
        .count();
    assert!(flood_lines < 2_000, "{flood_lines} flood lines were logged");
    assert!(
        logs.contains("dropped by the log rate limit"),
        "drops are counted"
    );
    assert!(logs.contains("bad"), "invalid UTF-8 is logged lossily");
    let records: Option<i64> = db
        .scalar("select records from runs where connection_id = 'chatty'")
        .await;
    assert_eq!(
        records,
        Some(42),
        "a malformed progress line does not overwrite the count"
    );
    assert!(
        logs.contains("wrong shape"),
        "malformed messages are reported"
    );
    assert!(logs.contains("from the connector"));
    assert!(logs.contains("to stderr"));
}

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

/// `overlap = 'skip'` records skipped runs while a run is going;
/// `overlap = 'queue'` waits its turn; runs of one connection never overlap.
#[tokio::test(flavor = "multi_thread")]
async fn overlap_skip_and_queue() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    connection(&db, &dir.path, "skipper", "hold").await;
    connection(&db, &dir.path, "queuer", "hold").await;
    std::fs::write(dir.path.join("hold.skipper"), "").expect("hold");
    std::fs::write(dir.path.join("hold.queuer"), "").expect("hold");
    db.exec(
        "insert into schedules (connection_id, cron, overlap) values
            ('skipper', '* * * * * *', 'skip'), ('queuer', '* * * * * *', 'queue')",
    )
    .await;
    let _daemon = Daemon::start(&db, &dir.path, &config(&dir.path, "a"), &[]).await;
    db.wait_until(
        "select count(*) >= 2 from runs where connection_id = 'skipper' and status = 'skipped' and failure_kind = 'overlap'",
    )
    .await;
    db.wait_until("select count(*) >= 2 from run_commands where connection_id = 'queuer' and status = 'pending'")
        .await;
    let skipped_spawned: i64 = db
        .scalar("select count(*) from runs where status = 'skipped' and (pid is not null or started_at is not null)")
        .await;
    assert_eq!(skipped_spawned, 0);
    let queuer_runs: i64 = db
        .scalar("select count(*) from runs where connection_id = 'queuer'")
        .await;
    assert_eq!(
        queuer_runs, 1,
        "queued ticks wait instead of running or skipping"
    );
    // Let the children go: queued ticks then run one after another.
    std::fs::remove_file(dir.path.join("hold.queuer")).expect("release");
    std::fs::remove_file(dir.path.join("hold.skipper")).expect("release");
    db.wait_until(
        "select count(*) >= 3 from runs where connection_id = 'queuer' and status = 'succeeded'",
    )
    .await;
    let overlapping: i64 = db
        .scalar(
            "select count(*) from runs a join runs b
               on a.connection_id = b.connection_id and a.id < b.id
              and a.started_at < coalesce(b.finished_at, now()) and b.started_at < coalesce(a.finished_at, now())",
        )
        .await;
    assert_eq!(overlapping, 0);
}

/// Operators write `run_commands` (and sometimes `runs`) with plain SQL: a
/// value outside the spec's vocabularies is refused by the database, not
/// stored for the daemon to trip over.
#[tokio::test(flavor = "multi_thread")]
async fn the_schema_refuses_values_outside_its_vocabularies() {
    let db = TestDb::new().await;
    db.exec("insert into connections (id, connector) values ('c', 'hostile')")
        .await;
    let refused = [
        "insert into run_commands (connection_id, trigger) values ('c', 'cron')",
        "insert into run_commands (connection_id, status) values ('c', 'queued')",
        "insert into run_commands (connection_id, attempt) values ('c', 0)",
        "insert into runs (connection_id, trigger, status) values ('c', 'cron', 'failed')",
        "insert into runs (connection_id, trigger, status) values ('c', 'manual', 'ok')",
        "insert into runs (connection_id, trigger, status, credential_source)
         values ('c', 'manual', 'failed', 'vault')",
    ];
    for sql in refused {
        let result = sqlx::query(sql).execute(&db.pool).await;
        assert!(result.is_err(), "accepted: {sql}");
    }
    // A connection's run slot is one claimed command holding a run id:
    // a second is refused, a claim without a run id (a skip) is not.
    db.exec(
        "insert into run_commands (connection_id, status, claimed_by, run_id)
         values ('c', 'claimed', 'a', nextval('runs_id_seq')), ('c', 'claimed', 'a', null)",
    )
    .await;
    let second_slot = sqlx::query(
        "insert into run_commands (connection_id, status, claimed_by, run_id)
         values ('c', 'claimed', 'b', nextval('runs_id_seq'))",
    )
    .execute(&db.pool)
    .await;
    assert!(second_slot.is_err(), "two run slots for one connection");
    db.exec("delete from run_commands").await;
    // The same statements with values from the spec are accepted.
    db.exec(
        "insert into run_commands (connection_id, trigger, status, attempt)
         values ('c', 'retry', 'done', 2);
         insert into runs (connection_id, trigger, status, credential_source)
         values ('c', 'scheduled', 'skipped', 'none');",
    )
    .await;
    let typed: (String, String, i32) =
        sqlx::query_as("select trigger, status, attempt from run_commands")
            .fetch_one(&db.pool)
            .await
            .expect("read back as text and integer");
    assert_eq!(typed, ("retry".into(), "done".into(), 2));
}

/// Each bad input gets a clear, typed outcome while everyone else is
/// served: a missing program and a non-executable one (`spawn_failed`,
/// retried), a connection deleted while its command waits
/// (`connection_missing`), and config errors naming file and line.
#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_typed_outcomes() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    db.exec(
        "insert into connections (id, connector) values ('gone', 'missing'), ('noexec', 'not-executable')",
    )
    .await;
    connection(&db, &dir.path, "fine", "ok").await;
    connection(&db, &dir.path, "doomed", "ok").await;
    let _daemon = Daemon::start(&db, &dir.path, &config(&dir.path, "a"), &[]).await;
    // A command for a connection that is deleted before it is claimed: hold
    // it back with not_before, delete the connection, then release it.
    db.exec(
        "insert into run_commands (connection_id, not_before) values ('doomed', now() + interval '1 hour');
         delete from connections where id = 'doomed';
         update run_commands set not_before = now() where connection_id = 'doomed';
         insert into run_commands (connection_id) values ('gone'), ('noexec'), ('fine');",
    )
    .await;
    db.wait_until(
        "select count(*) = 1 from runs where connection_id = 'fine' and status = 'succeeded'",
    )
    .await;
    db.wait_until("select count(*) = 2 from runs where connection_id = 'gone'")
        .await;
    let gone: Vec<(String, Option<String>, Option<String>, i32)> = sqlx::query_as(
        "select status, failure_kind, failure_detail, attempt from runs where connection_id = 'gone' order by id",
    )
    .fetch_all(&db.pool)
    .await
    .expect("runs");
    for (i, (status, kind, detail, attempt)) in gone.iter().enumerate() {
        assert_eq!(
            (status.as_str(), kind.as_deref()),
            ("failed", Some("spawn_failed"))
        );
        assert!(
            detail
                .as_deref()
                .is_some_and(|d| d.contains("/nonexistent/connector")),
            "{detail:?}"
        );
        assert_eq!(*attempt, i as i32 + 1);
    }
    db.wait_until("select count(*) = 1 from runs where connection_id = 'noexec' and failure_kind = 'spawn_failed'")
        .await;
    db.wait_until(
        "select count(*) = 1 from runs where connection_id = 'doomed' and status = 'refused' and failure_kind = 'connection_missing'",
    )
    .await;

    let bad = dir.path.join("bad.toml");
    std::fs::write(
        &bad,
        "[daemon]\nlease = \"30s\"\nmax_concurrent_runs = \"many\"\n",
    )
    .expect("write");
    let (code, _, stderr) = cli(&db, Some(&bad), &["check"], "");
    assert_eq!(code, 1);
    assert!(
        stderr.contains("bad.toml") && stderr.contains("line 3"),
        "{stderr}"
    );
    let (code, _, stderr) = cli(&db, Some(&bad), &["run"], "");
    assert_eq!(code, 1, "the daemon refuses a bad config: {stderr}");
}

/// A key file of the wrong length stops start-up with a clear error.
#[tokio::test(flavor = "multi_thread")]
async fn a_short_key_file_stops_start_up() {
    use std::os::unix::fs::PermissionsExt;
    let db = TestDb::new().await;
    let dir = Scratch::new();
    let keys = dir.path.join("keys");
    std::fs::create_dir_all(&keys).expect("keys dir");
    let key = keys.join("k1.key");
    std::fs::write(&key, [7u8; 17]).expect("write key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let config_path = dir.path.join("c.toml");
    config(&dir.path, "a").write(&config_path);
    let (code, _, stderr) = cli(&db, Some(&config_path), &["run"], "");
    assert_eq!(code, 1);
    assert!(
        stderr.contains("k1.key") && stderr.contains("17 bytes"),
        "{stderr}"
    );
}

/// Three daemons on one database, 30 every-second schedules: no tick fires
/// twice, none is missed, and runs of one connection never overlap.
#[tokio::test(flavor = "multi_thread")]
async fn three_daemons_race_without_duplicates_or_gaps() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    for i in 0..30 {
        connection(&db, &dir.path, &format!("c{i:02}"), "ok").await;
    }
    db.exec("insert into schedules (connection_id, cron, overlap) select id, '* * * * * *', 'queue' from connections")
        .await;
    let daemons = [
        Daemon::start(&db, &dir.path, &config(&dir.path, "a"), &[]).await,
        Daemon::start(&db, &dir.path, &config(&dir.path, "b"), &[]).await,
        Daemon::start(&db, &dir.path, &config(&dir.path, "c"), &[]).await,
    ];
    // Let every schedule fire at least six times while all three run.
    db.wait_until("select coalesce(min(n) >= 6 and count(*) = 30, false) from (select count(*) n from run_commands group by schedule_id) t")
        .await;
    for daemon in daemons {
        assert!(daemon.stop().success());
    }
    let duplicates: i64 = db
        .scalar("select count(*) from (select 1 from runs group by schedule_id, scheduled_for having count(*) > 1) d")
        .await;
    assert_eq!(duplicates, 0, "a tick ran twice");
    let gaps: i64 = db
        .scalar(
            "select count(*) from (
                select schedule_id,
                       extract(epoch from max(scheduled_for) - min(scheduled_for))::bigint + 1 as span,
                       count(distinct scheduled_for) as fired
                from run_commands group by schedule_id) t
             where fired <> span",
        )
        .await;
    assert_eq!(gaps, 0, "a tick was missed");
    let overlapping: i64 = db
        .scalar(
            "select count(*) from runs a join runs b
               on a.connection_id = b.connection_id and a.id < b.id
              and a.started_at < b.finished_at and b.started_at < a.finished_at",
        )
        .await;
    assert_eq!(overlapping, 0);
    let instances: i64 = db
        .scalar("select count(distinct instance_id) from runs")
        .await;
    assert!(instances >= 2, "work is shared between daemons");
}

/// Two daemons claim commands of one free connection at the same moment:
/// the database gives the run slot to one claim. The other fails whole,
/// leaves its command pending, and is told it lost a race (so it claims
/// again at once instead of backing off as from an outage); its next claim
/// sees the connection busy.
#[tokio::test(flavor = "multi_thread")]
async fn a_claim_that_loses_the_slot_race_claims_nothing() {
    use connectord::queue;
    let db = TestDb::new().await;
    db.exec("insert into connections (id, connector) values ('c', 'hostile')")
        .await;
    let first: i64 = db
        .scalar("insert into run_commands (connection_id) values ('c') returning id")
        .await;
    let second: i64 = db
        .scalar("insert into run_commands (connection_id) values ('c') returning id")
        .await;
    // Daemon a has claimed the first command and not yet committed.
    let mut a = db.pool.begin().await.expect("begin");
    sqlx::query(
        "update run_commands set status = 'claimed', claimed_by = 'a', claimed_at = now(),
                                 run_id = nextval('runs_id_seq')
         where id = $1",
    )
    .bind(first)
    .execute(&mut *a)
    .await
    .expect("claim of a");
    // Daemon b's claim sees the connection free and waits on a's slot.
    let known = vec!["hostile".to_owned()];
    let mut b = connectord::db::claim_session(&db.pool)
        .await
        .expect("session");
    let racing = {
        let known = known.clone();
        tokio::spawn(async move {
            let result = queue::claim(&mut b, "b", 8, &[], &known).await;
            (b, result.map(|c| c.len()))
        })
    };
    db.wait_until(
        "select count(*) = 1 from pg_stat_activity
         where datname = current_database() and wait_event_type = 'Lock'",
    )
    .await;
    a.commit().await.expect("commit a");
    let (mut b, result) = racing.await.expect("join");
    let error = result.expect_err("two slots for one connection");
    assert_eq!(
        connectord::db::Failure::of(&error),
        connectord::db::Failure::LostSlotRace,
        "{error}"
    );
    let (status, run_id): (String, Option<i64>) =
        sqlx::query_as("select status, run_id from run_commands where id = $1")
            .bind(second)
            .fetch_one(&db.pool)
            .await
            .expect("second command");
    assert_eq!((status.as_str(), run_id), ("pending", None));
    let again = queue::claim(&mut b, "b", 8, &[], &known)
        .await
        .expect("claim again");
    assert!(again.is_empty(), "the connection is busy");
}

/// A daemon that died between its claim and its child's run row left the
/// connection's slot taken with nothing recorded: once the claim is older
/// than two leases it is recorded as `lost` under the run id it reserved,
/// the retry policy applies, and the connection's queue moves on.
#[tokio::test(flavor = "multi_thread")]
async fn a_claim_left_by_a_dead_daemon_is_lost_and_retried() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    connection(&db, &dir.path, "orphaned", "ok").await;
    let (orphan, reserved): (i64, i64) = sqlx::query_as(
        "insert into run_commands (connection_id, status, claimed_by, claimed_at, run_id)
         values ('orphaned', 'claimed', 'gone', now() - interval '1 hour', nextval('runs_id_seq'))
         returning id, run_id",
    )
    .fetch_one(&db.pool)
    .await
    .expect("orphaned claim");
    db.exec("insert into run_commands (connection_id) values ('orphaned')")
        .await;
    let daemon = Daemon::start(&db, &dir.path, &config(&dir.path, "a"), &[]).await;
    db.wait_until("select count(*) = 2 from runs where status = 'succeeded'")
        .await;
    assert!(daemon.stop().success());
    let lost: (i64, String, String, Option<String>) = sqlx::query_as(
        "select command_id, status, failure_kind, instance_id from runs where id = $1",
    )
    .bind(reserved)
    .fetch_one(&db.pool)
    .await
    .expect("the reserved run id is recorded");
    assert_eq!(
        (lost.0, lost.1.as_str(), lost.2.as_str(), lost.3.as_deref()),
        (orphan, "failed", "lost", Some("gone"))
    );
    let retried: (i32, String) = sqlx::query_as(
        "select r.attempt, r.status from run_commands c join runs r on r.command_id = c.id
         where c.parent_run_id = $1 and c.trigger = 'retry'",
    )
    .bind(reserved)
    .fetch_one(&db.pool)
    .await
    .expect("a retry ran");
    assert_eq!((retried.0, retried.1.as_str()), (2, "succeeded"));
    let open: i64 = db
        .scalar("select count(*) from run_commands where status <> 'done'")
        .await;
    assert_eq!(open, 0);
}

/// A daemon whose start write is held up past two leases: another daemon
/// records the claim as `lost` and retries it. When the held write finally
/// goes through, it finds the run decided, and its daemon stops the child
/// instead of running it beside the retry.
#[tokio::test(flavor = "multi_thread")]
async fn a_start_recorded_too_late_stops_its_child() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    connection(&db, &dir.path, "late", "progress-hold").await;
    std::fs::write(dir.path.join("hold.late"), "").expect("hold");
    // The first running row inserted waits for a lock the test holds until
    // the other daemon has settled the run.
    let mut gate = db.pool.acquire().await.expect("connection");
    sqlx::query("select pg_advisory_lock(7001)")
        .execute(&mut *gate)
        .await
        .expect("hold the gate");
    db.exec(
        "create table delay_once (armed boolean);
         insert into delay_once values (true);
         create function delay_first_start() returns trigger language plpgsql as $$
         begin
             update delay_once set armed = false where armed;
             if found then perform pg_advisory_xact_lock(7001); end if;
             return new;
         end $$;
         create trigger delay_first_start before insert on runs
             for each row when (new.status = 'running') execute function delay_first_start();",
    )
    .await;
    let fast_lease = |instance| config(&dir.path, instance).daemon("lease", "1s");
    let a = Daemon::start(&db, &dir.path, &fast_lease("a"), &[]).await;
    db.exec("insert into run_commands (connection_id) values ('late')")
        .await;
    db.wait_until(
        "select count(*) = 1 from run_commands where status = 'claimed' and run_id is not null",
    )
    .await;
    let reserved: i64 = db
        .scalar("select run_id from run_commands where status = 'claimed'")
        .await;
    let pid = started_child(&dir.path, reserved).await;
    let b = Daemon::start(&db, &dir.path, &fast_lease("b"), &[]).await;
    db.wait_until(&format!(
        "select count(*) = 1 from runs where id = {reserved} and failure_kind = 'lost'"
    ))
    .await;
    sqlx::query("select pg_advisory_unlock(7001)")
        .execute(&mut *gate)
        .await
        .expect("open the gate");
    wait_for_gone(pid).await;
    assert!(a.logs().contains("slot was given to another daemon"));
    let (status, kind, owner): (String, String, Option<String>) =
        sqlx::query_as("select status, failure_kind, instance_id from runs where id = $1")
            .bind(reserved)
            .fetch_one(&db.pool)
            .await
            .expect("the reserved run");
    assert_eq!(
        (status.as_str(), kind.as_str(), owner.as_deref()),
        ("failed", "lost", Some("a")),
        "the rescuer's verdict stands"
    );
    std::fs::remove_file(dir.path.join("hold.late")).expect("release");
    db.wait_until("select count(*) = 1 from runs where status = 'succeeded' and attempt = 2")
        .await;
    assert!(a.stop().success());
    assert!(b.stop().success());
}

/// A child's first progress count arrives before its run row is written
/// (here, the database takes half a second over it): the count is kept on
/// the row once it exists, not dropped.
#[tokio::test(flavor = "multi_thread")]
async fn progress_reported_before_the_run_row_exists_is_kept() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    connection(&db, &dir.path, "eager", "progress-hold").await;
    std::fs::write(dir.path.join("hold.eager"), "").expect("hold");
    db.exec(
        "create function slow_start() returns trigger language plpgsql as $$
         begin perform pg_sleep(0.5); return new; end $$;
         create trigger slow_start before insert on runs
             for each row when (new.status = 'running') execute function slow_start();",
    )
    .await;
    let daemon = Daemon::start(&db, &dir.path, &config(&dir.path, "a"), &[]).await;
    db.exec("insert into run_commands (connection_id) values ('eager')")
        .await;
    db.wait_until(
        "select coalesce(bool_or(records = 7), false) from runs
         where connection_id = 'eager' and status = 'running'",
    )
    .await;
    std::fs::remove_file(dir.path.join("hold.eager")).expect("release");
    db.wait_until("select count(*) = 1 from runs where status = 'succeeded' and records = 7")
        .await;
    assert!(daemon.stop().success());
}

/// A child that asks for the owner and then runs past its timeout is
/// `interaction_required`, not retried: another attempt cannot succeed
/// before the owner acts.
#[tokio::test(flavor = "multi_thread")]
async fn an_interaction_then_a_timeout_is_not_retried() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    db.exec("insert into connections (id, connector) values ('asker', 'hasty')")
        .await;
    behave(&dir.path, "asker", "ask-then-hang");
    let _daemon = Daemon::start(&db, &dir.path, &config(&dir.path, "a"), &[]).await;
    db.exec("insert into run_commands (connection_id) values ('asker')")
        .await;
    db.wait_until("select count(*) = 1 from runs where status = 'failed'")
        .await;
    let kind: String = db.scalar("select failure_kind from runs").await;
    assert_eq!(kind, "interaction_required");
    let retries: i64 = db
        .scalar("select count(*) from run_commands where trigger = 'retry'")
        .await;
    assert_eq!(retries, 0);
    let open: i64 = db
        .scalar("select count(*) from interactions where status = 'open' and kind = 'credentials_required'")
        .await;
    assert_eq!(open, 1);
}

/// Unsandboxed (`[sandbox] enabled = false`), a process that escapes the
/// child's group (a new session) and holds its output open cannot keep
/// the run from ending, though it outlives it. (In the sandbox it dies
/// with the run: tests/sandbox.rs.)
#[tokio::test(flavor = "multi_thread")]
async fn an_escaped_grandchild_does_not_hold_the_run() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    connection(&db, &dir.path, "escaper", "escape").await;
    let config = config(&dir.path, "a").set("sandbox", "enabled", false);
    let _daemon = Daemon::start(&db, &dir.path, &config, &[]).await;
    db.exec("insert into run_commands (connection_id) values ('escaper')")
        .await;
    db.wait_until("select count(*) = 1 from runs where status = 'succeeded'")
        .await;
    let escaped: i32 = std::fs::read_to_string(dir.path.join("escaped.pid"))
        .expect("escaped pid")
        .trim()
        .parse()
        .expect("a pid");
    assert!(
        !process_gone(escaped),
        "the escaped process still runs; the run ended anyway"
    );
    // SAFETY: kill(2) on the stray process this test's child started.
    unsafe {
        libc::kill(escaped, libc::SIGKILL);
    }
}

/// A run whose lease another daemon took over (as after a partition) has
/// its child stopped: two runs of one connection never overlap.
#[tokio::test(flavor = "multi_thread")]
async fn a_superseded_run_stops_its_child() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    connection(&db, &dir.path, "contested", "progress-hold").await;
    std::fs::write(dir.path.join("hold.contested"), "").expect("hold");
    let daemon = Daemon::start(&db, &dir.path, &config(&dir.path, "a"), &[]).await;
    db.exec("insert into run_commands (connection_id) values ('contested')")
        .await;
    let (run_id, pid) = wait_for_child(&db, &dir.path, "contested").await;
    // The latest progress count is kept on the run while it goes.
    db.wait_until(&format!(
        "select coalesce(records = 7, false) from runs where id = {run_id}"
    ))
    .await;
    // Another daemon rescues the run, as it would after our lease expired.
    db.exec(&format!(
        "update runs set status = 'failed', failure_kind = 'lost', finished_at = now() where id = {run_id}"
    ))
    .await;
    wait_for_gone(pid).await;
    assert!(
        dir.path.join("hold.contested").exists(),
        "the child was stopped, not released"
    );
    let (status, kind): (String, String) = sqlx::query_as(&format!(
        "select status, failure_kind from runs where id = {run_id}"
    ))
    .fetch_one(&db.pool)
    .await
    .expect("run");
    assert_eq!(
        (status.as_str(), kind.as_str()),
        ("failed", "lost"),
        "the rescuer's verdict stands"
    );
    assert!(daemon.logs().contains("took this run over"));
}

/// A child cannot forge log lines or steer the operator's terminal: a
/// newline inside a message, an unknown `type` with a newline, ESC, BEL, CR
/// and a bidi override on stdout and stderr are all escaped, in every log
/// format, and each stays on the daemon's own line.
#[tokio::test(flavor = "multi_thread")]
async fn a_child_cannot_forge_log_lines_in_any_format() {
    for format in ["compact", "pretty", "json"] {
        let db = TestDb::new().await;
        let dir = Scratch::new();
        connection(&db, &dir.path, "forger", "forge").await;
        let daemon =
            Daemon::start_with_format(&db, &dir.path, &config(&dir.path, "a"), &[], format).await;
        db.exec("insert into run_commands (connection_id) values ('forger')")
            .await;
        db.wait_until("select count(*) = 1 from runs where status = 'succeeded'")
            .await;
        // Every connector line is logged before the run's outcome; the
        // test's reader of the daemon's stderr may still be behind.
        let deadline = tokio::time::Instant::now() + support::PATIENCE;
        let logs = loop {
            let logs = daemon.logs();
            if logs.contains("FORGED-4") && logs.contains("FORGED-3") {
                break logs;
            }
            assert!(tokio::time::Instant::now() < deadline, "{format}: {logs}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        for forged in ["FORGED-1", "FORGED-2", "FORGED-3", "FORGED-4"] {
            let lines: Vec<&str> = logs.lines().filter(|l| l.contains(forged)).collect();
            assert!(
                !lines.is_empty(),
                "{format}: {forged} was not logged:\n{logs}"
            );
            for line in lines {
                assert!(
                    line.contains("connector"),
                    "{format}: {forged} starts a line of its own: {line:?}"
                );
            }
        }
        for raw in ["\u{1b}[2K", "\u{1b}[31m", "\u{7}", "\r", "\u{202e}"] {
            assert!(!logs.contains(raw), "{format}: {raw:?} reached the log raw");
        }
    }
}

/// What a child (or a hand-written row) put in the tables cannot steer the
/// operator's terminal: `interactions`, `runs`, `connections list` and
/// `schedules list` print control characters escaped, one row per line.
#[tokio::test(flavor = "multi_thread")]
async fn the_cli_prints_outside_text_escaped() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    let config = dir.path.join("cli.toml");
    self::config(&dir.path, "a").write(&config);
    db.exec(
        "insert into connections (id, connector, owner) values ('esc-1', 'hostile', E'own\\033[2Ker');
         insert into interactions (connection_id, run_id, kind, message)
         values ('esc-1', 1, E'credentials_required\\r\\033[2Kresolved', E'log in\\nFAKE 2 esc-1 credentials_required resolved\\007');
         insert into schedules (connection_id, cron) values ('esc-1', E'* * * * *\\033[A');
         insert into runs (connection_id, connector, trigger, attempt, status, failure_kind, failure_detail)
         values ('esc-1', 'hostile', 'manual', 1, 'failed', E'exit\\033[1A', 'x');",
    )
    .await;
    for args in [
        &["interactions"][..],
        &["runs"],
        &["connections", "list"],
        &["schedules", "list"],
    ] {
        let (code, out, err) = support::cli(&db, Some(&config), args, "");
        assert_eq!(code, 0, "{args:?}: {out}{err}");
        for raw in ['\u{1b}', '\u{7}', '\r'] {
            assert!(!out.contains(raw), "{args:?} printed {raw:?} raw: {out:?}");
        }
        assert!(
            !out.contains("\nFAKE"),
            "{args:?} printed a forged row: {out}"
        );
        // A header and one line per row.
        assert_eq!(out.lines().count(), 2, "{args:?}: {out}");
    }
}

/// A child that floods interactions: kinds SPEC does not name open
/// nothing, messages are cut, a run opens at most its limit, and the
/// excess is reported once and kept in the run's detail.
#[tokio::test(flavor = "multi_thread")]
async fn an_interaction_flood_is_bounded_and_reported() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    connection(&db, &dir.path, "flooder", "ask-flood").await;
    let daemon = Daemon::start(&db, &dir.path, &config(&dir.path, "a"), &[]).await;
    db.exec("insert into run_commands (connection_id) values ('flooder')")
        .await;
    db.wait_until("select count(*) = 1 from runs where status = 'failed'")
        .await;
    let (kind, detail): (String, String) =
        sqlx::query_as("select failure_kind, failure_detail from runs")
            .fetch_one(&db.pool)
            .await
            .expect("run");
    assert_eq!(kind, "interaction_required");
    assert!(
        detail.contains("1992 interactions past the limit of 8"),
        "{detail}"
    );
    assert!(detail.contains("cut to 1024 bytes"), "{detail}");
    let rows: Vec<(String, i32)> =
        sqlx::query_as("select kind, length(message) from interactions order by id")
            .fetch_all(&db.pool)
            .await
            .expect("interactions");
    assert_eq!(rows, vec![("credentials_required".to_owned(), 1024)]);
    let logs = daemon.logs();
    assert_eq!(
        logs.matches("interactions_over_limit").count(),
        1,
        "reported once:\n{logs}"
    );
    assert!(logs.contains("unknown variant"), "{logs}");
}

/// With `interactions` locked by another session, a child that reports
/// progress and asks for its owner still times out on time: the run is
/// recorded while the lock is held, and its interaction lands once the
/// lock is gone.
#[tokio::test(flavor = "multi_thread")]
async fn a_locked_table_does_not_stall_a_timeout() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    db.exec("insert into connections (id, connector) values ('stalled', 'hasty')")
        .await;
    behave(&dir.path, "stalled", "report-then-hang");
    let _daemon = Daemon::start(&db, &dir.path, &config(&dir.path, "a"), &[]).await;
    let mut lock = db.pool.begin().await.expect("begin");
    sqlx::query("lock table interactions in access exclusive mode")
        .execute(&mut *lock)
        .await
        .expect("lock");
    db.exec("insert into run_commands (connection_id) values ('stalled')")
        .await;
    // `hasty` times out after a second; the wait is far longer than that
    // but ends when the row says so, while the lock is still held.
    db.wait_until("select count(*) = 1 from runs where status = 'failed'")
        .await;
    let (kind, records): (String, Option<i64>) =
        sqlx::query_as("select failure_kind, records from runs")
            .fetch_one(&db.pool)
            .await
            .expect("run");
    assert_eq!(kind, "interaction_required");
    assert_eq!(records, Some(6));
    lock.rollback().await.expect("release the lock");
    db.wait_until(
        "select count(*) = 1 from interactions where kind = 'credentials_required' and status = 'open'",
    )
    .await;
}

/// A daemon whose queue loop dies (here a fault injected after a claim)
/// does not sit idle claiming nothing: it logs the task at ERROR and
/// exits non-zero, so systemd restarts it; the claimed command is not
/// lost (another daemon rescues it once the lease passes).
#[tokio::test(flavor = "multi_thread")]
async fn a_dead_loop_stops_the_daemon_with_an_error() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    connection(&db, &dir.path, "doomed", "ok").await;
    let faulty = [("CONNECTORD_FAULT", "queue.claimed")];
    let mut daemon = Daemon::start(&db, &dir.path, &config(&dir.path, "a"), &faulty).await;
    db.exec("insert into run_commands (connection_id) values ('doomed')")
        .await;
    let status = daemon.exited().await;
    let logs = daemon.logs();
    assert_eq!(status.code(), Some(1), "{status:?}\n{logs}");
    assert!(
        logs.contains("the daemon's queue task panicked unexpectedly"),
        "{logs}"
    );
    let rescuer = Daemon::start(&db, &dir.path, &config(&dir.path, "b"), &[]).await;
    db.wait_until(
        "select count(*) = 1 from runs where connection_id = 'doomed' and status = 'succeeded'",
    )
    .await;
    drop(rescuer);
}
