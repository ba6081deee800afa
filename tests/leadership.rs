//! Many daemons, one database (SPEC §16): one daemon fires the schedules,
//! so a tick costs the database one command insert and one schedule-row
//! write whatever the number of daemons; when the firing daemon dies,
//! another takes over within the lease, fires the tick that fell in the
//! gap once and doubles none; a clean stop hands over at once; an edit
//! made while the firing daemon changes takes effect once.
//!
//! The database's work is counted by triggers that record every command
//! insert attempted (a BEFORE trigger sees the ones ON CONFLICT drops too)
//! and every write of a `schedules` row, not by time.

mod support;

use std::path::Path;

use support::{stand_in, Config, Connector, Daemon, Scratch, TestDb};

fn config(dir: &Path, instance: &str) -> Config {
    Config::new(dir, instance).connector(Connector::recording("plain", stand_in(), dir).no_retry())
}

/// Records every command insert attempted and every schedule-row write.
async fn count_writes(db: &TestDb) {
    db.exec(
        "create table writes (id bigserial primary key, kind text not null);
         create function count_command() returns trigger language plpgsql as $$
         begin
             if new.trigger = 'scheduled' then insert into writes (kind) values ('command'); end if;
             return new;
         end $$;
         create trigger count_command before insert on run_commands
             for each row execute function count_command();
         create function count_schedule() returns trigger language plpgsql as $$
         begin insert into writes (kind) values ('schedule'); return null; end $$;
         create trigger count_schedule after update on schedules
             for each row execute function count_schedule();",
    )
    .await;
}

async fn scheduled_commands(db: &TestDb) -> i64 {
    db.scalar("select count(*) from run_commands where trigger = 'scheduled'")
        .await
}

async fn leader(db: &TestDb) -> (String, i64) {
    sqlx::query_as("select holder, term from schedule_leader")
        .fetch_one(&db.pool)
        .await
        .expect("a leader")
}

