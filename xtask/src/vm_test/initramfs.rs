//! The test VMs' initramfs: one uncompressed `newc` cpio archive per kernel (decompressing
//! is slow under TCG), written here rather than with cpio(1) so that owners, modes and times
//! are fixed, whatever the files look like on the build machine.
//!
//! Contents: `/init` and the scripts of `tests/vm` (under `/rocks-vm`), static busybox (its
//! applet links are made at boot), the static musl builds of `rocks-agent` and
//! `rocks-testpeer`, the host's `bpftool` with the shared libraries it needs, the kernel
//! modules in load order (`/etc/rocks-vm/modules`), and a fresh cluster secret.

use std::{
    fs,
    io::{self, BufWriter, Read as _, Write},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use super::kernel::Kernel;
use crate::exec;

/// What goes into every initramfs besides the kernel's modules.
pub struct Payload {
    /// `tests/vm`.
    pub scripts: PathBuf,
    /// Static busybox.
    pub busybox: PathBuf,
    /// Stripped static builds.
    pub agent: PathBuf,
    pub testpeer: PathBuf,
    /// bpftool and its shared libraries with the paths they are loaded from.
    pub bpftool: Vec<PathBuf>,
}

const DIRS: &[&str] = &[
    "bin",
    "sbin",
    "usr",
    "usr/bin",
    "usr/sbin",
    "lib",
    "lib64",
    "etc",
    "etc/rocks",
    "etc/rocks-vm",
    "proc",
    "sys",
    "dev",
    "run",
    "tmp",
    "root",
    "rocks-vm",
    "rocks-vm/scenarios",
];

/// Writes the initramfs for `kernel` to `out`.
pub fn build(payload: &Payload, kernel: &Kernel, out: &Path) -> Result<()> {
    let file = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut cpio = Cpio::new(BufWriter::new(file));
    for dir in DIRS {
        cpio.dir(dir)?;
    }
    // The kernel opens /dev/console for init's stdio before init can mount devtmpfs.
    cpio.char_device("dev/console", 0o600, (5, 1))?;

    let scripts = &payload.scripts;
    cpio.file("init", 0o755, &read(&scripts.join("init"))?)?;
    for name in ["lib.sh", "client.sh", "server.sh"] {
        cpio.file(
            &format!("rocks-vm/{name}"),
            0o644,
            &read(&scripts.join(name))?,
        )?;
    }
    for (_, path) in super::scenario_files(scripts)? {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        cpio.file(&format!("rocks-vm/scenarios/{name}"), 0o644, &read(&path)?)?;
    }

    cpio.file("bin/busybox", 0o755, &read(&payload.busybox)?)?;
    cpio.file("bin/rocks-agent", 0o755, &read(&payload.agent)?)?;
    cpio.file("bin/rocks-testpeer", 0o755, &read(&payload.testpeer)?)?;
    for path in &payload.bpftool {
        let inside = path.to_string_lossy();
        let inside = inside.trim_start_matches('/');
        cpio.parents(inside)?;
        cpio.file(inside, 0o755, &read(path)?)?;
    }

    let modules_dir = format!("lib/modules/{}", kernel.release);
    cpio.parents(&format!("{modules_dir}/x"))?;
    let mut load_list = String::new();
    for module in &kernel.modules {
        let name = module.file_name().unwrap_or_default().to_string_lossy();
        let inside = format!("{modules_dir}/{name}");
        cpio.file(&inside, 0o644, &read(module)?)?;
        load_list.push_str(&format!("/{inside}\n"));
    }
    cpio.file("etc/rocks-vm/modules", 0o644, load_list.as_bytes())?;
    cpio.file(
        "etc/rocks/secret",
        0o600,
        format!("{}\n", new_secret()?).as_bytes(),
    )?;
    cpio.finish()
}

/// The host's bpftool and what the dynamic loader pulls in for it (`ldd`), so the guests can
/// show what is attached to a cgroup.
pub fn bpftool_files() -> Result<Vec<PathBuf>> {
    let bpftool = ["/usr/sbin/bpftool", "/sbin/bpftool", "/usr/bin/bpftool"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .context(
            "no bpftool on this machine (Debian package bpftool; `cargo xtask setup` installs it)",
        )?;
    let ldd = exec::stdout(Command::new("ldd").arg(&bpftool))?;
    let mut files = vec![bpftool];
    for line in ldd.lines() {
        // `libelf.so.1 => /lib/x86_64-linux-gnu/libelf.so.1 (0x...)` or
        // `/lib64/ld-linux-x86-64.so.2 (0x...)`; linux-vdso has no file.
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            files.push(PathBuf::from(path));
        }
    }
    Ok(files)
}

fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// 64 hex characters from the kernel's random pool, like `rocks-agent keygen`; one per build,
/// shared by both VMs of a kernel.
fn new_secret() -> Result<String> {
    let mut bytes = [0u8; 32];
    fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// A `newc` (SVR4, no checksum) cpio writer: every entry owned by root, mtime 0.
struct Cpio<W: Write> {
    out: W,
    next_inode: u32,
    written: u64,
    dirs: Vec<String>,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

impl<W: Write> Cpio<W> {
    fn new(out: W) -> Self {
        Cpio {
            out,
            next_inode: 1,
            written: 0,
            dirs: Vec::new(),
        }
    }

    fn dir(&mut self, name: &str) -> Result<()> {
        if self.dirs.iter().any(|d| d == name) {
            return Ok(());
        }
        self.dirs.push(name.to_owned());
        self.entry(name, S_IFDIR | 0o755, 2, (0, 0), &[])
    }

    /// Directories leading to `path` (which is not itself created).
    fn parents(&mut self, path: &str) -> Result<()> {
        let mut prefix = String::new();
        let parts: Vec<&str> = path.split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            self.dir(&prefix.clone())?;
        }
        Ok(())
    }

    fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> Result<()> {
        self.entry(name, S_IFREG | mode, 1, (0, 0), data)
    }

    fn char_device(&mut self, name: &str, mode: u32, rdev: (u32, u32)) -> Result<()> {
        self.entry(name, S_IFCHR | mode, 1, rdev, &[])
    }

    fn finish(mut self) -> Result<()> {
        self.next_inode = 0;
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[])?;
        self.out.flush()?;
        Ok(())
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> Result<()> {
        let Ok(size) = u32::try_from(data.len()) else {
            bail!("{name}: too large for a newc cpio archive");
        };
        let inode = self.next_inode;
        self.next_inode += 1;
        let fields = [
            inode,
            mode,
            0,
            0,
            nlink,
            0,
            size,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        let mut header = String::from("070701");
        for field in fields {
            header.push_str(&format!("{field:08x}"));
        }
        self.write(header.as_bytes())?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        self.pad()?;
        self.write(data)?;
        self.pad()?;
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let pad = (4 - (self.written % 4) as usize) % 4;
        self.write(&[0; 3][..pad])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout() {
        let mut out = Vec::new();
        let mut cpio = Cpio::new(&mut out);
        cpio.file("a", 0o644, b"hello").unwrap();
        cpio.finish().unwrap();
        // Header (110) + "a\0" (2) = 112, aligned; data 5 padded to 8.
        assert_eq!(&out[..6], b"070701");
        assert_eq!(&out[110..112], b"a\0");
        assert_eq!(&out[112..117], b"hello");
        assert_eq!(&out[117..120], &[0, 0, 0]);
        assert_eq!(&out[120..126], b"070701");
        assert_eq!(out.len() % 4, 0);
        let trailer = String::from_utf8_lossy(&out[120..]);
        assert!(trailer.contains("TRAILER!!!"));
        // mode and size fields of the file entry.
        assert_eq!(&out[14..22], b"000081a4");
        assert_eq!(&out[54..62], b"00000005");
    }
}
