//! `--config FILE`: an agent configured only by its file keeps connections; flags given on
//! the command line override the file; a bad file stops the start with the file, line and
//! key named, before anything is attached or bound; `serve` refuses `attach`'s keys.
//! (The parser's cases are unit tests in `rocks-agent/src/config.rs`.)

mod common;
mod ops_support;

use std::path::Path;

use anyhow::Result;
use common::*;
use ops_support::*;
use rocks_e2e::agent::run_agent;
use rocks_e2e::bpf::rocks_programs;
use rocks_e2e::util::{TempDir, run_checked};
use rocks_e2e::{AgentSpec, ClusterSecret, Host, TestCgroup, Topology, require_root};

const PORT: u16 = 5031;

fn write(dir: &TempDir, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn listeners(host: &Host) -> String {
    let mut cmd = host.exec("ss");
    cmd.args(["-H", "-l", "-t", "-n"]);
    run_checked(&mut cmd).expect("ss")
}

#[test]
fn an_agent_configured_by_its_file_alone() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::new(&["a", "b"])?;
    let (a, b) = (topo.host("a"), topo.host("b"));
    let cg = TestCgroup::new()?;
    let secret = ClusterSecret::new()?;
    let _server = server(b, PORT)?;
    let _agent_b = AgentSpec::serve(secret.path()).start(b)?;

    let dir = TempDir::new("config")?;
    // Relative paths are taken from the file's directory.
    std::fs::copy(secret.path(), dir.path().join("cluster.secret"))?;
    let config = write(
        &dir,
        "agent.toml",
        &format!(
            "# everything from the file\n\
             cgroup = [\"{}\"]\n\
             secret-file = \"cluster.secret\"\n\
             listen = \"[::]:4470\"\n\
             keep-for = \"2h\"\n\
             probe-timeout = \"300ms\"\n\
             fast-path = \"on\"\n\
             exclude-ports = [{}]\n\
             metrics = \"127.0.0.1:9471\"\n\
             run-dir = \"/nonexistent/overridden-by-the-harness-flag\"\n",
            cg.path().display(),
            PORT + 1
        ),
    );
    let agent = AgentSpec::custom("attach", ["--config".as_ref(), config.as_os_str()]).start(a)?;
    let s = agent.status_json()?;
    assert_eq!(s["cgroups"], serde_json::json!([cg.path().display().to_string()]), "{s}");
    assert_eq!(s["fast_path"], true, "fast-path from the file (the default is off): {s}");
    assert_eq!(s["listen"], "[::]:4470", "{s}");
    // --run-dir on the command line (the harness gives one) won over the file's.
    assert!(agent.control_socket().exists());
    assert_eq!(scrape(a, "127.0.0.1:9471".parse()?)?.get("rocks_kept_connections_total"), 0.0);

    let r = transfer(a, Some(cg.path()), b.sock4(PORT), 4 * MIB, secs(30))?;
    assert!(ip_of(&r.sockname).is_loopback(), "redirected: {r:?}");
    let s = agent.status_json()?;
    assert_eq!(s["counters"]["kept"], 1, "{s}");
    assert!(s["kernel"]["fast_path_msgs"].as_u64().unwrap_or(0) > 0, "the file turned the fast path on: {s}");
    Ok(())
}

#[test]
fn flags_override_the_file() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::new(&["a"])?;
    let a = topo.host("a");
    let (cg_file, cg_flag) = (TestCgroup::new()?, TestCgroup::new()?);
    let secret = ClusterSecret::new()?;
    let dir = TempDir::new("config")?;
    let config = write(
        &dir,
        "agent.toml",
        &format!(
            "cgroup = [\"{}\"]\nsecret-file = \"/nonexistent/secret\"\nlisten = \"[::]:4470\"\nredirect-port = 4471\n",
            cg_file.path().display()
        ),
    );
    let agent = AgentSpec::attach(&[cg_flag.path()], secret.path())
        .args(["--config".as_ref(), config.as_os_str(), "--listen".as_ref(), "[::]:4480".as_ref()])
        .args(["--redirect-port", "4481"])
        .start(a)?;
    let s = agent.status_json()?;
    assert_eq!(s["listen"], "[::]:4480", "{s}");
    assert_eq!(s["redirect_port"], 4481, "{s}");
    assert_eq!(s["cgroups"], serde_json::json!([cg_flag.path().display().to_string()]), "the flag's cgroups replace the file's: {s}");
    assert!(!rocks_programs(cg_flag.path())?.is_empty(), "attached to the flag's cgroup");
    assert!(rocks_programs(cg_file.path())?.is_empty(), "not to the file's");
    let l = listeners(a);
    assert!(l.contains(":4480") && !l.contains(":4470 "), "{l}");
    Ok(())
}

/// Runs the agent, which must fail with status 1; returns its stderr.
fn fails(host: &Host, args: &[&std::ffi::OsStr]) -> String {
    let out = run_agent(Some(host), args, secs(10)).expect("run the agent");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    err
}

#[test]
fn a_bad_file_names_file_line_and_key_and_changes_nothing() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::new(&["a"])?;
    let a = topo.host("a");
    let cg = TestCgroup::new()?;
    let secret = ClusterSecret::new()?;
    let dir = TempDir::new("config")?;
    let good = format!("cgroup = [\"{}\"]\nsecret-file = \"{}\"\n", cg.path().display(), secret.path().display());
    let run_dir = dir.path().join("run");
    let attach = |file: &Path| {
        fails(a, &["attach".as_ref(), "--config".as_ref(), file.as_os_str(), "--run-dir".as_ref(), run_dir.as_os_str()])
    };

    let cases = [
        ("unknown.toml", format!("{good}\nbogus = 1\n"), "line 4: `bogus`: unknown key"),
        ("type.toml", format!("{good}peer-port = \"4470\"\n"), "line 3: `peer-port`: expected a port number (1-65535), found the string \"4470\""),
        ("duration.toml", format!("{good}keep-for = \"3 days\"\n"), "line 3: `keep-for`: invalid duration \"3 days\""),
        ("syntax.toml", format!("{good}keep-for = \n"), "line 3, column"),
        ("dash.toml", format!("{good}keep_for = \"1h\"\n"), "did you mean `keep-for`?"),
    ];
    for (name, text, want) in cases {
        let file = write(&dir, name, &text);
        let err = attach(&file);
        let prefix = format!("rocks-agent: error: config file {}, ", file.display());
        assert!(err.starts_with(&prefix), "{name}: {err}");
        assert!(err.contains(want), "{name}: want {want:?} in {err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
    }
    let err = attach(&dir.path().join("absent.toml"));
    assert!(err.contains(&format!("cannot read config file {}", dir.path().join("absent.toml").display())), "{err}");
    // Neither flag nor file names a cgroup.
    let file = write(&dir, "nocgroup.toml", &format!("secret-file = \"{}\"\n", secret.path().display()));
    assert!(attach(&file).contains("attach needs at least one cgroup"));
    // `serve` refuses the keys only `attach` takes.
    let file = write(&dir, "serve.toml", &good);
    let err = fails(a, &["serve".as_ref(), "--config".as_ref(), file.as_os_str(), "--run-dir".as_ref(), run_dir.as_os_str()]);
    assert!(err.contains("line 1: `cgroup`: only `rocks-agent attach` takes this key"), "{err}");

    // Nothing attached, nothing listening, no control socket.
    assert!(rocks_programs(cg.path())?.is_empty());
    assert!(listeners(a).trim().is_empty(), "{}", listeners(a));
    assert!(!run_dir.join("control.sock").exists());
    Ok(())
}
