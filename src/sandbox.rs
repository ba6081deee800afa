//! The sandbox of SPEC §12: a connector child learns nothing it was not
//! given.
//!
//! Each sandboxed child is started by bubblewrap (`bwrap`, the tool
//! Flatpak is built on) in new user, PID, mount, IPC, UTS and cgroup
//! namespaces, sharing only the network. Its file system is a fresh tmpfs
//! holding, read-only, the system directories (`/usr`, `/bin`, `/lib*`,
//! `/etc`, `/opt`), its own program, the paths its connector declares, and
//! writable, its run's private directory (`HOME` and `TMPDIR`) and a
//! private `/tmp`. The daemon's config file, key directory and
//! `$CREDENTIALS_DIRECTORY` are masked wherever a visible directory holds
//! them. Its `/proc` shows its own PID namespace only, so no other
//! process's environment, memory or signals are within reach, and the
//! first process of that namespace is our own init (`sandbox::init`), so
//! that nothing the connector started outlives it.
//!
//! The mechanism is chosen once, at start: [`SandboxState::start`] finds
//! `bwrap`, opens the daemon's own executable (bound inside as the init),
//! and runs a probe through the whole chain, so a machine that cannot
//! provide the sandbox says exactly why before any run is refused.

pub mod init;

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use libc::c_int;
use tokio::io::AsyncReadExt;

use crate::config::{Config, ConnectorConfig, SpawnMethod};
use crate::run::spawn::{self, CStrings};

/// Where the daemon's executable appears inside, as the init.
const INIT_INSIDE: &str = "/run/connectord/init";

/// Where the run's private directory appears inside; its `home` is the
/// child's `HOME`.
pub const RUN_DIR_INSIDE: &str = "/run/connector";

/// The child's `HOME` inside the sandbox.
pub const HOME_INSIDE: &str = "/run/connector/home";

/// The child's `TMPDIR` inside the sandbox: the run's `tmp`. `/tmp` itself
/// is a tmpfs of the sandbox's own, so programs that ignore `TMPDIR` stay
/// private too, and declared paths under the host's `/tmp` still show.
pub const TMP_INSIDE: &str = "/run/connector/tmp";

/// The user id a child of a daemon running as root has inside (it stays
/// root outside, without any capability there). Chromium refuses to start
/// its own sandbox as uid 0, and no program needs to believe it is root.
const ROOT_CHILD_ID: &str = "1000";

/// System directories every child sees, read-only, when the host has them.
const SYSTEM_DIRS: [&str; 9] = [
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt",
];

/// Paths under `/etc` that hold the daemon's or the host's own secrets. A
/// child of an unprivileged daemon cannot read the host's anyway; a child
/// of a daemon running as root is uid 0 outside, and would.
const HOST_SECRETS: [&str; 7] = [
    // The packaged daemon's own directory (config, keys), whatever the
    // config file in use says.
    "/etc/connectord",
    "/etc/shadow",
    "/etc/shadow-",
    "/etc/gshadow",
    "/etc/gshadow-",
    "/etc/ssl/private",
    "/etc/ssh",
];

/// How long the start-up probe may take before the sandbox is declared
/// unavailable.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the daemon can promise its children, decided at start.
pub enum SandboxState {
    Ready(Sandbox),
    /// The sandbox is enabled but this machine cannot provide it; the text
    /// names what is missing. Runs are refused (`sandbox_unavailable`).
    Unavailable(String),
    /// `[sandbox] enabled = false`: children run as the daemon's own
    /// account with its view of the machine.
    Disabled,
}

impl SandboxState {
    /// Finds and probes the mechanism when the config enables it; the
    /// sandbox's init is this very executable.
    pub async fn start(config: &Config) -> SandboxState {
        SandboxState::start_with_init(config, Path::new("/proc/self/exe")).await
    }

    /// As [`SandboxState::start`], with the init taken from `init`, a
    /// `connectord` binary (for a program that embeds the daemon's code).
    pub async fn start_with_init(config: &Config, init: &Path) -> SandboxState {
        if !config.sandbox.enabled {
            return SandboxState::Disabled;
        }
        match Sandbox::new(config, init) {
            Ok(sandbox) => match sandbox.probe(config.daemon.spawn).await {
                Ok(()) => SandboxState::Ready(sandbox),
                Err(reason) => SandboxState::Unavailable(reason),
            },
            Err(reason) => SandboxState::Unavailable(reason),
        }
    }

    pub fn ready(&self) -> Option<&Sandbox> {
        match self {
            SandboxState::Ready(sandbox) => Some(sandbox),
            _ => None,
        }
    }
}

