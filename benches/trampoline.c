/*
 * An exec trampoline, to price one way of keeping PR_SET_PDEATHSIG without
 * forking the daemon: the daemon starts this tiny static program with
 * posix_spawn (no pre_exec hook, so no fork of the daemon's address space);
 * it asks the kernel to kill it when its parent dies, checks that the
 * parent is still the daemon, and execs the connector, which keeps the
 * death signal (execve does not clear it for an ordinary binary).
 *
 * usage: trampoline <daemon pid> <program> [args...]
 */
#include <signal.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 3) {
        return 127;
    }
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0) {
        return 126;
    }
    /* The daemon may have died before the prctl took effect. */
    if ((long)getppid() != strtol(argv[1], NULL, 10)) {
        return 125;
    }
    execv(argv[2], argv + 2);
    return 127;
}
