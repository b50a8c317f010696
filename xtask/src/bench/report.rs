//! The results of one run and what is written from them: `benchmarks.md` (tables, targets,
//! profile), `bench/chart.svg` (throughput and latency) and `bench/results.json` (raw data).
//! A hand-written section between the analysis markers in an existing `benchmarks.md` is kept.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};
use serde_json::{Value, json};

use super::{
    Plan, Variant, load_average,
    stats::{Summary, median, round},
};
use crate::exec;

const GIB: f64 = (1u64 << 30) as f64;
const ANALYSIS_BEGIN: &str = "<!-- analysis:begin -->";
const ANALYSIS_END: &str = "<!-- analysis:end -->";

pub struct ThroughputRun {
    pub variant: Variant,
    pub streams: u32,
    pub round: usize,
    pub gbps: f64,
    pub bytes: f64,
    pub seconds: f64,
    pub retransmits: u64,
    /// CPU seconds of the iperf3 client, the server side, and the relay (agents or socats).
    pub client_cpu: f64,
    pub server_cpu: f64,
    pub relay_cpu: f64,
    /// iperf3's error when a stream failed (the run counts in no median then).
    pub error: Option<String>,
}

impl ThroughputRun {
    pub fn total_cpu(&self) -> f64 {
        self.client_cpu + self.server_cpu + self.relay_cpu
    }
}

pub struct Latency {
    pub variant: Variant,
    pub size: usize,
    pub samples_us: Vec<f64>,
}

pub struct SetupCase {
    /// `agent_peer` (to b), `plain_peer` (direct to c), `plain_first`, `plain_cached`.
    pub case: &'static str,
    pub variant: Variant,
    pub samples_us: Vec<f64>,
}

/// One repair of a broken path. Times in ms from the start of the repairing command.
pub struct ResumeTrial {
    /// The command (`ip addr add`, `ip link set up`, `nft delete`) returned.
    pub command_ms: f64,
    /// The first UDP probe answer: the path works again.
    pub path_ms: f64,
    /// When the path counts as usable: after an address change, once the address is in
    /// place (the command returned); after an outage or a black hole, once it answered the
    /// probe (the kernel needs a while after a link comes up).
    pub usable_ms: f64,
    /// The first answer on the kept connection, as the application saw it.
    pub answer_ms: f64,
    /// From the last answer before the break to the first one after.
    pub interruption_ms: f64,
    /// The agent's own `last_resume_ms` (from noticing the break to resumed).
    pub agent_ms: Option<u64>,
}

impl ResumeTrial {
    /// The resume time the targets are about: from the path being usable to the kept
    /// connection's first answer (zero if it answered first).
    pub fn resume_ms(&self) -> f64 {
        (self.answer_ms - self.usable_ms).max(0.0)
    }

    pub fn describe(&self, command: &str) -> String {
        format!(
            "{command} after {:.1} ms, the path answered a probe after {:.1} ms, the kept connection \
             after {:.1} ms: {:.1} ms after the path was usable (no answers for {:.1} ms; the agent \
             says {} ms)",
            self.command_ms,
            self.path_ms,
            self.answer_ms,
            self.resume_ms(),
            self.interruption_ms,
            self.agent_ms.map_or("?".into(), |v| v.to_string())
        )
    }

    fn json(&self) -> Value {
        json!({
            "resume_ms": round(self.resume_ms(), 2),
            "command_returned_ms": round(self.command_ms, 2),
            "path_answered_ms": round(self.path_ms, 2),
            "usable_ms": round(self.usable_ms, 2),
            "connection_answered_ms": round(self.answer_ms, 2),
            "interruption_ms": round(self.interruption_ms, 2),
            "agent_last_resume_ms": self.agent_ms,
        })
    }
}

pub struct BlackholeTrial {
    pub detect_ms: f64,
    pub repair: ResumeTrial,
}

pub struct Idle {
    pub connections: usize,
    pub kept_active: usize,
    pub open_secs: f64,
    pub counters: Value,
    /// RSS in bytes of agents (a, b).
    pub base: (u64, u64),
    pub held: (u64, u64),
    pub after_close: (u64, u64),
}

pub struct Busy {
    pub connections: usize,
    pub fast_path: bool,
    pub gbps: f64,
    /// iperf3's error, if a stream failed.
    pub error: Option<String>,
    pub before: (u64, u64),
    pub peak: (u64, u64),
}

pub struct Memory {
    pub idle: Idle,
    pub busy: Vec<Busy>,
}

/// What `--profile` found.
pub struct Profile {
    pub markdown: String,
    pub data: Value,
    /// Whole reports to keep beside the results: (file name, text).
    pub files: Vec<(String, String)>,
}

