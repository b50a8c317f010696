//! Setting up and removing what transparent dials need in the agent's network namespace (see
//! the module above): the rule and route per address family, and the sysctls. [`Routing`] is
//! a guard: dropping it undoes exactly what it did, including after a setup that failed half
//! way.
use std::{
    io,
    path::{Path, PathBuf},
};

use tracing::{info, warn};

use super::{
    MARK, RULE_PRIORITY, TABLE,
    peers::{self, Announcement, Peer},
    rtnl::{Family, LocalDefault, MarkRule, Rtnl},
    sysctl::{self, Knob},
};

const TCP_FWMARK_ACCEPT: Knob = Knob { name: "net.ipv4.tcp_fwmark_accept" };
const FWMARK_REFLECT4: Knob = Knob { name: "net.ipv4.fwmark_reflect" };
const FWMARK_REFLECT6: Knob = Knob { name: "net.ipv6.fwmark_reflect" };

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("transparent mode: cannot open a netlink socket: {0}")]
    Netlink(io::Error),
    #[error("transparent mode: no loopback interface `lo` in this network namespace")]
    NoLoopback,
    // The io errors are part of each message (followed by what to do about them), not a
    // `source`: printed as a chain they would appear twice.
    #[error("transparent mode: cannot add `{what}`: {error}{hint}", hint = hint(error))]
    Routing { what: String, error: io::Error },
    #[error("transparent mode: cannot read {name}: {error}")]
    ReadSysctl { name: &'static str, error: io::Error },
    #[error("transparent mode: cannot set {name}=1 (it is {old}): {error}{hint}", hint = hint(error))]
    WriteSysctl { name: &'static str, old: String, error: io::Error },
    #[error("transparent mode: cannot record the original sysctl values in {path}: {error}")]
    State { path: PathBuf, error: io::Error },
    #[error("transparent mode: cannot announce this agent to the others in its network namespace: {0}")]
    Announce(io::Error),
}

/// What an operator can do about an error number.
fn hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EPERM | libc::EACCES) => {
            " (needs CAP_NET_ADMIN in the agent's network namespace; or run with --transparent off)"
        }
        Some(libc::EROFS) => {
            " (/proc/sys is read-only here, as in most containers: set it to 1 on the host, e.g. in \
             /etc/sysctl.d, or run with --transparent off)"
        }
        _ => " (or run with --transparent off)",
    }
}

/// The routing and sysctls in place; removed and restored when dropped.
pub struct Routing {
    run_dir: PathBuf,
    rules: Vec<MarkRule>,
    routes: Vec<LocalDefault>,
    /// Sysctls to put back at exit, with their original values.
    restore: Vec<(Knob, String)>,
    ipv6: bool,
    /// Tells other agents of this network namespace that we use the routing too.
    announcement: Option<Announcement>,
}

