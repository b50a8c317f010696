//! The server side sees the real client (`--transparent on`, the default): a server program
//! on b accepting a kept connection from a sees a's address, over IPv4 and IPv6, in accept()
//! and in its logs; a service that trusts only b's own addresses does not trust a relayed
//! client; the routing rule, route and sysctls the agent adds are gone after it exits, also
//! after a killed agent's successor exits; `--transparent off` gives the old behaviour.

mod common;

use std::net::IpAddr;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, ensure};
use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rocks_e2e::agent::{agent_bin, agent_command};
use rocks_e2e::spawn::{join_cgroup, run};
use rocks_e2e::util::wait_until;
use rocks_e2e::{
    AgentSpec, Child, ClusterSecret, Host, Sshd, TestCgroup, Topology, require_root, require_tools,
};

const PORT: u16 = 5001;
const SSH_PORT: u16 = 2222;
/// Nothing listens here.
const CLOSED_PORT: u16 = 5999;
/// The agent's routing mark, table and state file (see rocks-agent's `transparent` module).
const MARK: &str = "0x726f6374";
const TABLE: &str = "29295";
const STATE_FILE: &str = "transparent.sysctl";
const SYSCTLS: [&str; 3] = [
    "net.ipv4.tcp_fwmark_accept",
    "net.ipv4.fwmark_reflect",
    "net.ipv6.fwmark_reflect",
];

fn output(mut cmd: Command) -> Result<String> {
    let out = run(
        {
            cmd.env("LC_ALL", "C");
            cmd
        },
        secs(10),
    )?;
    ensure!(out.status.success(), "{out:?}");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A sysctl's value in `host`'s network namespace.
fn sysctl(host: &Host, name: &str) -> Result<String> {
    let mut cmd = host.exec("cat");
    cmd.arg(Path::new("/proc/sys").join(name.replace('.', "/")));
    Ok(output(cmd)?.trim().to_owned())
}

fn sysctls(host: &Host) -> Result<Vec<String>> {
    SYSCTLS.iter().map(|s| sysctl(host, s)).collect()
}

/// `ip -4|-6 rule` lines that match the agent's mark.
fn mark_rules(host: &Host, family: &str) -> Result<Vec<String>> {
    let mut cmd = host.exec("ip");
    cmd.args([family, "rule", "show"]);
    Ok(output(cmd)?
        .lines()
        .filter(|l| l.contains(&format!("fwmark {MARK}")))
        .map(str::to_owned)
        .collect())
}

/// `ip -4|-6 route show table TABLE`, one line per route (none when the table does not exist).
fn table_routes(host: &Host, family: &str) -> Result<Vec<String>> {
    let mut cmd = host.exec("ip");
    cmd.args([family, "route", "show", "table", TABLE]);
    let out = Child::spawn(cmd)?.wait_with_timeout(secs(10))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && stderr.contains("FIB table does not exist") {
        return Ok(Vec::new());
    }
    ensure!(out.status.success(), "{out:?}");
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect())
}

/// The rule and route of both families, and the sysctls at 1: what a running agent set up.
fn assert_routing_present(host: &Host) -> Result<()> {
    for family in ["-4", "-6"] {
        let rules = mark_rules(host, family)?;
        assert_eq!(rules.len(), 1, "exactly one {family} rule: {rules:?}");
        assert!(
            rules[0].starts_with("4470:") && rules[0].contains(&format!("lookup {TABLE}")),
            "{rules:?}"
        );
        let routes = table_routes(host, family)?;
        assert_eq!(routes.len(), 1, "{family} table {TABLE}: {routes:?}");
        assert!(routes[0].starts_with("local default dev lo"), "{routes:?}");
    }
    assert_eq!(sysctls(host)?, ["1", "1", "1"], "{SYSCTLS:?}");
    Ok(())
}

/// Nothing of the agent's left, and the sysctls at the namespace's defaults (0).
fn assert_routing_absent(host: &Host) -> Result<()> {
    for family in ["-4", "-6"] {
        assert_eq!(
            mark_rules(host, family)?,
            Vec::<String>::new(),
            "{family} rules left"
        );
        assert_eq!(
            table_routes(host, family)?,
            Vec::<String>::new(),
            "{family} routes left"
        );
    }
    assert_eq!(sysctls(host)?, ["0", "0", "0"], "{SYSCTLS:?}");
    Ok(())
}

