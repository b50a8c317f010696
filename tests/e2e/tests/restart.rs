//! Issue 5, restarts: the agent's links and state maps are pinned on bpffs per run directory.
//! A killed agent leaves its programs attached, but connects then go direct (the connect hooks
//! only redirect while the agent's loopback listener exists); the next agent of the same run
//! directory takes the links over in place (same link ids, its own programs swapped in) and the
//! negative cache with them; `--on-exit keep` makes that a clean, deliberate restart;
//! `rocks-agent detach` removes the leftovers; two run directories never share anything.

mod common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::Result;
use common::*;
use rocks_e2e::bpf::{CgroupLink, cgroup_links, pin_dirs_of, rocks_programs};
use rocks_e2e::util::TempDir;
use rocks_e2e::{
    Agent, AgentSpec, Child, ClientReport, ClusterSecret, Host, TestCgroup, Topology, require_root,
    require_tools, testpeer_bin, wait_for_tcp_listen,
};

const PORT: u16 = 5007;
const SIZE: u64 = 2 * MIB;
/// The agent's default `--redirect-port`.
const REDIRECT_PORT: u16 = 4471;

/// The hooks every target cgroup gets (the agents run in cgroups of their own, so sock_ops
/// goes on the target too).
const HOOKS: [&str; 6] = [
    "cgroup_inet4_connect",
    "cgroup_inet4_getpeername",
    "cgroup_inet6_connect",
    "cgroup_inet6_getpeername",
    "cgroup_inet_sock_release",
    "cgroup_sock_ops",
];

/// Link id and program id by hook.
fn links_by_hook(cg: &Path) -> Result<BTreeMap<String, CgroupLink>> {
    Ok(cgroup_links(cg)?
        .into_iter()
        .map(|l| (l.attach_type.clone(), l))
        .collect())
}

fn hooks(links: &BTreeMap<String, CgroupLink>) -> Vec<&str> {
    links.keys().map(String::as_str).collect()
}

fn host_ip(host: &Host, target: SocketAddr) -> IpAddr {
    if target.is_ipv4() {
        host.ip4().into()
    } else {
        host.ip6().into()
    }
}

/// A byte-exact transfer from the cgroup that went straight to the server (not redirected).
fn direct(a: &Host, cg: &TestCgroup, target: SocketAddr) -> Result<ClientReport> {
    let r = transfer(a, Some(cg.path()), target, SIZE, secs(30))?;
    assert_eq!(
        ip_of(&r.sockname),
        host_ip(a, target),
        "redirected, not direct: {r:?}"
    );
    assert_eq!(r.peername, target.to_string(), "{r:?}");
    Ok(r)
}

/// A byte-exact transfer from the cgroup that the agent carried (the program's socket is
/// connected to the agent's loopback listener, yet it sees the real destination).
fn carried(a: &Host, cg: &TestCgroup, target: SocketAddr) -> Result<ClientReport> {
    let r = transfer(a, Some(cg.path()), target, SIZE, secs(30))?;
    assert!(ip_of(&r.sockname).is_loopback(), "not redirected: {r:?}");
    assert_eq!(r.peername, target.to_string(), "{r:?}");
    Ok(r)
}

/// `rocks-agent detach --run-dir DIR`.
fn detach_cmd(run_dir: &Path) -> Result<std::process::Output> {
    rocks_e2e::agent::run_agent(
        None,
        [
            OsStr::new("detach"),
            "--run-dir".as_ref(),
            run_dir.as_os_str(),
        ],
        secs(10),
    )
}

/// The one pin directory of `run_dir`, if any.
fn pin_dir(run_dir: &Path) -> Option<PathBuf> {
    let dirs = pin_dirs_of(run_dir);
    assert!(dirs.len() <= 1, "{dirs:?}");
    dirs.into_iter().next()
}