impl Routing {
    /// Sets everything up, taking over leftovers of an agent that was killed (same mark, table
    /// and run directory), or joining the other live agents of this network namespace.
    pub fn setup(run_dir: &Path) -> Result<Routing, SetupError> {
        let ipv6 = FWMARK_REFLECT6.exists();
        let others = live_others();
        let mut routing = Routing {
            run_dir: run_dir.to_owned(),
            rules: Vec::new(),
            routes: Vec::new(),
            restore: Vec::new(),
            ipv6,
            announcement: None,
        };
        let originals = routing.set_sysctls(others.first())?;
        // Before touching the routing: an agent of this namespace exiting from now on sees us.
        routing.announcement = Some(peers::announce(&originals).map_err(SetupError::Announce)?);
        // An agent that started at the same moment saw neither us nor the values we found: if
        // it knows originals we do not (it read them before our writes), take those.
        let others = live_others();
        routing.adopt_originals(&others);
        if !others.is_empty() {
            let pids: Vec<u32> = others.iter().map(|p| p.pid).collect();
            info!(?pids, "sharing the transparent routing with the other agents in this network namespace");
        }
        let mut rtnl = Rtnl::open().map_err(SetupError::Netlink)?;
        let lo = nix::net::if_::if_nametoindex("lo").map_err(|_| SetupError::NoLoopback)?;
        let families: &[Family] = if ipv6 { &[Family::V4, Family::V6] } else { &[Family::V4] };
        for &family in families {
            let route = LocalDefault { family, table: TABLE, oif: lo };
            let rule = MarkRule { family, mark: MARK, table: TABLE, priority: RULE_PRIORITY };
            // NLM_F_EXCL: an identical route or rule already there is reused, never doubled,
            // whether another live agent added it or a killed one left it behind.
            let mut reused = exists(rtnl.add_route(&route))
                .map_err(|error| SetupError::Routing { what: describe_route(&route), error })?;
            routing.routes.push(route);
            reused |= exists(rtnl.add_rule(&rule))
                .map_err(|error| SetupError::Routing { what: describe_rule(&rule), error })?;
            routing.rules.push(rule);
            // Asked again: an agent starting at the same moment announces itself before it adds.
            if reused && live_others().is_empty() {
                warn!(?family, "took over transparent routing left behind by an agent that did not exit cleanly");
            }
        }
        if !ipv6 {
            warn!("IPv6 is disabled in this network namespace: transparent dials are IPv4 only");
        }
        info!(
            mark = %format_args!("{MARK:#x}"),
            table = TABLE,
            priority = RULE_PRIORITY,
            "transparent dials on: server programs see the client's address. Side effect in this network \
             namespace: with net.ipv4.tcp_fwmark_accept=1 every accepted TCP connection inherits the mark of \
             its SYN, and with fwmark_reflect=1 the kernel's RSTs and ICMP replies carry the mark of the packet \
             they answer"
        );
        Ok(routing)
    }

    /// The sysctls of this namespace we need, in a fixed order (announcements rely on it).
    fn knobs(&self) -> Vec<Knob> {
        let mut knobs = vec![TCP_FWMARK_ACCEPT, FWMARK_REFLECT4];
        if self.ipv6 {
            knobs.push(FWMARK_REFLECT6);
        }
        knobs
    }

    /// Sets the sysctls to 1, recording the values to restore first. Returns the original
    /// value of each sysctl checked (`None`: nothing to restore), for the announcement.
    fn set_sysctls(&mut self, other: Option<&Peer>) -> Result<Vec<Option<String>>, SetupError> {
        let knobs = self.knobs();
        let state_path = self.run_dir.join(sysctl::STATE_FILE);
        let state_err = |error| SetupError::State { path: state_path.clone(), error };
        // A state file means an earlier agent set these and never put them back: its originals
        // are the real ones. A live agent of this namespace knows them too, and better: the
        // values it found may predate our state file's.
        let earlier = sysctl::load_state(&self.run_dir).map_err(state_err)?.unwrap_or_default();
        let mut current = Vec::new();
        let mut originals = Vec::new();
        for (i, knob) in knobs.into_iter().enumerate() {
            let value = knob.read().map_err(|error| SetupError::ReadSysctl { name: knob.name, error })?;
            let original = match other {
                Some(peer) => peer.originals.get(i).cloned().flatten(),
                None => earlier.iter().find(|(k, _)| k == knob.name).map(|(_, v)| v.clone()),
            };
            if let Some(original) = original.filter(|o| o != "1") {
                self.restore.push((knob, original));
            } else if value != "1" {
                self.restore.push((knob, value.clone()));
            }
            originals.push(self.restore.iter().find(|(k, _)| *k == knob).map(|(_, v)| v.clone()));
            current.push((knob, value));
        }
        if other.is_none() && !earlier.is_empty() {
            warn!(state = %state_path.display(), "found sysctl values left by an agent that did not exit cleanly");
        }
        if self.restore.is_empty() {
            sysctl::remove_state(&self.run_dir).map_err(state_err)?;
        } else {
            let lines: Vec<(String, String)> =
                self.restore.iter().map(|(k, v)| (k.name.to_owned(), v.clone())).collect();
            sysctl::save_state(&self.run_dir, &lines).map_err(state_err)?;
        }
        for (knob, value) in current {
            if value != "1" {
                knob.write("1").map_err(|error| SetupError::WriteSysctl { name: knob.name, old: value, error })?;
            }
        }
        Ok(originals)
    }

