//! `cargo xtask test`: installs what is missing, builds the agent and the test binaries, and
//! runs the workspace's tests, including the end-to-end tests in `tests/e2e` that need root.

use std::{env, time::Instant};

use anyhow::{Result, bail};

use crate::{
    build, exec,
    setup::{self, Mode},
};

/// The end-to-end tests each build network namespaces and run real agents and peers; more than
/// this many at once overloads a small (2-core) machine and turns timeouts into failures.
const TEST_THREADS: &str = "2";

/// Build everything and run all tests, end-to-end ones included (needs root).
#[derive(clap::Args)]
pub struct Options {
    /// Run only the tests that need no root: everything but the end-to-end tests.
    #[arg(long)]
    unit_only: bool,
    /// Passed to the test binaries (`cargo test -- ARGS`): name filters, --nocapture, ...
    #[arg(last = true)]
    args: Vec<String>,
}

pub fn run(options: Options) -> Result<()> {
    if !options.unit_only && !setup::is_root() {
        bail!(
            "`cargo xtask test` needs root: the end-to-end tests create network namespaces and \
             attach eBPF programs. Run it as root, or pass --unit-only for the tests that need no root."
        );
    }
    let scope = if options.unit_only {
        "unit tests"
    } else {
        "unit and end-to-end tests"
    };
    let started = Instant::now();
    let result = test(&options);
    let verdict = if result.is_ok() { "passed" } else { "FAILED" };
    println!("xtask test: {scope} {verdict} in {:.0?}", started.elapsed());
    result
}

fn test(options: &Options) -> Result<()> {
    setup::ensure(Mode::Install)?;
    build::build(false)?;

    // --no-fail-fast: run every test binary even after one fails, so one run reports all
    // failures. rocks-ebpf only builds for the bpf target (the agent's build script builds it).
    let mut cmd = exec::command("cargo test --workspace --no-fail-fast --exclude rocks-ebpf");
    cmd.env("ROCKS_AGENT_BIN", build::agent_binary(false)?);
    if options.unit_only {
        cmd.args(["--exclude", "rocks-e2e"]);
    }
    // An explicit RUST_TEST_THREADS or `-- --test-threads N` still wins.
    if env::var_os("RUST_TEST_THREADS").is_none() {
        cmd.env("RUST_TEST_THREADS", TEST_THREADS);
    }
    if !options.args.is_empty() {
        cmd.arg("--").args(&options.args);
    }
    exec::run(&mut cmd)
}
