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

use std::collections::BTreeSet;

use bincode::{Decode, Encode};
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use thiserror::Error;

/// Version of the wire format; bumped on any incompatible change, and part of every id below.
pub const WIRE_VERSION: u32 = 1;
/// Gossip topic / protocol for the signed control messages.
pub const AVG_PROTOCOL: &str = "/diloco/avg/1";
/// Direct request-response protocol for shards and aggregates.
pub const SHARD_PROTOCOL: &str = "/diloco/shard/1";
/// Direct request-response protocol for decision proofs and state sync.
pub const SYNC_PROTOCOL: &str = "/diloco/sync/1";
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
    UnknownKey(PeerId),
    /// The signer was banned on evidence.
    #[error("banned signer {0}")]
    Banned(PeerId),
    /// The signature does not verify, or the key is not a valid ed25519 point.
    #[error("bad signature from {0}")]
    BadSignature(PeerId),
    /// Bytes fetched for an announcement do not match its size or hash.
    #[error("announced envelope does not match its hash or size")]
    AnnounceMismatch,
    /// An announced envelope differs from its announcement in signer, run, round or chain, or
    /// is itself an announcement.
    #[error("announced envelope does not belong to its announcement")]
    AnnounceForeign,
}

/// A peer's identity: its ed25519 public key (the key inside its libp2p peer id).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Encode, Decode)]
pub struct PeerId(pub [u8; 32]);

impl PeerId {
    /// The peer id of a signing key.
    pub fn of(key: &SigningKey) -> Self {
        PeerId(key.verifying_key().to_bytes())
    }
}

impl std::fmt::Display for PeerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in &self.0[..4] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for PeerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PeerId({self})")
    }
}

/// A blake3 hash: names payloads, messages, states and histories.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Encode, Decode)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    /// blake3 of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Hash(*blake3::hash(bytes).as_bytes())
    }

    /// blake3 of the concatenation of `parts`.
    pub fn of_parts(parts: &[&[u8]]) -> Self {
        let mut h = blake3::Hasher::new();
        for p in parts {
            h.update(p);
        }
        Hash(*h.finalize().as_bytes())
    }
}

impl std::fmt::Debug for Hash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Hash(")?;
        for b in &self.0[..6] {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

/// blake3 Merkle root over leaf hashes (the tree is padded to a power of two with zero hashes).
pub fn merkle_root(leaves: &[Hash]) -> Hash {
    let mut level: Vec<Hash> = leaves.to_vec();
    if level.is_empty() {
        return Hash::default();
    }
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|p| Hash::of_parts(&[&p[0].0, &p.get(1).copied().unwrap_or_default().0]))
            .collect();
    }
    level[0]
}

/// Sibling hashes from leaf `index` up to the root.
pub fn merkle_proof(leaves: &[Hash], index: usize) -> Vec<Hash> {
    let mut proof = Vec::new();
    let mut level: Vec<Hash> = leaves.to_vec();
    let mut i = index;
    while level.len() > 1 {
        proof.push(level.get(i ^ 1).copied().unwrap_or_default());
        level = level
            .chunks(2)
            .map(|p| Hash::of_parts(&[&p[0].0, &p.get(1).copied().unwrap_or_default().0]))
            .collect();
        i /= 2;
    }
    proof
}

/// Checks that `leaf` sits at `index` under `root`. Proofs longer than 64 levels are refused.
pub fn merkle_verify(root: Hash, leaf: Hash, index: usize, proof: &[Hash]) -> bool {
    if proof.len() > 64 || (proof.len() < 64 && index >> proof.len() != 0) {
        return false;
    }
    let mut h = leaf;
    for (level, sib) in proof.iter().enumerate() {
        h = if (index >> level) & 1 == 0 {
            Hash::of_parts(&[&h.0, &sib.0])
        } else {
            Hash::of_parts(&[&sib.0, &h.0])
        };
    }
    h == root
}

/// An ed25519 signature.
#[derive(Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct Signature(pub [u8; 64]);

impl std::fmt::Debug for Signature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signature({:02x}{:02x}..)", self.0[0], self.0[1])
    }
}

/// READY: "I finished training for this round; here is what I will contribute."
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Ready {
    /// Tokens processed this round (the weight; capped by the run config on use).
    pub tokens: u64,
    /// Merkle root over the blake3 hashes of the encoded shards.
    pub shard_root: Hash,
    /// L2 norm of the outer gradient, as f32 bits (for screening).
    pub norm_bits: u32,
    /// Whether this peer accepts inbound streams and can own shards.
    pub can_serve: bool,
}

/// One contributor as listed by CLOSE.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Contributor {
    /// The contributor.
    pub peer: PeerId,
    /// Id of its READY envelope.
    pub ready: Hash,
    /// Its READY.
    pub info: Ready,
}

