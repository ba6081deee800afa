//! Encryption keys for stored credentials, and sealing and opening with them.
//!
//! Credentials are stored in PostgreSQL encrypted with AES-256-GCM under keys
//! that live only in files on the daemon's host, so a database dump, a
//! replica or a backup on its own reveals no credential. Each key is a file
//! `<key_id>.key` holding 32 raw bytes in a key directory; the file must not
//! be accessible to group or others, because anyone who can read it can
//! decrypt every credential sealed under it.
//!
//! Every row records the id of the key it was sealed with, so keys can be
//! rotated: new rows are sealed with the primary key while older keys stay in
//! the directory to open the rows sealed before the rotation.
//!
//! The ciphertext is bound, through the AEAD's associated data, to the
//! connection id, credential id, credential kind and key id of its row (see
//! [`associated_data`]). Someone with write access to the database but not
//! to the keys therefore cannot copy a ciphertext onto another connection or
//! another credential, relabel its kind, or point it at another key: any of
//! those makes decryption fail instead of handing a credential to the wrong
//! owner.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

/// The length in bytes of an AES-256 key, and so of every key file.
pub const KEY_LEN: usize = 32;

/// The longest key id accepted. Ids are stored in every row and shown in
/// messages, so they are kept short.
const MAX_KEY_ID_LEN: usize = 64;

/// The file name suffix that marks a file in the key directory as a key.
const KEY_SUFFIX: &str = ".key";

/// The version tag at the start of the associated data. Changing the layout
/// of the associated data requires a new tag, because rows sealed under the
/// old layout only open with the old bytes.
const AAD_TAG: &[u8] = b"connectord-cred-v1";

/// Why a key directory or key file could not be loaded or written.
///
/// Every message names the path involved so an operator can fix the problem
/// without reading code. No variant carries key bytes.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key directory is absent.
    #[error("key directory {} does not exist", dir.display())]
    DirMissing { dir: PathBuf },
    /// The key directory exists but cannot be listed.
    #[error("key directory {} cannot be read: {source}", dir.display())]
    DirUnreadable { dir: PathBuf, source: io::Error },
    /// The key directory could not be created by [`generate`].
    #[error("key directory {} cannot be created: {source}", dir.display())]
    DirCreate { dir: PathBuf, source: io::Error },
    /// A key file exists but cannot be opened or read.
    #[error("key file {} cannot be read: {source}", path.display())]
    FileUnreadable { path: PathBuf, source: io::Error },
    /// A `.key` entry is a directory, device, FIFO or socket.
    #[error("key file {} is not a regular file", path.display())]
    NotRegularFile { path: PathBuf },
    /// A key file grants some permission to group or others.
    #[error(
        "key file {} is accessible by group or others (mode {mode:04o}); chmod 600 it",
        path.display()
    )]
    Permissions { path: PathBuf, mode: u32 },
    /// A key file does not hold exactly [`KEY_LEN`] bytes.
    #[error("key file {} is {len} bytes, expected {KEY_LEN}", path.display())]
    WrongLength { path: PathBuf, len: u64 },
    /// ring refused the key bytes.
    #[error("key file {} does not hold a usable AES-256 key", path.display())]
    Unusable { path: PathBuf },
    /// The configured primary key has no file in the directory.
    #[error("primary key {primary:?} not found in {}", dir.display())]
    MissingPrimary { primary: String, dir: PathBuf },
    /// A key id would not be a safe single file name.
    #[error("key id {0:?} is invalid (use 1 to {MAX_KEY_ID_LEN} letters, digits, '-', '_')")]
    InvalidKeyId(String),
    /// [`generate`] found a key file already there; overwriting it would make
    /// every credential sealed under it unreadable.
    #[error("key file {} already exists; refusing to overwrite it", path.display())]
    AlreadyExists { path: PathBuf },
    /// [`generate`] could not write the new key file.
    #[error("key file {} cannot be written: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    /// The operating system's random number generator failed.
    #[error("the system random number generator failed")]
    Random,
}

