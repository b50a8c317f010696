//! Acceptance (g): every wrong invocation of the agent exits non-zero at once with one clear
//! sentence on stderr naming what is wrong, and leaves the host as it was: nothing attached to
//! the cgroup, nothing listening, the other agent's control socket intact.
//!
//! The agents run inside test hosts, so the ports they would bind are the hosts' own.

mod common;

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;

use anyhow::Result;
use common::*;
use rocks_e2e::agent::run_agent;
use rocks_e2e::bpf::rocks_programs;
use rocks_e2e::cgroup::cgroup2_mount;
use rocks_e2e::util::{TempDir, run_checked, wait_until};
use rocks_e2e::{
    AgentSpec, Child, ClusterSecret, Host, TestCgroup, Topology, require_root, require_tools,
    testpeer_bin,
};

/// Runs the agent with `args` in `host`; it must fail (exit status 1) within 10 s. Returns its
/// stderr.
fn fails(host: Option<&Host>, args: &[&dyn AsRef<std::ffi::OsStr>]) -> String {
    let args: Vec<OsString> = args.iter().map(|a| a.as_ref().to_owned()).collect();
    let out: Output =
        run_agent(host, &args, secs(10)).unwrap_or_else(|e| panic!("rocks-agent {args:?}: {e:#}"));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "rocks-agent {args:?} should fail with status 1: {out:?}"
    );
    assert!(
        stderr.contains("rocks-agent: error: "),
        "rocks-agent {args:?}: {stderr}"
    );
    stderr
}

/// Asserts `text` contains every one of `needles`.
fn says(text: &str, needles: &[&str]) {
    for n in needles {
        assert!(text.contains(n), "expected {n:?} in:\n{text}");
    }
}

