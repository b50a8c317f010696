//! `--profile`: where the agents spend CPU and memory, measured rather than guessed.
//!
//! * CPU: `perf record -e cpu-clock` (a software event, so it works in VMs without PMU access)
//!   on both agents during a 1-stream iperf3 transfer through rocks, reported flat by
//!   function (self time, kernel and user), plus each agent thread's CPU from /proc.
//! * Memory: both agents run under heaptrack while they hold idle kept connections; its peak
//!   heap consumers name the allocation sites.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    net::{SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use super::{
    Bench, GREET_PORT, Variant,
    lab::{self, B_IP, Group, Piped, thread_cpu},
    report::Profile,
    stats::round,
};
use crate::exec;

const GIB: f64 = (1u64 << 30) as f64;
/// Functions shown per agent.
const TOP: usize = 25;

impl Bench {
    /// The profile's markdown, its data, and whole reports to keep as files.
    pub(super) fn profile(&mut self) -> Result<Profile> {
        let measured = self.lab.agent.clone();
        if let Some(profiled) = self.lab.profile_agent.clone() {
            self.lab.agent = profiled;
        }
        let result = self.profile_agents();
        self.lab.agent = measured;
        result
    }

    fn profile_agents(&mut self) -> Result<Profile> {
        let dir = self.lab.dir().join("profile");
        fs::create_dir_all(&dir)?;
        let mut md = String::new();
        let mut raw = serde_json::Map::new();
        let mut files = Vec::new();
        if have("perf") {
            println!("profile: CPU of both agents during a 1-stream transfer (perf)");
            let (text, data) = self.cpu_profile(&dir)?;
            md.push_str(&text);
            raw.insert("cpu".into(), data);
        } else {
            md.push_str(
                "No CPU profile: perf is not installed (`apt-get install linux-perf`).\n\n",
            );
        }
        if have("perf") {
            println!("profile: what one request/response exchange costs each agent (perf stat)");
            let (text, data) = self.latency_profile(&dir)?;
            md.push_str(&text);
            raw.insert("latency".into(), data);
        }
        if have("heaptrack") {
            println!("profile: heap of both agents holding idle connections (heaptrack)");
            let (text, data) = self.heap_profile(&dir, &mut files)?;
            md.push_str(&text);
            raw.insert("heap".into(), data);
        } else {
            md.push_str(
                "No heap profile: heaptrack is not installed (`apt-get install heaptrack`).\n\n",
            );
        }
        Ok(Profile {
            markdown: md,
            data: Value::Object(raw),
            files,
        })
    }

