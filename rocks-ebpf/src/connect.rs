//! `connect4`/`connect6`: decide whether an application's TCP connect is kept; if so, remember
//! its original destination under the socket cookie and rewrite the connect to the agent's
//! loopback listener.
use aya_ebpf::{
    EbpfContext,
    bindings::BPF_ANY,
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use aya_ebpf::{helpers::generated::bpf_get_current_ancestor_cgroup_id, maps::lpm_trie::Key};
use aya_log_ebpf::debug;
use rocks_common::{
    AF_INET, AF_INET6, AGENT_SOCKET_MARK, Config, HostKey, IPPROTO_TCP, SockAddr,
    TRANSPARENT_MARK, port_action, port_mode, stat,
};

use rocks_common::{PolicyCgroupKey, PolicyCidr4, PolicyCidr6, PolicyHeader, PolicyPortKey, policy};

use crate::{
    ALLOW,
    addr::{is_loopback4, is_loopback6, is_v4_mapped, read_ip6, write_ip6},
    maps::{CONNECT_BUDGET, NEGATIVE_CACHE, ORIG_BY_COOKIE, agent_netns, config, count},
    maps::{POLICY, POLICY_ACTIVE, POLICY_CGROUPS, POLICY_CIDR4, POLICY_CIDR6, POLICY_PORTS},
};

/// The policy generation in force for this connect. Read once, so that every check of one
/// connect sees the same generation even while the agent swaps in a new policy.
struct ActivePolicy {
    generation: u32,
    header: PolicyHeader,
}

#[inline(always)]
fn active_policy() -> ActivePolicy {
    let generation = POLICY_ACTIVE.get(0).copied().unwrap_or(0) % policy::GENERATIONS;
    let header = POLICY.get(generation).copied().unwrap_or_default();
    ActivePolicy { generation, header }
}

/// The port policy and the well-known agent ports: true when `port` (host order) is kept.
#[inline(always)]
fn port_is_kept(config: &Config, policy: &ActivePolicy, port: u16) -> bool {
    if u32::from(port) == config.peer_port || u32::from(port) == config.redirect_port {
        return false;
    }
    let key = PolicyPortKey {
        generation: policy.generation,
        port: u32::from(port),
    };
    // SAFETY: the value is a plain u8 read once.
    let action = unsafe { POLICY_PORTS.get(&key) }.copied().unwrap_or(0);
    if policy.header.port_mode == port_mode::ONLY_INCLUDED {
        action == port_action::INCLUDE
    } else {
        action != port_action::EXCLUDE
    }
}

/// True when the IPv4 address `addr_be` (network order) is in an excluded prefix.
#[inline(always)]
fn cidr4_excluded(policy: &ActivePolicy, addr_be: u32) -> bool {
    if policy.header.flags & policy::HAS_CIDR4 == 0 {
        return false;
    }
    let key = Key::new(
        32 + 32,
        PolicyCidr4 {
            generation: policy.generation,
            addr: addr_be,
        },
    );
    POLICY_CIDR4.get(&key).is_some()
}

/// True when the IPv6 address `addr` (network order words) is in an excluded prefix.
#[inline(always)]
fn cidr6_excluded(policy: &ActivePolicy, addr: &[u32; 4]) -> bool {
    if policy.header.flags & policy::HAS_CIDR6 == 0 {
        return false;
    }
    let key = Key::new(
        32 + 128,
        PolicyCidr6 {
            generation: policy.generation,
            addr: [addr[0], addr[1], addr[2], addr[3]],
        },
    );
    POLICY_CIDR6.get(&key).is_some()
}

/// True when the connecting task's cgroup, or any of its ancestors, is excluded. Programs
/// attached to a cgroup also run for every cgroup below it, so an excluded cgroup is found
/// among the ancestors of the cgroup the connect comes from, level by level from the top.
#[inline(always)]
fn cgroup_excluded(policy: &ActivePolicy) -> bool {
    if policy.header.flags & policy::HAS_CGROUPS == 0 {
        return false;
    }
    // Level 0 is the root, which cannot be excluded (it is above every attached cgroup).
    let mut level = 1u32;
    while level <= policy::MAX_CGROUP_LEVEL {
        // SAFETY: helper valid for cgroup sock_addr programs (Linux 5.7+).
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if id == 0 {
            // Past the task's own cgroup.
            return false;
        }
        let key = PolicyCgroupKey {
            id,
            generation: policy.generation,
            reserved: 0,
        };
        // SAFETY: presence check only.
        if unsafe { POLICY_CGROUPS.get(&key) }.is_some() {
            return true;
        }
        level += 1;
    }
    false
}

/// True while `host` is in the negative cache (known to have no agent).
#[inline(always)]
fn negatively_cached(host: &HostKey) -> bool {
    // SAFETY: plain u64 read once.
    match unsafe { NEGATIVE_CACHE.get(host) } {
        Some(expiry) => {
            // SAFETY: helper without side effects.
            let now = unsafe { bpf_ktime_get_ns() };
            if now < *expiry {
                true
            } else {
                let _ = NEGATIVE_CACHE.remove(host);
                false
            }
        }
        None => false,
    }
}

/// Checks shared by connect4 and connect6; returns the config when the connect may be kept.
#[inline(always)]
fn connect_candidate(ctx: &SockAddrContext) -> Option<&'static Config> {
    let config = config()?;
    // SAFETY: ctx pointers are provided by the kernel for this program type.
    let sa = unsafe { &*ctx.sock_addr };
    if sa.protocol != IPPROTO_TCP {
        return None;
    }
    // SAFETY: `sk` is always set for connect hooks.
    let mark = unsafe { (*sa.__bindgen_anon_1.sk).mark };
    if mark == AGENT_SOCKET_MARK || mark == TRANSPARENT_MARK {
        count(stat::SKIPPED_AGENT);
        return None;
    }
    // Only the agent's own network namespace has its loopback listener.
    // SAFETY: helper valid for sock_addr programs.
    if unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } != agent_netns() {
        return None;
    }
    Some(config)
}

