//! Peer ids both ways: a libp2p peer id of an ed25519 key inlines the key, which is also the
//! averaging protocol's id of the peer ([`PeerKey`]), so a transport-authenticated sender is
//! a protocol signer without any lookup.

use diloco_protocol::wire::PeerKey;
use libp2p::PeerId;

/// The protocol key of a libp2p peer id, when it inlines an ed25519 key.
pub fn proto_peer(p: &PeerId) -> Option<PeerKey> {
    let mh = p.as_ref();
    if mh.code() != 0 {
        return None;
    }
    let pk = libp2p::identity::PublicKey::try_decode_protobuf(mh.digest()).ok()?;
    let ed = pk.try_into_ed25519().ok()?;
    Some(PeerKey(ed.to_bytes()))
}

/// The libp2p peer id of a protocol key.
pub fn libp2p_peer(p: &PeerKey) -> Option<PeerId> {
    let ed = libp2p::identity::ed25519::PublicKey::try_from_bytes(&p.0).ok()?;
    Some(libp2p::identity::PublicKey::from(ed).to_peer_id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use diloco_p2p::keys::Identity;
    use ed25519_dalek::SigningKey;

    #[test]
    fn peer_ids_convert_both_ways() {
        let id = Identity::generate();
        let key = SigningKey::from_bytes(&id.secret);
        let p = PeerKey::of(&key);
        assert_eq!(libp2p_peer(&p), Some(id.peer_id()));
        assert_eq!(proto_peer(&id.peer_id()), Some(p));
        // A hashed (non-inline) peer id has no ed25519 key to recover.
        let rsa_like =
            PeerId::from_multihash(libp2p::multihash::Multihash::wrap(0x12, &[7u8; 32]).unwrap())
                .unwrap();
        assert_eq!(proto_peer(&rsa_like), None);
    }
}
