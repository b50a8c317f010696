//! The guest kernels: Debian's kernel image packages, resolved by name at run time (the ABI
//! number in the name moves with every update), downloaded once, and cut down in the cache to
//! what a test VM boots: the kernel image and the modules it must load, decompressed and in
//! load order.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{exec, setup};

/// A kernel series the VM tests boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Series {
    /// Debian 12's own kernel (6.1 LTS).
    #[value(name = "6.1")]
    V6_1,
    /// The 6.12 LTS kernel Debian 12 carries in its security archive.
    #[value(name = "6.12")]
    V6_12,
}

impl Series {
    pub const ALL: [Series; 2] = [Series::V6_1, Series::V6_12];

    pub fn name(self) -> &'static str {
        match self {
            Series::V6_1 => "6.1",
            Series::V6_12 => "6.12",
        }
    }

    /// The Debian package that depends on this series' current kernel image.
    fn metapackage(self) -> &'static str {
        match self {
            Series::V6_1 => "linux-image-amd64",
            Series::V6_12 => "linux-image-6.12-amd64",
        }
    }

    /// What the image package's name starts with; guards against a metapackage that has moved
    /// on to another series.
    fn image_prefix(self) -> String {
        format!("linux-image-{}.", self.name())
    }
}

/// Modules the guests load (virtio-net and its bus; some are built in, depending on the
/// kernel). Their dependencies come from `modules.dep`. Part of the cache key.
const MODULES: &[&str] = &["virtio_pci", "virtio_net"];

/// A kernel ready to boot.
pub struct Kernel {
    /// The Debian package it came from.
    pub package: String,
    /// `uname -r` in the guest.
    pub release: String,
    pub vmlinuz: PathBuf,
    /// Decompressed modules, in the order they must be loaded.
    pub modules: Vec<PathBuf>,
}

/// Resolves, downloads (once) and unpacks (once) the current kernel of `series`.
pub fn prepare(series: Series, cache: &Path) -> Result<Kernel> {
    let kernels = cache.join("kernels");
    let package = match resolve(series) {
        Ok(package) => package,
        // No archive to ask (offline): a kernel of this series already in the cache will do.
        Err(e) => match cached(series, &kernels) {
            Some(package) => {
                println!("vm-test: {e:#}; using the cached {package}");
                package
            }
            None => return Err(e),
        },
    };
    let dir = kernels.join(&package);
    if !is_ready(&dir) {
        let deb = download(&package, &cache.join("debs"))?;
        unpack(&deb, &dir).with_context(|| format!("unpacking {}", deb.display()))?;
    }
    load(package, &dir)
}

/// The image package the series' metapackage depends on (`apt-cache depends`). Refreshes the
/// package lists once if apt does not know the metapackage or its image (a fresh machine, or
/// lists older than the archive).
fn resolve(series: Series) -> Result<String> {
    match depends_on(series) {
        Ok(package) => return Ok(package),
        Err(e) if !setup::is_root() => return Err(e),
        Err(e) => println!("vm-test: {e:#}; refreshing the package lists"),
    }
    exec::run(Command::new("apt-get").arg("update"))?;
    depends_on(series)
}

fn depends_on(series: Series) -> Result<String> {
    let meta = series.metapackage();
    let prefix = series.image_prefix();
    let out = exec::stdout(Command::new("apt-cache").args(["depends", meta]))?;
    let package = out
        .lines()
        .filter_map(|line| line.trim().strip_prefix("Depends: "))
        .map(str::trim)
        .find(|name| name.starts_with(&prefix))
        .with_context(|| format!("`apt-cache depends {meta}` names no {prefix}* package"))?;
    // Known by name is not enough: the image must be downloadable (have a candidate version).
    let policy = exec::stdout(Command::new("apt-cache").args(["policy", package]))?;
    if !policy.contains("Candidate:") || policy.contains("Candidate: (none)") {
        bail!("apt has no candidate version of {package}");
    }
    Ok(package.to_owned())
}

/// The newest ready kernel of `series` in the cache, by name.
fn cached(series: Series, kernels: &Path) -> Option<String> {
    let prefix = series.image_prefix();
    fs::read_dir(kernels)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| is_ready(&e.path()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(&prefix))
        .max()
}

