//! Writing credentials: set (supersedes the active one), revoke, delete and
//! rotate. Reading them for a launch is the resolver's job alone.

use sqlx::PgPool;

use crate::credentials::keys::{Binding, Keyring};
use crate::credentials::secret::Plaintext;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("connection {0:?} does not exist")]
    NoConnection(String),
    #[error("connection {0:?} has no active credential")]
    NoActive(String),
    #[error("connection {0:?} has no credential to delete")]
    NothingToDelete(String),
    /// A value no child's environment could carry: refused before it is
    /// stored, rather than failing every launch after.
    #[error("the credential's {field} {problem}; nothing was stored")]
    Unusable {
        field: &'static str,
        problem: &'static str,
    },
    #[error("encrypting the credential failed: {0}")]
    Seal(#[from] crate::credentials::keys::SealError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// The longest value a credential field may hold. Environment variables
/// carry it to the child, and Linux refuses any one of them over 128 KiB
/// (`MAX_ARG_STRLEN`); 64 KiB leaves room for the name and every other
/// variable, and is far more than any token or password.
pub const MAX_SECRET_BYTES: usize = 64 * 1024;

/// The longest ciphertext a stored credential can have: both fields at
/// their longest, the payload's encoding and the tag, with room to spare.
/// Anything longer did not come from `set`, and the claim does not read it
/// into the daemon's memory.
pub const MAX_CIPHERTEXT_BYTES: i32 = 2 * MAX_SECRET_BYTES as i32 + 4096;

/// Refuses a field that could never reach a child.
fn check_field(field: &'static str, value: &str) -> Result<(), StoreError> {
    let problem = if value.contains('\0') {
        "contains a NUL byte, which no environment variable can carry"
    } else if value.len() > MAX_SECRET_BYTES {
        "is longer than 64 KiB"
    } else {
        return Ok(());
    };
    Err(StoreError::Unusable { field, problem })
}

/// Stores `plaintext` as the connection's active credential, encrypted
/// under the primary key; the previous active credential is revoked and an
/// open `credentials_required` interaction is resolved, all in one
/// transaction. Returns the new credential id.
pub async fn set(
    pool: &PgPool,
    keyring: &Keyring,
    connection_id: &str,
    plaintext: &Plaintext,
) -> Result<i64, StoreError> {
    match plaintext {
        Plaintext::StaticSecret(secret) => check_field("secret", secret.expose())?,
        Plaintext::UsernamePassword { username, password } => {
            check_field("username", username.expose())?;
            check_field("password", password.expose())?;
        }
    }
    let mut tx = pool.begin().await?;
    // The connector is bound into the ciphertext: the row lock keeps it
    // from changing until the credential is stored.
    let connector: Option<String> =
        sqlx::query_scalar("select connector from connections where id = $1 for update")
            .bind(connection_id)
            .fetch_optional(&mut *tx)
            .await?;
    let Some(connector) = connector else {
        return Err(StoreError::NoConnection(connection_id.to_owned()));
    };
    // The id is part of the associated data, so it is taken before sealing.
    let id: i64 = sqlx::query_scalar("select nextval(pg_get_serial_sequence('credentials', 'id'))")
        .fetch_one(&mut *tx)
        .await?;
    let kind = plaintext.kind();
    let sealed = keyring.seal(
        &Binding {
            connection_id,
            credential_id: id,
            kind: kind.as_str(),
            key_id: keyring.primary_id(),
            connector: Some(&connector),
        },
        &plaintext.encode(),
    )?;
    sqlx::query(
        "update credentials set status = 'revoked', revoked_at = now()
         where connection_id = $1 and status = 'active'",
    )
    .bind(connection_id)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "insert into credentials (id, connection_id, kind, status, key_id, nonce, ciphertext,
                                  sealed_for)
         values ($1, $2, $3, 'active', $4, $5, $6, $7)",
    )
    .bind(id)
    .bind(connection_id)
    .bind(kind)
    .bind(&sealed.key_id)
    .bind(&sealed.nonce)
    .bind(&sealed.ciphertext)
    .bind(&connector)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "update interactions set status = 'resolved', resolved_at = now()
         where connection_id = $1 and kind = 'credentials_required' and status = 'open'",
    )
    .bind(connection_id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(id)
}

/// Revokes the active credential; the row stays for audit.
pub async fn revoke(pool: &PgPool, connection_id: &str) -> Result<i64, StoreError> {
    sqlx::query_scalar(
        "update credentials set status = 'revoked', revoked_at = now()
         where connection_id = $1 and status = 'active' returning id",
    )
    .bind(connection_id)
    .fetch_optional(pool)
    .await?
    .ok_or_else(|| StoreError::NoActive(connection_id.to_owned()))
}

