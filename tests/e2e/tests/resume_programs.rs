//! Real programs carried across faults: an OpenSSH session streaming 200 MiB and an rsync of a
//! 200 MiB file, each from the attached cgroup on host a to sshd on host b (both hosts run
//! `attach`; b's cgroup is empty), survive a change of a's address and then 30 s with a's link
//! down, both landing mid-transfer. The bytes are compared by sha256 at both ends.
//!
//! The transfers are paced (the remote `dd` loop sleeps between MiBs; rsync runs with
//! `--bwlimit`) so that each fault hits the stream while it flows, which the test checks from
//! a's `status --json` at the moment of the fault.

mod common;
mod resume_support;

use std::io::Read;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use common::*;
use resume_support::*;
use rocks_e2e::spawn::join_cgroup;
use rocks_e2e::testpeer::{self, BLOCK, Direction, Pattern};
use rocks_e2e::util::TempDir;
use rocks_e2e::{
    Agent, AgentSpec, Child, ClusterSecret, Sshd, TestCgroup, Topology, require_root, require_tools,
};
use sha2::{Digest, Sha256};

const SSH_PORT: u16 = 2222;
const SIZE: u64 = 200 * MIB;
/// The stream progress (bytes the client's agent carried) at which each fault strikes.
const CHANGE_AT: u64 = 30 * MIB;
const LINK_DOWN_AT: u64 = 60 * MIB;
const LINK_DOWN: std::time::Duration = secs(30);

/// Hosts, both agents and sshd. Fields drop in order: sshd, agents, cgroups, hosts.
struct Rig {
    sshd: Sshd,
    a: Agent,
    _b: Agent,
    cg: TestCgroup,
    _cg_b: TestCgroup,
    _secret: ClusterSecret,
    topo: Topology,
}

impl Rig {
    fn new() -> Result<Rig> {
        let topo = Topology::new(&["a", "b"])?;
        let (cg, cg_b) = (TestCgroup::new()?, TestCgroup::new()?);
        let secret = ClusterSecret::new()?;
        let sshd = Sshd::start(topo.host("b"), SSH_PORT)?;
        let b = AgentSpec::attach(&[cg_b.path()], secret.path()).start(topo.host("b"))?;
        let a = AgentSpec::attach(&[cg.path()], secret.path()).start(topo.host("a"))?;
        Ok(Rig {
            sshd,
            a,
            _b: b,
            cg,
            _cg_b: cg_b,
            _secret: secret,
            topo,
        })
    }

    /// While `program` runs: once the connection to `dst` carried `CHANGE_AT` bytes (in the
    /// direction `progress` reads), a's address changes (`v6`: its IPv6 address); once it carried
    /// `LINK_DOWN_AT`, a's link goes down for 30 s. Each fault must land before the end of the
    /// stream, and each must be followed by a resume. Returns the program's output and the
    /// connection's id in a's status.
    fn faults_during(
        &self,
        mut program: Child,
        dst: SocketAddr,
        v6: bool,
        progress: &str,
    ) -> Result<(std::process::Output, u64)> {
        let context = |e: anyhow::Error| {
            e.context(format!(
                "a's log:\n{}\nsshd's log:\n{}",
                self.a.log(),
                self.sshd.log()
            ))
        };
        let id = watching(&self.a, &dst.to_string(), |w| -> Result<u64> {
            let row = w.wait_row(secs(60), "carried enough to change the address", |r| {
                r["mode"] == "kept" && num(r, progress) >= CHANGE_AT
            })?;
            let new = if v6 { self.topo.change_ip6("a", 11)?.to_string() } else { self.topo.change_ip4("a", 11)?.to_string() };
            let t0 = Instant::now();
            ensure!(num(&row, progress) < SIZE, "the stream was over before the address change: {row}");
            let resumed = w.wait_resumes(1, secs(15))?;
            eprintln!(
                "{progress} {} MiB: address -> {new}, resumed within {:.0} ms (status poll), last_resume_ms {}",
                num(&row, progress) >> 20,
                (w.first_since(t0, |r| num(r, "resumes") >= 1).unwrap_or(t0) - t0).as_secs_f64() * 1e3,
                resumed["last_resume_ms"]
            );

            let row = w.wait_row(secs(60), "carried enough to take the link down", |r| num(r, progress) >= LINK_DOWN_AT)?;
            self.topo.set_link("a", false)?;
            let t0 = Instant::now();
            ensure!(num(&row, progress) < SIZE, "the stream was over before the link went down: {row}");
            w.wait_row(secs(10), "noticed the link going down", |r| r["state"] != "active")?;
            std::thread::sleep(LINK_DOWN.saturating_sub(t0.elapsed()));
            ensure!(w.listed_throughout(t0), "the connection vanished while the link was down");
            let stalled = w.last_row().context("no row")?;
            self.topo.set_link("a", true)?;
            let t1 = Instant::now();
            let resumed = w.wait_resumes(2, secs(20))?;
            eprintln!(
                "{progress} {} MiB: link down {LINK_DOWN:?} (stalled at {} MiB, state {}), resumed {:.0} ms after link up (status poll), last_resume_ms {}",
                num(&row, progress) >> 20,
                num(&stalled, progress) >> 20,
                stalled["state"],
                (w.first_since(t1, |r| num(r, "resumes") >= 2).unwrap_or(t1) - t1).as_secs_f64() * 1e3,
                resumed["last_resume_ms"]
            );
            Ok(num(&resumed, "id"))
        })
        .map_err(context)?;
        Ok((program.wait_success(secs(180)).map_err(context)?, id))
    }
}

