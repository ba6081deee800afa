//! The daemon core, end to end: schedule rows fire, edits take effect live,
//! bad rows are isolated, manual inserts run, failures retry, timeouts kill,
//! two daemons never double a tick, missed ticks catch up once, and
//! `trigger --wait` exits with the run's outcome. Real PostgreSQL, the real
//! binary, real children.

// Tuple rows read plainly in assertions.
#![allow(clippy::type_complexity)]

mod support;

use std::path::Path;

use support::{
    cli, recorded_env, recorded_runs, stand_in, Config, Connector, Daemon, Scratch, TestDb,
};

/// A config with stand-in connectors: `ok`, `flaky` (fails its first
/// attempt), `failing`, `slow` (past its timeout) and `stubborn` (ignores
/// SIGTERM past its timeout).
fn config(dir: &Path, instance: &str) -> Config {
    let connector = |name: &str, behaviour: &str| {
        Connector::recording(name, stand_in(), dir).env("BEHAVIOUR", behaviour)
    };
    let retry_thrice = |c: Connector| c.retry(3, "100ms", "1s");
    Config::new(dir, instance)
        .daemon("shutdown_grace", "2s")
        .daemon("lease", "3s")
        .connector(retry_thrice(connector("ok", "ok")))
        .connector(retry_thrice(connector("flaky", "fail-first")))
        .connector(connector("failing", "fail").no_retry())
        .connector(retry_thrice(connector("slow", "hang").timeout("1s")))
        .connector(
            connector("stubborn", "ignore-term")
                .timeout("1s")
                .no_retry(),
        )
}

/// [`config`] with a reconcile every 300 ms, for tests of what only the
/// reconcile finds.
fn reconciling_config(dir: &Path) -> Config {
    config(dir, "a").daemon("reconcile_interval", "300ms")
}

/// `[daemon] spawn = "command"`: a child started through the standard
/// library's `Command` gets what one started the fast way gets, the
/// stored credential included, inside the sandbox, and its run succeeds.
#[tokio::test(flavor = "multi_thread")]
async fn children_started_through_command_get_the_same_start() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    let keys = dir.path.join("keys");
    let keys = keys.to_str().expect("utf-8 path");
    let (code, out, err) = cli(
        &db,
        None,
        &["keys", "generate", "--id", "k1", "--dir", keys],
        "",
    );
    assert_eq!(code, 0, "keys generate: {out}{err}");
    let config = config(&dir.path, "a")
        .daemon("spawn", "command")
        .set(
            "child_env",
            "inherit",
            vec!["PATH", "HOME", "LANG", "TMPDIR", "API_TOKEN"],
        )
        .connector(
            Connector::recording("token", stand_in(), &dir.path)
                .no_retry()
                .static_secret("API_TOKEN"),
        );
    let config_path = config.write(&dir.path.join("connectord.toml"));
    add_connection(&db, "alice-token", "token").await;
    let secret = "tok-3f9c2a7e51";
    let (code, out, err) = cli(
        &db,
        Some(&config_path),
        &[
            "credentials",
            "set",
            "alice-token",
            "--kind",
            "static_secret",
        ],
        &format!("{secret}\n"),
    );
    assert_eq!(code, 0, "credentials set: {out}{err}");
    // The host's value, though the allowlist names it, must lose to the
    // stored one.
    let daemon = Daemon::start(&db, &dir.path, &config, &[("API_TOKEN", "from-the-host")]).await;
    let logs = daemon.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("connectord starting") && l.contains(r#""spawn":"command""#)),
        "the daemon says how it starts children:\n{logs}"
    );
    db.exec("insert into run_commands (connection_id, trigger) values ('alice-token', 'manual')")
        .await;
    db.wait_until("select count(*) = 1 from runs where status <> 'running'")
        .await;
    let (run_id, status, exit_code, pid, source): (
        i64,
        String,
        Option<i32>,
        Option<i32>,
        Option<String>,
    ) = sqlx::query_as("select id, status, exit_code, pid, credential_source from runs")
        .fetch_one(&db.pool)
        .await
        .expect("a run");
    assert_eq!(
        (status.as_str(), exit_code),
        ("succeeded", Some(0)),
        "{}",
        daemon.logs()
    );
    assert!(pid.is_some());
    assert_eq!(source.as_deref(), Some("store"));
    let env = recorded_env(&dir.path, run_id);
    assert_eq!(env["API_TOKEN"], secret, "the stored credential, injected");
    assert_eq!(env["CONNECTORD_RUN_ID"], run_id.to_string());
    assert_eq!(env["CONNECTORD_CONNECTION_ID"], "alice-token");
    assert_eq!(env["CONNECTORD_TRIGGER"], "manual");
    assert_eq!(env["CONNECTORD_ATTEMPT"], "1");
    assert_eq!(env["RECORD_DIR"], dir.path.display().to_string());
    // The sandbox's private directories: the child ran inside it.
    assert_eq!(env["HOME"], "/run/connector/home");
    assert_eq!(env["TMPDIR"], "/run/connector/tmp");
    assert!(
        !daemon.logs().contains(secret),
        "the secret reached the log"
    );
    assert!(daemon.stop().success());
}

