//! A private PostgreSQL cluster for development and tests.
//!
//! `connectord dev` and the test suites need a real PostgreSQL server, but we do not want
//! them to depend on a configured system service, a password or a fixed port. This module
//! needs nothing but PostgreSQL's server binaries (`initdb` and `pg_ctl`, e.g. Debian's
//! `postgresql-15`). It creates a disposable cluster under a directory chosen by the caller,
//! starts it on a free loopback port with durability switched off (the data is throwaway, so
//! speed wins), and leaves it running so that later processes (other test binaries, the next
//! `dev` run) reuse it instead of paying for `initdb` again.
//!
//! The server listens on loopback only, and every connection needs the superuser's password
//! (SCRAM): a loopback port is open to every local user, and `dev`'s cluster holds demo
//! credentials. The password is drawn at `initdb` and kept in a file only the cluster's owner
//! can read, so whoever can run the tests or `dev` of this checkout can connect, and nobody
//! else can.
//!
//! Layout of the base directory: `lock` (serialises concurrent callers), `port` (the TCP
//! port, as text), `password` (mode 0600), `data` (PGDATA) and `log` (the server log).
//!
//! PostgreSQL refuses to run as root, so when we are root the server runs as the `postgres`
//! OS user; [`cluster_dir`] explains where its files can then live.