fn negative_hosts(agent: &Agent) -> Result<Vec<IpAddr>> {
    Ok(agent.status_json()?["negative_cache"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["host"].as_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default())
}

/// Crash safety and takeover: SIGKILL leaves the programs attached and pinned, yet the cgroup's
/// connects reach the server directly; the next agent reuses the very same links.
#[test]
fn killed_agent_leaves_connects_direct_and_the_next_agent_takes_over() -> Result<()> {
    if !require_root() || !require_tools(&["bpftool"]) {
        return Ok(());
    }
    let topo = Topology::new(&["a", "b"])?;
    let (a, b) = (topo.host("a"), topo.host("b"));
    let cg = TestCgroup::new()?;
    let secret = ClusterSecret::new()?;
    let state = TempDir::new("restart-run")?;
    let run_dir = state.path().join("run");
    let _server = server(b, PORT)?;
    let _agent_b = AgentSpec::serve(secret.path()).start(b)?;

    let mut first = AgentSpec::attach(&[cg.path()], secret.path())
        .run_dir(&run_dir)
        .env("RUST_LOG", "info,rocks_agent::kernel=debug")
        .start(a)?;
    // The feature probe ran and says what it found.
    let log = first.log();
    assert!(log.contains("kernel feature probe passed"), "{log}");
    assert!(log.contains("bpf_sk_lookup_tcp"), "{log}");
    let before = links_by_hook(cg.path())?;
    assert_eq!(hooks(&before), HOOKS, "{before:?}");
    let pins = pin_dir(&run_dir).expect("the agent pinned nothing");
    carried(a, &cg, b.sock4(PORT))?;

    let status = first.kill()?;
    assert!(!status.success(), "{status}");
    // Nothing detached it: the same links are still there, pinned.
    assert_eq!(links_by_hook(cg.path())?, before, "links after SIGKILL");
    assert!(pins.join("links").is_dir(), "pins gone after SIGKILL");
    // ...but with nobody listening on the redirect port, connects go straight to the server.
    for target in [b.sock4(PORT), b.sock6(PORT)] {
        let r = direct(a, &cg, target)?;
        assert_eq!(r.server_saw_peer, r.sockname, "{r:?}");
    }
    // The check is what sends them direct: the killed agent's programs are live, and the moment
    // anything listens on the redirect port again, connects land there.
    {
        let mut cmd = a.exec(testpeer_bin!());
        cmd.args(["serve", "--listen", &format!("127.0.0.1:{REDIRECT_PORT}")]);
        let _listener = Child::spawn(cmd)?;
        wait_for_tcp_listen(a, REDIRECT_PORT, secs(5))?;
        let r = transfer(a, Some(cg.path()), b.sock4(PORT), SIZE, secs(30))?;
        assert!(ip_of(&r.sockname).is_loopback(), "{r:?}");
        assert!(
            ip_of(&r.server_saw_peer).is_loopback(),
            "not answered by the local listener: {r:?}"
        );
    }
    direct(a, &cg, b.sock4(PORT))?;

    let mut second = AgentSpec::attach(&[cg.path()], secret.path())
        .run_dir(&run_dir)
        .env("RUST_LOG", "info,rocks_agent::links=debug")
        .start(a)?;
    let after = links_by_hook(cg.path())?;
    assert_eq!(hooks(&after), HOOKS, "{after:?}");
    // Same binary: the swapped-in programs have the same code (tag) as the pinned ones.
    let log = second.log();
    assert_eq!(log.matches("same_code=true").count(), HOOKS.len(), "{log}");
    for (hook, old) in &before {
        let new = &after[hook];
        assert_eq!(
            new.id, old.id,
            "{hook}: a new link instead of the pinned one"
        );
        assert_ne!(
            new.prog_id, old.prog_id,
            "{hook}: the new agent's program was not swapped in"
        );
    }
    let log = second.log();
    assert!(
        log.contains("took over the links an earlier agent pinned"),
        "{log}"
    );
    for target in [b.sock4(PORT), b.sock6(PORT)] {
        carried(a, &cg, target)?;
    }
    assert_eq!(second.counter("counters", "kept")?, 2);

    // SIGTERM in the default mode leaves nothing: no link, no pin.
    assert!(second.stop()?.success(), "{}", second.log());
    assert_eq!(cgroup_links(cg.path())?, vec![], "links left after SIGTERM");
    assert_eq!(rocks_programs(cg.path())?, vec![]);
    assert_eq!(rocks_programs(second.cgroup())?, vec![]);
    assert!(!pins.exists(), "{} left after SIGTERM", pins.display());
    direct(a, &cg, b.sock4(PORT))?;
    Ok(())
}

/// A deliberate restart (`--on-exit keep`): the links stay, redirection is off in the gap
/// (connects go direct), the negative cache survives, and connections after the restart are
/// kept again. The cgroup set may change across the restart.
#[test]
fn restart_with_keep_keeps_links_and_negative_cache() -> Result<()> {
    if !require_root() || !require_tools(&["bpftool"]) {
        return Ok(());
    }
    let topo = Topology::new(&["a", "b", "c"])?;
    let (a, b, c) = (topo.host("a"), topo.host("b"), topo.host("c"));
    let (cg, gone, added) = (TestCgroup::new()?, TestCgroup::new()?, TestCgroup::new()?);
    let secret = ClusterSecret::new()?;
    let state = TempDir::new("restart-run")?;
    let run_dir = state.path().join("run");
    let _server_b = server(b, PORT)?;
    let _server_c = server(c, PORT)?;
    let _agent_b = AgentSpec::serve(secret.path()).start(b)?;

    let mut first = AgentSpec::attach(&[cg.path(), gone.path()], secret.path())
        .run_dir(&run_dir)
        .args(["--on-exit", "keep"])
        .start(a)?;
    // c has no agent: plain relay once, then c is in the negative cache.
    let r = transfer(a, Some(cg.path()), c.sock4(PORT), SIZE, secs(30))?;
    assert!(ip_of(&r.sockname).is_loopback(), "{r:?}");
    assert_eq!(negative_hosts(&first)?, vec![IpAddr::from(c.ip4())]);
    carried(a, &cg, b.sock4(PORT))?;
    let before = links_by_hook(cg.path())?;
    assert_eq!(hooks(&before), HOOKS, "{before:?}");
    assert_eq!(hooks(&links_by_hook(gone.path())?), HOOKS);

    assert!(first.stop()?.success(), "{}", first.log());
    let log = first.log();
    assert!(
        log.contains("programs left pinned for the next agent"),
        "{log}"
    );
    assert_eq!(links_by_hook(cg.path())?, before, "links after a keep exit");
    // The gap: programs attached, redirection off, so connects go direct.
    direct(a, &cg, b.sock4(PORT))?;
    direct(a, &cg, b.sock6(PORT))?;

    let mut second = AgentSpec::attach(&[cg.path(), added.path()], secret.path())
        .run_dir(&run_dir)
        .start(a)?;
    let after = links_by_hook(cg.path())?;
    for (hook, old) in &before {
        assert_eq!(
            after.get(hook).map(|l| l.id),
            Some(old.id),
            "{hook}: {after:?}"
        );
        assert_ne!(after[hook].prog_id, old.prog_id, "{hook}");
    }
    // The cgroup no longer given lost its links; the new one got them.
    assert_eq!(
        cgroup_links(gone.path())?,
        vec![],
        "links left on a cgroup no longer given"
    );
    assert_eq!(hooks(&links_by_hook(added.path())?), HOOKS);
    // The negative cache came along: c is still known to have no agent, and not redirected.
    assert_eq!(negative_hosts(&second)?, vec![IpAddr::from(c.ip4())]);
    direct(a, &cg, c.sock4(PORT))?;
    assert_eq!(second.counter("kernel", "skipped_negative")?, 1);
    // Kept again, from the old cgroup and from the added one.
    carried(a, &cg, b.sock4(PORT))?;
    carried(a, &added, b.sock6(PORT))?;
    assert_eq!(second.counter("counters", "kept")?, 2);

    assert!(second.stop()?.success());
    for cg in [&cg, &gone, &added] {
        assert_eq!(cgroup_links(cg.path())?, vec![], "{}", cg.path().display());
    }
    assert_eq!(pin_dir(&run_dir), None);
    Ok(())
}

/// `rocks-agent detach` refuses while the agent runs, and removes what a `keep` exit left:
/// nothing attached (bpftool), the pin directory gone.
#[test]
fn detach_subcommand_removes_leftovers() -> Result<()> {
    if !require_root() || !require_tools(&["bpftool"]) {
        return Ok(());
    }
    let topo = Topology::new(&["a", "b"])?;
    let (a, b) = (topo.host("a"), topo.host("b"));
    let cg = TestCgroup::new()?;
    let secret = ClusterSecret::new()?;
    let state = TempDir::new("restart-run")?;
    let run_dir = state.path().join("run");
    let _server = server(b, PORT)?;
    let mut agent = AgentSpec::attach(&[cg.path()], secret.path())
        .run_dir(&run_dir)
        .args(["--on-exit", "keep"])
        .start(a)?;

    let out = detach_cmd(&run_dir)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("an agent is running"),
        "{out:?}"
    );
    assert_eq!(
        hooks(&links_by_hook(cg.path())?),
        HOOKS,
        "detach under a running agent"
    );

    assert!(agent.stop()?.success());
    let own = agent.cgroup().to_owned();
    assert_eq!(hooks(&links_by_hook(cg.path())?), HOOKS);
    assert_eq!(
        rocks_programs(&own)?.len(),
        1,
        "sock_ops on the agent's cgroup"
    );
    let pins = pin_dir(&run_dir).expect("keep left no pins");

    let out = detach_cmd(&run_dir)?;
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Every hook on the target, and sock_ops on the agent's own cgroup.
    let want = format!("detached {} links from 2 cgroups", HOOKS.len() + 1);
    assert!(stderr.contains(&want), "{stderr}");
    assert_eq!(cgroup_links(cg.path())?, vec![]);
    assert_eq!(rocks_programs(cg.path())?, vec![]);
    assert_eq!(rocks_programs(&own)?, vec![]);
    assert!(!pins.exists(), "{}", pins.display());
    direct(a, &cg, b.sock4(PORT))?;

    // Nothing left is not an error.
    let out = detach_cmd(&run_dir)?;
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nothing pinned"),
        "{out:?}"
    );
    Ok(())
}