/// TCP listeners in `host` (`ss -ltn`), one line each.
fn listeners(host: &Host) -> Vec<String> {
    let mut cmd = host.exec("ss");
    cmd.args(["-H", "-l", "-t", "-n"]);
    run_checked(&mut cmd)
        .expect("ss")
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

fn nothing_changed(host: &Host, cg: &TestCgroup) {
    assert_eq!(
        rocks_programs(cg.path()).expect("bpftool"),
        vec![],
        "a failed start attached programs"
    );
    assert_eq!(
        listeners(host),
        Vec::<String>::new(),
        "a failed start left listeners"
    );
}

#[test]
fn cgroup_paths_that_are_not_cgroup2_directories() -> Result<()> {
    if !require_root() || !require_tools(&["bpftool", "ss"]) {
        return Ok(());
    }
    let topo = Topology::new(&["a"])?;
    let a = topo.host("a");
    let cg = TestCgroup::new()?;
    let secret = ClusterSecret::new()?;
    let s = secret.path();

    let missing = cgroup2_mount()?.join(format!("rocks-no-such-cgroup-{}", std::process::id()));
    let err = fails(
        Some(a),
        &[&"attach", &"--cgroup", &missing, &"--secret-file", &s],
    );
    says(
        &err,
        &[&format!("cgroup path {} does not exist", missing.display())],
    );

    let err = fails(
        Some(a),
        &[&"attach", &"--cgroup", &"/proc", &"--secret-file", &s],
    );
    let mount = cgroup2_mount()?;
    says(
        &err,
        &[
            "/proc is not a cgroup v2 directory",
            &format!("cgroup2 is mounted at {}", mount.display()),
        ],
    );

    // A regular file, even one inside the cgroup2 filesystem.
    let file = cg.path().join("cgroup.procs");
    let err = fails(
        Some(a),
        &[&"attach", &"--cgroup", &file, &"--secret-file", &s],
    );
    says(
        &err,
        &[&format!(
            "cgroup path {} is not a directory",
            file.display()
        )],
    );
    let err = fails(Some(a), &[&"attach", &"--cgroup", &s, &"--secret-file", &s]);
    says(
        &err,
        &[&format!("cgroup path {} is not a directory", s.display())],
    );

    // One bad cgroup among good ones: nothing is attached to the good one either.
    let err = fails(
        Some(a),
        &[
            &"attach",
            &"--cgroup",
            &cg.path(),
            &"--cgroup",
            &"/proc",
            &"--secret-file",
            &s,
        ],
    );
    says(&err, &["/proc is not a cgroup v2 directory"]);
    nothing_changed(a, &cg);
    Ok(())
}

#[test]
fn secret_file_missing_or_malformed() -> Result<()> {
    if !require_root() || !require_tools(&["bpftool", "ss"]) {
        return Ok(());
    }
    let topo = Topology::new(&["a"])?;
    let a = topo.host("a");
    let cg = TestCgroup::new()?;
    let dir = TempDir::new("secrets")?;
    let file = |name: &str, content: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    };
    let attach = |secret: &Path| {
        fails(
            Some(a),
            &[
                &"attach",
                &"--cgroup",
                &cg.path(),
                &"--secret-file",
                &secret,
            ],
        )
    };

    let missing = dir.path().join("absent.secret");
    says(
        &attach(&missing),
        &[
            &format!("secret file {} does not exist", missing.display()),
            "rocks-agent keygen",
        ],
    );
    // `serve` reads it the same way.
    let err = fails(Some(a), &[&"serve", &"--secret-file", &missing]);
    says(
        &err,
        &[&format!("secret file {} does not exist", missing.display())],
    );

    let short = file("short.secret", "0123456789\n");
    says(
        &attach(&short),
        &[&format!(
            "secret file {} must hold 64 hex characters, found 10",
            short.display()
        )],
    );
    let empty = file("empty.secret", "");
    says(&attach(&empty), &["must hold 64 hex characters, found 0"]);
    // 64 characters, one of them not hex; the file's content must not be echoed.
    let mut content = "0123456789abcdef".repeat(4);
    content.replace_range(5..6, "z");
    assert_eq!(content.len(), 64);
    let not_hex = file("nothex.secret", &content);
    let err = attach(&not_hex);
    says(
        &err,
        &[&format!(
            "secret file {} holds a character that is not hex at position 5",
            not_hex.display()
        )],
    );
    assert!(
        !err.contains(&content[..20]),
        "the secret file's content is echoed: {err}"
    );
    let zero = file("zero.secret", &"0".repeat(64));
    says(&attach(&zero), &["holds the all-zero secret"]);
    nothing_changed(a, &cg);

    // keygen never overwrites, and writes 64 hex characters with mode 0600.
    let made = dir.path().join("made.secret");
    let out = run_agent(
        None,
        [
            OsString::from("keygen"),
            "--out".into(),
            made.clone().into(),
        ],
        secs(10),
    )?;
    assert!(out.status.success(), "{out:?}");
    let text = std::fs::read_to_string(&made)?;
    assert!(
        text.trim().len() == 64 && text.trim().bytes().all(|b| b.is_ascii_hexdigit()),
        "{text:?}"
    );
    assert_eq!(
        std::fs::metadata(&made)?.permissions().mode() & 0o777,
        0o600
    );
    let err = fails(None, &[&"keygen", &"--out", &made]);
    says(
        &err,
        &[&format!(
            "refusing to overwrite existing file {}",
            made.display()
        )],
    );
    assert_eq!(
        std::fs::read_to_string(&made)?,
        text,
        "keygen changed an existing secret"
    );
    Ok(())
}

