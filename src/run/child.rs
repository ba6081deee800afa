//! Spawning and supervising one connector child.
//!
//! A child runs in its own process group, with its stdin a pipe kept open
//! for the run (the daemon writes on it only the answers SPEC §14 names)
//! and its output piped,
//! so a timeout or shutdown can signal everything it started, and so it dies
//! with the daemon: `PR_SET_PDEATHSIG` is set before `exec`, which covers the
//! daemon being killed with SIGKILL, where no destructor runs. Output is read
//! line by line with a cap per line, so no amount of output grows our memory,
//! and logging is rate-limited per stream with a count of what was dropped.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::net::unix::pipe;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::{ConnectorConfig, SpawnMethod};
use crate::printable::printable;
use crate::run::child_env::ChildEnv;
use crate::run::protocol::{self, Line, Message};
use crate::run::spawn::{self, CStrings, Process};
use crate::sandbox::{self, Report, Sandbox};

/// Longest stdout/stderr line kept; the rest of a longer line is discarded.
pub const MAX_LINE: usize = 64 * 1024;

/// A program that could not be started; the message names it.
#[derive(Debug, thiserror::Error)]
#[error("cannot start connector program {program}: {source}")]
pub struct SpawnError {
    pub program: String,
    pub source: io::Error,
}

/// A started child and the readers of its output.
pub struct Running {
    /// Killed if dropped before it was reaped.
    process: Process,
    pub pid: u32,
    /// Held for the run unless taken; dropping it ends the child's input.
    stdin: Option<pipe::Sender>,
    messages: mpsc::Receiver<Message>,
    /// The output readers, aborted if a process that escaped the group
    /// keeps the pipes open after the child ended.
    readers: Vec<tokio::task::JoinHandle<()>>,
    /// Set for a sandboxed child.
    jail: Option<Jail>,
}

/// How the child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

/// Why we ended the child, when we did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndedBy {
    Timeout,
    Shutdown,
    /// Another daemon took the run over (our lease had expired).
    Superseded,
    /// An operator cancelled the run.
    Cancelled,
}

#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub exit: Exit,
    pub ended_by: Option<EndedBy>,
}

/// Deadlines that bound a child's life.
pub struct Limits<'a> {
    pub timeout: Duration,
    pub kill_grace: Duration,
    pub shutdown_grace: Duration,
    pub shutdown: &'a CancellationToken,
    /// Cancelled when the run is found to belong to another daemon now.
    pub superseded: &'a CancellationToken,
    /// Cancelled when an operator cancels the run.
    pub cancelled: &'a CancellationToken,
}

/// Where a child runs.
#[derive(Clone, Copy)]
pub enum Confinement<'a> {
    /// With the daemon's own view of the machine (`[sandbox] enabled = false`).
    Unconfined,
    /// In the sandbox, with `run_dir` as its private directory.
    Sandboxed {
        sandbox: &'a Sandbox,
        run_dir: &'a Path,
    },
}

