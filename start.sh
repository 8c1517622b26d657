#!/usr/bin/env bash
# The image's entrypoint (behind tini): check config, wait for dependencies, migrate, init storage,
# then run supervisord, each step as a child that TERM/INT are forwarded to. A stop requested at
# any point exits 0; a program that went FATAL makes it exit 1; bad config exits 2.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
conf="${SUPERVISOR_CONF:-$here/supervisor.conf}"

child=""
stopping=0
# Background children of a non-interactive shell ignore SIGINT, so INT is forwarded as TERM.
on_signal() {
    stopping=1
    if [ -n "$child" ]; then kill -TERM "$child" 2>/dev/null; fi
}
trap on_signal TERM INT

# Run "$@" as a child and return its exit status; `wait` returns early when a trapped signal
# arrives, so keep waiting until the child is gone. A stop requested before it starts exits 0.
run() {
    if [ "$stopping" = 1 ]; then exit 0; fi
    "$@" &
    child=$!
    local status
    while true; do
        wait "$child"
        status=$?
        kill -0 "$child" 2>/dev/null || break
    done
    child=""
    return "$status"
}

# A step that failed because we were asked to stop is a clean stop, not a failure.
failed() {
    if [ "$stopping" = 1 ]; then exit 0; fi
    exit "$1"
}

# Each step's one-line human summary (stdout) is dropped: the container log is JSON lines, and the
# steps log their outcome as JSON on stderr. Config problems stay plain lines, one per problem.
run appliance config check >/dev/null || failed 2
startenv="$(appliance config startenv)" || failed 2
eval "$startenv"

mkdir -p "$SUPERVISOR_RUN_DIR" || exit 1
rm -f "$SUPERVISOR_RUN_DIR/fatal"
# Metrics of a previous run describe processes that no longer exist.
rm -rf "$PROMETHEUS_MULTIPROC_DIR" && mkdir -p "$PROMETHEUS_MULTIPROC_DIR" || exit 1

run appliance wait >/dev/null || failed 1
if [ "${APPLIANCE_SKIP_MIGRATIONS:-0}" != "1" ]; then
    run appliance migrate >/dev/null || failed 1
fi
run appliance storage init >/dev/null || failed 1

run supervisord -c "$conf"
status=$?

if [ -s "$SUPERVISOR_RUN_DIR/fatal" ]; then
    echo "{\"event\": \"start_sh_exit\", \"level\": \"error\", \"process\": \"start\", \"fatal_program\": \"$(head -n1 "$SUPERVISOR_RUN_DIR/fatal")\"}"
    exit 1
fi
exit "$status"
