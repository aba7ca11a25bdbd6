#!/bin/sh
# Development only (dev.liveUpdate, set by tilt/values-dev.yaml): run the service ("$@") and restart it
# in place whenever Tilt's live_update touches $TRIGGER after syncing new code (what Tilt's
# restart_process extension does, for an image shared by every service). A service that exits on its
# own ends the container, so the kubelet's restart and back-off still apply.
TRIGGER=${RESTART_TRIGGER:-/tmp/.restart-proc}
stamp() { stat -c %y "$TRIGGER" 2>/dev/null || echo none; }  # nanoseconds: two syncs in one second differ
child=
# PID 1 gets no default signal handling: pass the kubelet's TERM on, so the service drains and stops.
trap 'kill -TERM "$child" 2>/dev/null; wait "$child"; exit $?' TERM INT
while true; do
  seen=$(stamp)
  "$@" &
  child=$!
  while kill -0 "$child" 2>/dev/null; do
    sleep 1
    if [ "$(stamp)" != "$seen" ]; then
      echo "restart-on-sync: code changed, restarting $1" >&2
      kill -TERM "$child"
      wait "$child"
      continue 2
    fi
  done
  wait "$child"
  exit $?
done
