//! Starting a connector process without copying the daemon.
//!
//! The child must get `PR_SET_PDEATHSIG` between process creation and
//! `exec`, so that it dies with the daemon even when the daemon is killed
//! with SIGKILL. The standard library can only run such a hook after `fork`,
//! and `fork` copies the daemon's page tables: measured, it was the largest
//! cost of a run and grew with the daemon's memory (docs/PERFORMANCE.md,
//! design decision 1, has the figures).
//! So we do what glibc's `posix_spawn` does, plus the one `prctl`: the child
//! is created with `clone(CLONE_VM | CLONE_VFORK)`, runs on a stack of its
//! own in our address space while the calling thread is suspended, and
//! either `exec`s or reports its errno through shared memory and exits.
//!
//! Everything the child touches is prepared before `clone`: it allocates
//! nothing, takes no lock and calls only async-signal-safe functions. Every
//! signal is blocked across the `clone` and the child resets caught signals
//! to their defaults before unblocking, so none of the daemon's handlers can
//! run on the shared memory; it then starts with an empty signal mask and
//! SIGPIPE at its default, as the standard library's children do.
//!
//! `[daemon] spawn = "command"` starts the same child through
//! `std::process::Command` instead (`fork`, the `prctl` in a `pre_exec`
//! hook, `exec`), as a fallback where that `clone` is refused. Both give
//! the child the same argv, environment block, descriptors, process group,
//! signal state and parent-death signal, and both hand back a [`Process`],
//! so supervision does not know which one ran.
//!
//! The process is awaited through a pidfd (Linux 5.3) or, where there is
//! none, SIGCHLD followed by a `waitpid` of this one pid.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicI32, Ordering};

use libc::{c_char, c_int, c_void};
use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;
use zeroize::Zeroizing;

use crate::config::SpawnMethod;

/// The child's stack. Its code is a few frames of syscall wrappers.
const CHILD_STACK: usize = 64 * 1024;

/// The shell a script without `#!` runs under, as with `execvp`.
const SHELL: &std::ffi::CStr = c"/bin/sh";

/// glibc's `execvp` default when the environment has no `PATH`.
const DEFAULT_PATH: &str = "/bin:/usr/bin";

/// NUL-terminated strings in one buffer that is zeroed when dropped: an
/// environment block carries the credential. The buffer is sized once, so
/// no reallocation leaves a copy behind.
pub struct CStrings {
    buf: Zeroizing<Vec<u8>>,
    starts: Vec<usize>,
}

impl CStrings {
    /// One string per entry, each the concatenation of its parts. A NUL
    /// inside a part is an error, as it would silently cut the string.
    pub fn new<'a, E: AsRef<[&'a [u8]]>>(entries: &[E]) -> io::Result<CStrings> {
        let size = entries
            .iter()
            .map(|parts| parts.as_ref().iter().map(|p| p.len()).sum::<usize>() + 1)
            .sum();
        let mut buf = Zeroizing::new(Vec::with_capacity(size));
        let mut starts = Vec::with_capacity(entries.len());
        for parts in entries {
            let parts = parts.as_ref();
            if parts.iter().any(|p| p.contains(&0)) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a program argument or environment variable contains a NUL byte",
                ));
            }
            starts.push(buf.len());
            for part in parts {
                buf.extend_from_slice(part);
            }
            buf.push(0);
        }
        Ok(CStrings { buf, starts })
    }

    /// The `NULL`-terminated pointer array `execve` takes; valid while
    /// `self` is neither moved nor dropped.
    fn pointers(&self) -> Vec<*const c_char> {
        let base = self.buf.as_ptr();
        self.starts
            .iter()
            // SAFETY: every start is an offset inside `buf`.
            .map(|&start| unsafe { base.add(start) }.cast::<c_char>())
            .chain(std::iter::once(std::ptr::null()))
            .collect()
    }

    /// The strings, without their NULs.
    fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let ends = self.starts.iter().skip(1).copied().chain([self.buf.len()]);
        self.starts
            .iter()
            .zip(ends)
            .map(|(&start, end)| &self.buf[start..end - 1])
    }
}