/// Starts the connector program with exactly `env`, created as `method`
/// says. A sandboxed child has started once this returns: its `exec`
/// inside the sandbox succeeded.
pub async fn spawn(
    connector: &ConnectorConfig,
    env: &ChildEnv,
    confinement: Confinement<'_>,
    method: SpawnMethod,
) -> Result<Running, SpawnError> {
    let error = |source| SpawnError {
        program: connector.command.display().to_string(),
        source,
    };
    let program = spawn::find_program(&connector.command, env.plain("PATH")).map_err(error)?;
    let program_name = connector.command.as_os_str().as_bytes();
    let mut argv: Vec<&[u8]> = vec![program_name];
    argv.extend(connector.args.iter().map(|a| a.as_bytes()));
    let env = env.block().map_err(error)?;
    let (mut spawned, jail) = match confinement {
        Confinement::Unconfined => {
            let entries: Vec<[&[u8]; 1]> = argv.iter().map(|a| [*a]).collect();
            let argv = CStrings::new(&entries).map_err(error)?;
            (
                spawn::spawn(&program, &argv, &env, &[], method).map_err(error)?,
                None,
            )
        }
        Confinement::Sandboxed { sandbox, run_dir } => {
            let launch = sandbox
                .launch(connector, run_dir, &program, &argv)
                .map_err(error)?;
            let spawned = spawn::spawn(&launch.program, &launch.argv, &env, &launch.pass, method)
                .map_err(error)?;
            drop(launch.write_ends);
            let status = pipe::Receiver::from_owned_fd(launch.channels.status).map_err(error)?;
            let info = pipe::Receiver::from_owned_fd(launch.channels.info).map_err(error)?;
            (spawned, Some((status, info)))
        }
    };
    drop(env);
    let jail = match jail {
        None => None,
        Some((status, info)) => Some(
            Jail::started(&mut spawned, status, info)
                .await
                .map_err(error)?,
        ),
    };
    let pid = spawned.process.pid();
    let (tx, messages) = mpsc::channel(64);
    let span = tracing::Span::current();
    let readers = vec![
        tokio::spawn(read_stdout(spawned.stdout, tx).instrument(span.clone())),
        tokio::spawn(read_stderr(spawned.stderr).instrument(span)),
    ];
    Ok(Running {
        process: spawned.process,
        pid,
        stdin: Some(spawned.stdin),
        messages,
        readers,
        jail,
    })
}

/// A sandboxed child's link to its init.
struct Jail {
    /// The init's status reports; the last one is the connector's end.
    status: pipe::Receiver,
    /// The init's pid, which SIGTERM goes to (the init passes it on); `None`
    /// if bubblewrap did not say, and then the whole sandbox is signalled.
    init_pid: Option<i32>,
}

/// How long the status of a sandboxed child that has ended may take to
/// arrive; it was written before the child's sandbox went away.
const REPORT_WAIT: Duration = Duration::from_secs(1);

impl Jail {
    /// Waits until the init reports the connector's `exec`, or why there
    /// is none.
    async fn started(
        spawned: &mut spawn::Spawned,
        mut status: pipe::Receiver,
        mut info: pipe::Receiver,
    ) -> io::Result<Jail> {
        match sandbox::next_report(&mut status).await {
            Report::Started => {}
            Report::ExecFailed(errno) => {
                let _ = spawned.process.wait().await;
                return Err(io::Error::from_raw_os_error(errno));
            }
            Report::Ended(_) | Report::Closed => {
                // bubblewrap said why on the child's stderr before it exited.
                let mut said = Vec::new();
                let _ = tokio::time::timeout(
                    REPORT_WAIT,
                    (&mut spawned.stderr).take(4096).read_to_end(&mut said),
                )
                .await;
                let status = spawned.process.wait().await?;
                let said = String::from_utf8_lossy(&said);
                let said = said.trim();
                return Err(io::Error::other(if said.is_empty() {
                    format!("the sandbox could not be set up ({status})")
                } else {
                    format!("the sandbox could not be set up: {said}")
                }));
            }
        }
        // Every writer has closed it by now: bubblewrap after writing, the
        // init before starting the connector.
        let mut text = Vec::new();
        let _ =
            tokio::time::timeout(REPORT_WAIT, (&mut info).take(4096).read_to_end(&mut text)).await;
        Ok(Jail {
            status,
            init_pid: sandbox::init_pid(&text),
        })
    }

    /// The connector's own end, once the sandbox has ended: bubblewrap's
    /// exit status folds a death by signal N into 128 + N, and is all there
    /// is when the init itself was killed.
    async fn ended(&mut self, bwrap_status: ExitStatus) -> ExitStatus {
        let report =
            tokio::time::timeout(REPORT_WAIT, sandbox::next_report(&mut self.status)).await;
        match (report, bwrap_status.code()) {
            (Ok(Report::Ended(raw)), _) => ExitStatus::from_raw(raw),
            (_, Some(code)) if code > 128 && code < 128 + 65 => ExitStatus::from_raw(code - 128),
            _ => bwrap_status,
        }
    }
}