/// True when `ip` is configured in `host` (`ip -o addr`).
fn is_address_of(host: &Host, ip: IpAddr) -> Result<bool> {
    let mut cmd = host.exec("ip");
    cmd.args(["-o", "addr", "show"]);
    Ok(output(cmd)?
        .split_whitespace()
        .any(|w| w.split('/').next() == Some(ip.to_string().as_str())))
}

fn ip4(h: &Host) -> IpAddr {
    h.ip4().into()
}

fn ip6(h: &Host) -> IpAddr {
    h.ip6().into()
}

/// (a): testpeer on b sees a's address for kept connections, byte-exact both ways.
#[test]
fn server_sees_the_client_address_v4_and_v6() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::new(&["a", "b"])?;
    let (a, b) = (topo.host("a"), topo.host("b"));
    let cg = TestCgroup::new()?;
    let secret = ClusterSecret::new()?;
    let _server = server(b, PORT)?;
    assert_eq!(sysctls(b)?, ["0", "0", "0"], "a fresh namespace");
    let agent_b = AgentSpec::serve(secret.path()).start(b)?;
    let agent_a = AgentSpec::attach(&[cg.path()], secret.path()).start(a)?;
    assert_routing_present(b)?;
    agent_b.wait_for_log("transparent dials on", secs(1))?;

    for (target, client) in [(b.sock4(PORT), ip4(a)), (b.sock6(PORT), ip6(a))] {
        let r = transfer(a, Some(cg.path()), target, 4 * MIB, secs(30))?;
        assert_eq!(r.peername, target.to_string(), "{r:?}");
        let seen = ip_of(&r.server_saw_peer);
        assert_eq!(seen, client, "the server saw a's address: {r:?}");
        assert!(!is_address_of(b, seen)?, "{seen} is not one of b's own");
        assert_ne!(r.server_saw_peer.rsplit(':').next(), Some("0"), "{r:?}");
        eprintln!("to {target}: the server saw {}", r.server_saw_peer);
    }
    let (sa, sb) = (agent_a.status_json()?, agent_b.status_json()?);
    assert_eq!(sa["counters"]["kept"], 2, "{}", counters_line(&sa));
    assert_eq!(sb["counters"]["peer_sessions"], 2, "{}", counters_line(&sb));
    assert_eq!(
        sb["counters"]["transparent_failures"],
        0,
        "{}",
        counters_line(&sb)
    );

    // A port where nothing listens: the kernel's RST to the transparent SYN comes back to b's
    // agent (fwmark_reflect), which is refused at once instead of waiting out its dial timeout.
    for target in [b.sock4(CLOSED_PORT), b.sock6(CLOSED_PORT)] {
        let mut client = spawn_client(a, Some(cg.path()), target, 1000, &[])?;
        let out = client.wait_with_timeout(secs(30))?;
        assert!(
            !out.status.success(),
            "a transfer to a closed port succeeded: {out:?}"
        );
    }
    let log = agent_b.log();
    let refusals = log
        .lines()
        .filter(|l| {
            l.contains("cannot connect to the destination")
                && l.contains("connection refused by the destination")
        })
        .count();
    assert_eq!(refusals, 2, "{log}");
    assert!(!log.contains("did not answer a transparent dial"), "{log}");
    Ok(())
}

