//! Writing a validated [`Policy`] into the eBPF maps the connect hooks read, so that a change
//! never shows a half-written policy to a connect.
//!
//! The maps hold two generations of the policy (see `rocks_common::policy`). A change writes
//! the whole new policy into the idle generation, flips `ROCKS_POLICY_ACTIVE` to it with one
//! map write, waits until no program can still be running with the old generation, and only
//! then deletes the old generation's entries. A mode switch (all ports but some, to only some
//! ports, or back) is part of the generation's header, so it flips together with its entries.
use std::time::Duration;

use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, MapData, MapError, lpm_trie::Key},
};
use rocks_common::{
    PolicyCgroupKey, PolicyCidr4, PolicyCidr6, PolicyHeader, PolicyPortKey, names, policy,
    port_action, port_mode,
};
use tracing::warn;

use crate::policy::Policy;

#[derive(Debug, thiserror::Error)]
pub enum PolicyMapError {
    #[error("eBPF map {0} is missing from the object")]
    Missing(&'static str),
    #[error("eBPF policy map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> PolicyMapError {
    move |source| PolicyMapError::Map { name, source }
}

/// The policy maps, and the policy they hold.
pub struct PolicyMaps {
    headers: Array<MapData, PolicyHeader>,
    active: Array<MapData, u32>,
    ports: HashMap<MapData, PolicyPortKey, u8>,
    cidr4: LpmTrie<MapData, PolicyCidr4, u8>,
    cidr6: LpmTrie<MapData, PolicyCidr6, u8>,
    cgroups: HashMap<MapData, PolicyCgroupKey, u8>,
    current: Policy,
    /// How many policies were applied, the first (from the command line) included.
    applied: u64,
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, PolicyMapError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(PolicyMapError::Missing(name))?;
    T::try_from(map).map_err(map_err(name))
}

impl PolicyMaps {
    /// Takes the policy maps out of the loaded object. Until [`PolicyMaps::apply`], the
    /// programs see an empty generation: every port kept, nothing excluded.
    pub fn take(ebpf: &mut Ebpf) -> Result<PolicyMaps, PolicyMapError> {
        Ok(PolicyMaps {
            headers: take(ebpf, names::POLICY)?,
            active: take(ebpf, names::POLICY_ACTIVE)?,
            ports: take(ebpf, names::POLICY_PORTS)?,
            cidr4: take(ebpf, names::POLICY_CIDR4)?,
            cidr6: take(ebpf, names::POLICY_CIDR6)?,
            cgroups: take(ebpf, names::POLICY_CGROUPS)?,
            current: Policy::default(),
            applied: 0,
        })
    }

    /// The policy in force.
    pub fn current(&self) -> &Policy {
        &self.current
    }

    /// How many policies were applied after the first: the live changes.
    pub fn changes(&self) -> u64 {
        self.applied.saturating_sub(1)
    }

    /// Makes `policy` the one the connect hooks enforce (see the module doc for how). On an
    /// error the policy in force is unchanged.
    pub fn apply(&mut self, policy: Policy) -> Result<(), PolicyMapError> {
        let old = self
            .active
            .get(&0, 0)
            .map_err(map_err(names::POLICY_ACTIVE))?
            % policy::GENERATIONS;
        let next = (old + 1) % policy::GENERATIONS;
        // Normally empty; a failed earlier apply may have left part of a policy there.
        self.clear(next);
        if let Err(e) = self.write(next, &policy) {
            self.clear(next);
            return Err(e);
        }
        self.active
            .set(0, next, 0)
            .map_err(map_err(names::POLICY_ACTIVE))?;
        wait_for_running_programs();
        self.clear(old);
        self.current = policy;
        self.applied += 1;
        Ok(())
    }

