//! Pieces of diloco's libp2p layer that need no training stack, shared by the bootstrap peer
//! and `diloco-node`: identity key files ([`keys`]), multiaddr parsing with clear errors
//! ([`addr`]) and the bootstrap peer itself ([`server`]).

pub mod addr;
pub mod keys;
pub mod server;

/// The identify protocol version every diloco peer announces. Peers that announce something
/// else are not diloco peers and are disconnected.
pub const IDENTIFY_PROTOCOL: &str = "/diloco/id/1";

/// Kademlia protocol name of the diloco DHT (separate from the public IPFS DHT).
pub const KAD_PROTOCOL: &str = "/diloco/kad/1";

/// Hands the addresses a peer announced over identify (at most 16) to Kademlia, if the peer
/// speaks the diloco DHT.
pub fn learn_addresses(
    kad: &mut libp2p::kad::Behaviour<libp2p::kad::store::MemoryStore>,
    peer: &libp2p::PeerId,
    info: libp2p::identify::Info,
) {
    if info
        .protocols
        .contains(&libp2p::StreamProtocol::new(KAD_PROTOCOL))
    {
        for addr in info.listen_addrs.into_iter().take(16) {
            kad.add_address(peer, addr);
        }
    }
}
