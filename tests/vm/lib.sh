# Shared by the VM scripts (busybox ash): the test network's addresses and helpers.
# Addresses come from the documentation ranges only.

SERVER4=192.0.2.2          # server VM; its agent serves peers here
NOAGENT4=192.0.2.3         # server VM too, but no agent listens here: "a host without an agent"
SERVER6=2001:db8::2
CLIENT4=192.0.2.10         # client VM
CLIENT4_MOVED=192.0.2.11   # the client's address after the ip-change scenario
CLIENT6=2001:db8::10
PEER_PORT=4470             # rocks-agent's peer port
APP_PORT=5001              # rocks-testpeer serve

SECRET=/etc/rocks/secret
RUN_DIR=/run/rocks
CGROUP=/sys/fs/cgroup/rocks-vm
STATE=/run/rocks-vm
AGENT_LOG=$STATE/agent.log
DETAIL=$STATE/detail

log() { echo "rocks-vm: $*"; }

# Ends the scenario (each runs in a subshell) as FAIL with this detail.
fail() {
    echo "$*" >"$DETAIL"
    exit 1
}

# The detail shown next to PASS.
pass_detail() { echo "$*" >"$DETAIL"; }

keep_for_flag() { [ -z "$KEEP_FOR" ] || echo "--keep-for $KEEP_FOR"; }

# Seconds since boot, with hundredths.
now() { cut -d' ' -f1 /proc/uptime; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# Runs a command inside the test cgroup, whose connections the agent keeps.
in_cgroup() {
    sh -c 'echo $$ >"$0/cgroup.procs" && exec "$@"' "$CGROUP" "$@"
}

# wait_for SECONDS COMMAND...: polls COMMAND every half second until it succeeds.
wait_for() {
    _deadline=$(($(cut -d. -f1 /proc/uptime) + $1))
    shift
    until "$@"; do
        [ "$(cut -d. -f1 /proc/uptime)" -lt "$_deadline" ] || return 1
        sleep 0.5
    done
}

# First value of a string / number field in a JSON document on stdin (compact or pretty).
json_str() { grep -o "\"$1\": *\"[^\"]*\"" | head -n1 | sed 's/.*: *"\(.*\)"/\1/'; }
json_num() { grep -o "\"$1\": *[0-9]*" | head -n1 | sed 's/.*: *//'; }

# A process that has exited but not been reaped yet (a zombie) counts as gone.
pid_alive() { [ -n "$1" ] && [ -e "/proc/$1" ] && ! grep -q '^[0-9]* ([^)]*) Z' "/proc/$1/stat" 2>/dev/null; }
agent_pid() { cat "$STATE/agent.pid" 2>/dev/null; }
agent_alive() { pid_alive "$(agent_pid)"; }

# The client agent's status as JSON into $STATE/status.json.
status() { rocks-agent status --run-dir "$RUN_DIR" --json >"$STATE/status.json" 2>"$STATE/status.err"; }

# transfer NAME SECONDS CLIENT-ARGS...: runs rocks-testpeer client in the cgroup with a time
# limit; the JSON report is in $STATE/NAME.json. Fails the scenario on an error or a mismatch.
transfer() {
    _name=$1 _limit=$2
    shift 2
    transfer_start "$_name" "$_limit" "$@"
    transfer_wait "$_name"
}

transfer_start() {
    _name=$1 _limit=$2
    shift 2
    in_cgroup timeout "$_limit" rocks-testpeer client "$@" \
        >"$STATE/$_name.json" 2>"$STATE/$_name.err" &
    echo $! >"$STATE/transfer-$_name.pid"
}

transfer_running() { pid_alive "$(cat "$STATE/transfer-$1.pid")"; }

transfer_wait() {
    _rc=0
    wait "$(cat "$STATE/transfer-$1.pid")" || _rc=$?
    rm -f "$STATE/transfer-$1.pid"
    _report=$(cat "$STATE/$1.json")
    if [ "$_rc" -ne 0 ]; then
        [ "$_rc" -ne 143 ] || fail "$1: rocks-testpeer client killed by its time limit; report: ${_report:-none}"
        _err=$(echo "$_report" | json_str error)
        # The error says how far the transfer got ("connection closed after N of M bytes").
        fail "$1: rocks-testpeer client failed (exit $_rc): ${_err:-$(tail -n1 "$STATE/$1.err")}"
    fi
    echo "$_report" | grep -q '"up_sha256_match": *true' || fail "$1: upload sha256 mismatch"
    echo "$_report" | grep -q '"down_sha256_match": *true' || fail "$1: download sha256 mismatch"
}

# The address the server application saw the connection come from, without the port.
server_saw() { json_str server_saw_peer <"$STATE/$1.json" | sed 's/:[0-9]*$//; s/^\[//; s/\]$//'; }

# True once the client agent's (only) kept connection has carried at least $1 bytes each way:
# with `--pause-after $1` the application has then reached its pause.
carried() {
    status || return 1
    _sent=$(json_num bytes_sent <"$STATE/status.json")
    _received=$(json_num bytes_received <"$STATE/status.json")
    [ "${_sent:-0}" -ge "$1" ] && [ "${_received:-0}" -ge "$1" ]
}

# Resumes the client agent logged: its keeper logs one "session resumed ... took_ms=T" line per
# resume of a kept connection, T being how long the session was suspended.
resumes() { grep "session resumed" "$AGENT_LOG" 2>/dev/null | grep -c "took_ms=" || true; }
last_suspension_ms() {
    grep "session resumed" "$AGENT_LOG" | grep "took_ms=" | tail -n1 |
        sed 's/.*took_ms=\([0-9]*\).*/\1/'
}
