//! The command queue: every trigger (schedule tick, retry, manual insert)
//! is a `run_commands` row, claimed here with `FOR UPDATE SKIP LOCKED` so
//! that any number of daemons can share one table without double work.
//!
//! One statement does everything a launch needs before its child can be
//! built: it claims the commands, reads each one's connection, takes the
//! connection's run slot for the admissible ones (a run id from the runs
//! sequence, kept on the claimed command, where a partial unique index
//! allows one per connection), and reads the connection's active
//! credential (a connection without one is read again by
//! [`latest_credential`]). It writes nothing but the commands it claims.
//! Launch latency is then one round trip, and every decision is made on
//! data read at the moment of the claim.

pub(crate) mod dispatch;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool, Row};

use crate::credentials::resolver::StoredCredential;
use crate::credentials::store::MAX_CIPHERTEXT_BYTES;
use crate::vocabulary::{Overlap, Trigger};

/// A claimed command, with the overlap policy of its schedule as of the
/// claim.
#[derive(Debug, Clone)]
pub struct Command {
    pub id: i64,
    pub connection_id: String,
    pub trigger: Trigger,
    pub schedule_id: Option<i64>,
    pub scheduled_for: Option<DateTime<Utc>>,
    /// When it became due (`not_before`): where its pickup time starts.
    pub due: DateTime<Utc>,
    pub attempt: i32,
    pub overlap: Option<Overlap>,
    /// The connection's connector as of the claim; `None` when the
    /// connection does not exist.
    pub connector: Option<String>,
}

impl Command {
    /// A scheduled command whose schedule says to skip, not wait, when the
    /// connection already has a run going.
    pub fn skips_on_overlap(&self) -> bool {
        self.trigger == Trigger::Scheduled && self.overlap != Some(Overlap::Queue)
    }
}

/// What the claim found for one command.
pub struct Claimed {
    pub command: Command,
    /// Whether the connection is enabled (`None`: it does not exist).
    pub enabled: Option<bool>,
    /// The run slot taken for it: `None` when the command is not admissible
    /// (no connection, disabled, unknown connector) or the connection
    /// already has a run going.
    pub run_id: Option<i64>,
    /// The connection's active credential, read with the slot; `None` when
    /// it has none active (then see [`latest_credential`]).
    pub credential: Option<StoredCredential>,
    /// Whether the connection had a stored state at the claim (read only
    /// with a slot).
    pub has_state: bool,
}

/// Claims up to `limit` due commands for `instance_id` and takes their run
/// slots.
///
/// The pick is written as filters with subqueries, not joins, so that the
/// plan walks the pending index in order and stops at `limit`, whatever the
/// statistics say. With joins, and statistics from before a backlog arrived
/// (they estimate a handful of pending rows), the plan joined and sorted
/// every pending command on every claim, so each claim cost more the longer
/// the backlog. The joins to connections, schedules and credentials stay
/// probes by key through the claim session's settings (see
/// `db::claim_session`, and the design decisions in docs/PERFORMANCE.md).
///
/// A command waits (is not claimed) while its connection has a run going,
/// unless it is a scheduled tick of an `overlap = 'skip'` schedule, which is
/// claimed so it can be recorded as skipped. Commands of connectors in
/// `full_connectors` (at their concurrency limit here) are left for later
/// or for another daemon. Slots are taken only for enabled connections of
/// `known_connectors`.
///
/// Two daemons claiming commands of one free connection at the same moment
/// both try to take its slot: one statement wins, the other fails with a
/// unique violation (see [`Failure::LostSlotRace`](crate::db::Failure)) and claims nothing.
pub async fn claim(
    session: &mut PgConnection,
    instance_id: &str,
    limit: i64,
    full_connectors: &[String],
    known_connectors: &[String],
) -> Result<Vec<Claimed>, sqlx::Error> {
    let rows = sqlx::query(
        r#"
        with picked as (
            select rc.id, rc.connection_id,
                   exists (select 1 from run_commands o
                           where o.connection_id = rc.connection_id
                             and o.status = 'claimed' and o.run_id is not null) as busy
            from run_commands rc
            where rc.status = 'pending'
              and rc.not_before <= now()
              and (cardinality($3::text[]) = 0
                   or not exists (select 1 from connections c
                                  where c.id = rc.connection_id and c.connector = any($3)))
              and ((rc.trigger = 'scheduled'
                    and coalesce((select s.overlap from schedules s where s.id = rc.schedule_id),
                                 'skip') = 'skip')
                   or not exists (select 1 from run_commands o
                                  where o.connection_id = rc.connection_id
                                    and o.status = 'claimed' and o.run_id is not null))
            order by rc.not_before, rc.id
            limit $2
            for update of rc skip locked
        ), admitted as (
            -- The first admissible command of a free connection takes its
            -- slot; the index on claimed commands with a run id refuses a
            -- second one, within this batch or from another daemon.
            select p.id, c.connector, c.enabled,
                   not p.busy and c.enabled and c.connector = any($4)
                   and row_number() over (partition by p.connection_id order by p.id) = 1
                       as takes_slot
            from picked p
            left join lateral (
                select c.connector, c.enabled from connections c
                where c.id = p.connection_id offset 0
            ) c on true
        ), claimed as (
            -- The picked commands are updated by id through the primary key,
            -- with no join for the planner to order: a plan cached while
            -- the table was nearly empty put such a join the wrong way round
            -- and walked every command once per picked row.
            update run_commands rc
            set status = 'claimed', claimed_by = $1, claimed_at = now(),
                run_id = case when rc.id = any(array(select id from admitted where takes_slot))
                              then nextval('runs_id_seq') end
            where rc.id = any(array(select id from admitted))
            returning rc.id, rc.connection_id, rc.trigger, rc.schedule_id, rc.scheduled_for,
                      rc.not_before, rc.attempt, rc.run_id
        )
        select cl.id, cl.connection_id, cl.trigger, cl.schedule_id, cl.scheduled_for,
               cl.not_before, cl.attempt, s.overlap, a.connector, a.enabled, cl.run_id,
               cred.id as credential_id, cred.kind, cred.status as credential_status,
               cred.key_id, cred.nonce, cred.sealed_for,
               case when octet_length(cred.ciphertext) <= $5 then cred.ciphertext end
                   as ciphertext,
               octet_length(cred.ciphertext) as ciphertext_len,
               st.connection_id is not null as has_state
        from claimed cl
        join admitted a on a.id = cl.id
        -- Each a probe by key through a fenced lateral (`offset 0`): as
        -- joins, a plan made while the tables were small walked every
        -- schedule and credential once per claimed command.
        left join lateral (
            select s.overlap from schedules s where s.id = cl.schedule_id offset 0
        ) s on true
        -- The active credential, through its unique index; a connection
        -- without one is read again by `latest_credential` (refusals only).
        left join lateral (
            select * from credentials cred
            where cred.connection_id = cl.connection_id and cred.status = 'active'
              and cl.run_id is not null
            offset 0
        ) cred on true
        -- Whether the connection keeps a state: read by the launch only
        -- when there is one.
        left join lateral (
            select st.connection_id from connection_states st
            where st.connection_id = cl.connection_id and cl.run_id is not null
            offset 0
        ) st on true
        "#,
    )
    .bind(instance_id)
    .bind(limit)
    .bind(full_connectors)
    .bind(known_connectors)
    .bind(MAX_CIPHERTEXT_BYTES)
    .fetch_all(session)
    .await?;
    let mut claimed: Vec<Claimed> = rows
        .iter()
        .map(claimed_from_row)
        .collect::<Result<_, _>>()?;
    // Launched oldest first; sorted here rather than by one more plan node.
    claimed.sort_unstable_by_key(|c| c.command.id);
    Ok(claimed)
}

