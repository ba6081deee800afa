#!/bin/sh
# Runs a command beside a systemd-journald of its own, for the journald
# test. Started through `unshare -m`: the journal's sockets are on a fresh
# tmpfs and its files in $1, inside a private mount namespace, so the
# host's journal (if it has one) is neither read nor written. SIGTERM is
# passed on to the command; journald is stopped once the command exits.
set -eu
journal=$1
shift
journald=
for candidate in /usr/lib/systemd/systemd-journald /lib/systemd/systemd-journald; do
    [ -x "$candidate" ] && journald=$candidate && break
done
[ -n "$journald" ] || { echo "no systemd-journald on this machine" >&2; exit 1; }
mkdir -p /run/systemd/journal /run/log/journal
mount -t tmpfs -o mode=0755 tmpfs /run/systemd/journal
mount --bind "$journal" /run/log/journal
# Persistent storage would only be used after a flush request, but keep
# the host's files out of reach all the same.
if [ -d /var/log/journal ]; then mount -t tmpfs tmpfs /var/log/journal; fi
"$journald" &
journald_pid=$!
# journald has no readiness signal outside systemd; its socket is the sign.
tries=0
until [ -S /run/systemd/journal/socket ]; do
    tries=$((tries + 1))
    [ "$tries" -lt 200 ] || { echo "systemd-journald did not create its socket" >&2; exit 1; }
    sleep 0.05
done
"$@" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null || true' TERM INT
status=0
while :; do
    if wait "$child"; then status=0; else status=$?; fi
    kill -0 "$child" 2>/dev/null || break
done
kill "$journald_pid"
wait "$journald_pid" || true
exit "$status"
