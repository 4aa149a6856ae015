//! HELLO: a node's public summary, gossiped every second on its run's hello topic, which
//! discovery ([`crate::discovery`]) reads to find a run under way, to found one, and to tell
//! two histories of one run apart.
//!
//! A HELLO is not signed by the protocol key: the gossip layer authenticates its sender, and
//! a receiver drops a HELLO whose `peer` is not that sender. It carries no state, only claims
//! (synced, round, members, founder) that at most make a node try to join a history; joining
//! verifies the state it fetches against a quorum of signed COMMITs.

use bincode::{Decode, Encode};

use super::WireError;

/// Version of the HELLO format.
pub const HELLO_VERSION: u32 = 1;

/// Largest HELLO accepted (bytes).
pub const MAX_HELLO_BYTES: usize = 1024;

const HELLO_CONFIG: bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_HELLO_BYTES>,
> = bincode::config::standard().with_limit::<MAX_HELLO_BYTES>();

/// A node's public summary.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Hello {
    /// [`HELLO_VERSION`].
    pub version: u32,
    /// The sender's ed25519 public key (must be the gossip sender's).
    pub peer: [u8; 32],
    /// Counts up with every HELLO the sender sends.
    pub seq: u64,
    /// Whether the sender holds the run's agreed state.
    pub synced: bool,
    /// The round the sender is in.
    pub round: u64,
    /// Members of that round.
    pub members: u32,
    /// Founder of the sender's history (zeros while it has none).
    pub founder: [u8; 32],
}

impl Hello {
    /// Encodes the HELLO.
    pub fn to_bytes(&self) -> Result<Vec<u8>, WireError> {
        bincode::encode_to_vec(self, HELLO_CONFIG).map_err(|e| WireError::Malformed(e.to_string()))
    }

    /// Decodes a HELLO: exactly one, of this version, at most [`MAX_HELLO_BYTES`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, WireError> {
        if bytes.len() > MAX_HELLO_BYTES {
            return Err(WireError::TooLarge {
                got: bytes.len() as u64,
                max: MAX_HELLO_BYTES,
            });
        }
        let (h, used): (Hello, usize) = bincode::decode_from_slice(bytes, HELLO_CONFIG)
            .map_err(|e| WireError::Malformed(e.to_string()))?;
        if used != bytes.len() {
            return Err(WireError::Trailing(bytes.len() - used));
        }
        if h.version != HELLO_VERSION {
            return Err(WireError::Malformed(format!(
                "HELLO version {}, this node speaks {HELLO_VERSION}",
                h.version
            )));
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hello() -> Hello {
        Hello {
            version: HELLO_VERSION,
            peer: [3; 32],
            seq: 9,
            synced: true,
            round: 4,
            members: 3,
            founder: [1; 32],
        }
    }

    #[test]
    fn hellos_roundtrip_and_garbage_is_refused() {
        let h = hello();
        let b = h.to_bytes().unwrap();
        assert_eq!(Hello::from_bytes(&b).unwrap(), h);
        assert!(Hello::from_bytes(&b[..b.len() - 1]).is_err());
        let mut long = b.clone();
        long.push(0);
        assert!(Hello::from_bytes(&long).is_err());
        assert!(Hello::from_bytes(&[0xff; 2000]).is_err());
        assert!(Hello::from_bytes(&[]).is_err());
        let other = Hello {
            version: HELLO_VERSION + 1,
            ..hello()
        };
        assert!(Hello::from_bytes(&other.to_bytes().unwrap()).is_err());
    }

    proptest! {
        #[test]
        fn any_hello_roundtrips(peer in any::<[u8; 32]>(), founder in any::<[u8; 32]>(),
                                seq in any::<u64>(), synced in any::<bool>(),
                                round in any::<u64>(), members in any::<u32>()) {
            let h = Hello { version: HELLO_VERSION, peer, seq, synced, round, members, founder };
            let b = h.to_bytes().unwrap();
            prop_assert!(b.len() <= MAX_HELLO_BYTES);
            prop_assert_eq!(Hello::from_bytes(&b).unwrap(), h);
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = Hello::from_bytes(&data);
        }
    }
}
