//! Transparent dials: the serving agent connects to the destination from the client's own
//! address, so the server program sees the real client in `accept()`, `getpeername()` and its
//! logs, and a service that trusts this host's own addresses never mistakes a relayed remote
//! client for a local one.
//!
//! How (checked on Linux 6.18, IPv4 and IPv6):
//! - the dial socket sets `IP_TRANSPARENT`/`IPV6_TRANSPARENT` (bind to an address this host
//!   does not own) and [`TRANSPARENT_MARK`], binds to the client's address with port 0 and
//!   connects to the destination, an address of this host: the SYN is looped back locally;
//! - the server program's SYN-ACK and everything after it go to the client's address. A rule
//!   `fwmark TRANSPARENT_MARK lookup TABLE` with `local default dev lo` in `TABLE` brings those
//!   back to this host, but only if the server's socket carries the mark: with
//!   `net.ipv4.tcp_fwmark_accept=1` (which also covers IPv6) an accepted socket inherits the
//!   mark of the SYN that opened it;
//! - a SYN to a port where nothing listens is answered by the kernel, which marks that RST only
//!   with `net.ipv4.fwmark_reflect=1` / `net.ipv6.fwmark_reflect=1`; without them the RST
//!   would leave for the client's real address and the dial would time out instead of being
//!   refused.
//!
//! Side effect, for the namespace as a whole: with `tcp_fwmark_accept` every TCP connection
//! accepted in it inherits the mark its SYN carried (only marked SYNs are affected: packets
//! from the network carry none unless a firewall rule marks them), and with `fwmark_reflect`
//! the kernel's own RSTs and ICMP replies carry the mark of the packet they answer. Per-
//! connection alternatives were weighed: a routing rule per connection's 4-tuple costs a
//! linear rule walk for every route lookup and must outlive the connection's TIME_WAIT; a
//! host route to the client's address would capture the agent's own traffic to that host.
//!
//! [`Routing`] sets all this up and takes it down again (`routing`, through `rtnl` and
//! `sysctl`), shared with other agents of the same network namespace (`peers`); [`connect`]
//! makes one dial (`dial`).
use rocks_common::TRANSPARENT_MARK;

mod dial;
mod peers;
mod routing;
mod rtnl;
mod sysctl;

pub use dial::{DialError, connect};
pub use routing::{Routing, SetupError};

/// The routing table holding `local default dev lo` for marked replies ("ro").
pub const TABLE: u32 = 0x726f;
/// The policy rule's priority: after `local` (0), before `main` (32766).
pub const RULE_PRIORITY: u32 = 4470;
/// The mark the rule matches.
pub const MARK: u32 = TRANSPARENT_MARK;
