//! The first process inside a sandbox: `connectord sandbox-init`.
//!
//! bubblewrap starts it as PID 1 of the sandbox's PID namespace
//! (`--as-pid-1`). It starts the connector, and exists for three reasons
//! bubblewrap's own init does not cover:
//!
//! - **The run ends when the connector ends.** When the connector exits,
//!   this process exits too, and the kernel kills every process left in the
//!   namespace: a double-forked or `setsid` leftover cannot keep the run (or
//!   itself) alive. bubblewrap's init waits for every process instead.
//! - **SIGTERM reaches the connector.** The daemon signals this process
//!   (the namespace's init accepts only signals it handles), which passes
//!   the signal on to the connector's process group, so a timeout or a
//!   shutdown still lets the connector stop cleanly before the SIGKILL.
//! - **The daemon learns what happened exactly.** On the status descriptor
//!   it reports `R` once the connector's `exec` succeeded, `E` and the errno
//!   when it failed (so a missing interpreter is a failed spawn, not a run),
//!   and `S` and the raw wait status when the connector ended (so a death by
//!   signal is not folded into an exit code).
//!
//! It runs before the daemon's runtime exists: one thread, plain syscalls,
//! no allocation after its arguments are parsed.

use std::ffi::{CString, OsString};
use std::os::unix::ffi::OsStrExt;

use libc::c_int;

/// The subcommand that runs this; not part of the operator's CLI.
pub const SUBCOMMAND: &str = "sandbox-init";

/// The argument that makes it exit at once: the daemon's start-up probe of
/// the whole mechanism.
pub const PROBE: &str = "--probe";

/// Status messages, one byte each, followed by an `i32` for `E` and `S`.
pub const STARTED: u8 = b'R';
pub const EXEC_FAILED: u8 = b'E';
pub const ENDED: u8 = b'S';

/// The signals passed on to the connector's process group.
const FORWARDED: [c_int; 6] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// `connectord sandbox-init --status-fd N -- PROGRAM ARGV0 [ARG...]`, or
/// `connectord sandbox-init --probe`. Never returns.
pub fn main(args: Vec<OsString>) -> ! {
    match parse(&args) {
        Some(Invocation::Probe) => exit(0),
        Some(Invocation::Run {
            status_fd,
            program,
            argv,
        }) => run(status_fd, &program, &argv),
        None => {
            eprintln!(
                "connectord {SUBCOMMAND}: the sandbox's init, started by the daemon; not for use by hand"
            );
            exit(2)
        }
    }
}

enum Invocation {
    Probe,
    Run {
        status_fd: c_int,
        program: CString,
        argv: Vec<CString>,
    },
}

fn parse(args: &[OsString]) -> Option<Invocation> {
    let rest = args.get(2..)?;
    if rest.len() == 1 && rest[0] == PROBE {
        return Some(Invocation::Probe);
    }
    let [flag, fd, separator, program, argv @ ..] = rest else {
        return None;
    };
    if flag != "--status-fd" || separator != "--" || argv.is_empty() {
        return None;
    }
    let status_fd = fd.to_str()?.parse().ok().filter(|fd| *fd > 2)?;
    let cstring = |s: &OsString| CString::new(s.as_bytes()).ok();
    Some(Invocation::Run {
        status_fd,
        program: cstring(program)?,
        argv: argv.iter().map(cstring).collect::<Option<_>>()?,
    })
}

fn run(status_fd: c_int, program: &CString, argv: &[CString]) -> ! {
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    // SAFETY: this process has one thread and owns every descriptor it
    // touches; each call's arguments are valid for its duration.
    unsafe {
        // Nothing but stdio and the status descriptor reaches the
        // connector, and the status descriptor only until its exec.
        close_other_fds(status_fd);
        libc::fcntl(status_fd, libc::F_SETFD, libc::FD_CLOEXEC);

        // The namespace's init receives a signal only if it handles it;
        // the handler does nothing, as the signals are taken synchronously
        // with sigwaitinfo while they are blocked.
        let mut waited: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut waited);
        libc::sigaddset(&mut waited, libc::SIGCHLD);
        for signal in FORWARDED {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = ignore_signal as extern "C" fn(c_int) as usize;
            libc::sigaction(signal, &action, std::ptr::null_mut());
            libc::sigaddset(&mut waited, signal);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &waited, std::ptr::null_mut());

        // The exec's outcome travels back on a close-on-exec pipe: end of
        // file means it succeeded.
        let mut exec_pipe = [0 as c_int; 2];
        if libc::pipe2(exec_pipe.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            report(status_fd, EXEC_FAILED, errno());
            exit(127);
        }
        let connector = libc::fork();
        if connector < 0 {
            report(status_fd, EXEC_FAILED, errno());
            exit(127);
        }
        if connector == 0 {
            libc::close(exec_pipe[0]);
            exec_connector(program, &argv_ptrs, exec_pipe[1]);
        }
        libc::close(exec_pipe[1]);
        let mut errno_bytes = [0u8; 4];
        let read = read_full(exec_pipe[0], &mut errno_bytes);
        libc::close(exec_pipe[0]);
        if read == 4 {
            report(status_fd, EXEC_FAILED, i32::from_ne_bytes(errno_bytes));
        } else {
            report_started(status_fd);
        }
        supervise(status_fd, connector, &waited)
    }
}

