//! `cargo xtask bench`: what rocks costs when nothing breaks and how fast it recovers when
//! something does, against direct TCP and a socat relay pair in the agents' positions.
//!
//! Two hosts (network namespaces on one bridge, see [`lab`]) run, in one go:
//!
//! * direct TCP from a to b;
//! * a socat relay pair: on a, socat on 127.0.0.1:1xxxx forwards to b:2xxxx, where socat
//!   forwards to the server on 127.0.0.1 (where the two agents sit);
//! * rocks: the client in the cgroup that `rocks-agent attach` keeps, with the fast path on
//!   and off, `rocks-agent serve` on b.
//!
//! and measures throughput (iperf3), request/response latency, connection setup, resume
//! after an address change and after an outage, black-hole detection, agent memory and CPU
//! per GiB ([`measure`]). [`report`] writes `docs/benchmarks.md`, a chart and the raw JSON;
//! `--profile` adds where the agents spend CPU and memory ([`profile`]).

mod lab;
mod measure;
mod profile;
mod report;
mod stats;
mod tools;

use std::{
    fs,
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::{
    build, exec,
    setup::{self, Mode},
};
use lab::{Group, Lab};

/// Measure rocks against direct TCP and a socat relay pair: throughput, latency, setup,
/// resume, black-hole detection, memory, CPU; writes docs/benchmarks.md (needs root).
#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Options {
    /// A short run (under five minutes once the agent is built): fewer runs and trials, 2,000
    /// idle connections instead of 10,000.
    #[arg(long)]
    quick: bool,
    /// Also profile the agents: perf (CPU by function during a transfer; syscalls, context
    /// switches and CPU per request/response) and heaptrack (heap by agent source line, idle and
    /// busy). Builds the agent once more with line tables; needs perf and heaptrack
    /// (`apt-get install linux-perf heaptrack`).
    #[arg(long)]
    profile: bool,
    /// Only these parts (comma-separated): throughput, latency, setup, resume, outage,
    /// blackhole, memory. Default: all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Where the report goes: DIR/benchmarks.md and DIR/bench/ (default: the repository's docs).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Use this agent binary instead of building one with `cargo build --release`.
    #[arg(long, value_name = "PATH")]
    agent: Option<PathBuf>,
    /// Set up the hosts, servers and agents, print how to reach them, and wait for Ctrl-C
    /// (for poking at the agents by hand); measures nothing.
    #[arg(long, hide = true)]
    hold: bool,
    /// With --profile: profile this agent binary (default: the agent built with line tables).
    #[arg(long, hide = true, value_name = "PATH")]
    profile_agent: Option<PathBuf>,
    /// Print every command the bench runs.
    #[arg(long, short)]
    verbose: bool,
    #[command(subcommand)]
    helper: Option<tools::Helper>,
}

pub const PARTS: [&str; 7] = [
    "throughput",
    "latency",
    "setup",
    "resume",
    "outage",
    "blackhole",
    "memory",
];

/// How much of everything one run does.
#[derive(Clone, Debug)]
pub struct Plan {
    pub quick: bool,
    /// Throughput and latency are measured in rounds, each variant once per round, so a
    /// change in the machine's load hits all variants alike.
    pub rounds: usize,
    pub throughput_secs: u32,
    /// Request/response exchanges per variant and size, over all rounds.
    pub latency_count: usize,
    pub setup_trials: usize,
    pub resume_trials: usize,
    pub outage_trials: usize,
    pub outage: Duration,
    pub blackhole_trials: usize,
    pub idle_connections: usize,
    pub busy_connections: usize,
    pub busy_secs: u32,
    pub profile_secs: u32,
    pub profile_connections: usize,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                quick,
                rounds: 1,
                throughput_secs: 3,
                latency_count: 2_000,
                setup_trials: 20,
                resume_trials: 5,
                outage_trials: 2,
                outage: Duration::from_secs(10),
                blackhole_trials: 2,
                idle_connections: 2_000,
                busy_connections: 100,
                busy_secs: 3,
                profile_secs: 5,
                profile_connections: 1_000,
            }
        } else {
            Plan {
                quick,
                rounds: 5,
                throughput_secs: 10,
                latency_count: 20_000,
                setup_trials: 100,
                resume_trials: 20,
                outage_trials: 20,
                outage: Duration::from_secs(10),
                blackhole_trials: 10,
                idle_connections: 10_000,
                busy_connections: 100,
                busy_secs: 10,
                profile_secs: 10,
                profile_connections: 2_000,
            }
        }
    }
}

