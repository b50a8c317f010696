//! The Prometheus endpoint (`--metrics ADDR:PORT`): `GET /metrics` answers the text exposition
//! format (version 0.0.4), `GET /healthz` answers `ok`. A deliberately tiny HTTP/1.1 responder
//! on tokio: one request per connection (`Connection: close`), a bounded request head, a
//! bounded number of scrapes at once, and a deadline on each; nothing else of HTTP is needed
//! by a scraper.
//!
//! The numbers come from the same snapshot `status` shows ([`StatusReport`]) plus the
//! registry's agent-wide [`Totals`] (bytes, resume latency, handshake failures by reason).
//! Every label value that can occur is always exported, zeros included, so a dashboard's
//! `rate()` works from the first scrape.
use std::{
    fmt::Write as _,
    io,
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tracing::{debug, warn};

use crate::{
    control::{StatusReport, StatusSource},
    listen::{self, ListenError},
    registry::{HistogramSnapshot, Registry, Totals},
};

/// Scrapes served at once; more wait in the accept queue.
const MAX_CONCURRENT_SCRAPES: usize = 8;
/// The longest request head we read (a scraper's is a few hundred bytes).
const MAX_REQUEST_HEAD: usize = 8 << 10;
/// A client gets this long to send its request and read the answer.
const SCRAPE_DEADLINE: Duration = Duration::from_secs(10);

/// The content type of the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Binds the metrics listener (before anything else starts, so a taken port fails the start).
pub fn bind(addr: SocketAddr) -> Result<TcpListener, ListenError> {
    listen::tcp(addr, "metrics", "; choose another with --metrics")
}

/// Serves scrapes until the task is dropped.
pub async fn serve(listener: TcpListener, status: Arc<dyn StatusSource>, registry: Arc<Registry>) {
    let slots = Arc::new(Semaphore::new(MAX_CONCURRENT_SCRAPES));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (status, registry) = (status.clone(), registry.clone());
        tokio::spawn(async move {
            let answered = tokio::time::timeout(SCRAPE_DEADLINE, answer(stream, &*status, &registry)).await;
            if let Ok(Err(e)) = answered {
                debug!(error = %e, "metrics request failed");
            }
            drop(permit);
        });
    }
}

async fn answer(mut stream: TcpStream, status: &dyn StatusSource, registry: &Registry) -> io::Result<()> {
    let head = match read_head(&mut stream).await? {
        Some(head) => head,
        None => return respond(&mut stream, 431, "text/plain", "request head too large\n", false).await,
    };
    let mut words = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, target) = (words.next().unwrap_or_default(), words.next().unwrap_or_default());
    let path = target.split('?').next().unwrap_or_default();
    let head_only = method == "HEAD";
    if !matches!(method, "GET" | "HEAD") {
        return respond(&mut stream, 405, "text/plain", "only GET and HEAD\n", false).await;
    }
    match path {
        "/metrics" => {
            let body = render(&status.status(), &registry.totals());
            respond(&mut stream, 200, CONTENT_TYPE, &body, head_only).await
        }
        "/healthz" => respond(&mut stream, 200, "text/plain", "ok\n", head_only).await,
        "/" => respond(&mut stream, 200, "text/plain", "rocks-agent: metrics at /metrics\n", head_only).await,
        _ => respond(&mut stream, 404, "text/plain", "not found; metrics are at /metrics\n", head_only).await,
    }
}

/// Reads up to the blank line ending the request head; `None` if it grows past the bound.
async fn read_head(stream: &mut TcpStream) -> io::Result<Option<String>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = find_head_end(&buf) {
            return Ok(Some(String::from_utf8_lossy(&buf[..end]).into_owned()));
        }
        if buf.len() > MAX_REQUEST_HEAD {
            return Ok(None);
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            // A client that closes its side after the request line alone is still answered.
            return Ok(Some(String::from_utf8_lossy(&buf).into_owned()));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = buf.windows(2).position(|w| w == b"\n\n");
    crlf.into_iter().chain(lf).min()
}

