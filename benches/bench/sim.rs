//! P11, the simulation (SPEC §16): a million connections on one PostgreSQL,
//! their schedules fired by 1, 3 and 10 daemon processes in turn.
//!
//! Sized for a 2-core machine, which runs PostgreSQL, every daemon and
//! every child: each of the 1,000,000 connections has a stored credential
//! (sealed by the library, inserted in bulk) and a schedule. All but
//! `FIRING` of them are yearly, next month (10,080 distinct expressions: a
//! time of day and one of seven days), so they are loaded and wait, as most
//! of a real million do; the firing ones tick every second, `FIRING` runs a
//! second. Children are the static probe,
//! unsandboxed (the sandbox's cost is P7's).
//!
//! Before the configurations, one daemon starts and stops on the fresh
//! rows, as the first start of a fleet does: it writes every row's
//! `next_fire_at` once, which is not the steady work measured here. Then,
//! for each number of daemons, on the same rows:
//!
//! - each daemon's time from spawn to ready, its peak RSS (the load) and its
//!   RSS once settled;
//! - over a steady window: database statements (`pg_stat_statements`, every
//!   statement the daemons sent) and WAL bytes (`pg_current_wal_lsn`, the
//!   whole cluster, autovacuum included) per run; each daemon's CPU; tick
//!   lateness (a command's insert against its tick); pickup (the probe's
//!   start against its command's insert);
//! - over the configuration's whole life, from the first start to the last
//!   stop: `schedules` row writes (each a dead tuple) per tick, from
//!   `pg_stat_user_tables`, read once every daemon has exited so every
//!   backend's counts are in;
//! - duplicate ticks (two runs of one tick) and missed ticks (a second
//!   without its command) in the window, which must be 0;
//! - with 3 and 10 daemons, then: the leader killed with SIGKILL, the gap
//!   until another daemon fires, and the gap's ticks (each firing schedule
//!   fires the most recent one once; none doubled; none missed after).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use connectord::credentials::keys::{Binding, Keyring};
use connectord::credentials::secret::{Plaintext, Secret};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

use super::daemon::Daemon;
use super::procfs;
use super::setup::Env;
use super::stats::{Figure, Report, Unit};

/// Connections, each with a credential and a schedule.
const CONNECTIONS: usize = 1_000_000;
/// Schedules that tick every second.
const FIRING: usize = 250;
/// The daemons' `daemon.lease`: the failover gap's bound.
const LEASE: Duration = Duration::from_secs(5);
const DAEMON_COUNTS: [usize; 3] = [1, 3, 10];
/// Rows per bulk insert.
const CHUNK: usize = 50_000;
const EVERY_SECOND: &str = "* * * * * *";

/// The simulation's database and how to reach it.
struct Sim {
    database: String,
    url: String,
    pool: PgPool,
    /// A connection to the `postgres` database, where the statements
    /// are counted from (so the counting is not counted).
    admin: PgPool,
}

/// What one configuration measured, for the ratios.
struct Measured {
    daemons: usize,
    statements_per_run: f64,
    wal_per_run: f64,
}

pub async fn run(env: &mut Env, report: &mut Report) -> anyhow::Result<()> {
    report.say("");
    report.say(&format!(
        "== P11: simulation, {CONNECTIONS} connections with credentials and schedules, {FIRING} firing every second, 1/3/10 daemons =="
    ));
    statements_on(env, true).await?;
    let result = simulate(env, report).await;
    // The other sections measure a server without the extension.
    statements_on(env, false).await?;
    result
}

