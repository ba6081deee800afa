//! Dispatch: claiming commands while there is capacity, daemon-wide and
//! per connector, and launching each claimed one as a task of its own.

use std::collections::HashMap;
use std::sync::Arc;

use sqlx::PgConnection;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::daemon::systemd::Heartbeats;
use crate::db::{Backoff, Failure};
use crate::queue;
use crate::run::launch::{self, Context};

/// Claims commands while there is capacity and launches each one; waits
/// for a notification, a finished run or the poll interval otherwise.
pub async fn run(ctx: Arc<Context>, wake: Arc<Notify>, heartbeats: Arc<Heartbeats>) {
    let max = ctx.config.daemon.max_concurrent_runs as usize;
    let global = Arc::new(Semaphore::new(max));
    let per_connector: HashMap<String, Arc<Semaphore>> = ctx
        .config
        .connectors
        .iter()
        .map(|(name, c)| {
            (
                name.clone(),
                Arc::new(Semaphore::new(c.max_concurrency as usize)),
            )
        })
        .collect();
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut backoff = Backoff::new();
    let mut failing = false;
    // Whether a claim may find work: after a notification or the poll
    // interval, and after a run ends only when the last claim was cut short
    // by a limit. Claims that are sure to come back empty are not sent.
    let mut claim = true;
    let mut limited = false;
    // Claims go through a connection of their own, out of the pool. sqlx
    // pings a pooled connection when it hands it out and again when it
    // takes it back: the first ping is a round trip between a new command
    // and its claim, the second competes with the launch for the CPU.
    let mut session: Option<PgConnection> = None;
    loop {
        if ctx.shutdown.is_cancelled() {
            break;
        }
        heartbeats.queue_alive();
        let mut delay = ctx.config.daemon.poll_interval;
        if claim {
            let round = claim_and_launch(&ctx, &mut session, &global, &per_connector, &mut tasks);
            match round.await {
                Ok(round) => {
                    if failing {
                        tracing::info!("command queue reached the database again");
                    }
                    failing = false;
                    backoff = Backoff::new();
                    limited = round.limited;
                    // A full batch may have left more behind.
                    if round.filled && global.available_permits() > 0 {
                        continue;
                    }
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "command queue cannot reach the database; retrying with backoff");
                    }
                    failing = true;
                    delay = backoff.next_delay();
                }
            }
        }
        claim = tokio::select! {
            () = wake.notified() => true,
            () = tokio::time::sleep(delay) => true,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => limited,
            () = ctx.shutdown.cancelled() => break,
        };
    }
    // Every launch watches the same token and settles its run.
    while tasks.join_next().await.is_some() {}
}

/// What one claim round found.
struct Round {
    /// The claim returned as many commands as it asked for.
    filled: bool,
    /// A daemon-wide or connector limit kept commands back.
    limited: bool,
}

/// One claim round.
async fn claim_and_launch(
    ctx: &Arc<Context>,
    session: &mut Option<PgConnection>,
    global: &Arc<Semaphore>,
    per_connector: &HashMap<String, Arc<Semaphore>>,
    tasks: &mut JoinSet<()>,
) -> Result<Round, sqlx::Error> {
    let available = global.available_permits();
    if available == 0 {
        return Ok(Round {
            filled: false,
            limited: true,
        });
    }
    let full: Vec<String> = per_connector
        .iter()
        .filter(|(_, s)| s.available_permits() == 0)
        .map(|(name, _)| name.clone())
        .collect();
    let limit = available.min(64) as i64;
    let conn = match session {
        Some(conn) => conn,
        None => session.insert(crate::db::claim_session(&ctx.pool).await?),
    };
    let claimed = queue::claim(conn, &ctx.instance_id, limit, &full, &ctx.known_connectors);
    let commands = match claimed.await {
        Ok(commands) => commands,
        // Another daemon took a slot this claim wanted: nothing was
        // claimed, and the next claim sees that connection busy.
        Err(e) if Failure::of(&e) == Failure::LostSlotRace => {
            tracing::debug!("another daemon claimed a run slot first; claiming again");
            return Ok(Round {
                filled: true,
                limited: false,
            });
        }
        Err(e) => {
            // The connection may be the problem; the next round takes a
            // fresh one.
            *session = None;
            return Err(e);
        }
    };
    if !commands.is_empty() {
        crate::daemon::supervisor::fault("queue.claimed");
    }
    let mut round = Round {
        filled: commands.len() as i64 == limit,
        limited: !full.is_empty(),
    };
    for command in commands {
        let connector_semaphore = command
            .command
            .connector
            .as_ref()
            .and_then(|c| per_connector.get(c));
        let permits = match (global.clone().try_acquire_owned(), connector_semaphore) {
            (Ok(global_permit), None) => Some((global_permit, None)),
            (Ok(global_permit), Some(semaphore)) => semaphore
                .clone()
                .try_acquire_owned()
                .ok()
                .map(|permit| (global_permit, Some(permit))),
            (Err(_), _) => None,
        };
        let Some(permits) = permits else {
            // Claimed in the same batch as others of its connector beyond
            // the connector's limit: give it back for later.
            queue::release(&ctx.pool, command.command.id).await?;
            round.limited = true;
            continue;
        };
        let ctx = ctx.clone();
        tasks.spawn(async move {
            let _permits: (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>) = permits;
            let command_id = command.command.id;
            if let Err(e) = launch::launch(&ctx, command).await {
                tracing::error!(command_id, error = %e, "launch failed on a database error; the command will be retried by lease rescue");
            }
        });
    }
    round.limited |= global.available_permits() == 0;
    Ok(round)
}
