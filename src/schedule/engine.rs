//! The schedule engine: one timer over a heap of next-fire instants.
//!
//! Every `schedules` row is a 40-byte [`Slot`](super::slots::Slot) (its
//! expression an id into a shared table of texts, see [`super::exprs`]) and every
//! firing row has one heap key. The timer sleeps until the earliest key, at
//! most a few seconds at a time so a jump of the wall clock is noticed, and
//! fires every due row in one statement that inserts `run_commands` rows
//! with `ON CONFLICT DO NOTHING`: the unique `(schedule_id, scheduled_for)`
//! key makes each tick fire once across every daemon sharing the database.
//! The statement reads each command's connection from its schedule row, so
//! the engine keeps no connection ids. Edits arrive by NOTIFY (a schedule
//! id) and a periodic reconcile re-reads `updated_at` of every row in case a
//! notification was lost.
//!
//! Of several daemons sharing the database, one leads (see
//! [`super::leadership`]): it fires, records missed ticks and writes the
//! rows' bookkeeping. The others follow: their engines are loaded and kept
//! current by the same notifications, but they write nothing, and a row's
//! slot keeps its first tick after the row's last fire, due or not. When a
//! follower takes over, every row due by then is read again, so the ticks
//! its predecessor fired are not fired twice, and the one that fell in
//! between fires once (inside the catch-up window).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{Connection as _, PgConnection, PgPool};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use chrono_tz::Tz;

use super::exprs::{ExprId, Exprs};
use super::leadership::{Change, Leadership};
use super::slots::{from_secs, stamp, to_secs, Slot, Slots, NEVER};
use crate::daemon::systemd::Heartbeats;
use crate::db::Backoff;
use crate::run::failure::FailureKind;
use crate::schedule::cron::{self, CronError, FireRule};
use crate::vocabulary::RunStatus;

/// What the listener tells the engine.
#[derive(Debug)]
pub enum Edit {
    /// This schedule row was inserted, updated or deleted.
    Row(i64),
    /// Notifications may have been missed: re-read every row.
    Reconcile,
    /// The leader resigned: try to take over.
    Leader,
}

/// Longest single sleep, so a clock jump or suspend is noticed promptly.
const MAX_SLEEP: Duration = Duration::from_secs(2);

/// One `schedules` row as the engine reads it.
#[derive(Debug, sqlx::FromRow)]
struct Row {
    id: i64,
    connection_id: String,
    cron: String,
    timezone: String,
    enabled: bool,
    jitter_seconds: i32,
    last_fired_at: Option<DateTime<Utc>>,
    last_error: Option<String>,
    updated_at: DateTime<Utc>,
}

const ROW_COLUMNS: &str = "id, connection_id, cron, timezone, enabled, jitter_seconds, \
                           last_fired_at, last_error, updated_at";

/// What turning rows into slots leaves to write.
#[derive(Default)]
struct Pending {
    errors: Vec<(i64, String)>,
    cleared: Vec<i64>,
    catchup: Vec<Fire>,
    missed: Vec<Missed>,
    known: KnownFires,
}

/// Next fires already found for a batch of rows, by rule.
///
/// If a rule's first fire after `from` is `next`, its first fire after any
/// instant in `[from, next)` is `next` too, since nothing fires in between.
/// Rows loaded together mostly share their rule with others and were
/// written within moments of each other, so most of a load's searches are
/// answered here (croner's search was the largest cost of start-up).
#[derive(Default)]
struct KnownFires(HashMap<RuleKey, (DateTime<Utc>, Option<DateTime<Utc>>)>);

/// Expression, zone, jitter.
type RuleKey = (ExprId, Tz, u32);

impl KnownFires {
    fn next_after(
        &mut self,
        key: RuleKey,
        rule: &FireRule,
        after: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        if let Some(&(from, next)) = self.0.get(&key) {
            if from <= after && next.is_none_or(|next| after < next) {
                return next;
            }
        }
        let next = rule.next_after(after);
        self.0.insert(key, (after, next));
        next
    }
}

pub struct Engine {
    pool: PgPool,
    catchup_window: Duration,
    /// Counts the ticks it stores and how late, missed runs, the rows
    /// loaded and whether this daemon leads.
    metrics: Arc<crate::metrics::Metrics>,
    /// Every row, firing or not, and the heap of next fires.
    slots: Slots,
    exprs: Exprs,
    leadership: Leadership,
    /// Whether every row has been read: a daemon that takes the lead
    /// before its first load has nothing to read again.
    loaded: bool,
    /// A reconcile failed part way and is to be done again.
    reconcile_owed: bool,
    /// Rows a follower read whose writes (an error, a cleared error) it
    /// left to the leader, and rows a leader must read again before it
    /// fires: done first thing once this daemon leads.
    deferred: Vec<i64>,
}

/// A tick to fire: the command's `scheduled_for` and the row's next fire.
struct Fire {
    schedule_id: i64,
    at: DateTime<Utc>,
    next: Option<DateTime<Utc>>,
}

/// The rows a pass found due, decided and not yet written.
struct Due {
    term: i64,
    fires: Vec<Fire>,
    missed: Vec<Missed>,
}

