//! The policy: which connects from the attached cgroups are kept. Its types, their parsing, and
//! the validation every policy passes before it reaches the kernel, whether it comes from the
//! flags of `attach`, the `--config` file or a live change through `rocks-agent policy`.
//! (`policy_maps` writes a validated [`Policy`] into the eBPF maps.)
//!
//! A policy has four parts: the destination ports kept (all, or only a list), ports never kept,
//! destination prefixes never kept, and cgroups (with everything below them) never kept. A
//! change replaces each part it names as a whole and leaves the others as they are: there are
//! no add/remove verbs whose result depends on what the agent held before.
use std::{
    collections::BTreeSet,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use rocks_common::policy::{GENERATIONS, MAX_CGROUP_LEVEL, MAX_CGROUPS, MAX_CIDRS, MAX_PORTS};
use serde::{Deserialize, Serialize};

use crate::cgroup::{self, CgroupError};

/// How many entries of each kind one policy may hold: the maps have room for two policies,
/// the one in force and the one being written.
pub const MAX_PORT_ENTRIES: usize = (MAX_PORTS / GENERATIONS) as usize;
pub const MAX_CIDR_ENTRIES: usize = (MAX_CIDRS / GENERATIONS) as usize;
pub const MAX_CGROUP_ENTRIES: usize = (MAX_CGROUPS / GENERATIONS) as usize;

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("invalid --exclude-cidr value {value:?}: {why}")]
    Cidr { value: String, why: String },
    #[error("port 0 in {flag}: ports are 1-65535")]
    PortZero { flag: &'static str },
    #[error("port {0} is both in --ports and in --exclude-ports")]
    PortInBoth(u16),
    #[error("--ports needs at least one port (to keep connections to every port, use --all-ports)")]
    NoPorts,
    #[error("too many {what}: {count} (at most {max})")]
    TooMany {
        what: &'static str,
        count: usize,
        max: usize,
    },
    #[error("--exclude-cgroup {path}: the path must be absolute")]
    CgroupRelative { path: PathBuf },
    #[error("--exclude-cgroup {path}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: CgroupError,
    },
    #[error("--exclude-cgroup {path}: cannot resolve the path")]
    CgroupResolve {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "--exclude-cgroup {path} is not below any attached cgroup ({attached}); only cgroups whose \
         connections would be kept can be excluded"
    )]
    CgroupNotUnder { path: PathBuf, attached: String },
    #[error(
        "--exclude-cgroup {path} is an attached cgroup itself; to stop keeping its connections, drop its --cgroup"
    )]
    CgroupIsAttached { path: PathBuf },
    #[error(
        "--exclude-cgroup {path} is {level} levels deep; cgroups deeper than {MAX_CGROUP_LEVEL} levels cannot be excluded"
    )]
    CgroupTooDeep { path: PathBuf, level: usize },
}

/// Which destination ports are kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PortSelection {
    /// Every port but the excluded ones (`--all-ports`, the default).
    All,
    /// Only these ports (`--ports LIST`), still minus the excluded ones.
    Only(Vec<u16>),
}

/// A whole policy as asked for, before validation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicySpec {
    pub ports: PortSelection,
    pub exclude_ports: Vec<u16>,
    pub exclude_cidr: Vec<String>,
    pub exclude_cgroup: Vec<PathBuf>,
}

/// A live change (`rocks-agent policy`, the control socket's `set_policy` request): each part
/// given replaces the current one as a whole, a part not given stays as it is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyChange {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<PortSelection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclude_ports: Option<Vec<u16>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclude_cidr: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclude_cgroup: Option<Vec<PathBuf>>,
}

impl PolicyChange {
    pub fn is_empty(&self) -> bool {
        *self == PolicyChange::default()
    }
}

impl PolicySpec {
    /// This spec with the parts `change` names replaced.
    pub fn with(mut self, change: PolicyChange) -> PolicySpec {
        if let Some(v) = change.ports {
            self.ports = v;
        }
        if let Some(v) = change.exclude_ports {
            self.exclude_ports = v;
        }
        if let Some(v) = change.exclude_cidr {
            self.exclude_cidr = v;
        }
        if let Some(v) = change.exclude_cgroup {
            self.exclude_cgroup = v;
        }
        self
    }
}

