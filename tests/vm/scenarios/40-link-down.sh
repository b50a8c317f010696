# link-down: the link between the VMs goes away for 30 s in the middle of a transfer and comes
# back; the kept connection survives and every byte arrives once, in order. The host takes the
# link down (QEMU's set_link on the client VM's network device: the client sees its carrier
# drop, the server just silence) when it reads the ROCKS-VM-CONTROL line below.
#
# With agents started with --keep-for shorter than the outage (`cargo xtask vm-test
# --keep-for 1s`) this scenario must fail: the agents give up and close the connection.

OUTAGE=30

carrier() { [ "$(cat /sys/class/net/eth0/carrier 2>/dev/null)" = "$1" ]; }

resumes_before=$(resumes)
transfer_start link-down 180 --connect "$SERVER4:$APP_PORT" --up 4M --down 4M \
    --pause-after 1M --pause-ms 5000
wait_for 60 carried 1048576 || {
    transfer_running link-down || transfer_wait link-down
    fail "the transfer did not reach 1 MiB each way within 60 s"
}

echo "ROCKS-VM-CONTROL link-down $OUTAGE"
wait_for 30 carrier 0 || fail "the link did not go down: the host did not act on ROCKS-VM-CONTROL"
down_at=$(now)
log "link down"
wait_for $((OUTAGE + 90)) carrier 1 || fail "the link did not come back"
outage=$(elapsed "$down_at")
log "link up again after $outage s"

transfer_wait link-down
resumed=$(($(resumes) - resumes_before))
[ "$resumed" -ge 1 ] || fail "the transfer completed, but the agent never resumed the session"
pass_detail "link down ${outage} s after 1 MiB each way; 4 MiB each way byte-exact; $resumed resume(s), suspended $(last_suspension_ms) ms"