/// Whether the agent keeps its fast path on by default (read from `attach --help` at the
/// start): the `rocks` variant runs the default, `rocks_fast_path_*` the other setting.
static DEFAULT_FAST_PATH: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn default_fast_path() -> bool {
    DEFAULT_FAST_PATH.load(Ordering::Relaxed)
}

/// Reads the agent's default `--fast-path` from its help text (`[default: off]`).
fn detect_default_fast_path(agent: &Path) -> Result<bool> {
    let help = exec::stdout(Command::new(agent).args(["attach", "--help"]))?;
    let after = help
        .split_once("--fast-path")
        .map(|(_, rest)| rest)
        .context("the agent's `attach --help` lists no --fast-path")?;
    let default = after
        .split_once("[default: ")
        .and_then(|(_, rest)| rest.split(']').next())
        .context("the agent's `attach --help` gives no default for --fast-path")?;
    Ok(default.trim() == "on")
}

/// What carries the bytes from the client on a to the server on b.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    Direct,
    Socat,
    /// The agents as configured by default.
    Rocks,
    /// The agents with the fast path set the other way.
    RocksOtherFastPath,
}

impl Variant {
    pub const ALL: [Variant; 4] = [
        Variant::Direct,
        Variant::Socat,
        Variant::Rocks,
        Variant::RocksOtherFastPath,
    ];

    pub fn key(self) -> &'static str {
        match (self, default_fast_path()) {
            (Variant::Direct, _) => "direct",
            (Variant::Socat, _) => "socat",
            (Variant::Rocks, _) => "rocks",
            (Variant::RocksOtherFastPath, false) => "rocks_fast_path_on",
            (Variant::RocksOtherFastPath, true) => "rocks_fast_path_off",
        }
    }

    pub fn label(self) -> &'static str {
        match (self, default_fast_path()) {
            (Variant::Direct, _) => "direct TCP",
            (Variant::Socat, _) => "socat relay pair",
            (Variant::Rocks, false) => "rocks (fast path off, the default)",
            (Variant::Rocks, true) => "rocks (fast path on, the default)",
            (Variant::RocksOtherFastPath, false) => "rocks, fast path on",
            (Variant::RocksOtherFastPath, true) => "rocks, fast path off",
        }
    }

    /// The fast path setting the client's agent needs, for the rocks variants.
    fn fast_path(self) -> Option<bool> {
        match self {
            Variant::Rocks => Some(default_fast_path()),
            Variant::RocksOtherFastPath => Some(!default_fast_path()),
            _ => None,
        }
    }

    /// The client's cgroup and where it connects to reach `port` on b.
    fn target(self, port: u16) -> (Group, std::net::SocketAddr) {
        match self {
            Variant::Direct => (Group::Plain, (lab::B_IP, port).into()),
            Variant::Socat => (
                Group::Plain,
                (std::net::Ipv4Addr::LOCALHOST, port + SOCAT_A_OFFSET).into(),
            ),
            Variant::Rocks | Variant::RocksOtherFastPath => (Group::Kept, (lab::B_IP, port).into()),
        }
    }

    /// The cgroups whose CPU is the relay's: the two agents or the two socats.
    fn relay_groups(self) -> &'static [Group] {
        match self {
            Variant::Direct => &[],
            Variant::Socat => &[Group::RelayA, Group::RelayB],
            Variant::Rocks | Variant::RocksOtherFastPath => &[Group::AgentA, Group::AgentB],
        }
    }
}

