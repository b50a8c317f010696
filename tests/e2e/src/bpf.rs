//! What is attached to a cgroup, as `bpftool` reports it.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::util::run_checked;

/// One program attached directly to a cgroup (`bpftool -j cgroup show PATH`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Attached {
    pub id: u32,
    /// `cgroup_inet4_connect`, `cgroup_sock_ops`, ...
    pub attach_type: String,
    /// `multi`, `override` or empty.
    pub attach_flags: String,
    pub name: String,
}

/// The programs attached directly to `cgroup` (not inherited from its ancestors).
pub fn cgroup_programs(cgroup: &Path) -> Result<Vec<Attached>> {
    let mut cmd = Command::new("bpftool");
    cmd.args(["-j", "cgroup", "show"]).arg(cgroup);
    let out = run_checked(&mut cmd)?;
    // bpftool prints nothing at all for a cgroup without programs.
    if out.trim().is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str(&out).with_context(|| format!("bpftool cgroup show printed: {out}"))
}

/// The attached programs whose name starts with `rocks_`.
pub fn rocks_programs(cgroup: &Path) -> Result<Vec<Attached>> {
    Ok(cgroup_programs(cgroup)?
        .into_iter()
        .filter(|a| a.name.starts_with("rocks_"))
        .collect())
}

/// Whether a BPF program with this id is still loaded.
pub fn prog_loaded(id: u32) -> bool {
    Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .output()
        .is_ok_and(|o| o.status.success())
}
