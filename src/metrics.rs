//! Prometheus metrics (SPEC §15): what the daemon already knows, counted
//! as it happens, and served at `[metrics] listen` as `/metrics`.
//!
//! Labels are bounded by the config, never by the data: connector names,
//! run statuses and failure kinds. No connection id, owner or anything a
//! connector printed is ever a label, so the series count stays the same
//! whatever the number of connections. The queue's figures are the only
//! ones read from the database, at most once per [`QUEUE_READ_EVERY`]
//! however often it is scraped, with one statement on partial indexes.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry, Unit};
use sqlx::PgPool;

/// The least time between two reads of the queue's figures.
pub const QUEUE_READ_EVERY: Duration = Duration::from_secs(1);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RunLabels {
    pub connector: String,
    pub status: String,
    /// Empty for a run that succeeded.
    pub failure_kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectorLabels {
    pub connector: String,
}

type HistogramFamily = Family<ConnectorLabels, Histogram, fn() -> Histogram>;

/// Every series the daemon exports.
pub struct Metrics {
    registry: Registry,
    runs_finished: Family<RunLabels, Counter>,
    pickup: HistogramFamily,
    duration: HistogramFamily,
    tick_lateness: Histogram,
    lease_renewals: Counter,
    lease_renewal_failures: Counter,
    runs_rescued: Family<RunLabels, Counter>,
    runs_running: Gauge,
    schedules_loaded: Gauge,
    schedule_leader: Gauge,
    schedules_in_error: Gauge,
    commands_pending: Gauge,
    oldest_pending: Gauge<f64, AtomicU64>,
    database_up: Gauge,
    /// When the queue's figures were last read, and the connection they
    /// are read on.
    queue: tokio::sync::Mutex<QueueReader>,
}

fn pickup_histogram() -> Histogram {
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ])
}

fn duration_histogram() -> Histogram {
    Histogram::new([
        0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
    ])
}