/// Finds the file `execvp` would run: `program` itself when it names a
/// path, else the first executable match in `path` (the child's `PATH`).
pub fn find_program(program: &Path, path: Option<&OsStr>) -> io::Result<PathBuf> {
    if program.as_os_str().as_bytes().contains(&b'/') {
        return Ok(program.to_owned());
    }
    let dirs = path.unwrap_or(OsStr::new(DEFAULT_PATH));
    let mut denied = false;
    for dir in std::env::split_paths(dirs) {
        // An empty entry means the current directory, as for `execvp`.
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        let candidate = dir.join(program);
        let Ok(c) = CString::new(candidate.as_os_str().as_bytes()) else {
            continue;
        };
        // SAFETY: `c` is a valid NUL-terminated string.
        if unsafe { libc::access(c.as_ptr(), libc::X_OK) } == 0 {
            if candidate.is_file() {
                return Ok(candidate);
            }
        } else if io::Error::last_os_error().raw_os_error() == Some(libc::EACCES) {
            denied = true;
        }
    }
    Err(if denied {
        io::Error::from_raw_os_error(libc::EACCES)
    } else {
        io::Error::from_raw_os_error(libc::ENOENT)
    })
}

/// A started process with its output pipes.
pub struct Spawned {
    pub process: Process,
    /// The child's stdin: it sees end of input once this is dropped.
    pub stdin: pipe::Sender,
    pub stdout: pipe::Receiver,
    pub stderr: pipe::Receiver,
}

/// A child process we must reap; dropping it unreaped kills it.
pub struct Process {
    pid: libc::pid_t,
    /// `None` only while `spawn` is setting it up.
    waiter: Option<Waiter>,
    reaped: bool,
}

enum Waiter {
    Pidfd(AsyncFd<OwnedFd>),
    Sigchld(tokio::signal::unix::Signal),
}

/// What the child reads before `exec`; it lives on the parent's stack,
/// which the child shares.
struct ChildArgs {
    path: *const c_char,
    argv: *const *const c_char,
    /// `/bin/sh path argv[1..]`, for a file `execve` refuses with ENOEXEC
    /// (a script without `#!`), as `execvp` does.
    sh_argv: *const *const c_char,
    envp: *const *const c_char,
    stdin: c_int,
    stdout: c_int,
    stderr: c_int,
    /// Descriptors to keep open across `exec` (our pipes are close-on-exec).
    pass: *const c_int,
    pass_len: usize,
    parent: libc::pid_t,
    last_signal: c_int,
    /// The errno of the step that failed; 0 when `exec` succeeded.
    error: AtomicI32,
}

/// Starts `program` with exactly `argv` and `env`, in a process group of
/// its own, with stdin, stdout and stderr piped to us; the
/// descriptors in `pass` (all above 2) stay open in it. Must be called
/// from a thread that lives as long as the daemon (a runtime worker): the
/// death signal fires when the creating thread ends.
pub fn spawn(
    program: &Path,
    argv: &CStrings,
    env: &CStrings,
    pass: &[c_int],
    method: SpawnMethod,
) -> io::Result<Spawned> {
    if pass.iter().any(|fd| *fd <= 2) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a descriptor passed to a child must be above 2",
        ));
    }
    match method {
        SpawnMethod::Vfork => spawn_vfork(program, argv, env, pass),
        SpawnMethod::Command => spawn_command(program, argv, env, pass),
    }
}

