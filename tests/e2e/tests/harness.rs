//! Tests of the harness itself, on the real kernel: namespaces, cgroups, fault injection,
//! the test peer and sshd. Most need root; see `rocks_e2e::require_root`.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use anyhow::Result;
use rocks_e2e::netns::list_netns;
use rocks_e2e::spawn::{join_cgroup, run};
use rocks_e2e::testpeer::{self, Direction, Pattern, Request};
use rocks_e2e::util::{TempDir, wait_until};
use rocks_e2e::{
    Child, ClientReport, Host, Sshd, TestCgroup, Topology, require_root, require_tools, spawn_in,
    testpeer_bin, wait_for_tcp_listen,
};
use sha2::{Digest, Sha256};

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// Starts `rocks-testpeer serve` in `host` on `[::]:port` (dual-stack) and waits for it.
fn start_server(host: &Host, port: u16, count: Option<u64>) -> Result<Child> {
    let mut cmd = host.exec(testpeer_bin!());
    cmd.args(["serve", "--listen", &format!("[::]:{port}")]);
    if let Some(n) = count {
        cmd.args(["--count", &n.to_string()]);
    }
    let server = Child::spawn(cmd)?;
    wait_for_tcp_listen(host, port, SECS(5))?;
    Ok(server)
}

/// Runs a testpeer client transfer from `host` (optionally in a cgroup) and returns its report;
/// fails unless it succeeded.
fn transfer(
    host: &Host,
    cgroup: Option<&TestCgroup>,
    to: SocketAddr,
    size: &str,
) -> Result<ClientReport> {
    let args = [
        "client",
        "--connect",
        &to.to_string(),
        "--up",
        size,
        "--down",
        size,
        "--seed",
        "42",
    ];
    let mut child = match cgroup {
        Some(cg) => spawn_in(host, cg.path(), testpeer_bin!(), args)?,
        None => {
            let mut cmd = host.exec(testpeer_bin!());
            cmd.args(args);
            Child::spawn(cmd)?
        }
    };
    let out = child.wait_success(SECS(20))?;
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// One ping with a short deadline.
fn ping_once(from: &Host, to: IpAddr) -> bool {
    from.exec("ping")
        .args(["-n", "-q", "-c1", "-W", "0.5", &to.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Pings until an answer comes (neighbour discovery after a change can take a moment).
fn reachable(from: &Host, to: IpAddr) -> bool {
    wait_until(SECS(5), || ping_once(from, to))
}

fn assert_killed(child: &mut std::process::Child, what: &str) {
    use std::os::unix::process::ExitStatusExt;
    let mut status = None;
    wait_until(SECS(3), || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    let status = status.unwrap_or_else(|| panic!("{what} still runs"));
    assert_eq!(
        status.signal(),
        Some(9),
        "{what} should have been SIGKILLed: {status}"
    );
}

#[test]
fn transfer_v4_v6_in_cgroup_then_everything_is_cleaned_up() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::new(&["a", "b"])?;
    let cg = TestCgroup::new()?;
    let (a, b) = (topo.host("a"), topo.host("b"));
    assert_eq!(
        (a.ip4(), b.ip4()),
        (Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(192, 0, 2, 2))
    );
    assert_eq!(b.ip6().to_string(), "2001:db8::2");

    // A program started this way runs in a's namespace and in the cgroup from the start.
    let mut probe = spawn_in(
        a,
        cg.path(),
        "sh",
        ["-c", "cat /proc/self/cgroup; ip -brief addr show eth0"],
    )?;
    let probe = String::from_utf8(probe.wait_success(SECS(5))?.stdout)?;
    let rel = cg.relative_path()?;
    assert!(
        probe.lines().any(|l| l == format!("0::{}", rel.display())),
        "{probe}"
    );
    assert!(
        probe.contains(&a.ip4().to_string()) && !probe.contains(&b.ip4().to_string()),
        "{probe}"
    );

    let mut server = start_server(b, 5001, Some(2))?;
    for (target, source) in [
        (b.sock4(5001), IpAddr::from(a.ip4())),
        (b.sock6(5001), IpAddr::from(a.ip6())),
    ] {
        let r = transfer(a, Some(&cg), target, "20MiB")?;
        assert!(
            r.up_sha256_match && r.down_sha256_match && r.error.is_none(),
            "{r:?}"
        );
        assert_eq!((r.up, r.down), (20 << 20, 20 << 20));
        assert_eq!(r.peername, target.to_string());
        let seen: SocketAddr = r.server_saw_peer.parse()?;
        assert_eq!(seen.ip(), source);
        assert_eq!(seen.to_string(), r.sockname);
    }
    let log = server.wait_success(SECS(5))?;
    let records = testpeer::parse_server_log(std::str::from_utf8(&log.stdout)?)?;
    assert_eq!(records.len(), 2);
    assert!(
        records
            .iter()
            .all(|r| r.ok && r.up == 20 << 20 && r.down == 20 << 20),
        "{records:?}"
    );

    // Leftovers that the drops must kill: one in a namespace, one in the cgroup only.
    let mut in_netns = b.exec("sleep").arg("600").spawn()?;
    let mut in_cgroup = {
        let mut cmd = Command::new("sleep");
        cmd.arg("600");
        join_cgroup(&mut cmd, cg.path())?;
        cmd.spawn()?
    };
    assert!(cg.procs()?.contains(&(in_cgroup.id() as i32)));

    let names = topo.namespaces();
    assert_eq!(names.len(), 3);
    assert!(names.iter().all(|n| list_netns().unwrap().contains(n)));
    let cg_path = cg.path().to_owned();
    drop(topo);
    drop(cg);
    assert_killed(&mut in_netns, "process in a deleted namespace");
    assert_killed(&mut in_cgroup, "process in a removed cgroup");
    let left = list_netns()?;
    assert!(
        names.iter().all(|n| !left.contains(n)),
        "left behind: {left:?}"
    );
    assert!(
        !cg_path.exists(),
        "cgroup {} left behind",
        cg_path.display()
    );
    Ok(())
}

#[test]
fn link_down_and_up() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::new(&["a", "b"])?;
    let (a, b) = (topo.host("a"), topo.host("b"));
    assert!(reachable(a, b.ip4().into()));
    topo.set_link("b", false)?;
    assert!(!ping_once(a, b.ip4().into()) && !ping_once(a, b.ip6().into()));
    topo.set_link("b", true)?;
    assert!(reachable(a, b.ip4().into()) && reachable(a, b.ip6().into()));
    Ok(())
}

#[test]
fn address_changes_and_extra_addresses() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::new(&["a", "b"])?;
    let (a, b) = (topo.host("a"), topo.host("b"));
    let _server = start_server(b, 5002, None)?;
    let (old4, old6) = (b.ip4(), b.ip6());

    let new4 = topo.change_ip4("b", 20)?;
    assert_eq!((new4, b.ip4()), (Ipv4Addr::new(192, 0, 2, 20), new4));
    let new6 = topo.change_ip6("b", 20)?;
    assert_eq!(
        (new6.to_string(), b.ip6()),
        ("2001:db8::14".to_owned(), new6)
    );
    for target in [b.sock4(5002), b.sock6(5002)] {
        assert!(transfer(a, None, target, "1MiB")?.ok());
    }
    assert!(!ping_once(a, old4.into()) && !ping_once(a, old6.into()));

    // An extra address in another documentation range is reachable (on-link default route).
    let extra: IpAddr = "198.51.100.7".parse()?;
    topo.add_ip("b", extra, 24)?;
    assert!(transfer(a, None, SocketAddr::new(extra, 5002), "1MiB")?.ok());
    topo.del_ip("b", extra, 24)?;
    assert!(!ping_once(a, extra));
    Ok(())
}

#[test]
fn blackhole_drops_silently_and_recovers() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::new(&["a", "b"])?;
    let (a, b) = (topo.host("a"), topo.host("b"));
    let _server = start_server(b, 5003, None)?;
    topo.blackhole("b", true)?;
    assert!(!ping_once(a, b.ip4().into()));
    // A connect times out (silence), rather than being refused.
    let mut cmd = a.exec(testpeer_bin!());
    cmd.args([
        "getpeername",
        "--connect",
        &b.sock6(5003).to_string(),
        "--connect-timeout-ms",
        "500",
    ]);
    let out = Child::spawn(cmd)?.wait_with_timeout(SECS(5))?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("timed out"),
        "{out:?}"
    );
    // Loopback inside the blackholed host still works.
    let mut cmd = b.exec(testpeer_bin!());
    cmd.args(["getpeername", "--connect", "[::1]:5003"]);
    run(cmd, SECS(5))?;

    topo.blackhole("b", false)?;
    assert!(transfer(a, None, b.sock4(5003), "1MiB")?.ok());
    // Left on at drop: the drop removes the table with the namespace.
    topo.blackhole("b", true)?;
    Ok(())
}