/// Registers `metric` and hands back the handle the daemon counts with
/// (a clone shares the series).
fn add<M: Metric + Clone>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    metric: M,
) -> M {
    match unit {
        Some(unit) => registry.register_with_unit(name, help, unit, metric.clone()),
        None => registry.register(name, help, metric.clone()),
    }
    metric
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Registry::with_prefix("connectord");
        Metrics {
            runs_finished: add(
                &mut r,
                "runs_finished",
                "Runs that reached an outcome on this daemon, by connector, status and failure kind",
                None,
                Family::default(),
            ),
            pickup: add(
                &mut r,
                "pickup",
                "From a command being due to its connector child running",
                Some(Unit::Seconds),
                Family::new_with_constructor(pickup_histogram),
            ),
            duration: add(
                &mut r,
                "run_duration",
                "From a connector child starting to its run's outcome",
                Some(Unit::Seconds),
                Family::new_with_constructor(duration_histogram),
            ),
            tick_lateness: add(
                &mut r,
                "tick_lateness",
                "From a schedule's tick to its command being stored",
                Some(Unit::Seconds),
                Histogram::new([
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 60.0,
                ]),
            ),
            lease_renewals: add(
                &mut r,
                "lease_renewals",
                "Rounds of lease renewal that reached the database",
                None,
                Counter::default(),
            ),
            lease_renewal_failures: add(
                &mut r,
                "lease_renewal_failures",
                "Rounds of lease renewal or rescue that failed",
                None,
                Counter::default(),
            ),
            runs_rescued: add(
                &mut r,
                "runs_rescued",
                "Runs of stopped daemons this daemon settled (lost or cancelled)",
                None,
                Family::default(),
            ),
            runs_running: add(
                &mut r,
                "runs_running",
                "Runs this daemon has going",
                None,
                Gauge::default(),
            ),
            schedules_loaded: add(
                &mut r,
                "schedules_loaded",
                "Schedule rows this daemon's engine holds with a next fire (the leader fires them)",
                None,
                Gauge::default(),
            ),
            schedule_leader: add(
                &mut r,
                "schedule_leader",
                "1 while this daemon is the one that fires the schedules, else 0",
                None,
                Gauge::default(),
            ),
            schedules_in_error: add(
                &mut r,
                "schedules_in_error",
                "Schedule rows with a last_error, which do not fire",
                None,
                Gauge::default(),
            ),
            commands_pending: add(
                &mut r,
                "commands_pending",
                "Commands pending and due, across all daemons",
                None,
                Gauge::default(),
            ),
            oldest_pending: add(
                &mut r,
                "commands_oldest_pending_age",
                "How long the oldest due command has waited",
                Some(Unit::Seconds),
                Gauge::default(),
            ),
            database_up: add(
                &mut r,
                "database_up",
                "Whether the database answered the last statement of the scrape or lease round",
                None,
                Gauge::default(),
            ),
            queue: Default::default(),
            registry: r,
        }
    }

    /// A run reached its outcome here.
    pub fn run_finished(&self, connector: Option<&str>, status: &str, failure_kind: Option<&str>) {
        self.runs_finished
            .get_or_create(&RunLabels {
                connector: connector.unwrap_or("").to_owned(),
                status: status.to_owned(),
                failure_kind: failure_kind.unwrap_or("").to_owned(),
            })
            .inc();
    }

    /// A stopped daemon's run was settled here (`failed`, as lost or
    /// cancelled): an outcome reached on this daemon, and a rescue.
    pub fn run_rescued(&self, connector: Option<&str>, failure_kind: &str) {
        let failed = crate::vocabulary::RunStatus::Failed.as_str();
        self.run_finished(connector, failed, Some(failure_kind));
        self.runs_rescued
            .get_or_create(&RunLabels {
                connector: connector.unwrap_or("").to_owned(),
                status: failed.to_owned(),
                failure_kind: failure_kind.to_owned(),
            })
            .inc();
    }

    pub fn picked_up(&self, connector: &str, waited: Duration) {
        self.pickup
            .get_or_create(&ConnectorLabels {
                connector: connector.to_owned(),
            })
            .observe(waited.as_secs_f64());
    }

    pub fn ran(&self, connector: &str, took: Duration) {
        self.duration
            .get_or_create(&ConnectorLabels {
                connector: connector.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    pub fn tick_stored(&self, late: Duration) {
        self.tick_lateness.observe(late.as_secs_f64());
    }

    pub fn lease_round(&self, ok: bool) {
        if ok {
            self.lease_renewals.inc();
        } else {
            self.lease_renewal_failures.inc();
        }
        self.database_up.set(i64::from(ok));
    }

    pub fn schedules_loaded(&self, count: usize) {
        self.schedules_loaded.set(count as i64);
    }

    pub fn schedule_leader(&self, leading: bool) {
        self.schedule_leader.set(i64::from(leading));
    }

    /// The exposition text, with the gauges read now: this daemon's runs
    /// from `running`, and the queue's figures from the database unless
    /// they were read less than [`QUEUE_READ_EVERY`] ago.
    pub async fn render(&self, pool: &PgPool, running: usize) -> String {
        self.runs_running.set(running as i64);
        {
            // Scrapes at the same moment wait for one read.
            let mut queue = self.queue.lock().await;
            if queue
                .read_at
                .is_none_or(|at| at.elapsed() >= QUEUE_READ_EVERY)
            {
                queue.read_at = Some(Instant::now());
                match queue.read(pool).await {
                    Ok((pending, oldest, in_error)) => {
                        self.commands_pending.set(pending);
                        self.oldest_pending.set(oldest.unwrap_or(0.0).max(0.0));
                        self.schedules_in_error.set(in_error);
                        self.database_up.set(1);
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "metrics: reading the queue's figures failed");
                        queue.conn = None;
                        self.database_up.set(0);
                    }
                }
            }
        }
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// Reads the queue's figures on a connection of its own, taken out of the
/// pool: a scrape neither waits for the pool the runs use nor pays the
/// pool's ping. Its session is the daemon's, so the count walks the
/// partial index of pending commands, never the whole table of done ones.
#[derive(Default)]
struct QueueReader {
    read_at: Option<Instant>,
    conn: Option<sqlx::PgConnection>,
}

impl QueueReader {
    async fn read(&mut self, pool: &PgPool) -> Result<(i64, Option<f64>, i64), sqlx::Error> {
        let conn = match &mut self.conn {
            Some(conn) => conn,
            None => self.conn.insert(pool.acquire().await?.detach()),
        };
        // One pass over the due commands gives both their count and the
        // oldest; the schedules in error are few, on their index.
        sqlx::query_as(
            "select count(*), extract(epoch from now() - min(not_before))::float8,
                    (select count(*) from schedules where last_error is not null)
             from run_commands where status = 'pending' and not_before <= now()",
        )
        .fetch_one(conn)
        .await
    }
}

/// Serves `/metrics` on `listener` until `stop`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    pool: PgPool,
    running: Arc<crate::run::leases::Leases>,
    stop: tokio_util::sync::CancellationToken,
) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Method, Response, StatusCode};

    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        let (metrics, pool, running) = (metrics.clone(), pool.clone(), running.clone());
        let service = hyper::service::service_fn(move |request: hyper::Request<_>| {
            let (metrics, pool, running) = (metrics.clone(), pool.clone(), running.clone());
            async move {
                if request.uri().path() != "/metrics" {
                    Response::builder()
                        .status(StatusCode::NOT_FOUND)
                        .body(Full::new(Bytes::from_static(b"not found; try /metrics\n")))
                } else if request.method() != Method::GET && request.method() != Method::HEAD {
                    Response::builder()
                        .status(StatusCode::METHOD_NOT_ALLOWED)
                        .body(Full::new(Bytes::from_static(b"GET /metrics\n")))
                } else {
                    let text = metrics.render(&pool, running.held()).await;
                    Response::builder()
                        .header(
                            hyper::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )
                        .body(Full::new(Bytes::from(text)))
                }
            }
        });
        tokio::spawn(async move {
            // A scraper that stops sending is dropped, not waited for.
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}