async fn respond(stream: &mut TcpStream, code: u16, content_type: &str, body: &str, head_only: bool) -> io::Result<()> {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Request Header Fields Too Large",
    };
    let mut out = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if code == 405 {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    if !head_only {
        out.push_str(body);
    }
    stream.write_all(out.as_bytes()).await?;
    stream.shutdown().await
}

/// Kept-connection states, in the order the metric lists them.
const SESSION_STATES: [&str; 4] = ["connecting", "active", "suspended", "resuming"];
const MODES: [&str; 3] = ["probing", "kept", "plain"];
const ROLES: [&str; 2] = ["client", "server"];

/// The exposition text for one snapshot.
pub fn render(report: &StatusReport, totals: &Totals) -> String {
    let mut out = String::with_capacity(8 << 10);
    let mut w = Writer { out: &mut out };
    w.family("rocks_info", "gauge", "The running agent: its version and mode (attach or serve).");
    w.sample("rocks_info", &[("version", &report.version), ("mode", &report.mode)], 1);

    w.family("rocks_connections", "gauge", "Connections the agent carries now, by role and by how they are carried.");
    for role in ROLES {
        for mode in MODES {
            let n = report.connections.iter().filter(|c| c.role == role && c.mode == mode).count();
            w.sample("rocks_connections", &[("role", role), ("mode", mode)], n as u64);
        }
    }

    w.family("rocks_sessions", "gauge", "Kept connections (sessions with a peer agent) now, by role and state.");
    for role in ROLES {
        for state in SESSION_STATES {
            let n = report.connections.iter().filter(|c| c.mode == "kept" && c.role == role && c.state == state).count();
            w.sample("rocks_sessions", &[("role", role), ("state", state)], n as u64);
        }
    }

    let c = &report.counters;
    for (name, help, value) in [
        ("rocks_accepted_connections_total", "Redirected connections accepted from applications on this host.", c.accepted),
        ("rocks_kept_connections_total", "Connections opened through a session with a peer agent (client side).", c.kept),
        ("rocks_peer_sessions_total", "Sessions opened by peer agents (server side).", c.peer_sessions),
        (
            "rocks_plain_fallbacks_total",
            "Connections carried as plain TCP because the destination had no usable agent.",
            c.plain_fallbacks,
        ),
        (
            "rocks_refused_targets_total",
            "Sessions refused because the peer asked for a destination that is not an address of this host.",
            c.refused_targets,
        ),
        (
            "rocks_transparent_failures_total",
            "Connections reset because the dial from the client's address could not be made (--transparent on).",
            c.transparent_failures,
        ),
        (
            "rocks_connection_limit_reached_total",
            "Times the agent reached --max-connections and sent new connects direct (not kept).",
            c.connection_limit_reached,
        ),
    ] {
        w.family(name, "counter", help);
        w.sample(name, &[], value);
    }

    w.family(
        "rocks_handshake_failures_total",
        "counter",
        "Session handshakes that failed, by phase (open: a new session; resume: a new transport) and reason.",
    );
    for (phase, reason, n) in &totals.handshake_failures {
        w.sample("rocks_handshake_failures_total", &[("phase", phase.as_str()), ("reason", reason.as_str())], *n);
    }

    w.family("rocks_resumes_total", "counter", "Sessions resumed on a new transport, by role.");
    for (role, h) in ROLES.iter().zip(&totals.resume_latency) {
        w.sample("rocks_resumes_total", &[("role", role)], h.count);
    }
    w.family(
        "rocks_resume_duration_seconds",
        "histogram",
        "How long sessions went without a transport before resuming (0 when a resume replaced a live transport), by role.",
    );
    for (role, h) in ROLES.iter().zip(&totals.resume_latency) {
        w.histogram("rocks_resume_duration_seconds", role, h);
    }

    w.family(
        "rocks_bytes_total",
        "counter",
        "Application bytes carried: sent toward the peer, received from it (open and closed connections).",
    );
    w.sample("rocks_bytes_total", &[("direction", "sent")], totals.bytes_sent);
    w.sample("rocks_bytes_total", &[("direction", "received")], totals.bytes_received);

    w.family("rocks_replay_buffer_bytes", "gauge", "Bytes sent but not yet acknowledged by the peer, kept for a resume.");
    w.sample("rocks_replay_buffer_bytes", &[], totals.buffered);

    w.family("rocks_negative_cache_hosts", "gauge", "Hosts known to have no agent, whose connections are not redirected.");
    w.sample("rocks_negative_cache_hosts", &[], report.negative_cache.len() as u64);

    if let Some(k) = &report.kernel {
        w.family("rocks_kernel_events_total", "counter", "Events counted by the eBPF programs.");
        for (event, n) in [
            ("redirected", k.redirected),
            ("skipped_negative", k.skipped_negative),
            ("skipped_policy", k.skipped_policy),
            ("skipped_agent", k.skipped_agent),
            ("fast_path_msgs", k.fast_path_msgs),
            ("fast_path_misses", k.fast_path_misses),
            ("skipped_limit", k.skipped_limit),
            ("skipped_cidr", k.skipped_cidr),
            ("skipped_cgroup", k.skipped_cgroup),
        ] {
            w.sample("rocks_kernel_events_total", &[("event", event)], n);
        }
    }
    out
}

