# data: kept connections carry data both ways byte-exact, over IPv4 and IPv6. The server
# application sees the connection come from the client's address (the server's agent dials
# transparently); the agent's `kept` count is how we know the agents carried it.

transfer data-v4 120 --connect "$SERVER4:$APP_PORT" --up 8M --down 8M
transfer data-v6 120 --connect "[$SERVER6]:$APP_PORT" --up 2M --down 2M

saw4=$(server_saw data-v4)
saw6=$(server_saw data-v6)
[ "$saw4" = "$CLIENT4" ] || fail "IPv4: the server saw the connection from $saw4, not from the client at $CLIENT4"
[ "$saw6" = "$CLIENT6" ] || fail "IPv6: the server saw the connection from $saw6, not from the client at $CLIENT6"

status || fail "no status from the agent: $(cat "$STATE/status.err")"
kept=$(json_num kept <"$STATE/status.json")
[ "${kept:-0}" -ge 2 ] || fail "the agent counts ${kept:-0} kept connections, expected at least 2"

ms4=$(json_num total_ms <"$STATE/data-v4.json")
ms6=$(json_num total_ms <"$STATE/data-v6.json")
pass_detail "8 MiB each way over IPv4 in ${ms4} ms, 2 MiB each way over IPv6 in ${ms6} ms, sha256 match; $kept kept"