/// An IP prefix. IPv4-mapped IPv6 prefixes (`::ffff:10.0.0.0/104`) are stored as the IPv4
/// prefix they mean, because IPv4-mapped destinations are matched against the IPv4 prefixes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix_len: u8,
}

impl Cidr {
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// Parses `ADDR/LEN` or a bare address (a single host). Bits set past the prefix are
    /// refused rather than silently cleared: `10.1.2.3/8` is more likely a typo than a wish to
    /// exclude all of 10/8.
    pub fn parse(value: &str) -> Result<Cidr, PolicyError> {
        let fail = |why: String| PolicyError::Cidr {
            value: value.to_owned(),
            why,
        };
        let text = value.trim();
        let (addr_text, len_text) = match text.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (text, None),
        };
        let addr: IpAddr = addr_text.parse().map_err(|_| {
            fail(format!(
                "{addr_text:?} is not an IPv4 or IPv6 address (examples: 10.0.0.0/8, 192.0.2.7, fd00::/8)"
            ))
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len = match len_text {
            None => max,
            Some(l) => match l.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => {
                    return Err(fail(format!(
                        "the prefix length must be a number from 0 to {max}, found {l:?}"
                    )));
                }
            },
        };
        let cidr = Cidr::from_parts(addr, prefix_len);
        // `to_canonical`: `::ffff:10.0.0.0/104` is stored as 10.0.0.0/8, which is no typo.
        if cidr.addr != addr.to_canonical() {
            return Err(fail(format!(
                "the address has bits set past the /{prefix_len} prefix (did you mean {cidr}?)"
            )));
        }
        Ok(cidr)
    }

    /// The prefix of `addr`/`prefix_len` with the host bits cleared, IPv4-mapped IPv6
    /// prefixes of at least /96 turned into IPv4.
    fn from_parts(addr: IpAddr, prefix_len: u8) -> Cidr {
        match addr {
            IpAddr::V4(v4) => {
                let mask = if prefix_len == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(prefix_len))
                };
                Cidr {
                    addr: IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask)),
                    prefix_len,
                }
            }
            IpAddr::V6(v6) => {
                if let (Some(v4), true) = (v6.to_ipv4_mapped(), prefix_len >= 96) {
                    return Cidr::from_parts(IpAddr::V4(v4), prefix_len - 96);
                }
                let mask = if prefix_len == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(prefix_len))
                };
                Cidr {
                    addr: IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask)),
                    prefix_len,
                }
            }
        }
    }

    /// Whether `ip` is inside this prefix (the eBPF programs decide with LPM tries; this is
    /// for tests and tools).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        Cidr::from_parts(ip, self.prefix_len.min(if ip.is_ipv4() { 32 } else { 128 })) == *self
            && ip.is_ipv4() == self.addr.is_ipv4()
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// An excluded cgroup: the path as given, and its id (the inode number of its directory, what
/// `bpf_get_current_ancestor_cgroup_id` returns) at the time the policy was applied. A cgroup
/// removed and created again under the same path is a new cgroup with a new id: apply the
/// policy again to exclude it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExcludedCgroup {
    pub path: PathBuf,
    pub id: u64,
}

/// A validated policy, ready for the maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// `None`: every port (but the excluded ones).
    pub only_ports: Option<BTreeSet<u16>>,
    pub exclude_ports: BTreeSet<u16>,
    /// Sorted, without duplicates.
    pub exclude_cidr: Vec<Cidr>,
    pub exclude_cgroup: Vec<ExcludedCgroup>,
}

impl Default for Policy {
    /// Keep everything: all ports, nothing excluded.
    fn default() -> Policy {
        Policy {
            only_ports: None,
            exclude_ports: BTreeSet::new(),
            exclude_cidr: Vec::new(),
            exclude_cgroup: Vec::new(),
        }
    }
}

/// The policy as `status --json` and `rocks-agent policy --json` show it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyReport {
    /// Null: every port.
    pub ports: Option<Vec<u16>>,
    pub exclude_ports: Vec<u16>,
    pub exclude_cidr: Vec<String>,
    pub exclude_cgroup: Vec<String>,
    /// How many live changes were applied since the agent started.
    pub changes: u64,
}

