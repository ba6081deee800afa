#!/bin/sh
# Stand-in connector for the one-time code tests. It records its
# environment, asks for a code (timeout $CODE_TIMEOUT, default 30s), and
# writes the line its stdin then gives to $RECORD_DIR/<run id>.answer. An
# answer exits 0; an expiry exits 4, after waiting while $RECORD_DIR/hold
# exists; end of input exits 9.
set -u
out="$RECORD_DIR/$CONNECTORD_RUN_ID"
env -0 > "$out.tmp" && mv "$out.tmp" "$out.env"
printf '{"type":"interaction","kind":"code_required","message":"Code sent to ***1234","timeout":"%s"}\n' "${CODE_TIMEOUT:-30s}"
if ! IFS= read -r line; then
  printf 'EOF' > "$out.answer"
  exit 9
fi
printf '%s' "$line" > "$out.answer.tmp" && mv "$out.answer.tmp" "$out.answer"
case "$line" in
  *'"expired":true'*)
    while [ -e "$RECORD_DIR/hold" ]; do sleep 0.05; done
    exit 4 ;;
esac
exit 0
