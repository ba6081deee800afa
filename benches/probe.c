/*
 * The benchmark's connector child: it records when it started and exits.
 *
 * The first thing it does is read CLOCK_REALTIME, so the recorded instant is
 * "the child is running", as close to exec as user code gets; the benchmark
 * compares it with the instant it inserted the command, on the same clock.
 * It then appends one line, "<CONNECTORD_RUN_ID> <ns> <token>\n", to the path
 * in PROBE_OUT (a FIFO the benchmark reads), where <token> is 1 when
 * PROBE_TOKEN is set and non-empty: proof that the stored credential went
 * through the resolver into the environment. One short write(2) to a FIFO is
 * atomic, so concurrent probes never interleave their lines.
 *
 * With PROBE_ASK set it is the one-time-code probe instead: it asks for a
 * code on stdout, reads its stdin up to the first newline (the daemon's
 * answer line), and records the instant that read returned.
 *
 * It is linked statically when the toolchain allows, so no dynamic loader
 * runs between exec and the clock read.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

/* Asks for a code and waits for the answer line; 0 once it has come. */
static int ask(void) {
    static const char request[] =
        "{\"type\":\"interaction\",\"kind\":\"code_required\",\"message\":\"bench\"}\n";
    if (write(1, request, sizeof request - 1) != (ssize_t)(sizeof request - 1)) {
        return -1;
    }
    char c;
    for (;;) {
        ssize_t n = read(0, &c, 1);
        if (n <= 0) {
            return -1;
        }
        if (c == '\n') {
            return 0;
        }
    }
}

int main(void) {
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);

    const char *asks = getenv("PROBE_ASK");
    if (asks != NULL && asks[0] != '\0') {
        if (ask() != 0) {
            return 6;
        }
        clock_gettime(CLOCK_REALTIME, &now);
    }

    const char *out = getenv("PROBE_OUT");
    if (out == NULL || out[0] == '\0') {
        return 2;
    }
    const char *run = getenv("CONNECTORD_RUN_ID");
    const char *token = getenv("PROBE_TOKEN");
    char line[128];
    int len = snprintf(line, sizeof line, "%s %lld %d\n", run != NULL ? run : "0",
                       (long long)now.tv_sec * 1000000000LL + (long long)now.tv_nsec,
                       token != NULL && token[0] != '\0');
    if (len <= 0 || (size_t)len >= sizeof line) {
        return 3;
    }
    int fd = open(out, O_WRONLY | O_APPEND | O_CLOEXEC);
    if (fd < 0) {
        return 4;
    }
    ssize_t written = write(fd, line, (size_t)len);
    close(fd);
    return written == len ? 0 : 5;
}