/// CLOSE: the attempt leader fixes the contributor set (sorted by peer id).
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Close {
    /// The attempt (= Paxos ballot) this CLOSE belongs to.
    pub ballot: u32,
    /// Contributors, sorted by peer id, no duplicates.
    pub contributors: Vec<Contributor>,
}

/// AGG: a shard owner's aggregate for one shard of one CLOSE.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Agg {
    /// Id of the CLOSE envelope.
    pub close: Hash,
    /// Shard index.
    pub shard: u32,
    /// Bitmap over the CLOSE's contributor list: who is included.
    pub included: Vec<u8>,
    /// blake3 of the encoded aggregate.
    pub data: Hash,
    /// Sum of the included weights.
    pub weight: u64,
}

/// One shard's entry in a SEAL.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct SealedShard {
    /// Owner who produced the aggregate.
    pub owner: PeerId,
    /// blake3 of the encoded aggregate.
    pub data: Hash,
    /// Bitmap over the contributors: who is included.
    pub included: Vec<u8>,
    /// Sum of the included weights.
    pub weight: u64,
}

/// SEAL: the one value a round decides.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Seal {
    /// The CLOSE the aggregates belong to (embedded, so the SEAL is self-contained).
    pub close: Close,
    /// Id of the CLOSE envelope.
    pub close_id: Hash,
    /// One entry per shard; `None` = MISSING (those coordinates do not move this round).
    pub shards: Vec<Option<SealedShard>>,
    /// Members of the next round, sorted.
    pub next_members: Vec<PeerId>,
}

impl Seal {
    /// Content hash of the SEAL (independent of the ballot that proposes it). Hashes the full
    /// encoding whatever its size (a SEAL above the gossip cap is announced, not truncated).
    pub fn hash(&self) -> Hash {
        Hash::of(&bincode::encode_to_vec(self, ANNOUNCED_CONFIG).unwrap_or_default())
    }
}

/// A proposal of a SEAL under a ballot (Paxos "accept" request).
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Propose {
    /// Ballot (attempt number).
    pub ballot: u32,
    /// The proposed SEAL.
    pub seal: Seal,
}

/// PROMISE: answer to PREPARE.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Promise {
    /// The ballot promised.
    pub ballot: u32,
    /// The highest-ballot proposal this peer accepted in this round, if any.
    pub accepted: Option<Propose>,
}

/// COMMIT: "I applied this SEAL under this ballot; here is my state" (Paxos "accepted").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct Commit {
    /// The ballot accepted.
    pub ballot: u32,
    /// Hash of the SEAL.
    pub seal: Hash,
    /// Chain hash after this round.
    pub next_chain: Hash,
    /// blake3 over theta_g and the outer momentum after the step.
    pub state: Hash,
}

/// Signed proof that a peer signed two conflicting messages.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Evidence {
    /// First message.
    pub a: Box<Envelope>,
    /// Second, conflicting message.
    pub b: Box<Envelope>,
}

/// ANNOUNCE: "I signed an envelope too large for gossip; fetch it from me (or anyone who has
/// it) by this hash". Signed like every envelope, with the same run, round and chain as the
/// envelope it names, so it passes the same admission rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct Announce {
    /// [`Body::tag`] of the announced body (for logs; the fetched envelope is authoritative).
    pub kind: u8,
    /// blake3 of the full envelope's bincode bytes ([`Envelope::to_full_bytes`]).
    pub hash: Hash,
    /// Length of those bytes; at most [`MAX_ANNOUNCED_BYTES`].
    pub size: u64,
}

/// A gossip message body.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum Body {
    /// Training done; contribution announced.
    Ready(Ready),
    /// Contributor set fixed.
    Close(Close),
    /// Aggregate for one shard.
    Agg(Agg),
    /// Ballot phase 1a.
    Prepare(u32),
    /// Ballot phase 1b.
    Promise(Promise),
    /// Ballot phase 2a: proposal of a SEAL.
    Seal(Propose),
    /// Ballot phase 2b with state hash.
    Commit(Commit),
    /// A synced non-member asks to become a member.
    Join,
    /// Equivocation evidence.
    Evidence(Evidence),
    /// A body too large for gossip, announced by the hash of its envelope.
    Announce(Announce),
    /// Random-projection audit of a contributor's shards against the owners' aggregates.
    Audit(Audit),
}

/// One audited aggregate in an [`Audit`].
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct AuditEntry {
    /// Shard index.
    pub shard: u32,
    /// blake3 of the aggregate (the AGG's `data`); the projection seed derives from it.
    pub agg: Hash,
    /// Projections of the contributor's decoded shard onto the seeded directions (f64 bits).
    pub proj: Vec<u64>,
}

