//! Direct-stream messages ([`Direct`]: shards, aggregates, envelopes, proofs, state) and the
//! [`DecisionProof`] they carry for catch-up.

use bincode::{Decode, Encode};

use super::{Envelope, Hash, WireError, DIRECT_CONFIG, MAX_DIRECT_BYTES};

/// Proof that a round was decided: the SEAL proposal and a quorum of matching COMMITs.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct DecisionProof {
    /// The SEAL envelope.
    pub seal: Envelope,
    /// COMMIT envelopes for that SEAL and ballot.
    pub commits: Vec<Envelope>,
    /// The operator's RECONFIGs that restarted the round before it was decided, in the order
    /// they were applied (each under the chain the previous one made; at most
    /// [`super::MAX_RECONFIGS_PER_ROUND`]); the SEAL and COMMITs are under the last one's
    /// chain. Empty for a round that was not reconfigured.
    pub reconfigs: Vec<Envelope>,
}

/// Messages on direct streams (bulk data, request/response).
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum Direct {
    /// A contributor's encoded shard for its owner, with its Merkle proof against READY.
    PushShard {
        /// Round.
        round: u64,
        /// CLOSE id.
        close: Hash,
        /// Shard index.
        shard: u32,
        /// Codec bytes ([`crate::codec::encode`]).
        data: Vec<u8>,
        /// Merkle proof of `blake3(data)` under the READY's shard root.
        proof: Vec<Hash>,
    },
    /// A backup owner asks a contributor for its shard.
    PullShard {
        /// Round.
        round: u64,
        /// CLOSE id.
        close: Hash,
        /// Shard index.
        shard: u32,
    },
    /// Ask for the payload named by `hash` (an aggregate).
    Fetch {
        /// Round.
        round: u64,
        /// blake3 of the payload.
        hash: Hash,
    },
    /// A payload, answering [`Direct::Fetch`].
    Data {
        /// Round.
        round: u64,
        /// blake3 of `data`.
        hash: Hash,
        /// Codec bytes.
        data: Vec<u8>,
    },
    /// Ask for decision proofs of rounds `from..`.
    SyncRequest {
        /// First round wanted.
        from: u64,
    },
    /// Decision proofs, in round order.
    SyncProofs(Vec<DecisionProof>),
    /// Ask for the full state (joiners, restarted peers too far behind).
    StateRequest,
    /// Full state at the start of `round` (verified against COMMIT state hashes in `proof`).
    State {
        /// The round this state starts.
        round: u64,
        /// Proof that round `round - 1` decided to this state.
        proof: Box<DecisionProof>,
        /// theta_g, codec F32.
        theta: Vec<u8>,
        /// Outer momentum, codec F32.
        momentum: Vec<u8>,
    },
    /// The peer does not have what was asked.
    NotFound,
    /// Ask for an announced envelope by the hash in its [`Announce`](super::Announce).
    FetchEnvelope {
        /// Round of the announcement.
        round: u64,
        /// [`Announce::hash`](super::Announce::hash).
        hash: Hash,
    },
    /// An announced envelope's bytes ([`Envelope::to_full_bytes`]), answering
    /// [`Direct::FetchEnvelope`]; checked with [`open_announced`](super::open_announced).
    FullEnvelope {
        /// Round of the announcement.
        round: u64,
        /// The envelope's bytes.
        bytes: Vec<u8>,
    },
}

impl Direct {
    /// Encodes for a direct stream.
    pub fn to_bytes(&self) -> Result<Vec<u8>, WireError> {
        let bytes = bincode::encode_to_vec(self, DIRECT_CONFIG)
            .map_err(|e| WireError::Malformed(e.to_string()))?;
        if bytes.len() > MAX_DIRECT_BYTES {
            return Err(WireError::TooLarge {
                got: bytes.len() as u64,
                max: MAX_DIRECT_BYTES,
            });
        }
        Ok(bytes)
    }

    /// Decodes a direct message of at most [`MAX_DIRECT_BYTES`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, WireError> {
        if bytes.len() > MAX_DIRECT_BYTES {
            return Err(WireError::TooLarge {
                got: bytes.len() as u64,
                max: MAX_DIRECT_BYTES,
            });
        }
        let (msg, used): (Direct, usize) = bincode::decode_from_slice(bytes, DIRECT_CONFIG)
            .map_err(|e| WireError::Malformed(e.to_string()))?;
        if used != bytes.len() {
            return Err(WireError::Trailing(bytes.len() - used));
        }
        Ok(msg)
    }
}
