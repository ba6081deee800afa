//! Notifications: one session that `LISTEN`s for schedule edits, a
//! schedule leader's resignation, new commands, owners' answers and
//! cancellations, and forwards them to the schedule engine, the queue, the
//! runs waiting for a code and the runs being cancelled.

use std::sync::Arc;

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::db::Backoff;
use crate::run::codes::{Waiting, ANSWERS_CHANNEL};
use crate::run::leases::Leases;
use crate::schedule::{Edit, LEADER_CHANNEL};

/// Channels the daemon listens on.
pub const SCHEDULES_CHANNEL: &str = "connectord_schedules";
pub const COMMANDS_CHANNEL: &str = "connectord_commands";
/// Notified with a run id by the trigger of `runs.cancel_requested_at`.
pub const CANCELS_CHANNEL: &str = "connectord_cancels";

/// Connects the notification listener, retrying until `stop`. The daemon
/// listens before it loads schedules, so no edit made after "ready" can be
/// missed.
pub async fn connect(pool: &PgPool, stop: &CancellationToken) -> Option<PgListener> {
    let mut backoff = Backoff::new();
    loop {
        let attempt = async {
            let mut listener = PgListener::connect_with(pool).await?;
            listener
                .listen_all([
                    SCHEDULES_CHANNEL,
                    COMMANDS_CHANNEL,
                    ANSWERS_CHANNEL,
                    CANCELS_CHANNEL,
                    LEADER_CHANNEL,
                ])
                .await?;
            Ok::<_, sqlx::Error>(listener)
        };
        match attempt.await {
            Ok(listener) => return Some(listener),
            Err(e) => {
                // Said once per outage, as every loop does.
                if backoff.attempts() == 0 {
                    tracing::warn!(error = %e, "cannot listen for notifications; retrying");
                } else {
                    tracing::debug!(error = %e, "cannot listen for notifications; retrying");
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff.next_delay()) => {}
                    () = stop.cancelled() => return None,
                }
            }
        }
    }
}

/// Forwards notifications: schedule edits to the engine, new commands to
/// the queue. When the session is lost, notifications sent meanwhile are
/// lost with it: the listener connects and listens again (with backoff,
/// until the database answers), and only then has everything re-read, so
/// that an edit is either in the re-read or notified after it.
pub async fn listen(
    mut listener: PgListener,
    pool: PgPool,
    edits: mpsc::Sender<Edit>,
    wake: Arc<Notify>,
    waiting: Arc<Waiting>,
    leases: Arc<Leases>,
    stop: CancellationToken,
) {
    loop {
        let received = tokio::select! {
            received = listener.try_recv() => received,
            () = stop.cancelled() => return,
        };
        let notification = match received {
            Ok(Some(notification)) => notification,
            Ok(None) | Err(_) => {
                tracing::warn!(
                    "notification connection lost; listening again once the database answers"
                );
                drop(listener);
                let Some(again) = connect(&pool, &stop).await else {
                    return;
                };
                listener = again;
                tracing::info!("listening for notifications again");
                let _ = edits.send(Edit::Reconcile).await;
                wake.notify_one();
                waiting.wake_all();
                continue;
            }
        };
        match notification.channel() {
            SCHEDULES_CHANNEL => match notification.payload().parse::<i64>() {
                Ok(id) => {
                    if edits.try_send(Edit::Row(id)).is_err() {
                        // The engine is behind; a full re-read covers
                        // whatever did not fit.
                        let _ = edits.send(Edit::Reconcile).await;
                    }
                }
                Err(_) => {
                    let _ = edits.send(Edit::Reconcile).await;
                }
            },
            ANSWERS_CHANNEL => match notification.payload().parse::<i64>() {
                Ok(id) => waiting.wake(id),
                Err(_) => waiting.wake_all(),
            },
            // A lost one costs the followers a lease's wait.
            LEADER_CHANNEL => {
                let _ = edits.send(Edit::Leader).await;
            }
            // A lost one is found by the next lease renewal.
            CANCELS_CHANNEL => {
                if let Ok(id) = notification.payload().parse::<i64>() {
                    leases.cancel(id);
                }
            }
            _ => wake.notify_one(),
        }
    }
}
