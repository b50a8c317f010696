//! Resume across network faults, with real agents on the real kernel. Each test has its own
//! hosts, cgroup and agents: `rocks-testpeer client` in the attached cgroup on host a moves
//! 100 MiB each way to a server on host b, byte-exact (pattern check and sha256 both ways). The
//! client stops after 20 MiB each way for a while, so the fault lands mid-stream at a known
//! point with the session open, then sends and reads the rest through the resumed session.
//! While it runs, a thread polls a's `status --json`: the connection must show a resume.
//!
//! Faults: client address change (IPv4, IPv6), link down for 90 s, black hole for 60 s (only
//! the dead-path timer can notice), transport reset from either end, NAT rebinding, and an
//! outage longer than `--keep-for` (both ends must close the application connection).

mod common;
mod resume_support;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use common::*;
use resume_support::*;
use rocks_e2e::testpeer::parse_server_log;
use rocks_e2e::util::{run_checked, wait_until};
use rocks_e2e::{
    Agent, AgentSpec, Child, ClientReport, ClusterSecret, Host, TestCgroup, Topology, require_root,
};
use serde_json::Value;

const PORT: u16 = 5001;
const SIZE: u64 = 100 * MIB;
/// Where the client stops for the fault (each way).
const PAUSE_AT: u64 = 20 * MIB;

/// One test's world. Fields drop in order: server, agents, cgroup (kills the clients), hosts.
struct Rig {
    server: Child,
    a: Agent,
    b: Agent,
    cg: TestCgroup,
    _secret: ClusterSecret,
    topo: Topology,
}

impl Rig {
    /// Hosts a and b, `attach` on a (the cgroup), `serve` on b, testpeer server on b.
    /// b logs resume offers (with the peer address they came from) at debug level.
    fn new(a_args: &[&str], b_args: &[&str]) -> Result<Rig> {
        Rig::with(a_args, b_args, |_| Ok(()))
    }

    /// Like [`Rig::new`], with `prepare` run on the hosts before the agents start.
    fn with(
        a_args: &[&str],
        b_args: &[&str],
        prepare: impl FnOnce(&Topology) -> Result<()>,
    ) -> Result<Rig> {
        let topo = Topology::new(&["a", "b"])?;
        prepare(&topo)?;
        let cg = TestCgroup::new()?;
        let secret = ClusterSecret::new()?;
        let server = server(topo.host("b"), PORT)?;
        let b = AgentSpec::serve(secret.path())
            .args(b_args)
            .env("RUST_LOG", "info,rocks_agent::keeper::server=debug")
            .start(topo.host("b"))?;
        let a = AgentSpec::attach(&[cg.path()], secret.path())
            .args(a_args)
            .start(topo.host("a"))?;
        Ok(Rig {
            server,
            a,
            b,
            cg,
            _secret: secret,
            topo,
        })
    }

    fn host(&self, label: &str) -> &Host {
        self.topo.host(label)
    }

    /// Starts the client toward `target`; it stops for `pause` after [`PAUSE_AT`] each way.
    fn client(&self, target: SocketAddr, pause: Duration) -> Result<Child> {
        let pause_ms = pause.as_millis().to_string();
        spawn_client(
            self.host("a"),
            Some(self.cg.path()),
            target,
            SIZE,
            &[
                "--pause-after",
                &PAUSE_AT.to_string(),
                "--pause-ms",
                &pause_ms,
            ],
        )
    }

    /// Runs a transfer to `target` with the client stopped for `pause` at [`PAUSE_AT`]; once it
    /// stopped, `during` injects the fault (and heals it) while a's status is watched. Returns
    /// the client's report (checked byte-exact) and the connection's resumes (the most the
    /// status showed, or the log's count if the connection ended between two polls).
    fn transfer_across(
        &self,
        target: SocketAddr,
        pause: Duration,
        during: impl FnOnce(&Watch) -> Result<()>,
    ) -> Result<(ClientReport, u64)> {
        let client = self.client(target, pause)?;
        let dst = target.to_string();
        let (id, seen) = watching(&self.a, &dst, |w| -> Result<(u64, u64)> {
            // The client has sent its first PAUSE_AT bytes and stopped: the session is open,
            // idle from the app's side, with the download backed up behind it.
            let row = wait_paused(w).with_context(|| self.a.log())?;
            ensure!(num(&row, "resumes") == 0, "resumed before the fault: {row}");
            during(w).map_err(|e| {
                e.context(format!(
                    "a's log:\n{}\nb's log:\n{}",
                    self.a.log(),
                    self.b.log()
                ))
            })?;
            Ok((num(&row, "id"), w.max_resumes()))
        })?;
        let report = finish_client(client, SIZE, secs(120)).map_err(|e| {
            e.context(format!(
                "a's log:\n{}\nb's log:\n{}",
                self.a.log(),
                self.b.log()
            ))
        })?;
        let resumes = seen.max(resumes_logged(&self.a.log(), id) as u64);
        Ok((report, resumes))
    }
}

