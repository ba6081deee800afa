//! Plaintext credential values and their binary form inside the ciphertext.
//!
//! A connection's credentials are the most sensitive data the daemon handles:
//! anyone who sees them can act as the connection's owner against the
//! connected system. This module keeps them in types that wipe their memory
//! when dropped, that print `[redacted]` instead of their value in logs,
//! panics and error chains, and that cannot be serialized by accident (there
//! is no `Serialize` impl, so a credential cannot slip into a JSON response
//! or a log field).
//!
//! The payload encoding defined here is what gets encrypted by
//! [`crate::credentials::keys::Keyring::seal`]. The credential kind is deliberately not
//! part of the encoding: it is stored in the row's `kind` column and bound to
//! the ciphertext through the associated data, so a payload can only be
//! decoded as the kind it was sealed as.

use std::fmt;

use zeroize::Zeroizing;

use crate::vocabulary::CredentialKind;

/// The text shown in place of a secret value wherever it is formatted.
const REDACTED: &str = "[redacted]";

/// The first byte of every encoded payload. It lets a later release change
/// the layout while still reading rows written by this one.
const FORMAT_VERSION: u8 = 1;

/// The width of the big-endian length prefix in front of every field.
const LEN_PREFIX: usize = 4;

/// A plaintext secret that is wiped from memory when dropped and never
/// printed.
///
/// `Debug` and `Display` both print `[redacted]`, so a `Secret` can sit
/// inside structs that derive `Debug` without leaking. The type is not
/// `Clone`: every copy of a secret is one more place it has to be wiped
/// from, so callers borrow it through [`Secret::expose`] instead.
pub struct Secret(Zeroizing<String>);

impl Secret {
    /// Takes ownership of `s` without copying it, so the only heap copy of
    /// the value is the one that will be wiped on drop.
    pub fn new(s: String) -> Secret {
        Secret(Zeroizing::new(s))
    }

    /// Returns the secret value. The name makes every place that reads the
    /// plaintext easy to find in review.
    pub fn expose(&self) -> &str {
        self.0.as_str()
    }