impl Policy {
    /// Validates `spec`. `attached` are the cgroups the programs are attached to: an excluded
    /// cgroup must exist and lie strictly below one of them.
    pub fn resolve(spec: &PolicySpec, attached: &[PathBuf]) -> Result<Policy, PolicyError> {
        let only_ports = match &spec.ports {
            PortSelection::All => None,
            PortSelection::Only(ports) if ports.is_empty() => return Err(PolicyError::NoPorts),
            PortSelection::Only(ports) => Some(port_set(ports, "--ports")?),
        };
        let exclude_ports = port_set(&spec.exclude_ports, "--exclude-ports")?;
        if let Some(both) = only_ports
            .as_ref()
            .and_then(|only| only.intersection(&exclude_ports).next())
        {
            return Err(PolicyError::PortInBoth(*both));
        }
        let port_entries = only_ports.as_ref().map_or(0, BTreeSet::len) + exclude_ports.len();
        check_count(
            "ports (--ports and --exclude-ports together)",
            port_entries,
            MAX_PORT_ENTRIES,
        )?;

        let mut exclude_cidr = spec
            .exclude_cidr
            .iter()
            .map(|c| Cidr::parse(c))
            .collect::<Result<Vec<_>, _>>()?;
        exclude_cidr.sort();
        exclude_cidr.dedup();
        let v4 = exclude_cidr.iter().filter(|c| c.addr.is_ipv4()).count();
        check_count("IPv4 prefixes in --exclude-cidr", v4, MAX_CIDR_ENTRIES)?;
        check_count(
            "IPv6 prefixes in --exclude-cidr",
            exclude_cidr.len() - v4,
            MAX_CIDR_ENTRIES,
        )?;

        let mut exclude_cgroup: Vec<ExcludedCgroup> = Vec::new();
        for path in &spec.exclude_cgroup {
            let excluded = resolve_cgroup(path, attached)?;
            if !exclude_cgroup.iter().any(|e| e.id == excluded.id) {
                exclude_cgroup.push(excluded);
            }
        }
        check_count(
            "cgroups in --exclude-cgroup",
            exclude_cgroup.len(),
            MAX_CGROUP_ENTRIES,
        )?;
        Ok(Policy {
            only_ports,
            exclude_ports,
            exclude_cidr,
            exclude_cgroup,
        })
    }

    /// This policy with `change` applied, validated as a whole. Excluded cgroups are only
    /// looked up again when the change names them: a change of ports must not fail because an
    /// excluded cgroup was removed meanwhile (its id simply matches nothing any more).
    pub fn changed(
        &self,
        change: PolicyChange,
        attached: &[PathBuf],
    ) -> Result<Policy, PolicyError> {
        let keep_cgroups = change.exclude_cgroup.is_none();
        let mut spec = self.spec().with(change);
        if keep_cgroups {
            spec.exclude_cgroup.clear();
        }
        let mut next = Policy::resolve(&spec, attached)?;
        if keep_cgroups {
            next.exclude_cgroup = self.exclude_cgroup.clone();
        }
        Ok(next)
    }

    /// The spec this policy was made from (normalized), for applying a change on top of it.
    pub fn spec(&self) -> PolicySpec {
        PolicySpec {
            ports: match &self.only_ports {
                None => PortSelection::All,
                Some(ports) => PortSelection::Only(ports.iter().copied().collect()),
            },
            exclude_ports: self.exclude_ports.iter().copied().collect(),
            exclude_cidr: self.exclude_cidr.iter().map(ToString::to_string).collect(),
            exclude_cgroup: self.exclude_cgroup.iter().map(|c| c.path.clone()).collect(),
        }
    }

    pub fn report(&self, changes: u64) -> PolicyReport {
        PolicyReport {
            ports: self
                .only_ports
                .as_ref()
                .map(|p| p.iter().copied().collect()),
            exclude_ports: self.exclude_ports.iter().copied().collect(),
            exclude_cidr: self.exclude_cidr.iter().map(ToString::to_string).collect(),
            exclude_cgroup: self
                .exclude_cgroup
                .iter()
                .map(|c| c.path.display().to_string())
                .collect(),
            changes,
        }
    }
}