async fn add_connection(db: &TestDb, id: &str, connector: &str) {
    db.exec(&format!(
        "insert into connections (id, connector) values ('{id}', '{connector}')"
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_schedule_row_fires_and_records_a_run() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    add_connection(&db, "alice-ok", "ok").await;
    db.exec("insert into schedules (connection_id, cron) values ('alice-ok', '* * * * * *')")
        .await;
    let daemon = Daemon::start(&db, &dir.path, &config(&dir.path, "a"), &[]).await;
    db.wait_until("select count(*) >= 2 from runs where status = 'succeeded'")
        .await;
    let (trigger, schedule_set, instance, pid, exit_code): (String, bool, String, Option<i32>, Option<i32>) =
        sqlx::query_as(
            "select trigger, schedule_id is not null and scheduled_for is not null, instance_id, pid, exit_code
             from runs where status = 'succeeded' order by id limit 1",
        )
        .fetch_one(&db.pool)
        .await
        .expect("a run");
    assert_eq!(trigger, "scheduled");
    assert!(schedule_set);
    assert_eq!(instance, "a");
    assert!(pid.is_some());
    assert_eq!(exit_code, Some(0));
    let last_fired: bool = db
        .scalar("select last_fired_at is not null and next_fire_at > last_fired_at from schedules")
        .await;
    assert!(last_fired, "next_fire_at and last_fired_at stay current");
    let run_id: i64 = db.scalar("select min(id) from runs").await;
    let env = recorded_env(&dir.path, run_id);
    assert_eq!(env["CONNECTORD_TRIGGER"], "scheduled");
    assert_eq!(env["CONNECTORD_CONNECTION_ID"], "alice-ok");
    assert_eq!(env["CONNECTORD_RUN_ID"], run_id.to_string());
    assert_eq!(env["CONNECTORD_ATTEMPT"], "1");
    let logs = daemon.logs();
    assert!(
        logs.lines().any(|l| l.contains("run.started")
            && l.contains("\"run_id\"")
            && l.contains("alice-ok")
            && l.contains("\"trigger\":\"scheduled\"")),
        "run lines carry run_id, connection and trigger:\n{logs}"
    );
    assert!(daemon.stop().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn schedule_edits_take_effect_live() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    add_connection(&db, "live", "ok").await;
    let daemon = Daemon::start(&db, &dir.path, &config(&dir.path, "a"), &[]).await;

    // Inserted while the daemon runs: fires.
    db.exec("insert into schedules (connection_id, cron) values ('live', '* * * * * *')")
        .await;
    db.wait_until("select count(*) >= 1 from runs where connection_id = 'live'")
        .await;

    // Disabled: no new commands after the change settles.
    db.exec("update schedules set enabled = false").await;
    db.wait_until("select next_fire_at is null from schedules")
        .await;
    let before: i64 = db.scalar("select count(*) from run_commands").await;
    // Edited to a far-off cron and re-enabled: next_fire_at moves to it.
    db.exec("update schedules set cron = '0 0 1 1 *', enabled = true")
        .await;
    db.wait_until("select coalesce(next_fire_at > now() + interval '1 day', false) from schedules")
        .await;
    // Edited back to every second: fires again.
    db.exec("update schedules set cron = '* * * * * *'").await;
    db.wait_until(&format!("select count(*) > {before} from run_commands"))
        .await;
    // Deleted: nothing more fires. A fresh schedule proves the engine has
    // processed the deletion (edits are applied in order).
    db.exec("delete from schedules").await;
    add_connection(&db, "marker", "ok").await;
    db.exec("insert into schedules (connection_id, cron) values ('marker', '* * * * * *')")
        .await;
    db.wait_until("select count(*) >= 1 from run_commands where connection_id = 'marker'")
        .await;
    let live_at: i64 = db
        .scalar("select count(*) from run_commands where connection_id = 'live'")
        .await;
    db.wait_until("select count(*) >= 3 from run_commands where connection_id = 'marker'")
        .await;
    let live_later: i64 = db
        .scalar("select count(*) from run_commands where connection_id = 'live'")
        .await;
    assert_eq!(live_at, live_later, "a deleted schedule does not fire");
    drop(daemon);
}

/// Edits whose notification never came (here, the notify trigger is off)
/// are found by the periodic reconcile: an insert, an edit and a delete.
#[tokio::test(flavor = "multi_thread")]
async fn the_reconcile_finds_edits_no_notification_announced() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    for id in ["edited", "added", "deleted", "kept"] {
        add_connection(&db, id, "ok").await;
    }
    db.exec(
        "insert into schedules (connection_id, cron) values
             ('edited', '0 0 1 1 *'), ('deleted', '* * * * * *'), ('kept', '0 0 1 1 *')",
    )
    .await;
    let config = reconciling_config(&dir.path);
    let daemon = Daemon::start(&db, &dir.path, &config, &[]).await;
    db.wait_until("select count(*) >= 1 from run_commands where connection_id = 'deleted'")
        .await;
    db.exec(
        "alter table schedules disable trigger schedules_notify;
         update schedules set cron = '* * * * * *' where connection_id = 'edited';
         insert into schedules (connection_id, cron) values ('added', '* * * * * *');
         delete from schedules where connection_id = 'deleted';",
    )
    .await;
    db.wait_until(
        "select count(distinct connection_id) = 2 from run_commands
         where connection_id in ('edited', 'added')",
    )
    .await;
    let deleted_id: i64 = db
        .scalar("select max(schedule_id) from run_commands where connection_id = 'deleted'")
        .await;
    let deleted_field = format!(r#""schedule_id":{deleted_id},"#);
    let logs = daemon.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("reconcile found schedule edits") && l.contains(r#""count":2"#)),
        "{logs}"
    );
    assert!(
        logs.lines()
            .any(|l| l.contains("schedule removed") && l.contains(&deleted_field)),
        "{logs}"
    );
    assert!(
        !logs
            .lines()
            .any(|l| l.contains("schedule removed") && !l.contains(&deleted_field)),
        "only the deleted row is removed:\n{logs}"
    );
    drop(daemon);
}

/// An edit whose error could not be written (here a trigger refuses it) is
/// written by a later reconcile once the database takes it.
#[tokio::test(flavor = "multi_thread")]
async fn an_error_the_database_refused_is_written_later() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    add_connection(&db, "x", "ok").await;
    db.exec("insert into schedules (connection_id, cron) values ('x', '0 0 1 1 *')")
        .await;
    let config = reconciling_config(&dir.path);
    let daemon = Daemon::start(&db, &dir.path, &config, &[]).await;
    // A sequence counts refused writes: it is not rolled back with them.
    db.exec(
        "create sequence refused_writes;
         create function refuse_last_error() returns trigger language plpgsql as $$
         begin
             if new.last_error is not null then
                 perform nextval('refused_writes');
                 raise exception 'refused for the test';
             end if;
             return new;
         end $$;
         create trigger refuse_last_error before update on schedules
             for each row execute function refuse_last_error();
         update schedules set cron = 'every tuesday';",
    )
    .await;
    db.wait_until("select is_called from refused_writes").await;
    db.exec("drop trigger refuse_last_error on schedules").await;
    db.wait_until("select coalesce(last_error like '%every tuesday%', false) from schedules")
        .await;
    drop(daemon);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_rows_are_isolated_and_fixing_clears_the_error() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    add_connection(&db, "good", "ok").await;
    add_connection(&db, "badcron", "ok").await;
    add_connection(&db, "badtz", "ok").await;
    db.exec(
        "insert into schedules (connection_id, cron) values ('good', '* * * * * *');
         insert into schedules (connection_id, cron) values ('badcron', 'every tuesday');
         insert into schedules (connection_id, cron, timezone) values ('badtz', '* * * * * *', 'Mars/Olympus');",
    )
    .await;
    let daemon = Daemon::start(&db, &dir.path, &config(&dir.path, "a"), &[]).await;
    db.wait_until("select count(*) >= 2 from runs where connection_id = 'good'")
        .await;
    let errors: Vec<(String, Option<String>)> =
        sqlx::query_as("select connection_id, last_error from schedules order by connection_id")
            .fetch_all(&db.pool)
            .await
            .expect("schedules");
    assert!(
        errors[0]
            .1
            .as_deref()
            .is_some_and(|e| e.contains("every tuesday")),
        "{errors:?}"
    );
    assert!(
        errors[1]
            .1
            .as_deref()
            .is_some_and(|e| e.contains("Mars/Olympus")),
        "{errors:?}"
    );
    assert_eq!(errors[2].1, None);
    let bad_runs: i64 = db
        .scalar("select count(*) from run_commands where connection_id in ('badcron', 'badtz')")
        .await;
    assert_eq!(bad_runs, 0);
    let logs = daemon.logs();
    assert_eq!(
        logs.lines()
            .filter(|l| l.contains("schedule.error") && l.contains("every tuesday"))
            .count(),
        1,
        "one clear error per bad row:\n{logs}"
    );
    db.exec("update schedules set cron = '* * * * * *' where connection_id = 'badcron'")
        .await;
    db.exec("update schedules set timezone = 'Europe/Berlin' where connection_id = 'badtz'")
        .await;
    db.wait_until("select count(*) = 0 from schedules where last_error is not null")
        .await;
    db.wait_until(
        "select count(distinct connection_id) = 2 from runs where connection_id in ('badcron', 'badtz')",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_manual_insert_runs_promptly() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    add_connection(&db, "alice-ok", "ok").await;
    let _daemon = Daemon::start(&db, &dir.path, &config(&dir.path, "a"), &[]).await;
    db.exec("insert into run_commands (connection_id, trigger) values ('alice-ok', 'manual')")
        .await;
    db.wait_until(
        "select count(*) = 1 from runs where status = 'succeeded' and trigger = 'manual'",
    )
    .await;
    let done: String = db.scalar("select status from run_commands").await;
    assert_eq!(done, "done");
}

/// `connectord_commands` announces commands that are due: the manual
/// insert wakes the daemons, the run's outcome (whose retry insert inserts
/// nothing) does not, so no daemon claims for nothing after every run.
#[tokio::test(flavor = "multi_thread")]
async fn only_due_commands_wake_the_queues() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    add_connection(&db, "quiet", "ok").await;
    let _daemon = Daemon::start(&db, &dir.path, &config(&dir.path, "a"), &[]).await;
    let mut listener = sqlx::postgres::PgListener::connect_with(&db.pool)
        .await
        .expect("listener");
    listener
        .listen("connectord_commands")
        .await
        .expect("listen");
    db.exec("insert into run_commands (connection_id) values ('quiet')")
        .await;
    db.wait_until("select count(*) = 1 from runs where status = 'succeeded'")
        .await;
    // Notifications arrive in commit order: everything the run caused
    // comes before this one.
    db.exec("select pg_notify('connectord_commands', 'sentinel')")
        .await;
    let mut wakes = 0;
    loop {
        let notification = tokio::time::timeout(support::PATIENCE, listener.recv())
            .await
            .expect("the sentinel arrives")
            .expect("notification");
        if notification.payload() == "sentinel" {
            break;
        }
        wakes += 1;
    }
    assert_eq!(wakes, 1, "one wake-up, for the insert");
}

/// Counters of what PostgreSQL read, per table or index, as of the last
/// flush: `(name, seq_scan or idx_tup_read, idx_tup_fetch or 0)`.
async fn reads(db: &TestDb, sql: &str) -> Vec<(String, i64, i64)> {
    sqlx::query_as(sql)
        .fetch_all(&db.pool)
        .await
        .expect("read statistics")
}

/// Counters reach the shared statistics when a session goes idle after this.
const FLUSH: &str = "select pg_stat_force_next_flush()";

/// Ends `setup` (run as one batch, on one connection) with a flush of that
/// connection's read counters, so that none of its reads are counted later;
/// autovacuum is kept off the tables, so the statistics stay as set up.
async fn set_up_counted(db: &TestDb, setup: &str) {
    db.exec(&format!(
        "alter table run_commands set (autovacuum_enabled = false);
         alter table runs set (autovacuum_enabled = false);
         {setup};
         {FLUSH};"
    ))
    .await;
}

/// A finished run asks whether its connection has pending commands (to
/// wake the queues for them). That question stays a probe of the
/// connection's own pending commands when the statistics were taken while
/// the queue was idle: with such statistics PostgreSQL used to answer it by
/// walking every pending command, a fifth less throughput at 10,000 queued.
#[tokio::test(flavor = "multi_thread")]
async fn a_finished_run_probes_only_its_own_connections_pending_commands() {
    let db = TestDb::new().await;
    // An idle queue is analyzed, then a backlog arrives.
    let setup = "insert into connections (id, connector)
                 select 'c' || g, 'ok' from generate_series(0, 399) as g;
                 insert into run_commands (connection_id, status)
                 select 'c' || (g % 400), 'done' from generate_series(0, 3999) as g;
                 analyze run_commands;
                 insert into run_commands (connection_id, not_before)
                 select 'c' || (g % 400), now() + interval '1 hour'
                 from generate_series(0, 1999) as g";
    set_up_counted(&db, setup).await;
    let index_reads = "select indexrelname::text, idx_tup_read, 0::bigint
                       from pg_stat_user_indexes where relname = 'run_commands' order by 1";
    let before = reads(&db, index_reads).await;
    let mut session = db.pool.acquire().await.expect("connection");
    // The run of the last connection: its pending commands sit behind
    // every other connection's in the queue's order.
    sqlx::raw_sql(&format!(
        "insert into runs (connection_id, trigger, status, finished_at)
         values ('c399', 'manual', 'succeeded', now());
         {FLUSH}"
    ))
    .execute(&mut *session)
    .await
    .expect("a finished run");
    let after = reads(&db, index_reads).await;
    let read: Vec<(String, i64)> = after
        .iter()
        .zip(&before)
        .map(|((index, a, _), (_, b, _))| (index.clone(), a - b))
        .filter(|(_, n)| *n > 0)
        .collect();
    let total: i64 = read.iter().map(|(_, n)| n).sum();
    assert!(
        read.iter()
            .any(|(index, _)| index == "run_commands_pending_connection"),
        "the lookup probes the connection's pending commands: {read:?}"
    );
    assert!(
        total <= 10,
        "the outcome read {total} index entries of run_commands: {read:?}"
    );
}

/// The claim reaches its commands' connections, schedules and credentials
/// by key, whatever the statistics say: under statistics taken in the
/// middle of a backlog, plans made for thousands of claimed rows read
/// whole tables instead (every connection, on every claim), unless the
/// claim session rules them out.
#[tokio::test(flavor = "multi_thread")]
async fn a_claim_reads_no_whole_table_whatever_the_statistics() {
    let db = TestDb::new().await;
    let setup = "insert into connections (id, connector)
                 select 'c' || g, 'ok' from generate_series(0, 1999) as g;
                 insert into credentials (connection_id, kind, key_id, nonce, ciphertext)
                 select id, 'static_secret', 'k1', decode('00', 'hex'), decode('00', 'hex')
                 from connections;
                 insert into schedules (connection_id, cron)
                 select id, '0 3 * * *' from connections;
                 insert into run_commands (connection_id, status)
                 select 'c' || (g % 2000), 'done' from generate_series(0, 19999) as g;
                 insert into run_commands (connection_id)
                 select 'c' || (g % 2000) from generate_series(0, 9999) as g;
                 analyze;
                 update run_commands set status = 'done' where status = 'pending';
                 insert into run_commands (connection_id) values ('c7');
                 insert into run_commands (connection_id, trigger, schedule_id, scheduled_for)
                 select 'c8', 'scheduled', id, now() from schedules where connection_id = 'c8'";
    set_up_counted(&db, setup).await;
    let table_reads = "select relname::text, seq_scan, coalesce(idx_tup_fetch, 0)
                       from pg_stat_user_tables
                       where relname in ('connections', 'credentials', 'schedules')
                       order by 1";
    let before = reads(&db, table_reads).await;
    // The daemon's own claim session, with its session settings.
    let config = connectord::config::DatabaseConfig {
        url: db.url.clone(),
        max_connections: 1,
    };
    let pool = connectord::db::connect_daemon(&config)
        .await
        .expect("the daemon's pool");
    let mut session = connectord::db::claim_session(&pool)
        .await
        .expect("claim session");
    // A connector at its limit makes the claim test every command's
    // connector too.
    let full = vec!["busy-connector".to_owned()];
    let claimed = connectord::queue::claim(&mut session, "a", 32, &full, &["ok".to_owned()])
        .await
        .expect("claim");
    sqlx::raw_sql(FLUSH)
        .execute(&mut session)
        .await
        .expect("flush");
    let after = reads(&db, table_reads).await;
    assert_eq!(claimed.len(), 2);
    assert!(claimed
        .iter()
        .all(|c| c.run_id.is_some() && c.credential.is_some()));
    for ((table, scans_after, fetched_after), (_, scans_before, fetched_before)) in
        after.iter().zip(&before)
    {
        assert_eq!(scans_after, scans_before, "{table} read whole by a claim");
        // A few rows per claimed command, not the table's 2,000.
        let fetched = fetched_after - fetched_before;
        assert!(fetched <= 10, "{table}: {fetched} rows fetched by a claim");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_child_is_retried_with_the_next_attempt() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    add_connection(&db, "flaky", "flaky").await;
    let _daemon = Daemon::start(&db, &dir.path, &config(&dir.path, "a"), &[]).await;
    db.exec("insert into run_commands (connection_id) values ('flaky')")
        .await;
    db.wait_until("select count(*) = 1 from runs where status = 'succeeded'")
        .await;
    let runs: Vec<(i64, String, i32, String, Option<String>, Option<i32>)> = sqlx::query_as(
        "select id, trigger, attempt, status, failure_kind, exit_code from runs order by id",
    )
    .fetch_all(&db.pool)
    .await
    .expect("runs");
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert_eq!((runs[0].2, runs[0].3.as_str()), (1, "failed"));
    assert_eq!(runs[0].4.as_deref(), Some("exit_nonzero"));
    assert_eq!(runs[0].5, Some(7));
    assert_eq!(
        (runs[1].1.as_str(), runs[1].2, runs[1].3.as_str()),
        ("retry", 2, "succeeded")
    );
    let parent: Option<i64> = db
        .scalar("select parent_run_id from run_commands where trigger = 'retry'")
        .await;
    assert_eq!(parent, Some(runs[0].0));
    assert_eq!(
        recorded_env(&dir.path, runs[1].0)["CONNECTORD_ATTEMPT"],
        "2"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn retries_stop_at_max_attempts() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    add_connection(&db, "down", "failing").await;
    let _daemon = Daemon::start(&db, &dir.path, &config(&dir.path, "a"), &[]).await;
    db.exec("insert into run_commands (connection_id) values ('down')")
        .await;
    db.wait_until("select count(*) = 1 from runs where status = 'failed'")
        .await;
    db.wait_until("select count(*) = 0 from run_commands where status <> 'done'")
        .await;
    let runs: i64 = db.scalar("select count(*) from runs").await;
    assert_eq!(runs, 1, "max_attempts = 1 means no retry");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_child_past_its_timeout_is_killed() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    add_connection(&db, "slow", "slow").await;
    add_connection(&db, "stubborn", "stubborn").await;
    let _daemon = Daemon::start(&db, &dir.path, &config(&dir.path, "a"), &[]).await;
    db.exec("insert into run_commands (connection_id) values ('slow'), ('stubborn')")
        .await;
    db.wait_until(
        "select count(*) = 2 from runs where attempt = 1 and status = 'failed' and failure_kind = 'timed_out'",
    )
    .await;
    // Every process of each run's group is gone, the SIGTERM-ignoring one too.
    let pids: Vec<i32> = sqlx::query_scalar("select pid from runs where attempt = 1")
        .fetch_all(&db.pool)
        .await
        .expect("pids");
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid),
            "process {pid} outlived its timeout"
        );
    }
    // `slow` has retries left; `stubborn` has none.
    db.wait_until(
        "select count(*) = 1 from run_commands where trigger = 'retry' and connection_id = 'slow'",
    )
    .await;
    let stubborn_retries: i64 = db
        .scalar("select count(*) from run_commands where trigger = 'retry' and connection_id = 'stubborn'")
        .await;
    assert_eq!(stubborn_retries, 0);
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

#[tokio::test(flavor = "multi_thread")]
async fn two_daemons_never_run_one_tick_twice() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    for i in 0..5 {
        add_connection(&db, &format!("c{i}"), "ok").await;
        db.exec(&format!(
            "insert into schedules (connection_id, cron, overlap) values ('c{i}', '* * * * * *', 'queue')"
        ))
        .await;
    }
    let a = Daemon::start(&db, &dir.path, &config(&dir.path, "a"), &[]).await;
    let b = Daemon::start(&db, &dir.path, &config(&dir.path, "b"), &[]).await;
    db.wait_until("select count(*) >= 20 from runs where status = 'succeeded'")
        .await;
    let duplicates: i64 = db
        .scalar(
            "select count(*) from (select schedule_id, scheduled_for from runs
             group by 1, 2 having count(*) > 1) d",
        )
        .await;
    assert_eq!(duplicates, 0);
    let command_duplicates: i64 = db
        .scalar(
            "select count(*) from (select schedule_id, scheduled_for from run_commands
             group by 1, 2 having count(*) > 1) d",
        )
        .await;
    assert_eq!(command_duplicates, 0);
    assert!(a.stop().success());
    assert!(b.stop().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missed_tick_inside_the_window_fires_once_after_downtime() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    add_connection(&db, "minutely", "ok").await;
    add_connection(&db, "yearly", "ok").await;
    add_connection(&db, "badcron", "ok").await;
    // Both last fired long ago, as if the daemon had been down: the minutely
    // one has a tick within the last minute (inside the 1h window); the
    // yearly one's latest tick is months old.
    db.exec(
        "insert into schedules (connection_id, cron, last_fired_at, updated_at, created_at)
         values ('minutely', '* * * * *', now() - interval '3 hours', now() - interval '3 hours', now() - interval '3 hours'),
                ('yearly', '0 0 1 1 *', now() - interval '800 days', now() - interval '800 days', now() - interval '800 days'),
                ('badcron', 'every tuesday', null, now(), now());
         insert into schedules (connection_id, cron, enabled)
         select 'yearly', '0 0 1 1 *', false from generate_series(1, 6000);",
    )
    .await;
    // The smallest pool, and more rows than one page of the load: the
    // catch-up tick and the error, both in the first page, must be written
    // without a connection of their own while the load reads on.
    let config = config(&dir.path, "a").set("database", "max_connections", 2);
    let daemon = Daemon::start(&db, &dir.path, &config, &[]).await;
    db.wait_until("select count(*) = 1 from runs where connection_id = 'minutely'")
        .await;
    db.wait_until("select count(*) = 1 from schedules where last_error like '%every tuesday%'")
        .await;
    let (scheduled_for_is_minute, fired_once): (bool, bool) = sqlx::query_as(
        "select date_trunc('minute', scheduled_for) = scheduled_for, count(*) over () = 1
         from run_commands where connection_id = 'minutely'",
    )
    .fetch_one(&db.pool)
    .await
    .expect("catch-up command");
    assert!(scheduled_for_is_minute && fired_once);
    // A tick older than the window does not run; it is recorded, once.
    db.wait_until("select exists (select 1 from runs where connection_id = 'yearly')")
        .await;
    let yearly: Vec<(String, Option<String>)> =
        sqlx::query_as("select status, failure_kind from runs where connection_id = 'yearly'")
            .fetch_all(&db.pool)
            .await
            .expect("runs");
    assert_eq!(yearly, [("skipped".to_owned(), Some("missed".to_owned()))]);
    assert!(daemon
        .logs()
        .contains("skipping missed ticks older than the catch-up window"));
}

