//! The one shared credential resolver (SPEC §1, R1–R3).
//!
//! Architecture invariant: this is the only code that decrypts a stored
//! credential, and `launch()` calls it for every trigger, scheduled, retry
//! and manual alike. Its input is the connection's latest credential row,
//! fresh at the moment of launch: the active one as read by the claim of
//! the very command being launched (in the statement that takes the run
//! slot), or, for a connection with none active, the newest row read just
//! before resolving. It keeps no plaintext between runs. It never falls
//! back to the daemon's own environment, except in the one case a connector
//! explicitly allows: `allow_env_fallback = true` and the connection has no
//! credential rows at all.

use std::ffi::OsString;

use crate::config::{ConnectorConfig, CredentialSpec};
use crate::credentials::keys::{Binding, Keyring};
use crate::credentials::secret::{Plaintext, Secret};
use crate::run::failure::FailureKind;
pub use crate::vocabulary::CredentialSource;
use crate::vocabulary::{CredentialKind, CredentialStatus};

/// Variables to inject last into the child's environment.
pub struct Resolved {
    pub vars: Vec<(String, Secret)>,
    pub source: CredentialSource,
    pub credential_id: Option<i64>,
}

/// Why a launch is refused. `detail` never holds a secret.
#[derive(Debug)]
pub struct Refusal {
    pub kind: FailureKind,
    pub detail: String,
    pub credential_id: Option<i64>,
}

/// A connection's latest credential row: the active one if there is one,
/// else the newest, whose status says whether it was revoked or deleted.
/// Ciphertext only; nothing here is plaintext.
pub struct StoredCredential {
    pub id: i64,
    pub kind: CredentialKind,
    pub status: CredentialStatus,
    pub key_id: String,
    pub nonce: Vec<u8>,
    /// `None` when the stored ciphertext is longer than any credential
    /// can be (`store::MAX_CIPHERTEXT_BYTES`): the claim does not read it.
    pub ciphertext: Option<Vec<u8>>,
    pub ciphertext_len: i32,
    /// The connector the credential was stored for; `None` for a row
    /// stored before credentials were bound to their connector.
    pub sealed_for: Option<String>,
}