/// Where a child's signals go.
#[derive(Clone, Copy)]
struct Target {
    /// The process group we started (a sandboxed child's holds bubblewrap).
    pgid: i32,
    /// A sandboxed child's init, which passes SIGTERM on to the connector.
    init_pid: Option<i32>,
}

impl Target {
    /// Asks the connector to stop.
    fn terminate(self) {
        match self.init_pid {
            // SAFETY: kill(2) has no memory-safety preconditions. The init
            // is bubblewrap's child, and bubblewrap is ours, unreaped, so
            // the pid names the init or, just after it ended, nothing.
            Some(pid) => unsafe {
                libc::kill(pid, libc::SIGTERM);
            },
            None => signal_group(self.pgid, libc::SIGTERM),
        }
    }

    /// Kills the connector and, for a sandboxed one, its whole sandbox.
    fn kill(self) {
        signal_group(self.pgid, libc::SIGKILL);
        if let Some(pid) = self.init_pid {
            // SAFETY: as in `terminate`.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

impl Running {
    /// The child's stdin, for whoever answers it; held here otherwise, so
    /// the pipe stays open for the run either way.
    pub fn take_stdin(&mut self) -> Option<pipe::Sender> {
        self.stdin.take()
    }

    /// Waits for the child to end, enforcing the timeout and shutdown, and
    /// passes each protocol message to `on_message` as it arrives.
    /// `on_message` must not wait: it runs between the checks of the
    /// timeout and shutdown.
    pub async fn supervise<F>(mut self, limits: Limits<'_>, mut on_message: F) -> Outcome
    where
        F: FnMut(Message),
    {
        let target = Target {
            pgid: self.pid as i32,
            init_pid: self.jail.as_ref().and_then(|jail| jail.init_pid),
        };
        let mut ended_by = None;
        let deadline = tokio::time::sleep(limits.timeout);
        tokio::pin!(deadline);
        // Armed when shutdown begins; protocol messages keep being served
        // meanwhile, so a chatty child is not stalled by a full pipe.
        let grace = tokio::time::sleep(Duration::MAX);
        tokio::pin!(grace);
        let mut grace_armed = false;
        let mut messages_open = true;
        let exited = loop {
            tokio::select! {
                exited = self.process.exited() => break exited,
                message = self.messages.recv(), if messages_open => match message {
                    Some(message) => on_message(message),
                    None => messages_open = false,
                },
                () = &mut deadline, if ended_by.is_none() => {
                    tracing::warn!(timeout = ?limits.timeout, "connector timed out; terminating its process group");
                    ended_by = Some(EndedBy::Timeout);
                    break terminate(&mut self.process, target, limits.kill_grace).await;
                }
                () = limits.shutdown.cancelled(), if ended_by.is_none() => {
                    ended_by = Some(EndedBy::Shutdown);
                    grace.as_mut().reset(tokio::time::Instant::now() + limits.shutdown_grace);
                    grace_armed = true;
                }
                () = &mut grace, if grace_armed => {
                    tracing::warn!("shutdown grace elapsed; terminating connector");
                    break terminate(&mut self.process, target, limits.kill_grace).await;
                }
                // A cancellation also cuts a shutdown's grace short: the
                // operator wants this run gone, not re-queued.
                () = limits.cancelled.cancelled(), if matches!(ended_by, None | Some(EndedBy::Shutdown)) => {
                    tracing::warn!("the run was cancelled; terminating its process group");
                    ended_by = Some(EndedBy::Cancelled);
                    break terminate(&mut self.process, target, limits.kill_grace).await;
                }
                () = limits.superseded.cancelled(), if ended_by.is_none() => {
                    tracing::warn!("another daemon took this run over after its lease expired; terminating connector");
                    ended_by = Some(EndedBy::Superseded);
                    break terminate(&mut self.process, target, limits.kill_grace).await;
                }
            }
        };
        // Whatever the child left behind in its group goes with it. The
        // group is signalled before the child is reaped: the child leads
        // it, and until it is reaped its pid stays taken, so the group id
        // cannot have passed to a new group of some other program's.
        signal_group(target.pgid, libc::SIGKILL);
        let status = exited.and_then(|()| self.process.reap());
        // Messages printed just before exit are still delivered, but a
        // process that left the group (setsid) and holds the pipes open
        // cannot keep the run going.
        let drain = async {
            while let Some(message) = self.messages.recv().await {
                on_message(message);
            }
            // The readers end at end of input; stderr may still be logging.
            for reader in &mut self.readers {
                let _ = reader.await;
            }
        };
        if tokio::time::timeout(limits.kill_grace, drain)
            .await
            .is_err()
        {
            tracing::warn!(
                "a process the connector started still holds its output open; no longer reading it"
            );
        }
        for reader in &self.readers {
            reader.abort();
        }
        let status = match (status, &mut self.jail) {
            (Ok(status), Some(jail)) => Ok(jail.ended(status).await),
            (status, _) => status,
        };
        let exit = match status {
            Ok(status) => exit_of(status),
            Err(e) => {
                tracing::error!(error = %e, "waiting for connector failed");
                Exit::Signal(libc::SIGKILL)
            }
        };
        Outcome { exit, ended_by }
    }
}

fn exit_of(status: ExitStatus) -> Exit {
    match (status.code(), status.signal()) {
        (Some(code), _) => Exit::Code(code),
        (None, Some(signal)) => Exit::Signal(signal),
        (None, None) => Exit::Code(-1),
    }
}

/// SIGTERM to the connector's group, then SIGKILL after `kill_grace`;
/// returns once the child has ended, leaving it unreaped.
async fn terminate(process: &mut Process, target: Target, kill_grace: Duration) -> io::Result<()> {
    target.terminate();
    match tokio::time::timeout(kill_grace, process.exited()).await {
        Ok(exited) => exited,
        Err(_) => {
            tracing::warn!(?kill_grace, "connector ignored SIGTERM; sending SIGKILL");
            target.kill();
            process.exited().await
        }
    }
}

fn signal_group(pgid: i32, signal: i32) {
    if pgid > 0 {
        // SAFETY: kill(2) has no memory-safety preconditions; a group that
        // no longer exists yields ESRCH, which is fine.
        unsafe {
            libc::kill(-pgid, signal);
        }
    }
}

/// Reads one line of at most `cap` bytes into `buf` (newline excluded),
/// discarding the rest of a longer line. Returns `None` at end of input.
pub async fn read_capped_line<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    buf: &mut Vec<u8>,
    cap: usize,
) -> io::Result<Option<bool>> {
    buf.clear();
    let mut truncated = false;
    let mut saw_any = false;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(saw_any.then_some(truncated));
        }
        saw_any = true;
        let (chunk, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..i], Some(i + 1)),
            None => (available, None),
        };
        let room = cap.saturating_sub(buf.len());
        if chunk.len() > room {
            truncated = true;
        }
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let consumed = done.unwrap_or(available.len());
        reader.consume(consumed);
        if done.is_some() {
            return Ok(Some(truncated));
        }
    }
}