/// One line, for logs: `ports all, exclude-ports 25, exclude-cidr 10.0.0.0/8, exclude-cgroup none`.
impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&parts(&self.report(0)))
    }
}

fn parts(r: &PolicyReport) -> String {
    format!(
        "ports {}, exclude-ports {}, exclude-cidr {}, exclude-cgroup {}",
        r.ports
            .as_ref()
            .map_or_else(|| "all".to_owned(), |p| list(p)),
        list(&r.exclude_ports),
        list(&r.exclude_cidr),
        list(&r.exclude_cgroup)
    )
}

/// The policy on one line, as the `status` table ends with it.
pub fn one_line(report: &PolicyReport) -> String {
    let plural = if report.changes == 1 { "" } else { "s" };
    format!("{}, {} live change{plural}", parts(report), report.changes)
}

/// The policy as `rocks-agent policy` prints it for people.
pub fn render(report: &PolicyReport) -> String {
    format!(
        "ports:          {}\nexclude-ports:  {}\nexclude-cidr:   {}\nexclude-cgroup: {}\nlive changes since start: {}\n",
        report
            .ports
            .as_ref()
            .map_or_else(|| "all".to_owned(), |p| list(p)),
        list(&report.exclude_ports),
        list(&report.exclude_cidr),
        list(&report.exclude_cgroup),
        report.changes
    )
}

