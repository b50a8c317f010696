//! Test hosts: network namespaces on one Ethernet segment.
//!
//! ```text
//!   ns "<prefix>-a"            ns "<prefix>-sw"              ns "<prefix>-b"
//!   lo, eth0 ──veth──────── h0 ─┐                ┌─ h1 ──────────veth── eth0, lo
//!   192.0.2.1/24                 └──── br0 ──────┘                192.0.2.2/24
//!   2001:db8::1/64                                                2001:db8::2/64
//! ```
//!
//! The bridge lives in its own "switch" namespace rather than in the root namespace, so a test
//! never touches the machine's own interfaces and the switch-side veth names (`h0`, `h1`...)
//! cannot collide with anything. Each host has a default route straight out of `eth0` (no
//! gateway: every address is on-link), so addresses moved or added in other subnets stay
//! reachable without route edits.
//!
//! Names are `rk<pid>x<n>-<label>`: the creating pid lets [`cleanup_stale`] tell leftovers of a
//! killed run from namespaces of a live one.

use std::ffi::OsStr;
use std::fs::File;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use nix::sched::CloneFlags;

use crate::util::{check_output, describe, ip, next_id, pid_alive, pid_alive_since, wait_until};

/// Where `ip netns add` bind-mounts named namespaces (iproute2's NETNS_RUN_DIR); we open the
/// files there to `setns` into a host without going through `ip netns exec`.
const NETNS_RUN_DIR: &str = "/var/run/netns";

const PREFIX: &str = "rk";
const SWITCH_SUFFIX: &str = "sw";

/// One test host: a named network namespace with `lo` and `eth0`.
#[derive(Debug)]
pub struct Host {
    label: String,
    name: String,
    index: usize,
    /// An open handle on the namespace, shared with the `pre_exec` hooks of commands.
    ns: Arc<File>,
    ip4: Mutex<Ipv4Addr>,
    ip6: Mutex<Ipv6Addr>,
    blackholed: AtomicBool,
}

impl Host {
    /// The label given to [`Topology::new`] ("a").
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The network namespace's name, as `ip netns list` shows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The host's current IPv4 address on `eth0` (follows [`Topology::change_ip4`]).
    pub fn ip4(&self) -> Ipv4Addr {
        *self.ip4.lock().unwrap()
    }

    /// The host's current IPv6 address on `eth0` (follows [`Topology::change_ip6`]).
    pub fn ip6(&self) -> Ipv6Addr {
        *self.ip6.lock().unwrap()
    }

    /// `ip4():port` as a socket address.
    pub fn sock4(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip4().into(), port)
    }

    /// `[ip6()]:port` as a socket address.
    pub fn sock6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip6().into(), port)
    }

    /// A command that runs `program` inside this host's namespace.
    ///
    /// The child calls `setns` between fork and exec, so the child *is* the program (its pid
    /// is the program's, signals reach it directly), unlike `ip netns exec` which adds a
    /// process and a private mount namespace. Hence `/sys/class/net` inside the child still
    /// shows the caller's view: ask the kernel through netlink (`ip`, `ss`) instead.
    pub fn exec(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        let ns = Arc::clone(&self.ns);
        // SAFETY: the hook only calls setns(2), which is async-signal-safe, and allocates
        // nothing (the error path builds an io::Error from an errno, no allocation).
        unsafe {
            cmd.pre_exec(move || {
                nix::sched::setns(&*ns, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
            });
        }
        cmd
    }

    /// The open namespace file, for code that wants to `setns` a thread itself.
    pub fn netns_file(&self) -> &File {
        &self.ns
    }
}

/// A set of hosts on one bridge. Dropping it kills every process left in its namespaces and
/// deletes the namespaces (and with them the veths, addresses and nftables tables).
#[derive(Debug)]
pub struct Topology {
    prefix: String,
    switch: String,
    hosts: Vec<Host>,
    /// Every namespace created so far, so a half-built topology is cleaned up too.
    created: Vec<String>,
}

