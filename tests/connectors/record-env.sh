#!/bin/sh
# Stand-in connector for the tests. It writes the environment and argv it
# received to $RECORD_DIR/<run id>.env (NUL-separated, written atomically),
# then behaves as $RECORD_DIR/behaviour.<connection id> says, if that file
# exists, else as $BEHAVIOUR says.
set -u
out="$RECORD_DIR/$CONNECTORD_RUN_ID"
{ env -0; printf 'ARGV=%s\0' "$*"; } > "$out.tmp" && mv "$out.tmp" "$out.env"
behaviour=$(cat "$RECORD_DIR/behaviour.$CONNECTORD_CONNECTION_ID" 2>/dev/null || echo "${BEHAVIOUR:-ok}")
case "$behaviour" in
  ok) exit 0 ;;
  fail) exit "${EXIT_CODE:-7}" ;;
  fail-first) [ "$CONNECTORD_ATTEMPT" = 1 ] && exit 7; exit 0 ;;
  hang) exec sleep 600 ;;
  ignore-term) trap '' TERM; while :; do sleep 1; done ;;
  interaction)
    echo '{"type":"interaction","kind":"credentials_required","message":"please log in again"}'
    exit 1 ;;
  chatty)
    echo 'plain output line'
    echo '{"type":"progress","records":42}'
    echo '{"type":"log","level":"warn","message":"from the connector"}'
    echo '{"type":"progress","records":"oops"}'
    echo 'to stderr' >&2
    exit 0 ;;
  wait-file)
    # Runs until the test removes the file, so overlap can be observed.
    while [ -e "$RECORD_DIR/hold" ]; do sleep 0.05; done
    exit 0 ;;
esac