pub struct Results {
    pub plan: Plan,
    pub machine: Vec<(&'static str, String)>,
    pub date: String,
    pub load_before: String,
    pub load_after: String,
    pub took_secs: f64,
    pub throughput: Vec<ThroughputRun>,
    pub latency: Vec<Latency>,
    pub setup: Vec<SetupCase>,
    pub resume_ip: Vec<ResumeTrial>,
    pub resume_outage: Vec<ResumeTrial>,
    pub blackhole: Vec<BlackholeTrial>,
    pub memory: Option<Memory>,
    pub profile: Option<Profile>,
    pub notes: Vec<String>,
}

impl Results {
    pub fn new(plan: &Plan, agent: &Path) -> Results {
        Results {
            plan: plan.clone(),
            machine: machine(agent),
            date: first_line(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"])),
            load_before: load_average(),
            load_after: String::new(),
            took_secs: 0.0,
            throughput: Vec::new(),
            latency: Vec::new(),
            setup: Vec::new(),
            resume_ip: Vec::new(),
            resume_outage: Vec::new(),
            blackhole: Vec::new(),
            memory: None,
            profile: None,
            notes: Vec::new(),
        }
    }

    /// The runs that completed.
    fn throughput_runs(&self, variant: Variant, streams: u32) -> Vec<&ThroughputRun> {
        self.throughput
            .iter()
            .filter(|r| r.variant == variant && r.streams == streams && r.error.is_none())
            .collect()
    }

    fn failed_runs(&self, variant: Variant, streams: u32) -> usize {
        self.throughput
            .iter()
            .filter(|r| r.variant == variant && r.streams == streams && r.error.is_some())
            .count()
    }

    fn gbps(&self, variant: Variant, streams: u32) -> Option<Spread> {
        Spread::of(
            &self
                .throughput_runs(variant, streams)
                .iter()
                .map(|r| r.gbps)
                .collect::<Vec<_>>(),
        )
    }

    /// CPU seconds per GiB over the 1-stream runs: (relay only, everything).
    fn cpu_per_gib(&self, variant: Variant) -> Option<(Spread, Spread)> {
        let runs = self.throughput_runs(variant, 1);
        let relay: Vec<f64> = runs.iter().map(|r| r.relay_cpu / (r.bytes / GIB)).collect();
        let total: Vec<f64> = runs
            .iter()
            .map(|r| r.total_cpu() / (r.bytes / GIB))
            .collect();
        Some((Spread::of(&relay)?, Spread::of(&total)?))
    }

    fn latency(&self, variant: Variant, size: usize) -> Option<Summary> {
        self.latency
            .iter()
            .find(|l| l.variant == variant && l.size == size)
            .map(|l| Summary::of(&l.samples_us))
    }

    fn setup(&self, case: &str, variant: Variant) -> Option<Summary> {
        self.setup
            .iter()
            .find(|s| s.case == case && s.variant == variant)
            .map(|s| Summary::of(&s.samples_us))
    }
}

/// Median and range of a few runs.
#[derive(Clone, Copy)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
    n: usize,
}

impl Spread {
    fn of(values: &[f64]) -> Option<Spread> {
        if values.is_empty() {
            return None;
        }
        Some(Spread {
            median: median(values),
            min: values.iter().copied().fold(f64::INFINITY, f64::min),
            max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            n: values.len(),
        })
    }

