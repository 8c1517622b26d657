#!/usr/bin/env bash
# The image's entrypoint (behind tini): check config, wait for dependencies, migrate, init storage,
# then run supervisord as a child, forwarding TERM/INT, and exit 1 if any program went FATAL.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
conf="${SUPERVISOR_CONF:-$here/supervisor.conf}"

# Each step's one-line human summary (stdout) is dropped: the container log is JSON lines, and the
# steps log their outcome as JSON on stderr. Config problems stay plain lines, one per problem.
appliance config check >/dev/null || exit 2
startenv="$(appliance config startenv)" || exit 2
eval "$startenv"

mkdir -p "$SUPERVISOR_RUN_DIR" || exit 1
rm -f "$SUPERVISOR_RUN_DIR/fatal"
# Metrics of a previous run describe processes that no longer exist.
rm -rf "$PROMETHEUS_MULTIPROC_DIR" && mkdir -p "$PROMETHEUS_MULTIPROC_DIR" || exit 1

appliance wait >/dev/null || exit 1
if [ "${APPLIANCE_SKIP_MIGRATIONS:-0}" != "1" ]; then
    appliance migrate >/dev/null || exit 1
fi
appliance storage init >/dev/null || exit 1

supervisord -c "$conf" &
child=$!
forward() { kill -"$1" "$child" 2>/dev/null; }
trap 'forward TERM' TERM
trap 'forward INT' INT

# `wait` returns early when a trapped signal arrives; keep waiting until supervisord is gone.
while true; do
    wait "$child"
    status=$?
    kill -0 "$child" 2>/dev/null || break
done

if [ -s "$SUPERVISOR_RUN_DIR/fatal" ]; then
    echo "{\"event\": \"start_sh_exit\", \"level\": \"error\", \"process\": \"start\", \"fatal_program\": \"$(head -n1 "$SUPERVISOR_RUN_DIR/fatal")\"}"
    exit 1
fi
exit "$status"
