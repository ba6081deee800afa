//! The baselines built into the bench: a minimal daemon and a spawn-only
//! loop, each on its own two-worker tokio runtime (what connectord gets on
//! this machine), so they do not share threads with the measuring code.
//!
//! The minimal daemon is the floor of "a command row becomes a child" on
//! PostgreSQL: LISTEN on the same channel as connectord, one
//! `FOR UPDATE SKIP LOCKED` claim per wake-up, spawn the probe, wait for it,
//! and one statement that records the run and marks the command done. It
//! works on the same tables (and so pays the same triggers and indexes) as
//! connectord; the two never run at the same time. What it leaves out is
//! what connectord adds: admission checks, the per-connection run slot,
//! credential resolution, leases, output supervision and logging.

use std::io;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::PgPool;
use tokio::io::AsyncReadExt as _;
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use connectord::config::SpawnMethod;
use connectord::run::spawn::{self, CStrings};

/// A two-worker multi-thread runtime, like the daemon's on a 2-core machine.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building a baseline runtime")
}

/// The minimal daemon, running on its own thread and runtime.
pub struct Minimal {
    stop: CancellationToken,
    thread: std::thread::JoinHandle<anyhow::Result<()>>,
}

impl Minimal {
    /// Starts it and waits until it is listening.
    pub async fn start(
        url: &str,
        probe: &Path,
        fifo: &Path,
        in_flight: usize,
    ) -> anyhow::Result<Minimal> {
        let stop = CancellationToken::new();
        let (ready_tx, ready_rx) = oneshot::channel();
        let (url, probe, fifo) = (url.to_owned(), probe.to_owned(), fifo.to_owned());
        let token = stop.clone();
        let thread = std::thread::Builder::new()
            .name("minimal-daemon".into())
            .spawn(move || runtime()?.block_on(serve(url, probe, fifo, in_flight, token, ready_tx)))
            .context("starting the minimal daemon thread")?;
        ready_rx
            .await
            .context("the minimal daemon stopped before it was listening")?;
        Ok(Minimal { stop, thread })
    }

    /// Stops claiming, lets running probes finish, and joins the thread.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        tokio::task::spawn_blocking(move || self.thread.join())
            .await
            .context("joining the minimal daemon")?
            .map_err(|_| anyhow::anyhow!("the minimal daemon panicked"))?
    }
}

async fn serve(
    url: String,
    probe: PathBuf,
    fifo: PathBuf,
    in_flight: usize,
    stop: CancellationToken,
    ready: oneshot::Sender<()>,
) -> anyhow::Result<()> {
    let pool = PgPoolOptions::new()
        .max_connections(10)
        .connect(&url)
        .await?;
    let mut listener = PgListener::connect_with(&pool).await?;
    listener.listen("connectord_commands").await?;
    let _ = ready.send(());
    let slots = Arc::new(Semaphore::new(in_flight));
    let probe = Arc::new((probe, fifo));
    let mut tasks = JoinSet::new();
    loop {
        let free = slots.available_permits();
        if free > 0 {
            let claimed: Vec<(i64, String, String)> = sqlx::query_as(
                "update run_commands set status = 'claimed', claimed_by = 'minimal', claimed_at = now()
                 where id in (select id from run_commands
                              where status = 'pending' and not_before <= now()
                              order by not_before, id
                              limit $1
                              for update skip locked)
                 returning id, connection_id, trigger",
            )
            .bind(free as i64)
            .fetch_all(&pool)
            .await?;
            let full_batch = claimed.len() == free;
            for command in claimed {
                // Only this loop takes permits, and it counted them above.
                let permit = slots.clone().try_acquire_owned()?;
                let (pool, probe) = (pool.clone(), probe.clone());
                tasks.spawn(async move {
                    let _permit = permit;
                    run_one(&pool, &probe.0, &probe.1, command).await
                });
            }
            if full_batch {
                // There may be more waiting than there were slots.
                continue;
            }
        }
        tokio::select! {
            received = listener.recv() => { received?; }
            Some(done) = tasks.join_next(), if !tasks.is_empty() => { done??; }
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = stop.cancelled() => break,
        }
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    pool.close().await;
    Ok(())
}

/// Spawns the probe for one command, waits for it, records the run.
async fn run_one(
    pool: &PgPool,
    probe: &Path,
    fifo: &Path,
    (id, connection_id, trigger): (i64, String, String),
) -> anyhow::Result<()> {
    let spawned = tokio::process::Command::new(probe)
        .env_clear()
        .env("PROBE_OUT", fifo)
        .env("CONNECTORD_RUN_ID", id.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let (status, pid, exit_code) = match spawned {
        Ok(mut child) => {
            let pid = child.id().map(|p| p as i32);
            let exit = child.wait().await?;
            let status = if exit.success() {
                "succeeded"
            } else {
                "failed"
            };
            (status, pid, exit.code())
        }
        Err(_) => ("failed", None, None),
    };
    sqlx::query(
        "with r as (
             insert into runs (command_id, connection_id, trigger, status, instance_id, pid,
                               exit_code, started_at, finished_at)
             values ($1, $2, $3, $4, 'minimal', $5, $6, now(), now())
         )
         update run_commands set status = 'done' where id = $1",
    )
    .bind(id)
    .bind(connection_id)
    .bind(trigger)
    .bind(status)
    .bind(pid)
    .bind(exit_code)
    .execute(pool)
    .await?;
    Ok(())
}

/// The programs the spawn-only loops start, and where probes report.
#[derive(Debug, Clone)]
pub struct Programs {
    pub probe: PathBuf,
    pub fifo: PathBuf,
}

/// How the spawn-only loop starts each probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpawnStyle {
    /// `posix_spawn` through the standard library, null stdio and a plain
    /// environment: the ceiling.
    Plain,
    /// `connectord::run::spawn`, as `child::spawn` uses it: `clone(CLONE_VM |
    /// CLONE_VFORK)`, `PR_SET_PDEATHSIG`, its own process group, piped
    /// stdout and stderr drained by tasks, a pidfd to wait on.
    Connectord,
    /// The same guarantees the obvious way, for comparison: the standard
    /// library with a `pre_exec` hook, which makes it `fork`.
    ForkHook,
}

