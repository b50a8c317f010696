//! The measurements. Each prints a line per result as it goes, so a long run shows progress,
//! and adds its samples to [`Results`].

use std::{
    net::{SocketAddr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use super::{
    Bench, ECHO_PORT, GREET_PORT, IPERF_PORT, UDP_PORT, Variant,
    lab::{self, A_IP, A_IP_ALT, B_IP, C_IP, Group, Piped, c_extra, monotonic_ns, rss_bytes},
    report::{
        BlackholeTrial, Busy, Idle, Latency, Memory, Results, ResumeTrial, SetupCase, ThroughputRun,
    },
    stats::Summary,
};

const GIB: f64 = (1u64 << 30) as f64;

impl Bench {
    /// Throughput (1 and 8 streams) and request/response latency (1 B and 4 KiB), each
    /// variant once per round. The rocks variants alternate their order between rounds, so
    /// agent a restarts once per round.
    pub(super) fn throughput_and_latency(
        &mut self,
        parts: &[&str],
        results: &mut Results,
    ) -> Result<()> {
        let (throughput, latency) = (parts.contains(&"throughput"), parts.contains(&"latency"));
        let per_round = self.plan.latency_count.div_ceil(self.plan.rounds);
        for round in 0..self.plan.rounds {
            let order = if round % 2 == 0 {
                [
                    Variant::Direct,
                    Variant::Socat,
                    Variant::Rocks,
                    Variant::RocksOtherFastPath,
                ]
            } else {
                [
                    Variant::Direct,
                    Variant::Socat,
                    Variant::RocksOtherFastPath,
                    Variant::Rocks,
                ]
            };
            for variant in order {
                if let Some(fast) = variant.fast_path() {
                    self.agent_a(fast)?;
                }
                if throughput {
                    for streams in [1, 8] {
                        let run = self.iperf(variant, streams, round, self.plan.throughput_secs)?;
                        if let Some(error) = &run.error {
                            println!(
                                "throughput, round {}/{}, {}, {streams} stream(s): FAILED after {:.2} GiB: iperf3 says {error:?}",
                                round + 1,
                                self.plan.rounds,
                                variant.label(),
                                run.bytes / GIB
                            );
                            results.throughput.push(run);
                            continue;
                        }
                        println!(
                            "throughput, round {}/{}, {}, {streams} stream(s): {:.2} Gbit/s; CPU {:.2} s/GiB (relay {:.2})",
                            round + 1,
                            self.plan.rounds,
                            variant.label(),
                            run.gbps,
                            run.total_cpu() / (run.bytes / GIB),
                            run.relay_cpu / (run.bytes / GIB),
                        );
                        results.throughput.push(run);
                    }
                }
                if latency {
                    for size in [1, 4096] {
                        let samples = self.pingpong(variant, size, per_round)?;
                        let s = Summary::of(&samples);
                        println!(
                            "latency, round {}/{}, {}, {size} B: p50 {:.1} µs, p99 {:.1} µs",
                            round + 1,
                            self.plan.rounds,
                            variant.label(),
                            s.p50,
                            s.p99
                        );
                        match results
                            .latency
                            .iter_mut()
                            .find(|l| l.variant == variant && l.size == size)
                        {
                            Some(l) => l.samples_us.extend(samples),
                            None => results.latency.push(Latency {
                                variant,
                                size,
                                samples_us: samples,
                            }),
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// One iperf3 run from a to b's iperf3 server; CPU from the cgroups of the client, the
    /// server and the relay (agents or socats).
    pub(super) fn iperf(
        &mut self,
        variant: Variant,
        streams: u32,
        round: usize,
        secs: u32,
    ) -> Result<ThroughputRun> {
        let (group, addr) = variant.target(IPERF_PORT);
        let relays = variant.relay_groups();
        let cpu = |bench: &Bench, groups: &[Group]| -> Result<f64> {
            groups.iter().map(|&g| bench.lab.cpu_seconds(g)).sum()
        };
        let before = (
            cpu(self, &[group])?,
            cpu(self, &[Group::Servers])?,
            cpu(self, relays)?,
        );
        let json = self.iperf_client(group, addr, streams, secs)?;
        // socat's per-connection children are counted once they have exited.
        lab::sleep(Duration::from_millis(300))?;
        let after = (
            cpu(self, &[group])?,
            cpu(self, &[Group::Servers])?,
            cpu(self, relays)?,
        );
        let received = &json["end"]["sum_received"];
        Ok(ThroughputRun {
            variant,
            streams,
            round,
            gbps: received["bits_per_second"].as_f64().unwrap_or(0.0) / 1e9,
            bytes: received["bytes"].as_f64().unwrap_or(0.0),
            seconds: received["seconds"].as_f64().unwrap_or(0.0),
            retransmits: json["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
            client_cpu: after.0 - before.0,
            server_cpu: after.1 - before.1,
            relay_cpu: after.2 - before.2,
            error: json["error"].as_str().map(str::to_owned),
        })
    }

    /// Runs iperf3 from host a and returns its JSON report, which says `error` if a stream
    /// failed (the exit status is not trusted for that).
    pub(super) fn iperf_client(
        &mut self,
        group: Group,
        addr: SocketAddr,
        streams: u32,
        secs: u32,
    ) -> Result<Value> {
        let mut cmd = self.lab.command(&self.lab.a, Some(group), "iperf3");
        cmd.args(["-c", &addr.ip().to_string(), "-p", &addr.port().to_string()])
            .args(["-t", &secs.to_string(), "-P", &streams.to_string(), "-J"]);
        let (status, lines) =
            Piped::spawn(cmd, "iperf3 -c")?.collect(Duration::from_secs(u64::from(secs) + 60))?;
        let text = lines.join("\n");
        let json: Value = serde_json::from_str(&text)
            .with_context(|| format!("iperf3 ({status}) printed no JSON report: {text}"))?;
        if !status.success() && json["error"].is_null() {
            bail!("iperf3 failed ({status}) without saying why");
        }
        Ok(json)
    }

    /// `count` exchanges of `size` bytes with the echo server on b; round trips in µs.
    fn pingpong(&mut self, variant: Variant, size: usize, count: usize) -> Result<Vec<f64>> {
        let (group, addr) = variant.target(ECHO_PORT);
        let cmd = self.lab.helper(
            &self.lab.a,
            group,
            &[
                "pingpong",
                "--addr",
                &addr.to_string(),
                "--size",
                &size.to_string(),
                "--count",
                &count.to_string(),
            ],
        );
        let lines = Piped::spawn(cmd, "the ping-pong client")?.finish(Duration::from_secs(300))?;
        let line = lines
            .iter()
            .find_map(|l| l.strip_prefix("samples_ns "))
            .context("the ping-pong client printed no samples")?;
        Ok(line
            .split_whitespace()
            .filter_map(|v| v.parse::<f64>().ok())
            .map(|ns| ns / 1e3)
            .collect())
    }

    /// Connect-to-first-byte times, in µs, of one fresh connection to each address in turn.
    pub(super) fn connect_times(&mut self, group: Group, addrs: &[SocketAddr]) -> Result<Vec<f64>> {
        let mut args = vec!["setup".to_owned(), "--addr".to_owned()];
        args.extend(addrs.iter().map(ToString::to_string));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let cmd = self.lab.helper(&self.lab.a, group, &args);
        let lines = Piped::spawn(cmd, "the connecting client")?.finish(Duration::from_secs(600))?;
        let times: Vec<f64> = lines
            .iter()
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .map(|ns| ns / 1e3)
            .collect();
        if times.len() != addrs.len() {
            bail!(
                "the connecting client reported {} of {} connections",
                times.len(),
                addrs.len()
            );
        }
        Ok(times)
    }

    /// Connection setup: to b (an agent peer for rocks) by every variant, and for rocks to a
    /// host without an agent, first (the agent probes, is refused, relays plain and caches
    /// that) and again (the connect is not redirected any more).
    pub(super) fn setup_times(&mut self, results: &mut Results) -> Result<()> {
        self.agent_a(super::default_fast_path())?;
        let n = self.plan.setup_trials;
        for variant in [Variant::Direct, Variant::Socat, Variant::Rocks] {
            let (group, addr) = variant.target(GREET_PORT);
            let samples = self.connect_times(group, &vec![addr; n])?;
            print_setup("to b", variant, &samples);
            results.setup.push(SetupCase {
                case: "agent_peer",
                variant,
                samples_us: samples,
            });
        }
        let plain_c: SocketAddr = SocketAddrV4::new(C_IP, GREET_PORT).into();
        let samples = self.connect_times(Group::Plain, &vec![plain_c; n])?;
        print_setup("to c", Variant::Direct, &samples);
        results.setup.push(SetupCase {
            case: "plain_peer",
            variant: Variant::Direct,
            samples_us: samples,
        });

        let fresh: Vec<SocketAddr> = (0..n)
            .map(|i| SocketAddrV4::new(c_extra(i), GREET_PORT).into())
            .collect();
        let twice: Vec<SocketAddr> = fresh.iter().chain(&fresh).copied().collect();
        let mut samples = self.connect_times(Group::Kept, &twice)?;
        let cached = samples.split_off(n);
        print_setup("to a plain host, first time", Variant::Rocks, &samples);
        print_setup("to a plain host, cached", Variant::Rocks, &cached);
        results.setup.push(SetupCase {
            case: "plain_first",
            variant: Variant::Rocks,
            samples_us: samples,
        });
        results.setup.push(SetupCase {
            case: "plain_cached",
            variant: Variant::Rocks,
            samples_us: cached,
        });
        let status = self.status("a")?;
        let cached_hosts = status["negative_cache"].as_array().map_or(0, Vec::len);
        results.notes.push(format!(
            "After the setup trials agent a held {cached_hosts} hosts in its negative cache (expected {n}); \
             counters: {}.",
            status["counters"]
        ));
        Ok(())
    }

    /// Resume after address changes and link outages, and black-hole detection, all with one
    /// kept connection that exchanges a byte with b's echo server every millisecond (the
    /// ticker) and, beside it, a UDP datagram to b every millisecond (the probe), whose first
    /// answer after a repair shows when the path itself works again.
    pub(super) fn recovery(&mut self, parts: &[&str], results: &mut Results) -> Result<()> {
        self.agent_a(super::default_fast_path())?;
        let (_, addr) = Variant::Rocks.target(ECHO_PORT);
        let cmd = self.lab.helper(
            &self.lab.a,
            Group::Kept,
            &["ticker", "--addr", &addr.to_string()],
        );
        let mut ticker = Piped::spawn(cmd, "the ticking client")?;
        let ready = ticker.next_line(Duration::from_secs(15))?;
        if !ready.starts_with("t ") {
            bail!("the ticking client said {ready:?}");
        }
        let udp = SocketAddrV4::new(B_IP, UDP_PORT).to_string();
        let cmd = self
            .lab
            .helper(&self.lab.a, Group::Plain, &["probe", "--addr", &udp]);
        let mut probe = Piped::spawn(cmd, "the UDP probe")?;
        probe.next_line(Duration::from_secs(15))?;
        let destination = addr.to_string();

        if parts.contains(&"resume") {
            let mut current = A_IP;
            for trial in 0..self.plan.resume_trials {
                lab::sleep(Duration::from_millis(500))?;
                let next = if current == A_IP { A_IP_ALT } else { A_IP };
                lab::ip(&format!(
                    "-n {} addr del {current}/24 dev eth0",
                    self.lab.a.ns
                ))?;
                let t = self.repaired(&mut ticker, &mut probe, &destination, true, || {
                    lab::ip(&format!("-n {} addr add {next}/24 dev eth0", self.lab.a.ns)).map(drop)
                })?;
                current = next;
                println!(
                    "resume after an address change, trial {}/{}: {}",
                    trial + 1,
                    self.plan.resume_trials,
                    t.describe("`ip addr add` returned")
                );
                results.resume_ip.push(t);
            }
            if current != A_IP {
                self.lab.change_a_address(current, A_IP)?;
                let now = monotonic_ns();
                wait_answer(&mut ticker, now, Duration::from_secs(30))?;
            }
        }

        if parts.contains(&"outage") {
            for trial in 0..self.plan.outage_trials {
                lab::sleep(Duration::from_millis(500))?;
                self.lab.set_a_link(false)?;
                lab::sleep(self.plan.outage)?;
                let t = self.repaired(&mut ticker, &mut probe, &destination, false, || {
                    self.lab.set_a_link(true)
                })?;
                println!(
                    "resume after a {} s outage, trial {}/{}: {}",
                    self.plan.outage.as_secs(),
                    trial + 1,
                    self.plan.outage_trials,
                    t.describe("`ip link set up` returned")
                );
                results.resume_outage.push(t);
            }
        }

        if parts.contains(&"blackhole") {
            for trial in 0..self.plan.blackhole_trials {
                lab::sleep(Duration::from_secs(1))?;
                self.lab.blackhole_a(true)?;
                let dropped = monotonic_ns();
                let what = "agent a to notice the black hole";
                let detected = lab::wait_for(
                    what,
                    Duration::from_secs(30),
                    Duration::from_millis(5),
                    || {
                        let status = self.status("a")?;
                        let state = connection(&status, &destination)
                            .map(|c| c["state"].as_str().unwrap_or("").to_owned());
                        Ok(state.filter(|s| s != "active").map(|_| monotonic_ns()))
                    },
                )?;
                let repair = self.repaired(&mut ticker, &mut probe, &destination, false, || {
                    self.lab.blackhole_a(false)
                })?;
                let t = BlackholeTrial {
                    detect_ms: ms(detected - dropped),
                    repair,
                };
                println!(
                    "black hole, trial {}/{}: the agent declared the transport dead after {:.0} ms; after the \
                     path was restored: {}",
                    trial + 1,
                    self.plan.blackhole_trials,
                    t.detect_ms,
                    t.repair.describe("the nft rules were gone")
                );
                results.blackhole.push(t);
            }
        }
        ticker.kill();
        probe.kill();
        Ok(())
    }

    /// Runs `repair` (the path was broken before) and times what follows: when the command
    /// returned, when the path answered the probe, when the kept connection answered.
    fn repaired(
        &self,
        ticker: &mut Piped,
        probe: &mut Piped,
        destination: &str,
        usable_on_return: bool,
        repair: impl FnOnce() -> Result<()>,
    ) -> Result<ResumeTrial> {
        let started = monotonic_ns();
        repair()?;
        let returned = monotonic_ns();
        let (last, answer) = wait_answer(ticker, started, Duration::from_secs(30))?;
        let (_, path) = wait_answer(probe, started, Duration::from_secs(30))?;
        let agent_ms = self.last_resume_ms(destination);
        let (command_ms, path_ms) = (ms(returned - started), ms(path - started));
        Ok(ResumeTrial {
            command_ms,
            path_ms,
            usable_ms: if usable_on_return {
                command_ms
            } else {
                path_ms
            },
            answer_ms: ms(answer - started),
            interruption_ms: if last > 0 {
                ms(answer - last)
            } else {
                f64::NAN
            },
            agent_ms,
        })
    }

    fn last_resume_ms(&self, destination: &str) -> Option<u64> {
        let status = self.status("a").ok()?;
        connection(&status, destination)?["last_resume_ms"].as_u64()
    }

    /// Agent memory with many idle kept connections and with a hundred busy ones. Both agents
    /// start afresh, and the baseline is taken after one connection came and went (so lazy
    /// one-time allocations are not charged to the connections).
    pub(super) fn memory(&mut self, results: &mut Results) -> Result<()> {
        self.start_agent_b()?;
        let a = self.restart_agent_a(super::default_fast_path(), None)?;
        let b = self.agent_b.context("agent b runs")?;
        let greet: SocketAddr = SocketAddrV4::new(B_IP, GREET_PORT).into();
        self.connect_times(Group::Kept, &[greet])?;
        self.wait_for_no_connections(Duration::from_secs(20))?;
        lab::sleep(Duration::from_secs(1))?;
        let base = (rss_bytes(a)?, rss_bytes(b)?);

        let n = self.plan.idle_connections;
        let cmd = self.lab.helper(
            &self.lab.a,
            Group::Kept,
            &[
                "hold",
                "--addr",
                &greet.to_string(),
                "--count",
                &n.to_string(),
                "--threads",
                "8",
            ],
        );
        let started = Instant::now();
        let mut hold = Piped::spawn(cmd, "the client holding connections")?;
        let ready = hold.next_line(Duration::from_secs(600))?;
        if ready != format!("ready {n}") {
            bail!("the client holding connections said {ready:?}");
        }
        let open_secs = started.elapsed().as_secs_f64();
        lab::sleep(Duration::from_secs(3))?;
        let held = (rss_bytes(a)?, rss_bytes(b)?);
        let status = self.status("a")?;
        let kept_active = status["connections"].as_array().map_or(0, |c| {
            c.iter()
                .filter(|c| c["mode"] == "kept" && c["state"] == "active" && c["role"] == "client")
                .count()
        });
        let counters = status["counters"].clone();
        println!(
            "memory: {n} idle kept connections ({kept_active} active in agent a's status) opened in {open_secs:.1} s; \
             agent a {} -> {} MiB ({:.1} KiB per connection), agent b {} -> {} MiB ({:.1} KiB per connection)",
            mib(base.0),
            mib(held.0),
            (held.0 as f64 - base.0 as f64) / n as f64 / 1024.0,
            mib(base.1),
            mib(held.1),
            (held.1 as f64 - base.1 as f64) / n as f64 / 1024.0,
        );
        hold.kill();
        drop(hold);
        self.wait_for_no_connections(Duration::from_secs(120))?;
        lab::sleep(Duration::from_secs(2))?;
        let after = (rss_bytes(a)?, rss_bytes(b)?);
        let idle = Idle {
            connections: n,
            kept_active,
            open_secs,
            counters,
            base,
            held,
            after_close: after,
        };

        let mut busy = Vec::new();
        for fast_path in [true, false] {
            busy.push(self.busy(fast_path)?);
        }
        results.memory = Some(Memory { idle, busy });
        Ok(())
    }

    /// Agent memory while busy connections carry data: iperf3 with one stream per connection,
    /// RSS sampled while it runs, both agents fresh.
    fn busy(&mut self, fast_path: bool) -> Result<Busy> {
        let b = self.start_agent_b()?;
        let a = self.restart_agent_a(fast_path, None)?;
        lab::sleep(Duration::from_secs(1))?;
        let n = self.plan.busy_connections as u32;
        let secs = self.plan.busy_secs;
        let before = (rss_bytes(a)?, rss_bytes(b)?);
        let (_, addr) = Variant::Rocks.target(IPERF_PORT);
        let mut cmd = self.lab.command(&self.lab.a, Some(Group::Kept), "iperf3");
        cmd.args(["-c", &addr.ip().to_string(), "-p", &addr.port().to_string()])
            .args(["-t", &secs.to_string(), "-P", &n.to_string(), "-J"]);
        let mut client = Piped::spawn(cmd, "iperf3 -c")?;
        let mut samples = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(u64::from(secs) + 60);
        while client.child.try_wait()?.is_none() && Instant::now() < deadline {
            samples.push((rss_bytes(a)?, rss_bytes(b)?));
            lab::sleep(Duration::from_millis(100))?;
        }
        // iperf3 exits non-zero when a stream fails; its JSON says why.
        let mut text = String::new();
        while let Ok(line) = client.lines.recv_timeout(Duration::from_secs(5)) {
            text.push_str(&line);
            text.push('\n');
        }
        client.kill();
        let json: Value = serde_json::from_str(&text).unwrap_or_default();
        let gbps = json["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0)
            / 1e9;
        let error = json["error"].as_str().map(str::to_owned);
        let peak = (
            samples.iter().map(|s| s.0).max().unwrap_or(0),
            samples.iter().map(|s| s.1).max().unwrap_or(0),
        );
        println!(
            "memory: {n} busy kept connections, fast path {}: {gbps:.2} Gbit/s in all{}; agent a {} MiB \
             at the peak ({} MiB before), agent b {} MiB ({} MiB before)",
            if fast_path { "on" } else { "off" },
            error
                .as_ref()
                .map_or(String::new(), |e| format!(" (iperf3 failed: {e})")),
            mib(peak.0),
            mib(before.0),
            mib(peak.1),
            mib(before.1)
        );
        Ok(Busy {
            connections: n as usize,
            fast_path,
            gbps,
            error,
            before,
            peak,
        })
    }

    pub(super) fn wait_for_no_connections(&mut self, timeout: Duration) -> Result<()> {
        lab::wait_for(
            "agent a to have no connections left",
            timeout,
            Duration::from_millis(200),
            || {
                let status = self.status("a")?;
                Ok(status["connections"]
                    .as_array()
                    .is_none_or(Vec::is_empty)
                    .then_some(()))
            },
        )
    }
}

/// Waits for the ticking client's first answer after `after` (monotonic ns); returns the
/// time of the last answer before it and its own.
fn wait_answer(ticker: &mut Piped, after: u64, timeout: Duration) -> Result<(u64, u64)> {
    let deadline = Instant::now() + timeout;
    let mut last = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("no answer came back within {timeout:.0?}: the connection did not recover");
        }
        let line = ticker.next_line(left)?;
        let Some(t) = line
            .split_whitespace()
            .nth(1)
            .and_then(|t| t.parse::<u64>().ok())
        else {
            continue;
        };
        if t > after {
            return Ok((last, t));
        }
        last = t;
    }
}

/// The client connection to `destination` in a status report.
fn connection<'a>(status: &'a Value, destination: &str) -> Option<&'a Value> {
    status["connections"]
        .as_array()?
        .iter()
        .find(|c| c["role"] == "client" && c["destination"] == destination)
}

fn print_setup(what: &str, variant: Variant, samples: &[f64]) {
    let s = Summary::of(samples);
    println!(
        "connection setup {what}, {}: p50 {:.0} µs, p99 {:.0} µs ({} trials)",
        variant.label(),
        s.p50,
        s.p99,
        s.n
    );
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1u64 << 20) as f64)
}