/// Waits until the client has stopped at the pause point in both directions: it sent its
/// first [`PAUSE_AT`] bytes (a's agent took them), and at least a MiB more than that of the
/// download reached a's agent, which handed it to the application's socket: whatever the
/// fault does, the client's reader gets to its pause point with bytes already on its host.
/// (Were the fault to catch the download short of it, the reader would start its pause only
/// after the resume.)
fn wait_paused(w: &Watch) -> Result<Value> {
    w.wait_row(secs(30), "reached the pause point both ways", |r| {
        r["mode"] == "kept"
            && num(r, "bytes_sent") >= PAUSE_AT
            && num(r, "bytes_received") > PAUSE_AT + MIB
    })
}

/// Sleeps until `deadline` (the fault's planned end).
fn sleep_until(deadline: Instant) {
    let now = Instant::now();
    if deadline > now {
        std::thread::sleep(deadline - now);
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The client's address changes while its session is open: the old address disappears (the
/// old transport with it) and a new one comes up; rtnetlink tells the agent, which resumes
/// from the new address at once.
fn address_change(v6: bool) -> Result<()> {
    let rig = Rig::new(&[], &[])?;
    let (a, b) = (rig.host("a"), rig.host("b"));
    let target = if v6 { b.sock6(PORT) } else { b.sock4(PORT) };
    let old: IpAddr = if v6 { a.ip6().into() } else { a.ip4().into() };
    let (report, resumes) = rig.transfer_across(target, secs(5), |w| {
        let before = established_peers(b, PEER_PORT)?;
        ensure!(before.len() == 1 && before[0].ip() == old, "b's transport should come from {old}: {before:?}");
        let t0 = Instant::now();
        let new: IpAddr = if v6 { rig.topo.change_ip6("a", 11)?.into() } else { rig.topo.change_ip4("a", 11)?.into() };
        let row = w.wait_resumes(1, secs(10))?;
        wait_single_peer(b, PEER_PORT, new, secs(10)).context("b's transport should come from a's new address")?;
        eprintln!(
            "address {old} -> {new}: resumed (seen in status {:.0} ms after the change, last_resume_ms {})",
            ms(w.first_since(t0, |r| num(r, "resumes") >= 1).unwrap_or(t0) - t0),
            row["last_resume_ms"]
        );
        Ok(())
    })?;
    assert!(resumes >= 1, "no resume counted");
    let log = rig.a.log();
    assert!(
        !log_lines(&log, "network changed: resuming on a fresh transport").is_empty(),
        "rtnetlink did not trigger the resume:\n{log}"
    );
    let new = if v6 {
        a.ip6().to_string()
    } else {
        a.ip4().to_string()
    };
    let offers = log_lines(&rig.b.log(), "resume offered").join("\n");
    assert!(
        offers.contains(&new),
        "b saw no resume from {new}:\n{offers}"
    );
    eprintln!(
        "address change over IPv{}: {resumes} resume(s), transfer took {} ms",
        if v6 { 6 } else { 4 },
        report.total_ms
    );
    Ok(())
}

#[test]
fn client_address_change_ipv4() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    address_change(false)
}

#[test]
fn client_address_change_ipv6() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    address_change(true)
}

