//! The bootstrap peer ([`server`]): helps diloco peers find each other and relays for peers
//! behind NAT. The network's conventions it shares with `diloco-node` (key files, multiaddr
//! flags, protocol ids, Kademlia/identify helpers) live in the `diloco-p2p` crate.

pub mod server;