/// (b): sshd logs the login as coming from a, over IPv4 and IPv6; 1 MiB up, checked by sha256.
#[test]
fn sshd_logs_the_client_address() -> Result<()> {
    if !require_root() || !require_tools(&["ssh", "sshd", "ssh-keygen", "sha256sum"]) {
        return Ok(());
    }
    let topo = Topology::new(&["a", "b"])?;
    let (a, b) = (topo.host("a"), topo.host("b"));
    let cg = TestCgroup::new()?;
    let secret = ClusterSecret::new()?;
    let sshd = Sshd::start(b, SSH_PORT)?;
    let _agent_b = AgentSpec::serve(secret.path()).start(b)?;
    let agent_a = AgentSpec::attach(&[cg.path()], secret.path()).start(a)?;

    let data: Vec<u8> = (0..MIB as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let want = {
        use sha2::{Digest, Sha256};
        rocks_e2e::testpeer::hex(&Sha256::digest(&data))
    };
    for target in [ip4(b), ip6(b)] {
        let mut cmd = sshd.ssh_command(a, target, "sha256sum");
        join_cgroup(&mut cmd, cg.path())?;
        let mut up = Child::spawn_with_stdin(cmd)?;
        std::io::Write::write_all(up.stdin().context("stdin")?, &data)?;
        up.close_stdin();
        let out = up.wait_success(secs(30))?;
        let got = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            got.split_whitespace().next(),
            Some(want.as_str()),
            "upload to {target}"
        );
    }
    let s = agent_a.status_json()?;
    assert_eq!(s["counters"]["kept"], 2, "{}", counters_line(&s));
    let log = sshd.log();
    for client in [ip4(a), ip6(a)] {
        assert!(
            log.contains(&format!("Accepted publickey for root from {client} port ")),
            "{log}"
        );
    }
    for own in [ip4(b), ip6(b)] {
        assert!(!log.contains(&format!("for root from {own} ")), "{log}");
    }
    Ok(())
}

/// sshd on b admitting root only from b's own addresses (and loopback): a service that trusts
/// local addresses.
fn trusting_sshd(b: &Host) -> Result<Sshd> {
    let (b4, b6) = (ip4(b), ip6(b));
    Sshd::start_with(
        b,
        SSH_PORT,
        &format!("AllowUsers root@{b4} root@{b6} root@127.0.0.1 root@::1"),
    )
}

/// `ssh root@target true` from a's cgroup; its exit status.
fn ssh_true(
    sshd: &Sshd,
    a: &Host,
    cg: &TestCgroup,
    target: IpAddr,
) -> Result<std::process::Output> {
    let mut cmd = sshd.ssh_command(a, target, "true");
    join_cgroup(&mut cmd, cg.path())?;
    Child::spawn(cmd)?.wait_with_timeout(secs(30))
}

/// (c): a service that trusts only b's own addresses does not admit a relayed remote client.
#[test]
fn a_service_trusting_local_addresses_does_not_trust_a_relayed_client() -> Result<()> {
    if !require_root() || !require_tools(&["ssh", "sshd", "ssh-keygen"]) {
        return Ok(());
    }
    let topo = Topology::new(&["a", "b"])?;
    let (a, b) = (topo.host("a"), topo.host("b"));
    let cg = TestCgroup::new()?;
    let secret = ClusterSecret::new()?;
    let sshd = trusting_sshd(b)?;
    let agent_b = AgentSpec::serve(secret.path()).start(b)?;
    let agent_a = AgentSpec::attach(&[cg.path()], secret.path()).start(a)?;
    for (target, client) in [(ip4(b), ip4(a)), (ip6(b), ip6(a))] {
        let out = ssh_true(&sshd, a, &cg, target)?;
        assert!(!out.status.success(), "ssh to {target} got in: {out:?}");
        let log = sshd.log();
        assert!(
            log.contains(&format!(
                "User root from {client} not allowed because not listed in AllowUsers"
            )),
            "{log}"
        );
    }
    assert!(!sshd.log().contains("Accepted publickey"), "{}", sshd.log());
    let sa = agent_a.status_json()?;
    assert_eq!(
        sa["counters"]["kept"],
        2,
        "both went through the agents: {}",
        counters_line(&sa)
    );
    let sb = agent_b.status_json()?;
    assert_eq!(
        sb["counters"]["transparent_failures"],
        0,
        "{}",
        counters_line(&sb)
    );
    Ok(())
}