    fn cell(&self, digits: usize) -> String {
        if self.n == 1 {
            format!("{:.*}", digits, self.median)
        } else {
            format!(
                "{:.*} ({:.*}–{:.*})",
                digits, self.median, digits, self.min, digits, self.max
            )
        }
    }
}

/// Writes the three files; returns their paths for the closing message.
pub fn write(results: &Results, out: &Path) -> Result<Vec<String>> {
    let dir = out.join("bench");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    let mut put = |path: PathBuf, text: String| -> Result<()> {
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        written.push(path.display().to_string());
        Ok(())
    };
    let md_path = out.join("benchmarks.md");
    let kept = fs::read_to_string(&md_path)
        .ok()
        .and_then(|old| analysis_section(&old));
    put(md_path, markdown(results, kept.as_deref()))?;
    put(dir.join("chart.svg"), chart(results))?;
    put(
        dir.join("results.json"),
        serde_json::to_string_pretty(&to_json(results))? + "\n",
    )?;
    if let Some(profile) = &results.profile {
        for (name, text) in &profile.files {
            put(dir.join(name), text.clone())?;
        }
    }
    Ok(written)
}

fn analysis_section(old: &str) -> Option<String> {
    let start = old.find(ANALYSIS_BEGIN)? + ANALYSIS_BEGIN.len();
    let end = old[start..].find(ANALYSIS_END)? + start;
    Some(old[start..end].trim().to_owned())
}

// --- the machine -------------------------------------------------------------------------

fn machine(agent: &Path) -> Vec<(&'static str, String)> {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let os = fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_owned())
        .unwrap_or_default();
    let commit = first_line(Command::new("git").args(["rev-parse", "--short=12", "HEAD"]));
    let dirty =
        exec::probe(Command::new("git").args(["status", "--porcelain", "--untracked-files=no"]))
            .is_some_and(|s| !s.trim().is_empty());
    let iperf = first_line(Command::new("iperf3").arg("--version"));
    let socat = first_line(Command::new("socat").arg("-V").env("LC_ALL", "C"))
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    let socat = exec::probe(Command::new("socat").arg("-V"))
        .and_then(|v| {
            v.lines()
                .find(|l| l.contains("socat version"))
                .map(str::to_owned)
        })
        .unwrap_or(socat);
    vec![
        ("CPU", format!("{cpus} × {model} (`nproc`: {cpus})")),
        (
            "Memory",
            format!("{:.1} GiB", mem_kib / (1u64 << 20) as f64),
        ),
        ("Kernel", kernel),
        ("OS", os),
        (
            "rocks",
            format!(
                "commit {commit}{}, agent built with `cargo build --release` ({})",
                if dirty {
                    " with uncommitted changes"
                } else {
                    ""
                },
                // Repository-relative: the report names no machine paths.
                {
                    let full = agent.display().to_string();
                    full.find("target/")
                        .map(|i| full[i..].to_owned())
                        .unwrap_or(full)
                }
            ),
        ),
        ("Tools", format!("{iperf}; {}", socat.trim())),
    ]
}

fn first_line(cmd: &mut Command) -> String {
    exec::probe(cmd)
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_default()
}

// --- markdown ----------------------------------------------------------------------------

/// "×0.71" relative to direct TCP.
fn ratio(value: f64, direct: Option<f64>) -> String {
    match direct {
        Some(d) if d > 0.0 => format!(" ×{:.2}", value / d),
        _ => String::new(),
    }
}

fn markdown(r: &Results, analysis: Option<&str>) -> String {
    let mut md = String::new();
    let p = &r.plan;
    let w = &mut md;
    let _ = writeln!(w, "# Benchmarks\n");
    let _ = writeln!(
        w,
        "<!-- Written by `cargo xtask bench`; a rerun replaces everything but the text between the \
         analysis markers. -->\n"
    );
    let _ = writeln!(
        w,
        "What rocks costs when nothing breaks, and how fast it recovers when something does, \
         measured against direct TCP and a socat relay pair by `cargo xtask bench`{} on {} \
         (the run took {:.0} s).\n",
        if p.quick {
            " --quick (a short run: fewer runs and trials)"
        } else {
            ""
        },
        r.date,
        r.took_secs
    );

    let _ = writeln!(w, "## Machine\n");
    let _ = writeln!(w, "| | |\n| --- | --- |");
    for (key, value) in &r.machine {
        let _ = writeln!(w, "| {key} | {value} |");
    }
    let _ = writeln!(
        w,
        "| Load average (1, 5, 15 min) | {} at the start, {} at the end |\n",
        r.load_before, r.load_after
    );
    let _ = writeln!(
        w,
        "The machine was shared: other work ran during the bench, so the figures are noisy, \
         the more so the higher the load average above. Throughput and latency are measured in \
         rounds, every variant once per round, so a change in load hits all of them alike.\n"
    );

    let _ = writeln!(w, "## Setup\n");
    let _ = writeln!(
        w,
        "Two hosts are network namespaces on one Linux bridge (a veth pair each): the client host \
         a (192.0.2.1) and the server host b (192.0.2.2); a third, c, runs no agent. The \
         variants:\n\n\
         - **direct TCP**: the client on a connects to the server on b;\n\
         - **socat relay pair**: socat on a listens on 127.0.0.1 and forwards to socat on b, which \
           forwards to the server on b's 127.0.0.1: two relays where the agents sit (`nodelay` on \
           every socket, a process per connection);\n\
         - **rocks**: the client runs in the cgroup `rocks-agent attach` keeps on a, \
           `rocks-agent serve` runs on b; as configured by default, and with the sk_msg fast path \
           between the application and agent a set the other way ({}).\n\n\
         Throughput: iperf3, {} s per run, {} run(s) per variant. Latency: a 1-byte or 4 KiB \
         message sent and echoed back on one TCP_NODELAY connection, {} exchanges per variant and \
         size. Setup: from `connect()` to the first byte the server sends on accept, {} trials. \
         Resume: a connection exchanging a byte every millisecond; the time from the new address \
         (or the link) being usable to the first answer, as the application sees it. CPU: the \
         cgroups' `cpu.stat` over the 1-stream runs.\n",
        Variant::RocksOtherFastPath.label(),
        p.throughput_secs,
        p.rounds,
        p.latency_count,
        p.setup_trials
    );

    let _ = writeln!(w, "## Results\n");
    results_table(w, r);
    failures(w, r);
    recovery_table(w, r);
    memory_table(w, r);
    if !r.notes.is_empty() {
        let _ = writeln!(w, "Notes from the run:\n");
        for note in &r.notes {
            let _ = writeln!(w, "- {note}");
        }
        let _ = writeln!(w);
    }

    let _ = writeln!(w, "## Targets\n");
    let _ = writeln!(w, "Reported against, not asserted.\n");
    targets_table(w, r);

    let _ = writeln!(w, "## Chart\n");
    let _ = writeln!(w, "![Throughput and latency by variant](bench/chart.svg)\n");

    let _ = writeln!(w, "## Profile\n");
    match &r.profile {
        Some(profile) => {
            let _ = writeln!(w, "{}", profile.markdown);
        }
        None => {
            let _ = writeln!(
                w,
                "Not profiled in this run; `cargo xtask bench --profile` adds where the agents \
                 spend CPU (perf) and heap (heaptrack).\n"
            );
        }
    }

    let _ = writeln!(w, "## Analysis\n");
    let _ = writeln!(w, "{ANALYSIS_BEGIN}");
    let _ = writeln!(
        w,
        "{}",
        analysis.unwrap_or("(Written by hand after a run: what the figures mean, which targets are missed and why.)")
    );
    let _ = writeln!(w, "{ANALYSIS_END}\n");

    let _ = writeln!(w, "## Raw results\n");
    let _ = writeln!(
        w,
        "Every run and trial is in [bench/results.json](bench/results.json) (latency as \
         percentiles over all exchanges). To reproduce: `cargo xtask bench` as root (about 15 \
         minutes), or `cargo xtask bench --quick` (under five); `--profile` adds the profile, \
         `--only PARTS` measures a part."
    );
    md
}

fn results_table(w: &mut String, r: &Results) {
    let _ = writeln!(
        w,
        "Each cell: the median, the range over runs in parentheses, and the ratio to direct TCP \
         (×). Latency and setup in µs, throughput in Gbit/s.\n"
    );
    let _ = writeln!(
        w,
        "| Figure | {} |",
        Variant::ALL.map(Variant::label).join(" | ")
    );
    let _ = writeln!(w, "| --- | --- | --- | --- | --- |");
    for streams in [1, 8] {
        let direct = r.gbps(Variant::Direct, streams).map(|s| s.median);
        let cells: Vec<String> = Variant::ALL
            .iter()
            .map(|&v| {
                let failed = match r.failed_runs(v, streams) {
                    0 => String::new(),
                    n => format!(" ({n} run(s) **failed**, see below)"),
                };
                match r.gbps(v, streams) {
                    Some(s) if v == Variant::Direct => format!("{}{failed}", s.cell(2)),
                    Some(s) => format!("{}{}{failed}", s.cell(2), ratio(s.median, direct)),
                    None if !failed.is_empty() => "every run **failed** (see below)".to_owned(),
                    None => "–".into(),
                }
            })
            .collect();
        let what = if streams == 1 {
            "1 stream"
        } else {
            "8 streams"
        };
        let _ = writeln!(w, "| Throughput, {what} | {} |", cells.join(" | "));
    }
    for size in [1, 4096] {
        let name = if size == 1 { "1 B" } else { "4 KiB" };
        for (label, pick) in [("p50", 0), ("p99", 1)] {
            let get = |s: &Summary| if pick == 0 { s.p50 } else { s.p99 };
            let direct = r.latency(Variant::Direct, size).map(|s| get(&s));
            let cells: Vec<String> = Variant::ALL
                .iter()
                .map(|&v| match r.latency(v, size) {
                    Some(s) if v == Variant::Direct => format!("{:.1}", get(&s)),
                    Some(s) => format!("{:.1}{}", get(&s), ratio(get(&s), direct)),
                    None => "–".into(),
                })
                .collect();
            let _ = writeln!(
                w,
                "| Request/response latency, {name}, {label} | {} |",
                cells.join(" | ")
            );
        }
    }
    let setup_cell = |case: &str, v: Variant, direct: Option<f64>| match r.setup(case, v) {
        Some(s) => format!("{:.0} / {:.0}{}", s.p50, s.p99, ratio(s.p50, direct)),
        None => "–".into(),
    };
    let direct_b = r.setup("agent_peer", Variant::Direct).map(|s| s.p50);
    let direct_c = r.setup("plain_peer", Variant::Direct).map(|s| s.p50);
    if r.setup("agent_peer", Variant::Direct).is_some() {
        let _ = writeln!(
            w,
            "| Connection setup to b (an agent peer), p50 / p99 | {} | {} | {} | – |",
            setup_cell("agent_peer", Variant::Direct, None),
            setup_cell("agent_peer", Variant::Socat, direct_b),
            setup_cell("agent_peer", Variant::Rocks, direct_b),
        );
        let _ = writeln!(
            w,
            "| Connection setup to a host without an agent, first time, p50 / p99 | {} | – | {} | – |",
            setup_cell("plain_peer", Variant::Direct, None),
            setup_cell("plain_first", Variant::Rocks, direct_c),
        );
        let _ = writeln!(
            w,
            "| Connection setup to a host without an agent, cached, p50 / p99 | {} | – | {} | – |",
            setup_cell("plain_peer", Variant::Direct, None),
            setup_cell("plain_cached", Variant::Rocks, direct_c),
        );
    }
    if r.cpu_per_gib(Variant::Direct).is_some() {
        let direct_total = r.cpu_per_gib(Variant::Direct).map(|c| c.1.median);
        let relay: Vec<String> = Variant::ALL
            .iter()
            .map(|&v| match r.cpu_per_gib(v) {
                Some(_) if v == Variant::Direct => "0 (no relay)".into(),
                Some((relay, _)) => relay.cell(2),
                None => "–".into(),
            })
            .collect();
        let total: Vec<String> = Variant::ALL
            .iter()
            .map(|&v| match r.cpu_per_gib(v) {
                Some((_, t)) if v == Variant::Direct => t.cell(2),
                Some((_, t)) => format!("{}{}", t.cell(2), ratio(t.median, direct_total)),
                None => "–".into(),
            })
            .collect();
        let _ = writeln!(
            w,
            "| CPU seconds per GiB, the relay (both agents, both socats) | {} |",
            relay.join(" | ")
        );
        let _ = writeln!(
            w,
            "| CPU seconds per GiB, everything (client, server, relay) | {} |",
            total.join(" | ")
        );
    }
    let _ = writeln!(w);
}

/// Which throughput runs failed, and what iperf3 said.
fn failures(w: &mut String, r: &Results) {
    let mut lines = Vec::new();
    for v in Variant::ALL {
        for streams in [1, 8] {
            let failed: Vec<&ThroughputRun> = r
                .throughput
                .iter()
                .filter(|t| t.variant == v && t.streams == streams && t.error.is_some())
                .collect();
            if failed.is_empty() {
                continue;
            }
            let all = r
                .throughput
                .iter()
                .filter(|t| t.variant == v && t.streams == streams)
                .count();
            let mut errors: Vec<&str> = failed.iter().filter_map(|t| t.error.as_deref()).collect();
            errors.dedup();
            let carried: f64 = failed.iter().map(|t| t.bytes).sum::<f64>() / f64::from(1u32 << 20);
            lines.push(format!(
                "- {}, {streams} stream(s): {} of {all} runs failed (after {carried:.0} MiB in all); iperf3 said \"{}\".",
                v.label(),
                failed.len(),
                errors.join("\", \"")
            ));
        }
    }
    if !lines.is_empty() {
        let _ = writeln!(
            w,
            "Failed throughput runs (not in the medians):\n\n{}\n",
            lines.join("\n")
        );
    }
}

fn recovery_table(w: &mut String, r: &Results) {
    if r.resume_ip.is_empty() && r.resume_outage.is_empty() && r.blackhole.is_empty() {
        return;
    }
    let _ = writeln!(
        w,
        "Recovery, {}, in milliseconds:\n",
        Variant::Rocks.label()
    );
    let _ = writeln!(w, "| Figure | median | p90 | max | trials |");
    let _ = writeln!(w, "| --- | --- | --- | --- | --- |");
    let mut row = |what: &str, values: Vec<f64>| {
        if values.is_empty() {
            return;
        }
        let s = Summary::of(&values);
        let _ = writeln!(
            w,
            "| {what} | {:.1} | {:.1} | {:.1} | {} |",
            s.p50, s.p90, s.max, s.n
        );
    };
    let ip = &r.resume_ip;
    let outage = &r.resume_outage;
    let hole = &r.blackhole;
    let secs = r.plan.outage.as_secs();
    let pick = |trials: &[ResumeTrial], f: fn(&ResumeTrial) -> f64| {
        trials.iter().map(f).collect::<Vec<_>>()
    };
    row(
        "Address change: `ip addr add` returned → first answer on the kept connection",
        pick(ip, ResumeTrial::resume_ms),
    );
    row(
        "Address change: last answer before → first answer after (what the application waited)",
        pick(ip, |t| t.interruption_ms),
    );
    row(
        "Address change: the agent's `last_resume_ms` (break noticed → resumed)",
        ip.iter()
            .filter_map(|t| t.agent_ms.map(|v| v as f64))
            .collect(),
    );
    row(
        &format!(
            "{secs} s outage: `ip link set up` returned → path usable (first UDP probe answer; the kernel's link-up work)"
        ),
        pick(outage, |t| (t.path_ms - t.command_ms).max(0.0)),
    );
    row(
        &format!("{secs} s outage: path usable → first answer on the kept connection"),
        pick(outage, ResumeTrial::resume_ms),
    );
    row(
        "Black hole (all packets dropped, link up): drop starts → the agent shows the session suspended",
        hole.iter().map(|t| t.detect_ms).collect(),
    );
    row(
        "Black hole: rules removed, path usable (first UDP probe answer) → first answer on the kept connection",
        hole.iter().map(|t| t.repair.resume_ms()).collect(),
    );
    let _ = writeln!(w);
}

fn memory_table(w: &mut String, r: &Results) {
    let Some(m) = &r.memory else { return };
    let i = &m.idle;
    let mib = |x: u64| x as f64 / (1u64 << 20) as f64;
    let per = |held: u64, base: u64, n: usize| (held as f64 - base as f64) / n as f64 / 1024.0;
    let _ = writeln!(
        w,
        "Agent memory (RSS) with {} idle kept connections (opened in {:.1} s; {} of them active in \
         agent a's status), the agents running as {}:\n",
        i.connections,
        i.open_secs,
        i.kept_active,
        Variant::Rocks.label()
    );
    let _ = writeln!(
        w,
        "| Agent | no connections | {} idle | per idle connection | after they closed |",
        i.connections
    );
    let _ = writeln!(w, "| --- | --- | --- | --- | --- |");
    for (name, base, held, after) in [
        (
            "a (attach, client side)",
            i.base.0,
            i.held.0,
            i.after_close.0,
        ),
        (
            "b (serve, server side)",
            i.base.1,
            i.held.1,
            i.after_close.1,
        ),
    ] {
        let _ = writeln!(
            w,
            "| {name} | {:.1} MiB | {:.1} MiB | {:.1} KiB | {:.1} MiB |",
            mib(base),
            mib(held),
            per(held, base, i.connections),
            mib(after),
        );
    }
    let _ = writeln!(
        w,
        "\nRSS is the agent's own memory, not the kernel's socket buffers. Agent a's counters \
         after opening them: `{}`.\n",
        i.counters
    );
    if m.busy.is_empty() {
        return;
    }
    let n = m.busy[0].connections;
    let _ = writeln!(
        w,
        "With {n} busy kept connections (iperf3, one stream each, agents started afresh), peak RSS:\n"
    );
    let _ = writeln!(
        w,
        "| Fast path | carried | agent a: before → peak (per connection) | agent b: before → peak (per connection) | iperf3 |"
    );
    let _ = writeln!(w, "| --- | --- | --- | --- | --- |");
    for b in &m.busy {
        let _ = writeln!(
            w,
            "| {} | {:.2} Gbit/s | {:.1} → {:.1} MiB ({:.0} KiB) | {:.1} → {:.1} MiB ({:.0} KiB) | {} |",
            if b.fast_path { "on" } else { "off" },
            b.gbps,
            mib(b.before.0),
            mib(b.peak.0),
            per(b.peak.0, b.before.0, b.connections),
            mib(b.before.1),
            mib(b.peak.1),
            per(b.peak.1, b.before.1, b.connections),
            b.error
                .as_ref()
                .map_or("ok".to_owned(), |e| format!("**failed**: {e}")),
        );
    }
    let _ = writeln!(w);
}

/// Met in every trial, at the median only, or not.
fn verdict(values: &[f64], limit: f64) -> &'static str {
    let s = Summary::of(values);
    if s.max <= limit {
        "**met**"
    } else if s.p50 <= limit {
        "met at the median, not in every trial"
    } else {
        "**not met**"
    }
}

