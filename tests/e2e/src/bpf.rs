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

/// One BPF link attached to a cgroup (`bpftool -j link show`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct CgroupLink {
    pub id: u32,
    pub prog_id: u32,
    /// `cgroup_inet4_connect`, `cgroup_sock_ops`, ...
    pub attach_type: String,
}

#[derive(Deserialize)]
struct LinkRow {
    id: u32,
    prog_id: u32,
    #[serde(default)]
    cgroup_id: Option<u64>,
    #[serde(default)]
    attach_type: Option<String>,
}

/// The BPF links on `cgroup` (a cgroup's id is its directory's inode number), sorted by
/// attach type.
pub fn cgroup_links(cgroup: &Path) -> Result<Vec<CgroupLink>> {
    use std::os::unix::fs::MetadataExt;
    let id = std::fs::metadata(cgroup)
        .with_context(|| format!("stat {}", cgroup.display()))?
        .ino();
    let mut cmd = Command::new("bpftool");
    cmd.args(["-j", "link", "show"]);
    let out = run_checked(&mut cmd)?;
    let rows: Vec<LinkRow> = if out.trim().is_empty() {
        Vec::new()
    } else {
        serde_json::from_str(&out).with_context(|| format!("bpftool link show printed: {out}"))?
    };
    let mut links: Vec<CgroupLink> = rows
        .into_iter()
        .filter(|r| r.cgroup_id == Some(id))
        .map(|r| CgroupLink {
            id: r.id,
            prog_id: r.prog_id,
            attach_type: r.attach_type.unwrap_or_default(),
        })
        .collect();
    links.sort_by(|a, b| a.attach_type.cmp(&b.attach_type));
    Ok(links)
}

/// Where agents pin their links and maps, one directory per run directory.
pub const PIN_ROOT: &str = "/sys/fs/bpf/rocks";

/// The pin directories whose name contains `run_dir`'s last components, as the agent spells
/// them (every byte but `[A-Za-z0-9_-]` becomes `_`).
pub fn pin_dirs_of(run_dir: &Path) -> Vec<std::path::PathBuf> {
    let readable: String = run_dir
        .to_string_lossy()
        .trim_start_matches('/')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let Ok(entries) = std::fs::read_dir(PIN_ROOT) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .strip_prefix(readable.as_str())
                .is_some_and(|rest| rest.starts_with('-') && rest.len() == 17)
        })
        .map(|e| e.path())
        .collect()
}

/// Removes the pins of test agents whose test process is gone (a run killed before its drops
/// ran): the pin directories of run directories under our temp directories, named after the
/// creating pid (`tmp_rocks-e2e-<pid>-...`). Unpinning releases their links, which detaches
/// them.
pub fn cleanup_stale_pins() {
    let Ok(entries) = std::fs::read_dir(PIN_ROOT) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .split_once("rocks-e2e-")
            .and_then(|(_, r)| r.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(modified) = entry.metadata().and_then(|m| m.modified()) else {
            continue;
        };
        if !crate::util::pid_alive_since(pid, modified) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// How many entries the map `map` (its full name; bpftool shows 15 characters) of the rocks
/// program `program` attached to `cgroup` holds. Found through the program, since the agents
/// of tests running in parallel have maps of the same name.
pub fn rocks_map_entries(cgroup: &Path, program: &str, map: &str) -> Result<usize> {
    let bpftool = |args: &[&str]| -> Result<serde_json::Value> {
        let mut cmd = Command::new("bpftool");
        cmd.arg("-j").args(args);
        let out = run_checked(&mut cmd)?;
        serde_json::from_str(&out).with_context(|| format!("bpftool {args:?} printed: {out}"))
    };
    let prog = rocks_programs(cgroup)?
        .into_iter()
        .find(|p| p.name == program)
        .with_context(|| format!("{program} is not attached to {}", cgroup.display()))?;
    let info = bpftool(&["prog", "show", "id", &prog.id.to_string()])?;
    for id in info["map_ids"].as_array().context("no map_ids")? {
        let id = id.to_string();
        let shown = bpftool(&["map", "show", "id", &id])?;
        if shown["name"].as_str().is_some_and(|n| !n.is_empty() && map.starts_with(n)) {
            let dump = bpftool(&["map", "dump", "id", &id])?;
            return Ok(dump.as_array().map_or(0, Vec::len));
        }
    }
    anyhow::bail!("{program} uses no map {map}: {info}")
}
