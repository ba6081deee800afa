//! The connection pool, the embedded migrations, and the database address
//! as messages may show it (without its password).

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Executor as _, PgConnection, PgPool};

use crate::config::DatabaseConfig;

/// Migrations from `migrations/`, compiled into the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

pub async fn connect(config: &DatabaseConfig) -> Result<PgPool, sqlx::Error> {
    pool_options(config).connect(&config.url).await
}

fn pool_options(config: &DatabaseConfig) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(Duration::from_secs(10))
}

/// Session settings of the daemon's connections, each with its reason.
/// A server or pooler that refuses one (`plan_cache_mode` needs
/// PostgreSQL 12) costs the performance it buys, not the connection.
const DAEMON_SESSION: &[&str] = &[
    // The daemon's statements are few, prepared once per connection and
    // run thousands of times. PostgreSQL plans a statement afresh on every
    // run while a custom plan looks no costlier than the generic one, and
    // planning the claim costs about as much as running it (see the design
    // decisions in docs/PERFORMANCE.md).
    "set plan_cache_mode = force_generic_plan",
    // The claim must walk the pending index in order and stop at its limit.
    // When the statistics predate a backlog (a handful of pending rows
    // estimated), PostgreSQL prefers a bitmap scan of every pending command
    // and a sort, whose cost grows with the backlog, to the ordered index
    // scan that stops at the limit. None of the daemon's statements needs a
    // bitmap scan: they are key lookups, ordered walks of partial indexes
    // and whole-table reads.
    "set enable_bitmapscan = off",
    // Every hot statement reaches its rows by key. With force_generic_plan
    // a statement is planned once per connection, on the statistics of that
    // moment: planned while a table was small (a fresh install, a quiet
    // night after retention, an analyze of a nearly empty table) a lookup
    // by primary key became a sequential scan, and stayed one through the
    // next burst, reading every command once per run. The statements that
    // read a whole table (the schedule load and reconcile) walk the
    // primary key in order anyway; `tests/plans.rs` counts the rows each
    // table gives up per run under four states of the statistics.
    "set enable_seqscan = off",
    // JIT compiles a plan whose estimated cost passes `jit_above_cost`, at
    // milliseconds per execution. No statement of the daemon is worth it,
    // and a plan that falls back to a node the claim session disables is
    // costed past that threshold by the penalty alone.
    "set jit = off",
    // Every statement of the daemon takes milliseconds. One that waits
    // longer is stuck behind a lock or a sick server, and holds a pooled
    // connection and whatever task awaits it; it fails instead, and the
    // writers that must not lose a write retry it.
    "set statement_timeout = '30s'",
];

/// The daemon's pool, with [`DAEMON_SESSION`] applied to every connection.
/// Its sessions are named `connectord` in `pg_stat_activity` unless the URL
/// names them.
pub async fn connect_daemon(config: &DatabaseConfig) -> Result<PgPool, sqlx::Error> {
    let mut options: PgConnectOptions = config.url.parse()?;
    if options.get_application_name().is_none() {
        options = options.application_name("connectord");
    }
    pool_options(config)
        .after_connect(|conn, _meta| {
            Box::pin(async move {
                refuse_standby(conn).await?;
                apply_session(conn, DAEMON_SESSION).await;
                Ok(())
            })
        })
        .connect_with(options)
        .await
}

/// What the claim session sets on top of [`DAEMON_SESSION`]. The claim
/// looks up at most 64 commands by key; a plan made while statistics are
/// missing or stale (after a migration, or before a backlog) may instead
/// hash every connection or every running run on each claim, a cost that
/// grows with the tables while the claim's own work does not. Nested loops
/// over index lookups are right for a claim whatever the statistics say
/// (see the design decisions in docs/PERFORMANCE.md).
const CLAIM_SESSION: &[&str] = &["set enable_hashjoin = off", "set enable_mergejoin = off"];

/// A connection for the dispatch loop's claims, out of the pool (see
/// `queue::dispatch`), with [`CLAIM_SESSION`] applied.
pub async fn claim_session(pool: &PgPool) -> Result<PgConnection, sqlx::Error> {
    let mut conn = pool.acquire().await?.detach();
    apply_session(&mut conn, CLAIM_SESSION).await;
    Ok(conn)
}

/// Refuses a connection to a server in recovery. During a failover the
/// address may lead to a standby for a while (not yet promoted, or the old
/// primary back as a standby): every write there fails. The pool logs the
/// refusal and keeps trying to open a session until its acquire timeout,
/// which every loop takes for the database being away, retrying with
/// backoff until the address leads to a primary. A session cannot go from
/// primary to standby without a restart, which ends it, so checking once
/// per connection is enough.
async fn refuse_standby(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    use sqlx::Row as _;
    // A simple query, like everything before the session probe: a
    // transaction pooler would lose a prepared statement.
    let row = conn.fetch_one("select pg_is_in_recovery()").await?;
    if row.try_get::<bool, _>(0)? {
        return Err(sqlx::Error::Io(std::io::Error::other(
            "the server is a standby (in recovery), not the primary; waiting for the address to lead to a primary",
        )));
    }
    Ok(())
}

