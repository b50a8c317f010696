//! `cargo xtask image`: the agent's container image, `FROM scratch` around a static (musl)
//! build of the agent, made with buildah; `--test` then runs it with podman the way the
//! DaemonSet runs it and shows a kept connection through it surviving an address change
//! (`tests/e2e/tests/image.rs`).
//!
//! Images live in a store of their own under `target/image/` (vfs driver, runc, cgroupfs: what
//! works on a machine without systemd as init and with a hybrid cgroup layout), so the machine's
//! own podman storage is never touched; the image is also written as an OCI archive there, for
//! `podman load`, `skopeo copy` or `ctr images import`.

use std::{
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    build, exec,
    setup::{self, Mode},
};

/// Build the agent's container image (FROM scratch, static musl binary) with buildah.
#[derive(clap::Args)]
pub struct Options {
    /// The image's name.
    #[arg(long, default_value = DEFAULT_TAG, value_name = "NAME:TAG")]
    tag: String,
    /// Then run the image test: the containerized agent, under the DaemonSet's capabilities and
    /// mounts, keeps a connection across an address change (needs root).
    #[arg(long)]
    test: bool,
    /// With --test: arguments for the test binary (`--nocapture` is always given).
    #[arg(last = true)]
    args: Vec<String>,
}

pub const DEFAULT_TAG: &str = "localhost/rocks-agent:dev";
/// The static target.
const MUSL: &str = "x86_64-unknown-linux-musl";
/// Debian packages the image build and test need, beyond `cargo xtask setup`'s.
const IMAGE_PACKAGES: &[&str] = &["buildah", "podman", "runc", "conmon"];
const CONTAINERFILE: &str = "deploy/container/Containerfile";

pub fn run(options: Options) -> Result<()> {
    let started = Instant::now();
    if !setup::is_root() {
        bail!("`cargo xtask image` needs root: buildah and podman run rootful here");
    }
    setup::ensure(Mode::Install)?;
    image_tools()?;
    let root = workspace_root();
    let work = build::target_dir()?.join("image");
    let store = Store::new(&work);

    let binary = build_static(&work)?;
    let context = work.join("context");
    fs::create_dir_all(&context)?;
    fs::copy(&binary, context.join("rocks-agent"))?;
    exec::run(
        store
            .buildah()
            .args(["bud", "--layers=false", "--tag", &options.tag, "--file"])
            .arg(root.join(CONTAINERFILE))
            .arg(&context),
    )?;
    let archive = work.join("rocks-agent.oci.tar");
    let _ = fs::remove_file(&archive);
    let mut destination = OsString::from("oci-archive:");
    destination.push(&archive);
    destination.push(format!(":{}", options.tag));
    exec::run(store.buildah().args(["push", &options.tag]).arg(&destination))?;
    let size = exec::stdout(store.podman().args(["image", "inspect", "--format", "{{.Size}}", &options.tag]))?;
    println!(
        "xtask image: built {} ({} bytes, one static binary) in {:.0?}; OCI archive {}",
        options.tag,
        size.trim(),
        started.elapsed(),
        archive.display()
    );
    println!("  run it: {} run ... {} attach --config FILE", store.podman_line(), options.tag);

    if options.test {
        test(&options, &store)?;
    }
    Ok(())
}

/// The image test in `tests/e2e/tests/image.rs` (ignored by a plain `cargo test`), with the
/// native agent (for the server host) and the test peer built in the debug profile.
fn test(options: &Options, store: &Store) -> Result<()> {
    let started = Instant::now();
    build::build(false)?;
    let mut cmd = exec::command("cargo test --package rocks-e2e --test image --");
    cmd.args(["--ignored", "--nocapture", "--test-threads", "1"]).args(&options.args);
    cmd.env("ROCKS_AGENT_BIN", build::agent_binary(false)?)
        .env("ROCKS_IMAGE", &options.tag)
        .env("ROCKS_PODMAN_ROOT", &store.dir);
    let result = exec::run(&mut cmd);
    let verdict = if result.is_ok() { "passed" } else { "FAILED" };
    println!("xtask image --test: {verdict} in {:.0?}", started.elapsed());
    result
}

/// `cargo build --release --target x86_64-unknown-linux-musl -p rocks-agent`, checked to be
/// static, stripped into `work/rocks-agent`.
fn build_static(work: &Path) -> Result<PathBuf> {
    exec::run(exec::command("cargo build --release --package rocks-agent --target").arg(MUSL))?;
    let built = build::target_dir()?.join(MUSL).join("release").join("rocks-agent");
    let interpreter = elf_interpreter(&built)?;
    if let Some(interp) = interpreter {
        bail!("{} is not static: it asks for the dynamic loader {interp}", built.display());
    }
    fs::create_dir_all(work)?;
    let stripped = work.join("rocks-agent");
    exec::run(Command::new("strip").arg("-o").arg(&stripped).arg(&built))
        .context("stripping needs `strip` (Debian package binutils)")?;
    Ok(stripped)
}

