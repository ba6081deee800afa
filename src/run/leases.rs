//! The leases of this daemon's runs: which runs it has going, renewing
//! their leases, and settling the runs of daemons that stopped renewing.
//!
//! A run row in `running` carries `lease_expires_at`; its daemon extends it
//! about three times per lease. A run whose lease expired belongs to no one:
//! any daemon's rescue records it `lost` and applies the retry policy. A
//! daemon that finds it can no longer renew one of its own runs has lost it
//! to such a rescue, and stops the child, so that no two runs of one
//! connection overlap.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio_util::sync::CancellationToken;

use crate::run::launch::Context;
use crate::run::rescue;

/// The runs this daemon has going. Its entries are plain ids and tokens,
/// whole whatever a panicking holder was doing, so a poisoned lock is
/// recovered rather than the bookkeeping skipped.
#[derive(Default)]
pub struct Leases {
    /// Runs whose rows are recorded: their leases are renewed, each with a
    /// token that stops its child should another daemon take it over.
    running: Mutex<HashMap<i64, CancellationToken>>,
    /// Runs spawned whose rows are not recorded yet: never taken for lost
    /// by this daemon's own rescue, and not yet renewed.
    starting: Mutex<HashSet<i64>>,
}

impl Leases {
    /// Marks `run_id` as starting until the returned guard is dropped,
    /// however recording its start ends (the caller may stop waiting).
    pub fn starting(&self, run_id: i64) -> Starting<'_> {
        lock(&self.starting).insert(run_id);
        Starting {
            leases: self,
            run_id,
        }
    }

    /// The run's row is recorded: from now on its lease is renewed, and
    /// `superseded` is cancelled should the renewal find it taken over.
    pub fn hold(&self, run_id: i64, superseded: CancellationToken) {
        lock(&self.running).insert(run_id, superseded);
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
        ids.extend(lock(&self.starting).iter().copied());
        ids
    }

    /// Stops the children of `ids` that are still held: their leases were
    /// asked to be renewed and were not, so another daemon has them now.
    fn supersede(&self, ids: impl Iterator<Item = i64>) {
        let running = lock(&self.running);
        for id in ids {
            if let Some(superseded) = running.get(&id) {
                superseded.cancel();
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

/// Renews the leases of this daemon's running runs and settles runs whose
/// owner stopped renewing (`lost`), about three times per lease.
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
            Ok(()) => rescue::expired(&ctx).await.map_err(|e| ("rescue", e)),
            Err(e) => Err(("renewal", e)),
        };
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
    let renewed: Vec<i64> = sqlx::query_scalar(
        "update runs set lease_expires_at = now() + $3 * interval '1 millisecond'
         where id = any($1) and status = 'running' and instance_id = $2
         returning id",
    )
    .bind(&ids)
    .bind(&ctx.instance_id)
    .bind(ctx.config.daemon.lease.as_millis() as f64)
    .fetch_all(&ctx.pool)
    .await?;
    if renewed.len() < ids.len() {
        // Only runs that were asked about and not renewed are lost to us;
        // runs that started after the snapshot were not asked about.
        let lost = ids.into_iter().filter(|id| !renewed.contains(id));
        ctx.leases.supersede(lost);
    }
    Ok(())
}
