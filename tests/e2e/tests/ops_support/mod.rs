//! Helpers for the operations tests (`metrics`, `config`, `logs`, `deploy`): scraping an
//! agent's `/metrics` from inside its host, reading the Prometheus text format the way a
//! scraper does, and the fields `docs/status-schema.md` documents.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use rocks_e2e::Host;

/// The workspace root (two levels above this package).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("workspace root")
}

/// `GET path` over HTTP/1.1 to `addr` inside `host`'s network namespace; returns the status
/// code, the response head and the body.
pub fn http_get(host: &Host, addr: SocketAddr, path: &str) -> Result<(u16, String, String)> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/plain\r\n\r\n");
    let raw = std::thread::scope(|s| {
        s.spawn(|| -> Result<Vec<u8>> {
            nix::sched::setns(host.netns_file(), nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).with_context(|| format!("connect {addr}"))?;
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            stream.write_all(request.as_bytes())?;
            let mut raw = Vec::new();
            stream.read_to_end(&mut raw)?;
            Ok(raw)
        })
        .join()
        .expect("scrape thread")
    })?;
    let text = String::from_utf8(raw).context("response is not UTF-8")?;
    let (head, body) = text.split_once("\r\n\r\n").with_context(|| format!("no end of head in {text:?}"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad status line in {head:?}"))?;
    if let Some(len) = head.lines().find_map(|l| l.strip_prefix("Content-Length: ")) {
        ensure!(len.trim().parse::<usize>()? == body.len(), "Content-Length {len} but {} bytes", body.len());
    }
    Ok((code, head.to_owned(), body.to_owned()))
}

/// One scrape, checked and parsed.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Series (name and labels as printed, e.g. `rocks_bytes_total{direction="sent"}`) -> value.
    pub samples: BTreeMap<String, f64>,
    /// Family name -> type.
    pub types: BTreeMap<String, String>,
    pub text: String,
}

impl Metrics {
    /// The value of a series; fails the test when it is missing.
    pub fn get(&self, series: &str) -> f64 {
        *self
            .samples
            .get(series)
            .unwrap_or_else(|| panic!("no series {series} in the scrape:\n{}", self.text))
    }

    /// The samples of one histogram with these labels (`role="client"`): buckets by bound,
    /// count and sum.
    pub fn histogram(&self, name: &str, labels: &str) -> (Vec<(String, f64)>, f64, f64) {
        let prefix = format!("{name}_bucket{{{labels},le=\"");
        let bound = |le: &str| if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::NAN) };
        let mut buckets = self
            .samples
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|le| (le.trim_end_matches("\"}").to_owned(), *v)))
            .collect::<Vec<_>>();
        // In the order of their bounds (the map's order is the text's).
        buckets.sort_by(|a, b| bound(&a.0).total_cmp(&bound(&b.0)));
        (buckets, self.get(&format!("{name}_count{{{labels}}}")), self.get(&format!("{name}_sum{{{labels}}}")))
    }
}