use std::fs::{self, File, Permissions};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{chown, MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Settings applied on every start. Sockets are TCP-only so that no /var/run/postgresql is
/// needed, and durability is off because the cluster only holds development and test data.
const SERVER_SETTINGS: &str = "-c listen_addresses=127.0.0.1 -c unix_socket_directories='' \
    -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=400 \
    -c shared_buffers=128MB";

/// Why a private cluster could not be set up; every variant names the path or program.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("could not {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or under /usr/lib/postgresql/*/bin; install postgresql")]
    BinariesNotFound,
    #[error("running as root, but there is no `postgres` OS user to run the PostgreSQL server as (it refuses to run as root); install postgresql")]
    NoPostgresUser,
    #[error("{} failed: {detail}", program.display())]
    Command { program: PathBuf, detail: String },
    #[error("could not start PostgreSQL in {}: {reason}\n--- last lines of {} ---\n{tail}", data_dir.display(), log.display())]
    Start {
        data_dir: PathBuf,
        log: PathBuf,
        reason: String,
        tail: String,
    },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ClusterError {
    let path = path.to_path_buf();
    move |source| ClusterError::Io {
        action,
        path,
        source,
    }
}

/// A private cluster, running once [`Cluster::ensure_running`] has returned it.
#[derive(Clone)]
pub struct Cluster {
    pub base_dir: PathBuf,
    pub data_dir: PathBuf,
    pub port: u16,
    /// The superuser's password, hex; in [`Cluster::url`] and nowhere else.
    password: String,
    bin_dir: PathBuf,
    /// The (uid, gid) the server runs as when we are root; `None` means "as ourselves".
    run_as: Option<(u32, u32)>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("base_dir", &self.base_dir)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Initialise (if needed) and start (if not running) the cluster rooted at `base_dir`.
    ///
    /// Idempotent, and safe when several threads or processes call it at once: an exclusive
    /// lock on `base_dir/lock` is held while checking, initialising and starting. The server
    /// is started in its own session and outlives the calling process.
    pub fn ensure_running(base_dir: &Path) -> Result<Cluster, ClusterError> {
        fs::create_dir_all(base_dir).map_err(io_err("create", base_dir))?;
        let base_dir = fs::canonicalize(base_dir).map_err(io_err("resolve", base_dir))?;
        let meta = fs::metadata(&base_dir).map_err(io_err("inspect", &base_dir))?;
        // The directory may sit in a shared place such as /var/tmp, where another user could
        // have planted it; refuse to run a server out of someone else's directory.
        if meta.uid() != euid() {
            let foreign = io::Error::other("it is owned by another user");
            return Err(io_err("use", &base_dir)(foreign));
        }
        // The server user (postgres, when we are root) must be able to reach data/ and log.
        fs::set_permissions(&base_dir, Permissions::from_mode(0o755))
            .map_err(io_err("chmod", &base_dir))?;
        let lock_path = base_dir.join("lock");
        let lock = lock_exclusive(&lock_path)?;

        let run_as = match euid() {
            0 => Some(postgres_user().ok_or(ClusterError::NoPostgresUser)?),
            _ => None,
        };
        let mut cluster = Cluster {
            data_dir: base_dir.join("data"),
            base_dir,
            port: 0,
            password: String::new(),
            bin_dir: find_bin_dir()?,
            run_as,
        };
        let password_path = cluster.base_dir.join("password");
        match fs::read_to_string(&password_path) {
            Ok(password) if cluster.data_dir.join("PG_VERSION").is_file() => {
                cluster.password = password.trim().to_owned();
            }
            // No cluster, or one made without a password (which let every local user in):
            // a new one, with a new password. The data is throwaway by design.
            _ => {
                cluster.remove_zombie_pid_file()?;
                if cluster.data_dir.join("PG_VERSION").is_file() {
                    cluster.stop()?;
                }
                cluster.password = new_password(&password_path)?;
                cluster.initdb()?;
            }
        }
        let port_path = cluster.base_dir.join("port");
        cluster.port = match fs::read_to_string(&port_path).map(|s| s.trim().parse::<u16>()) {
            Ok(Ok(port)) => port,
            _ => pick_port(&port_path)?,
        };
        cluster.remove_zombie_pid_file()?;
        if cluster.status_ok() {
            if connectable(cluster.port, Duration::ZERO) {
                return Ok(cluster);
            }
            // A server that runs but does not answer on the recorded port (the port file was
            // lost, or the server is wedged) is restarted so that it matches our records.
            cluster.stop()?;
        }
        cluster.start()?;
        drop(lock);
        Ok(cluster)
    }

    /// URL for `database` as the superuser `connectord`, with its password, over TCP on
    /// 127.0.0.1. `database` is used verbatim, so it should be a plain identifier.
    pub fn url(&self, database: &str) -> String {
        let (password, port) = (&self.password, self.port);
        format!("postgres://connectord:{password}@127.0.0.1:{port}/{database}")
    }

    /// Stops the cluster rooted at `base_dir`, if there is one there; returns whether there
    /// was. Its data stays for the next [`Cluster::ensure_running`].
    pub fn stop_at(base_dir: &Path) -> Result<bool, ClusterError> {
        let data_dir = base_dir.join("data");
        if !data_dir.join("PG_VERSION").is_file() {
            return Ok(false);
        }
        let run_as = match euid() {
            0 => Some(postgres_user().ok_or(ClusterError::NoPostgresUser)?),
            _ => None,
        };
        let cluster = Cluster {
            base_dir: base_dir.to_path_buf(),
            data_dir,
            port: 0,
            password: String::new(),
            bin_dir: find_bin_dir()?,
            run_as,
        };
        let _lock = lock_exclusive(&base_dir.join("lock"))?;
        cluster.stop()?;
        Ok(true)
    }

    /// Stops the server with `pg_ctl stop -m fast`; stopping a stopped server is not an error.
    pub fn stop(&self) -> Result<(), ClusterError> {
        self.remove_zombie_pid_file()?;
        if !self.status_ok() {
            return Ok(());
        }
        let mut cmd = self.pg_ctl();
        cmd.args(["stop", "-m", "fast", "-w"]);
        run(&mut cmd, &self.bin_dir.join("pg_ctl")).map(drop)
    }

    /// Runs a PostgreSQL program as the server user, from a directory that user can enter
    /// (initdb and pg_ctl fail when they cannot, e.g. when the caller sits in /root).
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin_dir.join(program));
        cmd.current_dir(&self.base_dir).stdin(Stdio::null());
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid).env("HOME", &self.base_dir);
        }
        cmd
    }

    fn pg_ctl(&self) -> Command {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D").arg(&self.data_dir);
        cmd
    }

    fn status_ok(&self) -> bool {
        let (mut cmd, null) = (self.pg_ctl(), Stdio::null);
        cmd.arg("status").stdout(null()).stderr(null());
        cmd.status().is_ok_and(|s| s.success())
    }

    /// Removes postmaster.pid if it names a zombie. Where PID 1 does not reap orphans (e.g.
    /// containers without an init), a crashed postmaster lingers as a zombie that pg_ctl and
    /// postgres both take for a live server, so neither stop nor start would get anywhere.
    fn remove_zombie_pid_file(&self) -> Result<(), ClusterError> {
        let pid_file = self.data_dir.join("postmaster.pid");
        let pid = fs::read_to_string(&pid_file).unwrap_or_default();
        let pid = pid.lines().next().unwrap_or_default().trim().to_owned();
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // The state letter follows the command name, which is in parentheses.
        let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
        match state.is_some_and(|rest| rest.starts_with('Z')) {
            true => fs::remove_file(&pid_file).map_err(io_err("remove", &pid_file)),
            false => Ok(()),
        }
    }

    fn chown_to_server_user(&self, path: &Path) -> Result<(), ClusterError> {
        match self.run_as {
            Some((uid, gid)) => chown(path, Some(uid), Some(gid)).map_err(io_err("chown", path)),
            None => Ok(()),
        }
    }

    /// Initialises into a scratch directory that is renamed into place only when complete, so
    /// a crash part-way through leaves nothing that looks like a cluster.
    fn initdb(&self) -> Result<(), ClusterError> {
        let tmp = self.base_dir.join("data.initdb");
        // We hold the lock, so leftovers are from a crashed attempt; `data` without
        // PG_VERSION is not a cluster either and would block the rename.
        for dir in [&tmp, &self.data_dir] {
            if dir.exists() {
                fs::remove_dir_all(dir).map_err(io_err("remove", dir))?;
            }
        }
        // The server user cannot create directories in a root-owned base_dir, so we do.
        fs::create_dir(&tmp).map_err(io_err("create", &tmp))?;
        self.chown_to_server_user(&tmp)?;
        // initdb reads the password from a file, which the server user must be able to read:
        // a copy beside the scratch directory, readable by that user alone, removed after.
        let pwfile = self.base_dir.join("password.initdb");
        write_private(&pwfile, &self.password)?;
        self.chown_to_server_user(&pwfile)?;
        let mut cmd = self.command("initdb");
        let flags = "-U connectord --auth=scram-sha-256 --encoding=UTF8 --no-locale --no-sync";
        cmd.arg("-D").arg(&tmp).args(flags.split(' '));
        cmd.arg(format!("--pwfile={}", pwfile.display()));
        let initdb = run(&mut cmd, &self.bin_dir.join("initdb"));
        fs::remove_file(&pwfile).map_err(io_err("remove", &pwfile))?;
        initdb?;
        fs::rename(&tmp, &self.data_dir).map_err(io_err("rename into place", &tmp))
    }

    /// Starts the server, moving to a fresh port (a few times) if ours has been taken.
    fn start(&mut self) -> Result<(), ClusterError> {
        let log = self.base_dir.join("log");
        // Creating the log ourselves lets us hand it to the server user, who cannot create
        // files in a root-owned base_dir.
        let created = File::options().create(true).append(true).open(&log);
        created.map_err(io_err("create", &log))?;
        self.chown_to_server_user(&self.data_dir)?;
        self.chown_to_server_user(&log)?;
        let pg_ctl = self.bin_dir.join("pg_ctl");
        for attempt in 1.. {
            let log_offset = fs::metadata(&log).map_or(0, |m| m.len() as usize);
            let mut cmd = self.pg_ctl();
            cmd.args(["start", "-w", "-l"]).arg(&log).arg("-o");
            cmd.arg(format!("-p {} {SERVER_SETTINGS}", self.port));
            // SAFETY: setsid is async-signal-safe and touches no memory shared with the parent.
            // A new session keeps the postmaster out of our process group, so Ctrl-C in the
            // terminal running `dev` (or signals aimed at a test) do not reach the server.
            unsafe {
                cmd.pre_exec(|| match libc::setsid() {
                    -1 => Err(io::Error::last_os_error()),
                    _ => Ok(()),
                });
            }
            let out = cmd.output().map_err(io_err("run", &pg_ctl))?;
            if out.status.success() && connectable(self.port, Duration::from_secs(10)) {
                return Ok(());
            }
            let log_text = fs::read(&log).unwrap_or_default();
            let new_text = String::from_utf8_lossy(log_text.get(log_offset..).unwrap_or(&[]));
            let port_taken = new_text.contains("Address already in use")
                || (!out.status.success() && connectable(self.port, Duration::ZERO));
            if !port_taken || attempt == 3 {
                let reason = match out.status.success() {
                    true => format!("nothing accepts connections on port {}", self.port),
                    false => format!("pg_ctl start {}: {}", out.status, describe(&out)),
                };
                return Err(ClusterError::Start {
                    data_dir: self.data_dir.clone(),
                    log: log.clone(),
                    reason,
                    tail: tail(&log, 20),
                });
            }
            self.port = pick_port(&self.base_dir.join("port"))?;
        }
        unreachable!("the loop above only exits by returning")
    }
}

