//! `cargo xtask setup`: bootstraps a Debian 12 machine for building, the demo and the tests.
//!
//! Every requirement is probed first and only what is missing is installed, so on a ready
//! machine this does no apt, rustup or network work at all and is safe to run before every
//! build (`build` and `test` do).

use std::{
    env,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::exec;

/// Install (as root) what the build, the demo and the tests need; idempotent.
#[derive(clap::Args)]
pub struct Options {
    /// Only report what is missing, installing nothing; exit non-zero if anything is.
    #[arg(long)]
    check: bool,
}

pub fn run(options: Options) -> Result<()> {
    if options.check {
        let missing = ensure(Mode::Check)?;
        if !missing.is_empty() {
            bail!(
                "missing: {}; `cargo xtask setup` installs what is missing",
                missing.join(", ")
            );
        }
        Ok(())
    } else {
        ensure(Mode::Install).map(drop)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Report what is missing.
    Check,
    /// Install what is missing; fail if something cannot be installed.
    Install,
}

/// Build dependencies of bpf-linker (it links against Debian's LLVM 22), then the real
/// programs the end-to-end tests and the demo run inside network namespaces.
const DEBIAN_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "openssh-server",
    "openssh-client",
    "iperf3",
    "socat",
    "rsync",
    "nftables",
    "iproute2",
    "iputils-ping",
    "bpftool",
    "procps",
];

/// Debian's LLVM 22, which bpf-linker is built against.
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// The bpf-linker release that works with the pinned aya and the nightly's LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_LINKER_SERIES: &str = "0.13.";
const BPFFS: &str = "/sys/fs/bpf";

/// Checks every requirement in order and, in [`Mode::Install`], installs what is missing before
/// moving on: later probes rely on earlier installs (rust-src needs the nightly toolchain,
/// bpf-linker needs LLVM). Prints one line per requirement and returns what is missing
/// (always empty in install mode, which fails instead).
pub fn ensure(mode: Mode) -> Result<Vec<String>> {
    let requirements: [fn() -> Result<Found>; 6] = [
        debian_packages,
        nightly_toolchain,
        rust_src,
        bpf_linker,
        bpffs,
        cgroup2,
    ];
    let mut missing = Vec::new();
    for requirement in requirements {
        let (what, fix) = match requirement()? {
            Found::Present(what) => {
                println!("ok: {what}");
                continue;
            }
            Found::Missing { what, fix } => (what, fix),
        };
        if mode == Mode::Check {
            println!("missing: {what}");
            missing.push(what);
            continue;
        }
        let Some(fix) = fix else {
            bail!("missing: {what}");
        };
        if fix.needs_root && !is_root() {
            bail!("missing: {what}; installing it needs root: run `cargo xtask setup` as root");
        }
        let done = (fix.install)()?;
        // Probe again so an install that "succeeded" without the effect (say, a binary not on
        // PATH) fails here, not halfway through a build.
        if let Found::Missing { what, .. } = requirement()? {
            bail!("still missing after `{done}`: {what}");
        }
        println!("{done}");
    }
    Ok(missing)
}

/// One requirement as found on this machine.
enum Found {
    /// Present; says what was found.
    Present(String),
    /// Absent: what is missing, and how to install it (`None`: the message says why not).
    Missing { what: String, fix: Option<Fix> },
}

struct Fix {
    needs_root: bool,
    /// Installs, and returns the line to print: what it did.
    install: Box<dyn FnOnce() -> Result<String>>,
}

impl Found {
    fn missing(
        what: String,
        needs_root: bool,
        install: impl FnOnce() -> Result<String> + 'static,
    ) -> Self {
        Found::Missing {
            what,
            fix: Some(Fix {
                needs_root,
                install: Box::new(install),
            }),
        }
    }
}

pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

fn debian_packages() -> Result<Found> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|package| !is_installed(package))
        .collect();
    if missing.is_empty() {
        return Ok(Found::Present(format!(
            "{} Debian packages installed",
            DEBIAN_PACKAGES.len()
        )));
    }
    let what = format!("Debian packages {}", missing.join(" "));
    Ok(Found::missing(what, true, move || {
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
        Ok(format!("installed Debian packages {}", missing.join(" ")))
    }))
}