pub const IPERF_PORT: u16 = 5201;
pub const ECHO_PORT: u16 = 7001;
pub const GREET_PORT: u16 = 7002;
pub const UDP_PORT: u16 = 7003;
/// socat on a listens on 127.0.0.1:<port + 10000>, socat on b on b:<port + 20000>.
const SOCAT_A_OFFSET: u16 = 10_000;
const SOCAT_B_OFFSET: u16 = 20_000;

pub fn run(options: Options) -> Result<()> {
    if let Some(helper) = options.helper {
        return tools::run(helper);
    }
    if !setup::is_root() {
        bail!(
            "`cargo xtask bench` needs root: it creates network namespaces and cgroups and \
             attaches eBPF programs. Run it as root."
        );
    }
    for part in &options.only {
        if !PARTS.contains(&part.as_str()) {
            bail!(
                "unknown part {part:?} in --only; the parts are {}",
                PARTS.join(", ")
            );
        }
    }
    lab::set_verbose(options.verbose);
    ctrlc::set_handler(|| {
        if !lab::INTERRUPTED.swap(true, Ordering::SeqCst) {
            eprintln!("\nInterrupted: stopping and cleaning up.");
        }
    })
    .context("installing the Ctrl-C handler")?;

    let started = Instant::now();
    let agent = match &options.agent {
        Some(path) => path.clone(),
        None => {
            setup::ensure(Mode::Install)?;
            exec::run(&mut exec::command(
                "cargo build --release --package rocks-agent",
            ))?;
            build::agent_binary(true)?
        }
    };
    // The profile runs the same code built with line tables, so that heaptrack can name the
    // agent's source lines (line tables do not change the generated code).
    let profile_agent = match (&options.profile_agent, &options.agent, options.profile) {
        (_, _, false) => None,
        (Some(path), _, true) => Some(path.clone()),
        (None, Some(path), true) => Some(path.clone()),
        (None, None, true) => Some(build_profile_agent()?),
    };
    for tool in ["iperf3", "socat", "nft", "nsenter", "ss"] {
        if exec::probe(Command::new("sh").args(["-c", &format!("command -v {tool}")])).is_none() {
            bail!("{tool} is missing (`cargo xtask setup` installs it)");
        }
    }
    let out = match &options.out {
        Some(dir) => dir.clone(),
        None => workspace_root().join("docs"),
    };
    DEFAULT_FAST_PATH.store(detect_default_fast_path(&agent)?, Ordering::Relaxed);
    lab::remove_leftovers();

    let mut plan = Plan::new(options.quick);
    // Each kept connection is two descriptors in each agent (a: the application's loopback
    // socket and the transport; b: the transport and the destination socket).
    let files = lab::raise_file_limit();
    let most = usize::try_from(files.saturating_sub(256) / 2).unwrap_or(usize::MAX);
    let mut limit_note = None;
    if plan.idle_connections > most {
        limit_note = Some(format!(
            "The idle-connection figure uses {most} connections instead of {}: the file limit here \
             is {files} (raising it needs CAP_SYS_RESOURCE, which this machine does not grant), and \
             each kept connection takes two descriptors in each agent.",
            plan.idle_connections
        ));
        plan.idle_connections = most;
    }
    let parts: Vec<&str> = if options.only.is_empty() {
        PARTS.to_vec()
    } else {
        options.only.iter().map(String::as_str).collect()
    };
    println!(
        "{} bench of {} ({}).",
        if plan.quick { "A quick" } else { "A full" },
        agent.display(),
        parts.join(", ")
    );
    let mut results = report::Results::new(&plan, &agent);
    results.notes.extend(limit_note);
    let mut bench = Bench::new(&agent, profile_agent.as_deref(), plan)?;
    if options.hold {
        let outcome = bench.hold();
        bench.lab.cleanup();
        return outcome;
    }
    let outcome = bench.run(&parts, options.profile, &mut results);
    results.load_after = load_average();
    if let Err(error) = &outcome {
        bench.show_logs(error);
    }
    bench.lab.cleanup();
    let took = started.elapsed();
    results.took_secs = took.as_secs_f64();
    outcome?;
    let written = report::write(&results, &out)?;
    println!(
        "The bench took {:.0} s. Wrote {}.",
        took.as_secs_f64(),
        written.join(", ")
    );
    Ok(())
}