#[tokio::test(flavor = "multi_thread")]
async fn trigger_wait_exits_with_the_outcome() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    add_connection(&db, "fine", "ok").await;
    add_connection(&db, "broken", "failing").await;
    add_connection(&db, "ghost", "no-such-connector").await;
    db.exec("insert into connections (id, connector, enabled) values ('off', 'ok', false)")
        .await;
    let daemon = Daemon::start(&db, &dir.path, &config(&dir.path, "a"), &[]).await;
    let config = Some(daemon.config_path.as_path());
    let check = |connection: &str, expected: i32, text: &str| {
        let (code, stdout, stderr) = cli(&db, config, &["trigger", connection, "--wait"], "");
        assert_eq!(code, expected, "{connection}: {stdout}{stderr}");
        assert!(stdout.contains(text), "{connection}: {stdout}");
    };
    check("fine", 0, "succeeded");
    check("broken", 3, "exit_nonzero");
    check("ghost", 4, "connector_unknown");
    check("off", 4, "connection_disabled");
    let (code, _, stderr) = cli(&db, config, &["trigger", "nobody"], "");
    assert_eq!(code, 1);
    assert!(stderr.contains("\"nobody\" does not exist"), "{stderr}");
    // No refused run spawned a child.
    let refused_pids: i64 = db
        .scalar("select count(*) from runs where status = 'refused' and (pid is not null or started_at is not null)")
        .await;
    assert_eq!(refused_pids, 0);
    let recorded = recorded_runs(&dir.path);
    let refused_ids: Vec<i64> = sqlx::query_scalar("select id from runs where status = 'refused'")
        .fetch_all(&db.pool)
        .await
        .expect("refused runs");
    assert!(refused_ids.iter().all(|id| !recorded.contains(id)));
}