async fn simulate(env: &mut Env, report: &mut Report) -> anyhow::Result<()> {
    let sim = create(env).await?;
    let seeded = Instant::now();
    seed(&sim.pool, &env.keyring).await?;
    report.say(&format!(
        "sim: seeded in {:.0}s",
        seeded.elapsed().as_secs_f64()
    ));

    // The first start of a fleet: every row's next_fire_at written once.
    let config = write_config(env, &sim, "prime")?;
    let mut prime = Daemon::start_on(env, &sim.url, Some(&config), "info", "sim-prime")?;
    prime.wait_ready(Duration::from_secs(300)).await?;
    wait_written(&sim.pool).await?;
    prime.stop().await?;
    // Its million row writes are vacuumed now, not by an autovacuum whose
    // WAL would land in a window.
    sqlx::query("vacuum analyze").execute(&sim.pool).await?;
    sqlx::query("checkpoint").execute(&sim.pool).await?;

    let window = if env.mode.full {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(20)
    };
    let mut measured = Vec::new();
    for daemons in DAEMON_COUNTS {
        measured.push(configuration(env, &sim, daemons, window, report).await?);
    }
    let one = measured.iter().find(|m| m.daemons == 1);
    let ten = measured.iter().find(|m| m.daemons == 10);
    if let (Some(one), Some(ten)) = (one, ten) {
        let statements = ten.statements_per_run / one.statements_per_run;
        let wal = ten.wal_per_run / one.wal_per_run;
        report.say(&format!(
            "sim: database work per run, 10 daemons against 1: statements {statements:.3}x, WAL {wal:.3}x"
        ));
        report.check(
            "P11 statements per run, 10 daemons / 1 (<= 1.1x)",
            format!("{statements:.3}x"),
            Some(statements <= 1.1),
        );
        report.check(
            "P11 WAL bytes per run, 10 daemons / 1 (<= 1.1x)",
            format!("{wal:.3}x"),
            Some(wal <= 1.1),
        );
    }
    sim.pool.close().await;
    let _ = sqlx::query(&format!(
        "drop database if exists {} with (force)",
        sim.database
    ))
    .execute(&sim.admin)
    .await;
    sim.admin.close().await;
    Ok(())
}

/// Loads `pg_stat_statements` (a restart of the bench's cluster), or
/// unloads it again.
async fn statements_on(env: &mut Env, on: bool) -> anyhow::Result<()> {
    let admin = PgPool::connect(&env.cluster.url("postgres")).await?;
    let loaded: String = sqlx::query_scalar("select current_setting('shared_preload_libraries')")
        .fetch_one(&admin)
        .await?;
    if loaded.contains("pg_stat_statements") == on {
        if on {
            sqlx::query("create extension if not exists pg_stat_statements")
                .execute(&admin)
                .await?;
        }
        admin.close().await;
        return Ok(());
    }
    let statement = if on {
        "alter system set shared_preload_libraries = 'pg_stat_statements'"
    } else {
        "alter system reset shared_preload_libraries"
    };
    sqlx::query(statement).execute(&admin).await?;
    admin.close().await;
    let base = env.cluster.base_dir.clone();
    let cluster = tokio::task::spawn_blocking(move || {
        connectord::dev::pgcluster::Cluster::stop_at(&base)?;
        connectord::dev::pgcluster::Cluster::ensure_running(&base)
    })
    .await
    .context("cluster restart thread")?
    .context("restarting the bench's PostgreSQL")?;
    env.cluster = cluster;
    if on {
        let admin = PgPool::connect(&env.cluster.url("postgres")).await?;
        sqlx::query("create extension if not exists pg_stat_statements")
            .execute(&admin)
            .await?;
        admin.close().await;
    }
    Ok(())
}

/// A fresh database for the simulation (dropping those of bench runs that
/// no longer run).
async fn create(env: &Env) -> anyhow::Result<Sim> {
    let admin = PgPoolOptions::new()
        .max_connections(2)
        .connect(&env.cluster.url("postgres"))
        .await?;
    super::setup::drop_stale_databases(&admin, "sim").await;
    let database = format!("sim_{}", std::process::id());
    sqlx::query(&format!("create database {database}"))
        .execute(&admin)
        .await?;
    let url = env.cluster.url(&database);
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(&url)
        .await?;
    connectord::db::migrate(&pool).await?;
    Ok(Sim {
        database,
        url,
        pool,
        admin,
    })
}

