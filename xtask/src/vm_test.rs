//! `cargo xtask vm-test`: the scenarios of `tests/vm` on Debian's 6.1 and 6.12 LTS kernels.
//!
//! Per kernel, two QEMU VMs (TCG) boot an initramfs holding the agent, the test peer, busybox
//! and the modules they need, joined by a private link: the server VM runs the peer agents and
//! a test peer, the client VM attaches an agent and runs the scenarios, printing one verdict
//! line per scenario on its serial console. The host reads the consoles, takes the link down
//! when a scenario asks, ends hung or panicked VMs, and prints a table of verdicts and times.
//! Kernels run one after the other (TCG is CPU-bound). `tests/vm/README.md` has the details.
//!
//! Submodules: `kernel` (Debian packages, cache), `initramfs` (the archive), `qemu` (the VMs,
//! consoles, watchdog, link control), `report` (results and the table).

mod initramfs;
mod kernel;
mod qemu;
mod report;

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    exec,
    setup::{self, Mode},
};
use kernel::Series;
use report::{Column, KernelRun};

/// Boot Debian's 6.1 and 6.12 kernels in QEMU and run the scenarios of tests/vm in them.
#[derive(clap::Args)]
pub struct Options {
    /// Kernel series to test (repeatable). Default: all of them.
    #[arg(long = "kernel", value_enum, value_name = "SERIES")]
    kernels: Vec<Series>,
    /// Run only this scenario (repeatable); `attach` still runs first, as setup.
    #[arg(long = "scenario", value_name = "NAME")]
    scenarios: Vec<String>,
    /// Watchdog: give up on a kernel's VMs after this many seconds.
    #[arg(long, default_value_t = 600, value_name = "SECONDS")]
    timeout: u64,
    /// Start every agent with `--keep-for DURATION`. Shorter than the 30 s outage (`1s`), the
    /// link-down scenario must fail: the way to see that a broken agent is caught.
    #[arg(long, value_name = "DURATION", env = "ROCKS_VM_KEEP_FOR")]
    keep_for: Option<String>,
    /// Print every console line of both VMs as it arrives.
    #[arg(long)]
    verbose: bool,
}

/// The static target of the binaries in the initramfs.
const MUSL: &str = "x86_64-unknown-linux-musl";
/// Debian packages only the VM tests need (on top of `cargo xtask setup`'s).
const VM_PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static"];

pub fn run(options: Options) -> Result<()> {
    let started = Instant::now();
    let root = workspace_root();
    let scripts = root.join("tests/vm");
    let all: Vec<String> = scenario_files(&scripts)?
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    for name in &options.scenarios {
        if !all.contains(name) {
            bail!(
                "no scenario {name} in tests/vm/scenarios (there are: {})",
                all.join(", ")
            );
        }
    }
    // The table and the missing-verdict check follow the client's order, whatever the flags'.
    let selected: Vec<String> = all
        .iter()
        .filter(|n| options.scenarios.is_empty() || options.scenarios.contains(n))
        .cloned()
        .collect();
    let mut kernels = if options.kernels.is_empty() {
        Series::ALL.to_vec()
    } else {
        options.kernels.clone()
    };
    kernels.sort();
    kernels.dedup();

    setup::ensure(Mode::Install)?;
    vm_tools()?;
    let target = target_dir()?;
    let work = target.join("vm-test");
    let cache = env::var_os("ROCKS_VM_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| target.join("vm-cache"));
    let payload = build_payload(&scripts, &target, &work)?;
    let built = started.elapsed();

    let mut columns = Vec::new();
    for series in kernels {
        println!("vm-test: kernel {}", series.name());
        let kernel_started = Instant::now();
        let run = run_kernel(series, &options, &payload, &cache, &work, &selected);
        if let Err(e) = &run {
            println!("vm-test: kernel {}: {e:#}", series.name());
        }
        columns.push(Column {
            series: series.name(),
            label: run
                .as_ref()
                .map_or(series.name().to_owned(), |(label, _)| label.clone()),
            run: run.map(|(_, run)| run).map_err(|e| format!("{e:#}")),
            wall: kernel_started.elapsed(),
        });
    }

    // Failure details first, the summary last, where a reader of CI logs looks.
    report::print_failures(&columns);
    match &options.keep_for {
        Some(k) => println!("\nvm-test summary (agents with --keep-for {k})"),
        None => println!("\nvm-test summary"),
    }
    print!("{}", report::table(&selected, &columns));
    let (passed, failed) = report::tally(&columns);
    let took = format!(
        "in {} (setup+build {}{})",
        report::minutes(started.elapsed()),
        report::minutes(built),
        columns
            .iter()
            .map(|c| format!(", {} {}", c.series, report::minutes(c.wall)))
            .collect::<String>(),
    );
    if failed.is_empty() {
        println!("vm-test: {passed} passed {took}");
        Ok(())
    } else {
        println!("vm-test: FAILED: {} {took}", failed.join(", "));
        bail!("vm-test failed: {}", failed.join(", "))
    }
}

fn run_kernel(
    series: Series,
    options: &Options,
    payload: &initramfs::Payload,
    cache: &Path,
    work: &Path,
    selected: &[String],
) -> Result<(String, KernelRun)> {
    let kernel = kernel::prepare(series, cache)?;
    let dir = work.join(series.name());
    fs::create_dir_all(&dir)?;
    let image = dir.join("initramfs.cpio");
    initramfs::build(payload, &kernel, &image)?;
    let size = fs::metadata(&image)?.len();
    println!(
        "vm-test: {} is {} ({}); initramfs {} MiB; booting the server and client VMs",
        series.name(),
        kernel.package,
        kernel.release,
        size >> 20,
    );
    let label = format!("{} ({})", series.name(), kernel.release);
    let run = qemu::run(&qemu::Plan {
        label: series.name(),
        vmlinuz: &kernel.vmlinuz,
        initramfs: &image,
        dir: &dir,
        scenarios: selected,
        selected_all: options.scenarios.is_empty(),
        keep_for: options.keep_for.as_deref(),
        timeout: Duration::from_secs(options.timeout),
        verbose: options.verbose,
    })?;
    Ok((label, run))
}

/// `tests/vm/scenarios/NN-NAME.sh` as (NAME, path), in file-name order: the order the client
/// runs them in.
fn scenario_files(scripts: &Path) -> Result<Vec<(String, PathBuf)>> {
    let dir = scripts.join("scenarios");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "sh"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let stem = path
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            match stem.split_once('-') {
                Some((_, name)) if !name.is_empty() => Ok((name.to_owned(), path)),
                _ => bail!("{}: scenario files are named NN-NAME.sh", path.display()),
            }
        })
        .collect()
}