/// Two agents in two network namespaces, each with its own run directory, pin apart: one
/// stopping (or being killed and cleaned up) leaves the other's links, pins and kept
/// connections alone.
#[test]
fn two_run_dirs_do_not_collide() -> Result<()> {
    if !require_root() || !require_tools(&["bpftool"]) {
        return Ok(());
    }
    let topo = Topology::new(&["a", "b", "c"])?;
    let (a, b, c) = (topo.host("a"), topo.host("b"), topo.host("c"));
    let (cg_a, cg_c) = (TestCgroup::new()?, TestCgroup::new()?);
    let secret = ClusterSecret::new()?;
    let _server = server(b, PORT)?;
    let _agent_b = AgentSpec::serve(secret.path()).start(b)?;
    let mut agent_a = AgentSpec::attach(&[cg_a.path()], secret.path()).start(a)?;
    let agent_c = AgentSpec::attach(&[cg_c.path()], secret.path()).start(c)?;

    let (pins_a, pins_c) = (
        pin_dir(agent_a.run_dir()).expect("a pinned nothing"),
        pin_dir(agent_c.run_dir()).expect("c pinned nothing"),
    );
    assert_ne!(pins_a, pins_c);
    let links_c = links_by_hook(cg_c.path())?;
    assert_eq!(hooks(&links_c), HOOKS);

    // a dies hard and its leftovers are removed: c is untouched.
    agent_a.kill()?;
    let out = detach_cmd(agent_a.run_dir())?;
    assert!(out.status.success(), "{out:?}");
    assert!(!pins_a.exists());
    assert_eq!(cgroup_links(cg_a.path())?, vec![]);
    assert_eq!(links_by_hook(cg_c.path())?, links_c);
    assert!(pins_c.join("links").is_dir());
    carried(c, &cg_c, b.sock4(PORT))?;
    direct(a, &cg_a, b.sock4(PORT))?;
    Ok(())
}