fn targets_table(w: &mut String, r: &Results) {
    let _ = writeln!(w, "| Target | Measured | |");
    let _ = writeln!(w, "| --- | --- | --- |");
    let met = |ok: bool| if ok { "**met**" } else { "**not met**" };
    let other = Variant::RocksOtherFastPath;
    let describe = |v: Variant, direct: f64| match r.gbps(v, 1) {
        Some(k) => format!(
            "{:.0} % ({:.2} Gbit/s)",
            k.median / direct * 100.0,
            k.median
        ),
        None if r.failed_runs(v, 1) > 0 => "every run failed".to_owned(),
        None => "not measured".to_owned(),
    };
    if let (Some(d), Some(s)) = (r.gbps(Variant::Direct, 1), r.gbps(Variant::Socat, 1)) {
        let k = r.gbps(Variant::Rocks, 1).map(|k| k.median);
        let _ = writeln!(
            w,
            "| 1-stream throughput ≥ 70 % of direct TCP ({:.2} Gbit/s) | {}; {}: {} | {} |",
            d.median,
            describe(Variant::Rocks, d.median),
            other.label(),
            describe(other, d.median),
            met(k.is_some_and(|k| k / d.median >= 0.7))
        );
        let _ = writeln!(
            w,
            "| 1-stream throughput ≥ 3× the socat relay ({:.2} Gbit/s) | {}; {}: {} | {} |",
            s.median,
            k.map_or("no completed run".to_owned(), |k| format!(
                "{:.2}×",
                k / s.median
            )),
            other.label(),
            r.gbps(other, 1)
                .map_or("no completed run".to_owned(), |o| format!(
                    "{:.2}×",
                    o.median / s.median
                )),
            met(k.is_some_and(|k| k / s.median >= 3.0))
        );
    }
    for size in [1, 4096] {
        if let (Some(d), Some(k)) = (
            r.latency(Variant::Direct, size),
            r.latency(Variant::Rocks, size),
        ) {
            let added = k.p50 - d.p50;
            let off = r
                .latency(Variant::RocksOtherFastPath, size)
                .map_or(String::new(), |o| {
                    format!(
                        "; {}: +{:.1} µs",
                        Variant::RocksOtherFastPath.label(),
                        o.p50 - d.p50
                    )
                });
            let name = if size == 1 { "1 B" } else { "4 KiB" };
            let _ = writeln!(
                w,
                "| Added request/response latency ≤ 25 µs at p50 ({name}) | +{added:.1} µs ({:.1} vs {:.1} µs{off}) | {} |",
                k.p50,
                d.p50,
                met(added <= 25.0)
            );
        }
    }
    for (what, trials, usable) in [
        (
            "an address change",
            &r.resume_ip,
            "the new address was in place (`ip addr add` returned)",
        ),
        (
            "an outage",
            &r.resume_outage,
            "the path answered a UDP probe once the link was back",
        ),
    ] {
        if trials.is_empty() {
            continue;
        }
        let values: Vec<f64> = trials.iter().map(ResumeTrial::resume_ms).collect();
        let s = Summary::of(&values);
        let within = values.iter().filter(|&&v| v <= 100.0).count();
        let _ = writeln!(
            w,
            "| Resume within 100 ms of the new address (link) being usable, after {what} | median {:.1} ms, max {:.1} ms after {usable}; {within} of {} trials within | {} |",
            s.p50,
            s.max,
            s.n,
            verdict(&values, 100.0)
        );
    }
    if !r.blackhole.is_empty() {
        let values: Vec<f64> = r.blackhole.iter().map(|t| t.detect_ms / 1000.0).collect();
        let s = Summary::of(&values);
        let _ = writeln!(
            w,
            "| Black hole detected within 3 s | median {:.2} s, max {:.2} s over {} trials | {} |",
            s.p50,
            s.max,
            s.n,
            verdict(&values, 3.0)
        );
    }
    if let Some(m) = &r.memory {
        let i = &m.idle;
        let per =
            |held: u64, base: u64| (held as f64 - base as f64) / i.connections as f64 / 1024.0;
        let (a, b) = (per(i.held.0, i.base.0), per(i.held.1, i.base.1));
        let _ = writeln!(
            w,
            "| ≤ 16 KiB of agent memory per idle kept connection | agent a {a:.1} KiB, agent b {b:.1} KiB (with {} connections) | {} |",
            i.connections,
            met(a <= 16.0 && b <= 16.0)
        );
    }
    let _ = writeln!(w);
}