/// [`spawn`] through `clone(CLONE_VM | CLONE_VFORK)`.
fn spawn_vfork(
    program: &Path,
    argv: &CStrings,
    env: &CStrings,
    pass: &[c_int],
) -> io::Result<Spawned> {
    let path = CString::new(program.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let argv_ptrs = argv.pointers();
    let sh_argv: Vec<*const c_char> = [SHELL.as_ptr(), path.as_ptr()]
        .into_iter()
        .chain(argv_ptrs.iter().skip(1).copied())
        .collect();
    let envp_ptrs = env.pointers();
    let (stdin, in_w) = pipe_pair()?;
    let (out_r, out_w) = pipe_pair()?;
    let (err_r, err_w) = pipe_pair()?;
    let args = ChildArgs {
        path: path.as_ptr(),
        argv: argv_ptrs.as_ptr(),
        sh_argv: sh_argv.as_ptr(),
        envp: envp_ptrs.as_ptr(),
        stdin: stdin.as_raw_fd(),
        stdout: out_w.as_raw_fd(),
        stderr: err_w.as_raw_fd(),
        pass: pass.as_ptr(),
        pass_len: pass.len(),
        parent: std::process::id() as libc::pid_t,
        last_signal: libc::SIGRTMAX(),
        error: AtomicI32::new(0),
    };
    let mut stack: Vec<u8> = Vec::with_capacity(CHILD_STACK);
    // SAFETY: the stack grows down from its 16-byte aligned top, inside the
    // allocation; `clone` with CLONE_VFORK returns only after the child has
    // exec'd or exited, so `args`, the strings and the stack outlive its use
    // of them. Signals are blocked across the call (see the module comment).
    let (pid, clone_error) = unsafe {
        let top = stack.as_mut_ptr().add(CHILD_STACK);
        let top = top.sub(top as usize % 16);
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let pid = libc::clone(
            child_main,
            top.cast::<c_void>(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            std::ptr::addr_of!(args) as *mut c_void,
        );
        let clone_error = io::Error::last_os_error();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        (pid, clone_error)
    };
    drop(stack);
    if pid < 0 {
        return Err(clone_error);
    }
    let error = args.error.load(Ordering::Acquire);
    if error != 0 {
        // The child has exited (or is exiting) without exec; reap it.
        let _ = waitpid(pid, 0);
        return Err(io::Error::from_raw_os_error(error));
    }
    // The child's exec woke us, and when the two share a CPU the scheduler
    // tends to run us first: the child then waits out our bookkeeping (its
    // pipes, the readers, the run row's write; design decision 2 in
    // docs/PERFORMANCE.md). Yielding lets it start first; with nothing
    // else runnable on this CPU the call returns at once.
    // SAFETY: sched_yield has no preconditions.
    unsafe {
        libc::sched_yield();
    }
    // Our ends only: the child holds the write ends until it exits.
    drop((out_w, err_w, stdin));
    // From here on an early return drops `process`, which kills the child.
    let mut process = Process {
        pid,
        waiter: None,
        reaped: false,
    };
    process.waiter = Some(Waiter::new(pid)?);
    Ok(Spawned {
        process,
        stdin: pipe::Sender::from_owned_fd(in_w)?,
        stdout: pipe::Receiver::from_owned_fd(out_r)?,
        stderr: pipe::Receiver::from_owned_fd(err_r)?,
    })
}

/// [`spawn`] through `std::process::Command`.
fn spawn_command(
    program: &Path,
    argv: &CStrings,
    env: &CStrings,
    pass: &[c_int],
) -> io::Result<Spawned> {
    let mut args = argv.iter().map(OsStr::from_bytes);
    let arg0 = args.next().unwrap_or(program.as_os_str());
    // The environment is not handed to `Command`, which would copy the
    // credential into buffers that are freed without being zeroed. With its
    // environment settings untouched, std's `exec` passes on whatever
    // `environ` points at, so the child points it at our block.
    let envp_ptrs = env.pointers();
    let envp = envp_ptrs.as_ptr() as usize;
    let pass = pass.to_vec();
    let parent = std::process::id() as libc::pid_t;
    let (in_r, in_w) = pipe_pair()?;
    let (out_r, out_w) = pipe_pair()?;
    let (err_r, err_w) = pipe_pair()?;
    let mut command = std::process::Command::new(program);
    command
        .arg0(arg0)
        .args(args)
        .stdin(in_r)
        .stdout(out_w)
        .stderr(err_w)
        .process_group(0);
    // SAFETY: the hook runs in the forked child, before `exec`, and calls
    // only async-signal-safe functions; it allocates nothing (`pass` was
    // copied before the fork). `envp` points at `envp_ptrs`, which, like
    // the strings of `env` it points into, outlives the `spawn` call, and
    // the child has its own copy of both.
    unsafe {
        command.pre_exec(move || {
            let errno = || io::Error::last_os_error();
            // Killed when the daemon's creating thread dies, SIGKILL included.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(errno());
            }
            // The daemon may have died before the prctl took effect.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            for &fd in &pass {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(errno());
                }
            }
            environ = envp as *const *const c_char;
            Ok(())
        });
    }
    let child = command.spawn()?;
    // The child's exit is ours to wait for, through `Process`; std's handle
    // neither waits nor kills when dropped.
    let pid = child.id() as libc::pid_t;
    drop(child);
    // Our ends only: `command` holds the write ends the child now has.
    drop(command);
    let mut process = Process {
        pid,
        waiter: None,
        reaped: false,
    };
    process.waiter = Some(Waiter::new(pid)?);
    Ok(Spawned {
        process,
        stdin: pipe::Sender::from_owned_fd(in_w)?,
        stdout: pipe::Receiver::from_owned_fd(out_r)?,
        stderr: pipe::Receiver::from_owned_fd(err_r)?,
    })
}

