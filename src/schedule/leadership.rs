//! Which daemon fires the schedules (SPEC §16).
//!
//! One daemon at a time leads: it holds the `schedule_leader` row under a
//! lease of `daemon.lease`, renewed every third of it, and only it fires
//! ticks, records missed ones and writes the rows' bookkeeping. The others
//! follow: they keep their engine loaded and current (edits arrive by
//! NOTIFY to every daemon) but write nothing, and look at the row again
//! when its lease is due to expire, or at once when the leader says it
//! resigned. Taking the row over bumps its term; every fire statement is
//! fenced on the term and on the lease being current (see
//! `schedule::engine`), so a leader that stalled past its lease finds its
//! fires refused rather than doubled.
//!
//! A table row rather than an advisory lock: a lock lives in a session,
//! which a transaction-mode pooler does not give, and a lease bounds how
//! long a leader that lost the database may believe it still leads.

use std::time::{Duration, Instant};

use sqlx::PgConnection;

/// Notified when a leader resigns, so a follower need not wait out the
/// lease.
pub const LEADER_CHANNEL: &str = "connectord_leader";

/// What a check of the leadership found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// As before: still leading, or still following.
    Kept,
    /// This daemon leads now, in this term.
    Gained(i64),
    /// Another daemon took over, or the lease ran out unrenewed.
    Lost,
}

pub struct Leadership {
    instance_id: String,
    lease: Duration,
    /// The term this daemon leads in, while it does.
    term: Option<i64>,
    /// When this daemon last renewed its lease, by its own clock: a leader
    /// that cannot reach the database stops firing once a lease has passed.
    renewed: Instant,
    /// When to look again: to renew, or to try to take over.
    next_check: Instant,
}

impl Leadership {
    pub fn new(instance_id: String, lease: Duration) -> Leadership {
        let now = Instant::now();
        Leadership {
            instance_id,
            // A lease shorter than a renewal round trip would flap.
            lease: lease.max(Duration::from_secs(1)),
            term: None,
            renewed: now,
            next_check: now,
        }
    }

    /// The term this daemon leads in, if it leads.
    pub fn term(&self) -> Option<i64> {
        self.term
    }

    pub fn next_check(&self) -> Instant {
        self.next_check
    }

    /// The leader resigned: try to take over now.
    pub fn check_now(&mut self) {
        self.next_check = Instant::now();
    }

    /// Renews the lease when leading; when following, takes the lease over
    /// if it has expired (or was this instance id's, left by a process that
    /// died), else notes when it will expire. A follower only reads until
    /// then.
    pub async fn check(&mut self, conn: &mut PgConnection) -> Result<Change, sqlx::Error> {
        let now = Instant::now();
        if let Some(term) = self.term {
            let renewed: Option<i64> = sqlx::query_scalar(
                "update schedule_leader set expires_at = now() + make_interval(secs => $3)
                 where holder = $1 and term = $2
                 returning term",
            )
            .bind(&self.instance_id)
            .bind(term)
            .bind(self.lease.as_secs_f64())
            .fetch_optional(&mut *conn)
            .await?;
            return Ok(if renewed.is_some() {
                self.renewed = now;
                self.next_check = now + self.lease / 3;
                Change::Kept
            } else {
                self.term = None;
                self.next_check = now;
                Change::Lost
            });
        }
        let held: Option<(String, f64)> = sqlx::query_as(
            "select holder, extract(epoch from expires_at - now())::float8 from schedule_leader",
        )
        .fetch_optional(&mut *conn)
        .await?;
        if let Some((holder, remaining)) = held {
            if remaining > 0.0 && holder != self.instance_id {
                // Just after it would expire; never later than a lease from
                // now, whatever the row says.
                let wait = Duration::from_secs_f64(remaining).min(self.lease);
                self.next_check = now + wait + Duration::from_millis(5);
                return Ok(Change::Kept);
            }
        }
        let taken: Option<i64> = sqlx::query_scalar(
            "insert into schedule_leader as l (holder, term, expires_at)
             values ($1, 1, now() + make_interval(secs => $2))
             on conflict (id) do update
             set holder = excluded.holder, term = l.term + 1, acquired_at = now(),
                 expires_at = excluded.expires_at
             where l.expires_at <= now() or l.holder = excluded.holder
             returning term",
        )
        .bind(&self.instance_id)
        .bind(self.lease.as_secs_f64())
        .fetch_optional(&mut *conn)
        .await?;
        Ok(match taken {
            Some(term) => {
                self.term = Some(term);
                self.renewed = now;
                self.next_check = now + self.lease / 3;
                Change::Gained(term)
            }
            None => {
                // Another daemon took it first; read its lease next time.
                self.next_check = now;
                Change::Kept
            }
        })
    }

    /// A check could not reach the database. A leader keeps leading until
    /// its lease has passed unrenewed (the fence refuses its fires after
    /// that anyway); then it stops.
    pub fn unreachable(&mut self) -> Change {
        let now = Instant::now();
        self.next_check = now + Duration::from_secs(1).min(self.lease / 3);
        if self.term.is_some() && now.duration_since(self.renewed) >= self.lease {
            self.term = None;
            return Change::Lost;
        }
        Change::Kept
    }

    /// A fire statement found the lease no longer this daemon's.
    pub fn fenced(&mut self) {
        self.term = None;
        self.next_check = Instant::now();
    }

    /// Gives the lease up at shutdown and tells the followers, so one of
    /// them takes over at once rather than when the lease expires.
    pub async fn resign(&mut self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        let Some(term) = self.term.take() else {
            return Ok(());
        };
        sqlx::query(
            "with released as (
                 update schedule_leader set expires_at = now()
                 where holder = $1 and term = $2
                 returning term
             )
             select pg_notify($3, '') from released",
        )
        .bind(&self.instance_id)
        .bind(term)
        .bind(LEADER_CHANNEL)
        .execute(conn)
        .await?;
        Ok(())
    }
}