// --- JSON --------------------------------------------------------------------------------

fn to_json(r: &Results) -> Value {
    let p = &r.plan;
    let throughput: Vec<Value> = r
        .throughput
        .iter()
        .map(|t| {
            json!({
                "variant": t.variant.key(), "streams": t.streams, "round": t.round,
                "gbit_per_s": round(t.gbps, 3), "bytes": t.bytes, "seconds": round(t.seconds, 3),
                "retransmits": t.retransmits,
                "cpu_seconds": { "client": round(t.client_cpu, 3), "server": round(t.server_cpu, 3), "relay": round(t.relay_cpu, 3) },
                "error": t.error,
                "cpu_seconds_per_gib": { "relay": round(t.relay_cpu / (t.bytes / GIB), 3), "total": round(t.total_cpu() / (t.bytes / GIB), 3) },
            })
        })
        .collect();
    let latency: Vec<Value> = r
        .latency
        .iter()
        .map(|l| json!({ "variant": l.variant.key(), "bytes": l.size, "round_trip_us": Summary::of(&l.samples_us).json(2) }))
        .collect();
    let setup: Vec<Value> = r
        .setup
        .iter()
        .map(|s| {
            json!({
                "case": s.case, "variant": s.variant.key(),
                "summary_us": Summary::of(&s.samples_us).json(1),
                "samples_us": s.samples_us.iter().map(|v| round(*v, 1)).collect::<Vec<_>>(),
            })
        })
        .collect();
    let resume =
        |trials: &[ResumeTrial]| -> Vec<Value> { trials.iter().map(ResumeTrial::json).collect() };
    let blackhole: Vec<Value> = r
        .blackhole
        .iter()
        .map(|t| json!({ "detect_ms": round(t.detect_ms, 1), "after_restore": t.repair.json() }))
        .collect();
    let memory = r.memory.as_ref().map(|m| {
        let pair = |p: (u64, u64)| json!({ "agent_a": p.0, "agent_b": p.1 });
        json!({
            "idle": {
                "connections": m.idle.connections, "kept_active": m.idle.kept_active,
                "open_seconds": round(m.idle.open_secs, 2), "agent_a_counters": m.idle.counters,
                "rss_bytes": { "before": pair(m.idle.base), "held": pair(m.idle.held), "after_close": pair(m.idle.after_close) },
                "bytes_per_connection": {
                    "agent_a": round((m.idle.held.0 as f64 - m.idle.base.0 as f64) / m.idle.connections as f64, 0),
                    "agent_b": round((m.idle.held.1 as f64 - m.idle.base.1 as f64) / m.idle.connections as f64, 0),
                },
            },
            "busy": m.busy.iter().map(|b| json!({
                "connections": b.connections, "fast_path": b.fast_path, "gbit_per_s": round(b.gbps, 3),
                "iperf3_error": b.error,
                "rss_bytes": { "before": pair(b.before), "peak": pair(b.peak) },
            })).collect::<Vec<_>>(),
        })
    });
    json!({
        "date": r.date,
        "quick": p.quick,
        "took_seconds": round(r.took_secs, 1),
        "machine": r.machine.iter().map(|(k, v)| (k.to_string(), Value::from(v.clone()))).collect::<serde_json::Map<_, _>>(),
        "load_average": { "start": r.load_before, "end": r.load_after },
        "plan": {
            "rounds": p.rounds, "throughput_seconds": p.throughput_secs, "latency_exchanges": p.latency_count,
            "setup_trials": p.setup_trials, "resume_trials": p.resume_trials, "outage_trials": p.outage_trials,
            "outage_seconds": p.outage.as_secs(), "blackhole_trials": p.blackhole_trials,
            "idle_connections": p.idle_connections, "busy_connections": p.busy_connections,
        },
        "throughput": throughput,
        "latency": latency,
        "setup": setup,
        "resume_address_change": resume(&r.resume_ip),
        "resume_outage": resume(&r.resume_outage),
        "blackhole": blackhole,
        "memory": memory,
        "profile": r.profile.as_ref().map(|p| p.data.clone()),
        "notes": r.notes,
    })
}