/// Spawns the probe `count` times with `in_flight` at once; returns the
/// time from the first spawn to the last exit.
pub fn spawn_only(
    programs: &Programs,
    count: usize,
    in_flight: usize,
    style: SpawnStyle,
) -> anyhow::Result<Duration> {
    let programs = Arc::new(programs.clone());
    runtime()?.block_on(async move {
        let slots = Arc::new(Semaphore::new(in_flight));
        let mut tasks = JoinSet::new();
        let started = Instant::now();
        for i in 0..count {
            let permit = slots.clone().acquire_owned().await?;
            let programs = programs.clone();
            tasks.spawn(async move {
                let _permit = permit;
                spawn_and_wait(&programs, i as i64, style).await
            });
            // Reap finished tasks as we go so the set stays small.
            while let Some(done) = tasks.try_join_next() {
                done??;
            }
        }
        while let Some(done) = tasks.join_next().await {
            done??;
        }
        Ok(started.elapsed())
    })
}

/// Spawns the probe `count` times, one at a time; returns each probe's id
/// (its `CONNECTORD_RUN_ID`) with `CLOCK_REALTIME` just before its spawn,
/// so the caller can pair them with the probes' own start times.
pub fn spawn_one_at_a_time(
    programs: &Programs,
    count: usize,
    style: SpawnStyle,
) -> anyhow::Result<Vec<(i64, i64)>> {
    runtime()?.block_on(async move {
        let mut out = Vec::with_capacity(count);
        for i in 0..count {
            let id = 2_000_000_000 + i as i64;
            let before = super::setup::realtime_ns();
            spawn_and_wait(programs, id, style).await?;
            out.push((id, before));
        }
        Ok(out)
    })
}

async fn spawn_and_wait(programs: &Programs, id: i64, style: SpawnStyle) -> anyhow::Result<()> {
    let id = id.to_string();
    let fifo = programs.fifo.as_os_str().as_bytes();
    let vars: [(&str, &[u8]); 7] = [
        ("PROBE_OUT", fifo),
        ("CONNECTORD_RUN_ID", id.as_bytes()),
        ("PATH", b"/usr/bin:/bin"),
        ("CONNECTORD_CONNECTION_ID", b"bench-0000"),
        ("CONNECTORD_TRIGGER", b"manual"),
        ("CONNECTORD_ATTEMPT", b"1"),
        ("PROBE_TOKEN", b"token"),
    ];
    if style == SpawnStyle::Connectord {
        let env = vars.map(|(name, value)| [name.as_bytes(), b"=", value]);
        let env = CStrings::new(&env)?;
        let argv = CStrings::new(&[[programs.probe.as_os_str().as_bytes()]])?;
        let mut spawned = spawn::spawn(&programs.probe, &argv, &env, &[], SpawnMethod::Vfork)?;
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let (stdout, stderr) = (&mut spawned.stdout, &mut spawned.stderr);
        let (a, b) = tokio::join!(stdout.read_to_end(&mut out), stderr.read_to_end(&mut err));
        a?;
        b?;
        let status = spawned.process.wait().await?;
        anyhow::ensure!(status.success(), "probe exited with {status}");
        return Ok(());
    }
    let mut command = tokio::process::Command::new(&programs.probe);
    command
        .env_clear()
        .env("PROBE_OUT", &programs.fifo)
        .env("CONNECTORD_RUN_ID", &id)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if style == SpawnStyle::Plain {
        command.stdout(Stdio::null()).stderr(Stdio::null());
        let status = command.spawn()?.wait().await?;
        anyhow::ensure!(status.success(), "probe exited with {status}");
        return Ok(());
    }
    for (name, value) in vars {
        command.env(name, std::ffi::OsStr::from_bytes(value));
    }
    command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: the hook runs in the forked child before exec and calls only
    // prctl, which is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn()?;
    let mut readers = JoinSet::new();
    if let Some(mut out) = child.stdout.take() {
        readers.spawn(async move {
            let mut sink = Vec::new();
            out.read_to_end(&mut sink).await
        });
    }
    if let Some(mut err) = child.stderr.take() {
        readers.spawn(async move {
            let mut sink = Vec::new();
            err.read_to_end(&mut sink).await
        });
    }
    let status = child.wait().await?;
    while let Some(done) = readers.join_next().await {
        done??;
    }
    anyhow::ensure!(status.success(), "probe exited with {status}");
    Ok(())
}
