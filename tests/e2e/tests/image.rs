//! The container image, run the way the DaemonSet runs it (`deploy/kubernetes/04-daemonset.yaml`),
//! keeps a connection across an address change.
//!
//! One machine, two hosts (network namespaces on a bridge): on host a, the agent from the image
//! runs under podman in a's network namespace (the DaemonSet's `hostNetwork`), with only
//! CAP_BPF and CAP_NET_ADMIN, no new privileges, a read-only root, the host's cgroup2 tree
//! mounted read-only and bpffs, the config and the secret mounted as files; on host b,
//! `rocks-agent serve` runs natively. `rocks-testpeer` in a cgroup on a sends and receives
//! 64 MiB each way, pausing after 20 MiB while a's address changes; the transfer must finish
//! byte-exact through the resumed session. Then `podman stop` (SIGTERM) must detach the
//! programs and end the container cleanly.
//!
//! Ignored by a plain `cargo test`: it needs the image. `cargo xtask image --test` builds it and
//! runs this with `ROCKS_IMAGE` and `ROCKS_PODMAN_ROOT` set.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use common::*;
use rocks_e2e::agent::run_agent;
use rocks_e2e::bpf::cgroup_programs;
use rocks_e2e::util::{TempDir, describe, next_id, run_checked, wait_until};
use rocks_e2e::{AgentSpec, Child, ClusterSecret, TestCgroup, Topology, require_root, require_tools};
use serde_json::Value;

const PORT: u16 = 5011;
const SIZE: u64 = 64 * MIB;
const PAUSE_AT: u64 = 20 * MIB;

/// podman as `cargo xtask image` uses it: its own store (vfs), runc, cgroupfs, file events.
fn podman(store: &Path) -> Command {
    let mut cmd = Command::new("podman");
    cmd.arg("--root")
        .arg(store.join("root"))
        .arg("--runroot")
        .arg(store.join("run"))
        .args(["--storage-driver", "vfs", "--runtime", "runc", "--cgroup-manager", "cgroupfs"])
        .args(["--events-backend", "file"]);
    cmd
}

/// A running container; removed (forcibly, if still there) when dropped.
struct Container {
    name: String,
    store: PathBuf,
    run: Child,
}

impl Container {
    fn exec(&self, args: &[&str]) -> Command {
        let mut cmd = podman(&self.store);
        cmd.args(["exec", &self.name]).args(args);
        cmd
    }

    fn log(&self) -> String {
        self.run.stderr_text()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman(&self.store).args(["rm", "--force", "--time", "0", &self.name]).output();
        if std::thread::panicking() {
            eprintln!("--- containerized rocks-agent log ---\n{}", self.log());
        }
    }
}

fn status_json(run_dir: &Path) -> Result<Value> {
    let out = run_agent(None, [std::ffi::OsStr::new("status"), "--json".as_ref(), "--run-dir".as_ref(), run_dir.as_os_str()], secs(10))?;
    ensure!(out.status.success(), "status failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn status_table(run_dir: &Path) -> String {
    run_agent(None, [std::ffi::OsStr::new("status"), "--run-dir".as_ref(), run_dir.as_os_str()], secs(10))
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|e| format!("(status failed: {e:#})"))
}

