//! A real OpenSSH server in a test host, with throwaway keys and config, and the matching
//! client command line. ssh is the kind of long-lived, stateful TCP program rocks exists for.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::netns::Host;
use crate::require::which;
use crate::spawn::{Child, wait_for_tcp_listen};
use crate::util::{TempDir, run_checked, wait_until};

/// A running `sshd -D` in a host namespace, accepting the generated client key for root.
/// Dropping it kills sshd and removes its directory.
#[derive(Debug)]
pub struct Sshd {
    // Declared first: dropped (killed) before its directory is removed.
    child: Child,
    port: u16,
    client_key: PathBuf,
    ssh: PathBuf,
    dir: TempDir,
}

impl Sshd {
    /// Starts sshd in `host` listening on the host's current IPv4 and IPv6 addresses at
    /// `port`, and waits until it listens.
    pub fn start(host: &Host, port: u16) -> Result<Sshd> {
        Sshd::start_with(host, port, "")
    }

    /// As [`Sshd::start`], with `extra` lines appended to the generated `sshd_config` (e.g.
    /// `AllowUsers root@192.0.2.2`).
    pub fn start_with(host: &Host, port: u16, extra: &str) -> Result<Sshd> {
        let sshd = which("sshd").context("sshd not found")?;
        let ssh = which("ssh").context("ssh not found")?;
        let dir = TempDir::new("sshd")?;
        let d = dir.path();
        let host_key = d.join("host_ed25519_key");
        let client_key = d.join("client_ed25519_key");
        for key in [&host_key, &client_key] {
            keygen(key)?;
        }
        let authorized = d.join("authorized_keys");
        std::fs::copy(client_key.with_extension("pub"), &authorized)?;

        let config = d.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\n\
                 ListenAddress {ip4}\n\
                 ListenAddress {ip6}\n\
                 HostKey {host_key}\n\
                 PidFile {pid}\n\
                 AuthorizedKeysFile {authorized}\n\
                 PermitRootLogin prohibit-password\n\
                 PubkeyAuthentication yes\n\
                 PasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\n\
                 StrictModes no\n\
                 UsePAM no\n\
                 UseDNS no\n\
                 PrintMotd no\n\
                 MaxStartups 100\n\
                 MaxSessions 100\n\
                 Subsystem sftp internal-sftp\n\
                 LogLevel VERBOSE\n\
                 {extra}\n",
                ip4 = host.ip4(),
                ip6 = host.ip6(),
                host_key = host_key.display(),
                pid = d.join("sshd.pid").display(),
                authorized = authorized.display(),
            ),
        )?;
        ensure_privsep_dir(&sshd, &config)?;

        // sshd re-executes itself per connection, so it must be started by absolute path.
        let mut cmd = host.exec(&sshd);
        cmd.arg("-D").arg("-e").arg("-f").arg(&config);
        let mut child = Child::spawn(cmd)?;
        // Also notice an sshd that dies at start instead of waiting the full timeout.
        let mut exited = None;
        wait_until(Duration::from_secs(10), || {
            exited = child.try_wait().ok().flatten();
            exited.is_some() || wait_for_tcp_listen(host, port, Duration::ZERO).is_ok()
        });
        if let Some(st) = exited {
            bail!("sshd exited at start ({st}): {}", child.stderr_text());
        }
        wait_for_tcp_listen(host, port, Duration::ZERO)
            .with_context(|| format!("sshd stderr: {}", child.stderr_text()))?;
        Ok(Sshd {
            child,
            port,
            client_key,
            ssh,
            dir,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The private key authorized for root.
    pub fn client_key(&self) -> &Path {
        &self.client_key
    }

    /// The client options (everything before the destination): key, port, no host-key
    /// checks, no prompts, and no user config (`-F /dev/null`) so the machine's own
    /// `~/.ssh/config` cannot change the test.
    pub fn ssh_options(&self) -> Vec<String> {
        let key = self.client_key.display().to_string();
        let port = self.port.to_string();
        [
            "-F",
            "/dev/null",
            "-i",
            key.as_str(),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=10",
            "-p",
            port.as_str(),
        ]
        .map(str::to_owned)
        .to_vec()
    }

    /// `ssh root@<target> <remote_cmd>`, run from inside `from`.
    pub fn ssh_command(&self, from: &Host, target: IpAddr, remote_cmd: &str) -> Command {
        let mut cmd = from.exec(&self.ssh);
        cmd.args(self.ssh_options())
            .arg(format!("root@{target}"))
            .arg(remote_cmd);
        cmd
    }

    /// The remote-shell command line for `rsync -e` / `scp -S`-style options.
    pub fn rsh(&self) -> String {
        std::iter::once(self.ssh.display().to_string())
            .chain(self.ssh_options())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// sshd's log so far (it logs to stderr with `-e`).
    pub fn log(&self) -> String {
        self.child.stderr_text()
    }

    /// The directory holding keys and config.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

fn keygen(path: &Path) -> Result<()> {
    let mut cmd = Command::new(which("ssh-keygen").context("ssh-keygen not found")?);
    cmd.args(["-q", "-t", "ed25519", "-N", "", "-C", "rocks-e2e", "-f"])
        .arg(path);
    run_checked(&mut cmd)?;
    Ok(())
}

/// sshd refuses to start without its privilege-separation directory (`/run/sshd` on Debian,
/// normally made by the init script). Its path is compiled in, so take it from sshd's own
/// complaint rather than assuming it.
fn ensure_privsep_dir(sshd: &Path, config: &Path) -> Result<()> {
    let check = || Command::new(sshd).arg("-t").arg("-f").arg(config).output();
    let out = check()?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let Some(dir) = stderr
        .lines()
        .find_map(|l| l.split_once("Missing privilege separation directory: "))
        .map(|(_, d)| d.trim())
    else {
        bail!("sshd -t rejects the config: {stderr}");
    };
    std::fs::create_dir_all(dir).with_context(|| format!("mkdir {dir}"))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    let out = check()?;
    if !out.status.success() {
        bail!(
            "sshd -t rejects the config: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
