//! The typed failures of SPEC §3, stored as text in `runs.failure_kind`.
//!
//! The variants drive behaviour: whether a child was spawned, whether the
//! retry policy applies, and whether the owner is asked to reconnect.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    CredentialMissing,
    CredentialRevoked,
    CredentialDeleted,
    CredentialUnrecoverable,
    CredentialKindMismatch,
    ConnectorUnknown,
    ConnectionDisabled,
    /// The command names a connection that does not exist (deleted while
    /// the command was queued, or a typo in a hand-written insert).
    ConnectionMissing,
    Overlap,
    SpawnFailed,
    ExitNonzero,
    Signaled,
    TimedOut,
    InteractionRequired,
    /// The connector asked for a one-time code, none came in time, and the
    /// run then failed.
    InteractionExpired,
    Interrupted,
    Lost,
    /// The sandbox of SPEC §12 cannot be set up on this machine.
    SandboxUnavailable,
    /// An operator cancelled the run (`runs cancel`).
    Cancelled,
    /// A schedule's ticks fell in a downtime longer than the catch-up
    /// window; recorded once per schedule and downtime, as `skipped`.
    Missed,
}

impl FailureKind {
    pub const ALL: [FailureKind; 20] = [
        FailureKind::CredentialMissing,
        FailureKind::CredentialRevoked,
        FailureKind::CredentialDeleted,
        FailureKind::CredentialUnrecoverable,
        FailureKind::CredentialKindMismatch,
        FailureKind::ConnectorUnknown,
        FailureKind::ConnectionDisabled,
        FailureKind::ConnectionMissing,
        FailureKind::Overlap,
        FailureKind::SpawnFailed,
        FailureKind::ExitNonzero,
        FailureKind::Signaled,
        FailureKind::TimedOut,
        FailureKind::InteractionRequired,
        FailureKind::InteractionExpired,
        FailureKind::Interrupted,
        FailureKind::Lost,
        FailureKind::SandboxUnavailable,
        FailureKind::Cancelled,
        FailureKind::Missed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::CredentialMissing => "credential_missing",
            FailureKind::CredentialRevoked => "credential_revoked",
            FailureKind::CredentialDeleted => "credential_deleted",
            FailureKind::CredentialUnrecoverable => "credential_unrecoverable",
            FailureKind::CredentialKindMismatch => "credential_kind_mismatch",
            FailureKind::ConnectorUnknown => "connector_unknown",
            FailureKind::ConnectionDisabled => "connection_disabled",
            FailureKind::ConnectionMissing => "connection_missing",
            FailureKind::Overlap => "overlap",
            FailureKind::SpawnFailed => "spawn_failed",
            FailureKind::ExitNonzero => "exit_nonzero",
            FailureKind::Signaled => "signaled",
            FailureKind::TimedOut => "timed_out",
            FailureKind::InteractionRequired => "interaction_required",
            FailureKind::InteractionExpired => "interaction_expired",
            FailureKind::Interrupted => "interrupted",
            FailureKind::Lost => "lost",
            FailureKind::SandboxUnavailable => "sandbox_unavailable",
            FailureKind::Cancelled => "cancelled",
            FailureKind::Missed => "missed",
        }
    }

    /// Whether the connector's retry policy applies. `interrupted` is not
    /// here: its command is re-queued as it was, without using an attempt.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            FailureKind::SpawnFailed
                | FailureKind::ExitNonzero
                | FailureKind::Signaled
                | FailureKind::TimedOut
                | FailureKind::Lost
        )
    }

    /// Whether the owner must reconnect: these open a
    /// `credentials_required` interaction.
    pub fn needs_owner(self) -> bool {
        matches!(
            self,
            FailureKind::CredentialMissing
                | FailureKind::CredentialRevoked
                | FailureKind::CredentialDeleted
                | FailureKind::InteractionRequired
        )
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_snake_case() {
        let mut names: Vec<_> = FailureKind::ALL.iter().map(|k| k.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), FailureKind::ALL.len());
        assert!(names
            .iter()
            .all(|n| n.chars().all(|c| c.is_ascii_lowercase() || c == '_')));
    }
}
