//! What a running child reports to its run: the latest progress count and
//! the interactions it opens (SPEC §6), within bounds, and written by a
//! writer of their own.
//!
//! Supervision (the child's timeout, a shutdown, its pipes) must never wait
//! on the database: a locked `interactions` table would otherwise keep a
//! child running far past its timeout. So [`Reports::take`] only records
//! what the child said, and [`Reports::write`], a task of the run's own,
//! writes it one statement at a time. Memory stays
//! bounded whatever the child prints: progress is one number, and at most
//! [`MAX_INTERACTIONS_PER_RUN`] interactions are ever queued.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{mpsc, Notify};

use crate::run::codes::CodeRequest;
use crate::run::protocol::{code_timeout, InteractionKind, Message};
use crate::run::record::Writer;

/// How often a run's progress count is written while it runs.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// The interactions one run may open. A connector asks its owner for
/// something a few times at most (a login, a code, another code); past
/// this, it is a loop or a flood, and each open is a row an owner must
/// read.
pub const MAX_INTERACTIONS_PER_RUN: usize = 8;

/// The longest interaction message kept, in bytes: an owner reads it, and
/// "Code sent to ***1234" is the kind of text it carries.
pub const MAX_INTERACTION_MESSAGE: usize = 1024;

const NO_COUNT: i64 = i64::MIN;

/// What a child did that the protocol does not allow, counted per run and
/// reported once: a flood must not also flood the log.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Problems {
    /// Interactions past [`MAX_INTERACTIONS_PER_RUN`], ignored.
    pub interactions_over_limit: u64,
    /// Interaction messages cut to [`MAX_INTERACTION_MESSAGE`].
    pub messages_truncated: u64,
}

impl Problems {
    /// One sentence for the run's `failure_detail`, or `None`.
    pub fn describe(&self) -> Option<String> {
        let mut out = String::new();
        if self.interactions_over_limit > 0 {
            let _ = write!(
                out,
                "the connector opened {} interactions past the limit of {MAX_INTERACTIONS_PER_RUN} per run, which were ignored",
                self.interactions_over_limit
            );
        }
        if self.messages_truncated > 0 {
            if !out.is_empty() {
                out.push_str("; ");
            }
            let _ = write!(
                out,
                "{} interaction messages were cut to {MAX_INTERACTION_MESSAGE} bytes",
                self.messages_truncated
            );
        }
        (!out.is_empty()).then_some(out)
    }
}

struct Interaction {
    kind: InteractionKind,
    message: String,
}

/// One run's reports: taken from the child's messages by [`Reports::take`],
/// written by [`Reports::write`] from the [`Pending`] queue.
pub struct Reports {
    run_id: i64,
    /// The latest count the child reported, or [`NO_COUNT`].
    latest: AtomicI64,
    /// The run's row exists: counts can be kept on it.
    recorded: AtomicBool,
    changed: Notify,
    /// Taken by [`Reports::take`], which supervision calls one at a time.
    state: std::sync::Mutex<TakeState>,
}

/// The interactions taken and not yet written.
pub struct Pending(mpsc::Receiver<Interaction>);

struct TakeState {
    opened: usize,
    /// The child asked for its owner (`credentials_required`): the run
    /// fails as `interaction_required`, however it ends.
    owner_needed: bool,
    /// Where code requests go, to be served while the run waits.
    codes: Option<mpsc::UnboundedSender<CodeRequest>>,
    problems: Problems,
    /// `None` once closed.
    queue: Option<mpsc::Sender<Interaction>>,
}

