//! The diloco network's conventions, shared by `diloco-node` and `diloco-bootstrap` and
//! needing no training stack and no averaging protocol: identity key files ([`keys`]),
//! multiaddr flags with clear errors ([`addr`]), the libp2p protocol ids and gossip topic names
//! every diloco peer uses, and the Kademlia/identify setup both kinds of peer share.

pub mod addr;
pub mod dashboard;
pub mod http;
pub mod keys;

use libp2p::{identify, kad, PeerId, StreamProtocol};
use std::time::Duration;

/// The identify protocol version every diloco peer announces. Peers that announce something
/// else are not diloco peers and are disconnected.
pub const IDENTIFY_PROTOCOL: &str = "/diloco/id/1";

/// Kademlia protocol name of the diloco DHT (separate from the public IPFS DHT).
pub const KAD_PROTOCOL: &str = "/diloco/kad/1";

/// Prefix of the gossip topic of a run's signed averaging envelopes (`<prefix>/<run id>`); the
/// same string as the averaging protocol's id (`diloco_protocol::wire::AVG_PROTOCOL`).
pub const AVG_TOPIC: &str = "/diloco/avg/5";

/// Prefix of the gossip topic of a run's node HELLOs (`<prefix>/<run id>`).
pub const HELLO_TOPIC: &str = "/diloco/hello/1";

/// Most listen addresses taken from one identify message.
pub const MAX_LEARNED_ADDRS: usize = 16;

/// The gossip topic name `prefix/run` (run as hex).
pub fn topic_name(prefix: &str, run: &str) -> String {
    format!("{prefix}/{run}")
}

/// The identify agent string of a training node, carrying its run id: peers compare it at
/// identify time and refuse peers of another run.
pub fn agent_version(run: &str) -> String {
    format!("diloco-node/{} run={run}", env!("CARGO_PKG_VERSION"))
}

/// The run id in a training node's agent string; `None` for anything else (a bootstrap peer,
/// a foreign libp2p node).
pub fn agent_run(agent: &str) -> Option<&str> {
    agent
        .strip_prefix("diloco-node/")?
        .split_whitespace()
        .find_map(|w| w.strip_prefix("run="))
}

/// The diloco DHT in server mode, re-bootstrapping every `bootstrap_every`.
pub fn kademlia(me: PeerId, bootstrap_every: Duration) -> kad::Behaviour<kad::store::MemoryStore> {
    let mut cfg = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
    cfg.set_periodic_bootstrap_interval(Some(bootstrap_every));
    let mut kad = kad::Behaviour::with_config(me, kad::store::MemoryStore::new(me), cfg);
    kad.set_mode(Some(kad::Mode::Server));
    kad
}

/// Whether an identified peer speaks the diloco identify protocol (others are disconnected).
pub fn is_diloco(info: &identify::Info) -> bool {
    info.protocol_version == IDENTIFY_PROTOCOL
}

/// Hands the addresses a peer announced over identify (at most [`MAX_LEARNED_ADDRS`]) to
/// Kademlia, if the peer speaks the diloco DHT.
pub fn learn_addresses(
    kad: &mut kad::Behaviour<kad::store::MemoryStore>,
    peer: &PeerId,
    info: identify::Info,
) {
    if info.protocols.contains(&StreamProtocol::new(KAD_PROTOCOL)) {
        for addr in info.listen_addrs.into_iter().take(MAX_LEARNED_ADDRS) {
            kad.add_address(peer, addr);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_versions_carry_the_run() {
        let a = agent_version("abcd");
        assert_eq!(agent_run(&a), Some("abcd"));
        assert_eq!(agent_run("diloco-bootstrap/0.1.0"), None);
        assert_eq!(agent_run("rust-libp2p/0.1"), None);
    }

    #[test]
    fn topics_are_per_run() {
        assert_eq!(topic_name(HELLO_TOPIC, "ab"), "/diloco/hello/1/ab");
        assert_eq!(topic_name(AVG_TOPIC, "ab"), "/diloco/avg/5/ab");
    }
}