/// Where a private cluster for `preferred` (e.g. `<project>/target/connectord-dev`) can live.
///
/// Normally that is `preferred` itself. When we run as root, however, the server has to run
/// as the `postgres` OS user (initdb refuses to run as root), and that user cannot reach
/// anything below a directory it may not traverse, such as /root (mode 0700). So when an
/// existing ancestor of `preferred` lacks the execute bit for `postgres`, the cluster lives
/// in `/var/tmp/connectord-<name>-<hash>` instead: `<name>` is the last component of
/// `preferred` (without a leading `connectord-`, so `connectord-dev` gives `dev`) and
/// `<hash>` is the 64-bit FNV-1a hash of the absolute `preferred` path as 16 hex digits, so
/// that each checkout gets its own cluster. /var/tmp survives reboots, like `target/` would.
pub fn cluster_dir(preferred: &Path) -> PathBuf {
    let preferred = std::path::absolute(preferred).unwrap_or_else(|_| preferred.to_path_buf());
    // Without a postgres user ensure_running reports a clear error, so keep the path as is.
    let server_user = if euid() == 0 { postgres_user() } else { None };
    let Some((uid, gid)) = server_user else {
        return preferred;
    };
    if blocking_ancestor(&preferred, uid, gid).is_none() {
        return preferred;
    }
    let name = preferred.file_name().unwrap_or_default().to_string_lossy();
    let name = name.strip_prefix("connectord-").unwrap_or(&name);
    let name = name.replace(
        |c: char| !c.is_ascii_alphanumeric() && !"-_".contains(c),
        "_",
    );
    let hash = crate::schedule::cron::fnv1a_64(preferred.as_os_str().as_bytes());
    PathBuf::from(format!("/var/tmp/connectord-{name}-{hash:016x}"))
}

