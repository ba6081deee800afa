//! The words the daemon and its tables share: run status, trigger, overlap
//! policy, credential kind and status. Each is an enum here, spelled as the
//! database spells it in one place, the [`vocabulary!`] declaration, which
//! also makes it a text value for sqlx. The migrations' checks allow
//! exactly these spellings (`tests/vocabulary.rs` compares them), so a
//! value read from a column always parses.

use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArgumentBuffer, PgHasArrayType, PgTypeInfo, PgValueRef};
use sqlx::{Decode, Encode, Postgres, Type};

/// A text that names no value of the enum it was read as.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{value:?} is not a {of}")]
pub struct UnknownValue {
    pub of: &'static str,
    pub value: String,
}

/// Declares an enum whose variants are the given texts: `as_str`,
/// `FromStr`, `Display`, `ALL`, and sqlx's text encoding and decoding.
macro_rules! vocabulary {
    ($(#[$meta:meta])* pub enum $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// Every value's text, in the same order.
            pub const TEXTS: &'static [&'static str] = &[$($text,)+];

            /// The value as the database spells it.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl std::str::FromStr for $name {
            type Err = UnknownValue;

            fn from_str(text: &str) -> Result<Self, UnknownValue> {
                match text {
                    $($text => Ok($name::$variant),)+
                    _ => Err(UnknownValue {
                        of: stringify!($name),
                        value: text.to_owned(),
                    }),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Type<Postgres> for $name {
            fn type_info() -> PgTypeInfo {
                <&str as Type<Postgres>>::type_info()
            }

            fn compatible(ty: &PgTypeInfo) -> bool {
                <&str as Type<Postgres>>::compatible(ty)
            }
        }

        impl PgHasArrayType for $name {
            fn array_type_info() -> PgTypeInfo {
                <&str as PgHasArrayType>::array_type_info()
            }
        }

        impl Encode<'_, Postgres> for $name {
            fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
                <&str as Encode<Postgres>>::encode(self.as_str(), buf)
            }
        }

        impl<'r> Decode<'r, Postgres> for $name {
            fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
                Ok(<&str as Decode<Postgres>>::decode(value)?.parse()?)
            }
        }
    };
}

vocabulary! {
    /// `runs.status`.
    pub enum RunStatus {
        Running = "running",
        Succeeded = "succeeded",
        Failed = "failed",
        Refused = "refused",
        Skipped = "skipped",
    }
}

vocabulary! {
    /// What made a command: `run_commands.trigger` and `runs.trigger`.
    pub enum Trigger {
        Scheduled = "scheduled",
        Retry = "retry",
        Manual = "manual",
    }
}

vocabulary! {
    /// `schedules.overlap`: what a tick does while its connection has a
    /// run going.
    pub enum Overlap {
        /// Recorded `skipped` (`overlap`).
        Skip = "skip",
        /// Waits for the run to end.
        Queue = "queue",
    }
}

vocabulary! {
    /// `credentials.kind`: the shape of a stored secret.
    pub enum CredentialKind {
        StaticSecret = "static_secret",
        UsernamePassword = "username_password",
    }
}

vocabulary! {
    /// `credentials.status`.
    pub enum CredentialStatus {
        Active = "active",
        Revoked = "revoked",
        Deleted = "deleted",
    }
}

vocabulary! {
    /// Where a run's injected variables came from: `runs.credential_source`.
    pub enum CredentialSource {
        Store = "store",
        ProcessEnv = "process_env",
        None = "none",
    }
}

/// Every enum's table, column and texts, for the test that holds them to
/// the migrations' checks.
pub const COLUMNS: &[(&str, &str, &[&str])] = &[
    ("runs", "status", RunStatus::TEXTS),
    ("runs", "trigger", Trigger::TEXTS),
    ("run_commands", "trigger", Trigger::TEXTS),
    ("schedules", "overlap", Overlap::TEXTS),
    ("credentials", "kind", CredentialKind::TEXTS),
    ("credentials", "status", CredentialStatus::TEXTS),
    ("runs", "credential_source", CredentialSource::TEXTS),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn reads_back<T>(all: &[T], texts: &[&str])
    where
        T: Copy + PartialEq + std::fmt::Debug + std::fmt::Display + std::str::FromStr,
        T::Err: std::fmt::Debug,
    {
        assert_eq!(all.len(), texts.len());
        for (value, text) in all.iter().zip(texts) {
            assert_eq!(value.to_string(), *text);
            assert_eq!(text.parse::<T>().expect("parses"), *value);
        }
    }

    #[test]
    fn every_value_reads_back() {
        reads_back(RunStatus::ALL, RunStatus::TEXTS);
        reads_back(Trigger::ALL, Trigger::TEXTS);
        reads_back(Overlap::ALL, Overlap::TEXTS);
        reads_back(CredentialKind::ALL, CredentialKind::TEXTS);
        reads_back(CredentialStatus::ALL, CredentialStatus::TEXTS);
        reads_back(CredentialSource::ALL, CredentialSource::TEXTS);
        assert_eq!(
            "Running".parse::<RunStatus>(),
            Err(UnknownValue {
                of: "RunStatus",
                value: "Running".into()
            })
        );
    }
}
