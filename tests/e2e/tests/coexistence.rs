//! Issue 5, coexistence:
//!
//! - Another tool's eBPF program on the same cgroup keeps working while ours are attached, and
//!   after our agent stops it is still attached and still works, while ours are gone. The other
//!   program is a cgroup `connect4` hook that refuses connects to one port with EPERM, built
//!   here from raw BPF instructions and attached the way systemd attaches its programs
//!   (`BPF_PROG_ATTACH` with `BPF_F_ALLOW_MULTI`), before our agent starts.
//! - Two agents in two network namespaces on one machine, each attached to its own cgroup with
//!   its own run directory, each keep their own connections and leave the other's alone.

mod common;

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use anyhow::{Context, Result, bail};
use common::*;
use rocks_e2e::bpf::{cgroup_programs, prog_loaded, rocks_programs};
use rocks_e2e::{
    AgentSpec, Child, ClusterSecret, Host, TestCgroup, Topology, require_root, require_tools,
    spawn_in, testpeer_bin,
};

const PORT: u16 = 5073;
/// The port the other tool's program refuses.
const REFUSED_PORT: u16 = 5074;
const SIZE: u64 = 4 * MIB;

// ------------------------------------------------------------ another tool's program

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
const BPF_F_ALLOW_MULTI: u32 = 1 << 1;
/// `offsetof(struct bpf_sock_addr, user_port)`.
const USER_PORT_OFFSET: i16 = 24;

/// One BPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    /// dst_reg in the low nibble, src_reg in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

