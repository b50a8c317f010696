//! Acceptance, real program: OpenSSH from the attached cgroup on a to sshd on b, through both
//! agents (b runs `attach` too, on a cgroup of its own with nothing in it). 50 MiB down
//! (remote `cat`) over IPv4 and 50 MiB up (remote `sha256sum` of stdin) over IPv6, compared
//! by sha256 on both ends.

mod common;

use std::io::Write;
use std::net::IpAddr;

use anyhow::Result;
use common::*;
use rocks_e2e::spawn::join_cgroup;
use rocks_e2e::testpeer::{self, BLOCK, Direction, Pattern};
use rocks_e2e::util::TempDir;
use rocks_e2e::{
    AgentSpec, Child, ClusterSecret, Sshd, TestCgroup, Topology, require_root, require_tools,
};
use sha2::{Digest, Sha256};

const SIZE: usize = 50 << 20;

fn first_word(s: &str) -> &str {
    s.split_whitespace().next().unwrap_or_default()
}

#[test]
fn ssh_session_through_the_kept_path() -> Result<()> {
    if !require_root() || !require_tools(&["ssh", "sshd", "ssh-keygen", "sha256sum"]) {
        return Ok(());
    }
    let topo = Topology::new(&["a", "b"])?;
    let (a, b) = (topo.host("a"), topo.host("b"));
    let (cg_a, cg_b) = (TestCgroup::new()?, TestCgroup::new()?);
    let secret = ClusterSecret::new()?;
    let sshd = Sshd::start(b, 2222)?;
    let agent_b = AgentSpec::attach(&[cg_b.path()], secret.path()).start(b)?;
    let agent_a = AgentSpec::attach(&[cg_a.path()], secret.path()).start(a)?;

    // The file both hosts see (they share the filesystem), and its digest.
    let dir = TempDir::new("ssh-data")?;
    let file = dir.path().join("data");
    let mut data = Vec::with_capacity(SIZE);
    let mut pattern = Pattern::new(11, Direction::Down);
    while data.len() < SIZE {
        data.extend_from_slice(pattern.next_chunk(BLOCK.min(SIZE - data.len())));
    }
    std::fs::write(&file, &data)?;
    let want = testpeer::hex(&Sha256::digest(&data));

    // Down, IPv4: the remote side hashes what it sends (stderr), we hash what arrives.
    let remote = format!("sha256sum {f} >&2; cat {f}", f = file.display());
    let mut cmd = sshd.ssh_command(a, b.ip4().into(), &remote);
    join_cgroup(&mut cmd, cg_a.path())?;
    let out = Child::spawn(cmd)?.wait_success(secs(60))?;
    assert_eq!(
        first_word(&String::from_utf8_lossy(&out.stderr)),
        want,
        "remote sha256 of the file"
    );
    assert_eq!(out.stdout.len(), SIZE, "bytes received");
    assert_eq!(
        testpeer::hex(&Sha256::digest(&out.stdout)),
        want,
        "download differs"
    );

    // Up, IPv6: we send the bytes, the remote side hashes what arrives.
    let mut cmd = sshd.ssh_command(a, b.ip6().into(), "sha256sum");
    join_cgroup(&mut cmd, cg_a.path())?;
    let mut up = Child::spawn_with_stdin(cmd)?;
    up.stdin().expect("stdin").write_all(&data)?;
    up.close_stdin();
    let out = up.wait_success(secs(60))?;
    assert_eq!(
        first_word(&String::from_utf8_lossy(&out.stdout)),
        want,
        "upload differs"
    );

    // Both sessions were kept through both agents.
    let (sa, sb) = (agent_a.status_json()?, agent_b.status_json()?);
    assert_eq!(sa["counters"]["kept"], 2, "{}", counters_line(&sa));
    assert_eq!(sa["kernel"]["redirected"], 2, "{}", counters_line(&sa));
    assert_eq!(
        sa["counters"]["plain_fallbacks"],
        0,
        "{}",
        counters_line(&sa)
    );
    assert_eq!(sb["mode"], "attach", "{sb}");
    assert_eq!(sb["counters"]["peer_sessions"], 2, "{}", counters_line(&sb));
    assert_eq!(
        sb["kernel"]["redirected"],
        0,
        "nothing runs in b's cgroup: {}",
        counters_line(&sb)
    );
    // sshd saw its clients come from a's addresses (b's agent dials transparently), never
    // from b's own.
    let log = sshd.log();
    for ip in [IpAddr::from(a.ip4()), IpAddr::from(a.ip6())] {
        assert!(
            log.contains(&format!("Accepted publickey for root from {ip} ")),
            "{log}"
        );
    }
    for ip in [IpAddr::from(b.ip4()), IpAddr::from(b.ip6())] {
        assert!(!log.contains(&format!("for root from {ip} ")), "{log}");
    }
    Ok(())
}