/// Parses the Prometheus text format (0.0.4) strictly: every sample's family has `# HELP`
/// and `# TYPE` first, counters end in `_total`, no series twice, histograms' buckets are
/// cumulative and end with `le="+Inf"` equal to `_count`.
pub fn parse_metrics(text: &str) -> Result<Metrics> {
    let mut types = BTreeMap::new();
    let mut helped = BTreeSet::new();
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').with_context(|| format!("bad HELP {line:?}"))?;
            ensure!(!help.trim().is_empty(), "empty HELP for {name}");
            ensure!(helped.insert(name.to_owned()), "HELP twice for {name}");
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').with_context(|| format!("bad TYPE {line:?}"))?;
            ensure!(["counter", "gauge", "histogram"].contains(&kind), "unknown type in {line:?}");
            ensure!(types.insert(name.to_owned(), kind.to_owned()).is_none(), "TYPE twice for {name}");
        } else if line.starts_with('#') {
            continue;
        } else {
            let (series, value) = line.rsplit_once(' ').with_context(|| format!("bad sample {line:?}"))?;
            let name = series.split('{').next().unwrap_or_default();
            ensure!(
                name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "bad metric name in {line:?}"
            );
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|b| types.get(*b).is_some_and(|t| t == "histogram")))
                .unwrap_or(name);
            let Some(kind) = types.get(family) else { bail!("sample before its TYPE: {line:?}") };
            ensure!(helped.contains(family), "no HELP for {family}");
            if kind == "counter" {
                ensure!(name.ends_with("_total"), "counter {name} does not end in _total");
            }
            let v: f64 = value.parse().with_context(|| format!("bad value in {line:?}"))?;
            ensure!(v >= 0.0, "negative value in {line:?}");
            ensure!(samples.insert(series.to_owned(), v).is_none(), "series twice: {line:?}");
        }
    }
    let m = Metrics { samples, types, text: text.to_owned() };
    for (name, kind) in &m.types {
        if kind != "histogram" {
            continue;
        }
        let label_sets: BTreeSet<String> = m
            .samples
            .keys()
            .filter_map(|k| k.strip_prefix(&format!("{name}_count{{")))
            .map(|l| l.trim_end_matches('}').to_owned())
            .collect();
        ensure!(!label_sets.is_empty(), "histogram {name} without samples");
        for labels in label_sets {
            let (buckets, count, _) = m.histogram(name, &labels);
            ensure!(buckets.last().is_some_and(|(le, _)| le == "+Inf"), "{name}{{{labels}}}: no +Inf bucket last");
            ensure!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "{name}{{{labels}}}: buckets not cumulative: {buckets:?}");
            ensure!(buckets.last().map(|b| b.1) == Some(count), "{name}{{{labels}}}: +Inf bucket != _count");
        }
    }
    Ok(m)
}

/// Scrapes `http://addr/metrics` inside `host` and parses it.
pub fn scrape(host: &Host, addr: SocketAddr) -> Result<Metrics> {
    let (code, head, body) = http_get(host, addr, "/metrics")?;
    ensure!(code == 200, "GET /metrics answered {code}: {head}");
    ensure!(head.contains("Content-Type: text/plain; version=0.0.4"), "content type: {head}");
    parse_metrics(&body)
}

/// Section of `docs/status-schema.md` ("" for the top level, "connections[]", "kernel", ...)
/// -> the field names its table lists.
pub fn documented_status_fields() -> BTreeMap<String, BTreeSet<String>> {
    let doc = std::fs::read_to_string(workspace_root().join("docs/status-schema.md")).expect("docs/status-schema.md");
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut section = None;
    for line in doc.lines() {
        if let Some(h) = line.strip_prefix("## ") {
            section = match h.trim() {
                "Top level" => Some(String::new()),
                "Example" => None,
                other => Some(other.trim_matches('`').to_owned()),
            };
        } else if let (Some(s), Some(row)) = (&section, line.strip_prefix("| `")) {
            out.entry(s.clone()).or_default().insert(row.split('`').next().unwrap_or_default().to_owned());
        }
    }
    out
}

/// Checks that a live `status --json` has exactly the documented fields in every section
/// that has a value (lists need one element, `kernel` needs `attach`).
pub fn check_status_schema(status: &serde_json::Value) -> Result<()> {
    let keys = |v: &serde_json::Value| -> BTreeSet<String> { v.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default() };
    for (section, fields) in documented_status_fields() {
        let value = match section.as_str() {
            "" => status.clone(),
            list if list.ends_with("[]") => status[list.trim_end_matches("[]")][0].clone(),
            object => status[object].clone(),
        };
        if value.is_null() {
            continue;
        }
        ensure!(keys(&value) == fields, "section {section:?}: status has {:?}, docs/status-schema.md lists {fields:?}", keys(&value));
    }
    Ok(())
}