/// The million: connections, credentials sealed as `credentials set` seals
/// them, and schedules, in bulk.
async fn seed(pool: &PgPool, keyring: &std::sync::Arc<Keyring>) -> anyhow::Result<()> {
    let zones = ["UTC", "Europe/Paris", "America/New_York", "Asia/Tokyo"];
    let next_month = chrono::Datelike::month(&chrono::Utc::now()) % 12 + 1;
    for start in (0..CONNECTIONS).step_by(CHUNK) {
        let end = (start + CHUNK).min(CONNECTIONS);
        let ids: Vec<i64> = (start..end).map(|i| i as i64 + 1).collect();
        let names: Vec<String> = (start..end).map(|i| format!("sim-{i:07}")).collect();
        let sealing = {
            let keyring = keyring.clone();
            let names = names.clone();
            let ids = ids.clone();
            tokio::task::spawn_blocking(move || {
                let mut key_ids = Vec::with_capacity(names.len());
                let mut nonces = Vec::with_capacity(names.len());
                let mut ciphertexts = Vec::with_capacity(names.len());
                for (name, id) in names.iter().zip(&ids) {
                    let token = Plaintext::StaticSecret(Secret::new(format!("token-of-{name}")));
                    let sealed = keyring.seal(
                        &Binding {
                            connection_id: name,
                            credential_id: *id,
                            kind: "static_secret",
                            key_id: keyring.primary_id(),
                            connector: Some("probe"),
                        },
                        &token.encode(),
                    )?;
                    key_ids.push(sealed.key_id);
                    nonces.push(sealed.nonce);
                    ciphertexts.push(sealed.ciphertext);
                }
                Ok::<_, anyhow::Error>((key_ids, nonces, ciphertexts))
            })
        };
        let crons: Vec<String> = (start..end)
            .map(|i| {
                if i < FIRING {
                    EVERY_SECOND.to_owned()
                } else {
                    // Yearly, next month: a time of day and one of seven
                    // days, 10,080 distinct expressions.
                    format!(
                        "{} {} {} {next_month} *",
                        i % 60,
                        (i / 60) % 24,
                        1 + (i / 1440) % 7
                    )
                }
            })
            .collect();
        let tz: Vec<&str> = (start..end).map(|i| zones[i % zones.len()]).collect();
        sqlx::query(
            "insert into connections (id, connector, owner)
             select id, 'probe', 'sim' from unnest($1::text[]) as id",
        )
        .bind(&names)
        .execute(pool)
        .await?;
        let (key_ids, nonces, ciphertexts) = sealing.await.context("sealing thread")??;
        sqlx::query(
            "insert into credentials (id, connection_id, kind, status, key_id, nonce, ciphertext, sealed_for)
             select id, connection_id, 'static_secret', 'active', key_id, nonce, ciphertext, 'probe'
             from unnest($1::bigint[], $2::text[], $3::text[], $4::bytea[], $5::bytea[])
                 as t(id, connection_id, key_id, nonce, ciphertext)",
        )
        .bind(&ids)
        .bind(&names)
        .bind(&key_ids)
        .bind(&nonces)
        .bind(&ciphertexts)
        .execute(pool)
        .await?;
        sqlx::query(
            "insert into schedules (id, connection_id, cron, timezone)
             select * from unnest($1::bigint[], $2::text[], $3::text[], $4::text[])",
        )
        .bind(&ids)
        .bind(&names)
        .bind(&crons)
        .bind(&tz)
        .execute(pool)
        .await?;
    }
    for table in ["credentials", "schedules"] {
        sqlx::query(&format!(
            "select setval(pg_get_serial_sequence('{table}', 'id'), (select max(id) from {table}))"
        ))
        .execute(pool)
        .await?;
    }
    sqlx::query("vacuum analyze").execute(pool).await?;
    Ok(())
}

