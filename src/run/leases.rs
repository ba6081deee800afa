//! The leases of this daemon's runs: which runs it has going, renewing
//! their leases, and settling the runs of daemons that stopped renewing.
//!
//! A run row in `running` carries `lease_expires_at`; its daemon extends it
//! about three times per lease. A run whose lease expired belongs to no one:
//! any daemon's rescue records it `lost` and applies the retry policy. A
//! daemon that finds it can no longer renew one of its own runs has lost it
//! to such a rescue, and stops the child, so that no two runs of one
//! connection overlap.
//!
//! The renewal also carries cancellation: a run an operator cancelled
//! (`runs cancel`) is stopped when the notification arrives, and at the
//! next renewal should it have been lost.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio_util::sync::CancellationToken;

use crate::run::launch::Context;
use crate::run::rescue;

/// The runs this daemon has going. Its entries are plain ids and tokens,
/// whole whatever a panicking holder was doing, so a poisoned lock is
/// recovered rather than the bookkeeping skipped.
#[derive(Default)]
pub struct Leases {
    /// Runs whose rows are recorded: their leases are renewed, each with
    /// what stops its child from outside.
    running: Mutex<HashMap<i64, Stops>>,
    /// Runs spawned whose rows are not recorded yet: never taken for lost
    /// by this daemon's own rescue, and not yet renewed. The flag is a
    /// cancellation that arrived as the row was being recorded.
    starting: Mutex<HashMap<i64, bool>>,
}

/// What ends a run's child from outside its supervision.
#[derive(Clone, Default)]
pub struct Stops {
    /// Another daemon took the run over.
    pub superseded: CancellationToken,
    /// An operator cancelled it.
    pub cancelled: CancellationToken,
}

impl Leases {
    /// Marks `run_id` as starting until the returned guard is dropped,
    /// however recording its start ends (the caller may stop waiting).
    pub fn starting(&self, run_id: i64) -> Starting<'_> {
        lock(&self.starting).insert(run_id, false);
        Starting {
            leases: self,
            run_id,
        }
    }

    /// The run's row is recorded: from now on its lease is renewed, and
    /// `stops` fire should the renewal find it taken over or cancelled.
    pub fn hold(&self, run_id: i64, stops: Stops) {
        // Both locks, starting first (as in `cancel`), so a cancellation
        // lands either in the starting flag read here or in `running`.
        let starting = lock(&self.starting);
        if starting.get(&run_id) == Some(&true) {
            stops.cancelled.cancel();
        }
        lock(&self.running).insert(run_id, stops);
    }

    /// An operator asked to cancel `run_id`: its child is stopped if it is
    /// ours.
    pub fn cancel(&self, run_id: i64) {
        let mut starting = lock(&self.starting);
        if let Some(stops) = lock(&self.running).get(&run_id) {
            stops.cancelled.cancel();
        } else if let Some(requested) = starting.get_mut(&run_id) {
            *requested = true;
        }
    }

    /// The run has ended (its outcome is being recorded under the fence).
    pub fn release(&self, run_id: i64) {
        lock(&self.running).remove(&run_id);
    }

    /// How many runs with recorded rows this daemon has going.
    pub fn held(&self) -> usize {
        lock(&self.running).len()
    }

    /// Ids of the runs whose leases this daemon renews.
    pub fn held_ids(&self) -> Vec<i64> {
        lock(&self.running).keys().copied().collect()
    }

    /// Ids of the runs this daemon has going, including those whose start
    /// is still being recorded (its write may have landed without its
    /// answer): its own rescue must leave all of them alone.
    pub fn live_ids(&self) -> Vec<i64> {
        let mut ids = self.held_ids();
        ids.extend(lock(&self.starting).keys().copied());
        ids
    }

    /// Stops the children of `ids` that are still held: their leases were
    /// asked to be renewed and were not, so another daemon has them now.
    fn supersede(&self, ids: impl Iterator<Item = i64>) {
        let running = lock(&self.running);
        for id in ids {
            if let Some(stops) = running.get(&id) {
                stops.superseded.cancel();
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A run in [`Leases`]' starting set for as long as this guard lives.
pub struct Starting<'a> {
    leases: &'a Leases,
    run_id: i64,
}

impl Drop for Starting<'_> {
    fn drop(&mut self) {
        lock(&self.leases.starting).remove(&self.run_id);
    }
}

/// Renews the leases of this daemon's running runs, settles runs whose
/// owner stopped renewing (`lost`), and marks this daemon seen, about
/// three times per lease.
pub async fn keep(ctx: Arc<Context>, stop: CancellationToken) {
    let period = ctx.config.daemon.lease / 3;
    let mut failing = false;
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = stop.cancelled() => return,
        }
        // Said once when it starts failing and once when it recovers: an
        // outage must not write a line every few seconds.
        let result = match renew(&ctx).await {
            Ok(()) => match rescue::expired(&ctx).await {
                Ok(()) => crate::daemon::presence::seen(&ctx.pool, &ctx.instance_id)
                    .await
                    .map_err(|e| ("presence", e)),
                Err(e) => Err(("rescue", e)),
            },
            Err(e) => Err(("renewal", e)),
        };
        ctx.metrics.lease_round(result.is_ok());
        match result {
            Ok(()) if failing => {
                tracing::info!("lease renewal and rescue work again");
                failing = false;
            }
            Ok(()) => {}
            Err((what, e)) if !failing => {
                tracing::warn!(error = %e, "lease {what} failed; running runs may be taken for lost by another daemon if this lasts past their lease");
                failing = true;
            }
            Err(_) => {}
        }
    }
}

/// Extends the leases of our running runs. A run whose lease could not be
/// extended belongs to another daemon now (ours expired while we could not
/// reach the database, and it was rescued): its child is stopped.
async fn renew(ctx: &Context) -> Result<(), sqlx::Error> {
    // Only runs whose row is recorded: one still starting has no lease yet.
    let ids = ctx.leases.held_ids();
    if ids.is_empty() {
        return Ok(());
    }
    let renewed: Vec<(i64, bool)> = sqlx::query_as(
        "update runs set lease_expires_at = now() + $3 * interval '1 millisecond'
         where id = any($1) and status = 'running' and instance_id = $2
         returning id, cancel_requested_at is not null",
    )
    .bind(&ids)
    .bind(&ctx.instance_id)
    .bind(ctx.config.daemon.lease.as_millis() as f64)
    .fetch_all(&ctx.pool)
    .await?;
    for &(id, cancelled) in &renewed {
        if cancelled {
            ctx.leases.cancel(id);
        }
    }
    if renewed.len() < ids.len() {
        // Only runs that were asked about and not renewed are lost to us;
        // runs that started after the snapshot were not asked about.
        let lost = ids
            .into_iter()
            .filter(|id| !renewed.iter().any(|(renewed, _)| renewed == id));
        ctx.leases.supersede(lost);
    }
    Ok(())
}