impl Topology {
    /// Creates one namespace per label, in order: host N (1-based) gets `192.0.2.N/24` and
    /// `2001:db8::N/64`. Labels are short lowercase names, unique, and not "sw".
    pub fn new(labels: &[&str]) -> Result<Topology> {
        validate_labels(labels)?;
        static STALE: Once = Once::new();
        STALE.call_once(|| {
            if let Err(e) = cleanup_stale() {
                eprintln!("rocks-e2e: cleaning up stale namespaces failed: {e:#}");
            }
        });

        let prefix = format!("{PREFIX}{}x{}", std::process::id(), next_id());
        let mut topo = Topology {
            switch: format!("{prefix}-{SWITCH_SUFFIX}"),
            prefix,
            hosts: Vec::new(),
            created: Vec::new(),
        };
        let sw = topo.switch.clone();
        topo.add_netns(&sw)?;
        // No multicast snooping: without a querier it can starve IPv6 neighbour discovery.
        ip_batch(
            &sw,
            &[
                "link add br0 type bridge mcast_snooping 0",
                "link set br0 up",
            ],
        )?;
        for (index, label) in labels.iter().enumerate() {
            topo.add_host(index, label)?;
        }
        Ok(topo)
    }

    fn add_netns(&mut self, name: &str) -> Result<()> {
        // Serialized within the process: concurrent first uses of `ip netns add` race on
        // setting up the shared /var/run/netns mount.
        static CREATE: Mutex<()> = Mutex::new(());
        let _guard = CREATE.lock().unwrap_or_else(|e| e.into_inner());
        ip(&["netns", "add", name])?;
        self.created.push(name.to_owned());
        Ok(())
    }

    fn add_host(&mut self, index: usize, label: &str) -> Result<()> {
        let name = format!("{}-{label}", self.prefix);
        self.add_netns(&name)?;
        let n = u8::try_from(index + 1)?;
        let (ip4, ip6) = (addr4(n), addr6(n.into()));
        let port = format!("h{index}");
        ip_batch(
            &self.switch,
            &[
                &format!("link add {port} type veth peer name eth0 netns {name}"),
                &format!("link set {port} master br0 up"),
            ],
        )?;
        ip_batch(
            &name,
            &[
                "link set lo up",
                &format!("addr add {ip4}/24 dev eth0"),
                // nodad: usable at once instead of after ~1 s of duplicate detection.
                &format!("addr add {ip6}/64 dev eth0 nodad"),
                "link set eth0 up",
                "route add 0.0.0.0/0 dev eth0",
                "route add ::/0 dev eth0",
            ],
        )?;
        let path = format!("{NETNS_RUN_DIR}/{name}");
        let ns = File::open(&path).with_context(|| format!("open {path}"))?;
        self.hosts.push(Host {
            label: label.to_owned(),
            name,
            index,
            ns: Arc::new(ns),
            ip4: Mutex::new(ip4),
            ip6: Mutex::new(ip6),
            blackholed: AtomicBool::new(false),
        });
        Ok(())
    }

    /// The host with this label. Panics on an unknown label (a bug in the test).
    pub fn host(&self, label: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.label == label)
            .unwrap_or_else(|| panic!("no host {label:?} in this topology"))
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The unique prefix of this topology's names (also the name of its nftables tables).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Name of the namespace holding the bridge.
    pub fn switch_name(&self) -> &str {
        &self.switch
    }

    /// Names of all namespaces of this topology (switch included).
    pub fn namespaces(&self) -> Vec<String> {
        self.created.clone()
    }

    /// Takes the switch side of the host's cable down or up: the host sees its carrier go
    /// away, like an unplugged cable, but keeps its addresses.
    pub fn set_link(&self, host: &str, up: bool) -> Result<()> {
        let h = self.host(host);
        let state = if up { "up" } else { "down" };
        ip(&[
            "-n",
            &self.switch,
            "link",
            "set",
            &format!("h{}", h.index),
            state,
        ])?;
        Ok(())
    }