/// AUDIT: a contributor's projections of its own shards onto directions seeded by each AGG it
/// is included in (fixed only once the owner committed to the aggregate's hash).
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Audit {
    /// Id of the CLOSE envelope.
    pub close: Hash,
    /// One entry per audited aggregate.
    pub entries: Vec<AuditEntry>,
}

impl Body {
    /// Short name for logs and rejection reasons.
    pub fn kind(&self) -> &'static str {
        match self {
            Body::Ready(_) => "READY",
            Body::Close(_) => "CLOSE",
            Body::Agg(_) => "AGG",
            Body::Prepare(_) => "PREPARE",
            Body::Promise(_) => "PROMISE",
            Body::Seal(_) => "SEAL",
            Body::Commit(_) => "COMMIT",
            Body::Join => "JOIN",
            Body::Evidence(_) => "EVIDENCE",
            Body::Announce(_) => "ANNOUNCE",
            Body::Audit(_) => "AUDIT",
        }
    }

    /// Whether sending this body casts a Paxos vote that must be made durable first (see
    /// `State::set_vote_from`): PROMISE and COMMIT, and an ANNOUNCE of either (a PROMISE
    /// carrying a SEAL over the gossip cap goes out as an ANNOUNCE).
    pub fn is_vote(&self) -> bool {
        match self {
            Body::Promise(_) | Body::Commit(_) => true,
            Body::Announce(a) => a.kind == 4 || a.kind == 6,
            _ => false,
        }
    }

    /// A small number per body kind (used in [`Announce::kind`]).
    pub fn tag(&self) -> u8 {
        match self {
            Body::Ready(_) => 0,
            Body::Close(_) => 1,
            Body::Agg(_) => 2,
            Body::Prepare(_) => 3,
            Body::Promise(_) => 4,
            Body::Seal(_) => 5,
            Body::Commit(_) => 6,
            Body::Join => 7,
            Body::Evidence(_) => 8,
            Body::Announce(_) => 9,
            Body::Audit(_) => 10,
        }
    }
}

/// A signed gossip message.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Envelope {
    /// Wire version ([`WIRE_VERSION`]).
    pub version: u32,
    /// Signer (its public key).
    pub signer: PeerId,
    /// Run id.
    pub run: Hash,
    /// Round.
    pub round: u64,
    /// Chain hash the signer holds for the start of this round.
    pub chain: Hash,
    /// The message.
    pub body: Body,
    /// ed25519 signature over [`Envelope::signing_bytes`].
    pub sig: Signature,
}

impl Envelope {
    /// Bytes covered by the signature.
    pub fn signing_bytes(
        signer: &PeerId,
        run: &Hash,
        round: u64,
        chain: &Hash,
        body: &Body,
    ) -> Vec<u8> {
        let mut out = SIGNING_DOMAIN.to_vec();
        // Encoding into a Vec cannot fail for these types; an empty body would only make the
        // signature fail to verify, never pass.
        let content = bincode::encode_to_vec(
            (WIRE_VERSION, signer, run, round, chain, body),
            GOSSIP_CONFIG,
        )
        .unwrap_or_default();
        out.extend_from_slice(&content);
        out
    }

    /// Signs `body` for `(run, round, chain)` with `key`.
    pub fn sign(key: &SigningKey, run: Hash, round: u64, chain: Hash, body: Body) -> Self {
        let signer = PeerId::of(key);
        let sig = key.sign(&Self::signing_bytes(&signer, &run, round, &chain, &body));
        Envelope {
            version: WIRE_VERSION,
            signer,
            run,
            round,
            chain,
            body,
            sig: Signature(sig.to_bytes()),
        }
    }

    /// Message id: blake3 of the signed content (not of the signature, which could be
    /// malleated).
    pub fn id(&self) -> Hash {
        Hash::of(&Self::signing_bytes(
            &self.signer,
            &self.run,
            self.round,
            &self.chain,
            &self.body,
        ))
    }

    /// Whether the signature verifies under the signer's key (strict ed25519 verification).
    pub fn verify_signature(&self) -> bool {
        if self.version != WIRE_VERSION {
            return false;
        }
        let Ok(key) = VerifyingKey::from_bytes(&self.signer.0) else {
            return false;
        };
        let sig = ed25519_dalek::Signature::from_bytes(&self.sig.0);
        let msg = Self::signing_bytes(&self.signer, &self.run, self.round, &self.chain, &self.body);
        key.verify_strict(&msg, &sig).is_ok()
    }

    /// Encodes for gossip.
    pub fn to_bytes(&self) -> Result<Vec<u8>, WireError> {
        encode_gossip(self)
    }