/// Why [`Keyring::seal`] refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The binding names a key other than the primary. New data is only ever
    /// sealed with the primary key, and the row must record the key actually
    /// used, so a mismatch is a caller bug that is reported rather than
    /// silently corrected.
    #[error(
        "binding names key {key_id:?} but new data is sealed with the primary key {primary:?}"
    )]
    NotPrimary { key_id: String, primary: String },
    /// A binding field is too long to encode as associated data.
    #[error("a binding field is 4 GiB or longer")]
    BindingTooLong,
    /// The operating system's random number generator failed, so no nonce
    /// could be drawn.
    #[error("the system random number generator failed")]
    Random,
    /// ring refused to encrypt, which happens only for inputs far larger
    /// than any credential.
    #[error("encryption failed")]
    Encrypt,
}

/// Why [`Keyring::open`] failed. No variant says which part of the binding
/// was wrong, because AES-GCM cannot tell and guessing would mislead.
/// Why `reseal` failed.
#[derive(Debug, thiserror::Error)]
pub enum ResealError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error(transparent)]
    Seal(#[from] SealError),
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("key {0:?} is not in the key directory")]
    UnknownKey(String),
    #[error("nonce is {0} bytes, expected 12")]
    BadNonce(usize),
    #[error("decryption failed: ciphertext does not authenticate for this row and key")]
    Authentication,
}

/// The result of sealing: the three values stored in the row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// The id of the key that sealed the data.
    pub key_id: String,
    /// The 12-byte nonce drawn for this sealing.
    pub nonce: Vec<u8>,
    /// The encrypted payload followed by the 16-byte authentication tag.
    pub ciphertext: Vec<u8>,
}

/// The row a ciphertext belongs to, bound to it as associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding<'a> {
    pub connection_id: &'a str,
    pub credential_id: i64,
    pub kind: &'a str,
    pub key_id: &'a str,
}