/// The `bpf(2)` attribute union, large enough for every command used here; unused bytes 0.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Attr {
        Attr([0; 128])
    }
    fn u32_at(&mut self, off: usize, v: u32) -> &mut Attr {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64_at(&mut self, off: usize, v: u64) -> &mut Attr {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> std::io::Result<i64> {
    // SAFETY: attr points to a zero-padded bpf_attr of the size passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            std::mem::size_of::<Attr>() as u32,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A cgroup `connect4` program refusing connects to `port`, attached to a cgroup in multi mode
/// with the legacy `BPF_PROG_ATTACH` (which outlives the fd: detached explicitly on drop).
struct PortRefuser {
    prog: OwnedFd,
    cgroup: OwnedFd,
    id: u32,
}

impl PortRefuser {
    /// The program's name as bpftool shows it.
    const NAME: &'static str = "other_refuse";

    fn attach(cgroup: &Path, port: u16) -> Result<PortRefuser> {
        // user_port holds the port in network order in its low 16 bits.
        let port_be = i32::from(u16::from_ne_bytes(port.to_be_bytes()));
        let insns = [
            // r2 = ctx->user_port
            insn(0x61, 2, 1, USER_PORT_OFFSET, 0),
            // r0 = 1 (allow)
            insn(0xb7, 0, 0, 0, 1),
            // if r2 != port goto exit
            insn(0x55, 2, 0, 1, port_be),
            // r0 = 0 (refuse: the application's connect fails with EPERM)
            insn(0xb7, 0, 0, 0, 0),
            // exit
            insn(0x95, 0, 0, 0, 0),
        ];
        let license = c"GPL";
        let mut log = vec![0u8; 4096];
        let mut attr = Attr::new();
        attr.u32_at(0, BPF_PROG_TYPE_CGROUP_SOCK_ADDR)
            .u32_at(4, insns.len() as u32)
            .u64_at(8, insns.as_ptr() as u64)
            .u64_at(16, license.as_ptr() as u64)
            .u32_at(24, 1)
            .u32_at(28, log.len() as u32)
            .u64_at(32, log.as_mut_ptr() as u64)
            .u32_at(68, BPF_CGROUP_INET4_CONNECT);
        attr.0[48..48 + Self::NAME.len()].copy_from_slice(Self::NAME.as_bytes());
        let fd = bpf(BPF_PROG_LOAD, &mut attr).with_context(|| {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            format!(
                "BPF_PROG_LOAD (verifier: {})",
                String::from_utf8_lossy(&log[..end])
            )
        })?;
        // SAFETY: a new fd the kernel just returned to us.
        let prog = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let cg =
            std::fs::File::open(cgroup).with_context(|| format!("open {}", cgroup.display()))?;
        let cgroup_fd: OwnedFd = cg.into();
        let mut attr = Attr::new();
        attr.u32_at(0, cgroup_fd.as_raw_fd() as u32)
            .u32_at(4, prog.as_raw_fd() as u32)
            .u32_at(8, BPF_CGROUP_INET4_CONNECT)
            .u32_at(12, BPF_F_ALLOW_MULTI);
        bpf(BPF_PROG_ATTACH, &mut attr).context("BPF_PROG_ATTACH")?;
        let id = cgroup_programs(cgroup)?
            .into_iter()
            .find(|p| p.name == Self::NAME)
            .map(|p| p.id)
            .context("the program just attached is not listed by bpftool")?;
        Ok(PortRefuser {
            prog,
            cgroup: cgroup_fd,
            id,
        })
    }
}

impl Drop for PortRefuser {
    fn drop(&mut self) {
        let mut attr = Attr::new();
        attr.u32_at(0, self.cgroup.as_raw_fd() as u32)
            .u32_at(4, self.prog.as_raw_fd() as u32)
            .u32_at(8, BPF_CGROUP_INET4_CONNECT);
        if let Err(e) = bpf(BPF_PROG_DETACH, &mut attr) {
            eprintln!("rocks-e2e: detaching {}: {e}", Self::NAME);
        }
    }
}

/// A connect from `cgroup` in `host` to `to`: `Ok(true)` if it was refused with EPERM,
/// `Ok(false)` if it connected.
fn connect_refused(host: &Host, cgroup: &Path, to: SocketAddr) -> Result<bool> {
    let to = to.to_string();
    let mut child = spawn_in(
        host,
        cgroup,
        testpeer_bin!(),
        [
            "getpeername",
            "--connect",
            &to,
            "--connect-timeout-ms",
            "5000",
        ],
    )?;
    let out = child.wait_with_timeout(secs(10))?;
    if out.status.success() {
        return Ok(false);
    }
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("Operation not permitted") {
        return Ok(true);
    }
    bail!("connect to {to} failed otherwise: {err}")
}

#[test]
fn another_tools_connect_program_keeps_working_beside_ours() -> Result<()> {
    if !require_root() || !require_tools(&["bpftool"]) {
        return Ok(());
    }
    let topo = Topology::new(&["a", "b"])?;
    let (a, b) = (topo.host("a"), topo.host("b"));
    let cg = TestCgroup::new()?;
    let secret = ClusterSecret::new()?;
    let _server = server(b, PORT)?;
    let _refused_server = server(b, REFUSED_PORT)?;
    let _agent_b = AgentSpec::serve(secret.path()).start(b)?;

    // The other tool is there first.
    let other = PortRefuser::attach(cg.path(), REFUSED_PORT)?;
    assert!(
        connect_refused(a, cg.path(), b.sock4(REFUSED_PORT))?,
        "the other program does not refuse"
    );
    assert!(
        !connect_refused(a, cg.path(), b.sock4(PORT))?,
        "the other program refuses too much"
    );

    let mut agent_a = AgentSpec::attach(&[cg.path()], secret.path()).start(a)?;
    let names: Vec<String> = cgroup_programs(cg.path())?
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert!(names.iter().any(|n| n == PortRefuser::NAME), "{names:?}");
    assert!(names.iter().any(|n| n == "rocks_connect4"), "{names:?}");

    // Both work together: theirs still refuses its port (it runs first, attached first, and
    // sees the destination as the application wrote it); ours keeps everything else.
    assert!(
        connect_refused(a, cg.path(), b.sock4(REFUSED_PORT))?,
        "refusal lost beside rocks"
    );
    let r = transfer(a, Some(cg.path()), b.sock4(PORT), SIZE, secs(30))?;
    assert!(ip_of(&r.sockname).is_loopback(), "not kept: {r:?}");
    assert_eq!(r.peername, b.sock4(PORT).to_string(), "{r:?}");
    assert_eq!(agent_a.counter("counters", "kept")?, 1);

    // Ours leave, theirs stays and still works.
    assert!(agent_a.stop()?.success(), "agent exit:\n{}", agent_a.log());
    let after = cgroup_programs(cg.path())?;
    assert!(
        after
            .iter()
            .any(|p| p.name == PortRefuser::NAME && p.id == other.id),
        "the other program was detached with ours: {after:?}"
    );
    assert!(
        rocks_programs(cg.path())?.is_empty(),
        "ours still attached: {after:?}"
    );
    assert!(prog_loaded(other.id));
    assert!(
        connect_refused(a, cg.path(), b.sock4(REFUSED_PORT))?,
        "refusal lost after rocks left"
    );
    let r = transfer(a, Some(cg.path()), b.sock4(PORT), SIZE, secs(30))?;
    assert_eq!(
        ip_of(&r.sockname),
        std::net::IpAddr::from(a.ip4()),
        "direct after rocks left: {r:?}"
    );
    Ok(())
}

/// Programs on one cgroup run in the order they were attached, then those of its ancestors, all
/// on the same context: one running after the agent's `connect4` sees the address the agent
/// wrote (its loopback listener), not the application's destination. A port filter attached
/// after the agent started, or on an ancestor cgroup, therefore does not see kept connects'
/// ports; the README says so, and this test pins the behaviour down.
#[test]
fn programs_running_after_ours_see_the_agents_loopback_address() -> Result<()> {
    if !require_root() || !require_tools(&["bpftool"]) {
        return Ok(());
    }
    let topo = Topology::new(&["a", "b"])?;
    let (a, b) = (topo.host("a"), topo.host("b"));
    let parent = TestCgroup::new()?;
    let child = parent.path().join("app");
    std::fs::create_dir(&child)?;
    let secret = ClusterSecret::new()?;
    let _refused_server = server(b, REFUSED_PORT)?;
    let _agent_b = AgentSpec::serve(secret.path()).start(b)?;

    // On the ancestor: refuses the child's connects to the port, as long as rocks is absent.
    let on_parent = PortRefuser::attach(parent.path(), REFUSED_PORT)?;
    assert!(connect_refused(a, &child, b.sock4(REFUSED_PORT))?);
    let agent_a = AgentSpec::attach(&[&child], secret.path()).start(a)?;
    let r = transfer(a, Some(&child), b.sock4(REFUSED_PORT), SIZE, secs(30))?;
    assert!(
        ip_of(&r.sockname).is_loopback(),
        "the ancestor's program ran after ours and saw the loopback port: {r:?}"
    );
    drop(on_parent);

    // On the same cgroup, attached after the agent: the same.
    let _after = PortRefuser::attach(&child, REFUSED_PORT)?;
    let r = transfer(a, Some(&child), b.sock4(REFUSED_PORT), SIZE, secs(30))?;
    assert!(ip_of(&r.sockname).is_loopback(), "{r:?}");
    assert_eq!(agent_a.counter("counters", "kept")?, 2);
    Ok(())
}

// ------------------------------------------------------------ two agents, one machine

/// The client rows of a status report, as (destination, mode).
fn client_rows(status: &serde_json::Value) -> Vec<(String, String)> {
    status["connections"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .filter(|r| r["role"] == "client")
                .map(|r| {
                    (
                        r["destination"].as_str().unwrap_or_default().to_owned(),
                        r["mode"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A paused transfer from `cgroup` in `host`, so the connection is open while the tables
/// are read.
fn held_transfer(host: &Host, cgroup: &Path, to: SocketAddr) -> Result<Child> {
    spawn_client(
        host,
        Some(cgroup),
        to,
        SIZE,
        &["--pause-after", "64KiB", "--pause-ms", "1500"],
    )
}

#[test]
fn two_agents_in_two_namespaces_keep_only_their_own_connections() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::new(&["a", "b"])?;
    let (a, b) = (topo.host("a"), topo.host("b"));
    let (cg_a, cg_b) = (TestCgroup::new()?, TestCgroup::new()?);
    let secret = ClusterSecret::new()?;
    let _server_a = server(a, PORT)?;
    let _server_b = server(b, PORT)?;
    // Same ports, different namespaces, different cgroups and run directories.
    let agent_a = AgentSpec::attach(&[cg_a.path()], secret.path()).start(a)?;
    let agent_b = AgentSpec::attach(&[cg_b.path()], secret.path()).start(b)?;
    assert_ne!(agent_a.run_dir(), agent_b.run_dir());

    // Each agent's cgroup keeps its connection toward the other host, both at once.
    let from_a = held_transfer(a, cg_a.path(), b.sock4(PORT))?;
    let from_b = held_transfer(b, cg_b.path(), a.sock4(PORT))?;
    let seen = rocks_e2e::util::wait_until(secs(10), || {
        let (sa, sb) = (agent_a.status_json(), agent_b.status_json());
        matches!((sa, sb), (Ok(sa), Ok(sb))
            if client_rows(&sa) == vec![(b.sock4(PORT).to_string(), "kept".to_owned())]
            && client_rows(&sb) == vec![(a.sock4(PORT).to_string(), "kept".to_owned())])
    });
    assert!(
        seen,
        "each agent must carry exactly its own cgroup's connection: a {} b {}",
        agent_a.status_json()?,
        agent_b.status_json()?
    );
    for c in [from_a, from_b] {
        let r = finish_client(c, SIZE, secs(30))?;
        assert!(ip_of(&r.sockname).is_loopback(), "{r:?}");
    }

    // A process of a's cgroup running in b's namespace belongs to neither agent: agent a's
    // programs skip namespaces other than its own, and agent b is not attached to that cgroup.
    let (ra, rb) = (
        agent_a.counter("kernel", "redirected")?,
        agent_b.counter("kernel", "redirected")?,
    );
    let r = transfer(b, Some(cg_a.path()), a.sock4(PORT), SIZE, secs(30))?;
    assert_eq!(
        ip_of(&r.sockname),
        std::net::IpAddr::from(b.ip4()),
        "went direct: {r:?}"
    );
    assert_eq!(agent_a.counter("kernel", "redirected")?, ra);
    assert_eq!(agent_b.counter("kernel", "redirected")?, rb);

    let (sa, sb) = (agent_a.status_json()?, agent_b.status_json()?);
    for (s, name) in [(&sa, "a"), (&sb, "b")] {
        assert_eq!(s["kernel"]["redirected"], 1, "{name}: {}", counters_line(s));
        assert_eq!(s["counters"]["accepted"], 1, "{name}: {}", counters_line(s));
        assert_eq!(s["counters"]["kept"], 1, "{name}: {}", counters_line(s));
        assert_eq!(
            s["counters"]["peer_sessions"],
            1,
            "{name}: {}",
            counters_line(s)
        );
    }
    Ok(())
}