/// The first existing ancestor of `path` that user `uid` (primary group `gid`) cannot
/// traverse. Missing ancestors are fine: `create_dir_all` makes them 0755 under a normal umask.
fn blocking_ancestor(path: &Path, uid: u32, gid: u32) -> Option<PathBuf> {
    let blocks = |dir: &Path| {
        fs::metadata(dir).is_ok_and(|m| {
            let bit = match (m.uid() == uid, m.gid() == gid) {
                (true, _) => 0o100,
                (false, true) => 0o010,
                (false, false) => 0o001,
            };
            m.mode() & bit == 0
        })
    };
    let mut ancestors = path.ancestors().skip(1);
    ancestors.find(|d| blocks(d)).map(Path::to_path_buf)
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The uid and gid of the `postgres` OS user, via the re-entrant getpwnam_r because tests
/// call this from several threads at once.
fn postgres_user() -> Option<(u32, u32)> {
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: passwd is plain data for which all-zeroes is valid; getpwnam_r writes only into
    // `pwd`, `result` and the first `buf.len()` bytes of `buf`, all of which outlive the call.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut result = std::ptr::null_mut();
        let name = c"postgres".as_ptr();
        let rc = libc::getpwnam_r(name, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result);
        (rc == 0 && !result.is_null()).then_some((pwd.pw_uid, pwd.pw_gid))
    }
}

/// Finds a directory holding both initdb and pg_ctl: PATH first, then the highest version
/// under /usr/lib/postgresql, where Debian installs them without putting them on PATH.
fn find_bin_dir() -> Result<PathBuf, ClusterError> {
    let executable =
        |p: PathBuf| fs::metadata(p).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0);
    let has_both = |dir: &Path| ["initdb", "pg_ctl"].iter().all(|p| executable(dir.join(p)));
    let path = std::env::var_os("PATH").unwrap_or_default();
    if let Some(dir) = std::env::split_paths(&path).find(|d| has_both(d)) {
        return Ok(dir);
    }
    let entries = fs::read_dir("/usr/lib/postgresql").into_iter().flatten();
    let entries = entries.flatten();
    let versioned = entries.filter_map(|e| {
        let name = e.file_name();
        let version = name.to_str()?.split('.').map(|s| s.parse().ok());
        Some((version.collect::<Option<Vec<u32>>>()?, e.path().join("bin")))
    });
    let best = versioned.filter(|(_, bin)| has_both(bin)).max();
    best.map(|(_, bin)| bin)
        .ok_or(ClusterError::BinariesNotFound)
}