fn download(package: &str, debs: &Path) -> Result<PathBuf> {
    let find = || -> Result<Option<PathBuf>> {
        if !debs.exists() {
            return Ok(None);
        }
        for entry in fs::read_dir(debs)? {
            let path = entry?.path();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if name.starts_with(&format!("{package}_")) && name.ends_with(".deb") {
                return Ok(Some(path));
            }
        }
        Ok(None)
    };
    if let Some(deb) = find()? {
        return Ok(deb);
    }
    fs::create_dir_all(debs).with_context(|| format!("creating {}", debs.display()))?;
    let mut cmd = Command::new("apt-get");
    // apt's unprivileged download user cannot write into our cache; as root, stay root.
    if setup::is_root() {
        cmd.args(["-o", "APT::Sandbox::User=root"]);
    }
    exec::run(cmd.current_dir(debs).args(["download", package]))?;
    find()?.with_context(|| {
        format!(
            "apt-get download left no {package}_*.deb in {}",
            debs.display()
        )
    })
}

/// Marks a finished cache entry; holds the module list it was cut for.
const STAMP: &str = "READY";

fn stamp_text() -> String {
    MODULES.join(" ") + "\n"
}

fn is_ready(dir: &Path) -> bool {
    fs::read_to_string(dir.join(STAMP)).is_ok_and(|text| text == stamp_text())
}