/// Runs each `set`; one the server refuses costs only what it buys.
async fn apply_session(conn: &mut PgConnection, settings: &[&str]) {
    for setting in settings {
        if let Err(e) = conn.execute(*setting).await {
            tracing::debug!(setting, error = %e, "session setting refused; continuing without it");
        }
    }
}

/// Applies pending migrations; safe when several daemons start at once
/// (sqlx takes an advisory lock) and when run again.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    // A migration may rewrite a large table, which the daemon session's
    // statement timeout would cut short: migrate on a connection of its
    // own, closed afterwards.
    let mut conn = pool.acquire().await?.detach();
    conn.execute("set statement_timeout = 0").await?;
    MIGRATOR.run(&mut conn).await
}

/// How long a notification may take to come back, and how many times it
/// is sent, before the address is taken for a pooler that does not keep
/// sessions. On PostgreSQL it comes back in one round trip; these only
/// delay a refusal that has no proof.
const SESSION_PROBE_WAIT: Duration = Duration::from_secs(5);
const SESSION_PROBES: usize = 3;

/// The sentence for an address that does not keep a session per
/// connection.
pub(crate) fn sessions_not_kept(url: &str) -> String {
    format!(
        "the database at {} does not keep a session per connection: a LISTEN there never heard a NOTIFY sent to the same address, \
         so it is a pooler in transaction or statement mode (such as PgBouncer with pool_mode = transaction). \
         connectord needs its sessions for notifications, session settings and the migrations' lock; \
         point [database] url at PostgreSQL itself or at a pool in session mode",
        redact_url(url)
    )
}

/// Whether the address keeps a session per client connection, as
/// PostgreSQL and a session-mode pooler do. A transaction-mode pooler hands
/// a client a different server session per transaction: a `LISTEN` is made
/// on a server session the client no longer holds, so its notifications
/// never arrive (and prepared statements and `set` vanish the same way).
/// One `LISTEN` on a session of its own, one `NOTIFY` through the pool,
/// and the notification coming back, is the behaviour the daemon relies
/// on, tested as such rather than inferred from a server's name.
pub async fn keeps_sessions(pool: &PgPool) -> Result<bool, sqlx::Error> {
    for _ in 0..SESSION_PROBES {
        let channel = format!(
            "connectord_session_probe_{}_{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
        );
        let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
        listener.listen(&channel).await?;
        // Sent from a second session that accepts notifications: behind a
        // transaction pooler the sender may be handed the listener's server
        // session, and the notification with it. Without arguments it goes
        // as a simple query: no prepared statement, which such a pooler
        // would also lose.
        let mut sender = sqlx::postgres::PgListener::connect_with(pool).await?;
        sender.execute(format!("notify {channel}").as_str()).await?;
        tokio::select! {
            heard = listener.recv() => return Ok(heard?.channel() == channel),
            // It never listened: it heard the listener's notification, so
            // the two share server sessions.
            heard = sender.recv() => {
                heard?;
                return Ok(false);
            }
            () = tokio::time::sleep(SESSION_PROBE_WAIT) => {}
        }
    }
    Ok(false)
}

/// Whether every embedded migration has been applied.
pub async fn migrations_current(pool: &PgPool) -> Result<bool, sqlx::Error> {
    let applied: Vec<i64> =
        sqlx::query_scalar("select version from _sqlx_migrations where success order by version")
            .fetch_all(pool)
            .await
            .or_else(|e| match &e {
                sqlx::Error::Database(db) if db.code().as_deref() == Some("42P01") => {
                    Ok(Vec::new())
                }
                _ => Err(e),
            })?;
    Ok(MIGRATOR.iter().all(|m| applied.contains(&m.version)))
}

/// What a failed statement means to its caller, decided here for every
/// statement the daemon sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The database is (for now) unreachable or refusing work: wait and
    /// send the statement again.
    Transient,
    /// Another daemon took a run slot the statement wanted first: nothing
    /// was written, and the next claim sees the connection busy. Two
    /// claims taking slots of the same connections in opposite orders may
    /// instead deadlock; PostgreSQL then aborts one, which is the same
    /// race lost.
    LostSlotRace,
    /// The statement will never succeed as it is.
    Fatal,
}