/// A schedule's ticks from `first` to `last` that fell while no daemon
/// fired them and are older than the catch-up window: recorded as one
/// `skipped` run of kind `missed`.
struct Missed {
    schedule_id: i64,
    first: DateTime<Utc>,
    last: DateTime<Utc>,
    next: Option<DateTime<Utc>>,
}

impl Engine {
    /// An engine for the daemon `instance_id`, leading under `lease` when
    /// it can.
    pub fn new(
        pool: PgPool,
        catchup_window: Duration,
        instance_id: String,
        lease: Duration,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Engine {
        Engine {
            pool,
            catchup_window,
            metrics,
            slots: Slots::default(),
            exprs: Exprs::default(),
            leadership: Leadership::new(instance_id, lease),
            loaded: false,
            reconcile_owed: false,
            deferred: Vec::new(),
        }
    }

    /// Whether this daemon fires the schedules.
    fn leading(&self) -> bool {
        self.leadership.term().is_some()
    }

    /// How late the ticks just stored were.
    fn count_fired(&self, fires: &[Fire]) {
        let stored = Utc::now();
        for fire in fires {
            self.metrics
                .tick_stored((stored - fire.at).to_std().unwrap_or_default());
        }
    }

    /// A fire statement found this daemon's lease gone: another daemon
    /// leads. The ticks stay due, so that this daemon reads their rows
    /// again should it lead once more.
    fn fenced(&mut self, fires: &[Fire]) {
        tracing::warn!(
            "this daemon's lease on firing schedules expired before it could renew it; another daemon fires them now"
        );
        self.leadership.fenced();
        for fire in fires {
            self.slots.reschedule(fire.schedule_id, to_secs(fire.at));
        }
        self.report_leadership();
    }

    fn report_leadership(&self) {
        self.metrics.schedule_leader(self.leading());
    }

    /// Counts the `missed` runs this engine recorded, by connector.
    fn count_missed(&self, connectors: &[Option<String>]) {
        for connector in connectors {
            self.metrics.run_finished(
                connector.as_deref(),
                RunStatus::Skipped.as_str(),
                Some(FailureKind::Missed.as_str()),
            );
        }
    }

    /// Reads every row, a page at a time so a large table never sits in
    /// memory whole; fires missed ticks inside the catch-up window. The new
    /// `next_fire_at` values are left for `flush_next_fires`, so start-up
    /// is not held up by writing them.
    pub async fn load_all(&mut self) -> Result<(), sqlx::Error> {
        const PAGE: usize = 20_000;
        // A retry after a failed load starts over; every expression use
        // belongs to a slot.
        self.loaded = false;
        self.slots = Slots::default();
        self.exprs = Exprs::default();
        self.deferred.clear();
        // One connection for the whole load: a pool of two (the listener
        // holds one) must do.
        let mut conn = self.pool.acquire().await?;
        // A page per statement, not one statement streaming the table:
        // on a busy machine turning a million rows into slots takes longer
        // than the sessions' statement timeout, which would cut one
        // statement off and start the load over, again and again. What the
        // rows owe is written after the last page.
        let query =
            format!("select {ROW_COLUMNS} from schedules where id > $1 order by id limit $2");
        let mut pending = Pending::default();
        let mut after = i64::MIN;
        loop {
            let page: Vec<Row> = sqlx::query_as(&query)
                .bind(after)
                .bind(PAGE as i64)
                .fetch_all(&mut *conn)
                .await?;
            let full = page.len() == PAGE;
            if let Some(last) = page.last() {
                after = last.id;
            }
            self.apply_rows(page, &mut pending);
            if !full {
                break;
            }
            // Nor may a long load let the lease lapse under a leader busy
            // loading.
            self.renew_if_due(&mut conn).await?;
        }
        self.slots.compact();
        self.write_pending(&mut conn, pending).await?;
        conn.shrink_buffers();
        self.loaded = true;
        Ok(())
    }

    /// Re-reads only the rows whose `updated_at` changed, and forgets the
    /// deleted ones.
    ///
    /// The stamps are read a page at a time, and between pages a leader
    /// renews its lease when due and fires what fell due, on the same
    /// connection: walking a million rows takes longer than a second, and
    /// a schedule that ticks every second must not see its ticks run
    /// together behind the walk. Nothing but that happens between pages,
    /// so the rows known stay the same through the walk.
    async fn reconcile(&mut self) -> Result<(), sqlx::Error> {
        // Owed until one completes: a re-read the database cut short (the
        // one a reconnected listener asks for, say) is done again on the
        // next tick, not at the next periodic one.
        self.reconcile_owed = true;
        self.compare_all().await?;
        self.reconcile_owed = false;
        Ok(())
    }

    async fn compare_all(&mut self) -> Result<(), sqlx::Error> {
        const PAGE: i64 = 50_000;
        let mut conn = self.pool.acquire().await?;
        let mut changed = Vec::new();
        let mut gone = Vec::new();
        // Ids above `after` are still to be compared.
        let mut after = i64::MIN;
        loop {
            let stamps: Vec<(i64, DateTime<Utc>)> = sqlx::query_as(
                "select id, updated_at from schedules where id > $1 order by id limit $2",
            )
            .bind(after)
            .bind(PAGE)
            .fetch_all(&mut *conn)
            .await?;
            let next = compare_page(
                self.slots.rows(),
                after,
                &stamps,
                PAGE as usize,
                &mut changed,
                &mut gone,
            );
            let Some(next) = next else {
                break;
            };
            after = next;
            self.renew_if_due(&mut conn).await?;
            if let Some(due) = self.take_due() {
                self.write_due(&mut conn, due).await?;
            }
        }
        self.remove(&gone);
        if !changed.is_empty() {
            tracing::info!(
                count = changed.len(),
                "reconcile found schedule edits that no notification announced"
            );
            self.reload(&mut conn, &changed).await?;
        }
        self.flush_next_fires(&mut conn).await?;
        // Reading every row's stamp grew the connection's buffers.
        conn.shrink_buffers();
        Ok(())
    }

    /// Re-reads the given rows (inserted, edited or deleted); `ids` sorted.
    async fn reload(&mut self, conn: &mut PgConnection, ids: &[i64]) -> Result<(), sqlx::Error> {
        let rows: Vec<Row> = sqlx::query_as(&format!(
            "select {ROW_COLUMNS} from schedules where id = any($1) order by id"
        ))
        .bind(ids)
        .fetch_all(&mut *conn)
        .await?;
        let found: Vec<i64> = rows.iter().map(|r| r.id).collect();
        let gone: Vec<i64> = ids
            .iter()
            .copied()
            .filter(|id| found.binary_search(id).is_err())
            .collect();
        self.remove(&gone);
        let mut pending = Pending::default();
        self.apply_rows(rows, &mut pending);
        if let Err(e) = self.write_pending(conn, pending).await {
            // The rows' errors and catch-up ticks were not written, and their
            // slots already match `updated_at`: make the reconcile read them
            // again, or nothing would ever write what they owe.
            self.slots.mark_stale(&found);
            return Err(e);
        }
        self.flush_next_fires(conn).await
    }

    /// Forgets the rows in `ids` (sorted): they were deleted.
    fn remove(&mut self, ids: &[i64]) {
        for slot in self.slots.remove_sorted(ids) {
            self.exprs.release(slot.expr);
            tracing::info!(schedule_id = slot.id, "schedule removed");
        }
    }

    /// Puts `slot` in place of its row's old one.
    fn set(&mut self, slot: Slot) {
        if let Some(old) = self.slots.upsert(slot) {
            self.exprs.release(old.expr);
        }
    }

    /// Turns rows into slots, records errors, and fires catch-up ticks.
    fn apply_rows(&mut self, rows: Vec<Row>, pending: &mut Pending) {
        let now = Utc::now();
        let leading = self.leading();
        for row in rows {
            // Every row the leader reads gets its `next_fire_at` written.
            let idle = Slot {
                unwritten: leading,
                ..Slot::idle(row.id, stamp(row.updated_at))
            };
            if !row.enabled {
                self.set(idle);
                continue;
            }
            let (slot, rule) = match self.slot_for(&row) {
                Ok(parsed) => parsed,
                Err(message) => {
                    if row.last_error.as_deref() != Some(message.as_str()) {
                        tracing::error!(
                            event = "schedule.error",
                            schedule_id = row.id,
                            connection = %row.connection_id,
                            error = %message,
                            "schedule row {} is invalid and will not fire until fixed",
                            row.id
                        );
                        pending.errors.push((row.id, message));
                    }
                    self.set(idle);
                    continue;
                }
            };
            if row.last_error.is_some() {
                pending.cleared.push(row.id);
            }
            // A tick is owed only if it fell after the last fire and after
            // the row last changed: an edit never replays the past.
            let since = row
                .last_fired_at
                .unwrap_or(row.updated_at)
                .max(row.updated_at);
            // The first fire after `since` is usually still to come: then
            // nothing was missed and it is the next fire, found with one
            // search instead of two (the searches are most of the load).
            let key = (slot.expr, slot.tz, slot.jitter);
            let first_after_since =
                (since <= now).then(|| pending.known.next_after(key, &rule, since));
            let next = match first_after_since {
                Some(first) if first.is_none_or(|t| t > now) => first,
                // A follower keeps the first tick after the last fire, due
                // or not: the leader fires it, and should this daemon take
                // over, a due row is read again then.
                Some(first) if !leading => first,
                None if !leading => rule.next_after(since),
                _ => {
                    self.catch_up(&row, &rule, since, now, pending);
                    rule.next_after(now)
                }
            };
            self.set(Slot {
                next: next.map_or(NEVER, to_secs),
                unwritten: leading,
                ..slot
            });
        }
        self.slots.settle();
    }

    /// Writes what `apply_rows` left: row errors, cleared errors, catch-up
    /// ticks.
    async fn write_pending(
        &mut self,
        conn: &mut PgConnection,
        pending: Pending,
    ) -> Result<(), sqlx::Error> {
        let Some(term) = self.leadership.term() else {
            // The leader writes these; this daemon does when it leads.
            self.deferred
                .extend(pending.errors.iter().map(|&(id, _)| id));
            self.deferred.extend(&pending.cleared);
            return Ok(());
        };
        write_errors(conn, &pending.errors, &pending.cleared).await?;
        for fires in pending.catchup.chunks(5_000) {
            if !fire(conn, fires, term).await? {
                self.fenced(fires);
                return Ok(());
            }
            self.count_fired(fires);
        }
        for missed in pending.missed.chunks(5_000) {
            let recorded = record_missed(conn, missed, self.catchup_window, term).await?;
            self.count_missed(&recorded);
        }
        Ok(())
    }

    /// Queues the latest tick after `since` if one was missed and is still
    /// owed (inside the catch-up window).
    fn catch_up(
        &self,
        row: &Row,
        rule: &FireRule,
        since: DateTime<Utc>,
        now: DateTime<Utc>,
        pending: &mut Pending,
    ) {
        let Some(missed) = rule.latest_at_or_before(now).filter(|t| *t > since) else {
            return;
        };
        if owed(self.catchup_window, now, missed) {
            tracing::info!(
                schedule_id = row.id,
                connection = %row.connection_id,
                scheduled_for = %missed,
                "firing the most recent missed tick once"
            );
            pending.catchup.push(Fire {
                schedule_id: row.id,
                at: missed,
                next: rule.next_after(now),
            });
        } else {
            tracing::info!(
                schedule_id = row.id,
                connection = %row.connection_id,
                last_missed = %missed,
                "skipping missed ticks older than the catch-up window"
            );
            pending.missed.push(Missed {
                schedule_id: row.id,
                first: rule.next_after(since).unwrap_or(missed).min(missed),
                last: missed,
                next: rule.next_after(now),
            });
        }
    }

    /// Checks a row's expression and zone; the slot's `next` is not set yet.
    /// A good row holds a use of its expression from here on.
    fn slot_for(&mut self, row: &Row) -> Result<(Slot, FireRule), String> {
        let (expr_id, expr) = self.exprs.acquire(&row.cron).map_err(|e| e.to_string())?;
        let tz = match cron::parse_timezone(&row.timezone) {
            Ok(tz) => tz,
            Err(e) => {
                self.exprs.release(expr_id);
                return Err(e.to_string());
            }
        };
        let jitter = cron::jitter_offset(&row.connection_id, row.jitter_seconds);
        let slot = Slot {
            id: row.id,
            next: NEVER,
            stamp: stamp(row.updated_at),
            expr: expr_id,
            jitter: u32::try_from(jitter.as_secs()).unwrap_or(u32::MAX),
            tz,
            unwritten: false,
        };
        Ok((slot, FireRule { expr, tz, jitter }))
    }

    /// The firing rule of a slot, its expression parsed again if need be.
    fn rule(&mut self, slot: &Slot) -> Result<FireRule, CronError> {
        Ok(FireRule {
            expr: self.exprs.parse(slot.expr)?,
            tz: slot.tz,
            jitter: Duration::from_secs(u64::from(slot.jitter)),
        })
    }

    /// Writes the `next_fire_at` of every row read since the last flush;
    /// only the leader writes them.
    async fn flush_next_fires(&mut self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        const CHUNK: usize = 10_000;
        if !self.leading() {
            return Ok(());
        }
        let mut from = 0;
        loop {
            let chunk: Vec<(usize, &Slot)> = self.slots.unwritten(from).take(CHUNK).collect();
            let Some(&(last, _)) = chunk.last() else {
                return Ok(());
            };
            let ids: Vec<i64> = chunk.iter().map(|(_, slot)| slot.id).collect();
            let nexts: Vec<Option<DateTime<Utc>>> = chunk
                .iter()
                .map(|(_, slot)| (slot.next != NEVER).then(|| from_secs(slot.next)))
                .collect();
            let written: Vec<usize> = chunk.iter().map(|&(at, _)| at).collect();
            sqlx::query(
                // `s.id = any($1)` makes the rows a probe of the primary
                // key whatever the statistics say (see `fire`).
                "update schedules s set next_fire_at = n.next
                 from unnest($1::bigint[], $2::timestamptz[]) as n(id, next)
                 where s.id = any($1) and s.id = n.id and s.next_fire_at is distinct from n.next",
            )
            .bind(&ids)
            .bind(&nexts)
            .execute(&mut *conn)
            .await?;
            self.slots.mark_written(&written);
            from = last + 1;
        }
    }

    /// Pops every due row and fires it. A timer that woke late (a stall,
    /// a suspended machine, an outage) fires only the most recent tick, and
    /// only inside the catch-up window: never a burst of replays.
    async fn fire_due(&mut self) -> Result<(), sqlx::Error> {
        let Some(due) = self.take_due() else {
            return Ok(());
        };
        let mut conn = match self.pool.acquire().await {
            Ok(conn) => conn,
            Err(e) => {
                self.unwritten(&due, &e);
                return Err(e);
            }
        };
        self.write_due(&mut conn, due).await
    }

    /// Pops the rows due now and decides each one's tick: fired, or
    /// recorded missed. Nothing is written; `None` when nothing is due or
    /// this daemon follows (a follower's rows stay due until it leads and
    /// reads them again).
    fn take_due(&mut self) -> Option<Due> {
        let term = self.leadership.term()?;
        let now = Utc::now();
        let mut due = Vec::new();
        while let Some((id, at)) = self.slots.pop_due(now.timestamp()) {
            if let Some(slot) = self.slots.get(id) {
                due.push((slot, at));
            }
        }
        // Rows of one expression come together, so each expression due now
        // is parsed at most once however many others share the instant
        // (only a few parses are kept). A row with two live keys is due once.
        due.sort_unstable_by_key(|&(slot, at)| (slot.expr, slot.id, at));
        due.dedup_by_key(|&mut (slot, at)| (slot.id, at));
        let mut fires = Vec::new();
        let mut missed = Vec::new();
        for (slot, at) in due {
            let id = slot.id;
            let rule = match self.rule(&slot) {
                Ok(rule) => rule,
                Err(e) => {
                    // It parsed when the row was read; nothing should change that.
                    tracing::error!(schedule_id = id, error = %e, "schedule expression no longer parses; dropping it until the row changes");
                    self.slots.reschedule(id, NEVER);
                    continue;
                }
            };
            let at = from_secs(at);
            let latest = match rule.next_after(at) {
                Some(following) if following <= now => rule.latest_at_or_before(now),
                _ => Some(at),
            };
            let next = rule.next_after(now);
            match latest {
                Some(tick) if owed(self.catchup_window, now, tick) => {
                    fires.push(Fire {
                        schedule_id: id,
                        at: tick,
                        next,
                    });
                }
                Some(tick) => {
                    tracing::info!(
                        schedule_id = id,
                        last_missed = %tick,
                        "skipping a tick older than the catch-up window"
                    );
                    missed.push(Missed {
                        schedule_id: id,
                        first: at.min(tick),
                        last: tick,
                        next,
                    });
                }
                None => {}
            }
            self.slots.reschedule(id, next.map_or(NEVER, to_secs));
        }
        (!fires.is_empty() || !missed.is_empty()).then_some(Due {
            term,
            fires,
            missed,
        })
    }

    /// Writes what `take_due` decided, on `conn`.
    async fn write_due(&mut self, conn: &mut PgConnection, due: Due) -> Result<(), sqlx::Error> {
        let Due {
            term,
            fires,
            missed,
        } = due;
        if !missed.is_empty() {
            // Said once: should it fail, the ticks are not put back (they
            // are past firing), only not recorded; the log line stays.
            match record_missed(conn, &missed, self.catchup_window, term).await {
                Ok(recorded) => self.count_missed(&recorded),
                Err(e) => tracing::warn!(error = %e, "could not record missed ticks"),
            }
        }
        if !fires.is_empty() {
            match fire(conn, &fires, term).await {
                Ok(true) => self.count_fired(&fires),
                Ok(false) => self.fenced(&fires),
                Err(e) => {
                    self.put_back(&fires);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// What is left of due rows when no connection could be had to write
    /// them: the missed ticks are not recorded, the fires are put back.
    fn unwritten(&mut self, due: &Due, error: &sqlx::Error) {
        if !due.missed.is_empty() {
            tracing::warn!(error = %error, "could not record missed ticks");
        }
        self.put_back(&due.fires);
    }

    /// Puts ticks back so they fire once the database answers, within the
    /// catch-up window.
    fn put_back(&mut self, fires: &[Fire]) {
        for fire in fires {
            self.slots.reschedule(fire.schedule_id, to_secs(fire.at));
        }
    }

    /// The earliest instant anything is due.
    fn next_wake(&mut self) -> Option<DateTime<Utc>> {
        self.slots.next_due().map(from_secs)
    }

    pub async fn run(
        mut self,
        mut edits: mpsc::Receiver<Edit>,
        reconcile_interval: Duration,
        shutdown: CancellationToken,
        ready: tokio::sync::oneshot::Sender<usize>,
        heartbeats: Arc<Heartbeats>,
    ) {
        let mut backoff = Backoff::new();
        // Leading or not decides whether the load writes what rows owe;
        // should the database not answer yet, the load retries anyway and
        // the leadership is looked at again after it.
        if let Err(e) = self.check_leadership().await {
            tracing::debug!(error = %e, "could not look at the schedule leadership before loading");
        }
        while let Err(e) = self.load_all().await {
            tracing::warn!(error = %e, "loading schedules failed; retrying");
            tokio::select! {
                () = tokio::time::sleep(backoff.next_delay()) => {}
                () = shutdown.cancelled() => {
                    self.resign().await;
                    return;
                }
            }
        }
        self.exprs.bound();
        let firing = self.slots.firing();
        self.metrics.schedules_loaded(firing);
        tracing::info!(schedules = firing, "schedules loaded");
        let _ = ready.send(firing);
        // Written after ready: nothing waits on these but `schedules list`.
        if let Err(e) = self.flush_after_load().await {
            tracing::warn!(error = %e, "writing next_fire_at failed; retrying with the next edit");
        }
        // Loading freed the pages of every row read; give them back, so a
        // large table does not leave its high-water mark in our RSS.
        crate::daemon::memory::release_free();
        let mut reconcile = tokio::time::interval(reconcile_interval);
        reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        reconcile.reset();
        let mut failing = false;
        loop {
            heartbeats.engine_alive();
            let fire_in = if self.leading() {
                self.next_wake()
                    .map(|at| (at - Utc::now()).to_std().unwrap_or(Duration::ZERO))
                    .unwrap_or(MAX_SLEEP)
            } else {
                MAX_SLEEP
            };
            let check_in = self
                .leadership
                .next_check()
                .saturating_duration_since(std::time::Instant::now());
            let sleep_for = fire_in.min(check_in).min(MAX_SLEEP);
            let sleep_for = if failing {
                sleep_for.max(backoff.peek())
            } else {
                sleep_for
            };
            let result = tokio::select! {
                // However the loop ends (the listener's channel closes at
                // shutdown too), a leader gives the leadership up.
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(sleep_for) => self.tick().await,
                edit = edits.recv() => match edit {
                    Some(first) => self.apply_edits(first, &mut edits).await,
                    None => break,
                },
                // Followers are kept current by notifications; the leader's
                // reconcile catches what a lost one missed (and a follower
                // reconciles when it takes over).
                _ = reconcile.tick(), if self.leading() => self.reconcile().await,
            };
            self.metrics.schedules_loaded(self.slots.firing());
            match result {
                Ok(()) => {
                    if failing {
                        tracing::info!("schedule engine reached the database again");
                    }
                    failing = false;
                    backoff = Backoff::new();
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "schedule engine cannot reach the database; retrying with backoff");
                    }
                    failing = true;
                    backoff.next_delay();
                }
            }
        }
        self.resign().await;
    }

    /// What the timer woke for: the leadership's renewal or takeover when
    /// it is due, a reconcile still owed, then the due rows when this
    /// daemon leads.
    async fn tick(&mut self) -> Result<(), sqlx::Error> {
        if std::time::Instant::now() >= self.leadership.next_check() {
            self.check_leadership().await?;
        }
        if self.reconcile_owed {
            self.reconcile().await?;
        }
        if !self.leading() {
            return Ok(());
        }
        if !self.deferred.is_empty() {
            self.read_deferred().await?;
        }
        self.fire_due().await
    }

    /// Renews or takes over the leadership; on taking over, reads again
    /// every row that fell due while another daemon fired, then whatever
    /// a lost notification may have left stale.
    async fn check_leadership(&mut self) -> Result<(), sqlx::Error> {
        let checked = match self.pool.acquire().await {
            Ok(mut conn) => self.look_at_leadership(&mut conn).await,
            Err(e) => {
                self.leadership_unreachable();
                Err(e)
            }
        };
        if let Change::Gained(_) = checked? {
            if self.loaded {
                self.read_deferred().await?;
                self.reconcile().await?;
            }
        }
        Ok(())
    }

    /// Renews or takes over the leadership on `conn`, and says so. On
    /// taking over a loaded engine, the rows that fell due while another
    /// daemon fired are left in `deferred`, to be read again by the caller
    /// or the next tick; before the load, the load reads every row as
    /// leader.
    async fn look_at_leadership(&mut self, conn: &mut PgConnection) -> Result<Change, sqlx::Error> {
        let change = match self.leadership.check(conn).await {
            Ok(change) => change,
            Err(e) => {
                self.leadership_unreachable();
                return Err(e);
            }
        };
        match change {
            Change::Kept => {}
            Change::Gained(term) => {
                tracing::info!(term, "this daemon fires the schedules now");
                self.report_leadership();
                if self.loaded {
                    let now = Utc::now().timestamp();
                    while let Some((id, _)) = self.slots.pop_due(now) {
                        self.deferred.push(id);
                    }
                }
            }
            Change::Lost => {
                tracing::warn!(
                    "another daemon fires the schedules now; this one stops firing them"
                );
                self.report_leadership();
            }
        }
        Ok(change)
    }

    /// Renews a leader's lease on `conn` when it is due: for a walk of
    /// many pages that holds a connection and must not outlast the lease.
    async fn renew_if_due(&mut self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        if self.leading() && std::time::Instant::now() >= self.leadership.next_check() {
            self.look_at_leadership(conn).await?;
        }
        Ok(())
    }

    /// The database did not answer a look at the leadership: past the
    /// lease, this daemon stops firing.
    fn leadership_unreachable(&mut self) {
        if self.leadership.unreachable() == Change::Lost {
            tracing::warn!(
                "this daemon could not renew its lease on firing schedules and stops firing them"
            );
            self.report_leadership();
        }
    }

    /// Reads again the rows a follower left to the leader, or that fell
    /// due while another daemon fired: each is fired, caught up, recorded
    /// missed or has its error written as the row's `last_fired_at` says.
    async fn read_deferred(&mut self) -> Result<(), sqlx::Error> {
        let mut ids = std::mem::take(&mut self.deferred);
        ids.sort_unstable();
        ids.dedup();
        let mut conn = self.pool.acquire().await?;
        for (at, chunk) in ids.chunks(10_000).enumerate() {
            if let Err(e) = self.reload(&mut conn, chunk).await {
                self.deferred.extend_from_slice(&ids[at * 10_000..]);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Gives the leadership up at shutdown, so another daemon takes over
    /// at once.
    async fn resign(&mut self) {
        if !self.leading() {
            return;
        }
        let resigned = match self.pool.acquire().await {
            Ok(mut conn) => self.leadership.resign(&mut conn).await,
            Err(e) => Err(e),
        };
        match resigned {
            Ok(()) => tracing::info!("this daemon no longer fires the schedules"),
            Err(e) => {
                tracing::warn!(error = %e, "could not give up firing schedules; another daemon takes over when the lease expires")
            }
        }
    }

    /// Applies one edit and every other one already queued, in one read.
    async fn apply_edits(
        &mut self,
        first: Edit,
        edits: &mut mpsc::Receiver<Edit>,
    ) -> Result<(), sqlx::Error> {
        let mut ids = Vec::new();
        let mut full = false;
        let mut next = Some(first);
        while let Some(edit) = next {
            match edit {
                Edit::Row(id) => ids.push(id),
                Edit::Reconcile => full = true,
                Edit::Leader => self.leadership.check_now(),
            }
            next = edits.try_recv().ok();
        }
        if ids.is_empty() && !full {
            return Ok(());
        }
        if full {
            return self.reconcile().await;
        }
        ids.sort_unstable();
        ids.dedup();
        let mut conn = self.pool.acquire().await?;
        self.reload(&mut conn, &ids).await
    }

    /// Writes the load's `next_fire_at` values: one per row, so the
    /// connection's buffers are shrunk after.
    async fn flush_after_load(&mut self) -> Result<(), sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        self.flush_next_fires(&mut conn).await?;
        conn.shrink_buffers();
        Ok(())
    }
}

async fn write_errors(
    conn: &mut PgConnection,
    errors: &[(i64, String)],
    cleared: &[i64],
) -> Result<(), sqlx::Error> {
    if !errors.is_empty() {
        let (ids, messages): (Vec<i64>, Vec<String>) = errors.iter().cloned().unzip();
        sqlx::query(
            "update schedules s set last_error = e.message, next_fire_at = null
             from unnest($1::bigint[], $2::text[]) as e(id, message) where s.id = e.id",
        )
        .bind(&ids)
        .bind(&messages)
        .execute(&mut *conn)
        .await?;
    }
    if !cleared.is_empty() {
        sqlx::query("update schedules set last_error = null where id = any($1)")
            .bind(cleared)
            .execute(&mut *conn)
            .await?;
        tracing::info!(count = cleared.len(), "schedule errors cleared by a fix");
    }
    Ok(())
}

/// One page of the reconcile's walk: `stamps` are the table's rows with
/// ids above `after`, in id order, at most `page` of them. Compares them
/// with the engine's rows (`known`, in id order) over the same ids: a row
/// only the table has, or with another stamp, was inserted or edited; a
/// row only the engine has was deleted. Returns the id the next page starts
/// after, or `None` when this page was the last.
fn compare_page(
    known: &[Slot],
    after: i64,
    stamps: &[(i64, DateTime<Utc>)],
    page: usize,
    changed: &mut Vec<i64>,
    gone: &mut Vec<i64>,
) -> Option<i64> {
    // A full page covers the ids up to its last; a short one, all the rest.
    let next = match stamps.last() {
        Some(&(id, _)) if stamps.len() >= page => Some(id),
        _ => None,
    };
    let from = known.partition_point(|slot| slot.id <= after);
    let to = next.map_or(known.len(), |upto| {
        known.partition_point(|slot| slot.id <= upto)
    });
    let known = &known[from..to];
    let mut next_known = 0;
    for &(id, updated_at) in stamps {
        while next_known < known.len() && known[next_known].id < id {
            gone.push(known[next_known].id);
            next_known += 1;
        }
        match known.get(next_known) {
            Some(slot) if slot.id == id => {
                if slot.stamp != stamp(updated_at) {
                    changed.push(id);
                }
                next_known += 1;
            }
            _ => changed.push(id),
        }
    }
    gone.extend(known[next_known..].iter().map(|slot| slot.id));
    next
}

/// Inserts one command per tick, for the connection its schedule row
/// names, and records the fire on the row, if the lease of `term` is still
/// current; returns whether it was (when not, nothing was written).
async fn fire(conn: &mut PgConnection, fires: &[Fire], term: i64) -> Result<bool, sqlx::Error> {
    let ids: Vec<i64> = fires.iter().map(|f| f.schedule_id).collect();
    let ats: Vec<DateTime<Utc>> = fires.iter().map(|f| f.at).collect();
    let nexts: Vec<Option<DateTime<Utc>>> = fires.iter().map(|f| f.next).collect();
    let current: bool = sqlx::query_scalar(
        r#"
        with t as (
            select * from unnest($1::bigint[], $2::timestamptz[], $3::timestamptz[])
                as t(schedule_id, fire_at, next_at)
        ), lease as (
            select from schedule_leader where term = $4 and expires_at > now()
        ), inserted as (
            -- `s.id = any($1)`: the schedules are probed by primary key
            -- whatever the statistics say. A plan made while the table
            -- was small joined by walking all of it, once per tick.
            insert into run_commands (connection_id, trigger, schedule_id, scheduled_for)
            select s.connection_id, 'scheduled', t.schedule_id, t.fire_at
            from t join schedules s on s.id = t.schedule_id
            where s.id = any($1) and exists (select from lease)
            on conflict (schedule_id, scheduled_for) do nothing
            returning schedule_id
        ), moved as (
            update schedules s
            set last_fired_at = greatest(s.last_fired_at, t.fire_at), next_fire_at = t.next_at
            from t where s.id = any($1) and s.id = t.schedule_id and exists (select from lease)
        )
        select exists (select from lease)
        "#,
    )
    .bind(&ids)
    .bind(&ats)
    .bind(&nexts)
    .bind(term)
    .fetch_one(conn)
    .await?;
    if !current {
        return Ok(false);
    }
    for fire in fires {
        tracing::debug!(
            schedule_id = fire.schedule_id,
            scheduled_for = %fire.at,
            "schedule fired"
        );
    }
    Ok(true)
}

/// Records each schedule's missed ticks as one `skipped` run of kind
/// `missed`, under a done command keyed by its last missed tick: the
/// unique `(schedule_id, scheduled_for)` key lets one daemon of several
/// reading the same row record it. The schedule's `last_fired_at` moves to
/// that tick, so the next start does not report the same downtime again.
/// Returns the connector of each run it recorded (another daemon may have
/// recorded some first); nothing is written unless the lease of `term` is
/// current.
async fn record_missed(
    conn: &mut PgConnection,
    missed: &[Missed],
    window: Duration,
    term: i64,
) -> Result<Vec<Option<String>>, sqlx::Error> {
    let ids: Vec<i64> = missed.iter().map(|m| m.schedule_id).collect();
    let firsts: Vec<DateTime<Utc>> = missed.iter().map(|m| m.first).collect();
    let lasts: Vec<DateTime<Utc>> = missed.iter().map(|m| m.last).collect();
    let nexts: Vec<Option<DateTime<Utc>>> = missed.iter().map(|m| m.next).collect();
    let window = humantime::format_duration(window).to_string();
    sqlx::query_scalar(
        r#"
        with t as (
            select * from unnest($1::bigint[], $2::timestamptz[], $3::timestamptz[],
                                 $4::timestamptz[])
                as t(schedule_id, first_at, last_at, next_at)
        ), lease as (
            select from schedule_leader where term = $6 and expires_at > now()
        ), command as (
            insert into run_commands (connection_id, trigger, schedule_id, scheduled_for, status)
            select s.connection_id, 'scheduled', t.schedule_id, t.last_at, 'done'
            from t join schedules s on s.id = t.schedule_id
            where s.id = any($1) and exists (select from lease)
            on conflict (schedule_id, scheduled_for) do nothing
            returning id, connection_id, schedule_id, scheduled_for
        ), run as (
            insert into runs (command_id, connection_id, connector, trigger, schedule_id,
                              scheduled_for, attempt, status, failure_kind, failure_detail,
                              finished_at)
            select command.id, command.connection_id, c.connector, 'scheduled', command.schedule_id,
                   command.scheduled_for, 1, 'skipped', 'missed',
                   case when t.first_at = t.last_at
                        then 'the tick at ' || to_char(t.last_at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
                        else 'the ticks from ' || to_char(t.first_at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
                             || ' to ' || to_char(t.last_at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
                   end || ' fell while no daemon fired them, and are older than catchup_window ('
                       || $5 || ')',
                   now()
            from command
            join t on t.schedule_id = command.schedule_id
            left join connections c on c.id = command.connection_id
            returning connector
        ), moved as (
            update schedules s
            set last_fired_at = greatest(s.last_fired_at, t.last_at), next_fire_at = t.next_at
            from t where s.id = any($1) and s.id = t.schedule_id and exists (select from lease)
        )
        select connector from run
        "#,
    )
    .bind(&ids)
    .bind(&firsts)
    .bind(&lasts)
    .bind(&nexts)
    .bind(&window)
    .bind(term)
    .fetch_all(conn)
    .await
}

/// Whether a tick that fell at `tick` still fires at `now`: on time (within
/// a second's slack), or late but inside the catch-up window (0 disables
/// catching up).
fn owed(catchup_window: Duration, now: DateTime<Utc>, tick: DateTime<Utc>) -> bool {
    let late = (now - tick).to_std().unwrap_or(Duration::ZERO);
    late <= ON_TIME_SLACK || (!catchup_window.is_zero() && late <= catchup_window)
}

/// How late a tick may be and still count as on time.
const ON_TIME_SLACK: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_paged_reconcile_finds_every_insert_edit_and_delete_whatever_the_page() {
        let at = |micros: i64| DateTime::from_timestamp_micros(micros).expect("an instant");
        let known: Vec<Slot> = (1..=10).map(|id| Slot::idle(id, id)).collect();
        // 2, 7 and 10 deleted; 5 edited; 11 and 12 inserted.
        let table: Vec<(i64, DateTime<Utc>)> = [1, 3, 4, 5, 6, 8, 9, 11, 12]
            .into_iter()
            .map(|id| (id, at(if id == 5 { 50 } else { id })))
            .collect();
        for page in 1..=12 {
            let (mut changed, mut gone) = (Vec::new(), Vec::new());
            let mut after = i64::MIN;
            loop {
                let stamps: Vec<_> = table
                    .iter()
                    .copied()
                    .filter(|&(id, _)| id > after)
                    .take(page)
                    .collect();
                match compare_page(&known, after, &stamps, page, &mut changed, &mut gone) {
                    Some(next) => after = next,
                    None => break,
                }
            }
            assert_eq!(changed, [5, 11, 12], "page of {page}");
            gone.sort_unstable();
            assert_eq!(gone, [2, 7, 10], "page of {page}");
        }
    }
}