#[test]
fn ssh_and_rsync_between_hosts() -> Result<()> {
    if !require_root() || !require_tools(&["ssh", "sshd", "ssh-keygen", "rsync"]) {
        return Ok(());
    }
    let topo = Topology::new(&["a", "b"])?;
    let (a, b) = (topo.host("a"), topo.host("b"));
    let sshd = Sshd::start(b, 2222)?;
    let expected = testpeer::hex(&Sha256::digest(vec![0u8; 10_000_000]));
    for target in [IpAddr::from(b.ip4()), IpAddr::from(b.ip6())] {
        let cmd = sshd.ssh_command(a, target, "head -c 10000000 /dev/zero | sha256sum");
        let out = run(cmd, SECS(15)).map_err(|e| e.context(format!("sshd log: {}", sshd.log())))?;
        let got = String::from_utf8(out.stdout)?;
        assert_eq!(
            got.split_whitespace().next(),
            Some(expected.as_str()),
            "via {target}"
        );
    }
    // The server saw the client's real address.
    assert!(
        sshd.log().contains(&format!("from {}", a.ip4())),
        "{}",
        sshd.log()
    );

    // A session fed through stdin, the way later tests keep one open across a fault.
    let mut data = Vec::new();
    let mut p = Pattern::new(3, Direction::Up);
    while data.len() < 3 << 20 {
        data.extend_from_slice(p.next_chunk(testpeer::BLOCK));
    }
    let mut session = Child::spawn_with_stdin(sshd.ssh_command(a, b.ip6().into(), "sha256sum"))?;
    session.stdin().unwrap().write_all(&data)?;
    session.close_stdin();
    let got = String::from_utf8(session.wait_success(SECS(15))?.stdout)?;
    assert_eq!(
        got.split_whitespace().next(),
        Some(testpeer::hex(&Sha256::digest(&data)).as_str())
    );

    // rsync over the same transport (both hosts share the filesystem).
    let dir = TempDir::new("rsync")?;
    let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
    std::fs::write(&src, &data)?;
    let mut cmd = a.exec("rsync");
    cmd.args(["-a", "-e", &sshd.rsh()]).arg(&src).arg(format!(
        "root@{}:{}",
        b.ip4(),
        dst.display()
    ));
    run(cmd, SECS(15))?;
    assert!(std::fs::read(&dst)? == data, "rsync copy differs");
    Ok(())
}