#[test]
#[ignore = "needs the container image: run `cargo xtask image --test`"]
fn containerized_agent_keeps_a_connection_across_an_address_change() -> Result<()> {
    if !require_root() || !require_tools(&["podman", "runc", "conmon", "bpftool"]) {
        return Ok(());
    }
    let image = std::env::var("ROCKS_IMAGE").unwrap_or_else(|_| "localhost/rocks-agent:dev".into());
    let store = PathBuf::from(std::env::var("ROCKS_PODMAN_ROOT").context("ROCKS_PODMAN_ROOT: run `cargo xtask image --test`")?);

    let topo = Topology::new(&["a", "b"])?;
    let (a, b) = (topo.host("a"), topo.host("b"));
    let cg = TestCgroup::new()?;
    let secret = ClusterSecret::new()?;
    let _server = server(b, PORT)?;
    let agent_b = AgentSpec::serve(secret.path()).start(b)?;

    // The ConfigMap's file, with this test's cgroup, and the host paths the DaemonSet mounts.
    let dir = TempDir::new("image")?;
    let (config_dir, run_dir) = (dir.path().join("config"), dir.path().join("run"));
    std::fs::create_dir(&config_dir)?;
    std::fs::write(
        config_dir.join("agent.toml"),
        format!(
            "cgroup = [\"{}\"]\nsecret-file = \"/etc/rocks/secret/cluster.secret\"\nlisten = \"[::]:4470\"\n\
             run-dir = \"/run/rocks\"\nkeep-for = \"72h\"\nmetrics = \"127.0.0.1:9470\"\n",
            cg.path().display()
        ),
    )?;
    let secret_dir = secret.path().parent().context("secret dir")?;

    // The node's part of transparent dials (README, "The server sees the real client"): the
    // container's /proc/sys is read-only, so the node sets these, as
    // deploy/systemd/90-rocks-transparent.conf does on a host.
    let mut sysctl = a.exec("sysctl");
    sysctl.args(["-w", "net.ipv4.tcp_fwmark_accept=1", "net.ipv4.fwmark_reflect=1", "net.ipv6.fwmark_reflect=1"]);
    run_checked(&mut sysctl)?;

    let name = format!("rocks-e2e-{}-{}", std::process::id(), next_id());
    let mut run = podman(&store);
    run.args(["run", "--rm", "--name", &name])
        // hostNetwork: the namespace of host a.
        .arg(format!("--network=ns:/var/run/netns/{}", a.name()))
        // securityContext: capabilities drop ALL, add BPF and NET_ADMIN; no privilege
        // escalation; read-only root; root user; seccomp Unconfined (podman's default profile,
        // like containerd's, allows bpf(2) only with CAP_SYS_ADMIN).
        .args(["--cap-drop=all", "--cap-add=BPF,NET_ADMIN", "--security-opt=no-new-privileges"])
        .arg("--security-opt=seccomp=unconfined")
        .args(["--read-only", "--user=0:0"])
        // The volumes (hostPath cgroup read-only, hostPath bpffs, hostPath run dir, ConfigMap,
        // Secret).
        .args(["--volume=/sys/fs/cgroup:/sys/fs/cgroup:ro", "--volume=/sys/fs/bpf:/sys/fs/bpf"])
        .arg(format!("--volume={}:/run/rocks", run_dir.display()))
        .arg(format!("--volume={}:/etc/rocks/config:ro", config_dir.display()))
        .arg(format!("--volume={}:/etc/rocks/secret:ro", secret_dir.display()))
        .args(["--env=RUST_LOG=info", "--env=NO_COLOR=1"])
        // Needed on this machine: setrlimit is not permitted to raise these.
        .args(["--ulimit=nofile=1024:1024", "--ulimit=nproc=1024:1024"])
        .arg(&image)
        .args(["attach", "--config", "/etc/rocks/config/agent.toml"]);
    std::fs::create_dir(&run_dir)?;
    eprintln!("+ {}", describe(&run));
    let mut container = Container { name: name.clone(), store: store.clone(), run: Child::spawn(run)? };

    // The DaemonSet's readiness probe: `/rocks-agent status` inside the container.
    let started = Instant::now();
    let ready = wait_until(secs(60), || {
        if matches!(container.run.try_wait(), Ok(Some(_))) {
            return true;
        }
        container.exec(&["/rocks-agent", "status", "--run-dir", "/run/rocks"]).output().is_ok_and(|o| o.status.success())
    });
    if let Some(st) = container.run.try_wait()? {
        bail!("the container exited at start ({st}):\n{}", container.log());
    }
    ensure!(ready, "the readiness probe never passed within 60 s:\n{}", container.log());
    eprintln!("containerized agent ready after {:.1?} (readiness probe: podman exec {name} /rocks-agent status)", started.elapsed());

    // What the container is: its capabilities and cgroup, as the kernel sees them.
    let pid = run_checked(podman(&store).args(["inspect", "--format", "{{.State.Pid}}", &name]))?;
    let pid = pid.trim();
    let proc_status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let cap_eff = proc_status.lines().find(|l| l.starts_with("CapEff:")).unwrap_or_default().to_owned();
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    eprintln!("container agent: host pid {pid}, {cap_eff}, cgroup2 {}", cgroup.lines().find(|l| l.starts_with("0::")).unwrap_or("?"));
    // CAP_NET_ADMIN (12) and CAP_BPF (39) only.
    assert_eq!(cap_eff.split_whitespace().nth(1), Some("0000008000001000"), "{cap_eff}");

    let s = status_json(&run_dir)?;
    assert_eq!(s["mode"], "attach", "{s}");
    assert_eq!(s["cgroups"], serde_json::json!([cg.path().display().to_string()]), "{s}");
    // Without CAP_PERFMON aya's name probe (a tracepoint program) fails and the programs load
    // unnamed, so they are told by attach type here, not by the `rocks_` name prefix.
    let attached = cgroup_programs(cg.path())?;
    let mut types: Vec<&str> = attached.iter().map(|p| p.attach_type.as_str()).collect();
    types.sort_unstable();
    assert_eq!(
        types,
        [
            "cgroup_inet4_connect",
            "cgroup_inet4_getpeername",
            "cgroup_inet6_connect",
            "cgroup_inet6_getpeername",
            "cgroup_inet_sock_release",
            "cgroup_sock_ops"
        ],
        "programs attached to the test cgroup: {attached:?}"
    );

    // The transfer, paused after 20 MiB each way; a's address changes during the pause.
    let target = b.sock4(PORT);
    let client = spawn_client(
        a,
        Some(cg.path()),
        target,
        SIZE,
        &["--pause-after", &PAUSE_AT.to_string(), "--pause-ms", "3000"],
    )?;
    let dst = target.to_string();
    let row = |s: &Value| s["connections"].as_array().and_then(|c| c.iter().find(|r| r["destination"] == dst.as_str()).cloned());
    let mut last = None;
    let paused = wait_until(secs(30), || {
        last = status_json(&run_dir).ok().and_then(|s| row(&s));
        last.as_ref().is_some_and(|r| r["mode"] == "kept" && r["bytes_sent"].as_u64().unwrap_or(0) >= PAUSE_AT)
    });
    ensure!(paused, "the kept connection never reached the pause point: {last:?}\n{}", container.log());
    let before = last.clone().unwrap();
    eprintln!("before the address change:\n{}", status_table(&run_dir));

    let old = a.ip4();
    let t0 = Instant::now();
    let new = topo.change_ip4("a", 11)?;
    eprintln!("host a: address {old} -> {new}");
    let resumed = wait_until(secs(15), || {
        last = status_json(&run_dir).ok().and_then(|s| row(&s));
        last.as_ref().is_some_and(|r| r["resumes"].as_u64().unwrap_or(0) >= 1)
    });
    ensure!(resumed, "no resume after the address change: {last:?}\n{}", container.log());
    eprintln!("resumed {:.0?} after the change (seen in status):\n{}", t0.elapsed(), status_table(&run_dir));

    let report = finish_client(client, SIZE, secs(120)).map_err(|e| e.context(container.log()))?;
    eprintln!(
        "client: {} bytes up, {} bytes down, sha256 match up {} down {}, {} ms",
        report.up, report.down, report.up_sha256_match, report.down_sha256_match, report.total_ms
    );
    assert_eq!(report.peername, dst, "{report:?}");
    // b's peer agent now sees the session's transport come from a's new address.
    let sb = agent_b.status_json()?;
    let log_b = agent_b.log();
    assert!(
        log_b.lines().any(|l| l.contains("serving a kept connection") && l.contains(&old.to_string())),
        "b served the session from {old}:\n{log_b}"
    );
    assert_eq!(sb["counters"]["peer_sessions"], 1, "{sb}");
    let log = container.log();
    let resumed_line = log.lines().find(|l| l.contains("session resumed id=")).unwrap_or_default();
    let changed_line = log.lines().find(|l| l.contains("network changed")).unwrap_or_default();
    eprintln!("container log:\n  {changed_line}\n  {resumed_line}");
    assert!(!resumed_line.is_empty() && resumed_line.contains(&format!("session={}", before["session_id"].as_str().unwrap_or("?"))), "{log}");

    // SIGTERM (what the kubelet sends): programs detached, a clean exit.
    let stop = Instant::now();
    run_checked(podman(&store).args(["stop", "--time", "15", &name]))?;
    let out = container.run.wait_with_timeout(secs(20))?;
    eprintln!("podman stop took {:.1?}; container exit {}", stop.elapsed(), out.status);
    assert!(out.status.success(), "container exit {}:\n{}", out.status, container.log());
    assert!(container.log().contains("detached; exiting"), "{}", container.log());
    assert_eq!(cgroup_programs(cg.path())?, vec![], "programs left attached after the stop");
    // The secret never shows in the container's log.
    let hex = std::fs::read_to_string(secret.path())?.trim().to_owned();
    assert!(!container.log().contains(&hex[..16]), "the secret is in the log");
    Ok(())
}