extern "C" {
    /// The C library's environment, which `execvp` passes to the program.
    static mut environ: *const *const c_char;
}

/// The child, between `clone` and `exec`. Runs on its own stack in our
/// address space: no allocation, no locks, no panics.
extern "C" fn child_main(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` points at the parent's `ChildArgs`, alive until we exec
    // or exit (CLONE_VFORK).
    let args = unsafe { &*(arg as *const ChildArgs) };
    // SAFETY: see `exec_child`.
    let error = unsafe { exec_child(args) };
    args.error.store(error.max(1), Ordering::Release);
    // SAFETY: `_exit` runs no destructors or atexit handlers, which belong
    // to the parent.
    unsafe { libc::_exit(127) }
}

/// Returns only on failure, with the errno of the step that failed.
///
/// # Safety
/// Must run in the child of `clone(CLONE_VM | CLONE_VFORK)` with every
/// signal blocked, with `args` pointing at valid strings and descriptors.
unsafe fn exec_child(args: &ChildArgs) -> c_int {
    let errno = || *libc::__errno_location();
    // Caught signals back to their default, so no handler of the daemon can
    // run here once signals are unblocked; ignored ones stay ignored, except
    // SIGPIPE, which the Rust runtime ignores for itself.
    for signal in 1..=args.last_signal {
        let mut current: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(signal, std::ptr::null(), &mut current) != 0 {
            continue;
        }
        let handler = current.sa_sigaction;
        if handler == libc::SIG_DFL || (handler == libc::SIG_IGN && signal != libc::SIGPIPE) {
            continue;
        }
        let mut default: libc::sigaction = std::mem::zeroed();
        default.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(signal, &default, std::ptr::null_mut());
    }
    // Killed when the daemon's creating thread dies, SIGKILL included.
    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
        return errno();
    }
    // The daemon may have died before the prctl took effect.
    if libc::getppid() != args.parent {
        libc::_exit(1);
    }
    if libc::setpgid(0, 0) != 0 {
        return errno();
    }
    // All three are above 2 (see `above_stdio`), so dup2 always makes a new
    // descriptor, without close-on-exec.
    for (fd, target) in [(args.stdin, 0), (args.stdout, 1), (args.stderr, 2)] {
        if libc::dup2(fd, target) < 0 {
            return errno();
        }
    }
    // Only this process's descriptor table changes: CLONE_VM shares memory,
    // not descriptors.
    for i in 0..args.pass_len {
        if libc::fcntl(*args.pass.add(i), libc::F_SETFD, 0) != 0 {
            return errno();
        }
    }
    let mut empty: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut empty);
    libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
    libc::execve(args.path, args.argv, args.envp);
    if errno() == libc::ENOEXEC {
        libc::execve(SHELL.as_ptr(), args.sh_argv, args.envp);
        return libc::ENOEXEC;
    }
    errno()
}

/// A close-on-exec pipe, (read end, write end), both above 2.
pub fn pipe_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as c_int; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both are fresh descriptors we own.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((above_stdio(read)?, above_stdio(write)?))
}

/// Moves a descriptor above 2 (a daemon started with stdio closed gets low
/// numbers back), so the child's `dup2`s onto 0, 1 and 2 cannot clobber one
/// another.
fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a descriptor we own.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fcntl returned a fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

impl Waiter {
    fn new(pid: libc::pid_t) -> io::Result<Waiter> {
        // SAFETY: pidfd_open takes a pid and flags and returns a descriptor.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd >= 0 {
            // SAFETY: a fresh descriptor (pidfds are close-on-exec), owned
            // by the AsyncFd and closed only when it is dropped.
            let fd = unsafe {
                AsyncFd::register_with_interest(
                    OwnedFd::from_raw_fd(fd as c_int),
                    tokio::io::Interest::READABLE,
                )
            };
            if let Ok(fd) = fd {
                return Ok(Waiter::Pidfd(fd));
            }
        }
        // Kernels before 5.3 (or no descriptor to spare): every SIGCHLD
        // wakes every waiter, which then asks about its own pid only.
        Ok(Waiter::Sigchld(tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::child(),
        )?))
    }
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// Waits for the process to end and reaps it.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        self.exited().await?;
        self.reap()
    }

    /// Waits for the process to end, without reaping it: until
    /// [`Process::reap`], the ended process keeps its pid, so neither the
    /// pid nor the id of the process group it leads can name another
    /// process.
    pub async fn exited(&mut self) -> io::Result<()> {
        loop {
            if self.has_exited()? {
                return Ok(());
            }
            match &mut self.waiter {
                Some(Waiter::Pidfd(fd)) => fd.readable().await?.clear_ready(),
                Some(Waiter::Sigchld(signal)) => {
                    if signal.recv().await.is_none() {
                        return Err(io::Error::other("the runtime's signal driver is gone"));
                    }
                }
                None => return Err(io::Error::other("process has no waiter")),
            }
        }
    }

    /// Reaps the process once [`Process::exited`] has returned.
    pub fn reap(&mut self) -> io::Result<ExitStatus> {
        if self.reaped {
            return Err(already_reaped());
        }
        // It has ended, so this returns at once.
        let status = waitpid(self.pid, 0)?
            .ok_or_else(|| io::Error::other("waitpid returned without a status"))?;
        self.reaped = true;
        Ok(status)
    }

    /// Whether the process has ended, leaving it unreaped.
    fn has_exited(&self) -> io::Result<bool> {
        if self.reaped {
            return Err(already_reaped());
        }
        loop {
            // SAFETY: siginfo_t is plain data for which all-zeroes is valid;
            // waitid writes only into it.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: waitid on our own child with a valid out-pointer.
            let r = unsafe {
                libc::waitid(
                    libc::P_PID,
                    self.pid as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
                )
            };
            if r == 0 {
                // With WNOHANG, a child that has not ended leaves si_pid 0.
                // SAFETY: waitid filled `info` in, as a SIGCHLD's siginfo.
                return Ok(unsafe { info.si_pid() } != 0);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

fn already_reaped() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "process already reaped")
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        // SAFETY: the pid is our unreaped child, so neither it nor its
        // process group (it leads one) can have been reused.
        unsafe {
            libc::kill(-self.pid, libc::SIGKILL);
            libc::kill(self.pid, libc::SIGKILL);
        }
        // Reaping may take a moment after SIGKILL; not on a runtime thread.
        let pid = self.pid;
        let _ = std::thread::Builder::new()
            .name("connectord-reap".into())
            .spawn(move || waitpid(pid, 0));
    }
}

/// Reaps our child `pid`: `None` when `flags` has WNOHANG and it has not
/// ended yet.
fn waitpid(pid: libc::pid_t, flags: c_int) -> io::Result<Option<ExitStatus>> {
    let mut status: c_int = 0;
    loop {
        // SAFETY: waitpid on our own child, status is a valid out-pointer.
        match unsafe { libc::waitpid(pid, &mut status, flags) } {
            0 => return Ok(None),
            r if r == pid => return Ok(Some(ExitStatus::from_raw(status))),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// Every test holds for both ways of starting a child.
    const METHODS: [SpawnMethod; 2] = [SpawnMethod::Vfork, SpawnMethod::Command];

    fn strings(items: &[&str]) -> CStrings {
        let entries: Vec<[&[u8]; 1]> = items.iter().map(|s| [s.as_bytes()]).collect();
        CStrings::new(&entries).unwrap()
    }

    async fn run(method: SpawnMethod, argv: &[&str], env: &[&str]) -> (ExitStatus, String, String) {
        let program = find_program(Path::new(argv[0]), None).unwrap();
        let mut spawned = spawn(&program, &strings(argv), &strings(env), &[], method).unwrap();
        // The child's stdin ends at once.
        drop(spawned.stdin);
        let (mut out, mut err) = (String::new(), String::new());
        spawned.stdout.read_to_string(&mut out).await.unwrap();
        spawned.stderr.read_to_string(&mut err).await.unwrap();
        (spawned.process.wait().await.unwrap(), out, err)
    }

    fn status_field(status: &str, field: &str) -> u64 {
        let line = status
            .lines()
            .find(|l| l.starts_with(field))
            .unwrap_or_else(|| panic!("{field} missing in {status}"));
        u64::from_str_radix(line[field.len()..].trim(), 16).unwrap()
    }

    #[tokio::test]
    async fn exact_argv_env_and_streams() {
        for method in METHODS {
            let (status, out, err) = run(
                method,
                &[
                    "sh",
                    "-c",
                    "echo \"$0|$1\"; echo oops >&2; exit 3",
                    "x",
                    "y",
                ],
                &["PATH=/usr/bin:/bin"],
            )
            .await;
            assert_eq!(status.code(), Some(3), "{method:?}");
            assert_eq!(
                (out.as_str(), err.as_str()),
                ("x|y\n", "oops\n"),
                "{method:?}"
            );
            // Exactly the block given, nothing of ours.
            let (status, out, _) = run(method, &["env"], &["A=1 2", "EMPTY="]).await;
            assert!(status.success(), "{method:?}");
            assert_eq!(out, "A=1 2\nEMPTY=\n", "{method:?}");
        }
    }

    #[tokio::test]
    async fn clean_signal_state_own_group_and_piped_stdin() {
        for method in METHODS {
            // The daemon's SIGPIPE is ignored (the Rust runtime does it); the
            // child must not inherit that, nor any blocked signal.
            let (_, out, _) = run(method, &["cat", "/proc/self/status"], &[]).await;
            assert_eq!(status_field(&out, "SigBlk:"), 0, "{method:?}: {out}");
            let parent = std::fs::read_to_string("/proc/self/status").unwrap();
            let expected = status_field(&parent, "SigIgn:") & !(1 << (libc::SIGPIPE - 1));
            assert_eq!(status_field(&out, "SigIgn:"), expected, "{method:?}: {out}");
            // `cat` ends only because its stdin, our pipe, was closed.
            let (_, out, _) = run(
                method,
                &["sh", "-c", "echo $$; cut -d' ' -f5 /proc/$$/stat; cat"],
                &[],
            )
            .await;
            let ids: Vec<&str> = out.split_whitespace().collect();
            assert_eq!(ids.len(), 2, "{method:?}: {out}");
            assert_eq!(
                ids[0], ids[1],
                "{method:?}: the child leads its own process group"
            );
        }
    }

    #[tokio::test]
    async fn passed_descriptors_stay_open_in_the_child() {
        for method in METHODS {
            let (read, _write) = pipe_pair().unwrap();
            let fd = read.as_raw_fd();
            let program = find_program(Path::new("sh"), None).unwrap();
            let script = format!("test -e /proc/self/fd/{fd} && echo open");
            let mut spawned = spawn(
                &program,
                &strings(&["sh", "-c", &script]),
                &strings(&[]),
                &[fd],
                method,
            )
            .unwrap();
            let mut out = String::new();
            spawned.stdout.read_to_string(&mut out).await.unwrap();
            spawned.process.wait().await.unwrap();
            assert_eq!(out, "open\n", "{method:?}");
        }
    }

    #[tokio::test]
    async fn exit_by_signal_and_pid() {
        for method in METHODS {
            let program = find_program(Path::new("sh"), None).unwrap();
            let mut spawned = spawn(
                &program,
                &strings(&["sh", "-c", "kill -TERM $$"]),
                &strings(&[]),
                &[],
                method,
            )
            .unwrap();
            assert!(spawned.process.pid() > 0, "{method:?}");
            let status = spawned.process.wait().await.unwrap();
            assert_eq!(status.signal(), Some(libc::SIGTERM), "{method:?}");
        }
    }

    #[tokio::test]
    async fn an_ended_child_keeps_its_pid_until_reaped() {
        for method in METHODS {
            let program = find_program(Path::new("sh"), None).unwrap();
            let mut spawned = spawn(
                &program,
                &strings(&["sh", "-c", "exit 4"]),
                &strings(&[]),
                &[],
                method,
            )
            .unwrap();
            let pid = spawned.process.pid();
            spawned.process.exited().await.unwrap();
            // A zombie: ended, and its pid (and so its group's id) still taken.
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
            let state = stat.rsplit_once(") ").unwrap().1.split(' ').next();
            assert_eq!(state, Some("Z"), "{method:?}: {stat}");
            assert_eq!(spawned.process.reap().unwrap().code(), Some(4));
            assert!(!Path::new(&format!("/proc/{pid}")).exists());
            assert!(spawned.process.reap().is_err(), "reaped once only");
        }
    }

    #[test]
    fn missing_and_non_executable_programs() {
        let missing = find_program(Path::new("no-such-program-here"), None).unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
        let dir = std::env::temp_dir().join(format!("connectord-spawn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("plain");
        std::fs::write(&file, "#!/bin/sh\n").unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let errors = METHODS.map(|method| {
            runtime.block_on(async {
                spawn(&file, &strings(&["plain"]), &strings(&[]), &[], method).err()
            })
        });
        std::fs::remove_dir_all(&dir).unwrap();
        for (method, error) in METHODS.into_iter().zip(errors) {
            // Root may read anything, but exec still needs an execute bit.
            assert_eq!(
                error.expect("not executable").raw_os_error(),
                Some(libc::EACCES),
                "{method:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_script_without_shebang_runs_under_sh() {
        let dir = std::env::temp_dir().join(format!("connectord-sh-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("no-shebang");
        std::fs::write(&script, "echo \"ran with $1\"\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let mut outcomes = Vec::new();
        for method in METHODS {
            let mut spawned = spawn(
                &script,
                &strings(&["no-shebang", "arg"]),
                &strings(&[]),
                &[],
                method,
            )
            .unwrap();
            let mut out = String::new();
            spawned.stdout.read_to_string(&mut out).await.unwrap();
            let status = spawned.process.wait().await.unwrap();
            outcomes.push((method, status, out));
        }
        std::fs::remove_dir_all(&dir).unwrap();
        for (method, status, out) in outcomes {
            assert!(status.success(), "{method:?}");
            assert_eq!(out, "ran with arg\n", "{method:?}");
        }
    }

    #[test]
    fn nul_bytes_are_refused() {
        assert!(CStrings::new(&[[&b"A="[..], b"x\0y"]]).is_err());
    }
}