/// Per-stream log rate limit: a burst, then a steady rate; what is dropped
/// is counted and reported.
struct RateLimit {
    tokens: f64,
    last: Instant,
    dropped: u64,
}

impl RateLimit {
    const BURST: f64 = 200.0;
    const PER_SECOND: f64 = 50.0;

    fn new() -> RateLimit {
        RateLimit {
            tokens: Self::BURST,
            last: Instant::now(),
            dropped: 0,
        }
    }

    /// Whether the next line may be logged; reports drops when logging resumes.
    fn admit(&mut self) -> bool {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * Self::PER_SECOND).min(Self::BURST);
        if self.tokens < 1.0 {
            self.dropped += 1;
            return false;
        }
        self.tokens -= 1.0;
        if self.dropped > 0 {
            tracing::warn!(
                dropped = self.dropped,
                "connector output lines dropped by the log rate limit"
            );
            self.dropped = 0;
        }
        true
    }

    fn finish(&self) {
        if self.dropped > 0 {
            tracing::warn!(
                dropped = self.dropped,
                "connector output lines dropped by the log rate limit"
            );
        }
    }
}

async fn read_stdout<R: AsyncRead + Unpin>(stdout: R, messages: mpsc::Sender<Message>) {
    let mut reader = BufReader::with_capacity(16 * 1024, stdout);
    let mut buf = Vec::with_capacity(256);
    let mut limit = RateLimit::new();
    loop {
        let truncated = match read_capped_line(&mut reader, &mut buf, MAX_LINE).await {
            Ok(Some(truncated)) => truncated,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, "reading connector stdout failed");
                break;
            }
        };
        match protocol::parse_line(&buf) {
            Line::Message(message) => {
                if let Message::Log { level, message } = &message {
                    if limit.admit() {
                        log_at(level.as_deref(), message);
                    }
                }
                // A closed receiver means the run is being recorded; the
                // remaining output is still drained so the child never blocks.
                let _ = messages.send(message).await;
            }
            Line::Malformed(reason) => {
                if limit.admit() {
                    let reason = printable(&reason);
                    tracing::warn!(%reason, "connector printed a message of the wrong shape");
                }
            }
            Line::Text => {
                if limit.admit() {
                    let output = String::from_utf8_lossy(&buf);
                    let output = printable(&output);
                    tracing::info!(%output, truncated, "connector output");
                }
            }
        }
    }
    limit.finish();
}

