//! The maps shared with the agent, and small accessors for them.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, SockHash},
};
use rocks_common::{
    Config, FastFlow, FastRead, HostKey, LocalKey, PolicyCgroupKey, PolicyCidr4, PolicyCidr6, PolicyHeader,
    PolicyPortKey, SockAddr, SockKey, policy, stat,
};

#[map(name = "ROCKS_CONFIG")]
pub(crate) static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// Agent network namespace cookie, kept apart from `Config` so `Config` stays all-u32.
#[map(name = "ROCKS_NETNS")]
pub(crate) static NETNS: Array<u64> = Array::with_max_entries(1, 0);

/// The policy's two generations (see `rocks_common::policy`): their headers, the active one,
/// and their entries.
#[map(name = "ROCKS_POLICY")]
pub(crate) static POLICY: Array<PolicyHeader> = Array::with_max_entries(policy::GENERATIONS, 0);

#[map(name = "ROCKS_POLICY_ACTIVE")]
pub(crate) static POLICY_ACTIVE: Array<u32> = Array::with_max_entries(1, 0);

#[map(name = "ROCKS_POLICY_PORTS")]
pub(crate) static POLICY_PORTS: HashMap<PolicyPortKey, u8> =
    HashMap::with_max_entries(policy::MAX_PORTS, 0);

#[map(name = "ROCKS_POLICY_CIDR4")]
pub(crate) static POLICY_CIDR4: LpmTrie<PolicyCidr4, u8> =
    LpmTrie::with_max_entries(policy::MAX_CIDRS, 0);

#[map(name = "ROCKS_POLICY_CIDR6")]
pub(crate) static POLICY_CIDR6: LpmTrie<PolicyCidr6, u8> =
    LpmTrie::with_max_entries(policy::MAX_CIDRS, 0);

#[map(name = "ROCKS_POLICY_CGROUPS")]
pub(crate) static POLICY_CGROUPS: HashMap<PolicyCgroupKey, u8> =
    HashMap::with_max_entries(policy::MAX_CGROUPS, 0);

/// Destination hosts known to have no agent, with the monotonic time (ns) the entry expires.
#[map(name = "ROCKS_NEGATIVE_CACHE")]
pub(crate) static NEGATIVE_CACHE: LruHashMap<HostKey, u64> = LruHashMap::with_max_entries(16384, 0);

#[map(name = "ROCKS_ORIG_BY_COOKIE")]
pub(crate) static ORIG_BY_COOKIE: LruHashMap<u64, SockAddr> =
    LruHashMap::with_max_entries(65536, 0);

#[map(name = "ROCKS_ORIG_BY_LOCAL")]
pub(crate) static ORIG_BY_LOCAL: LruHashMap<LocalKey, SockAddr> =
    LruHashMap::with_max_entries(65536, 0);

#[map(name = "ROCKS_SOCKETS")]
pub(crate) static SOCKETS: SockHash<SockKey> = SockHash::with_max_entries(65536, 0);

/// Fast-path connections (see `rocks_common::FastFlow`). LRU: an entry the agent never
/// removed (it crashed) cannot fill the map.
#[map(name = "ROCKS_FAST_FLOWS")]
pub(crate) static FAST_FLOWS: LruHashMap<LocalKey, FastFlow> =
    LruHashMap::with_max_entries(65536, 0);

/// Bytes the agent has read so far from each fast-path connection, written by the agent.
#[map(name = "ROCKS_FAST_READ")]
pub(crate) static FAST_READ: LruHashMap<LocalKey, FastRead> =
    LruHashMap::with_max_entries(65536, 0);

/// How many more connects may be redirected before the agent accepts them: `--max-connections`
/// minus the connections it carries and those waiting in its accept queues. The agent rewrites
/// it whenever that changes (and every second); `connect4`/`connect6` take one for each
/// connect they redirect. At 0 or below, connects go direct.
#[map(name = "ROCKS_CONNECT_BUDGET")]
pub(crate) static CONNECT_BUDGET: Array<i64> = Array::with_max_entries(1, 0);

#[map(name = "ROCKS_STATS")]
pub(crate) static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

#[inline(always)]
pub(crate) fn count(index: u32) {
    if let Some(slot) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
pub(crate) fn config() -> Option<&'static Config> {
    let config = CONFIG.get(0)?;
    (config.enabled != 0).then_some(config)
}

#[inline(always)]
pub(crate) fn agent_netns() -> u64 {
    NETNS.get(0).copied().unwrap_or(0)
}