/// A working bubblewrap and everything every run's command line shares.
pub struct Sandbox {
    bwrap: PathBuf,
    /// The daemon's own executable, open, so the init inside is the very
    /// binary that runs the daemon even after an upgrade replaced the file.
    init: OwnedFd,
    /// Arguments every run shares: namespaces, system directories, the
    /// global read-only paths.
    base: Vec<OsString>,
    /// Sources of the binds in `base`, for deciding which hidden paths
    /// need a mask.
    base_sources: Vec<PathBuf>,
    /// Host paths no child may see (canonical), with whether each is a
    /// directory.
    hidden: Vec<(PathBuf, bool)>,
}

/// The descriptors a sandboxed spawn hands to bubblewrap and its init.
pub struct Channels {
    /// The init's status reports (see [`init`]).
    pub status: OwnedFd,
    /// bubblewrap's `--info-fd` JSON, which names the init's pid.
    pub info: OwnedFd,
}

/// A command line ready for [`spawn::spawn`].
pub struct Launch {
    pub program: PathBuf,
    pub argv: CStrings,
    /// Write ends and the init's executable, kept open across `exec`.
    pub pass: Vec<c_int>,
    /// Our ends of the status and info pipes.
    pub channels: Channels,
    /// Their write ends, to close once the child holds them.
    pub write_ends: [OwnedFd; 2],
}