    /// Decodes a gossip message of at most [`MAX_GOSSIP_BYTES`]; does not check the signature.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, WireError> {
        if bytes.len() > MAX_GOSSIP_BYTES {
            return Err(WireError::TooLarge {
                got: bytes.len() as u64,
                max: MAX_GOSSIP_BYTES,
            });
        }
        let (env, used): (Envelope, usize) = bincode::decode_from_slice(bytes, GOSSIP_CONFIG)
            .map_err(|e| WireError::Malformed(e.to_string()))?;
        if used != bytes.len() {
            return Err(WireError::Trailing(bytes.len() - used));
        }
        Ok(env)
    }
}

impl Envelope {
    /// Encodes an envelope of any size up to [`MAX_ANNOUNCED_BYTES`] (for announcement and
    /// direct transfer; [`Envelope::to_bytes`] is the gossip encoding and refuses what exceeds
    /// [`MAX_GOSSIP_BYTES`]). The bytes are the same as the gossip encoding.
    pub fn to_full_bytes(&self) -> Result<Vec<u8>, WireError> {
        let bytes = bincode::encode_to_vec(self, ANNOUNCED_CONFIG)
            .map_err(|e| WireError::Malformed(e.to_string()))?;
        if bytes.len() > MAX_ANNOUNCED_BYTES {
            return Err(WireError::TooLarge {
                got: bytes.len() as u64,
                max: MAX_ANNOUNCED_BYTES,
            });
        }
        Ok(bytes)
    }

    /// Decodes an envelope of at most [`MAX_ANNOUNCED_BYTES`]; does not check the signature.
    pub fn from_full_bytes(bytes: &[u8]) -> Result<Self, WireError> {
        if bytes.len() > MAX_ANNOUNCED_BYTES {
            return Err(WireError::TooLarge {
                got: bytes.len() as u64,
                max: MAX_ANNOUNCED_BYTES,
            });
        }
        let (env, used): (Envelope, usize) = bincode::decode_from_slice(bytes, ANNOUNCED_CONFIG)
            .map_err(|e| WireError::Malformed(e.to_string()))?;
        if used != bytes.len() {
            return Err(WireError::Trailing(bytes.len() - used));
        }
        Ok(env)
    }

    /// Whether the gossip encoding of this envelope is at most `limit` (and [`MAX_GOSSIP_BYTES`]).
    pub fn fits_gossip(&self, limit: usize) -> bool {
        self.to_bytes()
            .is_ok_and(|b| b.len() <= limit.min(MAX_GOSSIP_BYTES))
    }
}

/// Makes the announcement for `full` (an envelope signed by `key`): returns the ANNOUNCE
/// envelope, to gossip, and the full bytes, to serve on [`Direct::FetchEnvelope`].
pub fn announce(key: &SigningKey, full: &Envelope) -> Result<(Envelope, Vec<u8>), WireError> {
    let bytes = full.to_full_bytes()?;
    let ann = Announce {
        kind: full.body.tag(),
        hash: Hash::of(&bytes),
        size: bytes.len() as u64,
    };
    let env = Envelope::sign(key, full.run, full.round, full.chain, Body::Announce(ann));
    Ok((env, bytes))
}

/// Opens fetched bytes against their (admitted) announcement: checks the size and hash before
/// decoding, then that the envelope has the announcement's signer, run, round and chain, is not
/// itself an announcement, and carries a valid signature.
pub fn open_announced(ann: &Envelope, bytes: &[u8]) -> Result<Envelope, WireError> {
    let Body::Announce(a) = &ann.body else {
        return Err(WireError::AnnounceForeign);
    };
    if a.size != bytes.len() as u64 || Hash::of(bytes) != a.hash {
        return Err(WireError::AnnounceMismatch);
    }
    let env = Envelope::from_full_bytes(bytes)?;
    if env.signer != ann.signer
        || env.run != ann.run
        || env.round != ann.round
        || env.chain != ann.chain
        || matches!(env.body, Body::Announce(_))
    {
        return Err(WireError::AnnounceForeign);
    }
    if !env.verify_signature() {
        return Err(WireError::BadSignature(env.signer));
    }
    Ok(env)
}

fn encode_gossip<T: Encode>(v: &T) -> Result<Vec<u8>, WireError> {
    let bytes = bincode::encode_to_vec(v, GOSSIP_CONFIG)
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    if bytes.len() > MAX_GOSSIP_BYTES {
        return Err(WireError::TooLarge {
            got: bytes.len() as u64,
            max: MAX_GOSSIP_BYTES,
        });
    }
    Ok(bytes)
}

/// Proof that a round was decided: the SEAL proposal and a quorum of matching COMMITs.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct DecisionProof {
    /// The SEAL envelope.
    pub seal: Envelope,
    /// COMMIT envelopes for that SEAL and ballot.
    pub commits: Vec<Envelope>,
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
    /// Ask for an announced envelope by the hash in its [`Announce`].
    FetchEnvelope {
        /// Round of the announcement.
        round: u64,
        /// [`Announce::hash`].
        hash: Hash,
    },
    /// An announced envelope's bytes ([`Envelope::to_full_bytes`]), answering
    /// [`Direct::FetchEnvelope`]; checked with [`open_announced`].
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