struct Writer<'a> {
    out: &'a mut String,
}

impl Writer<'_> {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.line(name, labels, &value.to_string());
    }

    fn line(&mut self, name: &str, labels: &[(&str, &str)], value: &str) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    fn histogram(&mut self, name: &str, role: &str, h: &HistogramSnapshot) {
        let bucket = format!("{name}_bucket");
        for (le, n) in &h.buckets {
            self.line(&bucket, &[("role", role), ("le", &le.to_string())], &n.to_string());
        }
        self.line(&bucket, &[("role", role), ("le", "+Inf")], &h.count.to_string());
        self.line(&format!("{name}_sum"), &[("role", role)], &h.sum_secs.to_string());
        self.line(&format!("{name}_count"), &[("role", role)], &h.count.to_string());
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', r"\\").replace('"', "\\\"").replace('\n', r"\n")
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::{
        control::StatusReport,
        redirect::{KernelStats, NegativeEntry},
        registry::{HandshakeFailure, HandshakePhase, Mode, Role},
    };

    fn report(registry: &Registry) -> StatusReport {
        StatusReport {
            version: "0.1.0".into(),
            pid: 42,
            mode: "attach".into(),
            listen: "[::]:4470".into(),
            redirect_port: Some(4471),
            cgroups: vec!["/sys/fs/cgroup/app".into()],
            fast_path: Some(true),
            connections: registry.connections(),
            negative_cache: vec![NegativeEntry { host: "192.0.2.9".parse().unwrap(), expires_in_secs: 60 }],
            kernel: Some(KernelStats { redirected: 5, ..KernelStats::default() }),
            counters: registry.counters(),
            policy: None,
            fast_path_mode: None,
        }
    }

    /// Checks the text format the way a scraper reads it and returns `series -> value`
    /// (series: name and labels as printed).
    fn parse(text: &str) -> BTreeMap<String, f64> {
        let mut types: BTreeMap<String, String> = BTreeMap::new();
        let mut helped = BTreeSet::new();
        let mut samples = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap();
                assert!(helped.insert(name.to_owned()), "HELP twice for {name}");
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut it = rest.split(' ');
                let (name, kind) = (it.next().unwrap(), it.next().unwrap());
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
                assert!(helped.contains(name), "TYPE before HELP: {line}");
                assert!(types.insert(name.to_owned(), kind.to_owned()).is_none(), "TYPE twice: {line}");
            } else {
                let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad sample {line:?}"));
                let name = series.split('{').next().unwrap();
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| name.strip_suffix(suffix).filter(|base| types.get(*base).is_some_and(|k| k == "histogram")))
                    .unwrap_or(name);
                assert!(types.contains_key(family), "sample before its TYPE: {line}");
                if types[family] == "counter" {
                    assert!(name.ends_with("_total"), "counter without _total: {name}");
                }
                let v: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
                assert!(samples.insert(series.to_owned(), v).is_none(), "series twice: {line}");
            }
        }
        samples
    }

    #[test]
    fn renders_every_series_in_the_text_format() {
        let registry = Arc::new(Registry::default());
        let a = registry.register(Role::Client, "127.0.0.1:5000".parse().unwrap(), "192.0.2.2:22".parse().unwrap());
        a.set_mode(Mode::Kept);
        a.set_state("suspended");
        a.bytes_sent.store(1000, std::sync::atomic::Ordering::Relaxed);
        a.buffered.store(300, std::sync::atomic::Ordering::Relaxed);
        a.record_resume(Duration::from_millis(30));
        registry.record_handshake_failure(HandshakePhase::Open, HandshakeFailure::WrongSecret);
        let text = render(&report(&registry), &registry.totals());
        let m = parse(&text);
        assert_eq!(m["rocks_info{version=\"0.1.0\",mode=\"attach\"}"], 1.0);
        assert_eq!(m["rocks_sessions{role=\"client\",state=\"suspended\"}"], 1.0);
        assert_eq!(m["rocks_sessions{role=\"server\",state=\"active\"}"], 0.0);
        assert_eq!(m["rocks_connections{role=\"client\",mode=\"kept\"}"], 1.0);
        assert_eq!(m["rocks_resumes_total{role=\"client\"}"], 1.0);
        assert_eq!(m["rocks_resume_duration_seconds_bucket{role=\"client\",le=\"0.025\"}"], 0.0);
        assert_eq!(m["rocks_resume_duration_seconds_bucket{role=\"client\",le=\"0.05\"}"], 1.0);
        assert_eq!(m["rocks_resume_duration_seconds_bucket{role=\"client\",le=\"+Inf\"}"], 1.0);
        assert_eq!(m["rocks_resume_duration_seconds_count{role=\"client\"}"], 1.0);
        assert!((m["rocks_resume_duration_seconds_sum{role=\"client\"}"] - 0.03).abs() < 1e-9);
        assert_eq!(m["rocks_handshake_failures_total{phase=\"open\",reason=\"wrong_secret\"}"], 1.0);
        assert_eq!(m["rocks_handshake_failures_total{phase=\"resume\",reason=\"timeout\"}"], 0.0);
        assert_eq!(m["rocks_bytes_total{direction=\"sent\"}"], 1000.0);
        assert_eq!(m["rocks_replay_buffer_bytes"], 300.0);
        assert_eq!(m["rocks_negative_cache_hosts"], 1.0);
        assert_eq!(m["rocks_kernel_events_total{event=\"redirected\"}"], 5.0);
        assert_eq!(m["rocks_plain_fallbacks_total"], 0.0);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), r#"a\"b\\c\nd"#);
    }

    struct Fixed(Arc<Registry>);
    impl StatusSource for Fixed {
        fn status(&self) -> StatusReport {
            report(&self.0)
        }
    }

    async fn get(addr: SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn answers_scrapes_over_http() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let registry = Arc::new(Registry::default());
        let task = tokio::spawn(serve(listener, Arc::new(Fixed(registry.clone())), registry));

        let r = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n").await;
        let (head, body) = r.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains(&format!("Content-Type: {CONTENT_TYPE}")), "{head}");
        assert!(head.contains(&format!("Content-Length: {}", body.len())), "{head}");
        assert!(parse(body).contains_key("rocks_bytes_total{direction=\"received\"}"));

        let r = get(addr, "HEAD /metrics HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 200 OK") && r.ends_with("\r\n\r\n"), "{r}");
        assert!(get(addr, "GET /healthz HTTP/1.0\n\n").await.ends_with("\r\n\r\nok\n"));
        assert!(get(addr, "GET /nope HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 404"));
        assert!(get(addr, "POST /metrics HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 405"));
        // Exactly one byte over the bound and never ending: all of it is read (no reset).
        let mut huge = "GET /metrics HTTP/1.1\r\nX: ".to_owned();
        huge.push_str(&"a".repeat(MAX_REQUEST_HEAD + 1 - huge.len()));
        assert!(get(addr, &huge).await.starts_with("HTTP/1.1 431"));
        task.abort();
    }
}
