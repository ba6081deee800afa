//! The schedule engine: one timer over a heap of next-fire instants.
//!
//! Every enabled `schedules` row is parsed once (one parsed expression per
//! distinct cron string, shared) and has one heap entry. The timer sleeps
//! until the earliest entry, at most a few seconds at a time so a jump of
//! the wall clock is noticed, and fires every due entry in one statement
//! that inserts `run_commands` rows with `ON CONFLICT DO NOTHING`: the
//! unique `(schedule_id, scheduled_for)` key makes each tick fire once
//! across every daemon sharing the database. Edits arrive by NOTIFY (a
//! schedule id) and a periodic reconcile re-reads `updated_at` of every row
//! in case a notification was lost. An edit bumps the entry's generation,
//! which makes its old heap entry stale instead of searching the heap.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::TryStreamExt;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use chrono_tz::Tz;

use crate::cron::{self, CronError, CronExpr, FireRule};
use crate::systemd::Heartbeats;

/// What the listener tells the engine.
#[derive(Debug)]
pub enum Edit {
    /// This schedule row was inserted, updated or deleted.
    Row(i64),
    /// Notifications may have been missed: re-read every row.
    Reconcile,
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

/// An active schedule: 56 bytes, its strings shared with every other
/// schedule of the same connection or the same expression.
struct Entry {
    connection_id: Arc<str>,
    /// The cron text; its parse is looked up in [`ParsedExprs`].
    cron: Arc<str>,
    tz: Tz,
    jitter_seconds: u32,
    generation: u32,
    /// The instant its heap entry fires at.
    next: DateTime<Utc>,
}

impl Entry {
    fn rule(&self, parsed: &mut ParsedExprs) -> Result<FireRule, CronError> {
        Ok(FireRule {
            expr: parsed.get(&self.cron)?,
            tz: self.tz,
            jitter: Duration::from_secs(u64::from(self.jitter_seconds)),
        })
    }
}

/// A heap key: fire instant, schedule id, generation (24 bytes).
type HeapKey = Reverse<(DateTime<Utc>, i64, u32)>;

/// Parsed cron expressions, by text, for a bounded number of texts.
///
/// croner keeps about 5 KB per parsed expression (a byte per possible value
/// of every field, years included), so holding one parse per distinct
/// expression cost 13.5 MB at 100,000 schedules with 2,596 distinct
/// expressions: more than the schedules themselves. Entries keep the text;
/// the engine keeps at most [`PARSED_KEPT`] parses and parses again (about
/// 16 us) on a miss. The bulk load keeps every parse until it ends, so each
/// distinct expression is parsed once there.
#[derive(Default)]
struct ParsedExprs {
    by_text: HashMap<Arc<str>, CronExpr>,
    /// False during the bulk load, which keeps every parse.
    bounded: bool,
}

/// Parses kept once loading is done: every expression that fires within a
/// few seconds of another stays parsed, at 2.6 MB at most.
const PARSED_KEPT: usize = 512;

impl ParsedExprs {
    fn get(&mut self, text: &Arc<str>) -> Result<CronExpr, CronError> {
        if let Some(expr) = self.by_text.get(text) {
            return Ok(expr.clone());
        }
        let expr = cron::parse_cron(text)?;
        if self.bounded && self.by_text.len() >= PARSED_KEPT {
            self.by_text = HashMap::new();
        }
        self.by_text.insert(text.clone(), expr.clone());
        Ok(expr)
    }