/// Records the original destination and rewrites the connect to the agent.
#[inline(always)]
fn remember(ctx: &SockAddrContext, orig: &SockAddr) -> bool {
    // At the agent's connection limit the connect goes direct before anything is recorded.
    // Counted here, in the kernel, so a storm of connects cannot outrun the agent's accepts.
    let Some(budget) = CONNECT_BUDGET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: a map value, valid while the program runs; read once.
    let left = unsafe { core::ptr::read_volatile(budget) };
    if left <= 0 {
        count(stat::SKIPPED_LIMIT);
        return false;
    }
    // Not atomic (the bpf target offers no atomic read-modify-write in `core`): two CPUs
    // redirecting at the same instant may both take the same unit. The agent rewrites the
    // budget from its own exact count at every accept, so such a slip lasts until then.
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(budget, left - 1) };
    // SAFETY: helper valid for sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // A full map must mean "not kept", never a connection the agent cannot place.
    ORIG_BY_COOKIE.insert(&cookie, orig, BPF_ANY as u64).is_ok()
}

#[cgroup_sock_addr(connect4)]
pub fn rocks_connect4(ctx: SockAddrContext) -> i32 {
    let Some(config) = connect_candidate(&ctx) else {
        return ALLOW;
    };
    // SAFETY: kernel-provided context.
    let sa = unsafe { &mut *ctx.sock_addr };
    let ip4 = sa.user_ip4;
    let port = u16::from_be(sa.user_port as u16);
    if is_loopback4(ip4) {
        return ALLOW;
    }
    let policy = active_policy();
    if !port_is_kept(config, &policy, port) {
        count(stat::SKIPPED_POLICY);
        return ALLOW;
    }
    if cidr4_excluded(&policy, ip4) {
        count(stat::SKIPPED_CIDR);
        return ALLOW;
    }
    if cgroup_excluded(&policy) {
        count(stat::SKIPPED_CGROUP);
        return ALLOW;
    }
    let host = HostKey {
        family: AF_INET,
        addr: [ip4, 0, 0, 0],
    };
    if negatively_cached(&host) {
        count(stat::SKIPPED_NEGATIVE);
        return ALLOW;
    }
    // No agent listening (it was killed and left its pinned programs behind): go direct.
    if !crate::listener::listening4(&ctx, config.redirect_port as u16) {
        return ALLOW;
    }
    let orig = SockAddr {
        family: AF_INET,
        port: u32::from(port),
        addr: [ip4, 0, 0, 0],
    };
    if !remember(&ctx, &orig) {
        return ALLOW;
    }
    sa.user_ip4 = 0x7f00_0001u32.to_be();
    sa.user_port = u32::from((config.redirect_port as u16).to_be());
    count(stat::REDIRECTED);
    if config.log_redirects != 0 {
        debug!(
            &ctx,
            "redirect connect4 to {:i}:{}",
            u32::from_be(ip4),
            port
        );
    }
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn rocks_connect6(ctx: SockAddrContext) -> i32 {
    let Some(config) = connect_candidate(&ctx) else {
        return ALLOW;
    };
    // SAFETY: kernel-provided context.
    let sa = unsafe { &mut *ctx.sock_addr };
    let ip6 = read_ip6(&sa.user_ip6);
    let port = u16::from_be(sa.user_port as u16);
    let mapped = is_v4_mapped(&ip6);
    if (mapped && is_loopback4(ip6[3])) || (!mapped && is_loopback6(&ip6)) {
        return ALLOW;
    }
    let policy = active_policy();
    if !port_is_kept(config, &policy, port) {
        count(stat::SKIPPED_POLICY);
        return ALLOW;
    }
    // An IPv4-mapped destination is IPv4 on the wire: the IPv4 prefixes decide.
    let cidr_excluded = if mapped {
        cidr4_excluded(&policy, ip6[3])
    } else {
        cidr6_excluded(&policy, &ip6)
    };
    if cidr_excluded {
        count(stat::SKIPPED_CIDR);
        return ALLOW;
    }
    if cgroup_excluded(&policy) {
        count(stat::SKIPPED_CGROUP);
        return ALLOW;
    }
    let host = if mapped {
        HostKey {
            family: AF_INET,
            addr: [ip6[3], 0, 0, 0],
        }
    } else {
        HostKey {
            family: AF_INET6,
            addr: ip6,
        }
    };
    if negatively_cached(&host) {
        count(stat::SKIPPED_NEGATIVE);
        return ALLOW;
    }
    // An IPv4-mapped connect lands on the IPv4 listener. No agent listening: go direct.
    let listening = if mapped {
        crate::listener::listening4(&ctx, config.redirect_port as u16)
    } else {
        crate::listener::listening6(&ctx, config.redirect_port as u16)
    };
    if !listening {
        return ALLOW;
    }
    // Keep the address as the application wrote it, so getpeername6 gives back the same form.
    let orig = SockAddr {
        family: AF_INET6,
        port: u32::from(port),
        addr: ip6,
    };
    if !remember(&ctx, &orig) {
        return ALLOW;
    }
    let agent = if mapped {
        [0, 0, 0xffffu32.to_be(), 0x7f00_0001u32.to_be()]
    } else {
        [0, 0, 0, 1u32.to_be()]
    };
    write_ip6(&mut sa.user_ip6, agent);
    sa.user_port = u32::from((config.redirect_port as u16).to_be());
    count(stat::REDIRECTED);
    if config.log_redirects != 0 {
        debug!(&ctx, "redirect connect6 port {}", port);
    }
    ALLOW
}
