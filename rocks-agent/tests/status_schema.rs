//! `status --json` has exactly the fields `docs/status-schema.md` documents: every documented
//! field is present, and nothing undocumented is (adding a field means documenting it). The
//! e2e test `logs.rs` checks the same on a running agent.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use rocks_agent::{
    control::StatusReport,
    redirect::{KernelStats, NegativeEntry},
    registry::{Mode, Registry, Role},
};
use serde_json::Value;

const DOC: &str = include_str!("../../docs/status-schema.md");

/// Section of the document -> the field names its table lists (first column, in backticks).
/// Sections: "" (top level), "connections[]", "negative_cache[]", "kernel", "counters", "policy".
fn documented(doc: &str) -> BTreeMap<String, BTreeSet<String>> {
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
            let name = row.split('`').next().unwrap();
            assert!(out.entry(s.clone()).or_default().insert(name.to_owned()), "{name} listed twice");
        }
    }
    out
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object().unwrap_or_else(|| panic!("not an object: {v}")).keys().cloned().collect()
}

/// Compares a status JSON value with the document, section by section.
fn check(status: &Value, doc: &BTreeMap<String, BTreeSet<String>>) {
    for (section, fields) in doc {
        let value = match section.as_str() {
            "" => status.clone(),
            list if list.ends_with("[]") => status[list.trim_end_matches("[]")][0].clone(),
            object => status[object].clone(),
        };
        assert_eq!(&keys(&value), fields, "section {section:?} of docs/status-schema.md vs {value}");
    }
}

fn populated_report() -> StatusReport {
    let registry = Arc::new(Registry::default());
    let guard = registry.register(Role::Client, "127.0.0.1:40000".parse().unwrap(), "192.0.2.2:22".parse().unwrap());
    guard.set_mode(Mode::Kept);
    guard.set_session_id("be9f6c3309fbed1a233789b03e2e6476".into());
    guard.record_resume(Duration::from_millis(12));
    let report = StatusReport {
        version: env!("CARGO_PKG_VERSION").into(),
        pid: 1,
        mode: "attach".into(),
        listen: "[::]:4470".into(),
        redirect_port: Some(4471),
        cgroups: vec!["/sys/fs/cgroup/app".into()],
        fast_path: Some(true),
        connections: registry.connections(),
        negative_cache: vec![NegativeEntry { host: "192.0.2.9".parse().unwrap(), expires_in_secs: 60 }],
        kernel: Some(KernelStats::default()),
        counters: registry.counters(),
        policy: Some(rocks_agent::policy::PolicyReport { ports: Some(vec![22]), ..Default::default() }),
        fast_path_mode: Some(rocks_agent::fastpath::FastPathStatus::default()),
    };
    drop(guard);
    report
}

#[test]
fn status_json_has_exactly_the_documented_fields() {
    let doc = documented(DOC);
    assert_eq!(
        doc.keys().map(String::as_str).collect::<Vec<_>>(),
        ["", "connections[]", "counters", "fast_path_mode", "kernel", "negative_cache[]", "policy"],
        "sections of docs/status-schema.md"
    );
    let report = populated_report();
    check(&serde_json::to_value(&report).unwrap(), &doc);

    // `serve`: the same fields, the attach-only ones null (not missing).
    let serve = StatusReport {
        mode: "serve".into(),
        redirect_port: None,
        cgroups: vec![],
        fast_path: None,
        kernel: None,
        policy: None,
        fast_path_mode: None,
        ..report
    };
    let v = serde_json::to_value(&serve).unwrap();
    assert_eq!(keys(&v), doc[""]);
    for field in ["redirect_port", "fast_path", "fast_path_mode", "kernel", "policy"] {
        assert!(v[field].is_null(), "{field}: {v}");
    }
}

#[test]
fn the_documented_example_is_a_valid_status() {
    let json = DOC.split("```json").nth(1).and_then(|rest| rest.split("```").next()).expect("an example");
    let example: Value = serde_json::from_str(json).expect("the example is JSON");
    check(&example, &documented(DOC));
    // And the agent's own client reads it.
    let _: StatusReport = serde_json::from_value(example).expect("status --json parses the example");
}