/// In the forked child: its own process group (so forwarded signals reach
/// whatever it starts in the foreground), default signal handling, exec.
///
/// # Safety
/// Must run in the child of `fork` of this single-threaded process.
unsafe fn exec_connector(program: &CString, argv: &[*const libc::c_char], exec_fd: c_int) -> ! {
    libc::setpgid(0, 0);
    let mut default: libc::sigaction = std::mem::zeroed();
    default.sa_sigaction = libc::SIG_DFL;
    for signal in FORWARDED.into_iter().chain([libc::SIGPIPE]) {
        libc::sigaction(signal, &default, std::ptr::null_mut());
    }
    let mut empty: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut empty);
    libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
    libc::execv(program.as_ptr(), argv.as_ptr());
    let error = errno().to_ne_bytes();
    libc::write(exec_fd, error.as_ptr().cast(), error.len());
    libc::_exit(127)
}

/// Reaps whatever ends, passes signals on, and exits when the connector
/// has ended, which ends the namespace and everything left in it.
///
/// # Safety
/// `waited` is the set of blocked signals; `connector` is our child.
unsafe fn supervise(status_fd: c_int, connector: libc::pid_t, waited: &libc::sigset_t) -> ! {
    loop {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let signal = libc::sigwaitinfo(waited, &mut info);
        if signal < 0 {
            continue;
        }
        if signal != libc::SIGCHLD {
            libc::kill(-connector, signal);
            continue;
        }
        loop {
            let mut status: c_int = 0;
            let pid = libc::waitpid(-1, &mut status, libc::WNOHANG);
            if pid <= 0 {
                break;
            }
            if pid == connector {
                report(status_fd, ENDED, status);
                let code = if libc::WIFEXITED(status) {
                    libc::WEXITSTATUS(status)
                } else {
                    128 + libc::WTERMSIG(status)
                };
                exit(code);
            }
        }
    }
}

extern "C" fn ignore_signal(_: c_int) {}

/// Closes every descriptor above stderr but `keep`.
///
/// # Safety
/// Closes descriptors this process may not use afterwards.
unsafe fn close_other_fds(keep: c_int) {
    let ranges = [(3, keep - 1), (keep + 1, c_int::MAX)];
    for (first, last) in ranges {
        if first > last {
            continue;
        }
        let closed = libc::syscall(libc::SYS_close_range, first as u32, last as u32, 0);
        if closed != 0 {
            // Kernels before 5.9: the descriptors bubblewrap can pass.
            for fd in first..last.min(1024) {
                libc::close(fd);
            }
        }
    }
}

fn report_started(fd: c_int) {
    write_all(fd, &[STARTED]);
}

fn report(fd: c_int, kind: u8, value: i32) {
    let value = value.to_ne_bytes();
    write_all(fd, &[kind, value[0], value[1], value[2], value[3]]);
}

fn write_all(fd: c_int, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        // SAFETY: writes from a valid slice to a descriptor we own.
        let written = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        if written < 0 && errno() == libc::EINTR {
            continue;
        }
        if written <= 0 {
            return;
        }
        bytes = &bytes[written as usize..];
    }
}

fn read_full(fd: c_int, buf: &mut [u8]) -> usize {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: reads into the unfilled part of a valid slice.
        let read = unsafe { libc::read(fd, buf[filled..].as_mut_ptr().cast(), buf.len() - filled) };
        if read < 0 && errno() == libc::EINTR {
            continue;
        }
        if read <= 0 {
            break;
        }
        filled += read as usize;
    }
    filled
}

fn errno() -> c_int {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn exit(code: c_int) -> ! {
    // SAFETY: ends the process without running the daemon's atexit
    // handlers or destructors, none of which this process set up.
    unsafe { libc::_exit(code) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(items: &[&str]) -> Vec<OsString> {
        items.iter().map(OsString::from).collect()
    }

    #[test]
    fn invocations() {
        assert!(matches!(
            parse(&args(&["connectord", SUBCOMMAND, PROBE])),
            Some(Invocation::Probe)
        ));
        let Some(Invocation::Run {
            status_fd,
            program,
            argv,
        }) = parse(&args(&[
            "connectord",
            SUBCOMMAND,
            "--status-fd",
            "5",
            "--",
            "/bin/sh",
            "sh",
            "-c",
            "true",
        ]))
        else {
            panic!("a run invocation");
        };
        assert_eq!((status_fd, program.as_bytes()), (5, &b"/bin/sh"[..]));
        assert_eq!(argv.len(), 3);
        for bad in [
            &["connectord", SUBCOMMAND][..],
            &[
                "connectord",
                SUBCOMMAND,
                "--status-fd",
                "1",
                "--",
                "/bin/sh",
                "sh",
            ],
            &[
                "connectord",
                SUBCOMMAND,
                "--status-fd",
                "5",
                "--",
                "/bin/sh",
            ],
            &[
                "connectord",
                SUBCOMMAND,
                "--status-fd",
                "x",
                "--",
                "/bin/sh",
                "sh",
            ],
        ] {
            assert!(parse(&args(bad)).is_none(), "{bad:?}");
        }
    }
}