impl Failure {
    pub fn of(error: &sqlx::Error) -> Failure {
        match error {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Protocol(_)
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Tls(_) => Failure::Transient,
            sqlx::Error::Database(db) => {
                let code = db.code();
                let code = code.as_deref().unwrap_or_default();
                if db.constraint() == Some("run_commands_one_slot") || code == "40P01" {
                    Failure::LostSlotRace
                } else if code.starts_with("08")
                    || code.starts_with("57P")
                    || code == "57014"
                    || code == "25006"
                {
                    // Class 08 is "connection exception"; 57P01–57P03 are
                    // the server shutting down or starting up; 57014 is a
                    // statement cancelled, by `statement_timeout` or an
                    // operator, which may pass; 25006 is a write refused
                    // as read-only, a session left on a primary being
                    // demoted in a failover.
                    Failure::Transient
                } else {
                    Failure::Fatal
                }
            }
            _ => Failure::Fatal,
        }
    }

    pub fn is_transient(error: &sqlx::Error) -> bool {
        Failure::of(error) == Failure::Transient
    }
}

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

/// The URL without its password (in the user part or a `password=`
/// parameter), for messages.
pub(crate) fn redact_url(url: &str) -> String {
    let Some(scheme) = url.find("://") else {
        return redact_keywords(url).unwrap_or_else(|| UNPARSABLE.to_owned());
    };
    // The user part ends at the last '@': a password may hold an unencoded
    // '@', '?' or '/', so nothing after the scheme can be split off first.
    let (prefix, rest) = match url[scheme + 3..].rfind('@') {
        Some(at) => {
            let at = scheme + 3 + at;
            let userinfo = &url[scheme + 3..at];
            let prefix = match userinfo.find(':') {
                Some(colon) => format!("{}{}:[redacted]@", &url[..scheme + 3], &userinfo[..colon]),
                None => url[..=at].to_owned(),
            };
            (prefix, &url[at + 1..])
        }
        None => (url[..scheme + 3].to_owned(), &url[scheme + 3..]),
    };
    let mut out = prefix;
    match rest.split_once('?') {
        None => out.push_str(rest),
        Some((base, query)) => {
            out.push_str(base);
            let params: Vec<String> = query
                .split('&')
                .map(|param| match param.split_once('=') {
                    Some((key, _)) if key.eq_ignore_ascii_case("password") => {
                        format!("{key}=[redacted]")
                    }
                    _ => param.to_owned(),
                })
                .collect();
            out.push('?');
            out.push_str(&params.join("&"));
        }
    }
    out
}

/// What is printed for a database address that cannot be parsed.
const UNPARSABLE: &str = "(unparsable URL)";

/// A keyword/value connection string (`host=h password='x y'`) with its
/// password redacted; `None` if it is not one.
fn redact_keywords(text: &str) -> Option<String> {
    let mut out = Vec::new();
    let mut rest = text.trim_start();
    while !rest.is_empty() {
        let eq = rest.find('=')?;
        let key = rest[..eq].trim();
        if key.is_empty() || key.contains(char::is_whitespace) {
            return None;
        }
        let after = rest[eq + 1..].trim_start();
        let value_len = if let Some(inner) = after.strip_prefix('\'') {
            let mut end = None;
            let mut escaped = false;
            for (i, c) in inner.char_indices() {
                match c {
                    '\\' if !escaped => escaped = true,
                    '\'' if !escaped => {
                        end = Some(i);
                        break;
                    }
                    _ => escaped = false,
                }
            }
            end? + 2
        } else {
            after.find(char::is_whitespace).unwrap_or(after.len())
        };
        let value = &after[..value_len];
        out.push(if key.eq_ignore_ascii_case("password") {
            format!("{key}=[redacted]")
        } else {
            format!("{key}={value}")
        });
        rest = after[value_len..].trim_start();
    }
    (!out.is_empty()).then(|| out.join(" "))
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn urls_lose_their_passwords() {
        for (url, expected) in [
            ("postgres://u:pw@h/db", "postgres://u:[redacted]@h/db"),
            ("postgres://u@h/db", "postgres://u@h/db"),
            (
                "postgres://u@h/db?sslmode=require&password=qsecret",
                "postgres://u@h/db?sslmode=require&password=[redacted]",
            ),
            (
                "postgres://u:p%40ss@h:5432/db?PASSWORD=x",
                "postgres://u:[redacted]@h:5432/db?PASSWORD=[redacted]",
            ),
            ("not a url", "(unparsable URL)"),
            // An unencoded '?', '@' or '/' in the password.
            ("postgres://u:pa?ss@h/db", "postgres://u:[redacted]@h/db"),
            (
                "postgres://u:p@ss/w?rd@h/db?sslmode=disable",
                "postgres://u:[redacted]@h/db?sslmode=disable",
            ),
            (
                "host=h user=u password=s3cret dbname=d",
                "host=h user=u password=[redacted] dbname=d",
            ),
            (
                "host=h password='it\\'s a secret' dbname=d",
                "host=h password=[redacted] dbname=d",
            ),
            ("host=h password='unterminated", "(unparsable URL)"),
        ] {
            assert_eq!(redact_url(url), expected, "{url}");
        }
    }
}
