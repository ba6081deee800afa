#!/bin/sh
# Stand-in connector for fault tests: records its pid and environment to
# $RECORD_DIR/<run id>.env like record-env.sh, then misbehaves as
# $RECORD_DIR/behaviour.<connection id> (or $BEHAVIOUR) says.
set -u
out="$RECORD_DIR/$CONNECTORD_RUN_ID"
{ env -0; printf 'PID=%s\0' "$$"; } > "$out.tmp" && mv "$out.tmp" "$out.env"
behaviour=$(cat "$RECORD_DIR/behaviour.$CONNECTORD_CONNECTION_ID" 2>/dev/null || echo "${BEHAVIOUR:-ok}")
case "$behaviour" in
  ok) exit 0 ;;
  # Runs until the test removes $RECORD_DIR/hold.<connection id>.
  hold) while [ -e "$RECORD_DIR/hold.$CONNECTORD_CONNECTION_ID" ]; do sleep 0.05; done; exit 0 ;;
  # Runs until killed; dies on SIGTERM.
  hang) exec sleep 600 ;;
  # 200 MiB without a newline.
  flood-bytes) head -c 209715200 /dev/zero; exit 0 ;;
  # A million short lines.
  flood-lines) yes 'a line of output' | head -n 1000000; exit 0 ;;
  invalid-utf8) printf 'bad \377\376 bytes\n'; printf '{"type":"log","message":"\377"}\n'; exit 0 ;;
  chatty)
    echo 'plain output line'
    echo '{"type":"progress","records":42}'
    echo '{"type":"progress","records":"many"}'
    echo '{"type":"teleport"}'
    echo '{"type":"log","level":"warn","message":"from the connector"}'
    echo 'to stderr' >&2
    exit 0 ;;
  # Asks for the owner, then hangs past its timeout.
  ask-then-hang)
    echo '{"type":"interaction","kind":"credentials_required","message":"log in again"}'
    exec sleep 600 ;;
  # Leaves a process in a new session holding stdout open, then exits 0.
  escape)
    setsid sh -c 'echo $$ > "$RECORD_DIR/escaped.pid"; exec sleep 600' &
    while [ ! -s "$RECORD_DIR/escaped.pid" ]; do sleep 0.01; done
    exit 0 ;;
  # Reports progress, then runs until released.
  progress-hold)
    echo '{"type":"progress","records":7}'
    while [ -e "$RECORD_DIR/hold.$CONNECTORD_CONNECTION_ID" ]; do sleep 0.05; done
    exit 0 ;;
  *) echo "unknown behaviour $behaviour" >&2; exit 99 ;;
esac