    fn write(&mut self, generation: u32, policy: &Policy) -> Result<(), PolicyMapError> {
        let port = |port: u16| PolicyPortKey {
            generation,
            port: u32::from(port),
        };
        for p in policy.only_ports.iter().flatten() {
            self.ports
                .insert(port(*p), port_action::INCLUDE, 0)
                .map_err(map_err(names::POLICY_PORTS))?;
        }
        for p in &policy.exclude_ports {
            self.ports
                .insert(port(*p), port_action::EXCLUDE, 0)
                .map_err(map_err(names::POLICY_PORTS))?;
        }
        let mut flags = 0;
        for cidr in &policy.exclude_cidr {
            let prefix_len = 32 + u32::from(cidr.prefix_len());
            match cidr.addr() {
                std::net::IpAddr::V4(v4) => {
                    let data = PolicyCidr4 {
                        generation,
                        addr: u32::from_ne_bytes(v4.octets()),
                    };
                    self.cidr4
                        .insert(&Key::new(prefix_len, data), 1, 0)
                        .map_err(map_err(names::POLICY_CIDR4))?;
                    flags |= policy::HAS_CIDR4;
                }
                std::net::IpAddr::V6(v6) => {
                    let o = v6.octets();
                    let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                    let data = PolicyCidr6 {
                        generation,
                        addr: [w(0), w(4), w(8), w(12)],
                    };
                    self.cidr6
                        .insert(&Key::new(prefix_len, data), 1, 0)
                        .map_err(map_err(names::POLICY_CIDR6))?;
                    flags |= policy::HAS_CIDR6;
                }
            }
        }
        for cg in &policy.exclude_cgroup {
            let key = PolicyCgroupKey {
                id: cg.id,
                generation,
                reserved: 0,
            };
            self.cgroups
                .insert(key, 1, 0)
                .map_err(map_err(names::POLICY_CGROUPS))?;
            flags |= policy::HAS_CGROUPS;
        }
        let header = PolicyHeader {
            port_mode: if policy.only_ports.is_some() {
                port_mode::ONLY_INCLUDED
            } else {
                port_mode::ALL_EXCEPT_EXCLUDED
            },
            flags,
        };
        // The header last: nothing reads this generation before the flip anyway, but a
        // header never announces entries that are not there yet.
        self.headers
            .set(generation, header, 0)
            .map_err(map_err(names::POLICY))
    }

    /// Deletes every entry of `generation`. A failure only leaves unused entries behind (the
    /// next apply clears the generation again before writing it), so it is logged, not fatal.
    fn clear(&mut self, generation: u32) {
        let ports: Vec<_> = self
            .ports
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.generation == generation)
            .collect();
        for k in ports {
            if let Err(e) = self.ports.remove(&k) {
                warn!(error = %e, port = k.port, "cannot delete a stale policy entry");
            }
        }
        let cidr4: Vec<_> = self
            .cidr4
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.data().generation == generation)
            .collect();
        for k in cidr4 {
            if let Err(e) = self.cidr4.remove(&k) {
                warn!(error = %e, "cannot delete a stale policy entry");
            }
        }
        let cidr6: Vec<_> = self
            .cidr6
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.data().generation == generation)
            .collect();
        for k in cidr6 {
            if let Err(e) = self.cidr6.remove(&k) {
                warn!(error = %e, "cannot delete a stale policy entry");
            }
        }
        let cgroups: Vec<_> = self
            .cgroups
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.generation == generation)
            .collect();
        for k in cgroups {
            if let Err(e) = self.cgroups.remove(&k) {
                warn!(error = %e, "cannot delete a stale policy entry");
            }
        }
    }
}

/// Returns once every eBPF program that may have read the old active generation has finished.
///
/// cgroup programs run inside an RCU read-side section (`bpf_prog_run_array_cg`), so one RCU
/// grace period is enough; `membarrier(MEMBARRIER_CMD_GLOBAL)` waits for exactly that
/// (`synchronize_rcu`). On one CPU the kernel skips the wait, and a preemptible kernel could
/// still hold a preempted program there; and with nohz_full the command is refused. In both
/// cases a pause far longer than any connect hook runs stands in.
fn wait_for_running_programs() {
    const MEMBARRIER_CMD_GLOBAL: libc::c_int = 1;
    // SAFETY: membarrier takes two integers and touches no memory of ours.
    let rc = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0) };
    // SAFETY: sysconf has no preconditions.
    let one_cpu = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) } <= 1;
    if rc != 0 || one_cpu {
        std::thread::sleep(Duration::from_millis(50));
    }
}
