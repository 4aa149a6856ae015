//! Gossip messages: the bodies (READY, CLOSE, AGG, PREPARE, PROMISE, SEAL, COMMIT, JOIN,
//! EVIDENCE, ANNOUNCE, AUDIT), the signed [`Envelope`] that carries them, and announcement of
//! envelopes too large for gossip.

use bincode::{Decode, Encode};
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};

use super::{
    Hash, PeerKey, Signature, WireError, ANNOUNCED_CONFIG, GOSSIP_CONFIG, MAX_ANNOUNCED_BYTES,
    MAX_GOSSIP_BYTES, SIGNING_DOMAIN, WIRE_VERSION,
};

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
    pub peer: PeerKey,
    /// Id of its READY envelope.
    pub ready: Hash,
    /// Its READY.
    pub info: Ready,
    /// Its signature over that READY envelope: a CLOSE or SEAL lists only READYs their
    /// contributors signed, so no leader can make one up or alter it.
    pub sig: Signature,
}

impl Contributor {
    /// The READY envelope this entry stands for, in round `round` of `run` under `chain`
    /// (its id must be `ready`, its signature `sig`).
    pub fn ready_envelope(&self, run: Hash, round: u64, chain: Hash) -> Envelope {
        Envelope {
            version: WIRE_VERSION,
            signer: self.peer,
            run,
            round,
            chain,
            body: Body::Ready(self.info.clone()),
            sig: self.sig,
        }
    }
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
    pub owner: PeerKey,
    /// blake3 of the encoded aggregate.
    pub data: Hash,
    /// Bitmap over the contributors: who is included.
    pub included: Vec<u8>,
    /// Sum of the included weights.
    pub weight: u64,
    /// The owner's signature over its AGG envelope for this shard: a SEAL names only
    /// aggregates their owners vouched for.
    pub sig: Signature,
}

impl SealedShard {
    /// The owner's AGG envelope this entry stands for (shard `shard` of the CLOSE `close`, in
    /// round `round` of `run` under `chain`; its signature must be `sig`).
    pub fn agg_envelope(
        &self,
        run: Hash,
        round: u64,
        chain: Hash,
        close: Hash,
        shard: u32,
    ) -> Envelope {
        Envelope {
            version: WIRE_VERSION,
            signer: self.owner,
            run,
            round,
            chain,
            body: Body::Agg(Agg {
                close,
                shard,
                included: self.included.clone(),
                data: self.data,
                weight: self.weight,
            }),
            sig: self.sig,
        }
    }
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
    pub next_members: Vec<PeerKey>,
    /// The signed JOIN of every newcomer in `next_members`, sorted by signer: acceptors check
    /// that each newcomer asked (and, by the run's admission policy, may) to join.
    pub joins: Vec<Envelope>,
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
    /// Under ballot > 0: the signed PROMISE envelopes of at least a quorum of the round's
    /// members for this ballot, sorted by signer, that justify the proposal (if any of them
    /// carries a [`Certificate`], the SEAL must be the one the highest certifies). Empty under
    /// ballot 0, whose leader needs nobody's promise.
    pub promises: Vec<Envelope>,
}

/// PROMISE: answer to PREPARE.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Promise {
    /// The ballot promised.
    pub ballot: u32,
    /// The highest-ballot [`Certificate`] this peer holds in this round, if any.
    pub prepared: Option<Certificate>,
}

/// ACCEPT: "I accept this SEAL under this ballot", the first of the two votes on a SEAL (sent
/// before fetching its aggregates). A member accepts at most one SEAL per ballot and COMMITs a
/// SEAL only once it holds a quorum of ACCEPTs of it, a [`Certificate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct Accept {
    /// The ballot.
    pub ballot: u32,
    /// Hash of the SEAL ([`Seal::hash`]).
    pub seal: Hash,
}

/// A quorum of ACCEPTs of one SEAL under one ballot: the signers and their signatures over
/// the envelope `Body::Accept(Accept { ballot, seal })` of the round (same run, round and
/// chain). With fewer than a third of the members dishonest, two certificates under one ballot
/// name the same SEAL, and a SEAL decided under a ballot has one.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Certificate {
    /// The ballot.
    pub ballot: u32,
    /// Hash of the SEAL.
    pub seal: Hash,
    /// (signer, signature) per ACCEPT, sorted by signer.
    pub votes: Vec<(PeerKey, Signature)>,
}

impl Certificate {
    /// The ACCEPT envelope that vote `(signer, sig)` signed, in a round with this run, round
    /// and chain (for [`Envelope::verify_signature`]).
    pub fn vote_envelope(
        &self,
        run: Hash,
        round: u64,
        chain: Hash,
        (signer, sig): (PeerKey, Signature),
    ) -> Envelope {
        Envelope {
            version: WIRE_VERSION,
            signer,
            run,
            round,
            chain,
            body: Body::Accept(Accept {
                ballot: self.ballot,
                seal: self.seal,
            }),
            sig,
        }
    }
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

/// JOIN: "list me as a member in a coming SEAL".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Encode, Decode)]
pub struct Join {
    /// A member's invitation, for runs whose admission policy asks for one.
    pub invite: Option<Invite>,
}

/// An existing member's signed invitation of one key to one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct Invite {
    /// The member who invites.
    pub issuer: PeerKey,
    /// Its signature over [`INVITE_DOMAIN`] ‖ run ‖ invitee.
    pub sig: Signature,
}