fn is_installed(package: &str) -> bool {
    // Unknown packages make dpkg-query fail; removed-but-configured ones report another status.
    exec::probe(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_some_and(|status| status == "install ok installed")
}

fn nightly_toolchain() -> Result<Found> {
    // Ask rustup for its list rather than running `+nightly`: rustup may auto-install a missing
    // toolchain on use, and a check must not download anything.
    let toolchains = exec::probe(&mut exec::command("rustup toolchain list")).unwrap_or_default();
    if let Some(name) = toolchains.lines().find(|line| line.starts_with("nightly-")) {
        let name = name.split_whitespace().next().unwrap_or(name);
        return Ok(Found::Present(format!("rustup toolchain {name}")));
    }
    Ok(Found::missing(
        "rustup toolchain nightly".into(),
        false,
        || {
            exec::run(&mut exec::command(
                "rustup toolchain install nightly --profile minimal",
            ))?;
            Ok("installed rustup toolchain nightly".into())
        },
    ))
}

fn rust_src() -> Result<Found> {
    // The eBPF crate builds core from source for the bpf target.
    let components = exec::probe(&mut exec::command(
        "rustup component list --toolchain nightly --installed",
    ))
    .unwrap_or_default();
    if components.lines().any(|line| line.trim() == "rust-src") {
        return Ok(Found::Present("rust-src for the nightly toolchain".into()));
    }
    Ok(Found::missing(
        "rust-src for the nightly toolchain".into(),
        false,
        || {
            exec::run(&mut exec::command(
                "rustup component add rust-src --toolchain nightly",
            ))?;
            Ok("installed rust-src for the nightly toolchain".into())
        },
    ))
}

fn bpf_linker() -> Result<Found> {
    // `bpf-linker 0.13.0`
    let found =
        exec::probe(Command::new("bpf-linker").arg("--version")).map(|out| out.trim().to_owned());
    let version = found
        .as_deref()
        .and_then(|out| out.split_whitespace().nth(1));
    if version.is_some_and(|v| v.starts_with(BPF_LINKER_SERIES)) {
        return Ok(Found::Present(found.unwrap_or_default()));
    }
    let what = match &found {
        Some(other) => format!("bpf-linker {BPF_LINKER_SERIES}x (found {other})"),
        None => format!("bpf-linker {BPF_LINKER_SERIES}x (not on PATH)"),
    };
    Ok(Found::missing(what, false, || {
        // Without LLVM_PREFIX llvm-sys cannot find Debian's libLLVM ("unable to find library
        // -lLLVM"); llvm-config must come from the same LLVM, hence PATH.
        let llvm_bin = Path::new(LLVM_PREFIX).join("bin");
        let path = env::join_paths(
            std::iter::once(llvm_bin)
                .chain(env::split_paths(&env::var_os("PATH").unwrap_or_default())),
        )?;
        exec::run(
            exec::command(
                "cargo install bpf-linker --locked --no-default-features --features llvm-22",
            )
            .args(["--version", &format!("={BPF_LINKER_VERSION}")])
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env("PATH", path),
        )?;
        Ok(format!("installed bpf-linker {BPF_LINKER_VERSION}"))
    }))
}

fn bpffs() -> Result<Found> {
    // The agent pins its maps and links here so they outlive its restarts.
    let mounted = mounts()?
        .iter()
        .any(|m| m.fstype == "bpf" && m.target == Path::new(BPFFS));
    if mounted {
        return Ok(Found::Present(format!("bpffs mounted at {BPFFS}")));
    }
    Ok(Found::missing(format!("bpffs at {BPFFS}"), true, || {
        exec::run(exec::command("mount -t bpf bpffs").arg(BPFFS))?;
        Ok(format!("mounted bpffs at {BPFFS}"))
    }))
}

fn cgroup2() -> Result<Found> {
    // Where cgroup2 lives depends on the init system (/sys/fs/cgroup on a unified layout,
    // /sys/fs/cgroup/unified on a hybrid one), so find it rather than assume it. Mounting one is
    // the init system's business, not ours: only report.
    match mounts()?.into_iter().find(|m| m.fstype == "cgroup2") {
        Some(m) => Ok(Found::Present(format!(
            "cgroup2 mounted at {}",
            m.target.display()
        ))),
        None => Ok(Found::Missing {
            what: "a cgroup2 mount in /proc/self/mounts (mount one: `mount -t cgroup2 none DIR`)"
                .into(),
            fix: None,
        }),
    }
}

/// One line of `/proc/self/mounts`.
struct Mount {
    target: PathBuf,
    fstype: String,
}

fn mounts() -> Result<Vec<Mount>> {
    let text = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            Some(Mount {
                target: PathBuf::from(unescape(target)),
                fstype: fstype.to_owned(),
            })
        })
        .collect())
}

/// The kernel writes space, tab, newline and backslash in mount paths as octal escapes (`\040`).
fn unescape(field: &str) -> OsString {
    use std::os::unix::ffi::OsStringExt as _;
    let mut out = Vec::with_capacity(field.len());
    let mut rest = field.as_bytes();
    while let Some((&first, tail)) = rest.split_first() {
        if let [b'\\', a @ b'0'..=b'3', b @ b'0'..=b'7', c @ b'0'..=b'7', ..] = *rest {
            out.push((a - b'0') * 64 + (b - b'0') * 8 + (c - b'0'));
            rest = &rest[4..];
        } else {
            out.push(first);
            rest = tail;
        }
    }
    OsString::from_vec(out)
}

#[cfg(test)]
mod tests {
    use super::unescape;

    #[test]
    fn unescapes_mount_paths() {
        assert_eq!(unescape(r"/mnt/a\040b\134c"), "/mnt/a b\\c");
        assert_eq!(unescape("/sys/fs/cgroup/unified"), "/sys/fs/cgroup/unified");
        assert_eq!(unescape(r"/odd\04"), r"/odd\04");
        assert_eq!(unescape(r"/odd\+12\999"), r"/odd\+12\999");
    }
}
