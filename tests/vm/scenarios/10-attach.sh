# attach: `rocks-agent attach` loads its programs and attaches them to the test cgroup, and a
# connection from that cgroup is redirected (getsockname shows the agent's loopback hop) while
# getpeername still shows the destination the program dialed.

rocks-agent attach --cgroup "$CGROUP" --secret-file "$SECRET" --run-dir "$RUN_DIR" \
    $(keep_for_flag) >>"$AGENT_LOG" 2>&1 &
echo $! >"$STATE/agent.pid"

# Loading and verifying the programs takes a few seconds under TCG.
started=$(now)
until status; do
    agent_alive || fail "rocks-agent attach exited: $(tail -n1 "$AGENT_LOG")"
    [ "$(elapsed "$started" | cut -d. -f1)" -lt 120 ] || fail "no status from the agent after 120 s"
    sleep 0.5
done
took=$(elapsed "$started")

mode=$(json_str mode <"$STATE/status.json")
[ "$mode" = attach ] || fail "status says mode \"$mode\", expected attach"
grep -q "\"$CGROUP\"" "$STATE/status.json" || fail "status does not list $CGROUP"

# Effective programs: sock_ops goes on the agent's own cgroup when that contains the target
# (here the agent runs in the root cgroup), the others on the target itself.
attached=$(bpftool cgroup show "$CGROUP" effective 2>&1)
TYPES="cgroup_inet4_connect cgroup_inet6_connect cgroup_inet4_getpeername cgroup_inet6_getpeername cgroup_sock_ops"
for type in $TYPES; do
    echo "$attached" | grep -qw "$type" || fail "no $type program in effect on $CGROUP; bpftool cgroup show: $(echo $attached)"
done

in_cgroup rocks-testpeer getpeername --connect "$SERVER4:$APP_PORT" \
    >"$STATE/getpeername.json" 2>"$STATE/getpeername.err" ||
    fail "getpeername from the cgroup failed: $(tail -n1 "$STATE/getpeername.err")"
peer=$(json_str peername <"$STATE/getpeername.json")
sock=$(json_str sockname <"$STATE/getpeername.json")
[ "$peer" = "$SERVER4:$APP_PORT" ] || fail "getpeername shows $peer, expected $SERVER4:$APP_PORT"
case "$sock" in
    127.0.0.1:*) ;;
    *) fail "getsockname shows $sock: the connection was not redirected to the agent" ;;
esac

pass_detail "attached in ${took} s; connect4/6, getpeername4/6, sock_ops in effect on $CGROUP; getpeername $peer via $sock"
