//! Wire format: versioned protocol ids, signed gossip envelopes, direct-stream messages and
//! length-prefixed frames, all bincode 2 (standard config: little endian, varints).
//!
//! Two kinds of traffic:
//!
//! * **Gossip** ([`Envelope`] carrying a [`Body`]): small control messages (READY, CLOSE, AGG,
//!   PREPARE, PROMISE, SEAL, COMMIT, JOIN, EVIDENCE). Each is signed by its sender's ed25519 key
//!   over `(domain, signer, run id, round, chain hash, body)`, so it cannot be replayed into
//!   another run, round or history. Capped at [`MAX_GOSSIP_BYTES`].
//! * **Direct streams** ([`Direct`]): bulk data (shards pushed to their owner, aggregates,
//!   decision proofs, state for joiners). Not signed individually: every payload is checked
//!   against a blake3 hash that a signed gossip message committed to. Capped at
//!   [`MAX_DIRECT_BYTES`].
//!
//! Decoding never trusts a length: frames are refused when the prefix exceeds the cap, and
//! bincode runs with a byte limit equal to the cap, so no allocation exceeds it.
//!
//! [`Verifier`] applies the admission rules: right run, not an old round, known and not
//! banned signer, valid signature.
//!
//! # Layout
//!
//! * `ids`: [`PeerKey`], [`Hash`](struct@Hash), [`Signature`];
//! * `merkle`: [`merkle_root`], [`merkle_proof`], [`merkle_verify`];
//! * `gossip`: the message bodies, [`Body`], [`Envelope`], [`announce`], [`open_announced`];
//! * `direct`: [`Direct`], [`DecisionProof`];
//! * `frame`: the one framing of direct streams, [`FrameDecoder`] and [`frame_header`];
//! * `hello`: [`Hello`], a node's public summary that discovery reads;
//! * `admission`: [`Verifier`], [`conflicting`], [`check_evidence`].
//!
//! This file holds [`WireError`], the version, protocol ids and size caps, and the bincode
//! configurations.

use thiserror::Error;

mod admission;
mod direct;
mod frame;
mod gossip;
mod hello;
mod ids;
mod merkle;

pub use admission::{check_evidence, conflicting, Verifier};
pub use direct::{DecisionProof, Direct};
pub use frame::{frame, frame_header, FrameDecoder, FRAME_HEADER, MAX_PREALLOC};
pub use gossip::{
    announce, open_announced, reconfig_chain, Accept, Agg, Announce, Audit, AuditEntry, Body,
    Certificate, Close, Commit, Contributor, Envelope, Evidence, Invite, Join, Promise, Propose,
    Ready, Reconfig, Seal, SealedShard, INVITE_DOMAIN, MAX_RECONFIGS_PER_ROUND,
};
pub use hello::{Hello, HELLO_VERSION, MAX_HELLO_BYTES};
pub use ids::{Hash, PeerKey, Signature};
pub use merkle::{merkle_proof, merkle_root, merkle_verify};

/// Version of the wire format; bumped on any incompatible change, and part of every id below.
pub const WIRE_VERSION: u32 = 5;
/// Gossip topic / protocol for the signed control messages.
pub const AVG_PROTOCOL: &str = "/diloco/avg/5";
/// Direct request-response protocol for shards and aggregates.
pub const SHARD_PROTOCOL: &str = "/diloco/shard/5";
/// Direct request-response protocol for decision proofs and state sync.
pub const SYNC_PROTOCOL: &str = "/diloco/sync/5";
/// Largest gossip message (gossipsub's default cap).
pub const MAX_GOSSIP_BYTES: usize = 64 * 1024;
/// How many rounds old a JOIN may be and still be accepted.
pub const JOIN_WINDOW: u64 = 8;

/// Largest direct message.
pub const MAX_DIRECT_BYTES: usize = 1024 * 1024 * 1024;
/// Largest signed envelope that travels by announcement: a body whose envelope would exceed
/// [`MAX_GOSSIP_BYTES`] (CLOSE and SEAL above ~500 contributors, PROMISE carrying such a SEAL,
/// EVIDENCE over two of them) is gossiped as a small signed [`Announce`] naming the blake3 hash
/// of the full envelope's bytes, which receivers fetch over a direct stream
/// ([`Direct::FetchEnvelope`] / [`Direct::FullEnvelope`]).
pub const MAX_ANNOUNCED_BYTES: usize = 16 * 1024 * 1024;
/// Domain separator mixed into every signature.
pub const SIGNING_DOMAIN: &[u8] = b"diloco/avg/1/sig";

const GOSSIP_CONFIG: bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_GOSSIP_BYTES>,
> = bincode::config::standard().with_limit::<MAX_GOSSIP_BYTES>();
const ANNOUNCED_CONFIG: bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_ANNOUNCED_BYTES>,
> = bincode::config::standard().with_limit::<MAX_ANNOUNCED_BYTES>();
const DIRECT_CONFIG: bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_DIRECT_BYTES>,
> = bincode::config::standard().with_limit::<MAX_DIRECT_BYTES>();

/// Why a message was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum WireError {
    /// The frame or message is larger than its cap.
    #[error("message of {got} bytes exceeds the cap of {max}")]
    TooLarge {
        /// Announced or actual size.
        got: u64,
        /// The cap.
        max: usize,
    },
    /// Fewer bytes than the frame announces.
    #[error("truncated frame")]
    Truncated,
    /// bincode could not decode the bytes.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// Bytes left over after the message.
    #[error("{0} trailing bytes")]
    Trailing(usize),
    /// The message is for another run.
    #[error("wrong run id")]
    WrongRun,
    /// The message is for a round this peer has already finished (replay).
    #[error("old round {got} (current {current})")]
    OldRound {
        /// The message's round.
        got: u64,
        /// The receiver's round.
        current: u64,
    },
    /// The message is for a round too far in the future.
    #[error("round {got} too far ahead of {current}")]
    FutureRound {
        /// The message's round.
        got: u64,
        /// The receiver's round.
        current: u64,
    },
    /// The signer is not a member and the message is not one a non-member may send.
    #[error("unknown signer {0}")]
    UnknownKey(PeerKey),
    /// The signer was banned on evidence.
    #[error("banned signer {0}")]
    Banned(PeerKey),
    /// The signature does not verify, or the key is not a valid ed25519 point.
    #[error("bad signature from {0}")]
    BadSignature(PeerKey),
    /// Bytes fetched for an announcement do not match its size or hash.
    #[error("announced envelope does not match its hash or size")]
    AnnounceMismatch,
    /// An announced envelope differs from its announcement in signer, run, round or chain, or
    /// is itself an announcement.
    #[error("announced envelope does not belong to its announcement")]
    AnnounceForeign,
}

impl WireError {
    /// A short, stable label of the reason (for metrics labels and log fields).
    pub fn label(&self) -> &'static str {
        match self {
            WireError::TooLarge { .. } => "too_large",
            WireError::Truncated => "truncated",
            WireError::Malformed(_) => "malformed",
            WireError::Trailing(_) => "trailing_bytes",
            WireError::WrongRun => "wrong_run",
            WireError::OldRound { .. } => "old_round",
            WireError::FutureRound { .. } => "future_round",
            WireError::UnknownKey(_) => "unknown_signer",
            WireError::Banned(_) => "banned_signer",
            WireError::BadSignature(_) => "bad_signature",
            WireError::AnnounceMismatch => "announce_mismatch",
            WireError::AnnounceForeign => "announce_foreign",
        }
    }
}

#[cfg(test)]
mod tests;