/// Resolves `connection_id`'s credential for `connector` from its latest
/// stored row (`None`: the connection has no credential rows).
///
/// `keyring` is `None` when the daemon has no readable key directory;
/// stored credentials are then unrecoverable. `host` reads the daemon's
/// environment, consulted only for the explicit fallback.
pub fn resolve(
    stored: Option<&StoredCredential>,
    keyring: Option<&Keyring>,
    connector_name: &str,
    connector: &ConnectorConfig,
    connection_id: &str,
    host: impl Fn(&str) -> Option<OsString>,
) -> Result<Resolved, Refusal> {
    let Some(declared) = &connector.credential else {
        return Ok(Resolved {
            vars: Vec::new(),
            source: CredentialSource::None,
            credential_id: None,
        });
    };
    let Some(row) = stored else {
        return fallback(connector_name, connector, declared, connection_id, host);
    };
    let refuse = |kind, detail: String| {
        Err(Refusal {
            kind,
            detail,
            credential_id: Some(row.id),
        })
    };
    match row.status {
        CredentialStatus::Active => {}
        CredentialStatus::Revoked => {
            return refuse(
                FailureKind::CredentialRevoked,
                format!(
                    "credential {} of connection {connection_id} is revoked",
                    row.id
                ),
            )
        }
        CredentialStatus::Deleted => {
            return refuse(
                FailureKind::CredentialDeleted,
                format!(
                    "credential {} of connection {connection_id} is deleted",
                    row.id
                ),
            )
        }
    }
    let Some(mapping) = connector.mapping_for(row.kind) else {
        return refuse(
            FailureKind::CredentialKindMismatch,
            format!(
                "credential {} is of kind {:?}, which connector {connector_name} does not accept (it accepts {})",
                row.id,
                row.kind,
                accepted_kinds(connector)
            ),
        );
    };
    let Some(keyring) = keyring else {
        return refuse(
            FailureKind::CredentialUnrecoverable,
            format!(
                "credential {} needs key {:?}, but no key directory is loaded",
                row.id, row.key_id
            ),
        );
    };
    // What decides is the associated data, built from the connector the
    // connection names now; `sealed_for` only says why it would not open.
    match row.sealed_for.as_deref() {
        Some(sealed_for) if sealed_for == connector_name => {}
        Some(sealed_for) => {
            return refuse(
                FailureKind::CredentialUnrecoverable,
                format!(
                    "credential {} of connection {connection_id} was stored for connector {sealed_for}, but the connection now names {connector_name}; a credential is never handed to another connector: store one for {connector_name} with `connectord credentials set`",
                    row.id
                ),
            )
        }
        None => {
            return refuse(
                FailureKind::CredentialUnrecoverable,
                format!(
                    "credential {} was stored before credentials were bound to their connector and is not re-encrypted yet; the daemon does that at start with its keys, as does `connectord credentials rotate`",
                    row.id
                ),
            )
        }
    }
    let Some(ciphertext) = &row.ciphertext else {
        return refuse(
            FailureKind::CredentialUnrecoverable,
            format!(
                "credential {} has a ciphertext of {} bytes, longer than any credential can be; it was not read",
                row.id, row.ciphertext_len
            ),
        );
    };
    let binding = Binding {
        connection_id,
        credential_id: row.id,
        kind: row.kind.as_str(),
        key_id: &row.key_id,
        connector: Some(connector_name),
    };
    let bytes = match keyring.open(&binding, &row.nonce, ciphertext) {
        Ok(bytes) => bytes,
        Err(e) => {
            return refuse(
                FailureKind::CredentialUnrecoverable,
                format!("credential {} (key {:?}): {e}", row.id, row.key_id),
            )
        }
    };
    let plaintext = match Plaintext::decode(row.kind, &bytes) {
        Ok(plaintext) => plaintext,
        Err(e) => {
            return refuse(
                FailureKind::CredentialUnrecoverable,
                format!(
                    "credential {} decrypted to an unreadable payload: {e}",
                    row.id
                ),
            )
        }
    };
    let vars = match (mapping, plaintext) {
        (CredentialSpec::StaticSecret { env }, Plaintext::StaticSecret(secret)) => {
            vec![(env.clone(), secret)]
        }
        (
            CredentialSpec::UsernamePassword {
                username_env,
                password_env,
            },
            Plaintext::UsernamePassword { username, password },
        ) => vec![
            (username_env.clone(), username),
            (password_env.clone(), password),
        ],
        // decode() is told the row's kind and the mapping was chosen by the
        // same kind, so the two always agree; report rather than panic.
        _ => {
            return refuse(
                FailureKind::CredentialUnrecoverable,
                format!("credential {} payload does not match its kind", row.id),
            )
        }
    };
    Ok(Resolved {
        vars,
        source: CredentialSource::Store,
        credential_id: Some(row.id),
    })
}

/// The connection has no credential rows: refuse, or pass the host's values
/// through when the connector explicitly allows it.
fn fallback(
    connector_name: &str,
    connector: &ConnectorConfig,
    declared: &CredentialSpec,
    connection_id: &str,
    host: impl Fn(&str) -> Option<OsString>,
) -> Result<Resolved, Refusal> {
    let missing = || {
        Refusal {
        kind: FailureKind::CredentialMissing,
        detail: format!(
            "connection {connection_id} has no stored credential and connector {connector_name} needs a {} credential",
            declared.kind()
        ),
        credential_id: None,
    }
    };
    if !connector.allow_env_fallback {
        return Err(missing());
    }
    let mut vars = Vec::new();
    for name in declared.variables() {
        match host(name).and_then(|v| v.into_string().ok()) {
            Some(value) if !value.is_empty() => vars.push((name.to_owned(), Secret::new(value))),
            _ => return Err(missing()),
        }
    }
    tracing::warn!(
        connection = connection_id,
        connector = connector_name,
        "connection has no stored credential; passing the daemon's own credential variables through (allow_env_fallback)"
    );
    Ok(Resolved {
        vars,
        source: CredentialSource::ProcessEnv,
        credential_id: None,
    })
}

fn accepted_kinds(connector: &ConnectorConfig) -> String {
    let kinds: Vec<&str> = connector
        .credential
        .iter()
        .chain(&connector.accepts)
        .map(|spec| spec.kind().as_str())
        .collect();
    kinds.join(", ")
}