fn list<T: fmt::Display>(items: &[T]) -> String {
    if items.is_empty() {
        return "none".to_owned();
    }
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn port_set(ports: &[u16], flag: &'static str) -> Result<BTreeSet<u16>, PolicyError> {
    if ports.contains(&0) {
        return Err(PolicyError::PortZero { flag });
    }
    Ok(ports.iter().copied().collect())
}

fn check_count(what: &'static str, count: usize, max: usize) -> Result<(), PolicyError> {
    if count > max {
        return Err(PolicyError::TooMany { what, count, max });
    }
    Ok(())
}

fn resolve_cgroup(path: &Path, attached: &[PathBuf]) -> Result<ExcludedCgroup, PolicyError> {
    if !path.is_absolute() {
        return Err(PolicyError::CgroupRelative {
            path: path.to_owned(),
        });
    }
    let dir = cgroup::open(path).map_err(|source| PolicyError::Cgroup {
        path: path.to_owned(),
        source,
    })?;
    let resolve = |p: &Path| std::fs::canonicalize(p);
    let real = resolve(path).map_err(|source| PolicyError::CgroupResolve {
        path: path.to_owned(),
        source,
    })?;
    let mut under = false;
    for a in attached {
        // An attached cgroup that cannot be resolved any more cannot contain anything.
        let Ok(a) = resolve(a) else { continue };
        if a == real {
            return Err(PolicyError::CgroupIsAttached {
                path: path.to_owned(),
            });
        }
        under |= real.starts_with(&a);
    }
    if !under {
        let attached = attached
            .iter()
            .map(|a| a.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        return Err(PolicyError::CgroupNotUnder {
            path: path.to_owned(),
            attached,
        });
    }
    // The level the programs see is counted from the hierarchy's root; the mount may be a
    // cgroup namespace's root below it, so this is a lower bound, and the programs look one
    // level at a time up to MAX_CGROUP_LEVEL either way.
    if let Ok(mount) = cgroup::cgroup2_mount().and_then(|m| {
        std::fs::canonicalize(&m).map_err(|source| CgroupError::Read {
            what: "the cgroup2 mount",
            source,
        })
    }) && let Ok(rel) = real.strip_prefix(&mount)
    {
        let level = rel.components().count();
        if level > MAX_CGROUP_LEVEL as usize {
            return Err(PolicyError::CgroupTooDeep {
                path: path.to_owned(),
                level,
            });
        }
    }
    let meta = dir
        .file
        .metadata()
        .map_err(|source| PolicyError::CgroupResolve {
            path: path.to_owned(),
            source,
        })?;
    Ok(ExcludedCgroup {
        path: path.to_owned(),
        id: meta.ino(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        Cidr::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn spec() -> PolicySpec {
        PolicySpec {
            ports: PortSelection::All,
            exclude_ports: vec![],
            exclude_cidr: vec![],
            exclude_cgroup: vec![],
        }
    }

    #[test]
    fn cidrs_parse_and_normalize() {
        assert_eq!(cidr("10.0.0.0/8").to_string(), "10.0.0.0/8");
        assert_eq!(cidr("192.0.2.7").to_string(), "192.0.2.7/32");
        assert_eq!(cidr("0.0.0.0/0").to_string(), "0.0.0.0/0");
        assert_eq!(cidr("fd00::/8").to_string(), "fd00::/8");
        assert_eq!(cidr("2001:db8::1").to_string(), "2001:db8::1/128");
        assert_eq!(cidr(" 2001:DB8::/32 ").to_string(), "2001:db8::/32");
        // IPv4-mapped prefixes mean the IPv4 prefix.
        assert_eq!(cidr("::ffff:10.0.0.0/104").to_string(), "10.0.0.0/8");
        assert_eq!(cidr("::ffff:192.0.2.9").to_string(), "192.0.2.9/32");
    }

    #[test]
    fn bad_cidrs_name_the_value_and_say_why() {
        let cases = [
            (
                "10.0.0.300/8",
                "\"10.0.0.300\" is not an IPv4 or IPv6 address",
            ),
            ("example.com", "is not an IPv4 or IPv6 address"),
            ("", "is not an IPv4 or IPv6 address"),
            (
                "10.0.0.0/33",
                "the prefix length must be a number from 0 to 32, found \"33\"",
            ),
            ("fd00::/129", "from 0 to 128"),
            ("10.0.0.0/", "found \"\""),
            ("10.0.0.0/-1", "found \"-1\""),
            (
                "10.1.2.3/8",
                "bits set past the /8 prefix (did you mean 10.0.0.0/8?)",
            ),
            ("fd00::1/8", "did you mean fd00::/8?"),
        ];
        for (value, want) in cases {
            let e = Cidr::parse(value).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("invalid --exclude-cidr value {value:?}: ")),
                "{value}: {e}"
            );
            assert!(e.contains(want), "{value}: {e}");
        }
    }

    #[test]
    fn containment() {
        assert!(cidr("10.0.0.0/8").contains("10.9.8.7".parse().unwrap()));
        assert!(cidr("10.0.0.0/8").contains("::ffff:10.9.8.7".parse().unwrap()));
        assert!(!cidr("10.0.0.0/8").contains("11.0.0.1".parse().unwrap()));
        assert!(cidr("fd00::/8").contains("fd12::1".parse().unwrap()));
        assert!(!cidr("fd00::/8").contains("10.0.0.1".parse().unwrap()));
        assert!(cidr("0.0.0.0/0").contains("192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn ports_are_checked() {
        let p = Policy::resolve(
            &PolicySpec {
                ports: PortSelection::Only(vec![443, 22, 22]),
                ..spec()
            },
            &[],
        )
        .unwrap();
        assert_eq!(p.only_ports, Some(BTreeSet::from([22, 443])));
        let e = Policy::resolve(
            &PolicySpec {
                ports: PortSelection::Only(vec![]),
                ..spec()
            },
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().contains("use --all-ports"), "{e}");
        let e = Policy::resolve(
            &PolicySpec {
                exclude_ports: vec![25, 0],
                ..spec()
            },
            &[],
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "port 0 in --exclude-ports: ports are 1-65535"
        );
        let both = PolicySpec {
            ports: PortSelection::Only(vec![22, 25]),
            exclude_ports: vec![25],
            ..spec()
        };
        let e = Policy::resolve(&both, &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "port 25 is both in --ports and in --exclude-ports"
        );
        let many = PolicySpec {
            exclude_ports: (1..=3000).collect(),
            ..spec()
        };
        let e = Policy::resolve(&many, &[]).unwrap_err();
        assert!(e.to_string().starts_with("too many ports"), "{e}");
    }

    #[test]
    fn cidrs_are_sorted_and_deduplicated() {
        let s = PolicySpec {
            exclude_cidr: vec![
                "fd00::/8".into(),
                "10.0.0.0/8".into(),
                "::ffff:10.0.0.0/104".into(),
            ],
            ..spec()
        };
        let p = Policy::resolve(&s, &[]).unwrap();
        assert_eq!(p.report(0).exclude_cidr, ["10.0.0.0/8", "fd00::/8"]);
    }

    #[test]
    fn changes_replace_whole_parts_and_round_trip() {
        let base = PolicySpec {
            ports: PortSelection::Only(vec![22]),
            exclude_ports: vec![25],
            exclude_cidr: vec!["10.0.0.0/8".into()],
            exclude_cgroup: vec![],
        };
        let change = PolicyChange {
            exclude_cidr: Some(vec![]),
            ports: Some(PortSelection::All),
            ..Default::default()
        };
        let next = base.clone().with(change);
        assert_eq!(
            next,
            PolicySpec {
                ports: PortSelection::All,
                exclude_cidr: vec![],
                ..base.clone()
            }
        );
        assert_eq!(base.clone().with(PolicyChange::default()), base);
        let p = Policy::resolve(&base, &[]).unwrap();
        assert_eq!(p.spec(), base);
        assert_eq!(
            p.to_string(),
            "ports 22, exclude-ports 25, exclude-cidr 10.0.0.0/8, exclude-cgroup none"
        );
    }

    #[test]
    fn a_change_that_names_no_cgroup_keeps_the_excluded_ones_without_looking_them_up() {
        let gone = ExcludedCgroup {
            path: "/nonexistent/rocks-cgroup".into(),
            id: 7,
        };
        let current = Policy {
            exclude_cgroup: vec![gone.clone()],
            ..Policy::default()
        };
        let change = PolicyChange {
            exclude_ports: Some(vec![25]),
            ..PolicyChange::default()
        };
        let next = current.changed(change, &[]).unwrap();
        assert_eq!(next.exclude_cgroup, [gone]);
        assert_eq!(next.exclude_ports, BTreeSet::from([25]));
        // Named: looked up again, and a cgroup that is gone is refused.
        let change = PolicyChange {
            exclude_cgroup: Some(vec!["/nonexistent/rocks-cgroup".into()]),
            ..PolicyChange::default()
        };
        assert!(current.changed(change, &["/nonexistent".into()]).is_err());
        let cleared = current.changed(
            PolicyChange {
                exclude_cgroup: Some(vec![]),
                ..PolicyChange::default()
            },
            &[],
        );
        assert_eq!(cleared.unwrap().exclude_cgroup, []);
    }

    #[test]
    fn change_wire_format() {
        let c: PolicyChange =
            serde_json::from_str(r#"{"ports":"all","exclude_cidr":["10.0.0.0/8"]}"#).unwrap();
        assert_eq!(c.ports, Some(PortSelection::All));
        let c: PolicyChange = serde_json::from_str(r#"{"ports":{"only":[22]}}"#).unwrap();
        assert_eq!(c.ports, Some(PortSelection::Only(vec![22])));
        assert!(
            serde_json::from_str::<PolicyChange>(r#"{"exclude_cidrs":[]}"#).is_err(),
            "unknown fields are refused"
        );
        assert!(
            serde_json::from_str::<PolicyChange>("{}")
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn excluded_cgroups_must_exist_below_an_attached_one() {
        let e = Policy::resolve(
            &PolicySpec {
                exclude_cgroup: vec!["rel/path".into()],
                ..spec()
            },
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().contains("must be absolute"), "{e}");
        let missing = PolicySpec {
            exclude_cgroup: vec!["/nonexistent/rocks-cgroup".into()],
            ..spec()
        };
        let e = Policy::resolve(&missing, &["/nonexistent".into()]).unwrap_err();
        assert!(
            matches!(
                e,
                PolicyError::Cgroup {
                    source: CgroupError::NotFound { .. },
                    ..
                }
            ),
            "{e}"
        );
        assert!(format!("{:#}", anyhow::Error::from(e)).contains("does not exist"));
        let not_cgroup = PolicySpec {
            exclude_cgroup: vec!["/proc".into()],
            ..spec()
        };
        let e = Policy::resolve(&not_cgroup, &["/".into()]).unwrap_err();
        assert!(
            matches!(
                e,
                PolicyError::Cgroup {
                    source: CgroupError::NotCgroup2 { .. },
                    ..
                }
            ),
            "{e}"
        );
    }
}