async fn read_stderr<R: AsyncRead + Unpin>(stderr: R) {
    let mut reader = BufReader::with_capacity(16 * 1024, stderr);
    let mut buf = Vec::with_capacity(256);
    let mut limit = RateLimit::new();
    while let Ok(Some(truncated)) = read_capped_line(&mut reader, &mut buf, MAX_LINE).await {
        if limit.admit() {
            let stderr = String::from_utf8_lossy(&buf);
            let stderr = printable(&stderr);
            tracing::warn!(%stderr, truncated, "connector stderr");
        }
    }
    limit.finish();
}

fn log_at(level: Option<&str>, message: &str) {
    let message = &*printable(message);
    match level.unwrap_or("info") {
        "error" => tracing::error!(message, "connector log"),
        "warn" | "warning" => tracing::warn!(message, "connector log"),
        "debug" => tracing::debug!(message, "connector log"),
        "trace" => tracing::trace!(message, "connector log"),
        _ => tracing::info!(message, "connector log"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn capped_lines() {
        let mut input = Vec::new();
        input.extend_from_slice(b"short\n");
        input.extend(std::iter::repeat_n(b'x', 100));
        input.extend_from_slice(b"\nlast-no-newline");
        let mut reader = BufReader::with_capacity(8, &input[..]);
        let mut buf = Vec::new();
        assert_eq!(
            read_capped_line(&mut reader, &mut buf, 10).await.unwrap(),
            Some(false)
        );
        assert_eq!(buf, b"short");
        assert_eq!(
            read_capped_line(&mut reader, &mut buf, 10).await.unwrap(),
            Some(true)
        );
        assert_eq!(buf, b"xxxxxxxxxx");
        assert_eq!(
            read_capped_line(&mut reader, &mut buf, 10).await.unwrap(),
            Some(true)
        );
        assert_eq!(buf, b"last-no-ne");
        assert_eq!(
            read_capped_line(&mut reader, &mut buf, 10).await.unwrap(),
            None
        );
    }
}