/// `cargo build --release` of the agent with line tables, in a target directory of its own
/// (so the release binary the bench measures stays as it is).
fn build_profile_agent() -> Result<PathBuf> {
    let release = build::agent_binary(true)?;
    let target = release
        .parent()
        .and_then(Path::parent)
        .context("the agent binary is not in <target>/release")?
        .join("bench-profile");
    let mut cmd = exec::command("cargo build --release --package rocks-agent");
    cmd.env("CARGO_TARGET_DIR", &target)
        .env("CARGO_PROFILE_RELEASE_DEBUG", "line-tables-only");
    exec::run(&mut cmd)?;
    Ok(target.join("release").join("rocks-agent"))
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_owned()
}

pub fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The lab with its servers, relays and agents, and what state the agents are in.
pub struct Bench {
    lab: Lab,
    plan: Plan,
    /// Agent A's pid and fast path setting, while it runs.
    agent_a: Option<(u32, bool)>,
    agent_b: Option<u32>,
    starts: usize,
    iperf_server: u32,
}

impl Bench {
    fn new(agent: &Path, profile_agent: Option<&Path>, plan: Plan) -> Result<Bench> {
        let lab = Lab::new(agent, profile_agent, plan.setup_trials)?;
        Ok(Bench {
            lab,
            plan,
            agent_a: None,
            agent_b: None,
            starts: 0,
            iperf_server: 0,
        })
    }

    fn run(&mut self, parts: &[&str], profile: bool, results: &mut report::Results) -> Result<()> {
        self.start_servers()?;
        println!(
            "Made hosts a (192.0.2.1), b (192.0.2.2) and c (192.0.2.3, no agent) on one bridge; \
             started iperf3 -s, an echo and a greeting server on b (and c), socat relay pairs \
             and the agents."
        );
        if parts.contains(&"throughput") || parts.contains(&"latency") {
            self.throughput_and_latency(parts, results)?;
        }
        if parts.contains(&"setup") {
            self.setup_times(results)?;
        }
        if parts
            .iter()
            .any(|p| ["resume", "outage", "blackhole"].contains(p))
        {
            self.recovery(parts, results)?;
        }
        if parts.contains(&"memory") {
            self.memory(results)?;
        }
        if profile {
            results.profile = Some(self.profile()?);
        }
        Ok(())
    }

    fn hold(&mut self) -> Result<()> {
        self.start_servers()?;
        let a = self.agent_a(default_fast_path())?;
        println!(
            "Holding the lab until Ctrl-C. Namespaces {} (a), {} (b), {} (switch); cgroups {} \
             (kept) and {} (plain); agent a pid {a} (run dir {}), agent b pid {:?} (run dir {}); \
             iperf3 -s on b:{IPERF_PORT}, echo on b:{ECHO_PORT}, greeting on b:{GREET_PORT}.",
            self.lab.a.ns,
            self.lab.b.ns,
            self.lab.switch,
            self.lab.cgroup(Group::Kept).display(),
            self.lab.cgroup(Group::Plain).display(),
            self.run_dir("a").display(),
            self.agent_b,
            self.run_dir("b").display(),
        );
        loop {
            lab::sleep(Duration::from_secs(3600))?;
        }
    }

    fn secret(&self) -> PathBuf {
        self.lab.dir().join("secret")
    }

    fn run_dir(&self, host: &str) -> PathBuf {
        self.lab.dir().join(format!("{host}-run"))
    }

