//! The file a child finds its connection's state in and writes it back to
//! (`CONNECTORD_STATE_FILE`, SPEC §13), inside the run's private directory.
//!
//! The file is placed before the spawn with its modification time set far
//! in the past, so any write by the child, in place or by rename, shows as
//! a different inode, size or time: an unchanged file is recognised without
//! reading it, which keeps a run that does not touch its state free of any
//! cost. What the child left is read without following links and only if
//! it is a regular file with no other names, so a connector cannot make
//! the daemon read, and store, a file it could not itself read.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use zeroize::Zeroizing;

use crate::credentials::state::StateBytes;

/// The file's name inside the run directory.
pub const FILE_NAME: &str = "state";

/// The modification time a placed state carries: no write can produce it.
const PLACED_MTIME: Duration = Duration::from_secs(1);

/// What identifies the file as placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Stamp {
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
        }
    }
}

/// One run's state file, from placement to collection.
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
    /// The placed file; `None` when the connection had no state, so the
    /// file did not exist at spawn.
    placed: Option<Stamp>,
}

/// What the child left in its state file.
#[derive(Debug)]
pub enum Collected {
    /// Not written during the run: the stored state stays as it is.
    Unchanged,
    /// Written: the connection's new state.
    Written(StateBytes),
    /// Written, but larger than `[state] max_bytes` (this many bytes).
    TooLarge(u64),
    /// Something the daemon will not read as a state; the reason.
    Refused(&'static str),
}

impl StateFile {
    /// Writes `state` to `run_dir/state`, mode 0600, as a new file, or
    /// leaves it absent when there is none.
    pub fn place(run_dir: &Path, state: Option<&StateBytes>) -> io::Result<StateFile> {
        let path = run_dir.join(FILE_NAME);
        let Some(state) = state else {
            return Ok(StateFile { path, placed: None });
        };
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)?;
        file.write_all(state.expose())?;
        file.set_modified(SystemTime::UNIX_EPOCH + PLACED_MTIME)?;
        let stamp = Stamp::of(&file.metadata()?);
        Ok(StateFile {
            path,
            placed: Some(stamp),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads what the child left, off the runtime's threads when there is
    /// something to read. A file the child removed leaves the stored state
    /// as it is.
    pub async fn collect(self, max_bytes: u64) -> Collected {
        let meta = match std::fs::symlink_metadata(&self.path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Collected::Unchanged,
            Err(_) => return Collected::Refused("the state file cannot be examined"),
        };
        if self.placed == Some(Stamp::of(&meta)) {
            return Collected::Unchanged;
        }
        let path = self.path;
        tokio::task::spawn_blocking(move || read(&path, max_bytes))
            .await
            .unwrap_or(Collected::Refused("reading the state file failed"))
    }
}

/// Reads a state file the child wrote, refusing anything but a plain file.
fn read(path: &Path, max_bytes: u64) -> Collected {
    // O_NONBLOCK: a FIFO put in the file's place must not hang the daemon.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path);
    let file = match file {
        Ok(file) => file,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Collected::Refused("the state file is a symbolic link")
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Collected::Unchanged,
        Err(_) => return Collected::Refused("the state file cannot be opened"),
    };
    let Ok(meta) = file.metadata() else {
        return Collected::Refused("the state file cannot be examined");
    };
    if !meta.file_type().is_file() {
        return Collected::Refused("the state file is not a regular file");
    }
    if meta.nlink() > 1 {
        return Collected::Refused("the state file has other names (hard links)");
    }
    if meta.size() > max_bytes {
        return Collected::TooLarge(meta.size());
    }
    read_at_most(file, meta.size(), max_bytes)
}

/// Reads the whole file (`size` bytes when examined) into a zeroizing
/// buffer, or reports it too large if it grew past `max_bytes` meanwhile.
fn read_at_most(file: File, size: u64, max_bytes: u64) -> Collected {
    let mut buf = Zeroizing::new(Vec::with_capacity(size as usize + 1));
    match file.take(max_bytes + 1).read_to_end(&mut buf) {
        Ok(_) if buf.len() as u64 > max_bytes => Collected::TooLarge(buf.len() as u64),
        Ok(_) => Collected::Written(StateBytes::new(buf)),
        Err(_) => Collected::Refused("the state file cannot be read"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "connectord-state-file-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        dir
    }

    fn collect(file: StateFile, max: u64) -> Collected {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(file.collect(max))
    }

    fn state(bytes: &[u8]) -> StateBytes {
        StateBytes::new(Zeroizing::new(bytes.to_vec()))
    }

    #[test]
    fn an_untouched_state_is_unchanged_and_a_rewrite_of_the_same_size_is_not() {
        let dir = temp_dir("same-size");
        let file = StateFile::place(&dir, Some(&state(b"one"))).unwrap();
        assert_eq!(std::fs::read(file.path()).unwrap(), b"one");
        let path = file.path().to_owned();
        assert!(matches!(collect(file, 100), Collected::Unchanged));

        std::fs::remove_file(&path).unwrap();
        let file = StateFile::place(&dir, Some(&state(b"one"))).unwrap();
        std::fs::write(file.path(), b"two").unwrap();
        match collect(file, 100) {
            Collected::Written(bytes) => assert_eq!(bytes.expose(), b"two"),
            other => panic!("{other:?}"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn no_state_means_no_file_and_a_new_file_is_written() {
        let dir = temp_dir("absent");
        let file = StateFile::place(&dir, None).unwrap();
        assert!(!file.path().exists());
        let tmp = dir.join("tmp");
        std::fs::write(&tmp, b"fresh").unwrap();
        std::fs::rename(&tmp, file.path()).unwrap();
        match collect(file, 5) {
            Collected::Written(bytes) => assert_eq!(bytes.expose(), b"fresh"),
            other => panic!("{other:?}"),
        }
        let file = StateFile::place(&dir, None).unwrap();
        assert!(matches!(collect(file, 4), Collected::TooLarge(5)));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn links_and_special_files_are_refused() {
        let dir = temp_dir("links");
        let secret = dir.join("daemon-secret");
        std::fs::write(&secret, b"not for the child").unwrap();
        let file = StateFile::place(&dir, None).unwrap();
        std::os::unix::fs::symlink(&secret, file.path()).unwrap();
        assert!(matches!(collect(file, 100), Collected::Refused(_)));
        std::fs::remove_file(dir.join(FILE_NAME)).unwrap();

        let file = StateFile::place(&dir, None).unwrap();
        std::fs::hard_link(&secret, file.path()).unwrap();
        assert!(matches!(collect(file, 100), Collected::Refused(_)));
        std::fs::remove_file(dir.join(FILE_NAME)).unwrap();

        let file = StateFile::place(&dir, None).unwrap();
        std::fs::create_dir(file.path()).unwrap();
        assert!(matches!(collect(file, 100), Collected::Refused(_)));
        std::fs::remove_dir(dir.join(FILE_NAME)).unwrap();

        let file = StateFile::place(&dir, None).unwrap();
        let c = std::ffi::CString::new(file.path().as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a valid path string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(matches!(collect(file, 100), Collected::Refused(_)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
