//! Connector state (SPEC §13): the one blob a connection keeps between
//! runs, a browser session or a sync cursor. It is secret material, kept
//! like a credential: sealed under the primary key and bound to its
//! connection, connector and credential, decrypted only here, on the
//! launch path, and never cached. Whatever changes the connection's
//! credentials discards it, in the same transaction (the triggers of the
//! `connection_states` migration), so a session never outlives its login.

use std::fmt;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};
use zeroize::Zeroizing;

use crate::credentials::keys::{Keyring, OpenError, SealError, StateBinding};

/// A state's plaintext: redacted in `Debug`, wiped when dropped.
pub struct StateBytes(Zeroizing<Vec<u8>>);

impl StateBytes {
    pub fn new(bytes: Zeroizing<Vec<u8>>) -> StateBytes {
        StateBytes(bytes)
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for StateBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StateBytes([redacted; {} bytes])", self.0.len())
    }
}

/// A stored state as read for a launch, still sealed.
pub struct StoredState {
    pub key_id: String,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

/// Who is writing or reading a state: the connection as the run's claim
/// saw it.
#[derive(Clone, Copy)]
pub struct Owner<'a> {
    pub connection_id: &'a str,
    pub connector: &'a str,
    /// The credential the run resolved; `None` when it uses none.
    pub credential_id: Option<i64>,
}

impl Owner<'_> {
    fn binding<'k>(&'k self, key_id: &'k str) -> StateBinding<'k> {
        StateBinding {
            connection_id: self.connection_id,
            connector: self.connector,
            credential_id: self.credential_id,
            key_id,
        }
    }
}

/// The connection's state, when it was written under the credential this
/// run resolved: a state left from another credential is never handed on.
pub async fn fetch(pool: &PgPool, owner: Owner<'_>) -> Result<Option<StoredState>, sqlx::Error> {
    let row = sqlx::query(
        "select key_id, nonce, ciphertext from connection_states
         where connection_id = $1 and credential_id is not distinct from $2",
    )
    .bind(owner.connection_id)
    .bind(owner.credential_id)
    .fetch_optional(pool)
    .await?;
    row.map(|row| {
        Ok(StoredState {
            key_id: row.try_get("key_id")?,
            nonce: row.try_get("nonce")?,
            ciphertext: row.try_get("ciphertext")?,
        })
    })
    .transpose()
}

/// Decrypts a fetched state for the run that will receive it.
pub fn open(
    keyring: &Keyring,
    owner: Owner<'_>,
    stored: &StoredState,
) -> Result<StateBytes, OpenError> {
    keyring
        .open_state(
            &owner.binding(&stored.key_id),
            &stored.nonce,
            &stored.ciphertext,
        )
        .map(StateBytes)
}

#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error("encrypting the state failed: {0}")]
    Seal(#[from] SealError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Stores `state` as the connection's state, written by `run_id`, if the
/// run still holds its slot on this daemon and its credential is still
/// active. Returns whether it was stored: a run taken over by another
/// daemon, or whose credential changed while it ran, stores nothing.
pub async fn save(
    pool: &PgPool,
    keyring: &Keyring,
    instance_id: &str,
    run_id: i64,
    owner: Owner<'_>,
    state: &StateBytes,
) -> Result<bool, SaveError> {
    let sealed = keyring.seal_state(&owner.binding(keyring.primary_id()), state.expose())?;
    // The share locks make a concurrent revoke, replace or connector change
    // wait for this statement, and then its trigger discards what was
    // stored; one that committed first leaves nothing for the fence to see.
    let stored = sqlx::query(
        "insert into connection_states (connection_id, run_id, credential_id, key_id, nonce,
                                        ciphertext, size_bytes, updated_at)
         select $1, $2, $3, $4, $5, $6, $7, now()
         where exists (select 1 from run_commands rc
                       where rc.connection_id = $1 and rc.status = 'claimed'
                         and rc.run_id = $2 and rc.claimed_by = $8)
           and exists (select 1 from connections c
                       where c.id = $1 and c.connector = $9 for share)
           and ($3::bigint is null
                or exists (select 1 from credentials cr
                           where cr.id = $3 and cr.connection_id = $1
                             and cr.status = 'active' for share))
         on conflict (connection_id) do update
         set run_id = excluded.run_id, credential_id = excluded.credential_id,
             key_id = excluded.key_id, nonce = excluded.nonce,
             ciphertext = excluded.ciphertext, size_bytes = excluded.size_bytes,
             updated_at = excluded.updated_at",
    )
    .bind(owner.connection_id)
    .bind(run_id)
    .bind(owner.credential_id)
    .bind(&sealed.key_id)
    .bind(&sealed.nonce)
    .bind(&sealed.ciphertext)
    .bind(state.len() as i64)
    .bind(instance_id)
    .bind(owner.connector)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(stored == 1)
}