    /// Replaces the host's IPv4 address with `192.0.2.<new_n>/24` (old one removed first, as
    /// when a DHCP lease moves) and returns it.
    pub fn change_ip4(&self, host: &str, new_n: u8) -> Result<Ipv4Addr> {
        let h = self.host(host);
        let (old, new) = (h.ip4(), addr4(new_n));
        // Removing the last IPv4 address of a device flushes its routes, so the default route
        // is put back after the new address is in place.
        ip_batch(
            &h.name,
            &[
                &format!("addr del {old}/24 dev eth0"),
                &format!("addr add {new}/24 dev eth0"),
                "route replace 0.0.0.0/0 dev eth0",
            ],
        )?;
        *h.ip4.lock().unwrap() = new;
        Ok(new)
    }

    /// Replaces the host's IPv6 address with `2001:db8::<new_n>/64` (`new_n` is the last
    /// 16-bit group, so 10 is `2001:db8::a`) and returns it.
    pub fn change_ip6(&self, host: &str, new_n: u16) -> Result<Ipv6Addr> {
        let h = self.host(host);
        let (old, new) = (h.ip6(), addr6(new_n));
        ip_batch(
            &h.name,
            &[
                &format!("addr del {old}/64 dev eth0"),
                &format!("addr add {new}/64 dev eth0 nodad"),
                "route replace ::/0 dev eth0",
            ],
        )?;
        *h.ip6.lock().unwrap() = new;
        Ok(new)
    }

    /// Adds an extra address to the host's `eth0` (any subnet: routes are on-link).
    pub fn add_ip(&self, host: &str, addr: IpAddr, prefix_len: u8) -> Result<()> {
        let h = self.host(host);
        let nodad = if addr.is_ipv6() { " nodad" } else { "" };
        ip_batch(
            &h.name,
            &[&format!("addr add {addr}/{prefix_len} dev eth0{nodad}")],
        )?;
        // In case this was the last IPv4 address being re-added after a del_ip.
        let default = if addr.is_ipv4() { "0.0.0.0/0" } else { "::/0" };
        ip_batch(&h.name, &[&format!("route replace {default} dev eth0")])
    }

    /// Removes an address from the host's `eth0`.
    pub fn del_ip(&self, host: &str, addr: IpAddr, prefix_len: u8) -> Result<()> {
        let h = self.host(host);
        ip_batch(
            &h.name,
            &[&format!("addr del {addr}/{prefix_len} dev eth0")],
        )
    }

    /// Silently drops every packet in and out of the host's `eth0` (loopback keeps working),
    /// like a path that dies without the link noticing; `on = false` restores it. The rules
    /// live in an nftables table named after the topology inside the host's namespace.
    pub fn blackhole(&self, host: &str, on: bool) -> Result<()> {
        let h = self.host(host);
        if h.blackholed.load(Ordering::SeqCst) == on {
            return Ok(());
        }
        let t = &self.prefix;
        let script = if on {
            format!(
                "table inet {t} {{\n\
                 \tchain input {{ type filter hook input priority -300; iifname \"eth0\" drop; }}\n\
                 \tchain output {{ type filter hook output priority -300; oifname \"eth0\" drop; }}\n\
                 }}\n"
            )
        } else {
            format!("delete table inet {t}\n")
        };
        nft(h, &script)?;
        h.blackholed.store(on, Ordering::SeqCst);
        Ok(())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for h in &self.hosts {
            if h.blackholed.load(Ordering::SeqCst) {
                // Also goes away with the namespace; deleted explicitly so nothing depends
                // on the namespace actually being freed.
                let _ = nft(h, &format!("delete table inet {}\n", self.prefix));
            }
        }
        for ns in &self.created {
            kill_netns_processes(ns);
        }
        for ns in self.created.iter().rev() {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("rocks-e2e: cannot delete namespace {ns}: {e:#}");
            }
        }
    }
}