/// (e): `--transparent off` (here from the config file) is the old behaviour: the server sees
/// b's own address (and so the trusting sshd admits the relayed client: the hazard the default
/// closes), and the agent touches no routing and no sysctl.
#[test]
fn transparent_off_dials_from_the_hosts_own_address() -> Result<()> {
    if !require_root() || !require_tools(&["ssh", "sshd", "ssh-keygen"]) {
        return Ok(());
    }
    let topo = Topology::new(&["a", "b"])?;
    let (a, b) = (topo.host("a"), topo.host("b"));
    let cg = TestCgroup::new()?;
    let secret = ClusterSecret::new()?;
    let _server = server(b, PORT)?;
    let sshd = trusting_sshd(b)?;
    let dir = rocks_e2e::util::TempDir::new("transparent-off")?;
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!("secret-file = {:?}\ntransparent = \"off\"\n", secret.path()),
    )?;
    let agent_b = AgentSpec::custom(
        "serve",
        [std::ffi::OsStr::new("--config"), config.as_os_str()],
    )
    .start(b)?;
    let _agent_a = AgentSpec::attach(&[cg.path()], secret.path()).start(a)?;
    assert_routing_absent(b)?;
    agent_b.wait_for_log("transparent dials off", secs(1))?;

    for target in [b.sock4(PORT), b.sock6(PORT)] {
        let r = transfer(a, Some(cg.path()), target, MIB, secs(30))?;
        assert_eq!(
            ip_of(&r.server_saw_peer),
            target.ip(),
            "b's own address: {r:?}"
        );
    }
    let out = ssh_true(&sshd, a, &cg, ip4(b))?;
    assert!(out.status.success(), "{out:?}\n{}", sshd.log());
    assert!(
        sshd.log().contains(&format!(
            "Accepted publickey for root from {} port ",
            ip4(b)
        )),
        "{}",
        sshd.log()
    );
    assert_routing_absent(b)?;
    Ok(())
}

fn wait_ready(run_dir: &Path) -> bool {
    wait_until(secs(15), || {
        run(
            {
                let mut c = Command::new(agent_bin().expect("agent binary"));
                c.args(["status", "--json", "--run-dir"]).arg(run_dir);
                c
            },
            secs(5),
        )
        .is_ok_and(|o| o.status.success())
    })
}

/// (d): a clean exit removes the rule and route and restores the sysctls; an agent killed
/// with SIGKILL leaves them, and its successor with the same run directory takes them over (no
/// duplicates), works, and restores the values from before the first agent at its exit.
#[test]
fn routing_is_removed_at_exit_also_after_a_killed_agent() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::new(&["a", "b"])?;
    let (a, b) = (topo.host("a"), topo.host("b"));
    let cg = TestCgroup::new()?;
    let secret = ClusterSecret::new()?;
    let _server = server(b, PORT)?;
    assert_routing_absent(b)?;

    // A clean exit.
    let mut first = AgentSpec::serve(secret.path()).start(b)?;
    assert_routing_present(b)?;
    assert!(
        first.run_dir().join(STATE_FILE).exists(),
        "originals recorded"
    );
    assert!(first.stop()?.success());
    assert_routing_absent(b)?;
    assert!(!first.run_dir().join(STATE_FILE).exists());
    assert!(
        first
            .log()
            .contains("transparent routing removed and sysctls restored"),
        "{}",
        first.log()
    );

    // Killed: everything stays, and the state file remembers the originals.
    let killed = AgentSpec::serve(secret.path()).start(b)?;
    let pid = Pid::from_raw(killed.pid() as i32);
    kill(pid, Signal::SIGKILL)?;
    assert!(
        wait_until(secs(5), || !rocks_e2e::util::pid_alive(pid.as_raw())),
        "agent survived SIGKILL"
    );
    assert_routing_present(b)?;
    let run_dir = killed.run_dir().to_owned();
    let state = std::fs::read_to_string(run_dir.join(STATE_FILE))?;
    for name in SYSCTLS {
        assert!(state.contains(&format!("{name}=0")), "{state}");
    }

    // Its successor, on the same run directory.
    let mut cmd = agent_command(Some(b))?;
    cmd.args(["serve", "--secret-file"])
        .arg(secret.path())
        .arg("--run-dir")
        .arg(&run_dir)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    let mut next = Child::spawn(cmd)?;
    assert!(
        wait_ready(&run_dir),
        "successor not ready: {}",
        next.stderr_text()
    );
    let log = next.stderr_text();
    assert!(
        log.contains("took over transparent routing left behind"),
        "{log}"
    );
    assert!(
        log.contains("found sysctl values left by an agent"),
        "{log}"
    );
    assert_routing_present(b)?;
    // It works: a kept connection through it sees a's address.
    let agent_a = AgentSpec::attach(&[cg.path()], secret.path()).start(a)?;
    let r = transfer(a, Some(cg.path()), b.sock4(PORT), MIB, secs(30))?;
    assert_eq!(ip_of(&r.server_saw_peer), ip4(a), "{r:?}");
    drop(agent_a);

    next.signal(Signal::SIGTERM)?;
    let out = next.wait_with_timeout(secs(10))?;
    assert!(out.status.success(), "{out:?}\n{}", next.stderr_text());
    assert_routing_absent(b)?;
    assert!(!run_dir.join(STATE_FILE).exists());
    Ok(())
}