    /// One system-wide `perf record` per fast path setting during a 1-stream transfer, then a
    /// report per process: the iperf3 client, agent a, agent b, the iperf3 server.
    fn cpu_profile(&mut self, dir: &Path) -> Result<(String, Value)> {
        let secs = self.plan.profile_secs;
        let mut md = String::new();
        let _ = writeln!(
            md,
            "### CPU\n\n`perf record -a -e cpu-clock -F 999` (system-wide, then split by process) \
             during a {} s 1-stream iperf3 transfer through rocks, once with the fast path on and \
             once off. Self time by function; \"where\" is the kernel or the binary.\n",
            secs - 1
        );
        let mut data = serde_json::Map::new();
        for fast_path in [true, false] {
            let setting = if fast_path { "on" } else { "off" };
            let a = self.restart_agent_a(fast_path, None)?;
            // Both agents afresh, so both run the profiled binary.
            let b = self.start_agent_b()?;
            let file = dir.join(format!("perf-{setting}.data"));
            let mut cmd = Command::new("perf");
            cmd.args(["record", "-a", "-e", "cpu-clock", "-F", "999", "-o"])
                .arg(&file)
                .args(["--", "sleep", &(secs + 1).to_string()]);
            let name = format!("perf {setting}");
            self.lab.spawn(&name, cmd, &format!("perf-{setting}.log"))?;
            lab::sleep(Duration::from_millis(500))?;
            let before = (thread_cpu(a), thread_cpu(b));
            let (_, addr) = Variant::Rocks.target(super::IPERF_PORT);
            let mut cmd = self.lab.command(&self.lab.a, Some(Group::Kept), "iperf3");
            cmd.args(["-c", &addr.ip().to_string(), "-p", &addr.port().to_string()])
                .args(["-t", &(secs - 1).to_string(), "-J"]);
            let client = Piped::spawn(cmd, "iperf3 -c")?;
            let client_pid = client.child.id();
            let (_, lines) = client.collect(Duration::from_secs(u64::from(secs) + 60))?;
            let text = lines.join("\n");
            let after = (thread_cpu(a), thread_cpu(b));
            self.lab.wait_exit(&name, Duration::from_secs(60))?;
            let json: Value = serde_json::from_str(&text).context("parsing iperf3 -J output")?;
            let gbps = json["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .unwrap_or(0.0)
                / 1e9;
            let gib = json["end"]["sum_received"]["bytes"].as_f64().unwrap_or(0.0) / GIB;

            let failed = json["error"]
                .as_str()
                .map_or(String::new(), |e| format!(" (iperf3 **failed**: \"{e}\")"));
            let _ = writeln!(
                md,
                "#### Fast path {setting}: {gbps:.2} Gbit/s, {gib:.2} GiB{failed}\n"
            );
            let mut processes = Vec::new();
            let mut summary = Vec::new();
            for (label, pid) in [
                ("iperf3 client (sender, on a)", client_pid),
                ("agent a", a),
                ("agent b", b),
                ("iperf3 server (receiver, on b)", self.iperf_server),
            ] {
                let entries = perf_report(&file, pid)?;
                let samples: u64 = entries.iter().map(|e| e.samples).sum();
                // cpu-clock at 999 Hz: a sample is about a millisecond of CPU.
                let seconds = samples as f64 / 999.0;
                let per_gib = if gib > 0.0 {
                    format!(" ({:.2} s/GiB)", seconds / gib)
                } else {
                    String::new()
                };
                summary.push(format!("{label} {seconds:.2} s{per_gib}"));
                processes.push((label, pid, entries));
            }
            let _ = writeln!(
                md,
                "CPU by process (samples at 999 Hz): {}.\n",
                summary.join("; ")
            );
            let threads = [
                ("agent a", thread_table(&before.0, &after.0)),
                ("agent b", thread_table(&before.1, &after.1)),
            ];
            for (agent, rows) in &threads {
                let _ = writeln!(
                    md,
                    "{agent}'s threads (CPU s from /proc): {}.\n",
                    rows.iter()
                        .map(|(t, s)| format!("{t} {s:.2}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            let mut setting_data = serde_json::Map::new();
            setting_data.insert("gbit_per_s".into(), json!(round(gbps, 3)));
            for (label, pid, entries) in &processes {
                let areas = areas(entries);
                let total: u64 = entries.iter().map(|e| e.samples).sum();
                let _ = writeln!(
                    md,
                    "{label}, pid {pid}, {total} samples: {}.\n",
                    areas
                        .iter()
                        .map(|(area, pct)| format!("{area} {pct:.1} %"))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                let _ = writeln!(md, "| self % | where | function |\n| --- | --- | --- |");
                for e in entries.iter().take(TOP) {
                    let _ = writeln!(
                        md,
                        "| {:.1} | {} | `{}` |",
                        e.percent,
                        e.dso,
                        e.symbol.replace('|', "\\|")
                    );
                }
                let _ = writeln!(md);
                setting_data.insert(
                    label.split(' ').take(2).collect::<Vec<_>>().join("_"),
                    json!({
                        "samples": total,
                        "areas_percent": areas.iter().map(|(a, p)| (a.to_string(), json!(round(*p, 2)))).collect::<serde_json::Map<_, _>>(),
                        "functions": entries.iter().take(60).map(|e| json!({ "percent": e.percent, "samples": e.samples, "dso": e.dso, "symbol": e.symbol })).collect::<Vec<_>>(),
                    }),
                );
            }
            for (agent, rows) in threads {
                setting_data.insert(
                    format!("{}_threads", agent.replace(' ', "_")),
                    rows.iter()
                        .map(|(t, s)| json!({ "thread": t, "cpu_seconds": round(*s, 3) }))
                        .collect(),
                );
            }
            data.insert(format!("fast_path_{setting}"), Value::Object(setting_data));
        }
        Ok((md, Value::Object(data)))
    }

    /// Syscalls, context switches and CPU per 1-byte exchange in each agent (and the echo
    /// server, the endpoint direct TCP also has), with the fast path on and off; plus where
    /// the agents' CPU goes meanwhile.
    fn latency_profile(&mut self, dir: &Path) -> Result<(String, Value)> {
        let count = if self.plan.quick { 5_000 } else { 20_000 };
        let mut md = String::new();
        let _ = writeln!(
            md,
            "### Request/response\n\n`perf stat -e raw_syscalls:sys_enter,context-switches,task-clock` \
             on both agents and the client during {count} exchanges of 1 byte through rocks \
             (and 200 warm-up ones, counted too), per exchange:\n"
        );
        let _ = writeln!(
            md,
            "| fast path | mean round trip | process | syscalls | context switches | CPU µs |\n| --- | --- | --- | --- | --- | --- |"
        );
        let mut data = serde_json::Map::new();
        for fast_path in [true, false] {
            let setting = if fast_path { "on" } else { "off" };
            let a = self.restart_agent_a(fast_path, None)?;
            let b = match self.agent_b {
                Some(pid) => pid,
                None => self.start_agent_b()?,
            };
            let (_, addr) = Variant::Rocks.target(super::ECHO_PORT);
            let events = "raw_syscalls:sys_enter,context-switches,task-clock";
            let file = dir.join(format!("stat-agents-{setting}.txt"));
            let mut cmd = Command::new("perf");
            cmd.args(["stat", "-x", ",", "--per-thread", "-e", events, "-p"])
                .arg(format!("{a},{b}"))
                .arg("-o")
                .arg(&file);
            let name = format!("perf stat {setting}");
            let perf_pid = self
                .lab
                .spawn(&name, cmd, &format!("perf-stat-{setting}.log"))?;
            lab::sleep(Duration::from_millis(500))?;
            // The client runs under perf stat too: one end of the exchange, what direct TCP
            // costs an application.
            let client_file = dir.join(format!("stat-client-{setting}.txt"));
            let mut cmd = self.lab.command(&self.lab.a, Some(Group::Kept), "perf");
            cmd.args(["stat", "-x", ",", "-e", events, "-o"])
                .arg(&client_file)
                .arg("--")
                .arg(&self.lab.helper)
                .args([
                    "bench",
                    "pingpong",
                    "--addr",
                    &addr.to_string(),
                    "--size",
                    "1",
                ])
                .args(["--count", &count.to_string(), "--warmup", "200"]);
            let lines =
                Piped::spawn(cmd, "the ping-pong client")?.finish(Duration::from_secs(300))?;
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(perf_pid as i32),
                nix::sys::signal::Signal::SIGINT,
            );
            self.lab.wait_exit(&name, Duration::from_secs(30))?;
            let samples: Vec<f64> = lines
                .iter()
                .find_map(|l| l.strip_prefix("samples_ns "))
                .map(|l| {
                    l.split_whitespace()
                        .filter_map(|v| v.parse::<f64>().ok())
                        .collect()
                })
                .unwrap_or_default();
            let mean_us = samples.iter().sum::<f64>() / samples.len().max(1) as f64 / 1e3;
            // The 200 warm-up exchanges are counted too.
            let exchanges = (count + 200) as f64;
            let stat = fs::read_to_string(&file).unwrap_or_default();
            let mut rows = Vec::new();
            for (label, pid) in [("agent a", a), ("agent b", b)] {
                rows.push((label, perf_stat_sum(&stat, Some(&thread_ids(pid)))));
            }
            let client = fs::read_to_string(&client_file).unwrap_or_default();
            rows.push(("the client (an endpoint)", perf_stat_sum(&client, None)));
            let mut setting_data = serde_json::Map::new();
            setting_data.insert("mean_round_trip_us".into(), json!(round(mean_us, 1)));
            for (label, c) in &rows {
                let sys = if c.syscalls.is_nan() {
                    "–".to_owned()
                } else {
                    format!("{:.1}", c.syscalls / exchanges)
                };
                let _ = writeln!(
                    md,
                    "| {setting} | {mean_us:.1} µs | {label} | {sys} | {:.1} | {:.1} |",
                    c.switches / exchanges,
                    c.cpu_ms * 1e3 / exchanges
                );
                setting_data.insert(
                    label.split(' ').take(2).collect::<Vec<_>>().join("_"),
                    json!({
                        "syscalls_per_exchange": if c.syscalls.is_nan() { Value::Null } else { json!(round(c.syscalls / exchanges, 2)) },
                        "context_switches_per_exchange": round(c.switches / exchanges, 2),
                        "cpu_us_per_exchange": round(c.cpu_ms * 1e3 / exchanges, 2),
                    }),
                );
            }
            data.insert(format!("fast_path_{setting}"), Value::Object(setting_data));
        }
        let _ = writeln!(
            md,
            "\nThe client's row is one end of the exchange, which direct TCP costs too (it includes \
             the client's process start).\n"
        );
        Ok((md, Value::Object(data)))
    }

    /// Two heaptrack runs of both agents: holding idle connections, and carrying busy ones.
    fn heap_profile(
        &mut self,
        dir: &Path,
        keep: &mut Vec<(String, String)>,
    ) -> Result<(String, Value)> {
        let n = self.plan.profile_connections;
        let busy = self.plan.busy_connections;
        let secs = self.plan.profile_secs;
        let mut md = String::from(
            "### Heap\n\nBoth agents under heaptrack (the agent built with line tables). The \
             largest heap consumers at the peak of each run, one row per call path: how much \
             was live, over how many allocations, the agent source line that asked for it (with \
             the line as it is in this tree), and the allocating function. heaptrack's units: \
             1 K = 1000 bytes.\n\n",
        );
        let mut data = serde_json::Map::new();

        let (files, peak_of) =
            self.heaptracked(dir, "idle", super::default_fast_path(), |bench| {
                let greet: SocketAddr = SocketAddrV4::new(B_IP, GREET_PORT).into();
                let cmd = bench.lab.helper(
                    &bench.lab.a,
                    Group::Kept,
                    &[
                        "hold",
                        "--addr",
                        &greet.to_string(),
                        "--count",
                        &n.to_string(),
                        "--threads",
                        "4",
                    ],
                );
                let mut hold = Piped::spawn(cmd, "the client holding connections")?;
                let ready = hold.next_line(Duration::from_secs(600))?;
                if ready != format!("ready {n}") {
                    bail!("the client holding connections said {ready:?}");
                }
                lab::sleep(Duration::from_secs(2))?;
                hold.kill();
                Ok(())
            })?;
        let _ = writeln!(
            md,
            "#### {n} idle kept connections, the agents as {}\n",
            Variant::Rocks.label()
        );
        heap_tables(&mut md, &mut data, "idle", &files, Some(n), &peak_of, keep)?;

        let (files, peak_of) = self.heaptracked(dir, "busy", false, |bench| {
            let (_, addr) = Variant::Rocks.target(super::IPERF_PORT);
            let mut cmd = bench.lab.command(&bench.lab.a, Some(Group::Kept), "iperf3");
            cmd.args(["-c", &addr.ip().to_string(), "-p", &addr.port().to_string()])
                .args(["-t", &secs.to_string(), "-P", &busy.to_string()]);
            let mut client = Piped::spawn(cmd, "iperf3 -c")?;
            let deadline = std::time::Instant::now() + Duration::from_secs(u64::from(secs) + 60);
            while client.child.try_wait()?.is_none() && std::time::Instant::now() < deadline {
                lab::sleep(Duration::from_millis(100))?;
            }
            client.kill();
            Ok(())
        })?;
        let _ = writeln!(
            md,
            "#### {busy} busy kept connections (iperf3, fast path off)\n"
        );
        heap_tables(
            &mut md,
            &mut data,
            "busy",
            &files,
            Some(busy),
            &peak_of,
            keep,
        )?;
        Ok((md, Value::Object(data)))
    }

    /// Runs both agents under heaptrack through `workload`, stops them, and returns the data
    /// files (a, b) and the agents' peak RSS meanwhile.
    fn heaptracked(
        &mut self,
        dir: &Path,
        tag: &str,
        fast_path: bool,
        workload: impl FnOnce(&mut Bench) -> Result<()>,
    ) -> Result<([PathBuf; 2], [u64; 2])> {
        let files = [
            dir.join(format!("heap-{tag}-a")),
            dir.join(format!("heap-{tag}-b")),
        ];
        let wrap: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        self.restart_agent_b(Some(&["heaptrack", "-o", &wrap[1]]))?;
        self.restart_agent_a(fast_path, Some(&["heaptrack", "-o", &wrap[0]]))?;
        let pids = [
            self.status("a")?["pid"].as_u64().context("no pid")? as u32,
            self.status("b")?["pid"].as_u64().context("no pid")? as u32,
        ];
        workload(self)?;
        let peaks = [peak_rss(pids[0]), peak_rss(pids[1])];
        self.wait_for_no_connections(Duration::from_secs(120))?;
        // SIGTERM to the agents themselves (not to heaptrack's wrapper), then let heaptrack
        // write its file.
        for (pid, name) in pids.iter().zip(["agent a", "agent b"]) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            self.lab.wait_exit(name, Duration::from_secs(180))?;
        }
        self.agent_a = None;
        self.agent_b = None;
        let found = [heaptrack_file(&files[0])?, heaptrack_file(&files[1])?];
        Ok((found, peaks))
    }
}

struct Counters {
    syscalls: f64,
    switches: f64,
    cpu_ms: f64,
}

fn thread_ids(pid: u32) -> Vec<u32> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
        .collect()
}

/// Sums `perf stat -x ,` lines ("value,unit,event,..."; with --per-thread "comm-tid,value,
/// unit,event,...") of these threads (all lines without --per-thread).
fn perf_stat_sum(text: &str, tids: Option<&[u32]>) -> Counters {
    let mut c = Counters {
        syscalls: 0.0,
        switches: 0.0,
        cpu_ms: 0.0,
    };
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let mut fields: Vec<&str> = line.split(',').collect();
        if let Some(tids) = tids {
            let tid = fields
                .first()
                .and_then(|f| f.rsplit('-').next())
                .and_then(|t| t.parse::<u32>().ok());
            if !tid.is_some_and(|t| tids.contains(&t)) {
                continue;
            }
            fields.remove(0);
        }
        if fields.len() < 3 {
            continue;
        }
        let Ok(value) = fields[0].parse::<f64>() else {
            continue;
        };
        match fields[2] {
            e if e.starts_with("raw_syscalls:sys_enter") => c.syscalls += value,
            e if e.starts_with("context-switches") => c.switches += value,
            e if e.starts_with("task-clock") => c.cpu_ms += value,
            _ => {}
        }
    }
    c
}

/// The peak RSS so far (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// heaptrack's report as committed: the paths of this machine (the lab's temporary directory,
/// the cargo registry, the checkout) become placeholders, so the report names no machine path.
fn without_machine_paths(text: &str, lab_dir: &Path) -> String {
    const REGISTRY: &str = "/.cargo/registry/src/";
    let mut text = text.replace(&format!("{}/", lab_dir.display()), "<lab>/");
    text = text.replace(&format!("{}/", crate::bench::workspace_root().display()), "");
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        match line.find(REGISTRY) {
            Some(at) => {
                // From the start of the path to the end of the registry's index directory.
                let start = line[..at].rfind(char::is_whitespace).map_or(0, |i| i + 1);
                let after = &line[at + REGISTRY.len()..];
                let end = after.find('/').map_or(after.len(), |i| i + 1);
                out.push_str(&line[..start]);
                out.push_str("<cargo registry>/");
                out.push_str(&after[end..]);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

fn heap_tables(
    md: &mut String,
    data: &mut serde_json::Map<String, Value>,
    tag: &str,
    files: &[PathBuf; 2],
    per: Option<usize>,
    peak_rss: &[u64; 2],
    keep: &mut Vec<(String, String)>,
) -> Result<()> {
    for ((name, path), rss) in ["a", "b"].iter().zip(files).zip(peak_rss) {
        let text = exec::stdout(Command::new("heaptrack_print").arg("-f").arg(path).args([
            "-p", "1", "-a", "0", "-T", "0", "-l", "0", "-n", "12", "-s", "3",
        ]))?;
        let lab_dir = path.parent().unwrap_or(Path::new("/"));
        keep.push((format!("heaptrack-{tag}-agent-{name}.txt"), without_machine_paths(&text, lab_dir)));
        let peaks = heap_peaks(&text);
        let total = text
            .lines()
            .find_map(|l| l.strip_prefix("peak heap memory consumption: "))
            .unwrap_or("?")
            .to_owned();
        let role = if *name == "a" {
            "a (attach)"
        } else {
            "b (serve)"
        };
        let _ = writeln!(
            md,
            "Agent {role}: peak heap {total}, peak RSS {:.1} MiB (under heaptrack).\n",
            *rss as f64 / (1u64 << 20) as f64
        );
        let _ = writeln!(
            md,
            "| at the peak | per connection | allocations | agent code | allocating function |\n| --- | --- | --- | --- | --- |"
        );
        for p in &peaks {
            let each = per.map_or("–".to_owned(), |n| {
                format!("{:.1} KiB", p.bytes / n as f64 / 1024.0)
            });
            let caller = if p.caller.is_empty() {
                "(not in the agent's code)"
            } else {
                &p.caller
            };
            let code = source_line(&p.caller).map_or(String::new(), |line| {
                format!(": `{}`", line.replace('|', "\\|"))
            });
            let _ = writeln!(
                md,
                "| {} | {each} | {} | `{caller}`{code} | `{}` |",
                p.size, p.calls, p.site
            );
        }
        let _ = writeln!(md);
        data.insert(
            format!("{tag}_agent_{name}"),
            json!({
                "connections": per,
                "peak_heap": total,
                "peak_rss_bytes": rss,
                "peaks": peaks.iter().map(|p| json!({ "size": p.size, "bytes": p.bytes, "calls": p.calls, "site": p.site, "caller": p.caller })).collect::<Vec<_>>(),
            }),
        );
    }
    Ok(())
}

fn have(tool: &str) -> bool {
    exec::probe(Command::new("sh").args(["-c", &format!("command -v {tool}")])).is_some()
}

/// CPU seconds per thread name between two snapshots, busiest first.
fn thread_table(before: &[(u32, String, f64)], after: &[(u32, String, f64)]) -> Vec<(String, f64)> {
    let mut by_name: BTreeMap<String, f64> = BTreeMap::new();
    for (tid, comm, seconds) in after {
        let start = before.iter().find(|(t, ..)| t == tid).map_or(0.0, |b| b.2);
        let used = seconds - start;
        if used > 0.0 {
            let key = format!("{comm} ({tid})");
            *by_name.entry(key).or_default() += used;
        }
    }
    let mut out: Vec<(String, f64)> = by_name.into_iter().collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1));
    out
}

struct PerfEntry {
    percent: f64,
    samples: u64,
    dso: String,
    symbol: String,
}

/// `perf report` of one process, flat by function, self time; percentages of that process.
fn perf_report(file: &Path, pid: u32) -> Result<Vec<PerfEntry>> {
    let text = exec::stdout(
        Command::new("perf")
            .args([
                "report",
                "--stdio",
                "--no-children",
                "-n",
                "--sort",
                "dso,sym",
            ])
            .arg(format!("--pid={pid}"))
            .arg("-i")
            .arg(file),
    )?;
    let mut entries = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || !line.contains('%') {
            continue;
        }
        // "12.34%  1234  rocks-agent  [.] symbol"
        let mut words = line.split_whitespace();
        let Some(percent) = words
            .next()
            .and_then(|w| w.trim_end_matches('%').parse::<f64>().ok())
        else {
            continue;
        };
        let samples = words
            .next()
            .and_then(|w| w.parse::<u64>().ok())
            .unwrap_or(0);
        let dso = words.next().unwrap_or("?").to_owned();
        let rest: Vec<&str> = words.collect();
        let symbol = rest
            .iter()
            .skip_while(|w| w.starts_with('['))
            .copied()
            .collect::<Vec<_>>()
            .join(" ");
        let kind = rest.first().copied().unwrap_or("");
        let dso = match (kind, dso.as_str()) {
            ("[k]", _) => "kernel".to_owned(),
            (_, d) => d.to_owned(),
        };
        entries.push(PerfEntry {
            percent,
            samples,
            dso,
            symbol: tidy_symbol(&symbol),
        });
    }
    // With --pid, perf still gives percentages of all samples: make them the process's.
    let total: u64 = entries.iter().map(|e| e.samples).sum();
    if total > 0 {
        for e in &mut entries {
            e.percent = e.samples as f64 * 100.0 / total as f64;
        }
    }
    Ok(entries)
}

/// Samples summed by rough area, from the function names: the agent's user-space time by what
/// it does, the kernel's by subsystem.
fn areas(entries: &[PerfEntry]) -> Vec<(&'static str, f64)> {
    let mut sums: Vec<(&'static str, f64)> = Vec::new();
    for e in entries {
        let s = e.symbol.to_ascii_lowercase();
        let area = if e.dso == "kernel" {
            if s.contains("copy_user")
                || s.contains("memcpy")
                || s.contains("copy_to")
                || s.contains("copy_from")
            {
                "kernel: copying"
            } else if s.contains("tcp")
                || s.contains("skb")
                || s.contains("ip_")
                || s.contains("net")
                || s.contains("sock")
                || s.contains("veth")
                || s.contains("br_")
            {
                "kernel: TCP/IP and sockets"
            } else if s.contains("softirq")
                || s.contains("irqrestore")
                || s.contains("irqentry")
                || s.contains("unlock_irq")
            {
                "kernel: interrupts and softirqs (packet processing, sampled where irqs are re-enabled)"
            } else if s.contains("sched")
                || s.contains("futex")
                || s.contains("switch")
                || s.contains("epoll")
                || s.contains("wake")
            {
                "kernel: scheduling, futex, epoll"
            } else {
                "kernel: other"
            }
        } else if s.contains("chacha")
            || s.contains("poly1305")
            || s.contains("aead")
            || s.contains("cipher")
            || s.contains("core_arch::x86")
        {
            "agent: encryption (ChaCha20-Poly1305)"
        } else if s.contains("memcpy") || s.contains("memmove") || s.contains("memset") {
            "agent: memcpy/memmove/memset"
        } else if s.contains("malloc")
            || s.contains("free")
            || s.contains("realloc")
            || s.contains("_int_")
            || s.contains("alloc::")
        {
            "agent: allocator"
        } else if s.contains("tokio") || s.contains("mio") || s.contains("parking") {
            "agent: tokio runtime"
        } else {
            "agent: other"
        };
        match sums.iter_mut().find(|(a, _)| *a == area) {
            Some(entry) => entry.1 += e.percent,
            None => sums.push((area, e.percent)),
        }
    }
    sums.sort_by(|a, b| b.1.total_cmp(&a.1));
    sums
}

struct HeapPeak {
    size: String,
    bytes: f64,
    calls: String,
    /// The allocating function (the top frame).
    site: String,
    /// The agent's code that asked for it: `file.rs:line (function)` or a function name.
    caller: String,
}

/// The line of agent source a `file.rs:line (...)` location names, from this workspace
/// (the agent the bench built), trimmed.
fn source_line(location: &str) -> Option<String> {
    let spot = location.split_whitespace().next()?;
    let (file, line) = spot.rsplit_once(':')?;
    let line: usize = line.parse().ok()?;
    let path = super::workspace_root().join("rocks-agent/src").join(file);
    let text = fs::read_to_string(path).ok()?;
    let code = text.lines().nth(line.checked_sub(1)?)?.trim();
    (!code.is_empty()).then(|| code.chars().take(90).collect())
}

/// Parses heaptrack_print's "PEAK MEMORY CONSUMERS" section into one row per backtrace
/// (heaptrack groups them under the allocating function and prints the largest few of each).
/// The agent's part of a backtrace is its first frame in `rocks-agent/src` (with line
/// tables) or else its first `rocks_agent::` function.
fn heap_peaks(text: &str) -> Vec<HeapPeak> {
    let mut peaks = Vec::new();
    let Some(start) = text.find("PEAK MEMORY CONSUMERS") else {
        return peaks;
    };
    let mut site = String::new();
    let mut current: Option<HeapPeak> = None;
    let mut last_function = String::new();
    let mut take_site = false;
    for line in text[start..].lines().skip(1) {
        if line.starts_with("MOST ") || line.starts_with("total runtime") {
            break;
        }
        if line.contains(" peak memory consumed over ") {
            peaks.extend(current.take());
            take_site = true;
            continue;
        }
        if let Some((size, rest)) = line.split_once(" consumed over ") {
            peaks.extend(current.take());
            current = Some(HeapPeak {
                bytes: parse_size(size),
                size: size.trim().to_owned(),
                calls: rest.split_whitespace().next().unwrap_or("?").to_owned(),
                site: site.clone(),
                caller: String::new(),
            });
            continue;
        }
        if take_site && !line.starts_with(' ') && !line.trim().is_empty() {
            site = tidy_symbol(line.trim());
            take_site = false;
            continue;
        }
        let Some(peak) = current.as_mut() else {
            continue;
        };
        if !peak.caller.is_empty() {
            continue;
        }
        let trimmed = line.trim();
        if let Some(location) = trimmed.strip_prefix("at ") {
            if let Some(rest) = location.strip_prefix("rocks-agent/src/") {
                peak.caller = format!("{rest} ({last_function})");
            }
        } else if line.starts_with("    ") && !trimmed.starts_with("in ") {
            last_function = tidy_symbol(trimmed);
            if last_function.contains("rocks_agent::") {
                peak.caller = last_function.clone();
            }
        }
    }
    peaks.extend(current);
    // One row per agent call site and allocating function: heaptrack lists a site once per
    // distinct path through the runtime below it.
    let mut merged: Vec<HeapPeak> = Vec::new();
    for p in peaks {
        match merged
            .iter_mut()
            .find(|m| m.caller == p.caller && m.site == p.site)
        {
            Some(m) => {
                m.bytes += p.bytes;
                let calls = |c: &str| c.parse::<u64>().unwrap_or(0);
                m.calls = (calls(&m.calls) + calls(&p.calls)).to_string();
                m.size = format_size(m.bytes);
            }
            None => merged.push(p),
        }
    }
    merged.sort_by(|a, b| b.bytes.total_cmp(&a.bytes));
    merged.truncate(10);
    merged
}

/// Bytes in heaptrack's style (decimal K, M, G).
fn format_size(bytes: f64) -> String {
    match bytes {
        b if b >= 1e9 => format!("{:.2}G", b / 1e9),
        b if b >= 1e6 => format!("{:.2}M", b / 1e6),
        b if b >= 1e3 => format!("{:.2}K", b / 1e3),
        b => format!("{b:.0}B"),
    }
}

fn parse_size(text: &str) -> f64 {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number.parse().unwrap_or(0.0);
    number
        * match unit.trim().trim_end_matches('B') {
            "K" => 1e3,
            "M" => 1e6,
            "G" => 1e9,
            _ => 1.0,
        }
}

/// Legacy-mangled Rust names as heaptrack and perf print them, made readable: `$LT$` → `<`,
/// `..` → `::`, no `::h<hash>` suffix.
fn tidy_symbol(symbol: &str) -> String {
    let mut s = symbol.to_owned();
    for (from, to) in [
        ("$LT$", "<"),
        ("$GT$", ">"),
        ("$u20$", " "),
        ("$C$", ","),
        ("$RF$", "&"),
        ("$BP$", "*"),
        ("$u7b$", "{"),
        ("$u7d$", "}"),
        ("$u5b$", "["),
        ("$u5d$", "]"),
        ("$u27$", "'"),
        ("..", "::"),
    ] {
        s = s.replace(from, to);
    }
    // v0-mangled names (`_RNv...14aligned_malloc`): their last identifier is enough here.
    if s.starts_with("_R") {
        let tail: String = s
            .chars()
            .rev()
            .take_while(|c| c.is_ascii_alphabetic() || *c == '_')
            .collect();
        if !tail.is_empty() {
            return tail.chars().rev().collect();
        }
    }
    if let Some(stripped) = s.strip_prefix("_<") {
        s = format!("<{stripped}");
    }
    if let Some(pos) = s.rfind("::h") {
        let hash = &s[pos + 3..];
        if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            s.truncate(pos);
        }
    }
    s
}

/// The file heaptrack wrote for `-o base` (it appends the compression's extension).
fn heaptrack_file(base: &Path) -> Result<PathBuf> {
    let dir = base.parent().context("no directory")?;
    let stem = base
        .file_name()
        .context("no name")?
        .to_string_lossy()
        .into_owned();
    fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&stem))
        })
        .with_context(|| format!("heaptrack wrote no {}*", base.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbols_are_tidied() {
        assert_eq!(
            tidy_symbol(
                "_$LT$alloc..vec..Vec$LT$T$GT$$u20$as$u20$Clone$GT$::clone::h0123456789abcdef"
            ),
            "<alloc::vec::Vec<T> as Clone>::clone"
        );
        assert_eq!(tidy_symbol("memcpy"), "memcpy");
    }

    #[test]
    fn committed_heap_reports_name_no_machine_path() {
        let lab = Path::new("/tmp/rocksbench-42");
        let root = crate::bench::workspace_root();
        let text = format!(
            "  in /tmp/rocksbench-42/rocks-agent-profile\n      at /home/u/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/bytes-1.12.2/src/bytes_mut.rs:626\n      at {}/rocks-agent/src/agent.rs:391\n",
            root.display()
        );
        assert_eq!(
            without_machine_paths(&text, lab),
            "  in <lab>/rocks-agent-profile\n      at <cargo registry>/bytes-1.12.2/src/bytes_mut.rs:626\n      at rocks-agent/src/agent.rs:391\n"
        );
    }

    #[test]
    fn heap_peaks_name_the_agent_code() {
        let text = "reading file\nPEAK MEMORY CONSUMERS
70.61M peak memory consumed over 240573 calls from
alloc
  at /rustc/x/library/alloc/src/alloc.rs:95
  in /tmp/rocks-agent
59.24M consumed over 4635 calls from:
    reserve
      at /root/.cargo/registry/src/x/bytes-1.12.2/src/bytes_mut.rs:626
      in /tmp/rocks-agent
    {async_fn#0}
      at rocks-agent/src/keeper/driver.rs:127
      in /tmp/rocks-agent
1.31M consumed over 838 calls from:
    {async_fn#0}
      at rocks-agent/src/keeper/driver.rs:171

32.77K peak memory consumed over 1 calls from
sharded_slab::shard::Array$LT$T$C$C$GT$::new::h96be847c28396205
  in /tmp/rocks-agent
32.77K consumed over 1 calls from:
    _$LT$tracing_subscriber..registry..sharded..Registry$GT$::default::h3bf1eace537cf353
      in /tmp/rocks-agent
    rocks_agent::main::h234c54c7f445b81b
      in /tmp/rocks-agent

MOST CALLS TO ALLOCATION FUNCTIONS
";
        let peaks = heap_peaks(text);
        assert_eq!(peaks.len(), 3);
        assert_eq!(peaks[0].caller, "keeper/driver.rs:127 ({async_fn#0})");
        assert_eq!(peaks[0].site, "alloc");
        assert_eq!(peaks[0].calls, "4635");
        assert_eq!(peaks[1].caller, "keeper/driver.rs:171 ({async_fn#0})");
        assert_eq!(peaks[2].caller, "rocks_agent::main");
        assert_eq!(peaks[2].site, "sharded_slab::shard::Array<T,C>::new");
    }

    #[test]
    fn sizes_parse() {
        assert!((parse_size("65.54M") - 65.54e6).abs() < 1.0);
        assert!((parse_size("72.70K") - 72_700.0).abs() < 0.01);
    }
}