/// Waits until the priming daemon has written every row's `next_fire_at`.
async fn wait_written(pool: &PgPool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let unwritten: i64 =
            sqlx::query_scalar("select count(*) from schedules where next_fire_at is null")
                .fetch_one(pool)
                .await?;
        if unwritten == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{unwritten} schedules still without next_fire_at after the first start");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One daemon's config; `tag` names its instance.
fn write_config(env: &Env, sim: &Sim, tag: &str) -> anyhow::Result<PathBuf> {
    let path = env.work.join(format!("sim-{tag}.toml"));
    let text = format!(
        r#"[database]
url = "{url}"
max_connections = 5

[keys]
dir = "{keys}"
primary = "k1"

[daemon]
instance_id = "sim-{tag}"
max_concurrent_runs = 32
lease = "{lease}s"

{probe_connector}

[sandbox]
enabled = false
"#,
        url = sim.url,
        keys = env.keys_dir.display(),
        lease = LEASE.as_secs(),
        probe_connector = super::setup::probe_connector(&env.probe, &env.fifo),
    );
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// The counters read at either end of the window.
struct Mark {
    statements: f64,
    /// Calls by statement (`queryid`), with the statement's first words.
    by_statement: HashMap<i64, (String, f64)>,
    wal: String,
    /// One per daemon, then PostgreSQL's processes.
    daemons: Vec<procfs::CpuMark>,
    postgres: procfs::CpuMark,
    at: chrono::DateTime<chrono::Utc>,
}

impl Mark {
    async fn take(sim: &Sim, pids: &[u32], data_dir: &std::path::Path) -> anyhow::Result<Mark> {
        let (statements, wal, at): (f64, String, chrono::DateTime<chrono::Utc>) = sqlx::query_as(
            "select coalesce(sum(calls), 0)::float8, pg_current_wal_lsn()::text, clock_timestamp()
             from pg_stat_statements
             where dbid = (select oid from pg_database where datname = $1)",
        )
        .bind(&sim.database)
        .fetch_one(&sim.admin)
        .await?;
        let rows: Vec<(i64, String, f64)> = sqlx::query_as(
            "select queryid, left(regexp_replace(query, '\\s+', ' ', 'g'), 60), calls::float8
             from pg_stat_statements
             where dbid = (select oid from pg_database where datname = $1)",
        )
        .bind(&sim.database)
        .fetch_all(&sim.admin)
        .await?;
        let by_statement = rows
            .into_iter()
            .map(|(id, text, calls)| (id, (text, calls)))
            .collect();
        Ok(Mark {
            statements,
            by_statement,
            wal,
            daemons: pids.iter().map(|&p| procfs::CpuMark::take(&[p])).collect(),
            postgres: procfs::CpuMark::take(&procfs::postgres_pids(data_dir)),
            at,
        })
    }
}

/// `schedules` rows updated, every backend's counts included once they
/// have exited.
async fn schedule_writes(sim: &Sim) -> anyhow::Result<f64> {
    Ok(sqlx::query_scalar(
        "select (n_tup_upd + n_tup_del)::float8 from pg_stat_user_tables where relname = 'schedules'",
    )
    .fetch_one(&sim.pool)
    .await?)
}

async fn configuration(
    env: &mut Env,
    sim: &Sim,
    count: usize,
    window: Duration,
    report: &mut Report,
) -> anyhow::Result<Measured> {
    report.say("");
    report.say(&format!("sim: {count} daemon(s)"));
    sqlx::query("truncate run_commands, runs")
        .execute(&sim.pool)
        .await?;
    let writes_before = schedule_writes(sim).await?;

    let mut daemons = Vec::new();
    let mut ready = Vec::new();
    let mut peaks = Vec::new();
    for i in 0..count {
        let tag = format!("{count}-{i}");
        let config = write_config(env, sim, &tag)?;
        let mut daemon =
            Daemon::start_on(env, &sim.url, Some(&config), "info", &format!("sim-{tag}"))?;
        ready.push(
            daemon
                .wait_ready(Duration::from_secs(300))
                .await?
                .as_secs_f64(),
        );
        peaks.push(procfs::peak_rss_mib(daemon.pid()).unwrap_or(f64::NAN));
        daemons.push((format!("sim-{tag}"), daemon));
    }
    let pids: Vec<u32> = daemons.iter().map(|(_, d)| d.pid()).collect();
    // Settle: the load's pages are given back after ready, and the first
    // ticks catch up what passed since the last configuration stopped.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let settled: Vec<f64> = pids
        .iter()
        .map(|&pid| procfs::rss_mib(pid).unwrap_or(f64::NAN))
        .collect();
    report.add(Figure::new(
        format!("sim {count}: spawn to ready, 1M schedules loaded"),
        Unit::Seconds,
        &ready,
    ));
    report.add(Figure::new(
        format!("sim {count}: peak RSS per daemon (the load)"),
        Unit::MiB,
        &peaks,
    ));
    report.add(Figure::new(
        format!("sim {count}: RSS per daemon, settled"),
        Unit::MiB,
        &settled,
    ));
    let worst_settled = settled.iter().copied().fold(0.0, f64::max);
    // The first daemon loads alone; the others load while the ones before
    // them fire and run 250 runs a second on the same two cores.
    let first_ready = ready.first().copied().unwrap_or(f64::NAN);
    report.check(
        format!("P11 RSS of a daemon holding 1M schedules, {count} daemon(s) (< 100 MiB)"),
        format!(
            "{worst_settled:.1} MiB settled, {:.1} MiB peak",
            peaks.iter().copied().fold(0.0, f64::max)
        ),
        Some(worst_settled < 100.0),
    );
    report.check(
        format!("P11 load of 1M schedules, first of {count} daemon(s) (a few seconds: <= 5 s)"),
        format!("{first_ready:.2} s"),
        Some(first_ready <= 5.0),
    );

    env.records.drain();
    let data_dir = env.cluster.base_dir.join("data");
    let first = Mark::take(sim, &pids, &data_dir).await?;
    tokio::time::sleep(window).await;
    let last = Mark::take(sim, &pids, &data_dir).await?;
    // The window's last ticks finish.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let (runs, wal): (i64, f64) = sqlx::query_as(
        "select (select count(*) from runs where finished_at >= $1 and finished_at < $2),
                pg_wal_lsn_diff($4::pg_lsn, $3::pg_lsn)::float8",
    )
    .bind(first.at)
    .bind(last.at)
    .bind(&first.wal)
    .bind(&last.wal)
    .fetch_one(&sim.pool)
    .await?;
    let runs_f = runs.max(1) as f64;
    let statements_per_run = (last.statements - first.statements) / runs_f;
    let wal_per_run = wal / runs_f;
    let seconds = (last.at - first.at).num_milliseconds() as f64 / 1000.0;
    report.say(&format!(
        "sim {count}: {runs} runs in {seconds:.1}s ({:.0}/s); {statements_per_run:.2} statements and {wal_per_run:.0} WAL bytes per run",
        runs as f64 / seconds
    ));
    // Where the statements go: the five most called, per run.
    let mut per_statement: Vec<(String, f64)> = last
        .by_statement
        .iter()
        .map(|(id, (text, calls))| {
            let before = first.by_statement.get(id).map_or(0.0, |(_, c)| *c);
            (text.trim().to_owned(), (calls - before) / runs_f)
        })
        .filter(|(_, per_run)| *per_run > 0.0)
        .collect();
    per_statement.sort_by(|a, b| b.1.total_cmp(&a.1));
    for (text, per_run) in per_statement.iter().take(5) {
        report.say(&format!("sim {count}:   {per_run:.3} per run: {text}"));
    }
    report.add(Figure::single(
        format!("sim {count}: runs finished per second"),
        Unit::PerSecond,
        runs as f64 / seconds,
    ));
    let per_daemon: Vec<f64> = last
        .daemons
        .iter()
        .zip(&first.daemons)
        .map(|(b, a)| b.percent_since(a).1)
        .collect();
    report.add(Figure::single(
        format!("sim {count}: CPU of all daemons together (% of a core)"),
        Unit::Percent,
        per_daemon.iter().sum(),
    ));
    report.add(Figure::new(
        format!("sim {count}: CPU per daemon (% of a core)"),
        Unit::Percent,
        &per_daemon,
    ));
    report.add(Figure::single(
        format!("sim {count}: CPU of PostgreSQL (% of a core)"),
        Unit::Percent,
        last.postgres.percent_since(&first.postgres).1,
    ));

    let lateness: Vec<f64> = sqlx::query_scalar(
        "select extract(epoch from created_at - scheduled_for)::float8 * 1000
         from run_commands where trigger = 'scheduled'
           and scheduled_for >= $1 and scheduled_for < $2",
    )
    .bind(first.at)
    .bind(last.at)
    .fetch_all(&sim.pool)
    .await?;
    report.add(Figure::new(
        format!("sim {count}: tick lateness (tick to command insert)"),
        Unit::Millis,
        &lateness,
    ));
    let inserted: Vec<(i64, f64)> = sqlx::query_as(
        "select r.id, extract(epoch from c.created_at)::float8
         from runs r join run_commands c on c.id = r.command_id
         where c.trigger = 'scheduled' and c.scheduled_for >= $1 and c.scheduled_for < $2",
    )
    .bind(first.at)
    .bind(last.at)
    .fetch_all(&sim.pool)
    .await?;
    let started: HashMap<i64, i64> = env.records.started_by_run();
    let pickup: Vec<f64> = inserted
        .iter()
        .filter_map(|(run, at)| started.get(run).map(|ns| (*ns as f64 / 1e9 - at) * 1000.0))
        .collect();
    report.add(Figure::new(
        format!("sim {count}: pickup under load (command insert to child start)"),
        Unit::Millis,
        &pickup,
    ));

    let (missed, doubled, not_succeeded): (i64, i64, i64) = sqlx::query_as(
        "select
           (select count(*) from schedules s
              cross join generate_series(date_trunc('second', $1::timestamptz) + interval '1 second',
                                         $2::timestamptz - interval '1 microsecond',
                                         interval '1 second') as g(at)
             where s.cron = $3
               and not exists (select from run_commands c
                               where c.schedule_id = s.id and c.scheduled_for = g.at)),
           (select count(*) from (select from runs
              where trigger = 'scheduled' and scheduled_for >= $1 and scheduled_for < $2
              group by schedule_id, scheduled_for having count(*) > 1) d),
           (select count(*) from runs
             where trigger = 'scheduled' and scheduled_for >= $1 and scheduled_for < $2
               and status <> 'succeeded')",
    )
    .bind(first.at)
    .bind(last.at)
    .bind(EVERY_SECOND)
    .fetch_one(&sim.pool)
    .await?;
    report.say(&format!(
        "sim {count}: missed ticks {missed}, doubled ticks {doubled}, runs of the window not succeeded {not_succeeded}"
    ));
    report.check(
        format!("P11 missed and doubled ticks, {count} daemon(s) (0)"),
        format!("{missed} missed, {doubled} doubled"),
        Some(missed == 0 && doubled == 0),
    );

    if count >= 3 {
        failover(sim, count, &mut daemons, report).await?;
    }
    for (_, daemon) in daemons {
        daemon.stop().await?;
    }
    let writes = schedule_writes(sim).await? - writes_before;
    let ticks: i64 =
        sqlx::query_scalar("select count(*) from run_commands where trigger = 'scheduled'")
            .fetch_one(&sim.pool)
            .await?;
    let per_tick = writes / ticks.max(1) as f64;
    report.say(&format!(
        "sim {count}: schedules row writes over the configuration's life: {writes:.0} for {ticks} ticks ({per_tick:.3} per tick)"
    ));
    report.check(
        format!("P11 schedules row writes per tick, {count} daemon(s) (<= 1)"),
        format!("{per_tick:.3}"),
        Some(per_tick <= 1.0),
    );
    Ok(Measured {
        daemons: count,
        statements_per_run,
        wal_per_run,
    })
}

/// Kills the leader and measures the handover.
async fn failover(
    sim: &Sim,
    count: usize,
    daemons: &mut Vec<(String, Daemon)>,
    report: &mut Report,
) -> anyhow::Result<()> {
    let (holder, term): (String, i64) = sqlx::query_as("select holder, term from schedule_leader")
        .fetch_one(&sim.pool)
        .await?;
    let Some(at) = daemons.iter().position(|(id, _)| *id == holder) else {
        bail!("the leader {holder} is none of the bench's daemons");
    };
    let (_, leader) = daemons.remove(at);
    let killed_at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("select clock_timestamp()")
        .fetch_one(&sim.pool)
        .await?;
    leader.kill().await?;
    let deadline = Instant::now() + LEASE * 3;
    let acquired_at = loop {
        let taken: Option<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
            "select acquired_at from schedule_leader where term > $1 and holder <> $2",
        )
        .bind(term)
        .bind(&holder)
        .fetch_optional(&sim.pool)
        .await?;
        if let Some(at) = taken {
            break at;
        }
        if Instant::now() > deadline {
            bail!("no daemon took the schedules over within {:?}", LEASE * 3);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Ticks after the takeover flow for a few seconds.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = acquired_at + chrono::Duration::seconds(1);
    let until = after + chrono::Duration::seconds(2);
    let (gap, gap_fired_once, gap_doubled, missed_after): (f64, i64, i64, i64) = sqlx::query_as(
        "select
           (select extract(epoch from min(created_at) - $1)::float8
              from run_commands where trigger = 'scheduled' and created_at > $1),
           -- each firing schedule: how many of the ticks that fell in
           -- the gap its new leader fired (the most recent, once)
           (select count(*) from (
              select c.schedule_id from run_commands c
              join schedules s on s.id = c.schedule_id and s.cron = $5
              where c.created_at >= $2 and c.scheduled_for <= $2
              group by c.schedule_id having count(*) = 1) once),
           (select count(*) from (select from runs
              where trigger = 'scheduled' and scheduled_for > $1 - interval '2 seconds'
              group by schedule_id, scheduled_for having count(*) > 1) d),
           (select count(*) from schedules s
              cross join generate_series(date_trunc('second', $3::timestamptz) + interval '1 second',
                                         $4::timestamptz, interval '1 second') as g(at)
             where s.cron = $5
               and not exists (select from run_commands c
                               where c.schedule_id = s.id and c.scheduled_for = g.at))",
    )
    .bind(killed_at)
    .bind(acquired_at)
    .bind(after)
    .bind(until)
    .bind(EVERY_SECOND)
    .fetch_one(&sim.pool)
    .await?;
    let takeover = (acquired_at - killed_at).num_milliseconds() as f64 / 1000.0;
    report.say(&format!(
        "sim {count}: leader killed; taken over after {takeover:.2}s, first fire after {gap:.2}s; \
         {gap_fired_once} of {FIRING} schedules fired their gap once; {gap_doubled} ticks doubled; {missed_after} missed after"
    ));
    report.add(Figure::single(
        format!("sim {count}: failover gap (SIGKILL of the leader to the next fire)"),
        Unit::Seconds,
        gap,
    ));
    let bound = LEASE.as_secs_f64() + 1.0;
    report.check(
        format!("P11 failover gap, {count} daemons (<= lease + 1 s = {bound:.0} s, nothing doubled or missed)"),
        format!("{gap:.2} s; {gap_fired_once}/{FIRING} gaps fired once, {gap_doubled} doubled, {missed_after} missed"),
        Some(gap <= bound && gap_fired_once == FIRING as i64 && gap_doubled == 0 && missed_after == 0),
    );
    Ok(())
}