/// Without CAP_NET_ADMIN the agent refuses to start with a sentence naming what failed, and
/// leaves nothing behind (the sysctls it could set as root are put back).
#[test]
fn without_cap_net_admin_it_refuses_to_start_and_changes_nothing() -> Result<()> {
    if !require_root() || !require_tools(&["setpriv"]) {
        return Ok(());
    }
    let topo = Topology::new(&["b"])?;
    let b = topo.host("b");
    let secret = ClusterSecret::new()?;
    let dir = rocks_e2e::util::TempDir::new("transparent-caps")?;
    let run_dir = dir.path().join("run");
    let mut cmd = b.exec("setpriv");
    cmd.args(["--inh-caps=-net_admin", "--bounding-set=-net_admin", "--"])
        .arg(agent_bin()?)
        .args(["serve", "--secret-file"])
        .arg(secret.path())
        .arg("--run-dir")
        .arg(&run_dir)
        .env("NO_COLOR", "1");
    let out = Child::spawn(cmd)?.wait_with_timeout(secs(15))?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    for needle in [
        "transparent mode: cannot add",
        "CAP_NET_ADMIN",
        "--transparent off",
    ] {
        assert!(err.contains(needle), "{needle:?} not in: {err}");
    }
    assert_routing_absent(b)?;
    assert!(!run_dir.join(STATE_FILE).exists(), "state file left");
    // The same agent with --transparent off starts.
    let _off = AgentSpec::serve(secret.path())
        .args(["--transparent", "off"])
        .start(b)?;
    assert_routing_absent(b)?;
    Ok(())
}

/// Where `/proc/sys` is read-only (a container, systemd's `ProtectKernelTunables=`), the agent
/// cannot set the sysctls: it refuses to start and says to set them on the host; once the host
/// has, it starts, and leaves them as it found them at exit.
#[test]
fn with_a_read_only_proc_sys_the_host_sets_the_sysctls() -> Result<()> {
    if !require_root() || !require_tools(&["unshare", "mount", "sysctl"]) {
        return Ok(());
    }
    let topo = Topology::new(&["b"])?;
    let b = topo.host("b");
    let secret = ClusterSecret::new()?;
    let dir = rocks_e2e::util::TempDir::new("transparent-ro")?;
    let run_dir = dir.path().join("run");
    // The agent in a mount namespace of its own whose /proc/sys is a read-only bind mount.
    let read_only_agent = || -> Result<Child> {
        let mut cmd = b.exec("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(
                "mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && exec \"$0\" \"$@\"",
            )
            .arg(agent_bin()?)
            .args(["serve", "--secret-file"])
            .arg(secret.path())
            .arg("--run-dir")
            .arg(&run_dir)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        Child::spawn(cmd)
    };
    let out = read_only_agent()?.wait_with_timeout(secs(15))?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    for needle in [
        "cannot set net.ipv4.tcp_fwmark_accept=1 (it is 0)",
        "read-only",
        "/etc/sysctl.d",
        "--transparent off",
    ] {
        assert!(err.contains(needle), "{needle:?} not in: {err}");
    }
    assert_routing_absent(b)?;

    // The host's part, as deploy/systemd/90-rocks-transparent.conf does it.
    let mut cmd = b.exec("sysctl");
    cmd.arg("-w").args(SYSCTLS.map(|s| format!("{s}=1")));
    output(cmd)?;
    let mut agent = read_only_agent()?;
    assert!(wait_ready(&run_dir), "not ready: {}", agent.stderr_text());
    assert_eq!(mark_rules(b, "-4")?.len(), 1);
    assert!(!run_dir.join(STATE_FILE).exists(), "nothing to restore");
    agent.signal(Signal::SIGTERM)?;
    let out = agent.wait_with_timeout(secs(10))?;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(mark_rules(b, "-4")?, Vec::<String>::new());
    assert_eq!(sysctls(b)?, ["1", "1", "1"], "left as the host set them");
    Ok(())
}