/// The client must notice corrupted data in either direction (no root needed: loopback of
/// the current namespace, with a lying server in a thread).
#[test]
fn testpeer_client_detects_corruption() -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let server = thread::spawn(move || -> Result<()> {
        // First connection: one download byte flipped. Second: a wrong upload checksum.
        for corrupt_download in [true, false] {
            let (mut s, peer) = listener.accept()?;
            let mut head = [0u8; testpeer::REQUEST_LEN];
            s.read_exact(&mut head)?;
            let req = Request::decode(&head).map_err(anyhow::Error::msg)?;
            s.write_all(&testpeer::encode_response_header(&peer.to_string()))?;
            let mut up = vec![0u8; req.up_len as usize];
            s.read_exact(&mut up)?;
            let mut down = Pattern::new(req.seed, Direction::Down)
                .next_chunk(req.down_len as usize)
                .to_vec();
            if corrupt_download {
                down[1000] ^= 0x40;
            }
            s.write_all(&down)?;
            let mut up_sha = Sha256::digest(&up);
            if !corrupt_download {
                up_sha[0] ^= 1;
            }
            s.write_all(&up_sha)?;
            s.write_all(&Sha256::digest(&down))?; // consistent with what was sent
            s.shutdown(Shutdown::Write)?;
            let _ = s.read_to_end(&mut Vec::new());
        }
        Ok(())
    });
    let mut reports = Vec::new();
    for _ in 0..2 {
        let mut cmd = Command::new(testpeer_bin!());
        cmd.args([
            "client",
            "--connect",
            &format!("127.0.0.1:{port}"),
            "--up",
            "4K",
            "--down",
            "4K",
        ]);
        let out = Child::spawn(cmd)?.wait_with_timeout(SECS(10))?;
        assert!(!out.status.success(), "client accepted corrupted data");
        assert!(!out.stderr.is_empty());
        reports.push(serde_json::from_slice::<ClientReport>(&out.stdout)?);
    }
    server.join().unwrap()?;
    assert!(
        !reports[0].down_sha256_match && reports[0].up_sha256_match,
        "{:?}",
        reports[0]
    );
    assert!(
        reports[0]
            .error
            .as_deref()
            .unwrap_or("")
            .contains("byte 1000"),
        "{:?}",
        reports[0]
    );
    assert!(
        reports[1].down_sha256_match && !reports[1].up_sha256_match,
        "{:?}",
        reports[1]
    );
    Ok(())
}

#[test]
fn cgroup_alone_in_the_current_namespace() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let cg = TestCgroup::new()?;
    assert!(cg.path().starts_with(rocks_e2e::cgroup::cgroup2_mount()?));
    let mut cmd = Command::new("cat");
    cmd.arg("/proc/self/cgroup");
    join_cgroup(&mut cmd, cg.path())?;
    let out = String::from_utf8(cmd.output()?.stdout)?;
    assert!(
        out.contains(&format!("0::{}", cg.relative_path()?.display())),
        "{out}"
    );
    Ok(())
}
