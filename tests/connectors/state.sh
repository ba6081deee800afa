#!/bin/sh
# Stand-in connector for the state tests. It records its environment in
# $RECORD_DIR/<run id>.env and the state it was given in <run id>.got
# ("ABSENT" when the file did not exist), then writes its next state as
# $RECORD_DIR/write.<connection id> says (else $STATE_WRITE, else rename)
# and exits with the code in $RECORD_DIR/exit.<connection id> (else 0;
# fail-first: 7 on a first attempt, else 0).
set -u
out="$RECORD_DIR/$CONNECTORD_RUN_ID"
state="$CONNECTORD_STATE_FILE"
if [ -e "$state" ]; then cat "$state" > "$out.got.tmp"; else printf 'ABSENT' > "$out.got.tmp"; fi
mv "$out.got.tmp" "$out.got"
env -0 > "$out.tmp" && mv "$out.tmp" "$out.env"
next="$CONNECTORD_CONNECTION_ID-run$CONNECTORD_RUN_ID"
how=$(cat "$RECORD_DIR/write.$CONNECTORD_CONNECTION_ID" 2>/dev/null || echo "${STATE_WRITE:-rename}")
case "$how" in
  rename) printf '%s' "$next" > "$state.new" && mv "$state.new" "$state" ;;
  inplace) printf '%s' "$next" > "$state" ;;
  none) ;;
  big) head -c "${STATE_SIZE:-2048}" /dev/zero > "$state" ;;
  symlink) ln -sf "$RECORD_DIR/secret" "$state" ;;
  text:*) printf '%s' "${how#text:}" > "$state" ;;
esac
code=$(cat "$RECORD_DIR/exit.$CONNECTORD_CONNECTION_ID" 2>/dev/null || echo 0)
if [ "$code" = fail-first ]; then
  [ "$CONNECTORD_ATTEMPT" = 1 ] && exit 7
  exit 0
fi
exit "$code"
