# The server VM (192.0.2.2 and 192.0.2.3, 2001:db8::2): peer agents and a test peer, until the
# host powers it off once the client is done. Their logs go to this VM's console, which the host
# prints when a scenario fails.
#
# The agent serves peers on 192.0.2.2 (and 2001:db8::2) only, so 192.0.2.3 is a host without an
# agent: the fallback scenario connects there. `--listen` takes one address, hence one agent
# per address family.
. /rocks-vm/lib.sh

export RUST_LOG=info NO_COLOR=1
rocks-agent serve --listen "$SERVER4:$PEER_PORT" --secret-file "$SECRET" \
    --run-dir /run/rocks-v4 $(keep_for_flag) &
rocks-agent serve --listen "[$SERVER6]:$PEER_PORT" --secret-file "$SECRET" \
    --run-dir /run/rocks-v6 $(keep_for_flag) &
rocks-testpeer serve --listen "[::]:$APP_PORT" &
echo "ROCKS-VM-READY server"

# Anything here exiting is worth a line on the console; the client's scenarios report the effect.
wait -n
echo "rocks-vm: a server process exited"
wait
sleep 1000000