/// The loaded keys, by id, and which of them seals new data.
pub struct Keyring {
    keys: BTreeMap<String, LessSafeKey>,
    primary: String,
    rng: SystemRandom,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Only the ids are shown. ring's key types already omit key bytes,
        // but listing ids rather than keys keeps that true whatever ring
        // does in a later release.
        f.debug_struct("Keyring")
            .field("primary", &self.primary)
            .field("key_ids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Keyring {
    /// Loads every `<key_id>.key` file in `dir` and makes `primary` the key
    /// that seals new data.
    ///
    /// Files whose names are not a valid key id followed by `.key` are
    /// ignored, so the directory may hold notes or the hidden entries of a
    /// Kubernetes secret mount. Symbolic links are followed for the same
    /// reason. Loading fails, rather than skipping the file, when a key file
    /// is accessible to group or others, is not a regular file, or is not
    /// exactly [`KEY_LEN`] bytes: each of those is a deployment mistake that
    /// should be fixed, not worked around. It also fails when the primary key
    /// is missing.
    pub fn load(dir: &Path, primary: &str) -> Result<Keyring, KeyError> {
        validate_key_id(primary)?;
        let entries = fs::read_dir(dir).map_err(|source| dir_error(dir, source))?;
        let mut keys = BTreeMap::new();
        for entry in entries {
            let entry = entry.map_err(|source| dir_error(dir, source))?;
            let file_name = entry.file_name();
            let Some(key_id) = file_name
                .to_str()
                .and_then(|name| name.strip_suffix(KEY_SUFFIX))
                .filter(|id| is_valid_key_id(id))
            else {
                continue;
            };
            let key = load_key_file(&entry.path())?;
            keys.insert(key_id.to_owned(), key);
        }
        if !keys.contains_key(primary) {
            return Err(KeyError::MissingPrimary {
                primary: primary.to_owned(),
                dir: dir.to_owned(),
            });
        }
        Ok(Keyring {
            keys,
            primary: primary.to_owned(),
            rng: SystemRandom::new(),
        })
    }

    /// The id of the key that seals new data.
    pub fn primary_id(&self) -> &str {
        &self.primary
    }

    /// Reports whether a key with this id was loaded, so rows sealed under a
    /// key that has since been removed can be found before they are opened.
    pub fn contains(&self, key_id: &str) -> bool {
        self.keys.contains_key(key_id)
    }

    /// The ids of all loaded keys, in sorted order.
    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    /// Encrypts `plaintext` with the primary key for the row named by
    /// `binding`.
    ///
    /// Every call draws a fresh random 96-bit nonce. With random nonces the
    /// chance of a repeat stays negligible for far more than the number of
    /// credentials one key will ever seal, and a repeated nonce is what
    /// would break AES-GCM. `binding.key_id` must be the primary id, so that
    /// the key id stored in the row is the one that was used.
    pub fn seal(&self, binding: &Binding, plaintext: &[u8]) -> Result<Sealed, SealError> {
        if binding.key_id != self.primary {
            return Err(SealError::NotPrimary {
                key_id: binding.key_id.to_owned(),
                primary: self.primary.clone(),
            });
        }
        let key = self.primary_key();
        let aad = try_associated_data(binding).ok_or(SealError::BindingTooLong)?;

        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| SealError::Random)?;

        // The plaintext is copied into a buffer sized for the ciphertext and
        // tag, so it never reallocates, and the buffer is zeroizing so that
        // the plaintext is wiped if encryption fails part way.
        let mut buf = Zeroizing::new(Vec::with_capacity(plaintext.len() + AES_256_GCM.tag_len()));
        buf.extend_from_slice(plaintext);
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&aad),
            &mut *buf,
        )
        .map_err(|_| SealError::Encrypt)?;
        // The buffer now holds only ciphertext, which needs no wiping, so it
        // is moved out and the empty vector left behind is what gets wiped.
        let ciphertext = std::mem::take(&mut *buf);

        Ok(Sealed {
            key_id: self.primary.clone(),
            nonce: nonce.to_vec(),
            ciphertext,
        })
    }

    /// Decrypts a row's ciphertext with the key named by `binding.key_id`.
    ///
    /// Fails with [`OpenError::Authentication`] when the ciphertext, nonce or
    /// any part of the binding differs from what was sealed. The plaintext
    /// is returned in a zeroizing buffer.
    pub fn open(
        &self,
        binding: &Binding,
        nonce: &[u8],
        ciphertext: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        let key = self
            .keys
            .get(binding.key_id)
            .ok_or_else(|| OpenError::UnknownKey(binding.key_id.to_owned()))?;
        let nonce = Nonce::try_assume_unique_for_key(nonce)
            .map_err(|_| OpenError::BadNonce(nonce.len()))?;
        // A binding that cannot be encoded can never have been sealed, so
        // the ciphertext cannot authenticate for it.
        let aad = try_associated_data(binding).ok_or(OpenError::Authentication)?;

        // ring decrypts in place. The buffer is zeroizing from the start
        // because it holds plaintext once decryption has run, and ring wipes
        // the plaintext itself when the tag does not verify.
        let mut buf = Zeroizing::new(ciphertext.to_vec());
        let plaintext_len = key
            .open_in_place(nonce, Aad::from(&aad), &mut buf)
            .map_err(|_| OpenError::Authentication)?
            .len();
        // Truncating leaves the tag in spare capacity; it is not secret, and
        // `Zeroizing` wipes spare capacity on drop in any case.
        buf.truncate(plaintext_len);
        Ok(buf)
    }

    /// Re-encrypts a sealed credential under the primary key, for key
    /// rotation: the plaintext exists only inside this call, in a zeroizing
    /// buffer, so rotation needs no decrypting code of its own. `binding`
    /// names the row as it is now; the result is bound to the same row
    /// under the primary key.
    pub fn reseal(
        &self,
        binding: &Binding,
        nonce: &[u8],
        ciphertext: &[u8],
    ) -> Result<Sealed, ResealError> {
        let plaintext = self.open(binding, nonce, ciphertext)?;
        let rebound = Binding {
            key_id: self.primary_id(),
            ..*binding
        };
        Ok(self.seal(&rebound, &plaintext)?)
    }

    /// The primary key, which `load` guarantees is present.
    fn primary_key(&self) -> &LessSafeKey {
        // `load` refuses to build a keyring without the primary key, and
        // keys are never removed afterwards, so the lookup always succeeds.
        self.keys
            .get(&self.primary)
            .expect("Keyring::load checked that the primary key is present")
    }
}