#[test]
fn ports_already_in_use() -> Result<()> {
    if !require_root() || !require_tools(&["bpftool", "ss"]) {
        return Ok(());
    }
    let topo = Topology::new(&["a"])?;
    let a = topo.host("a");
    let cg = TestCgroup::new()?;
    let secret = ClusterSecret::new()?;
    let s = secret.path();
    let run = TempDir::new("ports")?;
    let run_dir = run.path().join("run");
    let listen_on = |addr: &str| -> Result<Child> {
        let mut cmd = a.exec(testpeer_bin!());
        cmd.args(["serve", "--listen", addr]);
        let child = Child::spawn(cmd)?;
        let port: u16 = addr.rsplit(':').next().unwrap().parse()?;
        rocks_e2e::wait_for_tcp_listen(a, port, secs(5))?;
        Ok(child)
    };

    // The peer port (default --listen [::]:4470), for attach and for serve.
    let blocker = listen_on("[::]:4470")?;
    let err = fails(
        Some(a),
        &[
            &"attach",
            &"--cgroup",
            &cg.path(),
            &"--secret-file",
            &s,
            &"--run-dir",
            &run_dir,
        ],
    );
    says(&err, &["peer port [::]:4470 is already in use", "--listen"]);
    let err = fails(
        Some(a),
        &[&"serve", &"--secret-file", &s, &"--run-dir", &run_dir],
    );
    says(&err, &["peer port [::]:4470 is already in use", "--listen"]);
    assert_eq!(
        listeners(a).len(),
        1,
        "only the blocker listens: {:?}",
        listeners(a)
    );
    assert!(rocks_programs(cg.path())?.is_empty());
    drop(blocker);
    assert!(wait_until(secs(5), || listeners(a).is_empty()));

    // The redirect port (default 4471 on loopback).
    let blocker = listen_on("127.0.0.1:4471")?;
    let err = fails(
        Some(a),
        &[
            &"attach",
            &"--cgroup",
            &cg.path(),
            &"--secret-file",
            &s,
            &"--run-dir",
            &run_dir,
        ],
    );
    says(
        &err,
        &[
            "redirect port 127.0.0.1:4471 is already in use",
            "--redirect-port",
        ],
    );
    assert_eq!(
        listeners(a).len(),
        1,
        "the peer listener was not released: {:?}",
        listeners(a)
    );
    drop(blocker);
    // IPv6 loopback too.
    let blocker = listen_on("[::1]:4471")?;
    let err = fails(
        Some(a),
        &[
            &"attach",
            &"--cgroup",
            &cg.path(),
            &"--secret-file",
            &s,
            &"--run-dir",
            &run_dir,
        ],
    );
    says(
        &err,
        &[
            "redirect port [::1]:4471 is already in use",
            "--redirect-port",
        ],
    );
    drop(blocker);
    assert!(wait_until(secs(5), || listeners(a).is_empty()));
    nothing_changed(a, &cg);
    Ok(())
}

#[test]
fn two_agents_with_one_run_dir_and_status_without_agent() -> Result<()> {
    if !require_root() || !require_tools(&["bpftool", "ss"]) {
        return Ok(());
    }
    // Two hosts, so the second agent's ports are free and only the run directory clashes.
    let topo = Topology::new(&["a", "b"])?;
    let (a, b) = (topo.host("a"), topo.host("b"));
    let cg = TestCgroup::new()?;
    let secret = ClusterSecret::new()?;
    let first = AgentSpec::serve(secret.path()).start(a)?;
    let shared = first.run_dir();
    let err = fails(
        Some(b),
        &[
            &"attach",
            &"--cgroup",
            &cg.path(),
            &"--secret-file",
            &secret.path(),
            &"--run-dir",
            &shared,
        ],
    );
    says(
        &err,
        &[
            &format!(
                "another rocks agent is already running with run directory {}",
                shared.display()
            ),
            "--run-dir",
        ],
    );
    let err = fails(
        Some(b),
        &[
            &"serve",
            &"--secret-file",
            &secret.path(),
            &"--run-dir",
            &shared,
        ],
    );
    says(&err, &["another rocks agent is already running"]);
    nothing_changed(b, &cg);
    // The first agent is undisturbed: its socket is still there and answers.
    assert_eq!(first.status_json()?["pid"], first.pid());

    // `status` with nobody behind the run directory, existing or not, JSON or table.
    let empty = TempDir::new("status")?;
    let absent = empty.path().join("absent");
    for dir in [empty.path(), absent.as_path()] {
        for json in [true, false] {
            let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"status", &"--run-dir", &dir];
            if json {
                args.push(&"--json");
            }
            let err = fails(None, &args);
            says(
                &err,
                &[&format!(
                    "no agent is running with run directory {}",
                    dir.display()
                )],
            );
        }
    }
    Ok(())
}

