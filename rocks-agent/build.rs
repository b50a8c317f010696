//! Builds the eBPF programs of `rocks-ebpf` with the nightly toolchain and bpf-linker, and
//! leaves the object in OUT_DIR for `include_bytes_aligned!`.
//!
//! Without bpf-linker (a host that only runs `cargo check`/`clippy`), or with
//! `ROCKS_EBPF_STUB=1`, an empty stub object is written instead; the agent then refuses to
//! start with a message that says how to build it properly.
use std::{env, fs, path::PathBuf, process::Command};

use anyhow::{Context as _, Result};

const EBPF_PACKAGE: &str = "rocks-ebpf";
const EBPF_BINARY: &str = "rocks";
const STUB_ENV: &str = "ROCKS_EBPF_STUB";

fn bpf_linker_available() -> bool {
    Command::new("bpf-linker").arg("--version").output().is_ok_and(|out| out.status.success())
}

fn main() -> Result<()> {
    println!("cargo:rerun-if-env-changed={STUB_ENV}");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let stub_requested = env::var(STUB_ENV).is_ok_and(|v| v == "1");
    if stub_requested || !bpf_linker_available() {
        println!(
            "cargo:warning=building rocks-agent WITHOUT eBPF programs ({}); run `cargo xtask setup` for a working agent",
            if stub_requested { "ROCKS_EBPF_STUB=1" } else { "bpf-linker not found" }
        );
        fs::write(out_dir.join(EBPF_BINARY), []).context("writing the stub eBPF object")?;
        return Ok(());
    }
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?);
    let root_dir = manifest_dir.join("..").join(EBPF_PACKAGE);
    let root_dir = root_dir.to_str().context("non-UTF-8 path to the eBPF crate")?;
    aya_build::build_ebpf(
        [aya_build::Package { name: EBPF_PACKAGE, root_dir, ..Default::default() }],
        aya_build::Toolchain::Nightly,
    )
    .context("building the eBPF programs (is `cargo xtask setup` done?)")
}