// --- the chart ---------------------------------------------------------------------------

/// A group of bars: its label and, per variant, (value, whisker low, whisker high).
type Group = (String, Vec<Option<(f64, f64, f64)>>);

const COLORS: [&str; 4] = ["#4c72b0", "#dd8452", "#55a868", "#8fbf8f"];

/// Two bar charts side by side: throughput (median, whiskers over the runs) and latency
/// (p50 and p99), one bar per variant.
fn chart(r: &Results) -> String {
    let (width, height) = (1000.0, 430.0);
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let throughput: Vec<Group> = [1, 8]
        .iter()
        .map(|&streams| {
            let label = if streams == 1 {
                "1 stream".to_owned()
            } else {
                format!("{streams} streams")
            };
            let bars = Variant::ALL
                .iter()
                .map(|&v| match r.gbps(v, streams) {
                    Some(s) => Some((s.median, s.min, s.max)),
                    // Every run failed: drawn as a "failed" mark.
                    None if r.failed_runs(v, streams) > 0 => Some((f64::NAN, 0.0, 0.0)),
                    None => None,
                })
                .collect();
            (label, bars)
        })
        .collect();
    panel(
        &mut svg,
        60.0,
        40.0,
        400.0,
        300.0,
        "Throughput (Gbit/s, median and range)",
        &throughput,
    );
    let latency: Vec<Group> = [(1, "1 B"), (4096, "4 KiB")]
        .iter()
        .flat_map(|&(size, name)| {
            [("p50", false), ("p99", true)].map(|(p, high)| {
                let bars = Variant::ALL
                    .iter()
                    .map(|&v| {
                        r.latency(v, size).map(|s| {
                            let x = if high { s.p99 } else { s.p50 };
                            (x, x, x)
                        })
                    })
                    .collect();
                (format!("{name} {p}"), bars)
            })
        })
        .collect();
    panel(
        &mut svg,
        560.0,
        40.0,
        400.0,
        300.0,
        "Request/response latency (µs)",
        &latency,
    );
    // Legend.
    let mut x = 60.0;
    for (i, v) in Variant::ALL.iter().enumerate() {
        let _ = writeln!(
            svg,
            r#"<rect x="{x}" y="395" width="14" height="14" fill="{}"/>"#,
            COLORS[i]
        );
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="406">{}</text>"#,
            x + 20.0,
            v.label()
        );
        x += 40.0 + 7.0 * v.label().len() as f64;
    }
    let _ = writeln!(svg, "</svg>");
    svg
}

