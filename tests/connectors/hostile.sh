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
  # The same, with a second process in its group.
  family) sleep 600 & exec sleep 600 ;;
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
  # Floods interactions: 2,000 of kinds SPEC does not name, then 2,000 of
  # one it does with 64 KiB messages, then fails.
  ask-flood)
    i=0
    while [ $i -lt 2000 ]; do
      printf '{"type":"interaction","kind":"made_up_%s","message":"m"}\n' "$i"
      i=$((i + 1))
    done
    long=$(head -c 65000 /dev/zero | tr '\0' 'x')
    i=0
    while [ $i -lt 2000 ]; do
      printf '{"type":"interaction","kind":"credentials_required","message":"%s"}\n' "$long"
      i=$((i + 1))
    done
    exit 3 ;;
  # Reports progress and asks for the owner, then hangs past its timeout.
  report-then-hang)
    echo '{"type":"progress","records":5}'
    echo '{"type":"interaction","kind":"credentials_required","message":"log in again"}'
    echo '{"type":"progress","records":6}'
    exec sleep 600 ;;
  # Leaves a process in a new session holding stdout open, then exits 0.
  escape)
    setsid sh -c 'echo $$ > "$RECORD_DIR/escaped.pid"; exec sleep 600' &
    while [ ! -s "$RECORD_DIR/escaped.pid" ]; do sleep 0.01; done
    exit 0 ;;
  # Leaves a double-forked process in a session of its own, then runs
  # until killed (the sandbox tests: nothing may outlive the run).
  escape-hang)
    ( setsid sh -c 'exec sleep 600' & ) </dev/null >/dev/null 2>&1
    exec sleep 600 ;;
  # Writes a file into its private HOME, then runs until released.
  home-hold)
    echo "private to $CONNECTORD_CONNECTION_ID" > "$HOME/secret"
    while [ -e "$RECORD_DIR/hold.$CONNECTORD_CONNECTION_ID" ]; do sleep 0.05; done
    exit 0 ;;
  # Records its view of the sandbox: its HOME and TMPDIR (and whether they
  # started empty), and which paths it can write.
  probe-paths)
    {
      echo "home $HOME"
      echo "tmpdir $TMPDIR"
      echo "home-empty $(ls -A "$HOME" | wc -l)"
      echo "tmpdir-empty $(ls -A "$TMPDIR" | wc -l)"
      for p in "$HOME" "$TMPDIR" /tmp /dev/shm "$(cat "$RECORD_DIR/rw-path")" \
               "$(cat "$RECORD_DIR/ro-path")" / /usr /etc /opt /var /run /root /home "$RECORD_DIR/../"; do
        if ( : > "$p/.written" ) 2>/dev/null; then echo "writable $p"; else echo "read-only $p"; fi
      done
      if cat "$(cat "$RECORD_DIR/ro-path")/readme" >/dev/null 2>&1; then echo "ro-readable yes"; else echo "ro-readable no"; fi
      echo "left-behind" > "$HOME/left"
      echo "left-behind" > "$TMPDIR/left"
      echo "processes $(ls -d /proc/[0-9]* | wc -l)"
    } > "$RECORD_DIR/$CONNECTORD_RUN_ID.paths.tmp"
    mv "$RECORD_DIR/$CONNECTORD_RUN_ID.paths.tmp" "$RECORD_DIR/$CONNECTORD_RUN_ID.paths"
    exit 0 ;;
  # Tries to forge log lines and steer the operator's terminal.
  forge)
    printf '%s\n' '{"type":"log","level":"warn","message":"ok\nWARN run: connectord::run::launch: run failed FORGED-1 run_id=1"}'
    printf '%s\n' '{"type":"tele\nWARN FORGED-2"}'
    printf 'plain \033[2K\007 out\rFORGED-3\n'
    printf 'err \033[31m\rFORGED-4\342\200\256\n' >&2
    exit 0 ;;
  # Kills itself with a signal.
  segfault) kill -SEGV $$ ;;
  # Reports progress, then runs until released.
  progress-hold)
    echo '{"type":"progress","records":7}'
    while [ -e "$RECORD_DIR/hold.$CONNECTORD_CONNECTION_ID" ]; do sleep 0.05; done
    exit 0 ;;
  *) echo "unknown behaviour $behaviour" >&2; exit 99 ;;
esac