/// The most runs (of `connector`, or of any) that were going at any one
/// instant.
async fn peak_concurrency(db: &TestDb, connector: Option<&str>) -> i64 {
    let filter = connector.map_or(String::new(), |c| {
        format!("and a.connector = '{c}' and b.connector = '{c}'")
    });
    db.scalar(&format!(
        "select coalesce(max(n), 0) from (
             select count(*) as n from runs a join runs b
               on b.started_at <= a.started_at and a.started_at < b.finished_at {filter}
             group by a.id) t"
    ))
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrency_limits_hold() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    let hold = dir.path.join("hold");
    std::fs::write(&hold, "").expect("hold file");
    let waiting = |name: &str, max_concurrency: i64| {
        Connector::recording(name, stand_in(), &dir.path)
            .env("BEHAVIOUR", "wait-file")
            .set("max_concurrency", max_concurrency)
    };
    let config = config(&dir.path, "a")
        .daemon("max_concurrent_runs", 3)
        .connector(waiting("limited", 2))
        .connector(waiting("wide", 10));
    for i in 0..4 {
        add_connection(&db, &format!("l{i}"), "limited").await;
        add_connection(&db, &format!("w{i}"), "wide").await;
    }
    let _daemon = Daemon::start(&db, &dir.path, &config, &[]).await;
    db.exec(
        "insert into run_commands (connection_id) select id from connections where id like 'l%'",
    )
    .await;
    // Two of the limited connector run; the rest wait unclaimed.
    db.wait_until(
        "select (select count(*) from runs where status = 'running') = 2
            and (select count(*) from run_commands where status = 'pending' and claimed_by is null) = 2",
    )
    .await;
    // The daemon-wide limit lets one more in, from another connector.
    db.exec(
        "insert into run_commands (connection_id) select id from connections where id like 'w%'",
    )
    .await;
    db.wait_until(
        "select (select count(*) from runs where status = 'running') = 3
            and (select count(*) from run_commands where status = 'pending' and claimed_by is null) = 5",
    )
    .await;
    std::fs::remove_file(&hold).expect("release");
    db.wait_until("select count(*) = 8 from runs where status = 'succeeded'")
        .await;
    assert!(peak_concurrency(&db, None).await <= 3);
    let limited_peak = peak_concurrency(&db, Some("limited")).await;
    assert!(
        limited_peak <= 2,
        "limited connector peaked at {limited_peak}"
    );
}