/// The connection's latest credential row: the active one if there is one,
/// else the newest, whose status says why it cannot be used. The claim
/// reads only an active credential; a command it found none for is read
/// again here, just before resolving.
pub async fn latest_credential(
    pool: &PgPool,
    connection_id: &str,
) -> Result<Option<StoredCredential>, sqlx::Error> {
    let row = sqlx::query(
        "select id as credential_id, kind, status as credential_status, key_id, nonce,
                sealed_for,
                case when octet_length(ciphertext) <= $2 then ciphertext end as ciphertext,
                octet_length(ciphertext) as ciphertext_len
         from credentials
         where connection_id = $1
         order by (status = 'active') desc, id desc
         limit 1",
    )
    .bind(connection_id)
    .bind(MAX_CIPHERTEXT_BYTES)
    .fetch_optional(pool)
    .await?;
    match row {
        Some(row) => credential_from_row(&row),
        None => Ok(None),
    }
}

fn credential_from_row(row: &PgRow) -> Result<Option<StoredCredential>, sqlx::Error> {
    let Some(id) = row.try_get::<Option<i64>, _>("credential_id")? else {
        return Ok(None);
    };
    Ok(Some(StoredCredential {
        id,
        kind: row.try_get("kind")?,
        status: row.try_get("credential_status")?,
        key_id: row.try_get("key_id")?,
        nonce: row.try_get("nonce")?,
        ciphertext: row.try_get("ciphertext")?,
        ciphertext_len: row.try_get("ciphertext_len")?,
        sealed_for: row.try_get("sealed_for")?,
    }))
}

fn claimed_from_row(row: &PgRow) -> Result<Claimed, sqlx::Error> {
    let credential = credential_from_row(row)?;
    Ok(Claimed {
        command: Command {
            id: row.try_get("id")?,
            connection_id: row.try_get("connection_id")?,
            trigger: row.try_get("trigger")?,
            schedule_id: row.try_get("schedule_id")?,
            scheduled_for: row.try_get("scheduled_for")?,
            due: row.try_get("not_before")?,
            attempt: row.try_get("attempt")?,
            overlap: row.try_get("overlap")?,
            connector: row.try_get("connector")?,
        },
        enabled: row.try_get("enabled")?,
        run_id: row.try_get("run_id")?,
        credential,
        has_state: row.try_get("has_state")?,
    })
}

/// Puts a claimed command back, untouched, with the slot it took, for
/// whoever can run it next.
pub async fn release(pool: &PgPool, command_id: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "update run_commands set status = 'pending', claimed_by = null, claimed_at = null,
                                 run_id = null
         where id = $1 and status = 'claimed'",
    )
    .bind(command_id)
    .execute(pool)
    .await?;
    Ok(())
}

/// Inserts a manual command and returns its id.
pub async fn enqueue_manual(pool: &PgPool, connection_id: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "insert into run_commands (connection_id, trigger) values ($1, 'manual') returning id",
    )
    .bind(connection_id)
    .fetch_one(pool)
    .await
}
