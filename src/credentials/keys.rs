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
//! connection id, credential id, credential kind and key id of its row, and
//! to the connector it was stored for (see [`associated_data`]). Someone
//! with write access to the database but not to the keys therefore cannot
//! copy a ciphertext onto another connection or another credential, relabel
//! its kind, point it at another key, or point its connection at another
//! site's connector: any of those makes decryption fail instead of handing
//! a credential to the wrong owner or the wrong program.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
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

/// The version tags at the start of the associated data. Changing the
/// layout of the associated data requires a new tag, because rows sealed
/// under the old layout only open with the old bytes. The first layout
/// lacked the connector; rows sealed under it are only opened to be sealed
/// again under the second (`store::bind_connectors`).
const AAD_TAG_V1: &[u8] = b"connectord-cred-v1";
const AAD_TAG: &[u8] = b"connectord-cred-v2";
const STATE_AAD_TAG: &[u8] = b"connectord-state-v1";
const ANSWER_AAD_TAG: &[u8] = b"connectord-answer-v1";

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
    /// A key file's access ACL lets someone other than its owner read it.
    #[error(
        "key file {} is readable by {who} through its ACL; remove the entry (setfacl -b) and chmod 600 it",
        path.display()
    )]
    SharedByAcl { path: PathBuf, who: String },
    /// A key file belongs to a user other than the daemon's (or root, as
    /// under systemd's `LoadCredential=`): that user can read or replace it.
    #[error(
        "key file {} is owned by uid {owner}, not by the daemon's user (uid {euid}) or root; chown it",
        path.display()
    )]
    Owner {
        path: PathBuf,
        owner: u32,
        euid: u32,
    },
    /// The key directory belongs to another user, who could put keys in it.
    #[error(
        "key directory {} is owned by uid {owner}, not by the daemon's user (uid {euid}) or root; chown it",
        dir.display()
    )]
    DirOwner { dir: PathBuf, owner: u32, euid: u32 },
    /// Someone other than its owner may add, replace or remove keys.
    #[error(
        "key directory {} is writable by group or others (mode {mode:04o}); chmod 700 it",
        dir.display()
    )]
    DirWritable { dir: PathBuf, mode: u32 },
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
    /// New data is always bound to its connector; the first layout is only
    /// ever opened.
    #[error("the binding names no connector")]
    NoConnector,
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
    #[error("decryption failed: ciphertext does not authenticate for this row, key and connector")]
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
    /// The connector the credential is for. `None` names the first layout,
    /// which lacked it: [`Keyring::seal`] refuses it, and only
    /// [`Keyring::reseal`] opens it, to bind the row to its connector.
    pub connector: Option<&'a str>,
}

/// The connection a state ciphertext belongs to, bound to it as associated
/// data: a state copied onto another connection, or left from another
/// credential or connector, does not decrypt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateBinding<'a> {
    pub connection_id: &'a str,
    pub connector: &'a str,
    /// The credential the writing run logged in with; `None` for a
    /// connector that takes none.
    pub credential_id: Option<i64>,
    pub key_id: &'a str,
}