/// Marks every remaining credential of the connection deleted and destroys
/// its ciphertext (nonce and ciphertext become empty): a deleted secret
/// must not be recoverable by whoever later holds a key and the database.
/// The rows stay for audit. Returns how many rows changed.
pub async fn delete(pool: &PgPool, connection_id: &str) -> Result<u64, StoreError> {
    let changed = sqlx::query(
        "update credentials set status = 'deleted', deleted_at = now(),
                nonce = ''::bytea, ciphertext = ''::bytea
         where connection_id = $1 and status <> 'deleted'",
    )
    .bind(connection_id)
    .execute(pool)
    .await?
    .rows_affected();
    if changed == 0 {
        return Err(StoreError::NothingToDelete(connection_id.to_owned()));
    }
    Ok(changed)
}

/// What `rotate` (or `bind_connectors`) did.
#[derive(Debug, Default)]
pub struct Rotation {
    pub rotated: u64,
    pub already_current: u64,
    /// Credential ids that could not be decrypted, with the reason.
    pub failed: Vec<(i64, String)>,
}

#[derive(sqlx::FromRow)]
struct SealedRow {
    id: i64,
    connection_id: String,
    kind: String,
    key_id: String,
    nonce: Vec<u8>,
    ciphertext: Vec<u8>,
    sealed_for: Option<String>,
    connector: String,
}

/// Which rows a re-encryption rewrites; deleted ones hold nothing.
#[derive(Clone, Copy)]
enum Rewrite {
    /// Rows not under the primary key or not bound to their connector.
    NotCurrent,
    /// Rows stored before credentials were bound to their connector.
    Unbound,
}

/// Re-encrypts every credential not under the primary key, so older keys
/// can be retired, and binds to its connector every row stored before
/// credentials were. Each row is rewritten only if it is unchanged since
/// it was read.
pub async fn rotate(pool: &PgPool, keyring: &Keyring) -> Result<Rotation, StoreError> {
    rewrite(pool, keyring, Rewrite::NotCurrent).await
}

/// Binds to its connector every credential stored before credentials were
/// (they are refused until then), under the primary key. The daemon does
/// this at start, where the keys are.
pub async fn bind_connectors(pool: &PgPool, keyring: &Keyring) -> Result<Rotation, StoreError> {
    rewrite(pool, keyring, Rewrite::Unbound).await
}

async fn rewrite(pool: &PgPool, keyring: &Keyring, which: Rewrite) -> Result<Rotation, StoreError> {
    let primary = keyring.primary_id();
    let filter = match which {
        Rewrite::NotCurrent => "(cr.key_id <> $1 or cr.sealed_for is null)",
        Rewrite::Unbound => "cr.sealed_for is null",
    };
    let mut rotation = Rotation {
        already_current: sqlx::query_scalar::<_, i64>(&format!(
            "select count(*) from credentials cr where cr.status <> 'deleted' and not {filter}"
        ))
        .bind(primary)
        .fetch_one(pool)
        .await? as u64,
        ..Rotation::default()
    };
    let rows: Vec<SealedRow> = sqlx::query_as(&format!(
        "select cr.id, cr.connection_id, cr.kind, cr.key_id, cr.nonce, cr.ciphertext,
                cr.sealed_for, c.connector
         from credentials cr join connections c on c.id = cr.connection_id
         where cr.status <> 'deleted' and {filter} order by cr.id"
    ))
    .bind(primary)
    .fetch_all(pool)
    .await?;
    for row in rows {
        // A row keeps the connector it was sealed for; one sealed before
        // the binding is bound to its connection's connector now.
        let connector = row.sealed_for.as_deref().unwrap_or(&row.connector);
        let old = Binding {
            connection_id: &row.connection_id,
            credential_id: row.id,
            kind: &row.kind,
            key_id: &row.key_id,
            connector: row.sealed_for.as_deref(),
        };
        let sealed = match keyring.reseal(&old, connector, &row.nonce, &row.ciphertext) {
            Ok(sealed) => sealed,
            Err(e) => {
                rotation.failed.push((row.id, e.to_string()));
                continue;
            }
        };
        let updated = sqlx::query(
            "update credentials set key_id = $2, nonce = $3, ciphertext = $4, sealed_for = $7
             where id = $1 and key_id = $5 and nonce = $6",
        )
        .bind(row.id)
        .bind(&sealed.key_id)
        .bind(&sealed.nonce)
        .bind(&sealed.ciphertext)
        .bind(&row.key_id)
        .bind(&row.nonce)
        .bind(connector)
        .execute(pool)
        .await?
        .rows_affected();
        rotation.rotated += updated;
    }
    Ok(rotation)
}
