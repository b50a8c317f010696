//! `cargo xtask build`: the agent (whose build script compiles the eBPF programs with the
//! nightly toolchain and bpf-linker) and the binaries the end-to-end tests run.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result};

use crate::{
    exec,
    setup::{self, Mode},
};

/// Build the agent, its eBPF programs and the test binaries (installs what is missing first).
#[derive(clap::Args)]
pub struct Options {
    /// Build with the release profile.
    #[arg(long)]
    release: bool,
}

pub fn run(options: Options) -> Result<()> {
    setup::ensure(Mode::Install)?;
    build(options.release)
}

/// `cargo build` of the agent and the e2e binaries, in one invocation so cargo resolves
/// features once for both.
pub fn build(release: bool) -> Result<()> {
    exec::run(&mut build_command(release))
}

/// The `cargo build` command line [`build`] runs, for callers that run it their own way.
pub fn build_command(release: bool) -> Command {
    let mut cmd = exec::command("cargo build --package rocks-agent --package rocks-e2e --bins");
    if release {
        cmd.arg("--release");
    }
    cmd
}

/// Absolute path of the `rocks-agent` binary that [`build`] produces.
pub fn agent_binary(release: bool) -> Result<PathBuf> {
    let profile = if release { "release" } else { "debug" };
    Ok(target_dir()?.join(profile).join("rocks-agent"))
}

/// The workspace's target directory as cargo resolves it (CARGO_TARGET_DIR, config files,
/// default): cargo knows, so ask it.
pub fn target_dir() -> Result<PathBuf> {
    let metadata = exec::stdout(&mut exec::command(
        "cargo metadata --format-version 1 --no-deps",
    ))?;
    let metadata: serde_json::Value =
        serde_json::from_str(&metadata).context("parsing `cargo metadata` output")?;
    let dir = metadata["target_directory"]
        .as_str()
        .context("`cargo metadata` output has no target_directory")?;
    Ok(PathBuf::from(dir))
}
