#!/bin/bash
# A check of the small-PUT ratio outside bench/compare.py: `gateway serve --workers 2` (tenants
# and auth on, a service-account token) against `rclone serve webdav`, each driven by plain
# `wrk -t2 -c32 -d8s` with the Lua script below (each wrk thread overwrites its own KEYS keys,
# 4 KiB each), alternating, three rounds. Prints requests/s per round and the ratio.
#
#     bench/small_put_check.sh            # KEYS=1000 (per wrk thread) by default
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/small-put-check-XXXX")
GW_PID= RC_PID=
# Each server is stopped with SIGTERM to its process group, then waited for (the gateway
# drains for up to server.shutdown-timeout, 30 s) before its folder goes. One still running
# after 40 s is reported with the end of its log, then killed: left running, it would share
# the port with the next run's gateway (SO_REUSEPORT) and skew its figures.
stop_group() {  # stop_group NAME PID LOG
    [ -n "$2" ] || return 0
    kill -TERM -- "-$2" 2>/dev/null || return 0
    for _ in $(seq 400); do
        pgrep -g "$2" >/dev/null || return 0
        sleep 0.1
    done
    echo "small_put_check: $1 (process group $2) still running 40 s after SIGTERM:" >&2
    ps -o pid,stat,args -g "$2" >&2 || true
    tail -n 20 "$3" >&2 || true
    kill -KILL -- "-$2" 2>/dev/null || true
}
cleanup() {
    stop_group gateway "$GW_PID" "$WORK/gateway.log"
    stop_group rclone "$RC_PID" "$WORK/rclone.log"
    rm -rf "$WORK"
}
trap cleanup EXIT
GATEWAY="$ROOT/.venv/bin/gateway"
export GATEWAY_STORAGE_TYPE=local GATEWAY_STORAGE_LOCAL_BASE_PATH="$WORK/data"
export GATEWAY_TENANTS_ENABLED=true GATEWAY_AUTH_ENABLED=true GATEWAY_SERVER_PORT=18111
export GATEWAY_ADMIN_USERNAME=admin GATEWAY_ADMIN_PASSWORD="check-$RANDOM-$RANDOM-password"
export GATEWAY_ADMIN_PASSWORD_FILE="$WORK/admin-password.txt"
"$GATEWAY" tenants create --tenant acme --name Acme >/dev/null
"$GATEWAY" service-accounts create --name writer >/dev/null
"$GATEWAY" service-accounts grant --name writer --tenant acme --role EDITOR >/dev/null
TOKEN=$("$GATEWAY" tokens create --service-account writer | tail -1)
setsid "$GATEWAY" serve --workers 2 >"$WORK/gateway.log" 2>&1 &
GW_PID=$!
mkdir -p "$WORK/dav"
setsid rclone serve webdav "$WORK/dav" --addr 127.0.0.1:18112 --user u --pass p \
    >"$WORK/rclone.log" 2>&1 &
RC_PID=$!
sleep 4
cat >"$WORK/put.lua" <<LUA
local n, threads = 0, 0
local body = string.rep("z", 4096)
function setup(thread) threads = threads + 1; thread:set("id", threads) end
function init(args)
   prefix = args[1]
   wrk.headers["Authorization"] = args[2]
   wrk.headers["Content-Type"] = "application/octet-stream"
end
function request()
   n = n + 1
   return wrk.format("PUT", prefix .. "w" .. id .. "-" .. (n % ${KEYS:-1000}), nil, body)
end
LUA
BASIC="Basic $(printf u:p | base64)"
rate() { wrk -t2 -c32 -d8s -s "$WORK/put.lua" "$@" | awk '/Requests\/sec/ {print $2}'; }
# rclone does not fsync: the kernel writes its round's bytes back later, and without a sync
# the next round (the gateway's, whose fsyncs wait for the disk) would pay for them. So each
# round starts with nothing left to write back (as bench/compare.py's large section does).
for round in 1 2 3; do
    sync
    g=$(rate http://127.0.0.1:18111 -- /api/v1/acme/files/check/ "Bearer $TOKEN")
    sync
    r=$(rate http://127.0.0.1:18112 -- /check- "$BASIC")
    echo "round $round: gateway $g PUT/s, rclone webdav $r PUT/s, ratio $(awk "BEGIN {printf \"%.2f\", $g / $r}")"
done