/// Frames a payload: u32 little-endian length, then the bytes.
pub fn frame(payload: &[u8]) -> Result<Vec<u8>, WireError> {
    let len = u32::try_from(payload.len()).map_err(|_| WireError::TooLarge {
        got: payload.len() as u64,
        max: u32::MAX as usize,
    })?;
    let mut out = Vec::with_capacity(4 + payload.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// Reads the length prefix of a frame and checks it against `max` before anything is
/// allocated. Returns `Ok(None)` when fewer than 4 bytes are available.
pub fn frame_len(prefix: &[u8], max: usize) -> Result<Option<usize>, WireError> {
    let Some(p) = prefix.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_le_bytes([p[0], p[1], p[2], p[3]]) as usize;
    if len > max {
        return Err(WireError::TooLarge {
            got: len as u64,
            max,
        });
    }
    Ok(Some(len))
}

/// Splits one frame off the front of `buf`: `Ok(Some((payload, consumed)))`, `Ok(None)` if the
/// frame is incomplete, `Err` if the prefix exceeds `max`.
pub fn unframe(buf: &[u8], max: usize) -> Result<Option<(&[u8], usize)>, WireError> {
    let Some(len) = frame_len(buf, max)? else {
        return Ok(None);
    };
    match buf.get(4..4 + len) {
        Some(p) => Ok(Some((p, 4 + len))),
        None => Ok(None),
    }
}

/// Admission rules for gossip envelopes.
#[derive(Debug, Clone)]
pub struct Verifier {
    /// This run's id.
    pub run: Hash,
    /// Keys banned on evidence.
    pub banned: BTreeSet<PeerId>,
    /// How many rounds ahead of the receiver a message may be (it is then a cue to sync).
    pub max_ahead: u64,
}

impl Verifier {
    /// A verifier for `run`.
    pub fn new(run: Hash) -> Self {
        Self {
            run,
            banned: BTreeSet::new(),
            max_ahead: 1_000_000,
        }
    }

    /// Checks run, round, signer and signature. `members` is the receiver's member list for
    /// `current` (sorted); JOIN is the one body a non-member may sign, and messages for future
    /// rounds are checked for signature only (the receiver is behind and will sync).
    pub fn check(
        &self,
        env: &Envelope,
        current: u64,
        members: &[PeerId],
        verify_sig: impl FnOnce(&Envelope) -> bool,
    ) -> Result<(), WireError> {
        if env.run != self.run {
            return Err(WireError::WrongRun);
        }
        // A JOIN only asks to be listed in a coming SEAL, so one from the last few rounds is
        // still good: a joiner that follows the group a round or two behind (its state
        // transfer and catch-up take time while the group moves on) still gets in.
        let recent_join =
            matches!(env.body, Body::Join) && env.round.saturating_add(JOIN_WINDOW) >= current;
        if env.round < current && !recent_join {
            return Err(WireError::OldRound {
                got: env.round,
                current,
            });
        }
        if env.round > current.saturating_add(self.max_ahead) {
            return Err(WireError::FutureRound {
                got: env.round,
                current,
            });
        }
        if self.banned.contains(&env.signer) {
            return Err(WireError::Banned(env.signer));
        }
        let may_be_outsider =
            matches!(env.body, Body::Join | Body::Evidence(_)) || env.round > current;
        if !may_be_outsider && members.binary_search(&env.signer).is_err() {
            return Err(WireError::UnknownKey(env.signer));
        }
        if !verify_sig(env) {
            return Err(WireError::BadSignature(env.signer));
        }
        Ok(())
    }
}

/// Whether two envelopes from one signer conflict (equivocation): same run, round and kind
/// (for AGG: same CLOSE and shard; for SEAL and PROMISE: same ballot; for CLOSE: same ballot)
/// with different content. Both must carry valid signatures for this to count as evidence.
pub fn conflicting(a: &Envelope, b: &Envelope) -> bool {
    if a.signer != b.signer || a.run != b.run || a.round != b.round || a.body == b.body {
        return false;
    }
    match (&a.body, &b.body) {
        (Body::Ready(_), Body::Ready(_)) => true,
        (Body::Close(x), Body::Close(y)) => x.ballot == y.ballot,
        (Body::Agg(x), Body::Agg(y)) => x.close == y.close && x.shard == y.shard,
        (Body::Seal(x), Body::Seal(y)) => x.ballot == y.ballot,
        (Body::Commit(x), Body::Commit(y)) => x.ballot == y.ballot,
        _ => false,
    }
}

/// Checks evidence: two validly signed conflicting envelopes by one signer.
pub fn check_evidence(e: &Evidence) -> Option<PeerId> {
    (conflicting(&e.a, &e.b) && e.a.verify_signature() && e.b.verify_signature())
        .then_some(e.a.signer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(i: u8) -> SigningKey {
        SigningKey::from_bytes(&[i; 32])
    }

    fn ready(tokens: u64) -> Body {
        Body::Ready(Ready {
            tokens,
            shard_root: Hash::of(b"x"),
            norm_bits: 1.5f32.to_bits(),
            can_serve: true,
        })
    }

    fn sample_bodies() -> Vec<Body> {
        let close = Close {
            ballot: 2,
            contributors: vec![Contributor {
                peer: PeerId::of(&key(1)),
                ready: Hash::of(b"r"),
                info: Ready {
                    tokens: 5,
                    shard_root: Hash::of(b"s"),
                    norm_bits: 0,
                    can_serve: false,
                },
            }],
        };
        let seal = Seal {
            close: close.clone(),
            close_id: Hash::of(b"c"),
            shards: vec![
                None,
                Some(SealedShard {
                    owner: PeerId::of(&key(2)),
                    data: Hash::of(b"d"),
                    included: vec![1],
                    weight: 5,
                }),
            ],
            next_members: vec![PeerId::of(&key(1))],
        };
        vec![
            ready(7),
            Body::Close(close),
            Body::Agg(Agg {
                close: Hash::of(b"c"),
                shard: 3,
                included: vec![0xff],
                data: Hash::of(b"a"),
                weight: 9,
            }),
            Body::Prepare(4),
            Body::Promise(Promise {
                ballot: 4,
                accepted: Some(Propose {
                    ballot: 1,
                    seal: seal.clone(),
                }),
            }),
            Body::Seal(Propose { ballot: 0, seal }),
            Body::Commit(Commit {
                ballot: 0,
                seal: Hash::of(b"s"),
                next_chain: Hash::of(b"n"),
                state: Hash::of(b"t"),
            }),
            Body::Join,
        ]
    }

    #[test]
    fn protocol_ids_carry_the_version() {
        for id in [AVG_PROTOCOL, SHARD_PROTOCOL, SYNC_PROTOCOL] {
            assert!(
                id.starts_with("/diloco/") && id.ends_with(&format!("/{WIRE_VERSION}")),
                "{id}"
            );
        }
    }

    #[test]
    fn every_body_roundtrips_signed() {
        let run = Hash::of(b"run");
        for body in sample_bodies() {
            let env = Envelope::sign(&key(1), run, 3, Hash::of(b"chain"), body);
            assert!(env.verify_signature());
            let bytes = env.to_bytes().unwrap();
            assert_eq!(Envelope::from_bytes(&bytes).unwrap(), env);
            let framed = frame(&bytes).unwrap();
            let (payload, used) = unframe(&framed, MAX_GOSSIP_BYTES).unwrap().unwrap();
            assert_eq!((payload, used), (&bytes[..], framed.len()));
        }
    }

    #[test]
    fn admission_rules() {
        let run = Hash::of(b"run");
        let members = vec![PeerId::of(&key(1))];
        let v = Verifier::new(run);
        let env = Envelope::sign(&key(1), run, 5, Hash::default(), ready(1));
        let check =
            |v: &Verifier, e: &Envelope, cur| v.check(e, cur, &members, Envelope::verify_signature);
        assert_eq!(check(&v, &env, 5), Ok(()));
        assert_eq!(
            check(&v, &env, 6),
            Err(WireError::OldRound { got: 5, current: 6 })
        );
        let other = Envelope::sign(&key(1), Hash::of(b"other"), 5, Hash::default(), ready(1));
        assert_eq!(check(&v, &other, 5), Err(WireError::WrongRun));
        let stranger = Envelope::sign(&key(9), run, 5, Hash::default(), ready(1));
        assert_eq!(
            check(&v, &stranger, 5),
            Err(WireError::UnknownKey(PeerId::of(&key(9))))
        );
        let join = Envelope::sign(&key(9), run, 5, Hash::default(), Body::Join);
        assert_eq!(check(&v, &join, 5), Ok(()));
        let mut forged = env.clone();
        forged.body = ready(1_000_000);
        assert_eq!(
            check(&v, &forged, 5),
            Err(WireError::BadSignature(PeerId::of(&key(1))))
        );
        let mut moved = env.clone();
        moved.round = 6; // replay into another round
        assert_eq!(
            check(&v, &moved, 6),
            Err(WireError::BadSignature(PeerId::of(&key(1))))
        );
        let mut rechained = env.clone();
        rechained.chain = Hash::of(b"fork");
        assert!(!rechained.verify_signature());
        let mut banned = v.clone();
        banned.banned.insert(PeerId::of(&key(1)));
        assert_eq!(
            check(&banned, &env, 5),
            Err(WireError::Banned(PeerId::of(&key(1))))
        );
    }

    #[test]
    fn equivocation_is_evidence() {
        let run = Hash::of(b"run");
        let a = Envelope::sign(&key(1), run, 2, Hash::default(), ready(1));
        let b = Envelope::sign(&key(1), run, 2, Hash::default(), ready(2));
        let ev = Evidence {
            a: Box::new(a.clone()),
            b: Box::new(b.clone()),
        };
        assert_eq!(check_evidence(&ev), Some(PeerId::of(&key(1))));
        assert_eq!(
            check_evidence(&Evidence {
                a: Box::new(a.clone()),
                b: Box::new(a.clone())
            }),
            None
        );
        let c = Envelope::sign(&key(2), run, 2, Hash::default(), ready(2));
        assert_eq!(
            check_evidence(&Evidence {
                a: Box::new(a.clone()),
                b: Box::new(c)
            }),
            None
        );
        let mut forged = b.clone();
        forged.sig.0[0] ^= 1;
        assert_eq!(
            check_evidence(&Evidence {
                a: Box::new(a),
                b: Box::new(forged)
            }),
            None
        );
    }

    fn big_close(n: usize) -> Close {
        let mut contributors: Vec<Contributor> = (0..n as u32)
            .map(|i| Contributor {
                peer: PeerId(Hash::of(&i.to_le_bytes()).0),
                ready: Hash::of(&[i.to_le_bytes(), [1; 4]].concat()),
                info: Ready {
                    tokens: 4096 + u64::from(i),
                    shard_root: Hash::of(&[i.to_le_bytes(), [2; 4]].concat()),
                    norm_bits: (0.5f32 + i as f32).to_bits(),
                    can_serve: i % 3 != 0,
                },
            })
            .collect();
        contributors.sort_by_key(|c| c.peer);
        Close {
            ballot: 0,
            contributors,
        }
    }

    #[test]
    fn close_and_seal_with_1000_contributors_travel_by_announcement() {
        let run = Hash::of(b"run");
        let k7 = key(7);
        let close = big_close(1000);
        let members: Vec<PeerId> = close.contributors.iter().map(|c| c.peer).collect();
        let seal = Seal {
            close: close.clone(),
            close_id: Hash::of(b"close"),
            shards: (0..256u32)
                .map(|s| {
                    Some(SealedShard {
                        owner: members[s as usize],
                        data: Hash::of(&s.to_le_bytes()),
                        included: vec![0xff; 1000usize.div_ceil(8)],
                        weight: 4_000_000,
                    })
                })
                .collect(),
            next_members: members,
        };
        for body in [Body::Close(close), Body::Seal(Propose { ballot: 3, seal })] {
            let full = Envelope::sign(&k7, run, 9, Hash::of(b"chain"), body);
            // Too large for gossip, as it was before announcements.
            assert!(matches!(full.to_bytes(), Err(WireError::TooLarge { .. })));
            assert!(!full.fits_gossip(MAX_GOSSIP_BYTES));
            let (ann, bytes) = announce(&k7, &full).unwrap();
            assert!(bytes.len() > MAX_GOSSIP_BYTES && bytes.len() <= MAX_ANNOUNCED_BYTES);
            // The announcement is small and admissible like any envelope.
            let ann_bytes = ann.to_bytes().unwrap();
            assert!(ann_bytes.len() < 512, "{}", ann_bytes.len());
            let ann = Envelope::from_bytes(&ann_bytes).unwrap();
            assert!(ann.verify_signature());
            // The full envelope rides a direct stream.
            let reply = Direct::FullEnvelope { round: 9, bytes }.to_bytes().unwrap();
            assert!(reply.len() <= MAX_DIRECT_BYTES);
            let Direct::FullEnvelope { bytes, .. } = Direct::from_bytes(&reply).unwrap() else {
                panic!("variant")
            };
            assert_eq!(open_announced(&ann, &bytes).unwrap(), full);
            // Tampering with the bytes, the size or the signer is caught.
            let mut bad = bytes.clone();
            let last = bad.len() - 1;
            bad[last] ^= 1;
            assert_eq!(open_announced(&ann, &bad), Err(WireError::AnnounceMismatch));
            assert_eq!(
                open_announced(&ann, &bytes[..bytes.len() - 1]),
                Err(WireError::AnnounceMismatch)
            );
            let (other_ann, _) = announce(
                &key(8),
                &Envelope::sign(&key(8), run, 9, Hash::of(b"chain"), full.body.clone()),
            )
            .unwrap();
            assert!(open_announced(&other_ann, &bytes).is_err());
            // A forged signature inside correctly hashed bytes is caught too.
            let mut forged = full.clone();
            forged.sig.0[0] ^= 1;
            let (ann2, bytes2) = announce(&k7, &forged).unwrap();
            assert_eq!(
                open_announced(&ann2, &bytes2),
                Err(WireError::BadSignature(PeerId::of(&k7)))
            );
        }
    }

    #[test]
    fn seal_hash_covers_large_seals() {
        let a = Seal {
            close: big_close(1000),
            close_id: Hash::of(b"c"),
            shards: vec![None],
            next_members: vec![],
        };
        let mut b = a.clone();
        b.close_id = Hash::of(b"d");
        assert_ne!(a.hash(), b.hash());
        assert_ne!(a.hash(), Hash::of(&[]));
    }

    #[test]
    fn frame_prefix_is_checked_before_allocation() {
        let mut bytes = (u32::MAX).to_le_bytes().to_vec();
        bytes.extend_from_slice(&[0; 8]);
        assert!(matches!(
            unframe(&bytes, 1024),
            Err(WireError::TooLarge { .. })
        ));
        assert_eq!(unframe(&[1, 0], 1024), Ok(None));
        assert_eq!(unframe(&[3, 0, 0, 0, 1], 1024), Ok(None));
    }

    #[test]
    fn huge_vec_claim_is_refused() {
        // A PushShard claiming a 2^40-byte data vector in a few bytes.
        let mut bytes = vec![0u8]; // variant 0
        bytes.push(1); // round
        bytes.extend_from_slice(&[0; 32]); // close
        bytes.push(0); // shard
        bytes.push(253); // u64 varint follows
        bytes.extend_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(Direct::from_bytes(&bytes).is_err());
    }

    #[test]
    fn merkle_proofs() {
        for n in 1..20usize {
            let leaves: Vec<Hash> = (0..n).map(|i| Hash::of(&[i as u8])).collect();
            let root = merkle_root(&leaves);
            for i in 0..n {
                let p = merkle_proof(&leaves, i);
                assert!(merkle_verify(root, leaves[i], i, &p));
                assert!(!merkle_verify(root, Hash::of(b"other"), i, &p));
                if n > 1 {
                    assert!(!merkle_verify(root, leaves[i], (i + 1) % n, &p));
                }
            }
        }
    }

    proptest! {
        #[test]
        fn envelope_roundtrip(i in 0usize..8, round in any::<u64>(), seed in any::<u8>()) {
            let body = sample_bodies()[i].clone();
            let env = Envelope::sign(&key(seed), Hash::of(&[seed]), round, Hash::of(b"c"), body);
            let bytes = env.to_bytes().unwrap();
            prop_assert!(bytes.len() <= MAX_GOSSIP_BYTES);
            let back = Envelope::from_bytes(&bytes).unwrap();
            prop_assert!(back.verify_signature());
            prop_assert_eq!(back, env);
        }

        #[test]
        fn gossip_garbage_is_an_error_not_a_panic(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
            if let Ok(env) = Envelope::from_bytes(&bytes) {
                // Random bytes that happen to parse are never validly signed.
                prop_assert!(!env.verify_signature());
            }
        }

        #[test]
        fn direct_garbage_is_an_error_not_a_panic(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
            let _ = Direct::from_bytes(&bytes);
        }

        #[test]
        fn truncated_envelope_is_an_error(i in 0usize..8, cut in any::<prop::sample::Index>()) {
            let env = Envelope::sign(&key(3), Hash::of(b"r"), 1, Hash::of(b"c"), sample_bodies()[i].clone());
            let bytes = env.to_bytes().unwrap();
            let cut = cut.index(bytes.len());
            prop_assert!(Envelope::from_bytes(&bytes[..cut]).is_err());
            let mut longer = bytes.clone();
            longer.push(0);
            prop_assert_eq!(Envelope::from_bytes(&longer), Err(WireError::Trailing(1)));
        }

        #[test]
        fn direct_roundtrip(round in any::<u64>(), data in prop::collection::vec(any::<u8>(), 0..300), shard in any::<u32>()) {
            let msgs = vec![
                Direct::PushShard { round, close: Hash::of(b"c"), shard, data: data.clone(), proof: vec![Hash::of(b"p")] },
                Direct::Data { round, hash: Hash::of(&data), data: data.clone() },
                Direct::Fetch { round, hash: Hash::of(&data) },
                Direct::SyncRequest { from: round },
                Direct::NotFound,
            ];
            for m in msgs {
                let bytes = m.to_bytes().unwrap();
                prop_assert_eq!(Direct::from_bytes(&bytes).unwrap(), m);
                if !bytes.is_empty() {
                    prop_assert!(Direct::from_bytes(&bytes[..bytes.len() - 1]).is_err());
                }
            }
        }
    }
}