/// a's cable is out for 90 s. The agent keeps the connection (suspended, retrying) and resumes
/// when the link comes back.
#[test]
fn link_down_90s() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    const OUTAGE: Duration = Duration::from_secs(90);
    let rig = Rig::new(&[], &[])?;
    let b = rig.host("b");
    let target = b.sock4(PORT);
    let (report, resumes) = rig.transfer_across(target, OUTAGE + secs(6), |w| {
        rig.topo.set_link("a", false)?;
        let t0 = Instant::now();
        w.wait_row(secs(10), "left the active state", |r| r["state"] != "active")?;
        sleep_until(t0 + OUTAGE);
        ensure!(w.listed_throughout(t0), "the connection vanished during the outage: {:?}", w.states());
        ensure!(w.max_resumes() == 0, "resumed while the link was down?");
        let sb = rig.b.status_json()?;
        ensure!(sb["connections"].as_array().is_some_and(|c| c.len() == 1), "b dropped the connection: {sb}");
        rig.topo.set_link("a", true)?;
        let t1 = Instant::now();
        let row = w.wait_resumes(1, secs(20))?;
        eprintln!(
            "link down {OUTAGE:?}: states {:?}; resumed {:.0} ms after link up (status poll), last_resume_ms {}",
            w.states(),
            ms(w.first_since(t1, |r| num(r, "resumes") >= 1).unwrap_or(t1) - t1),
            row["last_resume_ms"]
        );
        Ok(())
    })?;
    assert!(resumes >= 1, "no resume counted");
    eprintln!(
        "link down 90 s: {resumes} resume(s), transfer took {} ms",
        report.total_ms
    );
    Ok(())
}

/// Every packet in and out of b is silently dropped for 60 s: nothing changes on a's host, so
/// only the dead-path timer (2.5 s of silence despite 1 s pings) can notice; the session resumes
/// once the path carries packets again.
#[test]
fn black_hole_60s() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    const OUTAGE: Duration = Duration::from_secs(60);
    let rig = Rig::new(&[], &[])?;
    let target = rig.host("b").sock4(PORT);
    let (report, resumes) = rig.transfer_across(target, OUTAGE + secs(6), |w| {
        rig.topo.blackhole("b", true)?;
        let t0 = Instant::now();
        w.wait_row(secs(15), "was declared dead", |r| r["state"] != "active")?;
        let noticed = w.first_since(t0, |r| r["state"] != "active").unwrap_or(t0) - t0;
        sleep_until(t0 + OUTAGE);
        ensure!(w.listed_throughout(t0), "the connection vanished during the outage: {:?}", w.states());
        ensure!(w.max_resumes() == 0, "resumed through a black hole?");
        rig.topo.blackhole("b", false)?;
        let t1 = Instant::now();
        let row = w.wait_resumes(1, secs(20))?;
        eprintln!(
            "black hole {OUTAGE:?}: dead path noticed after {:.0} ms, states {:?}; resumed {:.0} ms after the heal (status poll), last_resume_ms {}",
            ms(noticed),
            w.states(),
            ms(w.first_since(t1, |r| num(r, "resumes") >= 1).unwrap_or(t1) - t1),
            row["last_resume_ms"]
        );
        // 2.5 s after the last packet received; b's pings came every second until the black hole.
        ensure!(noticed >= Duration::from_millis(2000), "declared dead after {noticed:?}, well before 2.5 s of silence");
        Ok(())
    })?;
    assert!(resumes >= 1, "no resume counted");
    let log = rig.a.log();
    assert!(
        log_lines(&log, "network changed").is_empty(),
        "nothing changed on a's host, yet:\n{log}"
    );
    eprintln!(
        "black hole 60 s: {resumes} resume(s), transfer took {} ms",
        report.total_ms
    );
    Ok(())
}

/// `ss -K` in a host's namespace: destroys the matching sockets (the peer gets a RST). Returns
/// what ss printed (the sockets it destroyed).
fn ss_kill(host: &Host, filter: &[&str]) -> Result<String> {
    let mut cmd = host.exec("ss");
    cmd.args(["-K", "-H", "-t", "-n"]).args(filter);
    run_checked(&mut cmd)
}

