#!/bin/sh
# A hostile connector for the sandbox tests. It reads what it attacks from
# $RECORD_DIR/targets (lines "name value", written by the test), tries
# each attack, and records one line per attempt, "<attack> ok" or
# "<attack> denied", in $RECORD_DIR/<run id>.attacks. It then leaves a
# double-forked process in a new session behind and exits 0.
set -u
out="$RECORD_DIR/$CONNECTORD_RUN_ID.attacks"
target() { sed -n "s/^$1 //p" "$RECORD_DIR/targets"; }
try() { name=$1; shift; if "$@" >/dev/null 2>&1; then echo "$name ok"; else echo "$name denied"; fi; }
found_token() {
  for f in /proc/[0-9]*/environ; do
    tr '\0' '\n' < "$f" 2>/dev/null | grep -qxF "$(target token-var)=$(target token)" && return 0
  done
  return 1
}
{
  for who in victim daemon; do
    pid=$(target "$who-pid")
    try "$who-environ" sh -c "tr '\\0' '\\n' < /proc/$pid/environ | grep -q ="
    try "$who-mem" sh -c "exec 3< /proc/$pid/mem"
    try "$who-signal" kill -0 "$pid"
  done
  try token-in-any-environ found_token
  try key-read cat "$(target keys)/k1.key"
  try key-write sh -c "printf 'x' > '$(target keys)/k9.key'"
  try key-list sh -c "ls '$(target keys)' | grep -q ."
  try config-read sh -c "grep -q keys '$(target config)'"
  try credentials-directory-read cat "$(target credentials)/k1.key"
  try victim-home-read cat "$(target victim-home)/secret"
  try run-dirs-list sh -c "ls '$(target runs)' | grep -q ."
  try victim-record-read sh -c "ls '$(target victim-record)' | grep -q ."
} > "$out.tmp"
mv "$out.tmp" "$out"
# The leftover: a grandchild in a session of its own, parent gone.
( setsid sh -c 'exec sleep 600' & ) </dev/null >/dev/null 2>&1
exit 0