/// What vm-test needs beyond `cargo xtask setup`: QEMU, static busybox, the musl target.
/// Probed first and installed only when missing, printing `ok: …` otherwise, as setup does.
fn vm_tools() -> Result<()> {
    let missing: Vec<&str> = VM_PACKAGES
        .iter()
        .copied()
        .filter(|package| {
            exec::probe(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
                .is_none_or(|status| status != "install ok installed")
        })
        .collect();
    if missing.is_empty() {
        println!("ok: Debian packages {} installed", VM_PACKAGES.join(" "));
    } else {
        if !setup::is_root() {
            bail!(
                "missing Debian packages {}; installing them needs root: run `cargo xtask vm-test` as root",
                missing.join(" ")
            );
        }
        let apt_get = || {
            let mut cmd = Command::new("apt-get");
            cmd.env("DEBIAN_FRONTEND", "noninteractive");
            cmd
        };
        exec::run(apt_get().arg("update"))?;
        exec::run(
            apt_get()
                .args(["install", "-y", "--no-install-recommends"])
                .args(&missing),
        )?;
        println!("installed Debian packages {}", missing.join(" "));
    }

    let targets =
        exec::probe(&mut exec::command("rustup target list --installed")).unwrap_or_default();
    if targets.lines().any(|t| t.trim() == MUSL) {
        println!("ok: rustup target {MUSL}");
    } else {
        exec::run(exec::command("rustup target add").arg(MUSL))?;
        println!("installed rustup target {MUSL}");
    }
    Ok(())
}

/// Builds the static agent and test peer, strips them into `work/bin`, and gathers the other
/// files every initramfs holds.
fn build_payload(scripts: &Path, target: &Path, work: &Path) -> Result<initramfs::Payload> {
    exec::run(
        exec::command("cargo build --package rocks-agent --package rocks-e2e --bins --target")
            .arg(MUSL),
    )?;
    let built = target.join(MUSL).join("debug");
    let bin = work.join("bin");
    fs::create_dir_all(&bin)?;
    let mut stripped = Vec::new();
    for name in ["rocks-agent", "rocks-testpeer"] {
        let out = bin.join(name);
        // Debug info would make the archive 100+ MiB; the guests never need it.
        exec::run(
            Command::new("strip")
                .arg("-o")
                .arg(&out)
                .arg(built.join(name)),
        )
        .context("stripping needs `strip` (Debian package binutils)")?;
        stripped.push(out);
    }
    let busybox = PathBuf::from("/bin/busybox");
    if !busybox.exists() {
        bail!("no /bin/busybox (Debian package busybox-static)");
    }
    Ok(initramfs::Payload {
        scripts: scripts.to_owned(),
        busybox,
        testpeer: stripped.pop().expect("two binaries"),
        agent: stripped.pop().expect("two binaries"),
        bpftool: initramfs::bpftool_files()?,
    })
}

fn workspace_root() -> PathBuf {
    // xtask lives one level below the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_owned()
}

/// The workspace's target directory as cargo resolves it (CARGO_TARGET_DIR, config files).
fn target_dir() -> Result<PathBuf> {
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