    /// Takes the original values other agents announce for sysctls we found already at 1.
    fn adopt_originals(&mut self, others: &[Peer]) {
        let knobs = self.knobs();
        for (i, knob) in knobs.into_iter().enumerate() {
            if self.restore.iter().any(|(k, _)| *k == knob) {
                continue;
            }
            if let Some(original) = others.iter().find_map(|p| p.originals.get(i).cloned().flatten()) {
                self.restore.push((knob, original));
            }
        }
    }
}

/// The other live agents of this namespace; none if the socket table cannot be read (then we
/// behave as the only one, as before agents knew of each other).
fn live_others() -> Vec<Peer> {
    peers::others().unwrap_or_else(|e| {
        warn!(error = %e, "cannot list the other agents of this network namespace; assuming there are none");
        Vec::new()
    })
}

/// A delete that found nothing: another agent of this namespace exiting at the same moment
/// removed it first.
fn gone_ok(result: io::Result<()>) -> io::Result<()> {
    match result {
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESRCH)) => Ok(()),
        other => other,
    }
}

/// Whether an add found an identical object already there (`EEXIST`, which is fine).
fn exists(result: io::Result<()>) -> io::Result<bool> {
    match result {
        Ok(()) => Ok(false),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(true),
        Err(e) => Err(e),
    }
}

fn describe_rule(rule: &MarkRule) -> String {
    format!("{}rule fwmark {:#x} lookup {} priority {}", prefix(rule.family), rule.mark, rule.table, rule.priority)
}

fn describe_route(route: &LocalDefault) -> String {
    format!("{}route local default dev lo table {}", prefix(route.family), route.table)
}

fn prefix(family: Family) -> &'static str {
    match family {
        Family::V4 => "ip ",
        Family::V6 => "ip -6 ",
    }
}

impl Drop for Routing {
    fn drop(&mut self) {
        // Withdrawn first: of two agents exiting together, at least one then sees no other and
        // cleans up.
        if self.announcement.take().is_some() {
            let others = live_others();
            if !others.is_empty() {
                let pids: Vec<u32> = others.iter().map(|p| p.pid).collect();
                info!(
                    ?pids,
                    "leaving the transparent routing and sysctls to the other agents in this network namespace"
                );
                // They carry the original values in their announcements.
                if let Err(e) = sysctl::remove_state(&self.run_dir) {
                    warn!(error = %e, "cannot remove the sysctl state file");
                }
                return;
            }
        }
        let mut clean = true;
        match Rtnl::open() {
            Ok(mut rtnl) => {
                for rule in self.rules.drain(..) {
                    if let Err(e) = gone_ok(rtnl.delete_rule(&rule)) {
                        warn!(rule = %describe_rule(&rule), error = %e, "cannot remove the transparent routing rule");
                        clean = false;
                    }
                }
                for route in self.routes.drain(..) {
                    if let Err(e) = gone_ok(rtnl.delete_route(&route)) {
                        warn!(route = %describe_route(&route), error = %e, "cannot remove the transparent route");
                        clean = false;
                    }
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot open netlink to remove the transparent routing");
                clean = false;
            }
        }
        let mut restored = true;
        for (knob, value) in self.restore.drain(..) {
            // Also covers a setup that failed before it wrote this one.
            if knob.read().is_ok_and(|now| now == value) {
                continue;
            }
            if let Err(e) = knob.write(&value) {
                warn!(sysctl = knob.name, value = %value, error = %e, "cannot restore a sysctl");
                restored = false;
            }
        }
        // Kept when a value could not be put back, so the next agent still knows the original.
        if restored && let Err(e) = sysctl::remove_state(&self.run_dir) {
            warn!(error = %e, "cannot remove the sysctl state file");
        }
        if clean && restored {
            info!("transparent routing removed and sysctls restored");
        }
    }
}