/// A pinned state map whose layout is not this binary's (another version's, or anything else
/// under that name) is not reused: the agent starts it empty, says so, and works.
#[test]
fn a_pinned_map_of_another_shape_is_started_empty() -> Result<()> {
    if !require_root() || !require_tools(&["bpftool"]) {
        return Ok(());
    }
    let topo = Topology::new(&["a", "b", "c"])?;
    let (a, b, c) = (topo.host("a"), topo.host("b"), topo.host("c"));
    let cg = TestCgroup::new()?;
    let secret = ClusterSecret::new()?;
    let state = TempDir::new("restart-run")?;
    let run_dir = state.path().join("run");
    let _server_b = server(b, PORT)?;
    let _server_c = server(c, PORT)?;
    let _agent_b = AgentSpec::serve(secret.path()).start(b)?;
    let mut first = AgentSpec::attach(&[cg.path()], secret.path())
        .run_dir(&run_dir)
        .args(["--on-exit", "keep"])
        .start(a)?;
    transfer(a, Some(cg.path()), c.sock4(PORT), SIZE, secs(30))?;
    assert_eq!(negative_hosts(&first)?, vec![IpAddr::from(c.ip4())]);
    assert!(first.stop()?.success());

    let pins = pin_dir(&run_dir).expect("keep left no pins");
    let cache = pins.join("maps/ROCKS_NEGATIVE_CACHE");
    std::fs::remove_file(&cache)?;
    let mut cmd = std::process::Command::new("bpftool");
    cmd.args(["map", "create"]).arg(&cache).args([
        "type",
        "hash",
        "key",
        "4",
        "value",
        "4",
        "entries",
        "8",
        "name",
        "not_rocks",
    ]);
    rocks_e2e::util::run_checked(&mut cmd)?;

    let second = AgentSpec::attach(&[cg.path()], secret.path())
        .run_dir(&run_dir)
        .start(a)?;
    let log = second.log();
    assert!(
        log.contains("the pinned map has another shape than this agent's; starting it empty")
            && log.contains("ROCKS_NEGATIVE_CACHE"),
        "{log}"
    );
    assert_eq!(negative_hosts(&second)?, Vec::<IpAddr>::new());
    carried(a, &cg, b.sock4(PORT))?;
    // The fresh map is the one pinned now, with the agent's shape (an LRU hash).
    let out = rocks_e2e::util::run_checked(
        std::process::Command::new("bpftool")
            .args(["-j", "map", "show", "pinned"])
            .arg(&cache),
    )?;
    assert!(out.contains("lru_hash"), "{out}");
    Ok(())
}