impl Reports {
    pub fn new(
        run_id: i64,
        codes: Option<mpsc::UnboundedSender<CodeRequest>>,
    ) -> (Reports, Pending) {
        let (queue, pending) = mpsc::channel(MAX_INTERACTIONS_PER_RUN);
        let reports = Reports {
            run_id,
            latest: AtomicI64::new(NO_COUNT),
            recorded: AtomicBool::new(false),
            changed: Notify::new(),
            state: std::sync::Mutex::new(TakeState {
                opened: 0,
                owner_needed: false,
                codes,
                problems: Problems::default(),
                queue: Some(queue),
            }),
        };
        (reports, Pending(pending))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, TakeState> {
        // The state is plain counters, valid whatever a panicking holder
        // left half done.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes one protocol message from the child. Never waits.
    pub fn take(&self, message: Message) {
        let mut state = self.state();
        match message {
            Message::Progress { records } => {
                self.latest.store(records, Ordering::SeqCst);
                self.changed.notify_one();
            }
            Message::Interaction {
                kind,
                message,
                timeout,
            } => {
                if state.opened >= MAX_INTERACTIONS_PER_RUN {
                    count(
                        &mut state.problems.interactions_over_limit,
                        "interactions_over_limit",
                        MAX_INTERACTIONS_PER_RUN,
                        "the connector opened more interactions than a run may; ignoring the rest",
                    );
                    return;
                }
                let mut message = message.unwrap_or_default();
                if message.len() > MAX_INTERACTION_MESSAGE {
                    count(
                        &mut state.problems.messages_truncated,
                        "message_truncated",
                        MAX_INTERACTION_MESSAGE,
                        "the connector's interaction message is too long; keeping its start",
                    );
                    truncate(&mut message, MAX_INTERACTION_MESSAGE);
                }
                state.opened += 1;
                if kind == InteractionKind::CodeRequired {
                    if let Some(codes) = &state.codes {
                        let timeout = code_timeout(timeout.as_deref());
                        let _ = codes.send(CodeRequest { message, timeout });
                        return;
                    }
                }
                state.owner_needed = true;
                // The queue holds as many as a run may open, so it is never
                // full; once closed, the run is being recorded.
                if let Some(queue) = &state.queue {
                    let _ = queue.try_send(Interaction { kind, message });
                }
            }
            Message::Log { .. } => {}
        }
    }

    /// The latest count, whether the child asked for its owner (other than
    /// for a code), and what it did wrong.
    pub fn summary(&self) -> (Option<i64>, bool, Problems) {
        let state = self.state();
        let latest = self.latest.load(Ordering::SeqCst);
        let records = (latest != NO_COUNT).then_some(latest);
        (records, state.owner_needed, state.problems)
    }

    /// The run's row exists: the latest count can be kept on it.
    pub fn row_recorded(&self) {
        self.recorded.store(true, Ordering::SeqCst);
        self.changed.notify_one();
    }

    /// Ends the queue: [`Reports::write`] returns once the interactions
    /// taken so far are written.
    pub fn close(&self) {
        self.state().queue = None;
    }

    /// Writes what the child reports, for as long as it is polled: each
    /// interaction as it comes, and the latest count at most once every
    /// [`PROGRESS_EVERY`] once the row exists. Returns when the queue is
    /// closed and written; the run's outcome carries the final count, so a
    /// count still waiting for its turn then is not written.
    pub async fn write(
        self: Arc<Self>,
        mut pending: Pending,
        pool: PgPool,
        instance_id: String,
        connection_id: String,
    ) {
        let writer = Writer {
            pool: &pool,
            instance_id: &instance_id,
        };
        let connection_id = connection_id.as_str();
        let mut written = NO_COUNT;
        let mut last_write: Option<tokio::time::Instant> = None;
        let mut due: Option<tokio::time::Instant> = None;
        loop {
            let at = due.unwrap_or_else(tokio::time::Instant::now);
            tokio::select! {
                biased;
                interaction = pending.0.recv() => {
                    let Some(Interaction { kind, message }) = interaction else { return };
                    let opened = writer
                        .open_interaction(connection_id, self.run_id, kind.as_str(), &message)
                        .await;
                    if let Err(e) = opened {
                        tracing::warn!(error = %e, "could not record the connector's interaction");
                    }
                }
                () = self.changed.notified() => {
                    let now = tokio::time::Instant::now();
                    let next = last_write.map_or(now, |t| (t + PROGRESS_EVERY).max(now));
                    due = Some(due.map_or(next, |d| d.min(next)));
                }
                () = tokio::time::sleep_until(at), if due.is_some() => {
                    due = None;
                    let latest = self.latest.load(Ordering::SeqCst);
                    if !self.recorded.load(Ordering::SeqCst) || latest == NO_COUNT || latest == written {
                        continue;
                    }
                    last_write = Some(tokio::time::Instant::now());
                    written = latest;
                    if let Err(e) = writer.record_progress(self.run_id, latest).await {
                        tracing::debug!(error = %e, "could not record progress");
                    }
                }
            }
        }
    }
}

/// Counts one occurrence of a problem, logging only the first.
fn count(counter: &mut u64, problem: &'static str, limit: usize, what: &'static str) {
    if *counter == 0 {
        tracing::warn!(event = "run.protocol", problem, limit, "{what}");
    }
    *counter += 1;
}

/// Cuts `s` to at most `max` bytes, on a character boundary.
fn truncate(s: &mut String, max: usize) {
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncates_on_a_character_boundary() {
        let mut s = "é".repeat(600);
        truncate(&mut s, MAX_INTERACTION_MESSAGE);
        assert_eq!(s.len(), MAX_INTERACTION_MESSAGE);
        let mut s = format!("a{}", "é".repeat(600));
        truncate(&mut s, MAX_INTERACTION_MESSAGE);
        assert_eq!(s.len(), MAX_INTERACTION_MESSAGE - 1);
    }

    #[test]
    fn interactions_past_the_limit_are_counted_not_queued() {
        let (reports, _pending) = Reports::new(1, None);
        for _ in 0..MAX_INTERACTIONS_PER_RUN + 5 {
            reports.take(Message::Interaction {
                kind: InteractionKind::CredentialsRequired,
                timeout: None,
                message: Some("x".repeat(MAX_INTERACTION_MESSAGE + 1)),
            });
        }
        let (_, opened, problems) = reports.summary();
        assert!(opened);
        assert_eq!(problems.interactions_over_limit, 5);
        assert_eq!(problems.messages_truncated, MAX_INTERACTIONS_PER_RUN as u64);
        assert!(problems.describe().is_some());
        assert_eq!(Problems::default().describe(), None);
    }
}