    fn start_servers(&mut self) -> Result<()> {
        let lab = &mut self.lab;
        let mut keygen = Command::new(&lab.agent);
        keygen
            .arg("keygen")
            .arg("--out")
            .arg(lab.dir().join("secret"));
        lab::quiet(&mut keygen)?;

        let mut iperf = lab.command(&lab.b, Some(Group::Servers), "iperf3");
        iperf.args(["-s", "-p", &IPERF_PORT.to_string()]);
        self.iperf_server = lab.spawn("iperf3 server", iperf, "iperf3-server.log")?;
        let port = ECHO_PORT.to_string();
        let echo = lab.helper(
            &lab.b,
            Group::Servers,
            &["serve", "--port", &port, "--mode", "echo"],
        );
        lab.spawn("echo server", echo, "echo-server.log")?;
        let port = GREET_PORT.to_string();
        let greet = lab.helper(
            &lab.b,
            Group::Servers,
            &["serve", "--port", &port, "--mode", "greet"],
        );
        lab.spawn("greeting server", greet, "greet-server.log")?;
        let port = UDP_PORT.to_string();
        let udp = lab.helper(
            &lab.b,
            Group::Servers,
            &["serve", "--port", &port, "--mode", "udp"],
        );
        lab.spawn("UDP echo server", udp, "udp-server.log")?;
        let port = GREET_PORT.to_string();
        let greet_c = lab.helper(
            &lab.c,
            Group::Servers,
            &["serve", "--port", &port, "--mode", "greet"],
        );
        lab.spawn("greeting server on c", greet_c, "greet-server-c.log")?;

        for port in [IPERF_PORT, ECHO_PORT, GREET_PORT] {
            let (a_port, b_port) = (port + SOCAT_A_OFFSET, port + SOCAT_B_OFFSET);
            let mut a = lab.command(&lab.a, Some(Group::RelayA), "socat");
            a.arg(format!(
                "TCP4-LISTEN:{a_port},bind=127.0.0.1,reuseaddr,fork,backlog=4096,nodelay"
            ))
            .arg(format!("TCP4:{}:{b_port},nodelay", lab::B_IP));
            lab.spawn(
                &format!("socat a:{a_port}"),
                a,
                &format!("socat-a-{a_port}.log"),
            )?;
            let mut b = lab.command(&lab.b, Some(Group::RelayB), "socat");
            b.arg(format!(
                "TCP4-LISTEN:{b_port},bind={},reuseaddr,fork,backlog=4096,nodelay",
                lab::B_IP
            ))
            .arg(format!("TCP4:127.0.0.1:{port},nodelay"));
            lab.spawn(
                &format!("socat b:{b_port}"),
                b,
                &format!("socat-b-{b_port}.log"),
            )?;
        }
        let (a, b, c) = (lab.a.ns.clone(), lab.b.ns.clone(), lab.c.ns.clone());
        for port in [IPERF_PORT, ECHO_PORT, GREET_PORT] {
            lab.wait_for_listener(&b, port)?;
            lab.wait_for_listener(&b, port + SOCAT_B_OFFSET)?;
            lab.wait_for_listener(&a, port + SOCAT_A_OFFSET)?;
        }
        lab.wait_for_listener(&c, GREET_PORT)?;
        self.start_agent_b()?;
        Ok(())
    }

    fn start_agent_b(&mut self) -> Result<u32> {
        self.restart_agent_b(None)
    }

    /// (Re)starts agent b, under `wrapper` (a profiler's command line) if given.
    fn restart_agent_b(&mut self, wrapper: Option<&[&str]>) -> Result<u32> {
        self.lab.stop("agent b", Duration::from_secs(10));
        self.agent_b = None;
        let mut cmd = self.agent_command("b", Group::AgentB, wrapper);
        cmd.arg("serve");
        let pid = self.start_agent("b", cmd)?;
        self.agent_b = Some(pid);
        Ok(pid)
    }