/// Pins are named by the run directory, which two agents in different network namespaces
/// could share (containers with a private /run and the host's bpffs). An agent never takes
/// over the pins of another namespace: it refuses to start and says what to do.
#[test]
fn pins_of_another_network_namespace_are_refused() -> Result<()> {
    if !require_root() || !require_tools(&["bpftool"]) {
        return Ok(());
    }
    let topo = Topology::new(&["a", "c"])?;
    let (a, c) = (topo.host("a"), topo.host("c"));
    let (cg_a, cg_c) = (TestCgroup::new()?, TestCgroup::new()?);
    let secret = ClusterSecret::new()?;
    let state = TempDir::new("restart-run")?;
    let run_dir = state.path().join("run");
    let mut first = AgentSpec::attach(&[cg_a.path()], secret.path())
        .run_dir(&run_dir)
        .args(["--on-exit", "keep"])
        .start(a)?;
    assert!(first.stop()?.success());
    let links_a = links_by_hook(cg_a.path())?;
    assert_eq!(hooks(&links_a), HOOKS);

    let err = AgentSpec::attach(&[cg_c.path()], secret.path())
        .run_dir(&run_dir)
        .start(c)
        .expect_err("an agent in another namespace took over the pins");
    let text = format!("{err:#}");
    assert!(
        text.contains("belong to an agent in another network namespace")
            && text.contains("rocks-agent detach"),
        "{text}"
    );
    // Nothing changed: a's links are where they were, c's cgroup got nothing.
    assert_eq!(links_by_hook(cg_a.path())?, links_a);
    assert_eq!(cgroup_links(cg_c.path())?, vec![]);

    let out = detach_cmd(&run_dir)?;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(cgroup_links(cg_a.path())?, vec![]);
    assert_eq!(pin_dir(&run_dir), None);
    Ok(())
}