/// Domain separator of invitation signatures.
pub const INVITE_DOMAIN: &[u8] = b"diloco/invite/1";

impl Invite {
    fn message(run: &Hash, invitee: &PeerKey) -> Vec<u8> {
        [INVITE_DOMAIN, &run.0, &invitee.0].concat()
    }

    /// `issuer`'s invitation of `invitee` to `run`.
    pub fn sign(issuer: &SigningKey, run: Hash, invitee: PeerKey) -> Self {
        Invite {
            issuer: PeerKey::of(issuer),
            sig: Signature(issuer.sign(&Self::message(&run, &invitee)).to_bytes()),
        }
    }

    /// Whether the signature is the issuer's for `invitee` and `run` (strict ed25519).
    pub fn verify(&self, run: Hash, invitee: PeerKey) -> bool {
        let Ok(key) = VerifyingKey::from_bytes(&self.issuer.0) else {
            return false;
        };
        let sig = ed25519_dalek::Signature::from_bytes(&self.sig.0);
        key.verify_strict(&Self::message(&run, &invitee), &sig)
            .is_ok()
    }

    /// The invitation as text (hex of issuer and signature, 192 characters), as `diloco-node
    /// invite` prints it and `join --invite` reads it.
    pub fn to_token(&self) -> String {
        format!("{}{}", hex::encode(self.issuer.0), hex::encode(self.sig.0))
    }

    /// Parses [`Invite::to_token`]'s text.
    pub fn from_token(token: &str) -> Result<Self, WireError> {
        let bytes = hex::decode(token.trim())
            .map_err(|e| WireError::Malformed(format!("invite token: {e}")))?;
        if bytes.len() != 96 {
            return Err(WireError::Malformed(format!(
                "invite token: {} bytes, expected 96 (192 hex characters)",
                bytes.len()
            )));
        }
        let mut issuer = [0u8; 32];
        let mut sig = [0u8; 64];
        issuer.copy_from_slice(&bytes[..32]);
        sig.copy_from_slice(&bytes[32..]);
        Ok(Invite {
            issuer: PeerKey(issuer),
            sig: Signature(sig),
        })
    }
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
    Join(Join),
    /// Equivocation evidence.
    Evidence(Evidence),
    /// A body too large for gossip, announced by the hash of its envelope.
    Announce(Announce),
    /// Random-projection audit of a contributor's shards against the owners' aggregates.
    Audit(Audit),
    /// Ballot phase 2b, first vote: the SEAL is accepted (its certificate is a quorum of
    /// these).
    Accept(Accept),
    /// The run's operator restarts a stalled round with the members that survive.
    Reconfig(Reconfig),
}

/// RECONFIG: signed by the run's operator key (`Config::operator`) under the round and chain
/// of a round that lost its quorum, it restarts that round with `members` (a subset of its
/// members) under the chain [`reconfig_chain`]; nothing of the round's old instance counts
/// any more. The envelope's round and chain bind it to one round of one history.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Reconfig {
    /// The members the round restarts with, sorted (a non-empty subset of its members).
    pub members: Vec<PeerKey>,
}

/// Most RECONFIGs one round may go through (a decision proof carries them all).
pub const MAX_RECONFIGS_PER_ROUND: usize = 4;

/// The chain of a round restarted by the RECONFIG envelope `reconfig` (id) under `chain`.
pub fn reconfig_chain(chain: &Hash, reconfig: &Hash) -> Hash {
    Hash::of_parts(&[b"diloco/reconfig/1", &chain.0, &reconfig.0])
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
            Body::Join(_) => "JOIN",
            Body::Evidence(_) => "EVIDENCE",
            Body::Announce(_) => "ANNOUNCE",
            Body::Audit(_) => "AUDIT",
            Body::Accept(_) => "ACCEPT",
            Body::Reconfig(_) => "RECONFIG",
        }
    }

    /// Whether sending this body casts a Paxos vote that must be made durable first (see
    /// `State::set_vote_from`): PROMISE, ACCEPT and COMMIT, and an ANNOUNCE of any of them (a
    /// PROMISE carrying a large certificate goes out as an ANNOUNCE).
    pub fn is_vote(&self) -> bool {
        match self {
            Body::Promise(_) | Body::Accept(_) | Body::Commit(_) => true,
            Body::Announce(a) => matches!(a.kind, 4 | 6 | 11),
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
            Body::Join(_) => 7,
            Body::Evidence(_) => 8,
            Body::Announce(_) => 9,
            Body::Audit(_) => 10,
            Body::Accept(_) => 11,
            Body::Reconfig(_) => 12,
        }
    }
}

/// A signed gossip message.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Envelope {
    /// Wire version ([`WIRE_VERSION`]).
    pub version: u32,
    /// Signer (its public key).
    pub signer: PeerKey,
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
        signer: &PeerKey,
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
        let signer = PeerKey::of(key);
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
/// envelope, to gossip, and the full bytes, to serve on
/// [`Direct::FetchEnvelope`](super::Direct::FetchEnvelope).
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
