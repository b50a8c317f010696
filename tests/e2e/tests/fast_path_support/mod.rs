//! Shared by the fast-path regression tests (`fast_path*.rs`): two hosts, an agent pair with
//! `attach --fast-path MODE` on a, `rocks-fastpath-app serve` on b, and the app client run
//! in a's cgroup with its JSON report parsed and checked.
#![allow(dead_code)]

use std::time::Duration;

use anyhow::{Context, Result, bail};
use rocks_e2e::util::wait_until;
use rocks_e2e::{
    Agent, AgentSpec, Child, ClusterSecret, TestCgroup, Topology, spawn_in, wait_for_tcp_listen,
};
use serde_json::Value;

pub const MIB: u64 = 1 << 20;
pub const PORT: u16 = 5070;

pub fn app_bin() -> &'static str {
    env!("CARGO_BIN_EXE_rocks-fastpath-app")
}

/// Two hosts, the agents, the app server on b.
pub struct Setup {
    pub mode: &'static str,
    // Drop order: the programs and agents before the cgroup and the namespaces.
    pub server: Child,
    pub agent_a: Agent,
    pub agent_b: Agent,
    pub cg: TestCgroup,
    pub secret: ClusterSecret,
    pub topo: Topology,
    served: usize,
}

impl Setup {
    pub fn new(mode: &'static str) -> Result<Setup> {
        Setup::with_args(mode, &[])
    }

    pub fn with_args(mode: &'static str, extra: &[&str]) -> Result<Setup> {
        Setup::with(mode, extra, &[])
    }

    /// `auto` with the sockmap probe's findings ignored (the agent's testing knob), so the
    /// tests can exercise `auto`'s own mechanics on a kernel that fails the probe.
    pub fn auto_engaged() -> Result<Setup> {
        Setup::with("auto", &[], &[("ROCKS_FAST_PATH_IGNORE_PROBE", "1")])
    }

    pub fn with(mode: &'static str, extra: &[&str], env: &[(&str, &str)]) -> Result<Setup> {
        let topo = Topology::new(&["a", "b"])?;
        let cg = TestCgroup::new()?;
        let secret = ClusterSecret::new()?;
        let (a, b) = (topo.host("a"), topo.host("b"));
        let mut cmd = b.exec(app_bin());
        cmd.args(["serve", "--listen", &format!("[::]:{PORT}")]);
        let server = Child::spawn(cmd)?;
        wait_for_tcp_listen(b, PORT, Duration::from_secs(5))?;
        let agent_b = AgentSpec::serve(secret.path()).start(b)?;
        let mut spec = AgentSpec::attach(&[cg.path()], secret.path())
            .args(["--fast-path", mode])
            .args(extra);
        for (k, v) in env {
            spec = spec.env(k, v);
        }
        let agent_a = spec.start(a)?;
        Ok(Setup {
            mode,
            server,
            agent_a,
            agent_b,
            cg,
            secret,
            topo,
            served: 0,
        })
    }

    /// Runs the app client in a's cgroup against b and returns its report; fails unless the
    /// client succeeded (every byte checked, both hashes equal) and the server's record of
    /// the same connection has no error.
    pub fn run(&mut self, args: &[&str], timeout: Duration) -> Result<(Value, Value)> {
        let (report, server) = self.run_unchecked(args, timeout)?;
        if report["ok"] != true || !server["error"].is_null() {
            bail!(
                "fast path {}: client {args:?} failed:\nclient {report}\nserver {server}\n{}",
                self.mode,
                counters(&self.agent_a)
            );
        }
        Ok((report, server))
    }

    /// As [`Setup::run`], returning the reports whatever they say.
    pub fn run_unchecked(&mut self, args: &[&str], timeout: Duration) -> Result<(Value, Value)> {
        let to = self.topo.host("b").sock4(PORT).to_string();
        let mut full = vec!["client", "--connect", &to];
        full.extend_from_slice(args);
        let mut child = spawn_in(self.topo.host("a"), self.cg.path(), app_bin(), &full)?;
        let out = child.wait_with_timeout(timeout)?;
        let report: Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "client printed {:?}, stderr {:?}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        self.served += 1;
        let server = self.server_line(self.served)?;
        Ok((report, server))
    }

    /// The `n`th record (1-based) the server printed; waits for it.
    fn server_line(&self, n: usize) -> Result<Value> {
        let mut line = None;
        wait_until(Duration::from_secs(10), || {
            line = self
                .server
                .stdout_text()
                .lines()
                .nth(n - 1)
                .map(str::to_owned);
            line.is_some()
        });
        let line = line.with_context(|| {
            format!(
                "the server printed no record {n}: {}",
                self.server.stdout_text()
            )
        })?;
        Ok(serde_json::from_str(&line)?)
    }

    pub fn fast_path_msgs(&self) -> Result<u64> {
        self.agent_a.counter("kernel", "fast_path_msgs")
    }
}

/// Agent a's kernel and agent counters, for failure messages.
pub fn counters(agent: &Agent) -> String {
    match agent.status_json() {
        Ok(s) => format!(
            "agent a: kernel {} fast path {} counters {}",
            s["kernel"], s["fast_path"], s["counters"]
        ),
        Err(e) => format!("agent a status: {e:#}"),
    }
}

pub fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}