/// The interaction an owner's answer (a one-time code) is for, bound to it
/// as associated data: an answer moved to another interaction, run or
/// connection does not decrypt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnswerBinding<'a> {
    pub interaction_id: i64,
    pub connection_id: &'a str,
    pub run_id: i64,
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
        check_dir(dir)?;
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
        if binding.connector.is_none() {
            return Err(SealError::NoConnector);
        }
        let aad = try_associated_data(binding).ok_or(SealError::BindingTooLong)?;
        self.seal_with(binding.key_id, &aad, plaintext)
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
        // A binding that cannot be encoded can never have been sealed, so
        // the ciphertext cannot authenticate for it.
        let aad = try_associated_data(binding).ok_or(OpenError::Authentication)?;
        self.open_with(binding.key_id, &aad, nonce, ciphertext)
    }

    /// Re-encrypts a sealed credential under the primary key, for key
    /// rotation and for binding a first-layout row to its connector: the
    /// plaintext exists only inside this call, in a zeroizing buffer, so
    /// neither needs decrypting code of its own. `binding` names the row as
    /// it is now; the result is bound to the same row and to `connector`
    /// under the primary key.
    pub fn reseal(
        &self,
        binding: &Binding,
        connector: &str,
        nonce: &[u8],
        ciphertext: &[u8],
    ) -> Result<Sealed, ResealError> {
        let plaintext = self.open(binding, nonce, ciphertext)?;
        let rebound = Binding {
            key_id: self.primary_id(),
            connector: Some(connector),
            ..*binding
        };
        Ok(self.seal(&rebound, &plaintext)?)
    }

    /// Encrypts connector state with the primary key for the connection
    /// and credential named by `binding`, as [`seal`](Self::seal) does a
    /// credential.
    pub fn seal_state(
        &self,
        binding: &StateBinding,
        plaintext: &[u8],
    ) -> Result<Sealed, SealError> {
        let aad = state_associated_data(binding).ok_or(SealError::BindingTooLong)?;
        self.seal_with(binding.key_id, &aad, plaintext)
    }

    /// Decrypts connector state sealed by [`seal_state`](Self::seal_state)
    /// for exactly this binding.
    pub fn open_state(
        &self,
        binding: &StateBinding,
        nonce: &[u8],
        ciphertext: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        let aad = state_associated_data(binding).ok_or(OpenError::Authentication)?;
        self.open_with(binding.key_id, &aad, nonce, ciphertext)
    }

    /// Re-encrypts connector state under the primary key, for rotation;
    /// the plaintext exists only inside this call.
    pub fn reseal_state(
        &self,
        binding: &StateBinding,
        nonce: &[u8],
        ciphertext: &[u8],
    ) -> Result<Sealed, ResealError> {
        let plaintext = self.open_state(binding, nonce, ciphertext)?;
        let rebound = StateBinding {
            key_id: self.primary_id(),
            ..*binding
        };
        Ok(self.seal_state(&rebound, &plaintext)?)
    }

    /// Encrypts an owner's answer for the interaction named by `binding`.
    pub fn seal_answer(
        &self,
        binding: &AnswerBinding,
        plaintext: &[u8],
    ) -> Result<Sealed, SealError> {
        let aad = answer_associated_data(binding).ok_or(SealError::BindingTooLong)?;
        self.seal_with(binding.key_id, &aad, plaintext)
    }

    /// Decrypts an answer sealed by [`seal_answer`](Self::seal_answer).
    pub fn open_answer(
        &self,
        binding: &AnswerBinding,
        nonce: &[u8],
        ciphertext: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        let aad = answer_associated_data(binding).ok_or(OpenError::Authentication)?;
        self.open_with(binding.key_id, &aad, nonce, ciphertext)
    }

    /// AES-256-GCM under the primary key with a fresh random nonce.
    /// `key_id` is the key the binding names, which must be the primary,
    /// so that the key id stored in the row is the one that was used.
    fn seal_with(&self, key_id: &str, aad: &[u8], plaintext: &[u8]) -> Result<Sealed, SealError> {
        if key_id != self.primary {
            return Err(SealError::NotPrimary {
                key_id: key_id.to_owned(),
                primary: self.primary.clone(),
            });
        }
        let key = self.primary_key();
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| SealError::Random)?;

        // The plaintext is copied into a buffer sized for the ciphertext and
        // tag, so it never reallocates, and the buffer is zeroizing so that
        // the plaintext is wiped if encryption fails part way.
        let mut buf = Zeroizing::new(Vec::with_capacity(plaintext.len() + AES_256_GCM.tag_len()));
        buf.extend_from_slice(plaintext);
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
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

    /// Decrypts with the key `key_id` into a zeroizing buffer.
    fn open_with(
        &self,
        key_id: &str,
        aad: &[u8],
        nonce: &[u8],
        ciphertext: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        let key = self
            .keys
            .get(key_id)
            .ok_or_else(|| OpenError::UnknownKey(key_id.to_owned()))?;
        let nonce = Nonce::try_assume_unique_for_key(nonce)
            .map_err(|_| OpenError::BadNonce(nonce.len()))?;
        // ring decrypts in place. The buffer is zeroizing from the start
        // because it holds plaintext once decryption has run, and ring wipes
        // the plaintext itself when the tag does not verify.
        let mut buf = Zeroizing::new(ciphertext.to_vec());
        let plaintext_len = key
            .open_in_place(nonce, Aad::from(aad), &mut buf)
            .map_err(|_| OpenError::Authentication)?
            .len();
        // Truncating leaves the tag in spare capacity; it is not secret, and
        // `Zeroizing` wipes spare capacity on drop in any case.
        buf.truncate(plaintext_len);
        Ok(buf)
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
/// The layout is the bytes `connectord-cred-v2`, then `connection_id`,
/// `credential_id` in decimal, `kind`, `key_id` and `connector`, each as a
/// `u32` big-endian byte length followed by its UTF-8 bytes. The length
/// prefixes make the encoding injective: no two different bindings encode
/// alike, whatever characters the fields contain. Without a connector it
/// is the first layout: `connectord-cred-v1` and the first four fields.
/// Neither layout may ever change, because rows already sealed only open
/// with these exact bytes.
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
    let mut fields = vec![b.connection_id, &credential_id, b.kind, b.key_id];
    let tag = match b.connector {
        Some(connector) => {
            fields.push(connector);
            AAD_TAG
        }
        None => AAD_TAG_V1,
    };
    encode_fields(tag, &fields)
}

