# The client VM (192.0.2.10, 2001:db8::10): runs the scenarios in the order of their file names
# (scenarios/NN-NAME.sh) and prints one verdict line per scenario for the host:
#   ROCKS-VM-BEGIN <scenario>
#   ROCKS-VM-RESULT <scenario> PASS|FAIL <detail>
# rocks.scenarios=a,b (from `--scenario`) selects scenarios. Every scenario but `attach` needs
# the agent that `attach` starts, so `attach` then still runs as a setup step (reported as
# ROCKS-VM-SETUP), and `detach`'s cleanup (stopping the agent) still happens at the end.
. /rocks-vm/lib.sh

mkdir -p "$STATE" "$CGROUP"
export RUST_LOG=info NO_COLOR=1

selected() {
    [ -z "$SCENARIOS" ] && return 0
    case ",$SCENARIOS," in *",$1,"*) return 0 ;; esac
    return 1
}

server_ready() {
    rocks-testpeer client --connect "$SERVER4:$APP_PORT" --up 1 --down 1 \
        --connect-timeout-ms 1000 >/dev/null 2>&1 &&
        rocks-testpeer getpeername --connect "$SERVER4:$PEER_PORT" \
            --connect-timeout-ms 1000 >/dev/null 2>&1 &&
        rocks-testpeer getpeername --connect "[$SERVER6]:$PEER_PORT" \
            --connect-timeout-ms 1000 >/dev/null 2>&1
}

log "waiting for the server VM's agent and test peer"
if ! wait_for 300 server_ready; then
    for file in $(ls /rocks-vm/scenarios/*.sh | sort); do
        name=$(basename "$file" .sh)
        name=${name#*-}
        selected "$name" && echo "ROCKS-VM-RESULT $name FAIL the server VM never answered on $SERVER4:$APP_PORT and :$PEER_PORT"
    done
    exit 0
fi
log "server VM ready"

# run NAME FILE: runs one scenario in a subshell; prints the agent log's tail when it fails.
run() {
    rm -f "$DETAIL"
    started=$(now)
    rc=0
    (. "$2") || rc=$?
    detail=$(cat "$DETAIL" 2>/dev/null)
    # A scenario that failed half-way may leave a transfer running: not into the next one.
    for pidfile in "$STATE"/transfer-*.pid; do
        [ -e "$pidfile" ] || continue
        kill -KILL "$(cat "$pidfile")" 2>/dev/null
        rm -f "$pidfile"
    done
    if [ "$rc" -eq 0 ]; then
        verdict=PASS
    else
        verdict=FAIL
        [ -n "$detail" ] || detail="exited with status $rc"
        log "$1 failed after $(elapsed "$started") s; the client agent's log ends with:"
        tail -n 25 "$AGENT_LOG" 2>/dev/null | sed 's/^/  agent| /'
    fi
}

attached=
for file in $(ls /rocks-vm/scenarios/*.sh | sort); do
    name=$(basename "$file" .sh)
    name=${name#*-}
    if [ "$name" = attach ]; then
        # Needed by everything after it, selected or not.
        selected attach && echo "ROCKS-VM-BEGIN $name"
        run "$name" "$file"
        [ "$verdict" = PASS ] && attached=1
        if selected attach; then
            echo "ROCKS-VM-RESULT $name $verdict $detail"
        else
            echo "ROCKS-VM-SETUP $name $verdict $detail"
        fi
        continue
    fi
    selected "$name" || continue
    if [ -z "$attached" ]; then
        echo "ROCKS-VM-RESULT $name FAIL not run: attach failed"
        continue
    fi
    if ! agent_alive; then
        echo "ROCKS-VM-RESULT $name FAIL not run: the client agent is no longer running"
        continue
    fi
    echo "ROCKS-VM-BEGIN $name"
    run "$name" "$file"
    echo "ROCKS-VM-RESULT $name $verdict $detail"
done

# Cleanup when detach was not selected: stop the agent so the VM powers off cleanly.
if agent_alive; then
    kill -TERM "$(agent_pid)"
    agent_gone() { ! agent_alive; }
    wait_for 30 agent_gone || log "the agent did not exit on SIGTERM"
fi