    /// Reports whether the secret is the empty string, so that callers can
    /// validate input without exposing the value.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

/// A decrypted credential payload.
///
/// `Debug` names the variant but redacts every field, including the
/// username, because a username is often half of what an attacker needs.
pub enum Plaintext {
    /// A single opaque value such as an API token.
    StaticSecret(Secret),
    /// A username and password pair.
    UsernamePassword { username: Secret, password: Secret },
}

/// Why an encoded payload could not be decoded. No variant carries any byte
/// of the payload, so these errors are safe to log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// The payload has no bytes at all, not even the version byte.
    #[error("credential payload is empty")]
    Empty,
    /// The payload was written in a layout this build cannot read.
    #[error("credential payload has format version {0}, expected {FORMAT_VERSION}")]
    UnsupportedVersion(u8),
    /// A length prefix or the field it announces runs past the end.
    #[error("credential payload is truncated in field {field:?}")]
    Truncated { field: &'static str },
    /// Bytes follow the last field the kind defines.
    #[error("credential payload has {0} unexpected trailing bytes")]
    TrailingBytes(usize),
    /// A field is not valid UTF-8.
    #[error("credential payload field {field:?} is not valid UTF-8")]
    InvalidUtf8 { field: &'static str },
}

impl Plaintext {
    /// The value stored in the row's `kind` column for this payload.
    pub fn kind(&self) -> CredentialKind {
        match self {
            Plaintext::StaticSecret(_) => CredentialKind::StaticSecret,
            Plaintext::UsernamePassword { .. } => CredentialKind::UsernamePassword,
        }
    }

    /// Encodes the payload for encryption.
    ///
    /// The layout is one format version byte (currently 1) followed by each
    /// field of the kind as a `u32` big-endian byte length and the field's
    /// UTF-8 bytes: `secret` for `static_secret`, then `username` and
    /// `password` for `username_password`.
    ///
    /// The buffer is allocated at its final size up front, so it never
    /// reallocates and leaves no unwiped copy of the plaintext behind, and it
    /// is returned as `Zeroizing` so the caller's copy is wiped too.
    ///
    /// # Panics
    ///
    /// Panics if a field is 4 GiB or longer, which no credential can be
    /// because request bodies are far smaller than that.
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        let (fields, count) = match self {
            Plaintext::StaticSecret(secret) => ([secret.expose(), ""], 1),
            Plaintext::UsernamePassword { username, password } => {
                ([username.expose(), password.expose()], 2)
            }
        };
        let fields = &fields[..count];
        let total = 1 + fields.iter().map(|f| LEN_PREFIX + f.len()).sum::<usize>();
        let mut out = Zeroizing::new(Vec::with_capacity(total));
        out.push(FORMAT_VERSION);
        for field in fields {
            let len = u32::try_from(field.len())
                .expect("a credential field is shorter than 4 GiB, as documented under # Panics");
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(field.as_bytes());
        }
        debug_assert_eq!(out.len(), total);
        out
    }

    /// Decodes a payload produced by [`Plaintext::encode`]; `kind` is the
    /// row's `kind` column.
    ///
    /// Every malformed input yields an error rather than a panic, and a
    /// length prefix is checked against the bytes that remain before
    /// anything is allocated, so a corrupt prefix cannot cause a huge
    /// allocation.
    pub fn decode(kind: CredentialKind, bytes: &[u8]) -> Result<Plaintext, PayloadError> {
        let field_names: &[&'static str] = match kind {
            CredentialKind::StaticSecret => &["secret"],
            CredentialKind::UsernamePassword => &["username", "password"],
        };
        let (&version, mut rest) = bytes.split_first().ok_or(PayloadError::Empty)?;
        if version != FORMAT_VERSION {
            return Err(PayloadError::UnsupportedVersion(version));
        }

        // Every field is parsed and validated as UTF-8 in place before any
        // of them is copied, so a malformed payload never puts plaintext in
        // a new allocation.
        let mut texts: [&str; 2] = ["", ""];
        for (slot, &field) in texts.iter_mut().zip(field_names) {
            let (text, tail) = take_field(rest, field)?;
            *slot = text;
            rest = tail;
        }
        if !rest.is_empty() {
            return Err(PayloadError::TrailingBytes(rest.len()));
        }

        // The kind was matched above, so one field means a static secret and
        // two mean a username and password.
        Ok(match field_names.len() {
            1 => Plaintext::StaticSecret(copy_secret(texts[0])),
            _ => Plaintext::UsernamePassword {
                username: copy_secret(texts[0]),
                password: copy_secret(texts[1]),
            },
        })
    }
}

/// Splits one length-prefixed UTF-8 field off the front of `bytes`,
/// borrowing rather than copying it.
fn take_field<'a>(
    bytes: &'a [u8],
    field: &'static str,
) -> Result<(&'a str, &'a [u8]), PayloadError> {
    let truncated = PayloadError::Truncated { field };
    let (prefix, rest) = bytes
        .split_first_chunk::<LEN_PREFIX>()
        .ok_or_else(|| truncated.clone())?;
    // A length that does not fit in usize cannot fit in the remaining bytes
    // either, so it is reported as truncation.
    let len = usize::try_from(u32::from_be_bytes(*prefix)).map_err(|_| truncated.clone())?;
    if len > rest.len() {
        return Err(truncated);
    }
    let (value, rest) = rest.split_at(len);
    let text = std::str::from_utf8(value).map_err(|_| PayloadError::InvalidUtf8 { field })?;
    Ok((text, rest))
}

/// Copies validated plaintext into a `Secret`. The new `String` is allocated
/// at exactly the right size and moved straight into the zeroizing wrapper,
/// so this copy is the only one and it will be wiped.
fn copy_secret(text: &str) -> Secret {
    let mut owned = String::with_capacity(text.len());
    owned.push_str(text);
    Secret::new(owned)
}