/// Opens `path` and takes an exclusive flock on it, held until the returned file is closed.
/// (std's `File::lock` does the same but needs Rust 1.89, above the crate's declared minimum.)
fn lock_exclusive(path: &Path) -> Result<File, ClusterError> {
    let file = File::options().create(true).append(true).open(path);
    let file = file.map_err(io_err("open", path))?;
    loop {
        // SAFETY: the descriptor stays valid for as long as `file` lives.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return Ok(file);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(io_err("lock", path)(err));
        }
    }
}

/// Draws a new superuser password and records it, readable by us alone.
fn new_password(path: &Path) -> Result<String, ClusterError> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 24];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| io_err("draw a password for", path)(io::Error::other("no randomness")))?;
    let password: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    write_private(path, &format!("{password}\n"))?;
    Ok(password)
}

/// Writes `text` to a new file of mode 0600, replacing any old one (whose
/// mode a rewrite in place would keep).
pub fn write_private(path: &Path, text: &str) -> Result<(), ClusterError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err("remove", path)(e)),
        _ => {}
    }
    let mut file = File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err("create", path))?;
    file.write_all(text.as_bytes())
        .map_err(io_err("write", path))
}

/// Asks the kernel for a free loopback port and records it. Someone else may grab it before
/// the server binds it, which `Cluster::start` handles by retrying.
fn pick_port(port_path: &Path) -> Result<u16, ClusterError> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let listener = TcpListener::bind(addr).map_err(io_err("bind a port for", port_path))?;
    let port = (listener.local_addr())
        .map_err(io_err("bind a port for", port_path))?
        .port();
    fs::write(port_path, format!("{port}\n")).map_err(io_err("write", port_path))?;
    Ok(port)
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`, trying until `patience`
/// has passed (pg_ctl -w already waited for readiness, so this is only a final check).
fn connectable(port: u16, patience: Duration) -> bool {
    let (addr, deadline) = (
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        Instant::now() + patience,
    );
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok() {
            return true;
        } else if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn run(cmd: &mut Command, program: &Path) -> Result<Output, ClusterError> {
    let out = cmd.output().map_err(io_err("run", program))?;
    match out.status.success() {
        true => Ok(out),
        false => Err(ClusterError::Command {
            program: program.to_path_buf(),
            detail: format!("{}: {}", out.status, describe(&out)),
        }),
    }
}

fn describe(out: &Output) -> String {
    let text = [&out.stderr, &out.stdout].map(|b| String::from_utf8_lossy(b).trim().to_owned());
    text.join("\n").trim().to_owned()
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned());
    let text = text.unwrap_or_else(|e| format!("(could not read the log: {e})"));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pgcluster-{name}-{}", std::process::id()));
        // A leftover from an earlier run with the same pid is stale; ignore "not found".
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create scratch dir");
        dir
    }

    #[test]
    fn blocking_ancestor_finds_untraversable_dirs() {
        let root = scratch("modes");
        let (closed, open) = (root.join("closed"), root.join("open"));
        for (dir, mode) in [(&closed, 0o700), (&open, 0o711)] {
            fs::create_dir_all(dir.join("inner")).expect("create dir");
            fs::set_permissions(dir, Permissions::from_mode(mode)).expect("chmod");
        }
        // 65534 is conventionally `nobody`, which owns neither directory.
        let nobody = (65534, 65534);
        let blocked = blocking_ancestor(&closed.join("inner/x"), nobody.0, nobody.1);
        assert_eq!(blocked, Some(closed.clone()));
        assert_eq!(
            blocking_ancestor(&open.join("inner/x"), nobody.0, nobody.1),
            None
        );
        let owner = fs::metadata(&closed).expect("stat").uid();
        assert_eq!(
            blocking_ancestor(&closed.join("inner/x"), owner, nobody.1),
            None
        );
        fs::remove_dir_all(&root).expect("clean up");
    }

    #[test]
    fn zombie_pid_files_are_removed() {
        let base = scratch("zombie");
        let data_dir = base.join("data");
        fs::create_dir(&data_dir).expect("create data dir");
        let cluster = Cluster {
            base_dir: base.clone(),
            data_dir: data_dir.clone(),
            port: 0,
            password: String::new(),
            bin_dir: PathBuf::new(),
            run_as: None,
        };
        // A child that exits while we hold its handle without waiting stays a zombie.
        let mut child = Command::new("true").spawn().expect("spawn true");
        std::thread::sleep(Duration::from_millis(300));
        let pid_file = data_dir.join("postmaster.pid");
        fs::write(
            &pid_file,
            format!("{}\n{}\n", std::process::id(), data_dir.display()),
        )
        .expect("write pid file");
        cluster.remove_zombie_pid_file().expect("check live pid");
        assert!(pid_file.exists(), "removed the pid file of a live process");
        fs::write(&pid_file, format!("{}\n", child.id())).expect("write pid file");
        cluster
            .remove_zombie_pid_file()
            .expect("remove zombie pid file");
        assert!(!pid_file.exists(), "kept the pid file of a zombie");
        child.wait().expect("reap child");
        fs::remove_dir_all(&base).expect("clean up");
    }

    #[test]
    fn cluster_dir_falls_back_only_when_needed() {
        let reachable = Path::new("/tmp/some/where/connectord-dev");
        assert_eq!(cluster_dir(reachable), reachable);
        let under_root = Path::new("/root/project/target/connectord-dev");
        let root_closed = fs::metadata("/root").is_ok_and(|m| m.mode() & 0o001 == 0);
        if euid() == 0 && postgres_user().is_some() && root_closed {
            let dir = cluster_dir(under_root);
            let name = dir
                .file_name()
                .expect("name")
                .to_string_lossy()
                .into_owned();
            assert!(dir.starts_with("/var/tmp"), "{}", dir.display());
            assert!(
                name.starts_with("connectord-dev-") && name.len() == 31,
                "{name}"
            );
            assert_eq!(cluster_dir(under_root), dir, "stable for one checkout");
            let other = cluster_dir(Path::new("/root/other/target/connectord-dev"));
            assert_ne!(other, dir, "distinct per checkout");
        } else {
            assert_eq!(cluster_dir(under_root), under_root);
        }
    }

    #[test]
    fn ensure_running_is_shared_idempotent_and_stoppable() {
        let base = scratch("cluster");
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let base = base.clone();
                std::thread::spawn(move || Cluster::ensure_running(&base))
            })
            .collect();
        let clusters: Vec<Cluster> = (threads.into_iter())
            .map(|t| t.join().expect("thread panicked").expect("ensure_running"))
            .collect();
        assert!(clusters.iter().all(|c| c.port == clusters[0].port));
        let again = Cluster::ensure_running(&base).expect("ensure_running again");
        assert_eq!(again.port, clusters[0].port);
        let psql = Command::new("psql")
            .arg(again.url("postgres"))
            .args(["-XAtc", "select 1"])
            .output()
            .expect("run psql");
        assert_eq!(
            String::from_utf8_lossy(&psql.stdout).trim(),
            "1",
            "{}",
            describe(&psql)
        );
        // Another local user knows the port but not the password.
        let without = format!("postgres://connectord@127.0.0.1:{}/postgres", again.port);
        let refused = Command::new("psql")
            .arg(&without)
            .args(["-wXAtc", "select 1"])
            .env("PGPASSFILE", "/dev/null")
            .env_remove("PGPASSWORD")
            .output()
            .expect("run psql");
        assert!(!refused.status.success(), "connected without the password");
        assert!(
            describe(&refused).contains("password"),
            "{}",
            describe(&refused)
        );
        let mode = fs::metadata(base.join("password"))
            .expect("password file")
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(Cluster::stop_at(&base).expect("stop"));
        assert!(
            !connectable(again.port, Duration::ZERO),
            "server still accepts connections"
        );
        again.stop().expect("stopping a stopped cluster");
        assert!(!Cluster::stop_at(&base.join("data")).expect("no cluster there"));
        // A cluster without a password file (as made before clusters had
        // passwords) is made anew, with a new password.
        fs::remove_file(base.join("password")).expect("remove password");
        let renewed = Cluster::ensure_running(&base).expect("ensure_running anew");
        assert_ne!(renewed.url("postgres"), again.url("postgres"));
        renewed.stop().expect("stop");
        fs::remove_dir_all(&base).expect("clean up");
    }
}