    /// Ends the bulk load: from now on at most [`PARSED_KEPT`] are kept.
    fn bound(&mut self) {
        self.bounded = true;
        if self.by_text.len() > PARSED_KEPT {
            self.by_text = HashMap::new();
        }
    }
}

/// What turning rows into entries leaves to write.
#[derive(Default)]
struct Pending {
    errors: Vec<(i64, String)>,
    cleared: Vec<i64>,
    catchup: Vec<Fire>,
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

/// Expression (by its interned text's address), zone, jitter.
type RuleKey = (usize, Tz, u32);

impl KnownFires {
    fn next_after(
        &mut self,
        entry: &Entry,
        rule: &FireRule,
        after: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        // Interned texts: one pointer per distinct expression.
        let key = (
            Arc::as_ptr(&entry.cron).cast::<u8>() as usize,
            entry.tz,
            entry.jitter_seconds,
        );
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

/// One shared copy of each string in use (connection ids, cron texts).
#[derive(Default)]
struct Interner(HashSet<Arc<str>>);

impl Interner {
    fn intern(&mut self, text: &str) -> Arc<str> {
        if let Some(shared) = self.0.get(text) {
            return shared.clone();
        }
        let shared: Arc<str> = Arc::from(text);
        self.0.insert(shared.clone());
        shared
    }

    /// Forgets strings nothing but the interner holds any more.
    fn prune(&mut self) {
        self.0.retain(|s| Arc::strong_count(s) > 1);
    }
}

pub struct Engine {
    pool: PgPool,
    catchup_window: Duration,
    entries: HashMap<i64, Entry>,
    /// `updated_at` of every row seen, active or not, for the reconcile diff.
    seen: HashMap<i64, DateTime<Utc>>,
    heap: BinaryHeap<HeapKey>,
    parsed: ParsedExprs,
    /// The connection ids and cron texts the entries share.
    strings: Interner,
    /// `next_fire_at` values computed but not yet written.
    unwritten_next_fires: Vec<(i64, Option<DateTime<Utc>>)>,
    /// Wraps; a stale heap key would have to outlive 2^32 edits to match.
    generation: u32,
}

/// A tick to fire: the command's `scheduled_for` and the entry's next fire.
struct Fire {
    schedule_id: i64,
    connection_id: Arc<str>,
    at: DateTime<Utc>,
    next: Option<DateTime<Utc>>,
}

impl Engine {
    pub fn new(pool: PgPool, catchup_window: Duration) -> Engine {
        Engine {
            pool,
            catchup_window,
            entries: HashMap::new(),
            seen: HashMap::new(),
            heap: BinaryHeap::new(),
            parsed: ParsedExprs::default(),
            strings: Interner::default(),
            unwritten_next_fires: Vec::new(),
            generation: 0,
        }
    }

    /// Number of active schedules.
    fn len(&self) -> usize {
        self.entries.len()
    }

    /// Reads every row, a page at a time so a large table never sits in
    /// memory whole; fires missed ticks inside the catch-up window. The new
    /// `next_fire_at` values are left for `flush_next_fires`, so start-up
    /// is not held up by writing them.
    pub async fn load_all(&mut self) -> Result<(), sqlx::Error> {
        const PAGE: usize = 5_000;
        let pool = self.pool.clone();
        let query = format!("select {ROW_COLUMNS} from schedules order by id");
        // One streamed query: PostgreSQL sends the next rows while a page
        // is being turned into entries.
        let mut rows = sqlx::query_as::<_, Row>(&query).fetch(&pool);
        let mut present = HashSet::new();
        let mut page = Vec::with_capacity(PAGE);
        // Written once the stream is done and its connection is back in
        // the pool: a pool of two (the listener holds one) must do.
        let mut pending = Pending::default();
        while let Some(row) = rows.try_next().await? {
            present.insert(row.id);
            page.push(row);
            if page.len() == PAGE {
                self.apply_rows(std::mem::take(&mut page), &mut pending);
            }
        }
        drop(rows);
        self.apply_rows(page, &mut pending);
        self.remove_absent(&present);
        self.write_pending(pending).await
    }

    /// Re-reads only the rows whose `updated_at` changed.
    async fn reconcile(&mut self) -> Result<(), sqlx::Error> {
        let stamps: Vec<(i64, DateTime<Utc>)> =
            sqlx::query_as("select id, updated_at from schedules")
                .fetch_all(&self.pool)
                .await?;
        let present: HashSet<i64> = stamps.iter().map(|s| s.0).collect();
        self.remove_absent(&present);
        self.strings.prune();
        let changed: Vec<i64> = stamps
            .into_iter()
            .filter(|(id, updated)| self.seen.get(id) != Some(updated))
            .map(|(id, _)| id)
            .collect();
        if !changed.is_empty() {
            tracing::info!(
                count = changed.len(),
                "reconcile found schedule edits that no notification announced"
            );
            self.reload(&changed).await?;
        }
        self.flush_next_fires().await
    }

    /// Re-reads the given rows (inserted, edited or deleted).
    async fn reload(&mut self, ids: &[i64]) -> Result<(), sqlx::Error> {
        let rows: Vec<Row> = sqlx::query_as(&format!(
            "select {ROW_COLUMNS} from schedules where id = any($1)"
        ))
        .bind(ids)
        .fetch_all(&self.pool)
        .await?;
        for id in ids {
            if !rows.iter().any(|r| r.id == *id) {
                self.remove(*id);
            }
        }
        let mut pending = Pending::default();
        self.apply_rows(rows, &mut pending);
        self.write_pending(pending).await?;
        self.flush_next_fires().await
    }

    /// Forgets every schedule not in `present` (its row was deleted).
    fn remove_absent(&mut self, present: &HashSet<i64>) {
        let gone: Vec<i64> = self
            .seen
            .keys()
            .filter(|id| !present.contains(id))
            .copied()
            .collect();
        for id in gone {
            self.remove(id);
        }
    }

    fn remove(&mut self, id: i64) {
        if self.entries.remove(&id).is_some() {
            tracing::info!(schedule_id = id, "schedule removed");
        }
        self.seen.remove(&id);
    }

    /// Turns rows into entries, records errors, and fires catch-up ticks.
    fn apply_rows(&mut self, rows: Vec<Row>, pending: &mut Pending) {
        let now = Utc::now();
        let mut next_fires: Vec<(i64, Option<DateTime<Utc>>)> = Vec::with_capacity(rows.len());
        let Pending {
            errors,
            cleared,
            catchup,
            known,
        } = pending;
        for row in rows {
            self.seen.insert(row.id, row.updated_at);
            self.entries.remove(&row.id);
            if !row.enabled {
                next_fires.push((row.id, None));
                continue;
            }
            let (entry, rule) = match self.entry_for(&row) {
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
                        errors.push((row.id, message));
                    }
                    next_fires.push((row.id, None));
                    continue;
                }
            };
            if row.last_error.is_some() {
                cleared.push(row.id);
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
            let first_after_since = (since <= now).then(|| known.next_after(&entry, &rule, since));
            let next = match first_after_since {
                Some(first) if first.is_none_or(|t| t > now) => first,
                _ => {
                    self.catch_up(&row, &entry, &rule, since, now, catchup);
                    rule.next_after(now)
                }
            };
            next_fires.push((row.id, next));
            if let Some(next) = next {
                self.insert_entry(row.id, Entry { next, ..entry });
            }
        }
        self.unwritten_next_fires.extend(next_fires);
    }

    /// Writes what `apply_rows` left: row errors, cleared errors, catch-up
    /// ticks.
    async fn write_pending(&mut self, pending: Pending) -> Result<(), sqlx::Error> {
        self.write_errors(&pending.errors, &pending.cleared).await?;
        for fires in pending.catchup.chunks(5_000) {
            self.fire(fires).await?;
        }
        Ok(())
    }

    /// Queues the latest tick after `since` if one was missed and is still
    /// owed (inside the catch-up window).
    fn catch_up(
        &self,
        row: &Row,
        entry: &Entry,
        rule: &FireRule,
        since: DateTime<Utc>,
        now: DateTime<Utc>,
        catchup: &mut Vec<Fire>,
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
            catchup.push(Fire {
                schedule_id: row.id,
                connection_id: entry.connection_id.clone(),
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
        }
    }

    /// Checks a row's expression and zone; the entry's `next` is not set yet.
    fn entry_for(&mut self, row: &Row) -> Result<(Entry, FireRule), String> {
        let cron = self.strings.intern(row.cron.trim());
        let expr = self.parsed.get(&cron).map_err(|e| e.to_string())?;
        let tz = cron::parse_timezone(&row.timezone).map_err(|e| e.to_string())?;
        let jitter = cron::jitter_offset(&row.connection_id, row.jitter_seconds);
        let entry = Entry {
            connection_id: self.strings.intern(&row.connection_id),
            cron,
            tz,
            jitter_seconds: u32::try_from(jitter.as_secs()).unwrap_or(u32::MAX),
            generation: 0,
            next: DateTime::<Utc>::MIN_UTC,
        };
        Ok((entry, FireRule { expr, tz, jitter }))
    }

    fn insert_entry(&mut self, id: i64, entry: Entry) {
        self.generation = self.generation.wrapping_add(1);
        self.heap.push(Reverse((entry.next, id, self.generation)));
        self.entries.insert(
            id,
            Entry {
                generation: self.generation,
                ..entry
            },
        );
    }

    async fn write_errors(
        &self,
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
            .execute(&self.pool)
            .await?;
        }
        if !cleared.is_empty() {
            sqlx::query("update schedules set last_error = null where id = any($1)")
                .bind(cleared)
                .execute(&self.pool)
                .await?;
            tracing::info!(count = cleared.len(), "schedule errors cleared by a fix");
        }
        Ok(())
    }

    /// Writes the `next_fire_at` values computed since the last flush.
    async fn flush_next_fires(&mut self) -> Result<(), sqlx::Error> {
        while !self.unwritten_next_fires.is_empty() {
            let take = self.unwritten_next_fires.len().min(10_000);
            let chunk = &self.unwritten_next_fires[..take];
            let ids: Vec<i64> = chunk.iter().map(|f| f.0).collect();
            let nexts: Vec<Option<DateTime<Utc>>> = chunk.iter().map(|f| f.1).collect();
            sqlx::query(
                "update schedules s set next_fire_at = n.next
                 from unnest($1::bigint[], $2::timestamptz[]) as n(id, next)
                 where s.id = n.id and s.next_fire_at is distinct from n.next",
            )
            .bind(&ids)
            .bind(&nexts)
            .execute(&self.pool)
            .await?;
            self.unwritten_next_fires.drain(..take);
        }
        // The start-up batch can be large; give its memory back.
        self.unwritten_next_fires.shrink_to_fit();
        Ok(())
    }

    /// Inserts one command per tick and records the fire on its schedule.
    async fn fire(&self, fires: &[Fire]) -> Result<(), sqlx::Error> {
        let ids: Vec<i64> = fires.iter().map(|f| f.schedule_id).collect();
        let connections: Vec<&str> = fires.iter().map(|f| &*f.connection_id).collect();
        let ats: Vec<DateTime<Utc>> = fires.iter().map(|f| f.at).collect();
        let nexts: Vec<Option<DateTime<Utc>>> = fires.iter().map(|f| f.next).collect();
        sqlx::query(
            r#"
            with t as (
                select * from unnest($1::bigint[], $2::text[], $3::timestamptz[], $4::timestamptz[])
                    as t(schedule_id, connection_id, fire_at, next_at)
            ), inserted as (
                insert into run_commands (connection_id, trigger, schedule_id, scheduled_for)
                select connection_id, 'scheduled', schedule_id, fire_at from t
                on conflict (schedule_id, scheduled_for) do nothing
                returning schedule_id
            )
            update schedules s
            set last_fired_at = greatest(s.last_fired_at, t.fire_at), next_fire_at = t.next_at
            from t where s.id = t.schedule_id
            "#,
        )
        .bind(&ids)
        .bind(&connections)
        .bind(&ats)
        .bind(&nexts)
        .execute(&self.pool)
        .await?;
        for fire in fires {
            tracing::debug!(
                schedule_id = fire.schedule_id,
                connection = %fire.connection_id,
                scheduled_for = %fire.at,
                "schedule fired"
            );
        }
        Ok(())
    }

    /// Pops every due entry and fires it. A timer that woke late (a stall,
    /// a suspended machine, an outage) fires only the most recent tick, and
    /// only inside the catch-up window: never a burst of replays.
    async fn fire_due(&mut self) -> Result<(), sqlx::Error> {
        let now = Utc::now();
        let mut fires = Vec::new();
        while let Some(Reverse((at, id, generation))) = self.heap.peek().copied() {
            if at > now {
                break;
            }
            self.heap.pop();
            let Some(entry) = self.entries.get_mut(&id) else {
                continue;
            };
            if entry.generation != generation {
                continue;
            }
            let rule = match entry.rule(&mut self.parsed) {
                Ok(rule) => rule,
                Err(e) => {
                    // It parsed when the row was read; nothing should change that.
                    tracing::error!(schedule_id = id, error = %e, "schedule expression no longer parses; dropping it until the row changes");
                    self.entries.remove(&id);
                    continue;
                }
            };
            let latest = match rule.next_after(at) {
                Some(following) if following <= now => rule.latest_at_or_before(now),
                _ => Some(at),
            };
            let next = rule.next_after(now);
            match latest {
                Some(tick) if owed(self.catchup_window, now, tick) => {
                    fires.push(Fire {
                        schedule_id: id,
                        connection_id: entry.connection_id.clone(),
                        at: tick,
                        next,
                    });
                }
                Some(tick) => tracing::info!(
                    schedule_id = id,
                    connection = %entry.connection_id,
                    last_missed = %tick,
                    "skipping a tick older than the catch-up window"
                ),
                None => {}
            }
            match next {
                Some(next) => {
                    entry.next = next;
                    self.heap.push(Reverse((next, id, generation)));
                }
                None => {
                    self.entries.remove(&id);
                }
            }
        }
        if !fires.is_empty() {
            if let Err(e) = self.fire(&fires).await {
                // Put the ticks back so they fire once the database answers,
                // within the catch-up window.
                for fire in &fires {
                    if let Some(entry) = self.entries.get_mut(&fire.schedule_id) {
                        entry.next = fire.at;
                        self.heap
                            .push(Reverse((fire.at, fire.schedule_id, entry.generation)));
                    }
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// The earliest instant anything is due.
    fn next_wake(&mut self) -> Option<DateTime<Utc>> {
        // Drop stale tops so they don't cause needless wake-ups.
        while let Some(Reverse((_, id, generation))) = self.heap.peek().copied() {
            match self.entries.get(&id) {
                Some(entry) if entry.generation == generation => break,
                _ => {
                    self.heap.pop();
                }
            }
        }
        self.heap.peek().map(|Reverse((at, _, _))| *at)
    }

    /// Runs the timer until `shutdown`; `ready` is told once every row has
    /// been loaded.
    pub async fn run(
        mut self,
        mut edits: mpsc::Receiver<Edit>,
        reconcile_interval: Duration,
        shutdown: CancellationToken,
        ready: tokio::sync::oneshot::Sender<usize>,
        heartbeats: Arc<Heartbeats>,
    ) {
        let mut backoff = Backoff::new();
        while let Err(e) = self.load_all().await {
            tracing::warn!(error = %e, "loading schedules failed; retrying");
            tokio::select! {
                () = tokio::time::sleep(backoff.next_delay()) => {}
                () = shutdown.cancelled() => return,
            }
        }
        self.parsed.bound();
        tracing::info!(schedules = self.len(), "schedules loaded");
        let _ = ready.send(self.len());
        // Written after ready: nothing waits on these but `schedules list`.
        if let Err(e) = self.flush_next_fires().await {
            tracing::warn!(error = %e, "writing next_fire_at failed; retrying with the next edit");
        }
        // Loading freed the pages of every row read; give them back, so a
        // large table does not leave its high-water mark in our RSS.
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only releases free heap memory to the kernel.
        unsafe {
            libc::malloc_trim(0);
        }
        let mut reconcile = tokio::time::interval(reconcile_interval);
        reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        reconcile.reset();
        let mut failing = false;
        loop {
            heartbeats.engine_alive();
            let sleep_for = self
                .next_wake()
                .map(|at| (at - Utc::now()).to_std().unwrap_or(Duration::ZERO))
                .unwrap_or(MAX_SLEEP)
                .min(MAX_SLEEP);
            let sleep_for = if failing {
                sleep_for.max(backoff.peek())
            } else {
                sleep_for
            };
            let result = tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(sleep_for) => self.fire_due().await,
                edit = edits.recv() => match edit {
                    Some(first) => self.apply_edits(first, &mut edits).await,
                    None => return,
                },
                _ = reconcile.tick() => self.reconcile().await,
            };
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
            }
            next = edits.try_recv().ok();
        }
        if full {
            return self.reconcile().await;
        }
        ids.sort_unstable();
        ids.dedup();
        self.reload(&ids).await
    }
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

/// Capped exponential backoff for reconnecting to the database.
pub struct Backoff {
    current: Duration,
    attempts: u32,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(250);
    const MAX: Duration = Duration::from_secs(10);

    pub fn new() -> Backoff {
        Backoff {
            current: Self::FIRST,
            attempts: 0,
        }
    }

    /// The delay to wait now; the following one doubles, up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.current;
        self.current = (self.current * 2).min(Self::MAX);
        self.attempts += 1;
        delay
    }

    /// How many delays were handed out.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    pub fn peek(&self) -> Duration {
        self.current
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_pointer_width = "64")]
    fn per_schedule_footprint() {
        // The figures the comments and docs/PERFORMANCE.md quote.
        assert_eq!(std::mem::size_of::<Entry>(), 56);
        assert_eq!(std::mem::size_of::<HeapKey>(), 24);
    }

    #[test]
    fn parsed_expressions_are_bounded_after_the_load() {
        let mut parsed = ParsedExprs::default();
        let texts: Vec<Arc<str>> = (0..PARSED_KEPT + 100)
            .map(|i| Arc::from(format!("{} {} * * *", i % 60, i / 60).as_str()))
            .collect();
        for text in &texts {
            parsed.get(text).unwrap();
        }
        assert_eq!(
            parsed.by_text.len(),
            texts.len(),
            "the load keeps every parse"
        );
        parsed.bound();
        for text in &texts {
            let expr = parsed.get(text).unwrap();
            assert_eq!(expr.as_str(), &**text, "a re-parse is the same expression");
            assert!(parsed.by_text.len() <= PARSED_KEPT);
        }
        assert!(parsed.get(&Arc::from("61 * * * *")).is_err());
    }

    #[test]
    fn interned_strings_are_shared_and_pruned() {
        let mut strings = Interner::default();
        let a = strings.intern("alice-chase");
        let b = strings.intern("alice-chase");
        assert!(Arc::ptr_eq(&a, &b));
        drop((a, b));
        let kept = strings.intern("bob-usaa");
        strings.prune();
        assert_eq!(strings.0.len(), 1);
        assert!(strings.0.contains(&kept));
    }
}