impl fmt::Debug for Plaintext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Written by hand rather than derived so that a field added later
        // cannot start printing its value without someone deciding it should.
        match self {
            Plaintext::StaticSecret(_) => f.debug_tuple("StaticSecret").field(&Redacted).finish(),
            Plaintext::UsernamePassword { .. } => f
                .debug_struct("UsernamePassword")
                .field("username", &Redacted)
                .field("password", &Redacted)
                .finish(),
        }
    }
}

/// A stand-in value whose `Debug` output is `[redacted]`.
struct Redacted;

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALUE: &str = "hunter2-very-secret";

    fn static_secret() -> Plaintext {
        Plaintext::StaticSecret(Secret::new(VALUE.to_owned()))
    }

    fn username_password() -> Plaintext {
        Plaintext::UsernamePassword {
            username: Secret::new("alice@example.com".to_owned()),
            password: Secret::new(VALUE.to_owned()),
        }
    }

    /// A small deterministic generator, so a failing fuzz case reproduces
    /// without depending on a random-number crate.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn bytes(&mut self, len: usize) -> Vec<u8> {
            (0..len).map(|_| self.next() as u8).collect()
        }
    }

    #[test]
    fn static_secret_round_trips() {
        let plain = static_secret();
        assert_eq!(plain.kind(), CredentialKind::StaticSecret);
        let encoded = plain.encode();
        match Plaintext::decode(CredentialKind::StaticSecret, &encoded).unwrap() {
            Plaintext::StaticSecret(s) => assert_eq!(s.expose(), VALUE),
            other => panic!("wrong variant: {other:?}"),
        }
    }

    #[test]
    fn username_password_round_trips() {
        let plain = username_password();
        assert_eq!(plain.kind(), CredentialKind::UsernamePassword);
        let encoded = plain.encode();
        match Plaintext::decode(CredentialKind::UsernamePassword, &encoded).unwrap() {
            Plaintext::UsernamePassword { username, password } => {
                assert_eq!(username.expose(), "alice@example.com");
                assert_eq!(password.expose(), VALUE);
            }
            other => panic!("wrong variant: {other:?}"),
        }
    }

    #[test]
    fn empty_and_non_ascii_values_round_trip() {
        let plain = Plaintext::UsernamePassword {
            username: Secret::new(String::new()),
            password: Secret::new("pässwörd \u{1F511}".to_owned()),
        };
        match Plaintext::decode(plain.kind(), &plain.encode()).unwrap() {
            Plaintext::UsernamePassword { username, password } => {
                assert!(username.is_empty());
                assert_eq!(password.expose(), "pässwörd \u{1F511}");
            }
            other => panic!("wrong variant: {other:?}"),
        }
    }

    #[test]
    fn encoding_layout_is_stable() {
        // Rows already written depend on this exact layout.
        let plain = Plaintext::UsernamePassword {
            username: Secret::new("ab".to_owned()),
            password: Secret::new("c".to_owned()),
        };
        assert_eq!(
            &plain.encode()[..],
            &[1, 0, 0, 0, 2, b'a', b'b', 0, 0, 0, 1, b'c'][..]
        );
        let plain = Plaintext::StaticSecret(Secret::new("xyz".to_owned()));
        assert_eq!(&plain.encode()[..], &[1, 0, 0, 0, 3, b'x', b'y', b'z'][..]);
    }

    #[test]
    fn secret_formatting_is_redacted() {
        let s = Secret::new(VALUE.to_owned());
        for shown in [format!("{s:?}"), format!("{s}"), format!("{s:#?}")] {
            assert!(shown.contains("[redacted]"), "{shown}");
            assert!(!shown.contains(VALUE), "{shown}");
        }
        assert!(!s.is_empty());
        assert!(Secret::new(String::new()).is_empty());
    }

    #[test]
    fn plaintext_debug_is_redacted() {
        for plain in [static_secret(), username_password()] {
            for shown in [format!("{plain:?}"), format!("{plain:#?}")] {
                assert!(shown.contains("[redacted]"), "{shown}");
                assert!(!shown.contains(VALUE), "{shown}");
                assert!(!shown.contains("alice"), "{shown}");
            }
        }
    }

    #[test]
    fn every_truncation_is_rejected() {
        for plain in [static_secret(), username_password()] {
            let encoded = plain.encode();
            for cut in 0..encoded.len() {
                assert!(
                    Plaintext::decode(plain.kind(), &encoded[..cut]).is_err(),
                    "{} truncated to {cut} bytes decoded",
                    plain.kind()
                );
            }
        }
    }

    #[test]
    fn structural_errors_are_specific() {
        let encoded = static_secret().encode();
        assert_eq!(
            Plaintext::decode(CredentialKind::StaticSecret, &[]).unwrap_err(),
            PayloadError::Empty
        );
        assert!("ssh_key".parse::<CredentialKind>().is_err());
        let mut wrong_version = encoded.to_vec();
        wrong_version[0] = 2;
        assert_eq!(
            Plaintext::decode(CredentialKind::StaticSecret, &wrong_version).unwrap_err(),
            PayloadError::UnsupportedVersion(2)
        );
        let mut trailing = encoded.to_vec();
        trailing.push(0);
        assert_eq!(
            Plaintext::decode(CredentialKind::StaticSecret, &trailing).unwrap_err(),
            PayloadError::TrailingBytes(1)
        );
        // A static secret's bytes are not a complete username/password pair.
        assert_eq!(
            Plaintext::decode(CredentialKind::UsernamePassword, &encoded).unwrap_err(),
            PayloadError::Truncated { field: "password" }
        );
        // A length prefix claiming 4 GiB must be rejected, not allocated.
        assert_eq!(
            Plaintext::decode(
                CredentialKind::StaticSecret,
                &[1, 0xff, 0xff, 0xff, 0xff, b'a']
            )
            .unwrap_err(),
            PayloadError::Truncated { field: "secret" }
        );
    }

    #[test]
    fn invalid_utf8_is_rejected() {
        let bytes = [1, 0, 0, 0, 2, 0xc3, 0x28];
        assert_eq!(
            Plaintext::decode(CredentialKind::StaticSecret, &bytes).unwrap_err(),
            PayloadError::InvalidUtf8 { field: "secret" }
        );
        let bytes = [1, 0, 0, 0, 1, b'u', 0, 0, 0, 1, 0xff];
        assert_eq!(
            Plaintext::decode(CredentialKind::UsernamePassword, &bytes).unwrap_err(),
            PayloadError::InvalidUtf8 { field: "password" }
        );
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for round in 0..20_000 {
            let bytes = if round % 2 == 0 {
                let len = (rng.next() % 48) as usize;
                rng.bytes(len)
            } else {
                // Half the inputs are shaped like real payloads: a version
                // byte and up to three fields whose length prefixes are
                // small and sometimes off by one, so the fuzzing reaches the
                // field parser and the UTF-8 check, and often succeeds.
                let mut bytes = vec![FORMAT_VERSION];
                for _ in 0..rng.next() % 4 {
                    let len = (rng.next() % 6) as usize;
                    let claimed = match rng.next() % 8 {
                        0 => len + 1,
                        1 => len.saturating_sub(1),
                        _ => len,
                    };
                    bytes.extend_from_slice(&(claimed as u32).to_be_bytes());
                    if rng.next() % 4 == 0 {
                        bytes.extend(rng.bytes(len));
                    } else {
                        bytes.extend(rng.bytes(len).iter().map(|b| b'a' + b % 26));
                    }
                }
                bytes
            };
            for &kind in CredentialKind::ALL {
                // Success is fine; the only requirement is no panic, and a
                // success must re-encode to exactly the same bytes.
                if let Ok(plain) = Plaintext::decode(kind, &bytes) {
                    assert_eq!(plain.kind(), kind);
                    assert_eq!(&plain.encode()[..], &bytes[..]);
                }
            }
        }
    }

    #[test]
    fn single_byte_mutations_never_panic() {
        for plain in [static_secret(), username_password()] {
            let encoded = plain.encode();
            for i in 0..encoded.len() {
                for bit in 0..8 {
                    let mut mutated = encoded.to_vec();
                    mutated[i] ^= 1 << bit;
                    let _ = Plaintext::decode(plain.kind(), &mutated);
                }
            }
        }
    }
}