/// What `state show` prints: never the content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub size_bytes: i64,
    pub updated_at: DateTime<Utc>,
    pub run_id: Option<i64>,
}

/// The connection's state, if it has one.
pub async fn summary(pool: &PgPool, connection_id: &str) -> Result<Option<Summary>, sqlx::Error> {
    let row = sqlx::query(
        "select size_bytes, updated_at, run_id from connection_states where connection_id = $1",
    )
    .bind(connection_id)
    .fetch_optional(pool)
    .await?;
    row.map(|row| {
        Ok(Summary {
            size_bytes: row.try_get("size_bytes")?,
            updated_at: row.try_get("updated_at")?,
            run_id: row.try_get("run_id")?,
        })
    })
    .transpose()
}

/// Discards the connection's state; returns whether there was one.
pub async fn clear(pool: &PgPool, connection_id: &str) -> Result<bool, sqlx::Error> {
    let deleted = sqlx::query("delete from connection_states where connection_id = $1")
        .bind(connection_id)
        .execute(pool)
        .await?
        .rows_affected();
    Ok(deleted > 0)
}

/// What re-encrypting the states did.
#[derive(Debug, Default)]
pub struct Rotation {
    pub rotated: u64,
    /// Connections whose state could not be decrypted, with the reason.
    pub failed: Vec<(String, String)>,
}

/// Re-encrypts every state not under the primary key. A state that does
/// not decrypt is reported and left alone; each row is rewritten only if
/// it is unchanged since it was read.
pub async fn rotate(pool: &PgPool, keyring: &Keyring) -> Result<Rotation, SaveError> {
    let rows = sqlx::query(
        "select st.connection_id, c.connector, st.credential_id, st.key_id, st.nonce,
                st.ciphertext
         from connection_states st join connections c on c.id = st.connection_id
         where st.key_id <> $1 order by st.connection_id",
    )
    .bind(keyring.primary_id())
    .fetch_all(pool)
    .await?;
    let mut rotation = Rotation::default();
    for row in rows {
        let connection_id: String = row.try_get("connection_id")?;
        let connector: String = row.try_get("connector")?;
        let key_id: String = row.try_get("key_id")?;
        let nonce: Vec<u8> = row.try_get("nonce")?;
        let ciphertext: Vec<u8> = row.try_get("ciphertext")?;
        let owner = Owner {
            connection_id: &connection_id,
            connector: &connector,
            credential_id: row.try_get("credential_id")?,
        };
        let sealed = match keyring.reseal_state(&owner.binding(&key_id), &nonce, &ciphertext) {
            Ok(sealed) => sealed,
            Err(e) => {
                rotation.failed.push((connection_id.clone(), e.to_string()));
                continue;
            }
        };
        rotation.rotated += sqlx::query(
            "update connection_states set key_id = $2, nonce = $3, ciphertext = $4
             where connection_id = $1 and key_id = $5 and nonce = $6",
        )
        .bind(&connection_id)
        .bind(&sealed.key_id)
        .bind(&sealed.nonce)
        .bind(&sealed.ciphertext)
        .bind(&key_id)
        .bind(&nonce)
        .execute(pool)
        .await?
        .rows_affected();
    }
    Ok(rotation)
}