/// Encodes `b` as the associated data for its row's ciphertext.
///
/// The layout is the bytes `connectord-cred-v1`, then `connection_id`,
/// `credential_id` in decimal, `kind` and `key_id`, each as a `u32`
/// big-endian byte length followed by its UTF-8 bytes. The length prefixes
/// make the encoding injective: no two different bindings encode alike,
/// whatever characters the fields contain. The layout must never change for
/// this tag, because rows already sealed only open with these exact bytes.
///
/// # Panics
///
/// Panics if a field is 4 GiB or longer. [`Keyring::seal`] and
/// [`Keyring::open`] check for that and return an error instead.
pub fn associated_data(b: &Binding) -> Vec<u8> {
    try_associated_data(b)
        .expect("binding fields are shorter than 4 GiB, as documented under # Panics")
}

/// Encodes `b` as [`associated_data`] does, or returns `None` when a field
/// is too long for its length prefix.
fn try_associated_data(b: &Binding) -> Option<Vec<u8>> {
    let credential_id = b.credential_id.to_string();
    let fields = [b.connection_id, &credential_id, b.kind, b.key_id];
    let len = AAD_TAG.len() + fields.iter().map(|f| 4 + f.len()).sum::<usize>();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(AAD_TAG);
    for field in fields {
        out.extend_from_slice(&u32::try_from(field.len()).ok()?.to_be_bytes());
        out.extend_from_slice(field.as_bytes());
    }
    Some(out)
}

/// Writes a new random key to `dir/<key_id>.key` with mode 0600 and returns
/// its path.
///
/// The directory is created with mode 0700 if it is missing. An existing key
/// file is never overwritten, because replacing a key makes every credential
/// sealed under it unreadable. The file and the directory entry are synced
/// to disk before returning, since losing a key after credentials have been
/// sealed with it loses those credentials.
pub fn generate(dir: &Path, key_id: &str) -> Result<PathBuf, KeyError> {
    validate_key_id(key_id)?;
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| KeyError::DirCreate {
            dir: dir.to_owned(),
            source,
        })?;
    let path = dir.join(format!("{key_id}{KEY_SUFFIX}"));

    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    SystemRandom::new()
        .fill(&mut key[..])
        .map_err(|_| KeyError::Random)?;

    // `create_new` fails if anything, even a dangling symbolic link, is
    // already at the path, so an existing key cannot be clobbered.
    let mut file = match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(KeyError::AlreadyExists { path });
        }
        Err(source) => return Err(KeyError::Write { path, source }),
    };

    let written = write_key(&mut file, &key[..]).and_then(|()| sync_dir(dir));
    if let Err(source) = written {
        // A partial key file would only make the next `load` fail, and it
        // was created by this call, so it is removed to let a retry succeed.
        drop(file);
        let _ = fs::remove_file(&path);
        return Err(KeyError::Write { path, source });
    }
    Ok(path)
}

/// Writes the key bytes and makes the file's mode exactly 0600.
fn write_key(file: &mut File, key: &[u8]) -> io::Result<()> {
    // The mode given at creation is reduced by the umask; setting it
    // explicitly makes it exactly 0600 whatever the umask is, which is what
    // `load` expects.
    file.set_permissions(fs::Permissions::from_mode(0o600))?;
    file.write_all(key)?;
    file.sync_all()
}

