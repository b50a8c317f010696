# ip-change: the client VM's address changes in the middle of a transfer (the new address is
# added, then the old one removed, as a DHCP renewal or a roaming laptop would); the kept
# connection resumes from the new address and every byte arrives once, in order.

restore() {
    ip addr add "$CLIENT4/24" dev eth0 2>/dev/null
    ip addr del "$CLIENT4_MOVED/24" dev eth0 2>/dev/null
}
trap restore EXIT

resumes_before=$(resumes)
transfer_start ip-change 120 --connect "$SERVER4:$APP_PORT" --up 4M --down 4M \
    --pause-after 1M --pause-ms 8000
wait_for 60 carried 1048576 || {
    transfer_running ip-change || transfer_wait ip-change
    fail "the transfer did not reach 1 MiB each way within 60 s"
}
ip addr add "$CLIENT4_MOVED/24" dev eth0 || fail "ip addr add $CLIENT4_MOVED/24 failed"
ip addr del "$CLIENT4/24" dev eth0 || fail "ip addr del $CLIENT4/24 failed"
log "client address changed from $CLIENT4 to $CLIENT4_MOVED after 1 MiB each way"
transfer_running ip-change || log "the transfer had already ended at the address change"

transfer_wait ip-change
resumed=$(($(resumes) - resumes_before))
[ "$resumed" -ge 1 ] || fail "the transfer completed, but the agent never resumed the session"
# The server keeps seeing the address the connection opened from, whatever it resumes from.
[ "$(server_saw ip-change)" = "$CLIENT4" ] || fail "the server saw the connection from $(server_saw ip-change), not from $CLIENT4"
pass_detail "moved $CLIENT4 -> $CLIENT4_MOVED after 1 MiB each way; 4 MiB each way byte-exact; $resumed resume(s), suspended $(last_suspension_ms) ms"