/// The program interpreter (`PT_INTERP`) an ELF executable names, if any: a static binary,
/// which is all a `FROM scratch` image can run, names none.
fn elf_interpreter(path: &Path) -> Result<Option<String>> {
    let elf = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u64_at = |o: usize| elf.get(o..o + 8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    // ELF64, little endian: what the x86_64 target produces.
    if elf.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) {
        bail!("{} is not a 64-bit little-endian ELF file", path.display());
    }
    let bad = || anyhow::anyhow!("{}: truncated ELF header", path.display());
    let phoff = usize::try_from(u64_at(0x20).ok_or_else(bad)?)?;
    let phentsize = usize::from(u16_at(0x36).ok_or_else(bad)?);
    let phnum = usize::from(u16_at(0x38).ok_or_else(bad)?);
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        const PT_INTERP: u32 = 3;
        let p_type = elf.get(ph..ph + 4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes"))).ok_or_else(bad)?;
        if p_type == PT_INTERP {
            let offset = usize::try_from(u64_at(ph + 8).ok_or_else(bad)?)?;
            let size = usize::try_from(u64_at(ph + 32).ok_or_else(bad)?)?;
            let name = elf.get(offset..offset + size).ok_or_else(bad)?;
            return Ok(Some(String::from_utf8_lossy(name).trim_end_matches('\0').to_owned()));
        }
    }
    Ok(None)
}

/// The image store under `target/image/` and the flags buildah and podman need for it here.
struct Store {
    dir: PathBuf,
}

impl Store {
    fn new(work: &Path) -> Store {
        Store { dir: work.join("store") }
    }

    fn storage_args(&self) -> Vec<OsString> {
        vec![
            "--root".into(),
            self.dir.join("root").into(),
            "--runroot".into(),
            self.dir.join("run").into(),
            "--storage-driver".into(),
            "vfs".into(),
        ]
    }

    fn buildah(&self) -> Command {
        let mut cmd = Command::new("buildah");
        cmd.args(self.storage_args());
        cmd
    }

    /// podman with runc (crun refuses a hybrid cgroup layout), cgroupfs and file events
    /// (no systemd needed).
    fn podman(&self) -> Command {
        let mut cmd = Command::new("podman");
        cmd.args(self.storage_args())
            .args(["--runtime", "runc", "--cgroup-manager", "cgroupfs", "--events-backend", "file"]);
        cmd
    }

    fn podman_line(&self) -> String {
        exec::shown(&self.podman())
    }
}

/// What the image needs beyond `cargo xtask setup`: buildah, podman, runc, conmon and the musl
/// target. Probed first, installed only when missing.
fn image_tools() -> Result<()> {
    let missing: Vec<&str> = IMAGE_PACKAGES
        .iter()
        .copied()
        .filter(|package| {
            exec::probe(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
                .is_none_or(|status| status != "install ok installed")
        })
        .collect();
    if missing.is_empty() {
        println!("ok: Debian packages {} installed", IMAGE_PACKAGES.join(" "));
    } else {
        let apt_get = || {
            let mut cmd = Command::new("apt-get");
            cmd.env("DEBIAN_FRONTEND", "noninteractive");
            cmd
        };
        exec::run(apt_get().arg("update"))?;
        exec::run(apt_get().args(["install", "-y", "--no-install-recommends"]).args(&missing))?;
        println!("installed Debian packages {}", missing.join(" "));
    }
    let targets = exec::probe(&mut exec::command("rustup target list --installed")).unwrap_or_default();
    if targets.lines().any(|t| t.trim() == MUSL) {
        println!("ok: rustup target {MUSL}");
    } else {
        exec::run(exec::command("rustup target add").arg(MUSL))?;
        println!("installed rustup target {MUSL}");
    }
    Ok(())
}

fn workspace_root() -> PathBuf {
    // xtask lives one level below the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask has a parent directory").to_owned()
}

#[cfg(test)]
mod tests {
    use super::elf_interpreter;

    #[test]
    fn finds_the_interpreter_of_a_dynamic_binary() {
        // The test binary itself is dynamically linked (the host's gnu target).
        let me = std::env::current_exe().unwrap();
        let interp = elf_interpreter(&me).unwrap();
        assert!(interp.as_deref().is_some_and(|i| i.contains("ld-linux")), "{interp:?}");
        assert!(elf_interpreter(std::path::Path::new("/proc/self/status")).is_err());
    }
}