/// Two agents with transparent dials in one network namespace (one per address family, as the
/// VM tests run them) share the rule, the route and the sysctls: the second finds nothing to
/// take over, the first to exit leaves everything to the other, which still dials from the
/// client's address, and the last one out removes it all and restores the original values.
#[test]
fn two_agents_in_one_namespace_share_the_routing() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::new(&["a", "b"])?;
    let (a, b) = (topo.host("a"), topo.host("b"));
    let cg = TestCgroup::new()?;
    let secret = ClusterSecret::new()?;
    let _server = server(b, PORT)?;
    let listen = |ip: IpAddr| std::net::SocketAddr::new(ip, 4470).to_string();
    let mut first = AgentSpec::serve(secret.path())
        .args(["--listen", &listen(ip4(b))])
        .start(b)?;
    let mut second = AgentSpec::serve(secret.path())
        .args(["--listen", &listen(ip6(b))])
        .start(b)?;
    assert_routing_present(b)?;
    let log = second.log();
    assert!(log.contains("sharing the transparent routing"), "{log}");
    assert!(!log.contains("left behind"), "{log}");

    assert!(first.stop()?.success());
    assert!(
        first.log().contains("leaving the transparent routing"),
        "{}",
        first.log()
    );
    assert_routing_present(b)?;
    let _agent_a = AgentSpec::attach(&[cg.path()], secret.path()).start(a)?;
    let r = transfer(a, Some(cg.path()), b.sock6(PORT), MIB, secs(30))?;
    assert_eq!(ip_of(&r.server_saw_peer), ip6(a), "{r:?}");

    assert!(second.stop()?.success());
    assert_routing_absent(b)?;
    Ok(())
}

/// Two agents of one namespace starting at the same moment (as the VM tests' server starts its
/// two) both come up, and stopping both at the same moment leaves nothing behind.
#[test]
fn two_agents_starting_and_stopping_together() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::new(&["b"])?;
    let b = topo.host("b");
    let secret = ClusterSecret::new()?;
    let dir = rocks_e2e::util::TempDir::new("transparent-together")?;
    for round in 0..3 {
        let mut agents = Vec::new();
        for (n, ip) in [ip4(b), ip6(b)].into_iter().enumerate() {
            let run_dir = dir.path().join(format!("run-{round}-{n}"));
            let mut cmd = agent_command(Some(b))?;
            cmd.args(["serve", "--secret-file"])
                .arg(secret.path())
                .arg("--run-dir")
                .arg(&run_dir)
                .args(["--listen", &std::net::SocketAddr::new(ip, 4470).to_string()])
                .env("RUST_LOG", "info")
                .env("NO_COLOR", "1");
            agents.push((Child::spawn(cmd)?, run_dir));
        }
        for (agent, run_dir) in &agents {
            assert!(
                wait_ready(run_dir),
                "round {round}: not ready: {}",
                agent.stderr_text()
            );
        }
        assert_routing_present(b)?;
        for (agent, _) in &agents {
            agent.signal(Signal::SIGTERM)?;
        }
        for (mut agent, _) in agents {
            let out = agent.wait_with_timeout(secs(10))?;
            assert!(
                out.status.success(),
                "round {round}: {out:?}\n{}",
                agent.stderr_text()
            );
            let log = agent.stderr_text();
            let warned = log
                .lines()
                .any(|l| l.contains("WARN") && l.contains("transparent"));
            assert!(!warned, "round {round}: {log}");
        }
        assert_routing_absent(b)?;
    }
    Ok(())
}