/// The transport is reset in the middle of the session, first from a's side (`ss -K` on a's
/// connection to b:4470), then from b's side; each time the client agent resumes.
#[test]
fn transport_reset_from_either_end() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let rig = Rig::new(&[], &[])?;
    let (a, b) = (rig.host("a"), rig.host("b"));
    let target = b.sock4(PORT);
    let (report, resumes) = rig.transfer_across(target, secs(8), |w| {
        let killed = ss_kill(
            a,
            &[
                "state",
                "established",
                "dst",
                &b.ip4().to_string(),
                "dport",
                "=",
                &format!(":{PEER_PORT}"),
            ],
        )?;
        ensure!(
            killed.lines().count() == 1,
            "ss -K on a destroyed {killed:?}"
        );
        w.wait_resumes(1, secs(10))?;
        let killed = ss_kill(
            b,
            &[
                "state",
                "established",
                "sport",
                "=",
                &format!(":{PEER_PORT}"),
                "dst",
                &a.ip4().to_string(),
            ],
        )?;
        ensure!(
            killed.lines().count() == 1,
            "ss -K on b destroyed {killed:?}"
        );
        let row = w.wait_resumes(2, secs(10))?;
        eprintln!(
            "transport reset twice: states {:?}, last_resume_ms {}",
            w.states(),
            row["last_resume_ms"]
        );
        Ok(())
    })?;
    assert!(resumes >= 2, "{resumes} resumes counted, want 2");
    let log = rig.a.log();
    assert!(log_lines(&log, "network changed").is_empty(), "{log}");
    eprintln!(
        "transport reset: {resumes} resume(s), transfer took {} ms",
        report.total_ms
    );
    Ok(())
}

/// a sits behind a NAT (nftables snat on a's egress to b:4470, from a second address). Mid-
/// session the NAT rebinds: the mapping moves to a third address and the NAT forgets its
/// state (conntrack flushed), so the transport's next packets reach b from an address and
/// port b has never seen; b answers with a reset, and the session must resume from the new
/// address.
#[test]
fn nat_rebinding() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (nat1, nat2): (IpAddr, IpAddr) = ("198.51.100.10".parse()?, "198.51.100.20".parse()?);
    let rig = Rig::with(&[], &[], |topo| {
        topo.add_ip("a", nat1, 24)?;
        topo.add_ip("a", nat2, 24)?;
        Ok(())
    })?;
    let (a, b) = (rig.host("a"), rig.host("b"));
    let table = format!("{}nat", rig.topo.prefix());
    let snat_rule = |to: IpAddr| format!("ip daddr {} tcp dport {PEER_PORT} snat to {to}", b.ip4());
    nft(
        a,
        &format!(
            "table ip {table} {{\n chain post {{ type nat hook postrouting priority srcnat; policy accept;\n  {}\n }}\n}}\n",
            snat_rule(nat1)
        ),
    )?;
    let target = b.sock4(PORT);
    let (report, resumes) = rig.transfer_across(target, secs(8), |w| {
        let before = established_peers(b, PEER_PORT)?;
        ensure!(before.len() == 1 && before[0].ip() == nat1, "b should see a's transport from {nat1}: {before:?}");
        let sb = rig.b.status_json()?;
        ensure!(sb["connections"][0]["peer"].as_str().is_some_and(|p| p.contains(&nat1.to_string())), "{sb}");
        nft(a, &format!("flush chain ip {table} post\nadd rule ip {table} post {}\n", snat_rule(nat2)))?;
        flush_conntrack4(a)?;
        let t0 = Instant::now();
        let row = w.wait_resumes(1, secs(15))?;
        let after = wait_single_peer(b, PEER_PORT, nat2, secs(10)).context("b should see the resumed transport from the new mapping")?;
        eprintln!(
            "NAT rebinding {} -> {}: resumed {:.0} ms after the rebinding (status poll), states {:?}, last_resume_ms {}",
            before[0],
            after,
            ms(w.first_since(t0, |r| num(r, "resumes") >= 1).unwrap_or(t0) - t0),
            w.states(),
            row["last_resume_ms"]
        );
        Ok(())
    })?;
    assert!(resumes >= 1, "no resume counted");
    let offers = log_lines(&rig.b.log(), "resume offered").join("\n");
    assert!(
        offers.contains(&nat2.to_string()),
        "b's log shows no resume from {nat2}:\n{}",
        rig.b.log()
    );
    eprintln!(
        "NAT rebinding: {resumes} resume(s), transfer took {} ms; b: {offers}",
        report.total_ms
    );
    Ok(())
}

