# detach: on SIGTERM the agent detaches and exits, and leaves nothing behind: no program on the
# cgroup (nor inherited from its parents), no rocks program loaded, no control socket; a new connection from the cgroup goes
# straight to its destination.

pid=$(agent_pid)
started=$(now)
kill -TERM "$pid" || fail "kill -TERM $pid failed"
agent_gone() { ! agent_alive; }
wait_for 60 agent_gone ||
    fail "the agent did not exit within 60 s of SIGTERM"
took=$(elapsed "$started")
grep -q "detached; exiting" "$AGENT_LOG" || fail "the agent exited without logging its detach: $(tail -n1 "$AGENT_LOG")"

left=$(bpftool cgroup show "$CGROUP" effective 2>&1)
[ -z "$left" ] || fail "still in effect on $CGROUP: $(echo $left)"
progs=$(bpftool prog show 2>&1 | grep 'name rocks_')
[ -z "$progs" ] || fail "rocks programs still loaded: $(echo $progs)"
[ ! -e "$RUN_DIR/control.sock" ] || fail "$RUN_DIR/control.sock is left behind"

transfer after-detach 60 --connect "$SERVER4:$APP_PORT" --up 64K --down 64K
saw=$(server_saw after-detach)
[ "$saw" = "$CLIENT4" ] || fail "after detach the server saw the connection from $saw, expected the client's $CLIENT4 (direct)"

pass_detail "exited ${took} s after SIGTERM; nothing attached to $CGROUP, no rocks programs loaded; the next connection went direct"