    /// (Re)starts agent a with the fast path on or off, unless it already runs so.
    fn agent_a(&mut self, fast_path: bool) -> Result<u32> {
        if let Some((pid, fast)) = self.agent_a
            && fast == fast_path
        {
            return Ok(pid);
        }
        self.restart_agent_a(fast_path, None)
    }

    /// (Re)starts agent a, under `wrapper` (a profiler's command line) if given.
    fn restart_agent_a(&mut self, fast_path: bool, wrapper: Option<&[&str]>) -> Result<u32> {
        self.lab.stop("agent a", Duration::from_secs(10));
        self.agent_a = None;
        let mut cmd = self.agent_command("a", Group::AgentA, wrapper);
        cmd.arg("attach")
            .arg("--cgroup")
            .arg(self.lab.cgroup(Group::Kept))
            .args(["--fast-path", if fast_path { "on" } else { "off" }])
            // The agent keeps at most a quarter of its file limit by default (two descriptors
            // per connection, and headroom); the idle-connection count is already sized to the
            // file limit, so every one of them is kept, not sent direct.
            .args(["--max-connections", &(self.plan.idle_connections + 16).to_string()]);
        let pid = self.start_agent("a", cmd)?;
        self.agent_a = Some((pid, fast_path));
        Ok(pid)
    }

    /// The agent's command line up to the subcommand, which the caller appends with its
    /// options; the common options go last.
    fn agent_command(&self, host: &str, group: Group, wrapper: Option<&[&str]>) -> Command {
        let lab = &self.lab;
        let h = if host == "a" { &lab.a } else { &lab.b };
        let mut cmd = match wrapper {
            Some(words) => {
                let mut cmd = lab.command(h, Some(group), words[0]);
                cmd.args(&words[1..]).arg(&lab.agent);
                cmd
            }
            None => lab.command(h, Some(group), &lab.agent),
        };
        cmd.env("NO_COLOR", "1");
        cmd
    }

    /// Starts the agent and waits until it answers; returns its pid (from its status, so it
    /// is the agent's even under a wrapper).
    fn start_agent(&mut self, host: &str, mut cmd: Command) -> Result<u32> {
        cmd.arg("--secret-file")
            .arg(self.secret())
            .arg("--run-dir")
            .arg(self.run_dir(host))
            .args(["--keep-for", "10m"]);
        self.starts += 1;
        let log = format!("agent-{host}-{}.log", self.starts);
        self.lab.spawn(&format!("agent {host}"), cmd, &log)?;
        let status = self.wait_for_agent(host)?;
        Ok(status["pid"].as_u64().context("the status has no pid")? as u32)
    }

    fn wait_for_agent(&mut self, host: &str) -> Result<Value> {
        let run_dir = self.run_dir(host);
        let what = format!("agent {host} to answer on {}", run_dir.display());
        lab::wait_for(
            &what,
            Duration::from_secs(30),
            Duration::from_millis(50),
            || {
                self.lab.check_programs()?;
                Ok(status(&run_dir).ok())
            },
        )
    }

    fn status(&self, host: &str) -> Result<Value> {
        status(&self.run_dir(host))
    }

    /// On failure: the end of each agent's log, before cleanup removes them.
    fn show_logs(&self, error: &anyhow::Error) {
        if lab::INTERRUPTED.load(Ordering::SeqCst) {
            return;
        }
        eprintln!("The bench failed ({error:#}). The end of the agents' logs:");
        for name in ["agent a", "agent b"] {
            if let Some(log) = self.lab.log_of(name) {
                eprintln!(
                    "--- {name} ({}) ---\n{}",
                    log.display(),
                    lab::tail(&log, 15)
                );
            }
        }
    }
}

/// `rocks-agent status --json`, straight from the control socket (one line each way).
pub fn status(run_dir: &Path) -> Result<Value> {
    let path = run_dir.join("control.sock");
    let mut stream =
        UnixStream::connect(&path).with_context(|| format!("connecting to {}", path.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(b"status\n")?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    serde_json::from_str(&reply)
        .with_context(|| format!("parsing the status from {}", path.display()))
}

