# fallback: a connection to a host without an agent ($NOAGENT4: the server VM's second
# address, where no agent listens) works as plain TCP, the host goes into the negative cache,
# and the next connection to it is not redirected at all.

transfer fallback 120 --connect "$NOAGENT4:$APP_PORT" --up 1M --down 1M
saw=$(server_saw fallback)
[ "$saw" = "$CLIENT4" ] || fail "the server saw the connection from $saw; plain TCP comes from the client's own address $CLIENT4"

status || fail "no status from the agent: $(cat "$STATE/status.err")"
plain=$(json_num plain_fallbacks <"$STATE/status.json")
[ "${plain:-0}" -ge 1 ] || fail "the agent counts ${plain:-0} plain fallbacks"
grep -q "\"host\": *\"$NOAGENT4\"" "$STATE/status.json" || fail "$NOAGENT4 is not in the negative cache"

transfer fallback-again 60 --connect "$NOAGENT4:$APP_PORT" --up 256K --down 256K
status || fail "no status from the agent: $(cat "$STATE/status.err")"
skipped=$(json_num skipped_negative <"$STATE/status.json")
[ "${skipped:-0}" -ge 1 ] || fail "the second connection to $NOAGENT4 was redirected again (skipped_negative ${skipped:-0})"

pass_detail "1 MiB each way as plain TCP to $NOAGENT4 (server saw $saw); negative cache holds it; the next connect went direct (skipped_negative $skipped)"