/// Syncs a directory so that a file just created in it survives a crash.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Reads and checks one key file.
fn load_key_file(path: &Path) -> Result<LessSafeKey, KeyError> {
    let unreadable = |source| KeyError::FileUnreadable {
        path: path.to_owned(),
        source,
    };
    // O_NONBLOCK keeps the open from hanging if someone has put a FIFO where
    // a key should be; it has no effect on regular files. The checks below
    // use the metadata of the opened file, not of the path, so they describe
    // exactly the file that is read.
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(unreadable)?;
    let meta = file.metadata().map_err(unreadable)?;
    if !meta.is_file() {
        return Err(KeyError::NotRegularFile {
            path: path.to_owned(),
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    let wrong_length = |len| KeyError::WrongLength {
        path: path.to_owned(),
        len,
    };
    if meta.len() != KEY_LEN as u64 {
        return Err(wrong_length(meta.len()));
    }

    // The key is read into a fixed zeroizing array, so no growable buffer
    // leaves copies of it on the heap. The extra read catches a file that
    // grew after it was checked.
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    file.read_exact(&mut key[..]).map_err(|source| {
        if source.kind() == io::ErrorKind::UnexpectedEof {
            wrong_length(meta.len())
        } else {
            unreadable(source)
        }
    })?;
    let mut extra = [0u8; 1];
    if file.read(&mut extra).map_err(unreadable)? != 0 {
        return Err(wrong_length(meta.len().max(KEY_LEN as u64 + 1)));
    }

    // ring copies the key into its own key schedule, which it does not wipe
    // on drop; that copy lives as long as the keyring, which is as long as
    // the daemon needs the key anyway.
    let key = UnboundKey::new(&AES_256_GCM, &key[..]).map_err(|_| KeyError::Unusable {
        path: path.to_owned(),
    })?;
    Ok(LessSafeKey::new(key))
}

/// Maps an error listing the key directory to the matching `KeyError`.
fn dir_error(dir: &Path, source: io::Error) -> KeyError {
    if source.kind() == io::ErrorKind::NotFound {
        KeyError::DirMissing {
            dir: dir.to_owned(),
        }
    } else {
        KeyError::DirUnreadable {
            dir: dir.to_owned(),
            source,
        }
    }
}

/// Key ids become file names, so they are restricted to characters that
/// cannot form a path separator, `..`, or a hidden file.
fn is_valid_key_id(id: &str) -> bool {
    (1..=MAX_KEY_ID_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
}

fn validate_key_id(id: &str) -> Result<(), KeyError> {
    if is_valid_key_id(id) {
        Ok(())
    } else {
        Err(KeyError::InvalidKeyId(id.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A directory under the system temp dir, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            static COUNTER: AtomicU32 = AtomicU32::new(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!(
                "connectord-keys-test-{}-{name}-{n}",
                std::process::id()
            ));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn binding<'a>(key_id: &'a str) -> Binding<'a> {
        Binding {
            connection_id: "conn-1",
            credential_id: 42,
            kind: "static_secret",
            key_id,
        }
    }

    fn write_key_file(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, bytes).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    /// A keyring holding freshly generated keys `ids`, with `primary`.
    fn keyring(dir: &TempDir, ids: &[&str], primary: &str) -> Keyring {
        for id in ids {
            generate(dir.path(), id).unwrap();
        }
        Keyring::load(dir.path(), primary).unwrap()
    }

    const SECRET: &[u8] = b"the payload";

    #[test]
    fn seal_open_round_trip() {
        let dir = TempDir::new("roundtrip");
        let ring = keyring(&dir, &["k1"], "k1");
        let b = binding("k1");
        let sealed = ring.seal(&b, SECRET).unwrap();
        assert_eq!(sealed.key_id, "k1");
        assert_eq!(sealed.nonce.len(), 12);
        assert_eq!(sealed.ciphertext.len(), SECRET.len() + 16);
        assert!(!sealed.ciphertext.windows(SECRET.len()).any(|w| w == SECRET));
        let opened = ring.open(&b, &sealed.nonce, &sealed.ciphertext).unwrap();
        assert_eq!(&opened[..], SECRET);

        let empty = ring.seal(&b, b"").unwrap();
        assert!(ring
            .open(&b, &empty.nonce, &empty.ciphertext)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn round_trip_with_payload_encoding() {
        use crate::secret::{Plaintext, Secret};
        let dir = TempDir::new("payload");
        let ring = keyring(&dir, &["k1"], "k1");
        let plain = Plaintext::UsernamePassword {
            username: Secret::new("u".to_owned()),
            password: Secret::new("p".to_owned()),
        };
        let b = Binding {
            kind: plain.kind(),
            ..binding("k1")
        };
        let sealed = ring.seal(&b, &plain.encode()).unwrap();
        let opened = ring.open(&b, &sealed.nonce, &sealed.ciphertext).unwrap();
        match Plaintext::decode(b.kind, &opened).unwrap() {
            Plaintext::UsernamePassword { username, password } => {
                assert_eq!(username.expose(), "u");
                assert_eq!(password.expose(), "p");
            }
            Plaintext::StaticSecret(_) => panic!("wrong variant"),
        }
    }

    #[test]
    fn tampering_fails_authentication() {
        let dir = TempDir::new("tamper");
        let ring = keyring(&dir, &["k1", "k2"], "k1");
        let b = binding("k1");
        let sealed = ring.seal(&b, SECRET).unwrap();
        let auth = |r: Result<Zeroizing<Vec<u8>>, OpenError>| {
            assert!(matches!(r, Err(OpenError::Authentication)), "{r:?}");
        };

        for i in 0..sealed.ciphertext.len() {
            let mut ct = sealed.ciphertext.clone();
            ct[i] ^= 0x01;
            auth(ring.open(&b, &sealed.nonce, &ct));
        }
        auth(ring.open(&b, &sealed.nonce, &sealed.ciphertext[..16]));
        auth(ring.open(&b, &sealed.nonce, &sealed.ciphertext[..3]));
        auth(ring.open(&b, &sealed.nonce, &[]));

        let mut nonce = sealed.nonce.clone();
        nonce[0] ^= 0x80;
        auth(ring.open(&b, &nonce, &sealed.ciphertext));

        // The ciphertext copied onto another connection's row.
        let other = Binding {
            connection_id: "conn-2",
            ..b
        };
        auth(ring.open(&other, &sealed.nonce, &sealed.ciphertext));
        let other = Binding {
            credential_id: 43,
            ..b
        };
        auth(ring.open(&other, &sealed.nonce, &sealed.ciphertext));
        let other = Binding {
            kind: "username_password",
            ..b
        };
        auth(ring.open(&other, &sealed.nonce, &sealed.ciphertext));
        // The row relabelled with another key that exists.
        auth(ring.open(&binding("k2"), &sealed.nonce, &sealed.ciphertext));
    }

    #[test]
    fn key_id_in_binding_matters_even_for_the_same_key_bytes() {
        // Two ids holding identical bytes: decryption must still fail when
        // the row claims the other id, which shows the key id is bound by the
        // associated data and not only by the choice of key.
        let dir = TempDir::new("samebytes");
        let bytes = [7u8; KEY_LEN];
        write_key_file(dir.path(), "k1.key", &bytes, 0o600);
        write_key_file(dir.path(), "k2.key", &bytes, 0o600);
        let ring = Keyring::load(dir.path(), "k1").unwrap();
        let sealed = ring.seal(&binding("k1"), SECRET).unwrap();
        assert!(matches!(
            ring.open(&binding("k2"), &sealed.nonce, &sealed.ciphertext),
            Err(OpenError::Authentication)
        ));
    }

    #[test]
    fn unknown_key_and_bad_nonce_are_reported() {
        let dir = TempDir::new("unknown");
        let ring = keyring(&dir, &["k1", "k2"], "k1");
        let sealed = ring.seal(&binding("k1"), SECRET).unwrap();
        match ring.open(&binding("k9"), &sealed.nonce, &sealed.ciphertext) {
            Err(OpenError::UnknownKey(id)) => assert_eq!(id, "k9"),
            other => panic!("{other:?}"),
        }
        for len in [0, 11, 13, 16] {
            match ring.open(&binding("k1"), &vec![0; len], &sealed.ciphertext) {
                Err(OpenError::BadNonce(n)) => assert_eq!(n, len),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn seal_refuses_a_non_primary_key_id() {
        let dir = TempDir::new("notprimary");
        let ring = keyring(&dir, &["k1", "k2"], "k2");
        match ring.seal(&binding("k1"), SECRET) {
            Err(SealError::NotPrimary { key_id, primary }) => {
                assert_eq!(key_id, "k1");
                assert_eq!(primary, "k2");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_seal_uses_a_fresh_nonce() {
        let dir = TempDir::new("nonce");
        let ring = keyring(&dir, &["k1"], "k1");
        let b = binding("k1");
        let first = ring.seal(&b, SECRET).unwrap();
        let second = ring.seal(&b, SECRET).unwrap();
        assert_ne!(first.nonce, second.nonce);
        assert_ne!(first.ciphertext, second.ciphertext);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            assert!(seen.insert(ring.seal(&b, SECRET).unwrap().nonce));
        }
    }

    #[test]
    fn rotation_opens_data_sealed_under_the_old_primary() {
        let dir = TempDir::new("rotation");
        let old = keyring(&dir, &["k1"], "k1");
        let sealed = old.seal(&binding("k1"), SECRET).unwrap();

        generate(dir.path(), "k2").unwrap();
        let rotated = Keyring::load(dir.path(), "k2").unwrap();
        assert_eq!(rotated.primary_id(), "k2");
        assert!(rotated.contains("k1") && rotated.contains("k2"));
        assert!(!rotated.contains("k9"));
        assert_eq!(rotated.key_ids().collect::<Vec<_>>(), ["k1", "k2"]);
        let opened = rotated
            .open(&binding("k1"), &sealed.nonce, &sealed.ciphertext)
            .unwrap();
        assert_eq!(&opened[..], SECRET);

        // Re-sealing under the new primary, as a rotation job would.
        let resealed = rotated.seal(&binding("k2"), &opened).unwrap();
        assert_eq!(resealed.key_id, "k2");
        let reopened = rotated
            .open(&binding("k2"), &resealed.nonce, &resealed.ciphertext)
            .unwrap();
        assert_eq!(&reopened[..], SECRET);
    }

    #[test]
    fn load_refuses_group_or_other_permissions() {
        for mode in [0o640, 0o604, 0o644, 0o620, 0o601, 0o660] {
            let dir = TempDir::new("mode");
            let path = write_key_file(dir.path(), "k1.key", &[1; KEY_LEN], mode);
            match Keyring::load(dir.path(), "k1") {
                Err(e @ KeyError::Permissions { .. }) => {
                    let msg = e.to_string();
                    assert!(msg.contains(&path.display().to_string()), "{msg}");
                    assert!(msg.contains(&format!("{mode:04o}")), "{msg}");
                    assert!(msg.contains("chmod 600"), "{msg}");
                }
                other => panic!("mode {mode:o}: {other:?}"),
            }
        }
        // Owner-only modes are accepted.
        for mode in [0o600, 0o400] {
            let dir = TempDir::new("modeok");
            write_key_file(dir.path(), "k1.key", &[1; KEY_LEN], mode);
            Keyring::load(dir.path(), "k1").unwrap();
        }
    }

    #[test]
    fn load_refuses_wrong_length() {
        for len in [0, 17, 31, 33, 64] {
            let dir = TempDir::new("length");
            let path = write_key_file(dir.path(), "k1.key", &vec![1; len], 0o600);
            match Keyring::load(dir.path(), "k1") {
                Err(e @ KeyError::WrongLength { .. }) => {
                    assert_eq!(
                        e.to_string(),
                        format!("key file {} is {len} bytes, expected 32", path.display())
                    );
                }
                other => panic!("len {len}: {other:?}"),
            }
        }
    }

    #[test]
    fn load_refuses_a_bad_key_file_even_if_it_is_not_the_primary() {
        let dir = TempDir::new("badother");
        generate(dir.path(), "k1").unwrap();
        write_key_file(dir.path(), "old.key", &[1; KEY_LEN], 0o644);
        assert!(matches!(
            Keyring::load(dir.path(), "k1"),
            Err(KeyError::Permissions { .. })
        ));
    }

    #[test]
    fn load_refuses_a_directory_named_like_a_key() {
        let dir = TempDir::new("notfile");
        generate(dir.path(), "k1").unwrap();
        fs::create_dir(dir.path().join("k2.key")).unwrap();
        assert!(matches!(
            Keyring::load(dir.path(), "k1"),
            Err(KeyError::NotRegularFile { .. })
        ));
    }

    #[test]
    fn load_refuses_a_missing_primary() {
        let dir = TempDir::new("primary");
        generate(dir.path(), "k1").unwrap();
        match Keyring::load(dir.path(), "k2") {
            Err(e @ KeyError::MissingPrimary { .. }) => assert_eq!(
                e.to_string(),
                format!("primary key \"k2\" not found in {}", dir.path().display())
            ),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            Keyring::load(dir.path(), "../k1"),
            Err(KeyError::InvalidKeyId(_))
        ));
    }

    #[test]
    fn load_reports_a_missing_directory() {
        let dir = TempDir::new("missing");
        let gone = dir.path().join("nope");
        match Keyring::load(&gone, "k1") {
            Err(e @ KeyError::DirMissing { .. }) => {
                assert!(e.to_string().contains(&gone.display().to_string()))
            }
            other => panic!("{other:?}"),
        }
        let file = write_key_file(dir.path(), "plain", b"x", 0o600);
        assert!(matches!(
            Keyring::load(&file, "k1"),
            Err(KeyError::DirUnreadable { .. })
        ));
    }

    #[test]
    fn load_ignores_other_file_names() {
        let dir = TempDir::new("ignore");
        generate(dir.path(), "k1").unwrap();
        // None of these is `<valid id>.key`, so their content and modes do
        // not matter.
        write_key_file(dir.path(), "README", b"notes", 0o644);
        write_key_file(dir.path(), "k2.key.bak", b"x", 0o644);
        write_key_file(dir.path(), ".key", b"x", 0o644);
        write_key_file(dir.path(), "bad id.key", b"x", 0o644);
        fs::create_dir(dir.path().join("..data")).unwrap();
        let ring = Keyring::load(dir.path(), "k1").unwrap();
        assert_eq!(ring.key_ids().collect::<Vec<_>>(), ["k1"]);
    }

    #[test]
    fn generate_writes_mode_0600_and_refuses_overwrite() {
        let dir = TempDir::new("generate");
        let keys = dir.path().join("nested").join("keys");
        let path = generate(&keys, "k1").unwrap();
        assert_eq!(path, keys.join("k1.key"));
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
        assert_eq!(meta.len(), KEY_LEN as u64);
        let dir_mode = fs::metadata(&keys).unwrap().permissions().mode() & 0o777;
        assert_eq!(dir_mode & 0o077, 0, "directory mode {dir_mode:o}");

        let before = fs::read(&path).unwrap();
        match generate(&keys, "k1") {
            Err(e @ KeyError::AlreadyExists { .. }) => {
                assert!(e.to_string().contains(&path.display().to_string()))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(fs::read(&path).unwrap(), before);

        let second = generate(&keys, "k2").unwrap();
        assert_ne!(fs::read(second).unwrap(), before);
    }

    #[test]
    fn generate_refuses_bad_key_ids() {
        let dir = TempDir::new("badid");
        let too_long = "a".repeat(65);
        for id in ["", "../x", "a/b", ".", "..", "k 1", "k.1", "ké", &too_long] {
            match generate(dir.path(), id) {
                Err(KeyError::InvalidKeyId(got)) => assert_eq!(got, id),
                other => panic!("{id:?}: {other:?}"),
            }
        }
        assert_eq!(
            KeyError::InvalidKeyId("../x".to_owned()).to_string(),
            "key id \"../x\" is invalid (use 1 to 64 letters, digits, '-', '_')"
        );
        generate(dir.path(), &"a".repeat(64)).unwrap();
        generate(dir.path(), "Key_2024-01").unwrap();
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn associated_data_layout_is_stable_and_unambiguous() {
        let b = Binding {
            connection_id: "c",
            credential_id: -7,
            kind: "static_secret",
            key_id: "k1",
        };
        let mut expected = b"connectord-cred-v1".to_vec();
        for field in ["c", "-7", "static_secret", "k1"] {
            expected.extend_from_slice(&(field.len() as u32).to_be_bytes());
            expected.extend_from_slice(field.as_bytes());
        }
        assert_eq!(associated_data(&b), expected);

        // Moving characters between adjacent fields changes the encoding.
        let a = Binding {
            connection_id: "ab",
            kind: "c",
            ..b
        };
        let shifted = Binding {
            connection_id: "a",
            kind: "bc",
            ..b
        };
        assert_ne!(associated_data(&a), associated_data(&shifted));
    }

    #[test]
    fn debug_output_has_no_key_bytes() {
        let dir = TempDir::new("debug");
        let bytes = [0xabu8; KEY_LEN];
        write_key_file(dir.path(), "k1.key", &bytes, 0o600);
        let ring = Keyring::load(dir.path(), "k1").unwrap();
        let shown = format!("{ring:?} {ring:#?}");
        assert!(shown.contains("k1"), "{shown}");
        assert!(!shown.contains("171"), "{shown}");
        assert!(!shown.to_lowercase().contains("abab"), "{shown}");
    }
}