/// Encodes a state binding: the bytes `connectord-state-v1`, then
/// `connection_id`, `connector`, the credential id in decimal (empty for
/// none) and `key_id`, each length-prefixed as in [`associated_data`]. The
/// tag differs from a credential's, so neither kind of ciphertext opens as
/// the other. The layout may never change.
fn state_associated_data(b: &StateBinding) -> Option<Vec<u8>> {
    let credential_id = b.credential_id.map(|id| id.to_string()).unwrap_or_default();
    encode_fields(
        STATE_AAD_TAG,
        &[b.connection_id, b.connector, &credential_id, b.key_id],
    )
}

/// Encodes an answer binding: the bytes `connectord-answer-v1`, then the
/// interaction id, `connection_id`, the run id (decimal) and `key_id`,
/// length-prefixed as in [`associated_data`].
fn answer_associated_data(b: &AnswerBinding) -> Option<Vec<u8>> {
    let interaction_id = b.interaction_id.to_string();
    let run_id = b.run_id.to_string();
    encode_fields(
        ANSWER_AAD_TAG,
        &[&interaction_id, b.connection_id, &run_id, b.key_id],
    )
}

/// `tag`, then each field as a `u32` big-endian length and its bytes, or
/// `None` when a field is too long for its prefix.
fn encode_fields(tag: &[u8], fields: &[&str]) -> Option<Vec<u8>> {
    let len = tag.len() + fields.iter().map(|f| 4 + f.len()).sum::<usize>();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(tag);
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
    check_private(&file, &meta, path)?;
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
fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Whether `owner` may own a key file or the key directory: the daemon's
/// user, or root. systemd's credential store (`LoadCredential=`) is owned by
/// root and grants the service user read access through an ACL, and root
/// can read any file anyway; any other user could read or replace the keys.
fn trusted_owner(owner: u32) -> bool {
    owner == euid() || owner == 0
}

/// Refuses a key directory in which someone other than its owner could
/// add, replace or remove a key file. With an ACL the group bits are its
/// mask, which bounds every entry, so the mode alone answers for writing.
fn check_dir(dir: &Path) -> Result<(), KeyError> {
    let meta = fs::metadata(dir).map_err(|source| dir_error(dir, source))?;
    if !trusted_owner(meta.uid()) {
        return Err(KeyError::DirOwner {
            dir: dir.to_owned(),
            owner: meta.uid(),
            euid: euid(),
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(KeyError::DirWritable {
            dir: dir.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Refuses a key file that belongs to another user, or that its mode or
/// its access ACL lets anyone but its owner (and the daemon's user, named
/// in an ACL by systemd's credential store) read.
fn check_private(file: &File, meta: &fs::Metadata, path: &Path) -> Result<(), KeyError> {
    if !trusted_owner(meta.uid()) {
        return Err(KeyError::Owner {
            path: path.to_owned(),
            owner: meta.uid(),
            euid: euid(),
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    let permissions = || KeyError::Permissions {
        path: path.to_owned(),
        mode,
    };
    if mode & 0o007 != 0 {
        return Err(permissions());
    }
    match access_acl(file) {
        // Without an ACL the group bits are the group's.
        None if mode & 0o070 != 0 => Err(permissions()),
        None => Ok(()),
        // With one they are its mask, and the entries say who reads.
        Some(entries) => {
            let mask = (mode >> 3) & 0o7;
            let who = entries.iter().find_map(|&(tag, perm, id)| {
                let grants = u32::from(perm) & mask != 0;
                match tag {
                    ACL_USER if grants && id != euid() => Some(format!("user {id}")),
                    ACL_GROUP_OBJ if grants => Some("its group".to_owned()),
                    ACL_GROUP if grants => Some(format!("group {id}")),
                    ACL_TOO_LONG => Some("more entries than a key file needs".to_owned()),
                    _ => None,
                }
            });
            match who {
                Some(who) => Err(KeyError::SharedByAcl {
                    path: path.to_owned(),
                    who,
                }),
                None => Ok(()),
            }
        }
    }
}

// Tags of the entries of a POSIX access ACL, from <linux/posix_acl.h>.
const ACL_USER: u16 = 0x02;
const ACL_GROUP_OBJ: u16 = 0x04;
const ACL_GROUP: u16 = 0x08;
/// Not a kernel tag: an ACL with more entries than [`access_acl`] reads.
const ACL_TOO_LONG: u16 = 0xffff;

/// The entries (tag, permission bits, id) of the file's POSIX access ACL,
/// or `None` when it has none beyond its mode (or the file system keeps
/// none). The kernel's format: a little-endian `u32` version 2, then
/// entries of `u16` tag, `u16` permissions and `u32` id.
fn access_acl(file: &File) -> Option<Vec<(u16, u16, u32)>> {
    use std::os::fd::AsRawFd;
    let mut buf = [0u8; 4 + 8 * 64];
    // SAFETY: the name is NUL-terminated, and the kernel writes at most
    // `buf.len()` bytes into `buf`, which outlives the call.
    let len = unsafe {
        libc::fgetxattr(
            file.as_raw_fd(),
            c"system.posix_acl_access".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    // No ACL (ENODATA), none supported, or one too large for any key file
    // systemd or an operator would make: the last is refused as shared.
    let len = match usize::try_from(len) {
        Ok(len) => len,
        Err(_) if io::Error::last_os_error().raw_os_error() == Some(libc::ERANGE) => {
            return Some(vec![(ACL_TOO_LONG, 0o7, 0)]);
        }
        Err(_) => return None,
    };
    let entries = buf.get(4..len)?;
    Some(
        entries
            .chunks_exact(8)
            .map(|e| {
                (
                    u16::from_le_bytes([e[0], e[1]]),
                    u16::from_le_bytes([e[2], e[3]]),
                    u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
                )
            })
            .collect(),
    )
}

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
            connector: Some("chase"),
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
    fn state_opens_only_for_its_connection_connector_and_credential() {
        let dir = TempDir::new("state");
        let ring = keyring(&dir, &["k1", "k2"], "k1");
        let b = StateBinding {
            connection_id: "conn-1",
            connector: "chase",
            credential_id: Some(7),
            key_id: "k1",
        };
        let sealed = ring.seal_state(&b, b"cookies").unwrap();
        let opened = ring
            .open_state(&b, &sealed.nonce, &sealed.ciphertext)
            .unwrap();
        assert_eq!(&opened[..], b"cookies");
        let others = [
            StateBinding {
                connection_id: "conn-2",
                ..b
            },
            StateBinding {
                connector: "usaa",
                ..b
            },
            StateBinding {
                credential_id: Some(8),
                ..b
            },
            StateBinding {
                credential_id: None,
                ..b
            },
        ];
        for other in others {
            assert!(matches!(
                ring.open_state(&other, &sealed.nonce, &sealed.ciphertext),
                Err(OpenError::Authentication)
            ));
        }
        // Neither kind of ciphertext opens as the other.
        let cred = ring.seal(&binding("k1"), b"cookies").unwrap();
        assert!(ring.open_state(&b, &cred.nonce, &cred.ciphertext).is_err());
        assert!(ring
            .open(&binding("k1"), &sealed.nonce, &sealed.ciphertext)
            .is_err());
        // Rotation re-seals under the primary, still bound to the row.
        let ring2 = Keyring::load(dir.path(), "k2").unwrap();
        let resealed = ring2
            .reseal_state(&b, &sealed.nonce, &sealed.ciphertext)
            .unwrap();
        assert_eq!(resealed.key_id, "k2");
        let b2 = StateBinding { key_id: "k2", ..b };
        let opened = ring2
            .open_state(&b2, &resealed.nonce, &resealed.ciphertext)
            .unwrap();
        assert_eq!(&opened[..], b"cookies");
    }

    #[test]
    fn round_trip_with_payload_encoding() {
        use crate::credentials::secret::{Plaintext, Secret};
        let dir = TempDir::new("payload");
        let ring = keyring(&dir, &["k1"], "k1");
        let plain = Plaintext::UsernamePassword {
            username: Secret::new("u".to_owned()),
            password: Secret::new("p".to_owned()),
        };
        let b = Binding {
            kind: plain.kind().as_str(),
            ..binding("k1")
        };
        let sealed = ring.seal(&b, &plain.encode()).unwrap();
        let opened = ring.open(&b, &sealed.nonce, &sealed.ciphertext).unwrap();
        match Plaintext::decode(b.kind.parse().unwrap(), &opened).unwrap() {
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
        // The connection pointed at another connector, or the row passed
        // off as one sealed before connectors were bound.
        let other = Binding {
            connector: Some("amazon"),
            ..b
        };
        auth(ring.open(&other, &sealed.nonce, &sealed.ciphertext));
        let other = Binding {
            connector: None,
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

    /// Seals as releases before the connector was bound did.
    fn seal_first_layout(ring: &Keyring, b: &Binding, plaintext: &[u8]) -> Sealed {
        let first = Binding {
            connector: None,
            ..*b
        };
        let nonce = [9u8; NONCE_LEN];
        let mut buf = plaintext.to_vec();
        ring.primary_key()
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(associated_data(&first)),
                &mut buf,
            )
            .unwrap();
        Sealed {
            key_id: ring.primary_id().to_owned(),
            nonce: nonce.to_vec(),
            ciphertext: buf,
        }
    }

    #[test]
    fn a_first_layout_row_is_resealed_bound_to_its_connector() {
        let dir = TempDir::new("firstlayout");
        let ring = keyring(&dir, &["k1"], "k1");
        let b = binding("k1");
        let old = seal_first_layout(&ring, &b, SECRET);
        let first = Binding {
            connector: None,
            ..b
        };
        assert!(matches!(
            ring.open(&b, &old.nonce, &old.ciphertext),
            Err(OpenError::Authentication)
        ));
        assert!(matches!(
            ring.seal(&first, SECRET),
            Err(SealError::NoConnector)
        ));
        let bound = ring
            .reseal(&first, "chase", &old.nonce, &old.ciphertext)
            .unwrap();
        let opened = ring.open(&b, &bound.nonce, &bound.ciphertext).unwrap();
        assert_eq!(&opened[..], SECRET);
        let elsewhere = Binding {
            connector: Some("amazon"),
            ..b
        };
        assert!(ring
            .open(&elsewhere, &bound.nonce, &bound.ciphertext)
            .is_err());
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

    /// Sets `path`'s access ACL: the owner, the named entries, its
    /// group (none), the mask and others (none).
    fn set_acl(path: &Path, named: &[(u16, u32)]) {
        let mut entries = vec![
            (0x01, 0o4, u32::MAX),
            (ACL_GROUP_OBJ, 0, u32::MAX),
            (0x10, 0o4, u32::MAX),
            (0x20, 0, u32::MAX),
        ];
        entries.extend(named.iter().map(|&(tag, id)| (tag, 0o4, id)));
        // The kernel takes entries only in order of tag, then id.
        entries.sort_by_key(|&(tag, _, id)| (tag, id));
        let mut xattr = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in entries {
            xattr.extend_from_slice(&u16::to_le_bytes(tag));
            xattr.extend_from_slice(&u16::to_le_bytes(perm));
            xattr.extend_from_slice(&u32::to_le_bytes(id));
        }
        let name = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: both strings are NUL-terminated and `xattr` outlives the call.
        let rc = unsafe {
            libc::setxattr(
                name.as_ptr(),
                c"system.posix_acl_access".as_ptr(),
                xattr.as_ptr().cast(),
                xattr.len(),
                0,
            )
        };
        assert_eq!(rc, 0, "setxattr: {}", io::Error::last_os_error());
    }

    #[test]
    fn an_acl_may_name_only_the_daemons_user() {
        // As systemd's credential store leaves a key: mode 0400 and an ACL
        // entry that lets the service's user read it (mode 0440 shows).
        let dir = TempDir::new("acl");
        let path = write_key_file(dir.path(), "k1.key", &[1; KEY_LEN], 0o400);
        set_acl(&path, &[(ACL_USER, euid())]);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o440);
        Keyring::load(dir.path(), "k1").unwrap();
        for (named, who) in [
            ((ACL_USER, 12345), "user 12345"),
            ((ACL_GROUP, 4242), "group 4242"),
        ] {
            set_acl(&path, &[(ACL_USER, euid()), named]);
            match Keyring::load(dir.path(), "k1") {
                Err(e @ KeyError::SharedByAcl { .. }) => {
                    let msg = e.to_string();
                    assert!(msg.contains(who), "{msg}");
                    assert!(msg.contains(&path.display().to_string()), "{msg}");
                }
                other => panic!("{who}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_key_directory_must_be_writable_by_its_owner_alone() {
        for mode in [0o777, 0o770, 0o730, 0o703] {
            let dir = TempDir::new("dirmode");
            write_key_file(dir.path(), "k1.key", &[1; KEY_LEN], 0o600);
            fs::set_permissions(dir.path(), fs::Permissions::from_mode(mode)).unwrap();
            match Keyring::load(dir.path(), "k1") {
                Err(e @ KeyError::DirWritable { .. }) => {
                    let msg = e.to_string();
                    assert!(msg.contains(&format!("{mode:04o}")), "{msg}");
                    assert!(msg.contains("chmod 700"), "{msg}");
                }
                other => panic!("mode {mode:o}: {other:?}"),
            }
        }
        for mode in [0o700, 0o755, 0o500, 0o711] {
            let dir = TempDir::new("dirmodeok");
            write_key_file(dir.path(), "k1.key", &[1; KEY_LEN], 0o600);
            fs::set_permissions(dir.path(), fs::Permissions::from_mode(mode)).unwrap();
            Keyring::load(dir.path(), "k1").unwrap();
            fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
        }
    }

    /// Only root can give a file away; as another user there is nothing
    /// to try, and the owner rule is shown by the daemon's own files.
    #[test]
    fn keys_of_another_user_are_refused() {
        if euid() != 0 {
            let dir = TempDir::new("ownerok");
            write_key_file(dir.path(), "k1.key", &[1; KEY_LEN], 0o600);
            Keyring::load(dir.path(), "k1").unwrap();
            return;
        }
        let dir = TempDir::new("owner");
        let path = write_key_file(dir.path(), "k1.key", &[1; KEY_LEN], 0o600);
        std::os::unix::fs::chown(&path, Some(1000), None).unwrap();
        match Keyring::load(dir.path(), "k1") {
            Err(e @ KeyError::Owner { .. }) => {
                assert!(e.to_string().contains("owned by uid 1000"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        std::os::unix::fs::chown(&path, Some(0), None).unwrap();
        Keyring::load(dir.path(), "k1").unwrap();
        std::os::unix::fs::chown(dir.path(), Some(1000), None).unwrap();
        match Keyring::load(dir.path(), "k1") {
            Err(e @ KeyError::DirOwner { .. }) => {
                assert!(e.to_string().contains("owned by uid 1000"), "{e}");
            }
            other => panic!("{other:?}"),
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
            connector: Some("chase"),
        };
        let encode = |tag: &[u8], fields: &[&str]| {
            let mut out = tag.to_vec();
            for field in fields {
                out.extend_from_slice(&(field.len() as u32).to_be_bytes());
                out.extend_from_slice(field.as_bytes());
            }
            out
        };
        let v2 = encode(
            b"connectord-cred-v2",
            &["c", "-7", "static_secret", "k1", "chase"],
        );
        assert_eq!(associated_data(&b), v2);
        let first = Binding {
            connector: None,
            ..b
        };
        let v1 = encode(b"connectord-cred-v1", &["c", "-7", "static_secret", "k1"]);
        assert_eq!(associated_data(&first), v1);

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