impl Sandbox {
    fn new(config: &Config, init: &Path) -> Result<Sandbox, String> {
        let bwrap = find_bwrap(config.sandbox.bwrap.as_deref())?;
        let init = open_path(init).map_err(|e| {
            format!(
                "cannot open the daemon's own executable ({}) to start it inside the sandbox: {e}",
                init.display()
            )
        })?;
        let mut base: Vec<OsString> = [
            "--unshare-all",
            "--share-net",
            "--die-with-parent",
            "--new-session",
            "--as-pid-1",
        ]
        .map(OsString::from)
        .to_vec();
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            for arg in [
                "--unshare-user",
                "--uid",
                ROOT_CHILD_ID,
                "--gid",
                ROOT_CHILD_ID,
            ] {
                base.push(arg.into());
            }
        }
        let mut base_sources = Vec::new();
        for dir in SYSTEM_DIRS {
            let path = Path::new(dir);
            match std::fs::symlink_metadata(path) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    let target = std::fs::read_link(path).map_err(|e| format!("{dir}: {e}"))?;
                    push_all(
                        &mut base,
                        ["--symlink".as_ref(), target.as_os_str(), path.as_os_str()],
                    );
                }
                Ok(meta) if meta.is_dir() => {
                    push_all(
                        &mut base,
                        ["--ro-bind".as_ref(), path.as_os_str(), path.as_os_str()],
                    );
                    base_sources.push(path.to_owned());
                }
                _ => {}
            }
        }
        // A resolver configuration that links out of /etc (systemd-resolved's
        // stub under /run) is bound where the link points.
        if let Ok(target) = std::fs::canonicalize("/etc/resolv.conf") {
            if !SYSTEM_DIRS.iter().any(|dir| target.starts_with(dir)) {
                push_all(
                    &mut base,
                    ["--ro-bind".as_ref(), target.as_os_str(), target.as_os_str()],
                );
            }
        }
        // Before every declared path, so that one under /tmp is mounted on
        // top of the private /tmp rather than hidden by it.
        for arg in [
            "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/dev/shm", "--tmpfs", "/tmp",
        ] {
            base.push(arg.into());
        }
        for path in &config.sandbox.read_only_paths {
            let path = canonical(path)
                .map_err(|e| format!("[sandbox] read_only_paths: {}: {e}", path.display()))?;
            push_all(
                &mut base,
                ["--ro-bind".as_ref(), path.as_os_str(), path.as_os_str()],
            );
            base_sources.push(path);
        }
        let mut hidden = Vec::new();
        let daemon_files = config
            .source
            .iter()
            .cloned()
            .chain([config.keys.resolved_dir()])
            .chain(std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from));
        for path in daemon_files.chain(HOST_SECRETS.iter().map(PathBuf::from)) {
            if let Ok(path) = std::fs::canonicalize(&path) {
                let is_dir = path.is_dir();
                hidden.push((path, is_dir));
            }
        }
        Ok(Sandbox {
            bwrap,
            init,
            base,
            base_sources,
            hidden,
        })
    }

    /// The whole chain once, with nothing to protect: bubblewrap with the
    /// base arguments, our init as PID 1, exiting at once; started as every
    /// run's child will be.
    async fn probe(&self, method: SpawnMethod) -> Result<(), String> {
        let mut argv: Vec<OsString> = vec![self.bwrap.clone().into()];
        argv.extend(self.base.iter().cloned());
        let init_fd = self.init.as_raw_fd().to_string();
        push_all(
            &mut argv,
            [
                "--ro-bind-fd".as_ref(),
                init_fd.as_ref(),
                INIT_INSIDE.as_ref(),
            ],
        );
        push_all(
            &mut argv,
            [
                "--".as_ref(),
                INIT_INSIDE.as_ref(),
                init::SUBCOMMAND.as_ref(),
                init::PROBE.as_ref(),
            ],
        );
        let argv = strings(&argv).map_err(|e| e.to_string())?;
        let env = CStrings::new::<[&[u8]; 1]>(&[]).map_err(|e| e.to_string())?;
        let describe = |detail: String| {
            format!(
                "{} could not start the sandbox on this machine ({detail}); the sandbox needs unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1, user.max_user_namespaces > 0) and PID and mount namespaces",
                self.bwrap.display()
            )
        };
        let mut spawned = spawn::spawn(&self.bwrap, &argv, &env, &[self.init.as_raw_fd()], method)
            .map_err(|e| describe(e.to_string()))?;
        let mut stderr = Vec::new();
        let waited = tokio::time::timeout(PROBE_TIMEOUT, async {
            let _ = (&mut spawned.stderr)
                .take(4096)
                .read_to_end(&mut stderr)
                .await;
            spawned.process.wait().await
        })
        .await;
        match waited {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => {
                let said = String::from_utf8_lossy(&stderr);
                let said = said.trim();
                Err(describe(if said.is_empty() {
                    format!("it exited with {status}")
                } else {
                    said.to_owned()
                }))
            }
            Ok(Err(e)) => Err(describe(e.to_string())),
            Err(_) => Err(describe(format!("no answer within {PROBE_TIMEOUT:?}"))),
        }
    }

    /// bubblewrap's command line for one run of `program` (found on the
    /// host, as the child's `PATH` finds it) with `argv`, its private
    /// directory `run_dir`.
    pub fn launch(
        &self,
        connector: &ConnectorConfig,
        run_dir: &Path,
        program: &Path,
        argv: &[&[u8]],
    ) -> io::Result<Launch> {
        let (status, status_w) = spawn::pipe_pair()?;
        let (info, info_w) = spawn::pipe_pair()?;
        let mut args: Vec<OsString> = Vec::with_capacity(self.base.len() + 32 + argv.len());
        args.push(self.bwrap.clone().into());
        args.extend(self.base.iter().cloned());
        let mut sources = Vec::new();
        for (flag, paths) in [
            ("--ro-bind", &connector.read_only_paths),
            ("--bind", &connector.read_write_paths),
        ] {
            for path in paths {
                let path = canonical(path).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("declared sandbox path {}: {e}", path.display()),
                    )
                })?;
                push_all(
                    &mut args,
                    [flag.as_ref(), path.as_os_str(), path.as_os_str()],
                );
                sources.push(path);
            }
        }
        // Its program, and a script its arguments name by absolute path
        // (`command = "python3"`, `args = ["/opt/chase/run.py"]`): what it
        // runs is part of its program.
        let program = canonical(program)?;
        let scripts = argv
            .iter()
            .skip(1)
            .map(|arg| Path::new(OsStr::from_bytes(arg)))
            .filter(|arg| arg.is_absolute() && arg.is_file())
            .filter_map(|arg| canonical(arg).ok());
        for file in std::iter::once(program.clone()).chain(scripts) {
            if !self.visible(&sources, &file) {
                push_all(
                    &mut args,
                    ["--ro-bind".as_ref(), file.as_os_str(), file.as_os_str()],
                );
                sources.push(file);
            }
        }
        // Masks go after every bind that could show what they hide.
        for (path, is_dir) in &self.hidden {
            if !self.visible(&sources, path) {
                continue;
            }
            if *is_dir {
                push_all(
                    &mut args,
                    [
                        "--tmpfs".as_ref(),
                        path.as_os_str(),
                        "--remount-ro".as_ref(),
                        path.as_os_str(),
                    ],
                );
            } else {
                push_all(
                    &mut args,
                    ["--ro-bind".as_ref(), "/dev/null".as_ref(), path.as_os_str()],
                );
            }
        }
        push_all(
            &mut args,
            [
                "--bind".as_ref(),
                run_dir.as_os_str(),
                RUN_DIR_INSIDE.as_ref(),
            ],
        );
        push_all(&mut args, ["--chdir".as_ref(), HOME_INSIDE.as_ref()]);
        let info_fd = info_w.as_raw_fd().to_string();
        let init_fd = self.init.as_raw_fd().to_string();
        let status_fd = status_w.as_raw_fd().to_string();
        push_all(&mut args, ["--info-fd".as_ref(), info_fd.as_ref()]);
        push_all(
            &mut args,
            [
                "--ro-bind-fd".as_ref(),
                init_fd.as_ref(),
                INIT_INSIDE.as_ref(),
            ],
        );
        // Last, once every mount point exists: nothing else is writable,
        // not even the sandbox's own root.
        push_all(&mut args, ["--remount-ro".as_ref(), "/".as_ref()]);
        push_all(
            &mut args,
            [
                "--".as_ref(),
                INIT_INSIDE.as_ref(),
                init::SUBCOMMAND.as_ref(),
                "--status-fd".as_ref(),
                status_fd.as_ref(),
                "--".as_ref(),
                program.as_os_str(),
            ],
        );
        args.extend(argv.iter().map(|a| OsStr::from_bytes(a).to_owned()));
        Ok(Launch {
            program: self.bwrap.clone(),
            argv: strings(&args)?,
            pass: vec![
                status_w.as_raw_fd(),
                info_w.as_raw_fd(),
                self.init.as_raw_fd(),
            ],
            channels: Channels { status, info },
            write_ends: [status_w, info_w],
        })
    }

    pub fn bwrap(&self) -> &Path {
        &self.bwrap
    }

    /// Whether `path` is inside something this run's sandbox shows: the
    /// base binds or the run's own `sources`.
    fn visible(&self, sources: &[PathBuf], path: &Path) -> bool {
        self.base_sources
            .iter()
            .chain(sources)
            .any(|source| path.starts_with(source))
    }
}