/// A 200 MiB file of pattern bytes (both hosts share the filesystem) and its sha256.
fn data_file(dir: &Path, seed: u64) -> Result<(std::path::PathBuf, String)> {
    let path = dir.join("data");
    let mut data = Vec::with_capacity(SIZE as usize);
    let mut p = Pattern::new(seed, Direction::Down);
    while (data.len() as u64) < SIZE {
        data.extend_from_slice(p.next_chunk(BLOCK.min(SIZE as usize - data.len())));
    }
    std::fs::write(&path, &data)?;
    Ok((path, testpeer::hex(&Sha256::digest(&data))))
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match f.read(&mut buf)? {
            0 => break,
            n => sha.update(&buf[..n]),
        }
    }
    Ok(testpeer::hex(&sha.finalize()))
}

fn first_word(s: &str) -> &str {
    s.split_whitespace().next().unwrap_or_default()
}

/// ssh from the cgroup on a runs a remote command on b that streams a 200 MiB file, one MiB at
/// a time with short sleeps, then prints the file's sha256 (computed on b) on stderr. a's
/// address changes and its link goes down for 30 s during the stream; the session survives and
/// the bytes that arrive hash the same.
#[test]
fn ssh_stream_survives_address_change_and_link_down() -> Result<()> {
    if !require_root() || !require_tools(&["ssh", "sshd", "ssh-keygen", "sha256sum", "dd"]) {
        return Ok(());
    }
    let rig = Rig::new()?;
    let b = rig.topo.host("b");
    let dir = TempDir::new("ssh-stream")?;
    let (file, want) = data_file(dir.path(), 21)?;
    let remote = format!(
        "f={f}; i=0; while [ $i -lt {mib} ]; do dd if=$f bs=1M skip=$i count=1 status=none || exit 1; \
         i=$((i+1)); sleep 0.04; done; sha256sum $f >&2",
        f = file.display(),
        mib = SIZE / MIB
    );
    let started = Instant::now();
    let mut cmd = rig
        .sshd
        .ssh_command(rig.topo.host("a"), b.ip4().into(), &remote);
    join_cgroup(&mut cmd, rig.cg.path())?;
    let ssh = Child::spawn(cmd)?;
    let (out, id) = rig.faults_during(
        ssh,
        SocketAddr::new(b.ip4().into(), SSH_PORT),
        false,
        "bytes_received",
    )?;
    let took = started.elapsed();

    assert_eq!(
        first_word(&String::from_utf8_lossy(&out.stderr)),
        want,
        "sha256 of the file on b"
    );
    assert_eq!(out.stdout.len() as u64, SIZE, "bytes that arrived on a");
    assert_eq!(
        testpeer::hex(&Sha256::digest(&out.stdout)),
        want,
        "the stream differs from the file"
    );
    let s = rig.a.status_json()?;
    assert_eq!(s["counters"]["kept"], 1, "{}", counters_line(&s));
    let resumes = resumes_logged(&rig.a.log(), id);
    assert!(resumes >= 2, "{resumes} resumes logged:\n{}", rig.a.log());
    eprintln!(
        "ssh stream of {} MiB across both faults: exact, {took:.1?}, {resumes} resumes",
        SIZE >> 20
    );
    Ok(())
}

/// rsync (over ssh, IPv6) pushes a 200 MiB file from a to b at 20 MiB/s; a's IPv6 address
/// changes and its link goes down for 30 s meanwhile. rsync completes and the copy matches.
#[test]
fn rsync_survives_address_change_and_link_down() -> Result<()> {
    if !require_root() || !require_tools(&["ssh", "sshd", "ssh-keygen", "rsync"]) {
        return Ok(());
    }
    let rig = Rig::new()?;
    let b = rig.topo.host("b");
    let dir = TempDir::new("rsync-stream")?;
    let (src, want) = data_file(dir.path(), 22)?;
    let dst = dir.path().join("copy");
    let started = Instant::now();
    let mut cmd = rig.topo.host("a").exec("rsync");
    cmd.args([
        "-a",
        "--whole-file",
        "--bwlimit=20480",
        "-e",
        &rig.sshd.rsh(),
    ])
    .arg(&src)
    .arg(format!("root@[{}]:{}", b.ip6(), dst.display()));
    join_cgroup(&mut cmd, rig.cg.path())?;
    let rsync = Child::spawn(cmd)?;
    let (_, id) = rig.faults_during(
        rsync,
        SocketAddr::new(b.ip6().into(), SSH_PORT),
        true,
        "bytes_sent",
    )?;
    let took = started.elapsed();

    assert_eq!(std::fs::metadata(&dst)?.len(), SIZE, "size of the copy");
    assert_eq!(sha256_file(&dst)?, want, "the copy differs from the source");
    assert_eq!(sha256_file(&src)?, want, "the source changed?");
    let s = rig.a.status_json()?;
    assert_eq!(s["counters"]["kept"], 1, "{}", counters_line(&s));
    let resumes = resumes_logged(&rig.a.log(), id);
    assert!(resumes >= 2, "{resumes} resumes logged:\n{}", rig.a.log());
    eprintln!(
        "rsync of {} MiB across both faults: exact, {took:.1?}, {resumes} resumes",
        SIZE >> 20
    );
    Ok(())
}
