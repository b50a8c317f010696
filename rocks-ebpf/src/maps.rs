//! The maps shared with the agent, and small accessors for them.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, SockHash},
};
use rocks_common::{Config, HostKey, LocalKey, SockAddr, SockKey, stat};

#[map(name = "ROCKS_CONFIG")]
pub(crate) static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// Agent network namespace cookie, kept apart from `Config` so `Config` stays all-u32.
#[map(name = "ROCKS_NETNS")]
pub(crate) static NETNS: Array<u64> = Array::with_max_entries(1, 0);

#[map(name = "ROCKS_PORT_POLICY")]
pub(crate) static PORT_POLICY: HashMap<u16, u8> = HashMap::with_max_entries(1024, 0);

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