#[test]
fn missing_privileges_are_named() -> Result<()> {
    if !require_root() || !require_tools(&["setpriv", "bpftool", "ss"]) {
        return Ok(());
    }
    let topo = Topology::new(&["a"])?;
    let a = topo.host("a");
    let cg = TestCgroup::new()?;
    // Readable by nobody: the privilege check comes after the secret is read.
    let dir = TempDir::new("unpriv")?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    let secret = dir.path().join("cluster.secret");
    std::fs::write(&secret, format!("{}\n", "ab".repeat(32)))?;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644))?;
    let agent = rocks_e2e::agent::agent_bin()?;

    let run = |setpriv: &[&str], sub: &[&dyn AsRef<std::ffi::OsStr>]| -> Output {
        let mut cmd = a.exec("setpriv");
        cmd.args(setpriv)
            .arg("--")
            .arg(&agent)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        for s in sub {
            cmd.arg(s);
        }
        Child::spawn(cmd)
            .unwrap()
            .wait_with_timeout(secs(10))
            .unwrap()
    };
    let attach: [&dyn AsRef<std::ffi::OsStr>; 5] = [
        &"attach",
        &"--cgroup",
        &cg.path(),
        &"--secret-file",
        &secret,
    ];

    // An ordinary user: all three are missing.
    let out = run(
        &["--reuid=65534", "--regid=65534", "--clear-groups"],
        &attach,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    says(
        &err,
        &[
            "attach needs root",
            "(missing: CAP_BPF, CAP_NET_ADMIN)",
        ],
    );
    // Root without two of them: exactly those are named.
    let out = run(
        &[
            "--inh-caps=-bpf,-net_admin",
            "--bounding-set=-bpf,-net_admin",
        ],
        &attach,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    says(&err, &["(missing: CAP_BPF, CAP_NET_ADMIN)"]);
    assert!(!err.contains("CAP_SYS_ADMIN)"), "{err}");
    nothing_changed(a, &cg);

    // The contrast: `serve` loads no eBPF and runs as an ordinary user, once told not to dial
    // transparently (that needs CAP_NET_ADMIN, and says so).
    let run_dir = dir.path().join("run");
    let serve_as_nobody = |extra: &[&str]| {
        let mut cmd = a.exec("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(&agent)
            .args(["serve", "--secret-file"])
            .arg(&secret)
            .arg("--run-dir")
            .arg(&run_dir)
            .args(extra)
            .env("NO_COLOR", "1");
        cmd
    };
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))?;
    let out = Child::spawn(serve_as_nobody(&[]))?.wait_with_timeout(secs(10))?;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    says(
        &String::from_utf8_lossy(&out.stderr),
        &["transparent mode", "--transparent off"],
    );
    let mut serve = Child::spawn(serve_as_nobody(&["--transparent", "off"]))?;
    let answered = wait_until(secs(10), || {
        run_agent(
            None,
            [
                OsString::from("status"),
                "--json".into(),
                "--run-dir".into(),
                run_dir.clone().into(),
            ],
            secs(5),
        )
        .is_ok_and(|o| o.status.success())
    });
    assert!(
        answered,
        "unprivileged serve never answered: {}",
        serve.stderr_text()
    );
    assert!(serve.try_wait()?.is_none());
    Ok(())
}

#[test]
fn bad_flag_values() -> Result<()> {
    // No root needed: clap refuses these before anything runs.
    let out = run_agent(
        None,
        [
            "attach",
            "--cgroup",
            "/x",
            "--secret-file",
            "/y",
            "--probe-timeout",
            "soon",
        ],
        secs(10),
    )?;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    says(
        &String::from_utf8_lossy(&out.stderr),
        &["--probe-timeout", "soon"],
    );
    let out = run_agent(None, ["attach", "--secret-file", "/y"], secs(10))?;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    says(&String::from_utf8_lossy(&out.stderr), &["--cgroup"]);
    let out = run_agent(None, ["serve"], secs(10))?;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    says(&String::from_utf8_lossy(&out.stderr), &["--secret-file"]);
    Ok(())
}