/// What the init reported, read from its status pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// The connector's `exec` succeeded.
    Started,
    /// The connector could not be executed inside the sandbox.
    ExecFailed(i32),
    /// The connector ended with this raw wait status.
    Ended(i32),
    /// Nothing (more): bubblewrap failed before the init ran, or the init
    /// was killed.
    Closed,
}

/// Reads the init's next report.
pub async fn next_report(status: &mut tokio::net::unix::pipe::Receiver) -> Report {
    let mut kind = [0u8; 1];
    if status.read_exact(&mut kind).await.is_err() {
        return Report::Closed;
    }
    if kind[0] == init::STARTED {
        return Report::Started;
    }
    let mut value = [0u8; 4];
    if status.read_exact(&mut value).await.is_err() {
        return Report::Closed;
    }
    let value = i32::from_ne_bytes(value);
    match kind[0] {
        init::EXEC_FAILED => Report::ExecFailed(value),
        init::ENDED => Report::Ended(value),
        _ => Report::Closed,
    }
}

/// The init's pid in the daemon's PID namespace, from bubblewrap's
/// `--info-fd` JSON (`{"child-pid": 1234, ...}`), which bubblewrap writes
/// before it lets the init run.
pub fn init_pid(info: &[u8]) -> Option<i32> {
    let value: serde_json::Value = serde_json::from_slice(info).ok()?;
    let pid = value.get("child-pid")?.as_i64()?;
    i32::try_from(pid).ok().filter(|pid| *pid > 0)
}

fn find_bwrap(configured: Option<&Path>) -> Result<PathBuf, String> {
    let program = configured.unwrap_or(Path::new("bwrap"));
    let path = std::env::var_os("PATH");
    spawn::find_program(program, path.as_deref())
        .ok()
        .filter(|found| found.is_file())
        .ok_or_else(|| match configured {
            Some(path) => format!(
                "bubblewrap ([sandbox] bwrap = {:?}) is not an executable file; install the bubblewrap package or fix the path",
                path.display()
            ),
            None => format!(
                "bubblewrap (bwrap) was not found on PATH ({}); install the bubblewrap package",
                path.as_deref().unwrap_or_default().to_string_lossy()
            ),
        })
}

/// A descriptor naming `path` (for `/proc/self/exe`, the running binary
/// itself, whatever has since replaced the file at its path).
fn open_path(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
        .open(path)?;
    Ok(OwnedFd::from(file))
}

/// A declared path as the kernel will bind it: absolute, links resolved,
/// and existing (a missing path is the operator's to fix, not something to
/// skip silently).
fn canonical(path: &Path) -> io::Result<PathBuf> {
    std::fs::canonicalize(path)
}

fn push_all<const N: usize>(args: &mut Vec<OsString>, items: [&OsStr; N]) {
    args.extend(items.into_iter().map(OsStr::to_owned));
}

fn strings(args: &[OsString]) -> io::Result<CStrings> {
    let entries: Vec<[&[u8]; 1]> = args.iter().map(|a| [a.as_bytes()]).collect();
    CStrings::new(&entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_pid_from_info() {
        let info = br#"{
    "child-pid": 4242,
    "cgroup-namespace": 4026532577,
    "ipc-namespace": 4026532575
}
"#;
        assert_eq!(init_pid(info), Some(4242));
        assert_eq!(init_pid(b""), None);
        assert_eq!(init_pid(br#"{"child-pid": -1}"#), None);
    }
}
