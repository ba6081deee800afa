//! Each run's private directory: the state file of every child, and the
//! `HOME` and `TMPDIR` of a sandboxed one, created empty before the spawn
//! and removed once the run has ended.
//!
//! Every run directory lives under one root the daemon creates at start,
//! mode 0700, with a name no one else can have taken first: under
//! `$RUNTIME_DIRECTORY` when systemd provides one (which it removes when
//! the service stops, whatever the way), else under the temporary
//! directory. A root left by a daemon that was killed is removed by the
//! next daemon to start there.

use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

/// The prefix of every root's name, followed by the daemon's pid.
const ROOT_PREFIX: &str = "connectord-runs-";

/// The directory holding this daemon's run directories.
#[derive(Debug)]
pub struct RunDirs {
    root: PathBuf,
}

impl RunDirs {
    /// Creates this daemon's root, after removing roots whose daemons are
    /// gone.
    pub fn create() -> io::Result<RunDirs> {
        let base = match std::env::var_os("RUNTIME_DIRECTORY") {
            // systemd may list several, separated by colons; the first is ours.
            Some(dirs) if !dirs.is_empty() => std::env::split_paths(&dirs)
                .next()
                .unwrap_or_else(std::env::temp_dir),
            _ => std::env::temp_dir(),
        };
        remove_abandoned(&base);
        let pid = std::process::id();
        for attempt in 0..100u32 {
            let root = base.join(format!("{ROOT_PREFIX}{pid}-{}", random_suffix(attempt)));
            match std::fs::DirBuilder::new().mode(0o700).create(&root) {
                Ok(()) => return Ok(RunDirs { root }),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!(
                            "cannot create the run directory root {}: {e}",
                            root.display()
                        ),
                    ))
                }
            }
        }
        Err(io::Error::other(format!(
            "cannot create a run directory root in {}",
            base.display()
        )))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A fresh, empty directory for run `run_id`, with `home` and `tmp`
    /// when the child is sandboxed (an unsandboxed one keeps the host's).
    pub fn create_run(&self, run_id: i64, sandboxed: bool) -> io::Result<RunDir> {
        let path = self.root.join(run_id.to_string());
        // A directory left by an earlier attempt at the same run id (a
        // daemon killed mid-run never reuses ids, but be certain) must not
        // hand its files to this run.
        if path.exists() {
            std::fs::remove_dir_all(&path)?;
        }
        let mut builder = std::fs::DirBuilder::new();
        builder.mode(0o700);
        builder.create(&path)?;
        let dir = RunDir { path };
        if sandboxed {
            builder.create(dir.home())?;
            builder.create(dir.tmp())?;
        }
        Ok(dir)
    }
}

impl Drop for RunDirs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// One run's private directory; removed by [`RunDir::remove`].
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn home(&self) -> PathBuf {
        self.path.join("home")
    }

    pub fn tmp(&self) -> PathBuf {
        self.path.join("tmp")
    }

    /// Removes the directory and everything the run left in it, off the
    /// runtime's threads (a browser profile can be large).
    pub async fn remove(self) {
        let path = self.path.clone();
        let removed = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&path)).await;
        match removed {
            Ok(Ok(())) => {}
            Ok(Err(e)) if e.kind() == io::ErrorKind::NotFound => {}
            Ok(Err(e)) => {
                tracing::warn!(dir = %self.path.display(), error = %e, "cannot remove the run's private directory")
            }
            Err(e) => tracing::warn!(error = %e, "removing the run's private directory failed"),
        }
    }
}

/// Removes roots in `base` whose daemon (the pid in the name) is gone and
/// that we own.
fn remove_abandoned(base: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(ROOT_PREFIX)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let path = entry.path();
        let ours = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir() && m.uid() == uid);
        if ours && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

fn random_suffix(attempt: u32) -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 6];
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        return format!("{attempt}");
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_directories_are_private_fresh_and_removed() {
        use std::os::unix::fs::PermissionsExt;
        let dirs = RunDirs::create().unwrap();
        let mode = std::fs::metadata(dirs.root()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let run = dirs.create_run(7, true).unwrap();
        std::fs::write(run.home().join("cookie"), "x").unwrap();
        drop(run);
        // The same id again starts empty.
        let run = dirs.create_run(7, true).unwrap();
        assert!(std::fs::read_dir(run.home()).unwrap().next().is_none());
        let path = run.path().to_owned();
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(run.remove());
        assert!(!path.exists());
        let root = dirs.root().to_owned();
        drop(dirs);
        assert!(!root.exists());
    }
}