/// Removes namespaces of our naming scheme whose creating process is gone (a run that was
/// killed before its drops ran). Returns their names. Called once per process by
/// [`Topology::new`]; namespaces of live processes are left alone.
pub fn cleanup_stale() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for ns in list_netns()? {
        let Some(pid) = owner_pid(&ns) else { continue };
        // The namespace file's times are those of the namespace's creation.
        let created = std::fs::metadata(format!("{NETNS_RUN_DIR}/{ns}")).and_then(|m| m.modified());
        if created.map_or_else(|_| pid_alive(pid), |t| pid_alive_since(pid, t)) {
            continue;
        }
        kill_netns_processes(&ns);
        match ip(&["netns", "del", &ns]) {
            Ok(_) => removed.push(ns),
            // Another process may be cleaning up at the same time.
            Err(e) => eprintln!("rocks-e2e: cannot delete stale namespace {ns}: {e:#}"),
        }
    }
    Ok(removed)
}

/// Names of all named network namespaces (`ip netns list`).
pub fn list_netns() -> Result<Vec<String>> {
    // Lines look like "name (id: 3)" or just "name".
    Ok(ip(&["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// The pid in a name of the form `rk<pid>x<n>-<label>`, or None for other names.
fn owner_pid(ns: &str) -> Option<i32> {
    let rest = ns.strip_prefix(PREFIX)?;
    let (pid, rest) = rest.split_once('x')?;
    let (n, label) = rest.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(pid) && digits(n) && !label.is_empty()).then(|| pid.parse().ok())?
}

/// SIGKILLs every process whose network namespace is `ns`, until none is left (up to 2 s).
fn kill_netns_processes(ns: &str) {
    let me = std::process::id() as i32;
    let gone = wait_until(Duration::from_secs(2), || {
        // Killed processes become zombies, which `ip netns pids` no longer lists.
        let pids = match ip(&["netns", "pids", ns]) {
            Ok(out) => out,
            Err(_) => return true, // namespace already gone
        };
        let pids: Vec<i32> = pids
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        for &pid in &pids {
            if pid != me {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        pids.iter().all(|&p| p == me)
    });
    if !gone {
        eprintln!("rocks-e2e: processes survive in namespace {ns}");
    }
}

/// Runs several `ip` commands in one process inside namespace `ns` (`ip -n NS -batch -`).
fn ip_batch(ns: &str, lines: &[&str]) -> Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(["-n", ns, "-batch", "-"]);
    run_with_stdin(&mut cmd, &(lines.join("\n") + "\n"))
        .with_context(|| format!("in namespace {ns}: {}", lines.join("; ")))
}

fn nft(h: &Host, script: &str) -> Result<()> {
    let mut cmd = h.exec("nft");
    cmd.args(["-f", "-"]);
    run_with_stdin(&mut cmd, script).with_context(|| format!("nft in {}: {script}", h.name))
}

fn run_with_stdin(cmd: &mut Command, input: &str) -> Result<()> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", describe(cmd)))?;
    child.stdin.take().unwrap().write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    check_output(cmd, &out)
}

fn validate_labels(labels: &[&str]) -> Result<()> {
    ensure!(!labels.is_empty() && labels.len() <= 250, "1 to 250 hosts");
    for (i, l) in labels.iter().enumerate() {
        let ok = !l.is_empty()
            && l.len() <= 12
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if !ok || *l == SWITCH_SUFFIX {
            bail!("bad host label {l:?}: want 1-12 of [a-z0-9], not {SWITCH_SUFFIX:?}");
        }
        ensure!(!labels[..i].contains(l), "duplicate host label {l:?}");
    }
    Ok(())
}

fn addr4(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, n)
}

fn addr6(n: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parses_only_our_names() {
        assert_eq!(owner_pid("rk123x0-a"), Some(123));
        assert_eq!(owner_pid("rk123x45-sw"), Some(123));
        assert_eq!(owner_pid("rk123x-a"), None);
        assert_eq!(owner_pid("rkx1-a"), None);
        assert_eq!(owner_pid("rk12x1"), None);
        assert_eq!(owner_pid("rk12x1-"), None);
        assert_eq!(owner_pid("other"), None);
    }

    #[test]
    fn labels_are_checked() {
        assert!(validate_labels(&["a", "b2"]).is_ok());
        assert!(validate_labels(&["a", "a"]).is_err());
        assert!(validate_labels(&["sw"]).is_err());
        assert!(validate_labels(&["A"]).is_err());
        assert!(validate_labels(&[]).is_err());
    }
}
