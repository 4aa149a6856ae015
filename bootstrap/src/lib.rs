//! The bootstrap peer ([`server`]): helps diloco peers find each other and relays for peers
//! behind NAT; with `--status-addr` it also serves what it knows ([`status`]) and the
//! dashboard page. The network's conventions it shares with `diloco-node` (key files, multiaddr
//! flags, protocol ids, Kademlia/identify helpers, the dashboard page) live in the `diloco-p2p`
//! crate.

pub mod server;
pub mod status;