/// Unpacks the package into a scratch directory, resolves the module dependencies there
/// (busybox depmod: the package ships no modules.dep), and keeps only `vmlinuz`, `release`,
/// `modules/*.ko` and `load-order` in `dir`.
fn unpack(deb: &Path, dir: &Path) -> Result<()> {
    // Not with_extension: package names have dots ("linux-image-6.1.0-56-amd64").
    let sibling = |suffix: &str| {
        let mut name = dir.file_name().unwrap_or_default().to_owned();
        name.push(suffix);
        dir.with_file_name(name)
    };
    let (scratch, partial) = (sibling(".extract"), sibling(".partial"));
    for d in [&scratch, &partial, dir] {
        remove_dir_if_exists(d)?;
    }
    fs::create_dir_all(&scratch)?;
    exec::run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&scratch))?;

    let modules_root = scratch.join("lib/modules");
    let release = only_entry(&modules_root)?;
    let tree = modules_root.join(&release);
    exec::run(
        Command::new("busybox")
            .arg("depmod")
            .arg("-b")
            .arg(&scratch)
            .arg(&release),
    )?;
    let deps = parse_modules_dep(&fs::read_to_string(tree.join("modules.dep"))?);
    let builtin = fs::read_to_string(tree.join("modules.builtin")).unwrap_or_default();
    let builtin: BTreeSet<String> = builtin.lines().map(module_name).collect();
    let order = load_order(MODULES, &deps, &builtin)?;

    fs::create_dir_all(partial.join("modules"))?;
    let vmlinuz = fs::read_dir(scratch.join("boot"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .context("the package has no boot/vmlinuz-*")?;
    fs::copy(&vmlinuz, partial.join("vmlinuz"))?;
    fs::write(partial.join("release"), format!("{release}\n"))?;
    let mut names = String::new();
    for relative in &order {
        let source = tree.join(relative);
        let name = format!("{}.ko", module_name(relative));
        let target = partial.join("modules").join(&name);
        if relative.ends_with(".xz") {
            let mut cmd = Command::new("busybox");
            cmd.args(["xz", "-dc"]).arg(&source);
            let output = cmd
                .output()
                .with_context(|| format!("decompressing {}", source.display()))?;
            if !output.status.success() {
                bail!(
                    "`busybox xz -dc {}` failed: {}",
                    source.display(),
                    output.status
                );
            }
            fs::write(&target, output.stdout)?;
        } else if relative.ends_with(".ko") {
            fs::copy(&source, &target)?;
        } else {
            bail!("{relative}: compressed in a way the VM tests do not handle");
        }
        names.push_str(&name);
        names.push('\n');
    }
    fs::write(partial.join("load-order"), names)?;
    fs::write(partial.join(STAMP), stamp_text())?;
    fs::rename(&partial, dir)?;
    remove_dir_if_exists(&scratch)
}

fn load(package: String, dir: &Path) -> Result<Kernel> {
    let read = |name: &str| {
        fs::read_to_string(dir.join(name))
            .with_context(|| format!("reading {}", dir.join(name).display()))
    };
    let release = read("release")?.trim().to_owned();
    let modules = read("load-order")?
        .lines()
        .filter(|l| !l.is_empty())
        .map(|name| dir.join("modules").join(name))
        .collect();
    Ok(Kernel {
        package,
        release,
        vmlinuz: dir.join("vmlinuz"),
        modules,
    })
}

fn remove_dir_if_exists(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

fn only_entry(dir: &Path) -> Result<String> {
    let entries: Vec<String> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    match entries.as_slice() {
        [one] => Ok(one.clone()),
        other => bail!(
            "expected one kernel release in {}, found {other:?}",
            dir.display()
        ),
    }
}

/// `kernel/drivers/net/virtio_net.ko.xz` → `virtio_net` (module names use `_` where file
/// names may use `-`).
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// `modules.dep`: `path: dependency-path...` per module, keyed by module name.
fn parse_modules_dep(text: &str) -> BTreeMap<String, (String, Vec<String>)> {
    text.lines()
        .filter_map(|line| {
            let (path, deps) = line.split_once(':')?;
            let deps = deps.split_whitespace().map(str::to_owned).collect();
            Some((module_name(path), (path.to_owned(), deps)))
        })
        .collect()
}

/// The module files to load, dependencies before the modules that need them, each once;
/// modules built into the kernel are skipped.
fn load_order(
    wanted: &[&str],
    deps: &BTreeMap<String, (String, Vec<String>)>,
    builtin: &BTreeSet<String>,
) -> Result<Vec<String>> {
    fn visit(
        name: &str,
        deps: &BTreeMap<String, (String, Vec<String>)>,
        builtin: &BTreeSet<String>,
        order: &mut Vec<String>,
        path: &mut Vec<String>,
    ) -> Result<()> {
        if builtin.contains(name) {
            return Ok(());
        }
        let Some((file, needs)) = deps.get(name) else {
            bail!("module {name} is neither built in nor in modules.dep");
        };
        if order.contains(file) {
            return Ok(());
        }
        if path.iter().any(|p| p == name) {
            bail!("modules.dep has a cycle through {name}");
        }
        path.push(name.to_owned());
        for dep in needs {
            visit(&module_name(dep), deps, builtin, order, path)?;
        }
        path.pop();
        order.push(file.clone());
        Ok(())
    }
    let mut order = Vec::new();
    for name in wanted {
        visit(name, deps, builtin, &mut order, &mut Vec::new())?;
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_dependencies_first_and_skips_builtins() {
        let deps = parse_modules_dep(
            "kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/net/net_failover.ko.xz kernel/net/core/failover.ko.xz\n\
             kernel/drivers/net/net_failover.ko.xz: kernel/net/core/failover.ko.xz\n\
             kernel/net/core/failover.ko.xz:\n\
             kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio.ko\n\
             kernel/drivers/virtio/virtio.ko:\n",
        );
        let builtin = BTreeSet::from(["virtio_pci".to_owned()]);
        let order = load_order(&["virtio_pci", "virtio_net"], &deps, &builtin).unwrap();
        assert_eq!(
            order,
            [
                "kernel/net/core/failover.ko.xz",
                "kernel/drivers/net/net_failover.ko.xz",
                "kernel/drivers/net/virtio_net.ko.xz",
            ]
        );
        let order = load_order(&["virtio_pci"], &deps, &BTreeSet::new()).unwrap();
        assert_eq!(
            order,
            [
                "kernel/drivers/virtio/virtio.ko",
                "kernel/drivers/virtio/virtio_pci.ko"
            ]
        );
        assert!(load_order(&["e1000"], &deps, &builtin).is_err());
    }

    #[test]
    fn module_names() {
        assert_eq!(
            module_name("kernel/drivers/net/virtio_net.ko.xz"),
            "virtio_net"
        );
        assert_eq!(
            module_name("kernel/drivers/virtio/virtio_pci-legacy.ko"),
            "virtio_pci_legacy"
        );
        assert_eq!(
            module_name("kernel/drivers/virtio/virtio_pci.ko"),
            "virtio_pci"
        );
    }
}
