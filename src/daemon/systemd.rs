//! The systemd notify protocol (`Type=notify`): `READY=1` once schedules
//! are loaded, `STATUS=` with running and queued counts, `WATCHDOG=1` while
//! the timer and queue loops make progress, `STOPPING=1` on shutdown.
//!
//! It is a few datagrams on a Unix socket, so it is written here rather
//! than pulled in as a dependency. Without `NOTIFY_SOCKET` every call is a
//! no-op.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::run::launch::Context;

/// Where notifications go.
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`: a path, or `@name` for the abstract namespace.
    pub fn from_env() -> Notifier {
        let target = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let path = path.to_str()?.to_owned();
            let addr = match path.strip_prefix('@') {
                Some(name) => {
                    use std::os::linux::net::SocketAddrExt;
                    SocketAddr::from_abstract_name(name.as_bytes()).ok()?
                }
                None => SocketAddr::from_pathname(&path).ok()?,
            };
            let socket = UnixDatagram::unbound().ok()?;
            Some((socket, addr))
        });
        Notifier { target }
    }

    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends one state string such as `READY=1`; failures are logged once
    /// at debug level, since a supervisor that stopped listening is not
    /// ours to fix.
    pub fn notify(&self, state: &str) {
        if let Some((socket, addr)) = &self.target {
            if let Err(e) = socket.send_to_addr(state.as_bytes(), addr) {
                tracing::debug!(error = %e, state, "systemd notification failed");
            }
        }
    }
}

/// The watchdog interval systemd asked for (`WATCHDOG_USEC`), if any and if
/// it is meant for this process (`WATCHDOG_PID`).
pub fn watchdog_interval() -> Option<Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Progress marks of the daemon's loops, read by the watchdog: a loop that
/// stalls stops the pings, and systemd restarts the service.
pub struct Heartbeats {
    start: Instant,
    engine: AtomicU64,
    queue: AtomicU64,
}

impl Heartbeats {
    pub fn new() -> Heartbeats {
        Heartbeats {
            start: Instant::now(),
            engine: AtomicU64::new(0),
            queue: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    pub fn engine_alive(&self) {
        self.engine.store(self.now_ms(), Ordering::Relaxed);
    }

    pub fn queue_alive(&self) {
        self.queue.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Whether both loops made progress within `window`.
    pub fn healthy(&self, window: Duration) -> bool {
        let now = self.now_ms();
        let window = window.as_millis() as u64;
        [&self.engine, &self.queue]
            .iter()
            .all(|beat| now.saturating_sub(beat.load(Ordering::Relaxed)) <= window)
    }
}

impl Default for Heartbeats {
    fn default() -> Self {
        Heartbeats::new()
    }
}

/// Keeps systemd informed: `WATCHDOG=1` at half the watchdog interval
/// while the timer and queue loops make progress, and `STATUS=` with the
/// running and queued counts.
pub async fn link(
    ctx: Arc<Context>,
    notifier: Arc<Notifier>,
    heartbeats: Arc<Heartbeats>,
    stop: CancellationToken,
) {
    if !notifier.is_enabled() {
        // Nothing to tell; a supervised task ends only when asked to.
        return stop.cancelled().await;
    }
    let watchdog = watchdog_interval();
    let period = watchdog
        .map(|w| w / 2)
        .unwrap_or(std::time::Duration::from_secs(10))
        .min(std::time::Duration::from_secs(10));
    // Both loops wake every few seconds, or within a pool timeout plus a
    // capped backoff while the database is away (about 20 s); a loop silent
    // for longer than this is stuck, not waiting out an outage.
    let stall = std::time::Duration::from_secs(30)
        .max(ctx.config.daemon.poll_interval * 3)
        .max(watchdog.unwrap_or_default());
    let mut ticker = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = stop.cancelled() => return,
        }
        if watchdog.is_some() {
            if heartbeats.healthy(stall) {
                notifier.notify("WATCHDOG=1");
            } else {
                tracing::error!(
                    "a daemon loop stopped making progress; withholding the watchdog ping"
                );
            }
        }
        let running = ctx.leases.held();
        // Bounded, so an outage never holds up the watchdog pings.
        let queued = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            sqlx::query_scalar::<_, i64>(
                "select count(*) from run_commands where status = 'pending' and not_before <= now()",
            )
            .fetch_one(&ctx.pool),
        )
        .await;
        let queued = match queued {
            Ok(Ok(queued)) => queued.to_string(),
            _ => "unknown".to_owned(),
        };
        notifier.notify(&format!("STATUS=running {running}, queued {queued}"));
    }
}