fn panel(svg: &mut String, x0: f64, y0: f64, w: f64, h: f64, title: &str, groups: &[Group]) {
    let top = groups
        .iter()
        .flat_map(|(_, bars)| bars.iter().flatten().map(|b| b.2.max(b.0)))
        .fold(0.0, f64::max);
    let (scale_max, step) = nice_axis(top);
    let y = |v: f64| y0 + h - v / scale_max * h;
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" font-size="14" font-weight="bold">{title}</text>"#,
        x0,
        y0 - 15.0
    );
    let mut tick = 0.0;
    while tick <= scale_max + 1e-9 {
        let _ = writeln!(
            svg,
            r##"<line x1="{x0}" x2="{}" y1="{:.1}" y2="{:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            x0 + w,
            y(tick),
            y(tick),
            x0 - 5.0,
            y(tick) + 4.0,
            axis_label(tick)
        );
        tick += step;
    }
    let _ = writeln!(
        svg,
        r#"<line x1="{x0}" x2="{x0}" y1="{y0}" y2="{}" stroke="black"/>"#,
        y0 + h
    );
    let _ = writeln!(
        svg,
        r#"<line x1="{x0}" x2="{}" y1="{}" y2="{}" stroke="black"/>"#,
        x0 + w,
        y0 + h,
        y0 + h
    );
    let group_w = w / groups.len().max(1) as f64;
    for (g, (label, bars)) in groups.iter().enumerate() {
        let gx = x0 + g as f64 * group_w;
        let bar_w = (group_w - 20.0) / bars.len().max(1) as f64;
        for (i, bar) in bars.iter().enumerate() {
            let Some((value, lo, hi)) = *bar else {
                continue;
            };
            let bx = gx + 10.0 + i as f64 * bar_w;
            if value.is_nan() {
                let _ = writeln!(
                    svg,
                    r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10" fill="#555">failed</text>"##,
                    bx + (bar_w - 2.0) / 2.0,
                    y0 + h - 4.0,
                );
                continue;
            }
            let _ = writeln!(
                svg,
                r#"<rect x="{bx:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{value:.2}</title></rect>"#,
                y(value),
                bar_w - 2.0,
                (y0 + h - y(value)).max(0.0),
                COLORS[i % COLORS.len()]
            );
            if hi > lo {
                let cx = bx + (bar_w - 2.0) / 2.0;
                let _ = writeln!(
                    svg,
                    r#"<line x1="{cx:.1}" x2="{cx:.1}" y1="{:.1}" y2="{:.1}" stroke="black"/>"#,
                    y(lo),
                    y(hi)
                );
            }
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{}</text>"#,
                bx + (bar_w - 2.0) / 2.0,
                y(hi.max(value)) - 3.0,
                axis_label(value)
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{label}</text>"#,
            gx + group_w / 2.0,
            y0 + h + 18.0
        );
    }
}

/// An axis top and tick step of 1, 2 or 5 times a power of ten.
fn nice_axis(max: f64) -> (f64, f64) {
    if max <= 0.0 || !max.is_finite() {
        return (1.0, 0.2);
    }
    let raw = max / 5.0;
    let power = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * power)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * power);
    ((max / step).ceil() * step, step)
}

fn axis_label(v: f64) -> String {
    if v >= 100.0 || v == v.round() {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_are_round() {
        assert_eq!(nice_axis(37.0), (40.0, 10.0));
        assert_eq!(nice_axis(4.2), (5.0, 1.0));
        assert_eq!(nice_axis(0.0), (1.0, 0.2));
    }

    #[test]
    fn keeps_the_analysis() {
        let old = format!("x\n{ANALYSIS_BEGIN}\nmine\n{ANALYSIS_END}\ny");
        assert_eq!(analysis_section(&old).as_deref(), Some("mine"));
        assert_eq!(analysis_section("nothing"), None);
    }
}
