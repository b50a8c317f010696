//! Acceptance (b): a redirected program's getpeername() returns the destination it dialed, for
//! IPv4, IPv6 and IPv4-mapped IPv6 (an AF_INET6 socket dialing `::ffff:192.0.2.2`), while its
//! getsockname() shows the loopback hop to the agent: a documented limit of transparency.
//!
//! The program is Python rather than rocks-testpeer, whose reports print IPv4-mapped
//! addresses in IPv4 form: here the socket family and the raw addresses matter.

mod common;

use std::net::IpAddr;

use anyhow::{Context, Result};
use common::*;
use rocks_e2e::{
    AgentSpec, ClusterSecret, TestCgroup, Topology, require_root, require_tools, spawn_in,
};
use serde_json::Value;

const PORT: u16 = 5002;

/// Connects, records getpeername()/getsockname(), then runs an empty rocks-testpeer exchange
/// (request header, half-close, read the server's answer to EOF) so the connection is known
/// to reach the server; prints one JSON object.
const CLIENT: &str = r#"
import json, socket, struct, sys
host, port = sys.argv[1], int(sys.argv[2])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.settimeout(10)
s.connect((host, port))
peer, sock = s.getpeername()[:2], s.getsockname()[:2]
s.sendall(b"RKTPREQ1" + struct.pack(">QQQI", 0, 0, 1, 0))
s.shutdown(socket.SHUT_WR)
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
assert data[:8] == b"RKTPRSP1", data[:16]
n = struct.unpack(">H", data[8:10])[0]
print(json.dumps({
    "family": "AF_INET6" if fam == socket.AF_INET6 else "AF_INET",
    "peer": [peer[0], peer[1]],
    "sock": [sock[0], sock[1]],
    "server_saw": data[10:10 + n].decode(),
    "trailer": len(data) - 10 - n,
}))
"#;

#[test]
fn getpeername_shows_the_original_destination() -> Result<()> {
    if !require_root() || !require_tools(&["python3"]) {
        return Ok(());
    }
    let topo = Topology::new(&["a", "b"])?;
    let (a, b) = (topo.host("a"), topo.host("b"));
    let cg = TestCgroup::new()?;
    let secret = ClusterSecret::new()?;
    let _server = server(b, PORT)?;
    let agent_b = AgentSpec::serve(secret.path()).start(b)?;
    let agent_a = AgentSpec::attach(&[cg.path()], secret.path()).start(a)?;

    let cases = [
        // dialed, socket family, the loopback the app's own end shows, what the server saw
        // (a's address: b's agent dials transparently)
        (
            b.ip4().to_string(),
            "AF_INET",
            "127.0.0.1",
            IpAddr::from(a.ip4()),
        ),
        (
            b.ip6().to_string(),
            "AF_INET6",
            "::1",
            IpAddr::from(a.ip6()),
        ),
        (
            format!("::ffff:{}", b.ip4()),
            "AF_INET6",
            "127.0.0.1",
            IpAddr::from(a.ip4()),
        ),
    ];
    for (n, (dialed, family, loopback, server_side)) in cases.into_iter().enumerate() {
        let mut child = spawn_in(
            a,
            cg.path(),
            "python3",
            ["-c", CLIENT, &dialed, &PORT.to_string()],
        )?;
        let out = child.wait_success(secs(15))?;
        let r: Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("python printed {}", String::from_utf8_lossy(&out.stdout)))?;
        eprintln!("dialed {dialed}: {r}");
        assert_eq!(r["family"], family, "{r}");
        // The original destination, exactly as dialed (the mapped form stays mapped).
        assert_eq!(r["peer"], serde_json::json!([dialed, PORT]), "{r}");
        // Our own end is the loopback hop to the agent (mapped for the AF_INET6 socket that
        // dialed a mapped address).
        let sock: IpAddr = r["sock"][0].as_str().unwrap_or_default().parse()?;
        assert_eq!(sock.to_canonical().to_string(), loopback, "{r}");
        assert_eq!(
            sock.is_ipv6(),
            family == "AF_INET6",
            "socket family kept: {r}"
        );
        assert_ne!(r["sock"][1], 4471, "{r}");
        // The server saw a's address (the counters below prove the path went through both
        // agents), and the exchange completed (64-byte trailer, then EOF).
        assert_eq!(
            ip_of(r["server_saw"].as_str().unwrap_or_default()),
            server_side,
            "{r}"
        );
        assert_eq!(r["trailer"], 64, "{r}");

        let (sa, sb) = (agent_a.status_json()?, agent_b.status_json()?);
        let n = n as u64 + 1;
        assert_eq!(sa["kernel"]["redirected"], n, "{}", counters_line(&sa));
        assert_eq!(sa["counters"]["kept"], n, "{}", counters_line(&sa));
        assert_eq!(sb["counters"]["peer_sessions"], n, "{}", counters_line(&sb));
    }
    // The mapped destination is carried as the IPv4 destination it is.
    let log = agent_a.log();
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("kept connection opened")
                && l.contains(&format!("dst={}", b.sock4(PORT))))
            .count(),
        2,
        "{log}"
    );
    Ok(())
}