#[tokio::test(flavor = "multi_thread")]
async fn three_daemons_cost_a_tick_one_insert_and_one_row_write() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    let d = &dir.path;
    count_writes(&db).await;
    db.exec(
        "insert into connections (id, connector) values ('every-second', 'plain');
         insert into schedules (connection_id, cron) values ('every-second', '* * * * * *')",
    )
    .await;
    let daemons = [
        Daemon::start(&db, d, &config(d, "one"), &[]).await,
        Daemon::start(&db, d, &config(d, "two"), &[]).await,
        Daemon::start(&db, d, &config(d, "three"), &[]).await,
    ];
    // Counted from a fired tick on, once all three are up: what start-up
    // writes (each row's next_fire_at, once) is not a tick's work.
    let base = scheduled_commands(&db).await;
    db.wait_until(&format!(
        "select count(*) > {base} from run_commands where trigger = 'scheduled'"
    ))
    .await;
    let (from_command, from_writes): (i64, i64) = sqlx::query_as(
        "select (select max(id) from run_commands where trigger = 'scheduled'),
                (select coalesce(max(id), 0) from writes)",
    )
    .fetch_one(&db.pool)
    .await
    .expect("counts");
    db.wait_until(&format!(
        "select count(*) >= 5 from run_commands where trigger = 'scheduled' and id > {from_command}"
    ))
    .await;
    // One statement inserts a tick's command and writes its row, so the
    // counts are read between ticks, not halfway through one.
    let (ticks, inserts, row_writes): (i64, i64, i64) = sqlx::query_as(&format!(
        "select (select count(*) from run_commands where trigger = 'scheduled' and id > {from_command}),
                (select count(*) from writes where id > {from_writes} and kind = 'command'),
                (select count(*) from writes where id > {from_writes} and kind = 'schedule')"
    ))
    .fetch_one(&db.pool)
    .await
    .expect("counts");
    assert!(ticks >= 5);
    assert_eq!(
        inserts, ticks,
        "command inserts attempted for {ticks} ticks"
    );
    assert_eq!(row_writes, ticks, "schedule-row writes for {ticks} ticks");
    let (_, term) = leader(&db).await;
    assert_eq!(term, 1, "the leadership changed hands with no daemon gone");
    // Each read the table once: taking the lead before the first load
    // is no reason to read it twice.
    for daemon in &daemons {
        assert!(
            !daemon.logs().contains("reconcile found"),
            "{}",
            daemon.logs()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_leaders_schedules_fire_from_another_daemon_without_doubling() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    let d = &dir.path;
    db.exec(
        "insert into connections (id, connector) values ('every-second', 'plain'), ('edited', 'plain');
         insert into schedules (connection_id, cron) values ('every-second', '* * * * * *'),
                                                            ('edited', '* * * * * *')",
    )
    .await;
    // A lease of 4 s: renewed every 1.3 s, so a takeover comes at least
    // 2.6 s after the kill, and a tick 1 to 2 s after it falls in the gap.
    let config = |instance: &str| config(d, instance).daemon("lease", "4s");
    let mut daemons = [
        Some(Daemon::start(&db, d, &config("one"), &[]).await),
        Some(Daemon::start(&db, d, &config("two"), &[]).await),
        Some(Daemon::start(&db, d, &config("three"), &[]).await),
    ];
    let base = scheduled_commands(&db).await;
    db.wait_until(&format!(
        "select count(*) >= {} from run_commands where trigger = 'scheduled'",
        base + 4
    ))
    .await;
    let (holder, term) = leader(&db).await;
    let index = ["one", "two", "three"]
        .iter()
        .position(|name| *name == holder)
        .expect("a daemon of the test leads");
    // A schedule whose one tick a minute falls in the coming gap: at the
    // second after next.
    let gap_tick: chrono::DateTime<chrono::Utc> = db
        .scalar("select date_trunc('second', now()) + interval '2 seconds'")
        .await;
    db.exec(&format!(
        "insert into connections (id, connector) values ('in-the-gap', 'plain');
         insert into schedules (connection_id, cron)
         values ('in-the-gap', '{} * * * * *')",
        gap_tick.format("%S")
    ))
    .await;
    let killed = daemons[index].take().expect("running");
    // SAFETY: kill(2) on a daemon this test started.
    unsafe {
        libc::kill(killed.pid() as i32, libc::SIGKILL);
    }
    drop(killed);
    // While no daemon fires: pause one schedule by hand.
    db.exec("update schedules set cron = '0 0 1 1 *' where connection_id = 'edited'")
        .await;
    let edited_at: chrono::DateTime<chrono::Utc> = db
        .scalar("select updated_at from schedules where connection_id = 'edited'")
        .await;

    // Another daemon leads, in a new term, and fires on.
    db.wait_until(&format!(
        "select count(*) >= 3 from run_commands
         where connection_id = 'every-second'
           and created_at > (select acquired_at from schedule_leader where term > {term})"
    ))
    .await;
    let (new_holder, new_term) = leader(&db).await;
    assert_ne!(new_holder, holder);
    assert_eq!(new_term, term + 1);
    let acquired_at: chrono::DateTime<chrono::Utc> =
        db.scalar("select acquired_at from schedule_leader").await;
    assert!(
        gap_tick < acquired_at,
        "the tick at {gap_tick} was not in the gap"
    );
    // The tick that fell between the kill and the takeover fired, once.
    let gap_fires: Vec<(chrono::DateTime<chrono::Utc>,)> =
        sqlx::query_as("select scheduled_for from run_commands where connection_id = 'in-the-gap'")
            .fetch_all(&db.pool)
            .await
            .expect("commands");
    assert_eq!(gap_fires, vec![(gap_tick,)]);
    // None doubled: one run per tick.
    let doubled: i64 = db
        .scalar(
            "select count(*) from (select scheduled_for from runs where trigger = 'scheduled'
                                   group by connection_id, scheduled_for having count(*) > 1) d",
        )
        .await;
    assert_eq!(doubled, 0);
    // The paused row took effect once: nothing after the edit, no replay.
    let after_edit: i64 = db
        .scalar(&format!(
            "select count(*) from run_commands where connection_id = 'edited'
             and scheduled_for >= '{}'",
            edited_at.to_rfc3339()
        ))
        .await;
    assert_eq!(after_edit, 0, "the edited schedule fired after its edit");

    // The killed daemon comes back as a follower: nothing is replayed and
    // the leader stays.
    daemons[index] = Some(Daemon::start(&db, d, &config(&holder), &[]).await);
    let rejoined: chrono::DateTime<chrono::Utc> = db.scalar("select now()").await;
    let count = scheduled_commands(&db).await;
    db.wait_until(&format!(
        "select count(*) >= {} from run_commands where trigger = 'scheduled'",
        count + 3
    ))
    .await;
    let replayed: i64 = db
        .scalar(&format!(
            "select count(*) from run_commands where trigger = 'scheduled'
             and created_at > '{0}' and scheduled_for < timestamptz '{0}' - interval '2 seconds'",
            rejoined.to_rfc3339()
        ))
        .await;
    assert_eq!(replayed, 0, "a joining daemon replayed old ticks");
    assert_eq!(leader(&db).await, (new_holder, new_term));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_clean_stop_hands_the_schedules_over_before_the_lease_expires() {
    let db = TestDb::new().await;
    let dir = Scratch::new();
    let d = &dir.path;
    db.exec(
        "insert into connections (id, connector) values ('every-second', 'plain');
         insert into schedules (connection_id, cron) values ('every-second', '* * * * * *')",
    )
    .await;
    // A lease far longer than the handover should take.
    let long = |instance: &str| config(d, instance).daemon("lease", "60s");
    let one = Daemon::start(&db, d, &long("one"), &[]).await;
    db.wait_until("select exists (select from schedule_leader where holder = 'one')")
        .await;
    let two = Daemon::start(&db, d, &long("two"), &[]).await;
    let expires_at: chrono::DateTime<chrono::Utc> =
        db.scalar("select expires_at from schedule_leader").await;
    assert!(one.stop().success());
    db.wait_until("select exists (select from schedule_leader where holder = 'two')")
        .await;
    let count = scheduled_commands(&db).await;
    db.wait_until(&format!(
        "select count(*) > {count} from run_commands where trigger = 'scheduled'"
    ))
    .await;
    let acquired_at: chrono::DateTime<chrono::Utc> =
        db.scalar("select acquired_at from schedule_leader").await;
    assert!(
        acquired_at < expires_at,
        "taken over at {acquired_at}, not before the lease's end at {expires_at}"
    );
    two.wait_for_log("this daemon fires the schedules now")
        .await;
}