fn nft(host: &Host, script: &str) -> Result<()> {
    use std::io::Write;
    let mut cmd = host.exec("nft");
    cmd.args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().context("nft")?;
    child.stdin.take().unwrap().write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft -f failed: {}\n{script}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Both agents run with `--keep-for 5s`; a's link goes down for 10 s. Both agents give up on
/// the session and close the application connection: the client fails with an error, the
/// server sees its connection end, and neither agent lists it any more. Afterwards the agents
/// carry a new connection as usual.
#[test]
fn outage_longer_than_keep_for_closes_both_ends() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    const OUTAGE: Duration = Duration::from_secs(10);
    let rig = Rig::new(&["--keep-for", "5s"], &["--keep-for", "5s"])?;
    let b = rig.host("b");
    let target = b.sock4(PORT);
    let dst = target.to_string();
    // Stops briefly, then keeps writing and reading into the dead session until it is closed.
    let mut client = rig.client(target, secs(2))?;
    let ((closed_a, closed_b), states) = watching(&rig.a, &dst, |w| -> Result<_> {
        wait_paused(w)?;
        rig.topo.set_link("a", false)?;
        let t0 = Instant::now();
        let mut exited_at = None;
        let mut b_empty_at = None;
        while Instant::now() < t0 + OUTAGE {
            if exited_at.is_none() && client.try_wait()?.is_some() {
                exited_at = Some(t0.elapsed());
            }
            if b_empty_at.is_none()
                && rig.b.status_json()?["connections"]
                    .as_array()
                    .is_some_and(|c| c.is_empty())
            {
                b_empty_at = Some(t0.elapsed());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        rig.topo.set_link("a", true)?;
        Ok(((exited_at, b_empty_at), w.states()))
    })?;
    let out = client.wait_with_timeout(secs(20))?;
    let report: ClientReport = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("client printed {:?}", String::from_utf8_lossy(&out.stdout)))?;
    eprintln!(
        "keep-for 5 s, outage {OUTAGE:?}: client exited {closed_a:?} after link down, b's table empty {closed_b:?} after; a's states {states:?}; client: {:?}",
        report.error
    );
    assert!(!out.status.success(), "the client should fail: {report:?}");
    assert!(report.error.is_some() && report.up < SIZE, "{report:?}");
    assert!(
        closed_a.is_some(),
        "a did not close the application connection during the {OUTAGE:?} outage:\n{}",
        rig.a.log()
    );

    // The server's connection ended too (it logs one record per finished connection).
    let mut records = Vec::new();
    let ended = wait_until(secs(15), || {
        records = parse_server_log(&rig.server.stdout_text()).unwrap_or_default();
        !records.is_empty()
    });
    assert!(
        ended,
        "the server's connection never ended:\n{}",
        rig.b.log()
    );
    assert!(
        records.len() == 1 && !records[0].ok && records[0].error.is_some(),
        "{records:?}"
    );
    eprintln!("server saw: {:?}", records[0].error);

    for (name, agent) in [("a", &rig.a), ("b", &rig.b)] {
        let empty = wait_until(secs(15), || {
            agent
                .status_json()
                .is_ok_and(|s| s["connections"].as_array().is_some_and(|c| c.is_empty()))
        });
        assert!(
            empty,
            "{name} still lists connections: {}\n{}",
            agent.status_json()?,
            agent.log()
        );
    }
    assert!(
        !log_lines(&rig.a.log(), "longer than --keep-for").is_empty(),
        "{}",
        rig.a.log()
    );
    assert!(
        !log_lines(&rig.b.log(), "Expired").is_empty(),
        "{}",
        rig.b.log()
    );
    assert!(
        log_lines(&rig.a.log(), "session resumed").is_empty(),
        "{}",
        rig.a.log()
    );

    // The agents are fine: a new connection is kept and exact.
    let r = transfer(rig.host("a"), Some(rig.cg.path()), target, MIB, secs(30))?;
    let s = rig.a.status_json()?;
    assert_eq!(s["counters"]["kept"], 2, "{}", counters_line(&s));
    eprintln!("after the expiry a new connection works: {} ms", r.total_ms);

    // Closed the way a dead TCP connection closes: a reset (or an end of stream), never a
    // blocking read failing with EAGAIN, which programs take for "try again".
    let error = report.error.as_deref().unwrap_or_default();
    assert!(
        !error.contains("os error 11"),
        "the application's blocking read failed with EAGAIN instead of a reset when a's agent closed the connection: {error}\n{}",
        rig.a.log()
    );
    Ok(())
}
