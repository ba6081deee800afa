//! The real daemon, `connectord --config F run`, as a child process of the
//! bench, with its log kept in a file and its readiness timed.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tokio::sync::oneshot;

use super::setup::Env;

/// A running `connectord run`.
pub struct Daemon {
    child: Child,
    ready: Option<oneshot::Receiver<Instant>>,
    spawned_at: Instant,
    pub log_path: PathBuf,
}

impl Daemon {
    /// Starts the daemon with `config` (the env's own when `None`);
    /// `rust_log` is its `RUST_LOG`.
    pub fn start(
        env: &Env,
        config: Option<&Path>,
        rust_log: &str,
        tag: &str,
    ) -> anyhow::Result<Daemon> {
        Daemon::start_on(env, &env.url, config, rust_log, tag)
    }

    /// As `start`, on the database at `url`.
    pub fn start_on(
        env: &Env,
        url: &str,
        config: Option<&Path>,
        rust_log: &str,
        tag: &str,
    ) -> anyhow::Result<Daemon> {
        let log_path = env.work.join(format!("daemon-{tag}.log"));
        let mut log = std::io::BufWriter::new(
            std::fs::File::create(&log_path)
                .with_context(|| format!("creating {}", log_path.display()))?,
        );
        // BENCH_DAEMON_WRAPPER (e.g. "heaptrack -o target/x") runs the
        // daemon under a profiler; its figures are then the profiler's.
        let wrapper = std::env::var("BENCH_DAEMON_WRAPPER").unwrap_or_default();
        let mut words = wrapper.split_whitespace();
        let mut command = match words.next() {
            Some(program) => {
                let mut command = Command::new(program);
                command.args(words).arg(&env.daemon_bin);
                command
            }
            None => Command::new(&env.daemon_bin),
        };
        let spawned_at = Instant::now();
        let mut child = command
            .arg("--config")
            .arg(config.unwrap_or(&env.config_path))
            .arg("--log-format")
            .arg("json")
            .arg("run")
            .env("DATABASE_URL", url)
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", env.daemon_bin.display()))?;
        let stderr = child
            .stderr
            .take()
            .context("the daemon's stderr was piped but is missing")?;
        let (ready_tx, ready_rx) = oneshot::channel();
        std::thread::Builder::new()
            .name(format!("daemon-log-{tag}"))
            .spawn(move || {
                let mut ready = Some(ready_tx);
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if line.contains("connectord ready") {
                        if let Some(tx) = ready.take() {
                            let _ = tx.send(Instant::now());
                        }
                    }
                    let _ = writeln!(log, "{line}");
                }
                let _ = log.flush();
            })
            .context("starting the daemon log reader")?;
        Ok(Daemon {
            child,
            ready: Some(ready_rx),
            spawned_at,
            log_path,
        })
    }

    /// Waits for "connectord ready"; returns the time from spawn to it.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<Duration> {
        let Some(rx) = self.ready.take() else {
            bail!("wait_ready called twice");
        };
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(at)) => Ok(at.duration_since(self.spawned_at)),
            _ => bail!(
                "the daemon was not ready within {timeout:?}; see {}",
                self.log_path.display()
            ),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, as a crash or `kill -9`; returns once it is reaped.
    pub async fn kill(mut self) -> anyhow::Result<()> {
        self.child.kill().context("killing the daemon")?;
        tokio::task::spawn_blocking(move || self.child.wait())
            .await
            .context("waiting for the daemon")?
            .context("waiting for the daemon")?;
        Ok(())
    }

    /// SIGTERM, then waits for it to exit (it settles its runs first).
    pub async fn stop(mut self) -> anyhow::Result<()> {
        // SAFETY: kill(2) on the pid of our own unreaped child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let status = tokio::task::spawn_blocking(move || self.child.wait())
            .await
            .context("waiting for the daemon")?
            .context("waiting for the daemon")?;
        if !status.success() {
            bail!("the daemon exited with {status}");
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A bench that fails part way must not leave a daemon claiming
        // commands behind it; after a clean stop both calls are no-ops.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `perf record` attached to a process for one phase, when asked for.
pub struct Perf {
    child: Option<Child>,
}

impl Perf {
    /// No profile for this phase.
    pub fn attach_none() -> Perf {
        Perf { child: None }
    }

    pub fn attach(env: &Env, pid: u32, phase: &str) -> Perf {
        if !env.mode.perf {
            return Perf { child: None };
        }
        let out = env.work.join(format!("perf-{phase}.data"));
        let child = Command::new("perf")
            .args(["record", "-F", "1999", "-g", "-o"])
            .arg(&out)
            .arg("-p")
            .arg(pid.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        match child {
            Ok(child) => {
                eprintln!("bench: perf recording {phase} into {}", out.display());
                // perf needs a moment to attach before the phase starts.
                std::thread::sleep(Duration::from_millis(300));
                Perf { child: Some(child) }
            }
            Err(e) => {
                eprintln!("bench: cannot run perf ({e}); continuing without a profile");
                Perf { child: None }
            }
        }
    }

    pub fn finish(mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on the pid of our own unreaped child; SIGINT
            // makes perf write its data file and exit.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGINT);
            }
            let _ = child.wait();
        }
    }
}
