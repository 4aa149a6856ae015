//! The averaging state machine: sealed rounds, with no I/O.
//!
//! The caller feeds [`InEvent`]s together with the current time (ms) and a seeded RNG into
//! [`State::handle`] and carries out the [`OutEvent`]s it returns (gossip this envelope, send
//! this direct message, set this timer, train the next round). The same code runs inside the
//! node and inside the seeded simulator ([`crate::sim`]).
//!
//! # A round, in short (docs/PROTOCOL.md has the long version)
//!
//! Round `r` starts from state agreed at `r-1`: `theta_g`, momentum `m`, the sorted member
//! list `M`, chain hash `C`. Members train and gossip READY (tokens, Merkle root over their `K`
//! encoded shard hashes, norm). Leaders are ranked by `blake3(C, "close", peer)`; the leader of
//! ballot `b` is rank `b mod |M|`. The ballot-0 leader (the closer) gossips CLOSE once every
//! member is READY or `straggler_timeout` after the first READY. CLOSE fixes the contributors;
//! from it every peer derives the same weights (tokens, capped) and shard owners (rendezvous rank
//! `blake3(C, s, peer)` among contributors that can serve, at most `ceil(K/servers)` shards each;
//! the next rank is the backup). Contributors push each shard to its owner, which averages in
//! contributor-list order in f32 (token-weighted; or a robust rule), re-encodes with the run's
//! codec and gossips AGG. If no AGG appears in time, the backup pulls the shards and aggregates.
//! The leader fetches one valid aggregate per shard (most weight, then lowest owner rank, then
//! lowest hash; finite, norm within what its inputs allow), marks the rest MISSING and gossips
//! SEAL. Each member fetches the sealed aggregates, applies the Nesterov step and gossips COMMIT
//! (ballot, SEAL hash, next chain hash, state hash). A quorum (majority or two thirds of `M`)
//! of COMMITs for one (ballot, SEAL, state) decides the round; it is never reverted.
//!
//! If the round is not decided `attempt_timeout` after a peer first saw READY, the leader of the
//! next ballot runs single-decree Paxos phase 1 (PREPARE / PROMISE); if any promise reports an
//! accepted SEAL it re-proposes the one with the highest ballot, otherwise it closes afresh.
//! COMMIT is the Paxos "accepted" message, so at most one SEAL is ever decided per round.
//!
//! Peers that miss a decision (loss, partition, restart) notice messages of a later round and
//! ask to sync. One round behind, they get the decision proof (the SEAL and a quorum of
//! COMMITs), verify it against their own members and chain, fetch the aggregates and replay.
//! Further behind they get the full state, verified against the COMMIT state hash and signed
//! by a quorum of their own members (else two donors must agree). Joiners fetch the state from two agreeing donors,
//! then gossip JOIN; the next SEAL lists them as members. A READY that missed CLOSE is folded (token-weighted) into the peer's next
//! contribution. Two validly signed conflicting messages are evidence: the signer is banned.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use ed25519_dalek::SigningKey;
use rand_chacha::rand_core::RngCore;
use thiserror::Error;

use crate::audit;
use crate::codec::{self, CodecError, Quantization};
use crate::outer::{self, OuterConfig};
use crate::wire::{
    self, Agg, Announce, Audit, AuditEntry, Body, Close, Commit, Contributor, DecisionProof,
    Direct, Envelope, Evidence, Hash, PeerId, Promise, Propose, Ready, Seal, SealedShard, Verifier,
    WireError,
};

/// Milliseconds on the caller's clock.
pub type Time = u64;

/// Rounds of decision proofs and aggregates a peer keeps to serve catch-up.
pub const RETAIN_ROUNDS: u64 = 8;
/// Most messages for the next round buffered while this round finishes.
pub const MAX_BUFFERED: usize = 4096;
/// Most State candidates a joiner keeps while cross-checking donors (each holds theta and
/// momentum).
pub const MAX_STATE_CANDIDATES: usize = 3;
/// A joiner accepts a State that only one donor sent after this many retry periods in which
/// nobody contradicted it.
pub const LONE_STATE_RETRIES: u64 = 4;
/// Most announced envelopes being fetched at once.
pub const MAX_ANNOUNCED_PENDING: usize = 1024;
/// A peer at most this many rounds behind catches up by replaying decision proofs (fetching
/// each round's sealed aggregates, one request-response cycle per round); one further behind
/// is sent the full state (theta and momentum in f32: 8 bytes per parameter) in one transfer.
/// Replaying is cheaper in bytes (an int8 aggregate is 1 byte per parameter and round) but costs
/// a round trip per round, and a group that decides rounds faster than a laggard replays them
/// would never be caught up with.
pub const REPLAY_MAX_ROUNDS: u64 = 1;
/// A full state is 8 bytes per parameter (200 MB for a 25M-parameter model), so it is asked for
/// and sent sparingly: a peer asks one contact for it again only after this many retry periods
/// (its answer may still be on the way), and a donor sends it to one peer at most once in that
/// time and to at most [`MAX_STATES_SERVED`] peers in all.
pub const STATE_PATIENCE_RETRIES: u64 = LONE_STATE_RETRIES;
/// Most full states a donor sends within `STATE_PATIENCE_RETRIES` retry periods (bounds what
/// a crowd of joiners, or one peer under many ids, can make it upload).
pub const MAX_STATES_SERVED: usize = 8;

/// How many COMMITs decide a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quorum {
    /// More than half of the members (crash faults).
    Majority,
    /// More than two thirds of the members (Byzantine-tolerant setting).
    TwoThirds,
}

impl Quorum {
    /// COMMITs needed among `n` members.
    pub fn size(&self, n: usize) -> usize {
        match self {
            Quorum::Majority => n / 2 + 1,
            Quorum::TwoThirds => 2 * n / 3 + 1,
        }
    }
}

/// How an owner combines the contributions to one shard.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    /// Token-weighted mean (DiLoCo).
    Mean,
    /// The leader leaves out contributors whose READY norm exceeds `factor` x the median norm;
    /// owners also drop shards whose norm exceeds their READY's claim. Then the mean.
    NormScreen {
        /// Allowed multiple of the median norm.
        factor: f32,
    },
    /// Coordinate-wise: drop the `trim` fraction of smallest and of largest values, then the
    /// token-weighted mean of the rest.
    TrimmedMean {
        /// Fraction trimmed from each end, in `[0, 0.5)`.
        trim: f32,
    },
}

/// Run configuration: identical on every peer of a run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Run id.
    pub run: Hash,
    /// Number of parameters.
    pub len: usize,
    /// Outer-gradient codec.
    pub codec: Quantization,
    /// Upper bound on shards per round (the actual count is `min(this, |M|, blocks)`).
    pub max_shards: usize,
    /// Cap on a contribution's weight (H x local batch tokens).
    pub token_cap: u64,
    /// Outer optimizer.
    pub outer: OuterConfig,
    /// Decision quorum.
    pub quorum: Quorum,
    /// Aggregation rule.
    pub rule: Rule,
    /// Closer waits this long after the first READY for the rest.
    pub straggler_timeout: Time,
    /// After CLOSE: owners aggregate by 40%, backups step in at 60%, the leader seals at 100%.
    pub agg_timeout: Time,
    /// A leader of ballot `b` starts `b * attempt_timeout` after the first READY if undecided.
    pub attempt_timeout: Time,
    /// Retry period for fetches, sync requests and JOINs.
    pub retry: Time,
    /// Whether this peer accepts inbound streams and can own shards.
    pub can_serve: bool,
    /// Members not heard from for this many rounds are dropped from the next member list.
    pub evict_after_rounds: u64,
    /// Envelopes whose gossip encoding exceeds this many bytes (capped at
    /// [`wire::MAX_GOSSIP_BYTES`]) are gossiped as an ANNOUNCE of their hash and fetched over a
    /// direct stream. Default: the gossip cap; the simulator lowers it to exercise the path.
    pub gossip_limit: usize,
}

impl Config {
    /// A config with the defaults used by the simulator and the node.
    pub fn new(run: Hash, len: usize) -> Self {
        Self {
            run,
            len,
            codec: Quantization::F32,
            max_shards: 256,
            token_cap: u64::MAX,
            outer: OuterConfig::default(),
            quorum: Quorum::Majority,
            rule: Rule::Mean,
            straggler_timeout: 2_000,
            agg_timeout: 3_000,
            attempt_timeout: 10_000,
            retry: 1_000,
            can_serve: true,
            evict_after_rounds: 3,
            gossip_limit: wire::MAX_GOSSIP_BYTES,
        }
    }
}

/// Timers the state machine asks for; the caller hands them back as [`InEvent::Timer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Timer {
    /// The closer's straggler deadline.
    Straggler(u64),
    /// Failover: start ballot `.1` of round `.0`.
    Attempt(u64, u32),
    /// An owner (or backup) aggregates what it has.
    OwnerDeadline(u64),
    /// A backup checks for missing AGGs.
    BackupCheck(u64),
    /// The leader of ballot `.1` seals.
    SealDeadline(u64, u32),
    /// Periodic retries (fetch, sync, join).
    Retry(u64),
    /// A contributor gossips the audit projections it has not sent yet.
    AuditFlush(u64),
}

/// Inputs.
#[derive(Debug, Clone)]
pub enum InEvent {
    /// Local training for `round` finished with this outer gradient and token count.
    Trained {
        /// Round trained for.
        round: u64,
        /// `theta_g - theta_i`.
        delta: Vec<f32>,
        /// Tokens processed.
        tokens: u64,
    },
    /// A gossip message. `verified: true` means the caller already checked its signature
    /// (e.g. once for all receivers); otherwise the state machine does.
    Gossip {
        /// The envelope.
        env: Arc<Envelope>,
        /// Signature already checked.
        verified: bool,
    },
    /// A direct message from an authenticated peer.
    Direct {
        /// Transport-authenticated sender.
        from: PeerId,
        /// The message.
        msg: Arc<Direct>,
    },
    /// A timer fired.
    Timer(Timer),
    /// A peer became reachable (joiners ask it for state).
    Contact(PeerId),
}

/// Why an incoming message was dropped.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum Reject {
    /// Failed admission (run, round, signer, signature).
    #[error("{0}")]
    Wire(#[from] WireError),
    /// Payload did not decode.
    #[error("payload: {0}")]
    Codec(#[from] CodecError),
    /// A payload's length does not match its shard.
    #[error("wrong length {got}, expected {expected}")]
    WrongLength {
        /// Length received.
        got: usize,
        /// Length required.
        expected: usize,
    },
    /// A shard is not under the contributor's Merkle root.
    #[error("shard not under the READY's Merkle root")]
    BadProof,
    /// A payload's norm exceeds what its signed claims allow.
    #[error("norm {got} exceeds the bound {bound}")]
    NormTooLarge {
        /// Measured norm.
        got: f32,
        /// Allowed norm.
        bound: f32,
    },
    /// A payload does not match the hash it was announced with.
    #[error("payload hash mismatch")]
    HashMismatch,
    /// The sender has no right to send this message (not the leader, not the owner, ...).
    #[error("{0} not allowed from this sender")]
    NotAllowed(&'static str),
    /// The message is internally inconsistent.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// The sender signed two conflicting messages.
    #[error("equivocation")]
    Equivocation,
    /// A decision proof or state did not verify.
    #[error("bad proof: {0}")]
    BadDecision(&'static str),
    /// An aggregate's random projections disagree with its contributors' AUDITs.
    #[error(
        "aggregate fails its audit: projection off by {deviation:e} (tolerance {tolerance:e})"
    )]
    AuditFailed {
        /// Largest deviation over the projections.
        deviation: f64,
        /// Allowed deviation.
        tolerance: f64,
    },
}

/// Outputs.
#[derive(Debug, Clone)]
pub enum OutEvent {
    /// Gossip this signed message to the run's topic.
    Gossip(Arc<Envelope>),
    /// Send this message on a direct stream.
    Direct {
        /// Recipient.
        to: PeerId,
        /// The message.
        msg: Arc<Direct>,
    },
    /// Hand back `InEvent::Timer(timer)` at time `at`.
    SetTimer {
        /// When.
        at: Time,
        /// Which.
        timer: Timer,
    },
    /// Start training for `round` from [`State::theta`]; answer with `InEvent::Trained`.
    Train {
        /// The round to train for.
        round: u64,
    },
    /// Round `round` was decided; the state is now at `round + 1`.
    Decided {
        /// Decided round.
        round: u64,
        /// Hash of the SEAL.
        seal: Hash,
        /// Hash of theta_g and momentum after the round.
        state: Hash,
    },
    /// A message was dropped.
    Rejected {
        /// Who sent (or signed) it.
        from: PeerId,
        /// Its kind.
        kind: &'static str,
        /// Why.
        reason: Reject,
    },
    /// `peer` was banned on evidence.
    Banned {
        /// The banned peer.
        peer: PeerId,
    },
}

/// Hash of the replicated state (theta_g and momentum, little-endian f32).
pub fn state_hash(theta: &[f32], momentum: &[f32]) -> Hash {
    let mut h = blake3::Hasher::new();
    for v in theta.iter().chain(momentum) {
        h.update(&v.to_le_bytes());
    }
    Hash(*h.finalize().as_bytes())
}

/// Number of shards for a round with `members` members.
pub fn shard_count(cfg: &Config, members: usize) -> usize {
    cfg.max_shards
        .min(members)
        .min(cfg.len.div_ceil(codec::BLOCK))
        .max(1)
}

/// Owner then backup per shard, shared by the memo below.
type OwnerTable = Arc<Vec<Vec<PeerId>>>;

thread_local! {
    // Owner and leader rankings are pure functions of (chain, peers, k); every peer of a round
    // computes the same ones, which in the simulator means n times per round in one process.
    // One memoized result per thread (keyed by a hash of all inputs) makes that one.
    static LEADERS: std::cell::RefCell<Option<(Hash, Arc<Vec<PeerId>>)>> =
        const { std::cell::RefCell::new(None) };
    static OWNERS: std::cell::RefCell<Option<(Hash, OwnerTable)>> =
        const { std::cell::RefCell::new(None) };
}

fn inputs_key(tag: &[u8], chain: &Hash, peers: &[PeerId], k: usize) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(tag);
    h.update(&chain.0);
    h.update(&(k as u64).to_le_bytes());
    for p in peers {
        h.update(&p.0);
    }
    Hash(*h.finalize().as_bytes())
}

/// Leader order of a round: members ranked by `blake3(chain, "close", peer)`.
pub fn leader_order(chain: &Hash, members: &[PeerId]) -> Vec<PeerId> {
    let key = inputs_key(b"leaders", chain, members, 0);
    if let Some(hit) = LEADERS.with(|c| {
        c.borrow()
            .as_ref()
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v.clone())
    }) {
        return (*hit).clone();
    }
    let mut m: Vec<(Hash, PeerId)> = members
        .iter()
        .map(|p| (Hash::of_parts(&[&chain.0, b"close", &p.0]), *p))
        .collect();
    m.sort();
    let order: Vec<PeerId> = m.into_iter().map(|(_, p)| p).collect();
    LEADERS.with(|c| *c.borrow_mut() = Some((key, Arc::new(order.clone()))));
    order
}

/// Owner then backups for each of `k` shards, among `servers` (sorted), rendezvous-ranked by
/// `blake3(chain, s, peer)`, at most `ceil(k / servers)` shards per owner.
pub fn shard_owners(chain: &Hash, servers: &[PeerId], k: usize) -> Vec<Vec<PeerId>> {
    if servers.is_empty() {
        return vec![Vec::new(); k];
    }
    let key = inputs_key(b"owners", chain, servers, k);
    if let Some(hit) = OWNERS.with(|c| {
        c.borrow()
            .as_ref()
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v.clone())
    }) {
        return (*hit).clone();
    }
    let cap = k.div_ceil(servers.len());
    let mut load: Vec<usize> = vec![0; servers.len()];
    let mut ranks: Vec<(Hash, usize)> = Vec::with_capacity(servers.len());
    let owners: Vec<Vec<PeerId>> = (0..k)
        .map(|s| {
            ranks.clear();
            ranks.extend(servers.iter().enumerate().map(|(i, p)| {
                (
                    Hash::of_parts(&[&chain.0, &(s as u64).to_le_bytes(), &p.0]),
                    i,
                )
            }));
            // The owner is the best-ranked server below its cap (the best-ranked one if all
            // are full), the backup the best-ranked other one: two linear scans instead of a
            // sort (ranks are distinct hashes, so this is the order a sort would give).
            let best = |skip: Option<usize>, load: Option<&[usize]>| {
                ranks
                    .iter()
                    .filter(|(_, i)| Some(*i) != skip && load.is_none_or(|l| l[*i] < cap))
                    .min()
                    .map(|(_, i)| *i)
            };
            let owner = best(None, Some(&load))
                .or_else(|| best(None, None))
                .unwrap_or(0);
            let backup = best(Some(owner), None);
            load[owner] += 1;
            let mut out = vec![servers[owner]];
            out.extend(backup.map(|i| servers[i]));
            out
        })
        .collect();
    OWNERS.with(|c| *c.borrow_mut() = Some((key, Arc::new(owners.clone()))));
    owners
}

fn now_ge(now: Time, t: Time, retry: Time) -> bool {
    now >= t.saturating_add(retry)
}

fn bitmap(bits: impl Iterator<Item = bool>, n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n.div_ceil(8)];
    for (i, b) in bits.enumerate().take(n) {
        if b {
            out[i / 8] |= 1 << (i % 8);
        }
    }
    out
}

fn bit(map: &[u8], i: usize) -> bool {
    map.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)
}

fn norm(v: &[f32]) -> f32 {
    v.iter()
        .map(|x| f64::from(*x) * f64::from(*x))
        .sum::<f64>()
        .sqrt() as f32
}

/// Bound on an aggregate's norm from its inputs' claimed norms, with slack for two codec passes.
fn norm_bound(q: Quantization, max_input: f32, len: usize) -> f32 {
    let rel = match q {
        Quantization::F32 => 1e-5,
        Quantization::F16 | Quantization::Bf16 => 0.02,
        Quantization::Int8 => 0.05,
        Quantization::Fp4 => 0.7,
    };
    max_input * (1.0 + rel) + 1e-6 * (len as f32).sqrt()
}

/// Combines shard inputs (in contributor order) with `rule`.
pub fn aggregate(rule: Rule, inputs: &[(&[f32], u64)]) -> Vec<f32> {
    let Some((first, _)) = inputs.first() else {
        return Vec::new();
    };
    let len = first.len();
    match rule {
        Rule::Mean | Rule::NormScreen { .. } => {
            let vs: Vec<&[f32]> = inputs.iter().map(|(v, _)| *v).collect();
            let ws: Vec<f64> = inputs.iter().map(|(_, w)| *w as f64).collect();
            outer::weighted_mean(&vs, &ws).unwrap_or_else(|_| vec![0.0; len])
        }
        Rule::TrimmedMean { trim } => {
            let m = inputs.len();
            let cut = ((m as f32) * trim.clamp(0.0, 0.49)).floor() as usize;
            let mut out = vec![0f32; len];
            let mut col: Vec<(f32, usize)> = Vec::with_capacity(m);
            for (j, o) in out.iter_mut().enumerate() {
                col.clear();
                col.extend(inputs.iter().enumerate().map(|(i, (v, _))| (v[j], i)));
                col.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                let kept = &col[cut..m - cut];
                let total: f64 = kept.iter().map(|(_, i)| inputs[*i].1 as f64).sum();
                if total > 0.0 {
                    let mut acc = 0f32;
                    for (x, i) in kept {
                        acc += (inputs[*i].1 as f64 / total) as f32 * x;
                    }
                    *o = acc;
                }
            }
            out
        }
    }
}

#[derive(Debug, Clone)]
struct Contribution {
    delta: Vec<f32>,
    tokens: u64,
    shards: Vec<Vec<u8>>,
    leaves: Vec<Hash>,
    ready_id: Hash,
}

#[derive(Debug, Clone)]
struct CloseInfo {
    close: Close,
    owners: Vec<Vec<PeerId>>,
}

/// A validated State offered by a donor, waiting for a second donor's word.
#[derive(Debug, Clone)]
struct StateCandidate {
    round: u64,
    state: Hash,
    seal: Hash,
    next_chain: Hash,
    members: Vec<PeerId>,
    signers: BTreeSet<PeerId>,
    proof: DecisionProof,
    theta: Vec<f32>,
    momentum: Vec<f32>,
    donors: BTreeSet<PeerId>,
    since: Time,
}

#[derive(Debug, Default)]
struct OwnerState {
    inputs: BTreeMap<usize, Vec<f32>>,
    done: bool,
    backup: bool,
}

#[derive(Debug)]
enum Leading {
    Preparing {
        ballot: u32,
        promises: BTreeMap<PeerId, Promise>,
    },
    Collecting {
        ballot: u32,
        close_id: Hash,
    },
    Proposed,
}

#[derive(Debug)]
struct Tentative {
    theta: Vec<f32>,
    momentum: Vec<f32>,
    state: Hash,
    next_chain: Hash,
}

#[derive(Debug, Default)]
struct RoundState {
    reference: Option<Time>,
    contrib: Option<Contribution>,
    readies: BTreeMap<PeerId, (Hash, Ready)>,
    closes: HashMap<Hash, CloseInfo>,
    owned: BTreeMap<(Hash, u32), OwnerState>,
    aggs: BTreeMap<(Hash, u32), Vec<(PeerId, Agg)>>,
    promised: u32,
    accepted: Option<Propose>,
    proposals: BTreeMap<u32, Arc<Envelope>>,
    applying: Option<(Arc<Envelope>, Vec<PeerId>)>,
    tentative: HashMap<Hash, Tentative>,
    commits: HashMap<(u32, Hash, Hash), BTreeMap<PeerId, Arc<Envelope>>>,
    leading: Option<Leading>,
    joins: BTreeSet<PeerId>,
    decide_target: Option<(u32, Hash, Hash)>,
    fetch_pending: BTreeMap<Hash, (Vec<PeerId>, Time)>,
    early_pushes: Vec<(PeerId, Arc<Direct>)>,
    /// Audit projections received: (close, shard, aggregate) -> contributor index -> values.
    audits: HashMap<(Hash, u32, Hash), BTreeMap<usize, Vec<f64>>>,
    /// My audit entries not gossiped yet, per CLOSE, and every (close, shard, agg) I audited.
    audit_out: BTreeMap<Hash, Vec<AuditEntry>>,
    audited: BTreeSet<(Hash, u32, Hash)>,
}

/// One peer's protocol state.
pub struct State {
    cfg: Config,
    key: SigningKey,
    me: PeerId,
    verifier: Verifier,
    round: u64,
    chain: Hash,
    members: Vec<PeerId>,
    theta: Vec<f32>,
    momentum: Vec<f32>,
    synced: bool,
    r: RoundState,
    history: VecDeque<(u64, DecisionProof)>,
    store: HashMap<Hash, (u64, Arc<Vec<u8>>)>,
    carry: Option<(Vec<f32>, u64)>,
    seen: HashMap<(PeerId, u64, u8, u32, Hash), Arc<Envelope>>,
    future: Vec<Arc<Envelope>>,
    last_heard: HashMap<PeerId, u64>,
    contacts: BTreeSet<PeerId>,
    last_sync: Option<Time>,
    out: Vec<OutEvent>,
    now: Time,
    vote_from: u64,
    /// Full bytes of announced envelopes (mine and fetched ones), served on FetchEnvelope.
    big: HashMap<Hash, (u64, Arc<Vec<u8>>)>,
    /// Announcements whose envelope is being fetched: hash -> (announcement, last asked).
    announced: HashMap<Hash, (Arc<Envelope>, Time)>,
    /// A joiner's validated State offers, until two donors agree.
    candidates: Vec<StateCandidate>,
    /// Whether this peer asked for a state (or sync) since it last adopted one: a synced peer
    /// ignores State messages it did not ask for.
    state_wanted: bool,
    /// When each contact was last asked for a state, and whether it answered (until one is
    /// adopted).
    state_asked: BTreeMap<PeerId, (Time, bool)>,
    /// When this peer last sent a state to each peer (within the patience window: at most one
    /// state per peer in it, so its size is also how many were sent in all).
    state_served: BTreeMap<PeerId, Time>,
}

impl State {
    /// A founding member of a run: everyone starts from the same `theta0`, zero momentum, round
    /// 0, chain `blake3(run)`, and the same sorted member list.
    pub fn genesis(
        cfg: Config,
        key: SigningKey,
        theta0: Vec<f32>,
        mut members: Vec<PeerId>,
    ) -> Self {
        members.sort();
        members.dedup();
        let mut s = Self::blank(cfg, key);
        s.momentum = vec![0.0; theta0.len()];
        s.theta = theta0;
        s.members = members;
        s.synced = true;
        s.reset_heard();
        s
    }

    /// A peer with no state (a joiner, or a restart that lost its disk): it asks its contacts
    /// for the state, then gossips JOIN.
    pub fn joiner(cfg: Config, key: SigningKey, contacts: Vec<PeerId>) -> Self {
        let mut s = Self::blank(cfg, key);
        s.contacts = contacts.into_iter().collect();
        s
    }

    /// A peer restarting from state saved at the start of `round` (possibly stale): it catches
    /// up through decision proofs or a full state transfer.
    pub fn restore(
        cfg: Config,
        key: SigningKey,
        round: u64,
        chain: Hash,
        members: Vec<PeerId>,
        theta: Vec<f32>,
        momentum: Vec<f32>,
    ) -> Self {
        let mut s = Self::genesis(cfg, key, theta, members);
        s.momentum = momentum;
        s.round = round;
        s.chain = chain;
        s.reset_heard();
        s
    }

    fn blank(cfg: Config, key: SigningKey) -> Self {
        let me = PeerId::of(&key);
        let verifier = Verifier::new(cfg.run);
        Self {
            chain: Hash::of(&cfg.run.0),
            cfg,
            key,
            me,
            verifier,
            round: 0,
            members: Vec::new(),
            theta: Vec::new(),
            momentum: Vec::new(),
            synced: false,
            r: RoundState::default(),
            history: VecDeque::new(),
            store: HashMap::new(),
            carry: None,
            seen: HashMap::new(),
            future: Vec::new(),
            last_heard: HashMap::new(),
            contacts: BTreeSet::new(),
            last_sync: None,
            out: Vec::new(),
            now: 0,
            vote_from: 0,
            big: HashMap::new(),
            announced: HashMap::new(),
            candidates: Vec::new(),
            state_wanted: false,
            state_asked: BTreeMap::new(),
            state_served: BTreeMap::new(),
        }
    }

    /// This peer's id.
    pub fn id(&self) -> PeerId {
        self.me
    }
    /// The round in progress (all rounds below it are decided).
    pub fn round(&self) -> u64 {
        self.round
    }
    /// Chain hash at the start of the current round.
    pub fn chain(&self) -> Hash {
        self.chain
    }
    /// Members of the current round.
    pub fn members(&self) -> &[PeerId] {
        &self.members
    }
    /// Whether this peer is a member of the current round.
    pub fn is_member(&self) -> bool {
        self.synced && self.members.binary_search(&self.me).is_ok()
    }
    /// Whether this peer holds agreed state.
    pub fn is_synced(&self) -> bool {
        self.synced
    }
    /// Global parameters theta_g.
    pub fn theta(&self) -> &[f32] {
        &self.theta
    }
    /// Outer momentum.
    pub fn momentum(&self) -> &[f32] {
        &self.momentum
    }
    /// Hash of (theta_g, momentum).
    pub fn state_hash(&self) -> Hash {
        state_hash(&self.theta, &self.momentum)
    }
    /// Keys banned on evidence.
    pub fn banned(&self) -> &BTreeSet<PeerId> {
        &self.verifier.banned
    }
    /// Decision proofs kept for catch-up, oldest first.
    pub fn decisions(&self) -> impl Iterator<Item = &DecisionProof> {
        self.history.iter().map(|(_, p)| p)
    }
    /// The run configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }
    /// A payload (shard aggregate) this peer holds, by its blake3 hash.
    pub fn payload(&self, hash: &Hash) -> Option<&[u8]> {
        self.store.get(hash).map(|(_, d)| d.as_slice())
    }

    /// Paxos acceptors must not forget their votes: a peer that restarts must not PROMISE or
    /// COMMIT in any round it may have voted in before. The node keeps the highest round it
    /// voted in on disk (written before the vote is sent) and passes `that + 1` here after a
    /// restart; the peer then only follows decisions until it reaches that round.
    pub fn set_vote_from(&mut self, round: u64) {
        self.vote_from = round;
    }

    /// Starts the peer: founding members are asked to train round 0; others ask for state.
    pub fn start(&mut self, now: Time) -> Vec<OutEvent> {
        self.now = now;
        if self.is_member() {
            self.out.push(OutEvent::Train { round: self.round });
        }
        self.set_timer(now + self.cfg.retry, Timer::Retry(self.round));
        if !self.synced {
            self.request_state();
        }
        std::mem::take(&mut self.out)
    }

    /// Feeds one event; returns the actions to carry out.
    pub fn handle(&mut self, now: Time, ev: InEvent, rng: &mut dyn RngCore) -> Vec<OutEvent> {
        self.now = now;
        match ev {
            InEvent::Trained {
                round,
                delta,
                tokens,
            } => self.on_trained(round, delta, tokens),
            InEvent::Gossip { env, verified } => self.on_gossip(env, verified),
            InEvent::Direct { from, msg } => self.on_direct(from, msg),
            InEvent::Timer(t) => self.on_timer(t, rng),
            InEvent::Contact(p) => {
                if self.contacts.len() < 1024 {
                    self.contacts.insert(p);
                }
            }
        }
        std::mem::take(&mut self.out)
    }

    // -----------------------------------------------------------------------------------------
    // helpers

    fn set_timer(&mut self, at: Time, timer: Timer) {
        self.out.push(OutEvent::SetTimer { at, timer });
    }

    fn reject(&mut self, from: PeerId, kind: &'static str, reason: impl Into<Reject>) {
        self.out.push(OutEvent::Rejected {
            from,
            kind,
            reason: reason.into(),
        });
    }

    fn send(&mut self, to: PeerId, msg: Direct) {
        if to == self.me {
            return;
        }
        self.out.push(OutEvent::Direct {
            to,
            msg: Arc::new(msg),
        });
    }

    fn gossip(&mut self, body: Body) {
        let env = Arc::new(Envelope::sign(
            &self.key,
            self.cfg.run,
            self.round,
            self.chain,
            body,
        ));
        if env.fits_gossip(self.cfg.gossip_limit) {
            self.out.push(OutEvent::Gossip(env.clone()));
        } else {
            // Too large for gossip: announce its hash, serve the bytes on request.
            // Beyond MAX_ANNOUNCED_BYTES it cannot be sent at all: peers see a silent sender
            // (a crash), which the protocol tolerates.
            if let Ok((ann, bytes)) = wire::announce(&self.key, &env) {
                if let Body::Announce(a) = &ann.body {
                    self.big.insert(a.hash, (self.round, Arc::new(bytes)));
                }
                self.out.push(OutEvent::Gossip(Arc::new(ann)));
            }
        }
        self.process(env);
    }

    fn on_announce(&mut self, env: Arc<Envelope>, a: Announce) {
        if self.big.contains_key(&a.hash) || self.announced.contains_key(&a.hash) {
            return;
        }
        if a.size > wire::MAX_ANNOUNCED_BYTES as u64 {
            let got = a.size;
            self.reject(
                env.signer,
                "ANNOUNCE",
                WireError::TooLarge {
                    got,
                    max: wire::MAX_ANNOUNCED_BYTES,
                },
            );
            return;
        }
        // Bounded memory: a member has a handful of large messages per round at most (CLOSE,
        // SEAL, PROMISE, EVIDENCE), so at most 4 pending fetches per signer.
        let per_signer = self
            .announced
            .values()
            .filter(|(x, _)| x.signer == env.signer)
            .count();
        if self.announced.len() >= MAX_ANNOUNCED_PENDING || per_signer >= 4 {
            return;
        }
        let to = env.signer;
        self.announced.insert(a.hash, (env, self.now));
        self.send(
            to,
            Direct::FetchEnvelope {
                round: self.round,
                hash: a.hash,
            },
        );
    }

    fn on_full_envelope(&mut self, from: PeerId, bytes: &[u8]) {
        let hash = Hash::of(bytes);
        let Some((ann, _)) = self.announced.get(&hash).cloned() else {
            return;
        };
        match wire::open_announced(&ann, bytes) {
            Ok(env) => {
                self.announced.remove(&hash);
                self.big.insert(hash, (ann.round, Arc::new(bytes.to_vec())));
                // Admission again: the round may have moved on while we fetched.
                self.on_gossip(Arc::new(env), true);
            }
            Err(e) => self.reject(from, "ENVELOPE", e),
        }
    }

    fn k(&self) -> usize {
        shard_count(&self.cfg, self.members.len())
    }

    fn quorum(&self) -> usize {
        self.cfg.quorum.size(self.members.len())
    }

    fn leader(&self, ballot: u32) -> Option<PeerId> {
        let order = leader_order(&self.chain, &self.members);
        order.get(ballot as usize % order.len().max(1)).copied()
    }

    fn weight(&self, tokens: u64) -> u64 {
        tokens.min(self.cfg.token_cap).max(1)
    }

    fn note_reference(&mut self) {
        if self.r.reference.is_some() {
            return;
        }
        let now = self.now;
        self.r.reference = Some(now);
        let round = self.round;
        let order = leader_order(&self.chain, &self.members);
        if order.first() == Some(&self.me) {
            self.set_timer(now + self.cfg.straggler_timeout, Timer::Straggler(round));
        }
        if let Some(rank) = order.iter().position(|p| *p == self.me) {
            let b = if rank == 0 { order.len() } else { rank };
            if b > 0 && b < u32::MAX as usize {
                self.set_timer(
                    now + b as u64 * self.cfg.attempt_timeout,
                    Timer::Attempt(round, b as u32),
                );
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // training and READY

    fn on_trained(&mut self, round: u64, mut delta: Vec<f32>, mut tokens: u64) {
        if round != self.round || !self.is_member() || self.r.contrib.is_some() {
            return;
        }
        if delta.len() != self.cfg.len {
            return;
        }
        if let Some((old, old_tokens)) = self.carry.take() {
            // A contribution that missed its CLOSE is folded in once, token-weighted.
            let (a, b) = (self.weight(old_tokens) as f64, self.weight(tokens) as f64);
            for (d, o) in delta.iter_mut().zip(&old) {
                *d = ((f64::from(*d) * b + f64::from(*o) * a) / (a + b)) as f32;
            }
            tokens = tokens.saturating_add(old_tokens);
        }
        let k = self.k();
        let shards: Vec<Vec<u8>> = codec::shards(self.cfg.len, k)
            .into_iter()
            .map(|r| codec::encode(self.cfg.codec, &delta[r]))
            .collect();
        let leaves: Vec<Hash> = shards.iter().map(|s| Hash::of(s)).collect();
        let ready = Ready {
            tokens: tokens.min(self.cfg.token_cap),
            shard_root: wire::merkle_root(&leaves),
            norm_bits: norm(&codec::quantize_roundtrip(self.cfg.codec, &delta)).to_bits(),
            can_serve: self.cfg.can_serve,
        };
        self.r.contrib = Some(Contribution {
            delta,
            tokens,
            shards,
            leaves,
            ready_id: Hash::default(),
        });
        self.gossip(Body::Ready(ready));
    }

    // -----------------------------------------------------------------------------------------
    // gossip intake

    fn on_gossip(&mut self, env: Arc<Envelope>, verified: bool) {
        if !self.synced {
            if self.contacts.len() < 1024 {
                self.contacts.insert(env.signer);
            }
            return;
        }
        let kind = env.body.kind();
        if env.round > self.round {
            // We are behind: check the signature only, buffer the next round, ask for proofs.
            let ok = env.run == self.cfg.run && (verified || env.verify_signature());
            if !ok {
                self.reject(env.signer, kind, WireError::BadSignature(env.signer));
                return;
            }
            if env.round == self.round + 1 && self.future.len() < MAX_BUFFERED {
                self.future.push(env.clone());
            }
            self.maybe_sync(env.signer);
            return;
        }
        let members = std::mem::take(&mut self.members);
        let res = self.verifier.check(&env, self.round, &members, |e| {
            verified || e.verify_signature()
        });
        self.members = members;
        if let Err(e) = res {
            // Stale messages are routine after a decision; everything else is worth reporting.
            if matches!(e, WireError::OldRound { got, .. } if got + 1 >= self.round) {
                self.heard_late(&env, verified);
            } else {
                self.reject(env.signer, kind, e);
            }
            return;
        }
        // A JOIN may be up to JOIN_WINDOW rounds old, signed under that round's chain; it only
        // asks to be listed, so its chain is not checked.
        if env.chain != self.chain && !matches!(env.body, Body::Evidence(_) | Body::Join) {
            self.reject(env.signer, kind, Reject::Malformed("chain hash"));
            return;
        }
        if self.equivocates(&env) {
            return;
        }
        self.process(env);
    }

    /// A member's message of the previous round, arriving after this peer moved on: the member
    /// is alive, just a little behind, and must not be evicted as silent. One signature check
    /// per member and round at most.
    fn heard_late(&mut self, env: &Envelope, verified: bool) {
        if self
            .last_heard
            .get(&env.signer)
            .is_some_and(|r| *r >= env.round)
            || !self.members.contains(&env.signer)
        {
            return;
        }
        if env.run == self.cfg.run && (verified || env.verify_signature()) {
            self.last_heard.insert(env.signer, env.round);
        }
    }

    /// Records the first message per (signer, round, kind, slot); a different second one is
    /// evidence.
    fn equivocates(&mut self, env: &Arc<Envelope>) -> bool {
        let slot: Option<(u8, u32, Hash)> = match &env.body {
            Body::Ready(_) => Some((0, 0, Hash::default())),
            Body::Close(c) => Some((1, c.ballot, Hash::default())),
            Body::Agg(a) => Some((2, a.shard, a.close)),
            Body::Seal(p) => Some((3, p.ballot, Hash::default())),
            Body::Commit(c) => Some((4, c.ballot, Hash::default())),
            _ => None,
        };
        let Some((tag, n, h)) = slot else {
            return false;
        };
        let key = (env.signer, env.round, tag, n, h);
        match self.seen.get(&key) {
            None => {
                if self.seen.len() < 1 << 20 {
                    self.seen.insert(key, env.clone());
                }
                false
            }
            Some(first) if first.body == env.body => true, // duplicate: drop silently
            Some(first) => {
                let ev = Evidence {
                    a: Box::new((**first).clone()),
                    b: Box::new((**env).clone()),
                };
                self.reject(env.signer, env.body.kind(), Reject::Equivocation);
                self.ban(env.signer);
                self.gossip(Body::Evidence(ev));
                true
            }
        }
    }

    /// Starts every member's silence clock at the current round. A state just taken (genesis,
    /// restore, adoption) says nothing about who has been silent: a member is evicted only after
    /// `evict_after_rounds` rounds that this peer watched without hearing from it (before, a
    /// member never heard from counted as silent forever, so a peer that restored or adopted a
    /// state and then led a round could evict every member whose gossip it had not yet seen).
    fn reset_heard(&mut self) {
        self.last_heard.clear();
        for p in &self.members {
            self.last_heard.insert(*p, self.round);
        }
    }

    fn ban(&mut self, peer: PeerId) {
        if peer != self.me && self.verifier.banned.insert(peer) {
            self.out.push(OutEvent::Banned { peer });
        }
    }

    fn process(&mut self, env: Arc<Envelope>) {
        if env.round == self.round {
            self.last_heard.insert(env.signer, self.round);
        }
        let signer = env.signer;
        match &env.body {
            Body::Ready(r) => self.on_ready(&env, r.clone()),
            Body::Close(c) => self.on_close(&env, c.clone()),
            Body::Agg(a) => self.on_agg(signer, a.clone()),
            Body::Prepare(b) => self.on_prepare(signer, *b),
            Body::Promise(p) => self.on_promise(signer, p.clone()),
            Body::Seal(p) => self.on_seal(env.clone(), p.ballot),
            Body::Commit(c) => self.on_commit(env.clone(), *c),
            Body::Join => {
                if self.r.joins.len() < 1024 {
                    self.r.joins.insert(signer);
                    self.last_heard.insert(signer, self.round);
                }
            }
            Body::Announce(a) => self.on_announce(env.clone(), *a),
            Body::Audit(a) => self.on_audit(signer, a),
            Body::Evidence(e) => match wire::check_evidence(e) {
                Some(p) => self.ban(p),
                None => self.reject(
                    signer,
                    "EVIDENCE",
                    Reject::BadDecision("evidence does not verify"),
                ),
            },
        }
    }

    fn on_ready(&mut self, env: &Envelope, r: Ready) {
        if env.signer == self.me {
            if let Some(c) = self.r.contrib.as_mut() {
                c.ready_id = env.id();
            }
        }
        self.r.readies.insert(env.signer, (env.id(), r));
        self.note_reference();
        // READYs are only admitted from members, so fewer READYs than unbanned members means
        // someone is missing (checked first: the full scan is O(members)).
        let all_ready = self.r.readies.len() + self.verifier.banned.len() >= self.members.len()
            && self
                .members
                .iter()
                .all(|m| self.r.readies.contains_key(m) || self.banned().contains(m));
        if all_ready && self.leader(0) == Some(self.me) && self.r.leading.is_none() {
            self.do_close(0);
        }
    }

    // -----------------------------------------------------------------------------------------
    // CLOSE and reduce

    fn do_close(&mut self, ballot: u32) {
        let mut readies: Vec<(PeerId, Hash, Ready)> = self
            .r
            .readies
            .iter()
            .filter(|(p, _)| {
                !self.verifier.banned.contains(p) && self.members.binary_search(p).is_ok()
            })
            .map(|(p, (h, r))| (*p, *h, r.clone()))
            .collect();
        if let Rule::NormScreen { factor } = self.cfg.rule {
            let mut norms: Vec<f32> = readies
                .iter()
                .map(|(_, _, r)| f32::from_bits(r.norm_bits))
                .collect();
            norms.sort_by(|a, b| a.total_cmp(b));
            if let Some(med) = norms.get(norms.len() / 2).copied() {
                readies.retain(|(_, _, r)| {
                    let n = f32::from_bits(r.norm_bits);
                    n.is_finite() && n <= factor * med
                });
            }
        }
        if readies.is_empty() {
            return;
        }
        let close = Close {
            ballot,
            contributors: readies
                .into_iter()
                .map(|(peer, ready, info)| Contributor { peer, ready, info })
                .collect(),
        };
        self.r.leading = Some(Leading::Collecting {
            ballot,
            close_id: Hash::default(),
        });
        let round = self.round;
        self.set_timer(
            self.now + self.cfg.agg_timeout,
            Timer::SealDeadline(round, ballot),
        );
        self.gossip(Body::Close(close));
    }

    fn on_close(&mut self, env: &Envelope, close: Close) {
        if Some(env.signer) != self.leader(close.ballot) {
            self.reject(env.signer, "CLOSE", Reject::NotAllowed("CLOSE"));
            return;
        }
        let sorted = close.contributors.windows(2).all(|w| w[0].peer < w[1].peer);
        let members_ok = close
            .contributors
            .iter()
            .all(|c| self.members.binary_search(&c.peer).is_ok());
        if !sorted || !members_ok || close.contributors.is_empty() {
            self.reject(env.signer, "CLOSE", Reject::Malformed("CLOSE contributors"));
            return;
        }
        let id = env.id();
        if let Some(Leading::Collecting { ballot, close_id }) = &mut self.r.leading {
            if *ballot == close.ballot && env.signer == self.me {
                *close_id = id;
            }
        }
        let k = self.k();
        let servers: Vec<PeerId> = close
            .contributors
            .iter()
            .filter(|c| c.info.can_serve)
            .map(|c| c.peer)
            .collect();
        let owners = shard_owners(&self.chain, &servers, k);
        let round = self.round;
        let me = self.me;
        let mine_owner = owners.iter().any(|o| o.first() == Some(&me));
        let mine_backup = owners.iter().any(|o| o.get(1) == Some(&me));
        for (s, o) in owners.iter().enumerate() {
            if o.first() == Some(&me) {
                self.r.owned.entry((id, s as u32)).or_default();
            }
        }
        self.r.closes.insert(
            id,
            CloseInfo {
                close: close.clone(),
                owners: owners.clone(),
            },
        );
        // Push my shards.
        if let Some(c) = self.r.contrib.clone() {
            if let Some(idx) = close
                .contributors
                .iter()
                .position(|x| x.peer == me && x.ready == c.ready_id)
            {
                for (s, o) in owners.iter().enumerate() {
                    let Some(owner) = o.first().copied() else {
                        continue;
                    };
                    if owner == me {
                        self.owner_input(id, s as u32, idx, &c.shards[s]);
                    } else {
                        let proof = wire::merkle_proof(&c.leaves, s);
                        self.send(
                            owner,
                            Direct::PushShard {
                                round,
                                close: id,
                                shard: s as u32,
                                data: c.shards[s].clone(),
                                proof,
                            },
                        );
                    }
                }
            }
        }
        let early = std::mem::take(&mut self.r.early_pushes);
        for (from, msg) in early {
            if let Direct::PushShard {
                round,
                close,
                shard,
                data,
                proof,
            } = &*msg
            {
                if *close == id {
                    self.on_push(from, *round, *close, *shard, data, proof);
                } else {
                    self.r.early_pushes.push((from, msg.clone()));
                }
            }
        }
        let keys: Vec<(Hash, u32)> = self
            .r
            .owned
            .keys()
            .filter(|(c, _)| *c == id)
            .copied()
            .collect();
        for (c, s) in keys {
            self.maybe_finish_shard(c, s, false);
        }
        if mine_owner {
            self.set_timer(
                self.now + self.cfg.agg_timeout * 2 / 5,
                Timer::OwnerDeadline(round),
            );
        }
        if self.audited_rule() && self.r.contrib.is_some() {
            self.set_timer(
                self.now + self.cfg.agg_timeout / 2,
                Timer::AuditFlush(round),
            );
            self.set_timer(
                self.now + self.cfg.agg_timeout * 9 / 10,
                Timer::AuditFlush(round),
            );
        }
        if mine_backup {
            self.set_timer(
                self.now + self.cfg.agg_timeout * 3 / 5,
                Timer::BackupCheck(round),
            );
        }
    }

    fn shard_range(&self, s: usize) -> std::ops::Range<usize> {
        codec::shards(self.cfg.len, self.k())
            .get(s)
            .cloned()
            .unwrap_or(0..0)
    }

    fn owner_input(&mut self, close_id: Hash, shard: u32, idx: usize, data: &[u8]) {
        let range = self.shard_range(shard as usize);
        let Ok(v) = codec::decode(data, range.len()) else {
            return;
        };
        if let Some(st) = self.r.owned.get_mut(&(close_id, shard)) {
            st.inputs.insert(idx, v);
        }
        self.maybe_finish_shard(close_id, shard, false);
    }

    fn on_push(
        &mut self,
        from: PeerId,
        round: u64,
        close_id: Hash,
        shard: u32,
        data: &[u8],
        proof: &[Hash],
    ) {
        if round != self.round {
            return;
        }
        let Some(info) = self.r.closes.get(&close_id) else {
            // The push overtook the CLOSE gossip: keep it until the CLOSE arrives.
            if self.r.early_pushes.len() < MAX_BUFFERED {
                let msg = Direct::PushShard {
                    round,
                    close: close_id,
                    shard,
                    data: data.to_vec(),
                    proof: proof.to_vec(),
                };
                self.r.early_pushes.push((from, Arc::new(msg)));
            }
            return;
        };
        let Some(idx) = info.close.contributors.iter().position(|c| c.peer == from) else {
            self.reject(from, "PUSH", Reject::NotAllowed("PUSH"));
            return;
        };
        let c = &info.close.contributors[idx];
        let claimed = f32::from_bits(c.info.norm_bits);
        let root = c.info.shard_root;
        if !self.r.owned.contains_key(&(close_id, shard)) {
            self.reject(from, "PUSH", Reject::NotAllowed("PUSH to a non-owner"));
            return;
        }
        if !wire::merkle_verify(root, Hash::of(data), shard as usize, proof) {
            self.reject(from, "PUSH", Reject::BadProof);
            return;
        }
        let range = self.shard_range(shard as usize);
        let v = match codec::decode(data, range.len()) {
            Ok(v) => v,
            Err(e) => return self.reject(from, "PUSH", e),
        };
        if v.len() != range.len() {
            return self.reject(
                from,
                "PUSH",
                Reject::WrongLength {
                    got: v.len(),
                    expected: range.len(),
                },
            );
        }
        let n = norm(&v);
        let bound = claimed * (1.0 + 1e-5) + 1e-6;
        // Incomparable (a NaN norm or claim) is rejected too.
        if n.partial_cmp(&bound).is_none_or(|o| o.is_gt()) {
            return self.reject(from, "PUSH", Reject::NormTooLarge { got: n, bound });
        }
        if let Some(st) = self.r.owned.get_mut(&(close_id, shard)) {
            st.inputs.insert(idx, v);
        }
        self.maybe_finish_shard(close_id, shard, false);
    }

    fn maybe_finish_shard(&mut self, close_id: Hash, shard: u32, deadline: bool) {
        let Some(info) = self.r.closes.get(&close_id) else {
            return;
        };
        let n = info.close.contributors.len();
        let Some(st) = self.r.owned.get(&(close_id, shard)) else {
            return;
        };
        if st.done || st.inputs.is_empty() || (!deadline && st.inputs.len() < n) {
            return;
        }
        let inputs: Vec<(&[f32], u64)> = st
            .inputs
            .iter()
            .map(|(i, v)| {
                (
                    v.as_slice(),
                    self.weight(info.close.contributors[*i].info.tokens),
                )
            })
            .collect();
        let weight: u64 = inputs
            .iter()
            .map(|(_, w)| *w)
            .fold(0u64, |a, b| a.saturating_add(b));
        let agg = aggregate(self.cfg.rule, &inputs);
        let included = bitmap((0..n).map(|i| st.inputs.contains_key(&i)), n);
        let data = codec::encode(self.cfg.codec, &agg);
        let hash = Hash::of(&data);
        self.store.insert(hash, (self.round, Arc::new(data)));
        if let Some(st) = self.r.owned.get_mut(&(close_id, shard)) {
            st.done = true;
        }
        self.gossip(Body::Agg(Agg {
            close: close_id,
            shard,
            included,
            data: hash,
            weight,
        }));
    }

    fn on_agg(&mut self, signer: PeerId, a: Agg) {
        let Some(info) = self.r.closes.get(&a.close) else {
            // CLOSE not seen (lost or still in flight): keep it anyway, checked at SEAL time.
            self.r
                .aggs
                .entry((a.close, a.shard))
                .or_default()
                .push((signer, a));
            return;
        };
        let allowed = info
            .owners
            .get(a.shard as usize)
            .is_some_and(|o| o.contains(&signer));
        if !allowed || a.included.len() != info.close.contributors.len().div_ceil(8) {
            self.reject(signer, "AGG", Reject::NotAllowed("AGG"));
            return;
        }
        let list = self.r.aggs.entry((a.close, a.shard)).or_default();
        if list.len() < 8 {
            list.push((signer, a.clone()));
            self.audit_agg(&a);
        }
        self.leader_progress();
    }

    fn audited_rule(&self) -> bool {
        matches!(self.cfg.rule, Rule::Mean | Rule::NormScreen { .. })
    }

    /// A contributor included in an AGG projects its own shard for it (see [`crate::audit`]).
    fn audit_agg(&mut self, a: &Agg) {
        if !self.audited_rule() || !self.r.audited.insert((a.close, a.shard, a.data)) {
            return;
        }
        let Some(info) = self.r.closes.get(&a.close) else {
            return;
        };
        let Some(c) = self.r.contrib.as_ref() else {
            return;
        };
        let me = self.me;
        let Some(idx) = info
            .close
            .contributors
            .iter()
            .position(|x| x.peer == me && x.ready == c.ready_id)
        else {
            return;
        };
        if !bit(&a.included, idx) {
            return;
        }
        let range = self.shard_range(a.shard as usize);
        let Some(Ok(v)) = c
            .shards
            .get(a.shard as usize)
            .map(|d| codec::decode(d, range.len()))
        else {
            return;
        };
        let seed = audit::seed(&a.close, a.shard, &a.data);
        let proj = audit::project(&seed, &v, audit::AUDIT_PROJECTIONS);
        let entries = self.r.audit_out.entry(a.close).or_default();
        entries.push(AuditEntry {
            shard: a.shard,
            agg: a.data,
            proj: proj.into_iter().map(f64::to_bits).collect(),
        });
        let shards: BTreeSet<u32> = self
            .r
            .audited
            .iter()
            .filter(|(c, ..)| *c == a.close)
            .map(|(_, s, _)| *s)
            .collect();
        if shards.len() >= self.k() {
            self.flush_audits();
        }
    }

    fn flush_audits(&mut self) {
        let pending = std::mem::take(&mut self.r.audit_out);
        for (close, entries) in pending {
            if !entries.is_empty() {
                self.gossip(Body::Audit(Audit { close, entries }));
            }
        }
    }

    fn on_audit(&mut self, signer: PeerId, a: &Audit) {
        // Only the leader collecting for this CLOSE checks aggregates; everyone else drops the
        // AUDITs (storing n x K projections on every peer costs gigabytes at n = 1000).
        if !matches!(self.r.leading, Some(Leading::Collecting { close_id, .. }) if close_id == a.close)
        {
            return;
        }
        let Some(info) = self.r.closes.get(&a.close) else {
            return;
        };
        let Some(idx) = info
            .close
            .contributors
            .iter()
            .position(|c| c.peer == signer)
        else {
            self.reject(signer, "AUDIT", Reject::NotAllowed("AUDIT"));
            return;
        };
        let k = self.k();
        if a.entries.len() > 2 * k {
            self.reject(signer, "AUDIT", Reject::Malformed("AUDIT entries"));
            return;
        }
        for e in &a.entries {
            let proj: Vec<f64> = e.proj.iter().map(|b| f64::from_bits(*b)).collect();
            if e.shard as usize >= k
                || proj.len() != audit::AUDIT_PROJECTIONS
                || proj.iter().any(|x| !x.is_finite())
            {
                self.reject(signer, "AUDIT", Reject::Malformed("AUDIT entry"));
                return;
            }
            let slot = self.r.audits.entry((a.close, e.shard, e.agg)).or_default();
            slot.entry(idx).or_insert(proj);
        }
        self.leader_progress();
    }

    /// Whether every included contributor of every AGG for `close_id` has sent its AUDIT.
    fn audits_complete(&self, close_id: Hash) -> bool {
        if !self.audited_rule() {
            return true;
        }
        let Some(info) = self.r.closes.get(&close_id) else {
            return true;
        };
        let n = info.close.contributors.len();
        (0..self.k() as u32).all(|s| {
            self.r
                .aggs
                .get(&(close_id, s))
                .into_iter()
                .flatten()
                .all(|(_, a)| {
                    let got = self.r.audits.get(&(close_id, s, a.data));
                    (0..n).all(|i| !bit(&a.included, i) || got.is_some_and(|g| g.contains_key(&i)))
                })
        })
    }

    /// Checks an aggregate against its contributors' projections. `None`: not auditable (rule,
    /// or some included contributor sent no AUDIT); `Some(Err(..))`: it fails. An owner that
    /// includes itself must audit its own aggregate (an honest one always does): one that
    /// withholds its AUDIT to make its aggregate unauditable fails.
    fn audit_check(
        &self,
        info: &CloseInfo,
        close_id: Hash,
        shard: u32,
        owner: PeerId,
        a: &Agg,
        values: &[f32],
    ) -> Option<Result<(), Reject>> {
        if !self.audited_rule() {
            return None;
        }
        let got = self.r.audits.get(&(close_id, shard, a.data));
        let owner_idx = info.close.contributors.iter().position(|c| c.peer == owner);
        if let Some(i) = owner_idx.filter(|i| bit(&a.included, *i)) {
            if !got.is_some_and(|g| g.contains_key(&i)) {
                return Some(Err(Reject::Malformed("AGG not audited by its own owner")));
            }
        }
        let got = got?;
        let mut inputs: Vec<(&[f64], u64)> = Vec::new();
        let mut max_norm = 0f32;
        for (i, c) in info.close.contributors.iter().enumerate() {
            if !bit(&a.included, i) {
                continue;
            }
            inputs.push((got.get(&i)?.as_slice(), self.weight(c.info.tokens)));
            max_norm = max_norm.max(f32::from_bits(c.info.norm_bits));
        }
        let want = audit::expected(&inputs)?;
        let seed = audit::seed(&close_id, shard, &a.data);
        let actual = audit::project(&seed, values, audit::AUDIT_PROJECTIONS);
        let tolerance = audit::tolerance(self.cfg.codec, values, inputs.len(), max_norm);
        Some(
            audit::check(&actual, &want, tolerance).map_err(|deviation| Reject::AuditFailed {
                deviation,
                tolerance,
            }),
        )
    }

    fn on_timer(&mut self, t: Timer, rng: &mut dyn RngCore) {
        match t {
            Timer::Straggler(r)
                if r == self.round
                    && self.r.leading.is_none()
                    && self.leader(0) == Some(self.me) =>
            {
                if self.r.readies.is_empty() {
                    self.set_timer(self.now + self.cfg.straggler_timeout, Timer::Straggler(r));
                } else {
                    self.do_close(0);
                }
            }
            Timer::OwnerDeadline(r) if r == self.round => {
                let keys: Vec<(Hash, u32)> = self.r.owned.keys().copied().collect();
                for (c, s) in keys {
                    self.maybe_finish_shard(c, s, true);
                }
            }
            Timer::BackupCheck(r) if r == self.round => self.backup_check(),
            Timer::AuditFlush(r) if r == self.round => self.flush_audits(),
            Timer::SealDeadline(r, b) if r == self.round => self.seal_deadline(b),
            Timer::Attempt(r, b) if r == self.round => {
                let n = self.members.len().max(1) as u32;
                self.set_timer(
                    self.now + u64::from(n) * self.cfg.attempt_timeout,
                    Timer::Attempt(r, b.saturating_add(n)),
                );
                if self.r.decide_target.is_none() && self.leader(b) == Some(self.me) {
                    self.r.leading = Some(Leading::Preparing {
                        ballot: b,
                        promises: BTreeMap::new(),
                    });
                    self.gossip(Body::Prepare(b));
                }
            }
            Timer::Retry(_) => {
                let round = self.round;
                self.set_timer(self.now + self.cfg.retry, Timer::Retry(round));
                self.retry(rng);
            }
            _ => {}
        }
    }

    fn retry(&mut self, rng: &mut dyn RngCore) {
        if !self.synced {
            self.lone_state_timeout();
            if !self.synced {
                self.request_state();
            }
            return;
        }
        if !self.is_member() {
            self.gossip(Body::Join);
        }
        // Re-ask for announced envelopes still missing: the signer first, then random members
        // (everyone who fetched one serves it too).
        let (t_now, t_retry) = (self.now, self.cfg.retry);
        let mut stale: Vec<(Hash, PeerId, u64)> = self
            .announced
            .iter_mut()
            .filter(|(_, (_, t))| now_ge(t_now, *t, t_retry))
            .map(|(h, (a, t))| {
                *t = t_now;
                (*h, a.signer, a.round)
            })
            .collect();
        stale.sort(); // HashMap order is not deterministic; the simulator's traces must be
        for (hash, signer, round) in stale {
            let to = if self.members.is_empty() || rng.next_u32().is_multiple_of(2) {
                signer
            } else {
                self.members[rng.next_u32() as usize % self.members.len()]
            };
            self.send(to, Direct::FetchEnvelope { round, hash });
        }
        // Re-ask for payloads still missing, rotating through the known holders.
        let now = self.now;
        let retry = self.cfg.retry;
        let pending: Vec<(Hash, Vec<PeerId>)> = self
            .r
            .fetch_pending
            .iter_mut()
            .filter(|(_, (_, t))| now >= *t + retry)
            .map(|(h, (v, t))| {
                *t = now;
                (*h, v.clone())
            })
            .collect();
        for (h, sources) in pending {
            if sources.is_empty() {
                continue;
            }
            let to = sources[(rng.next_u32() as usize) % sources.len()];
            self.send(
                to,
                Direct::Fetch {
                    round: self.round,
                    hash: h,
                },
            );
        }
    }

    fn backup_check(&mut self) {
        let me = self.me;
        let round = self.round;
        let closes: Vec<(Hash, CloseInfo)> =
            self.r.closes.iter().map(|(h, c)| (*h, c.clone())).collect();
        for (id, info) in closes {
            for (s, o) in info.owners.iter().enumerate() {
                if o.get(1) != Some(&me) || self.r.aggs.contains_key(&(id, s as u32)) {
                    continue;
                }
                let st = self.r.owned.entry((id, s as u32)).or_default();
                st.backup = true;
                for (i, c) in info.close.contributors.iter().enumerate() {
                    if c.peer == me {
                        if let Some(data) = self.r.contrib.as_ref().map(|x| x.shards[s].clone()) {
                            self.owner_input(id, s as u32, i, &data);
                        }
                    } else {
                        self.send(
                            c.peer,
                            Direct::PullShard {
                                round,
                                close: id,
                                shard: s as u32,
                            },
                        );
                    }
                }
                let at = self.now + self.cfg.agg_timeout / 5;
                self.set_timer(at, Timer::OwnerDeadline(round));
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // leader: collect AGGs, fetch, SEAL

    fn leader_progress(&mut self) {
        let Some(Leading::Collecting { close_id, .. }) = &self.r.leading else {
            return;
        };
        let close_id = *close_id;
        let k = self.k();
        let complete = (0..k as u32).all(|s| self.r.aggs.contains_key(&(close_id, s)));
        // Fetch every candidate we do not hold yet.
        let mut wanted = Vec::new();
        for s in 0..k as u32 {
            for (owner, a) in self.r.aggs.get(&(close_id, s)).into_iter().flatten() {
                if !self.store.contains_key(&a.data) && !self.r.fetch_pending.contains_key(&a.data)
                {
                    wanted.push((a.data, *owner));
                }
            }
        }
        for (h, owner) in wanted {
            self.r.fetch_pending.insert(h, (vec![owner], self.now));
            self.send(
                owner,
                Direct::Fetch {
                    round: self.round,
                    hash: h,
                },
            );
        }
        if complete && self.r.fetch_pending.is_empty() && self.audits_complete(close_id) {
            if let Some(Leading::Collecting { ballot, .. }) = self.r.leading {
                self.seal_deadline(ballot);
            }
        }
    }

    fn seal_deadline(&mut self, ballot: u32) {
        let Some(Leading::Collecting {
            ballot: b,
            close_id,
        }) = &self.r.leading
        else {
            return;
        };
        if *b != ballot {
            return;
        }
        let close_id = *close_id;
        let Some(info) = self.r.closes.get(&close_id).cloned() else {
            return;
        };
        let k = self.k();
        let mut shards = Vec::with_capacity(k);
        for s in 0..k {
            let range = self.shard_range(s);
            let mut cands: Vec<(u64, usize, Hash, PeerId, Agg)> = self
                .r
                .aggs
                .get(&(close_id, s as u32))
                .into_iter()
                .flatten()
                .map(|(p, a)| {
                    let rank = info.owners[s]
                        .iter()
                        .position(|o| o == p)
                        .unwrap_or(usize::MAX);
                    (u64::MAX - a.weight, rank, a.data, *p, a.clone())
                })
                .collect();
            cands.sort_by_key(|x| (x.0, x.1, x.2));
            let mut pick = None;
            for (_, _, h, p, a) in cands {
                let Some((_, data)) = self.store.get(&h) else {
                    continue;
                };
                let Ok(v) = codec::decode(data, range.len()) else {
                    continue;
                };
                if v.len() != range.len() {
                    continue;
                }
                let claims = info
                    .close
                    .contributors
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| bit(&a.included, *i))
                    .map(|(_, c)| f32::from_bits(c.info.norm_bits));
                // A (weighted) mean is no longer than its longest input; a coordinate-wise
                // trimmed mean is bounded by the root of the sum of squared input norms.
                let max_in = match self.cfg.rule {
                    Rule::TrimmedMean { .. } => claims.map(|c| c * c).sum::<f32>().sqrt(),
                    _ => claims.fold(0f32, f32::max),
                };
                if norm(&v) > norm_bound(self.cfg.codec, max_in, v.len()) {
                    self.reject(
                        p,
                        "AGG",
                        Reject::NormTooLarge {
                            got: norm(&v),
                            bound: max_in,
                        },
                    );
                    continue;
                }
                if let Some(Err(why)) = self.audit_check(&info, close_id, s as u32, p, &a, &v) {
                    self.reject(p, "AGG", why);
                    continue;
                }
                pick = Some(SealedShard {
                    owner: p,
                    data: h,
                    included: a.included.clone(),
                    weight: a.weight,
                });
                break;
            }
            shards.push(pick);
        }
        let round = self.round;
        let evict = self.cfg.evict_after_rounds;
        let mut next: Vec<PeerId> = self
            .members
            .iter()
            .filter(|p| {
                **p == self.me
                    || self
                        .last_heard
                        .get(p)
                        .is_some_and(|r| r.saturating_add(evict) > round)
            })
            .chain(self.r.joins.iter())
            .filter(|p| !self.verifier.banned.contains(p))
            .copied()
            .collect();
        next.sort();
        next.dedup();
        let seal = Seal {
            close: info.close,
            close_id,
            shards,
            next_members: next,
        };
        self.r.leading = Some(Leading::Proposed);
        self.gossip(Body::Seal(Propose { ballot, seal }));
    }

    // -----------------------------------------------------------------------------------------
    // ballots

    fn on_prepare(&mut self, signer: PeerId, b: u32) {
        if Some(signer) != self.leader(b) {
            self.reject(signer, "PREPARE", Reject::NotAllowed("PREPARE"));
            return;
        }
        if b > self.r.promised && self.round >= self.vote_from {
            self.r.promised = b;
            let accepted = self.r.accepted.clone();
            self.gossip(Body::Promise(Promise {
                ballot: b,
                accepted,
            }));
        }
    }

    fn on_promise(&mut self, signer: PeerId, p: Promise) {
        let q = self.quorum();
        let Some(Leading::Preparing { ballot, promises }) = &mut self.r.leading else {
            return;
        };
        if p.ballot != *ballot {
            return;
        }
        let ballot = *ballot;
        promises.insert(signer, p);
        if promises.len() < q {
            return;
        }
        let best = promises
            .values()
            .filter_map(|p| p.accepted.clone())
            .max_by_key(|a| a.ballot);
        match best {
            Some(prev) => {
                self.r.leading = Some(Leading::Proposed);
                self.gossip(Body::Seal(Propose {
                    ballot,
                    seal: prev.seal,
                }));
            }
            None => {
                self.r.leading = None;
                self.do_close(ballot);
            }
        }
    }

    fn on_seal(&mut self, env: Arc<Envelope>, ballot: u32) {
        let Body::Seal(p) = &env.body else { return };
        if Some(env.signer) != self.leader(ballot) {
            self.reject(env.signer, "SEAL", Reject::NotAllowed("SEAL"));
            return;
        }
        if let Err(why) = self.check_seal(&p.seal) {
            self.reject(env.signer, "SEAL", Reject::Malformed(why));
            return;
        }
        self.r.proposals.insert(ballot, env.clone());
        if ballot < self.r.promised {
            return;
        }
        self.start_apply(env);
    }

    fn check_seal(&self, seal: &Seal) -> Result<(), &'static str> {
        let n = seal.close.contributors.len();
        if seal.shards.len() != self.k() {
            return Err("shard count");
        }
        if n == 0
            || !seal
                .close
                .contributors
                .windows(2)
                .all(|w| w[0].peer < w[1].peer)
        {
            return Err("contributors");
        }
        if seal.next_members.is_empty() || !seal.next_members.windows(2).all(|w| w[0] < w[1]) {
            return Err("member list");
        }
        if seal
            .shards
            .iter()
            .flatten()
            .any(|s| s.included.len() != n.div_ceil(8))
        {
            return Err("bitmap");
        }
        Ok(())
    }

    /// Begins (or resumes) fetching the aggregates of a proposal, then applies it.
    fn start_apply(&mut self, env: Arc<Envelope>) {
        let Body::Seal(p) = &env.body else { return };
        let mut sources = vec![env.signer];
        for (_, m) in self
            .r
            .commits
            .iter()
            .filter(|((_, h, _), _)| *h == p.seal.hash())
        {
            sources.extend(m.keys().copied());
        }
        for s in p.seal.shards.iter().flatten() {
            if !self.store.contains_key(&s.data) {
                let mut src = vec![s.owner];
                src.extend(sources.iter().copied().filter(|x| *x != s.owner).take(8));
                if !self.r.fetch_pending.contains_key(&s.data) {
                    self.send(
                        s.owner,
                        Direct::Fetch {
                            round: self.round,
                            hash: s.data,
                        },
                    );
                }
                let now = self.now;
                self.r.fetch_pending.insert(s.data, (src, now));
            }
        }
        self.r.applying = Some((env, sources));
        self.try_apply();
    }

    fn try_apply(&mut self) {
        let Some((env, _)) = self.r.applying.clone() else {
            return;
        };
        let Body::Seal(p) = &env.body else { return };
        if p.seal
            .shards
            .iter()
            .flatten()
            .any(|s| !self.store.contains_key(&s.data))
        {
            return;
        }
        let seal_hash = p.seal.hash();
        if !self.r.tentative.contains_key(&seal_hash) {
            let mut delta = vec![0f32; self.cfg.len];
            let ranges = codec::shards(self.cfg.len, self.k());
            for (s, range) in p.seal.shards.iter().zip(ranges) {
                let Some(s) = s else { continue };
                let Some((_, data)) = self.store.get(&s.data) else {
                    return;
                };
                match codec::decode(data, range.len()) {
                    Ok(v) if v.len() == range.len() => delta[range].copy_from_slice(&v),
                    _ => {
                        // A sealed aggregate that does not decode: this proposal can never be
                        // applied; wait for failover.
                        self.reject(env.signer, "SEAL", Reject::Malformed("sealed aggregate"));
                        self.r.applying = None;
                        return;
                    }
                }
            }
            let mut theta = self.theta.clone();
            let mut momentum = self.momentum.clone();
            if outer::nesterov_step(self.cfg.outer, &mut theta, &mut momentum, &delta).is_err() {
                self.r.applying = None;
                return;
            }
            let state = state_hash(&theta, &momentum);
            let next_chain = Hash::of_parts(&[&self.chain.0, &seal_hash.0]);
            self.r.tentative.insert(
                seal_hash,
                Tentative {
                    theta,
                    momentum,
                    state,
                    next_chain,
                },
            );
        }
        self.r.applying = None;
        let (state, next_chain) = {
            let t = &self.r.tentative[&seal_hash];
            (t.state, t.next_chain)
        };
        if let Some((_, h, st)) = self.r.decide_target {
            if h == seal_hash && st == state {
                self.finalize(seal_hash);
                return;
            }
        }
        if p.ballot >= self.r.promised && self.is_member() && self.round >= self.vote_from {
            self.r.promised = p.ballot;
            self.r.accepted = Some(p.clone());
            self.gossip(Body::Commit(Commit {
                ballot: p.ballot,
                seal: seal_hash,
                next_chain,
                state,
            }));
        }
    }

    fn on_commit(&mut self, env: Arc<Envelope>, c: Commit) {
        let key = (c.ballot, c.seal, c.state);
        let q = self.quorum();
        let set = self.r.commits.entry(key).or_default();
        set.insert(env.signer, env.clone());
        if set.len() >= q && self.r.decide_target.is_none() {
            self.r.decide_target = Some(key);
            if self
                .r
                .tentative
                .get(&c.seal)
                .is_some_and(|t| t.state == c.state)
            {
                self.finalize(c.seal);
            } else if let Some(p) = self.r.proposals.get(&c.ballot).cloned() {
                self.start_apply(p);
            } else {
                // We never saw the SEAL: ask a committer for the decision proof.
                self.send(env.signer, Direct::SyncRequest { from: self.round });
            }
        }
    }

    fn finalize(&mut self, seal_hash: Hash) {
        let Some((ballot, _, state)) = self.r.decide_target else {
            return;
        };
        let Some(t) = self.r.tentative.remove(&seal_hash) else {
            return;
        };
        if t.state != state {
            return;
        }
        let Some(seal_env) = self.r.proposals.get(&ballot).cloned() else {
            return;
        };
        let Body::Seal(p) = &seal_env.body else {
            return;
        };
        // Every COMMIT received so far (at least a quorum, at most one per member): a peer that
        // catches up by state transfer looks for its own members among the signers.
        let commits: Vec<Envelope> = self.r.commits[&(ballot, seal_hash, state)]
            .values()
            .map(|e| (**e).clone())
            .collect();
        let round = self.round;
        self.history.push_back((
            round,
            DecisionProof {
                seal: (*seal_env).clone(),
                commits,
            },
        ));
        while self.history.len() as u64 > RETAIN_ROUNDS {
            self.history.pop_front();
        }
        // Straggler: my READY missed the CLOSE -> fold my delta into the next one.
        if let Some(c) = self.r.contrib.take() {
            if !p.seal.close.contributors.iter().any(|x| x.peer == self.me) {
                self.carry = Some((c.delta, c.tokens));
            }
        }
        self.theta = t.theta;
        self.momentum = t.momentum;
        self.chain = t.next_chain;
        self.members = p.seal.next_members.clone();
        let members = &self.members;
        self.last_heard
            .retain(|p, _| members.binary_search(p).is_ok());
        self.round += 1;
        self.r = RoundState::default();
        let keep_from = self.round.saturating_sub(RETAIN_ROUNDS);
        self.store.retain(|_, (r, _)| *r >= keep_from);
        self.big.retain(|_, (r, _)| *r >= keep_from);
        let round_now = self.round;
        self.announced.retain(|_, (a, _)| a.round >= round_now);
        self.seen.retain(|(_, r, ..), _| *r >= self.round);
        self.out.push(OutEvent::Decided {
            round,
            seal: seal_hash,
            state,
        });
        if self.is_member() {
            self.out.push(OutEvent::Train { round: self.round });
        } else {
            self.gossip(Body::Join);
        }
        // A peer catching up asks for the next round at once rather than after `retry`.
        self.last_sync = None;
        let future = std::mem::take(&mut self.future);
        for env in future {
            self.on_gossip(env, true);
        }
    }

    // -----------------------------------------------------------------------------------------
    // direct messages, catch-up, state sync

    fn maybe_sync(&mut self, from: PeerId) {
        let due = self
            .last_sync
            .is_none_or(|t| self.now >= t + self.cfg.retry);
        if due {
            self.last_sync = Some(self.now);
            self.state_wanted = true;
            self.send(from, Direct::SyncRequest { from: self.round });
        }
    }

    fn request_state(&mut self) {
        let due = self
            .last_sync
            .is_none_or(|t| self.now >= t + self.cfg.retry);
        if !due {
            return;
        }
        self.last_sync = Some(self.now);
        self.state_wanted = true;
        // Two requests in flight while no state is held, one once a state is held (a second,
        // independent donor is what the cross-check needs; the lone-state timeout waits for
        // it). A request is in flight until answered or for the patience window, and nobody is
        // asked twice within that window. Contacts that have not sent a state held now come
        // first; chosen by time so that successive retries ask different contacts.
        let patience = self.state_patience();
        let now = self.now;
        let recent = |t: &Time| now < t.saturating_add(patience);
        let in_flight = self.state_requests_in_flight();
        let want: usize = if self.candidates.is_empty() { 2 } else { 1 };
        let need = want.saturating_sub(in_flight);
        let ready: Vec<PeerId> = self
            .contacts
            .iter()
            .filter(|p| self.state_asked.get(p).is_none_or(|(t, _)| !recent(t)))
            .copied()
            .collect();
        let held = |p: &PeerId| self.candidates.iter().any(|c| c.donors.contains(p));
        let fresh: Vec<PeerId> = ready.iter().filter(|p| !held(p)).copied().collect();
        let pick = if fresh.is_empty() { ready } else { fresh };
        if pick.is_empty() || need == 0 {
            return;
        }
        let i = need * (self.now / self.cfg.retry.max(1)) as usize;
        for j in 0..need.min(pick.len()) {
            let p = pick[(i + j) % pick.len()];
            self.state_asked.insert(p, (now, false));
            self.send(p, Direct::StateRequest);
        }
        if self.state_asked.len() > 4 * MAX_BUFFERED {
            self.state_asked.retain(|_, (t, _)| recent(t));
        }
    }

    /// The window of [`STATE_PATIENCE_RETRIES`] retry periods.
    fn state_patience(&self) -> Time {
        STATE_PATIENCE_RETRIES * self.cfg.retry
    }

    /// State requests sent less than the patience window ago and not answered yet.
    fn state_requests_in_flight(&self) -> usize {
        let patience = self.state_patience();
        self.state_asked
            .values()
            .filter(|(t, answered)| !answered && self.now < t.saturating_add(patience))
            .count()
    }

    /// Whether a full state may be sent to `to` now (see [`STATE_PATIENCE_RETRIES`]); records
    /// it if so.
    fn may_serve_state(&mut self, to: PeerId) -> bool {
        let window = self.state_patience();
        let now = self.now;
        self.state_served
            .retain(|_, t| now < t.saturating_add(window));
        if self.state_served.contains_key(&to) || self.state_served.len() >= MAX_STATES_SERVED {
            return false;
        }
        self.state_served.insert(to, now);
        true
    }

    fn on_direct(&mut self, from: PeerId, msg: Arc<Direct>) {
        match &*msg {
            Direct::PushShard {
                round,
                close,
                shard,
                data,
                proof,
            } => {
                if self.synced {
                    self.on_push(from, *round, *close, *shard, data, proof);
                }
            }
            Direct::PullShard {
                round,
                close,
                shard,
            } => {
                if *round != self.round {
                    return;
                }
                let Some(c) = self.r.contrib.as_ref() else {
                    return;
                };
                let Some(data) = c.shards.get(*shard as usize).cloned() else {
                    return;
                };
                let proof = wire::merkle_proof(&c.leaves, *shard as usize);
                self.send(
                    from,
                    Direct::PushShard {
                        round: *round,
                        close: *close,
                        shard: *shard,
                        data,
                        proof,
                    },
                );
            }
            Direct::Fetch { round, hash } => {
                let reply = match self.store.get(hash) {
                    Some((_, d)) => Direct::Data {
                        round: *round,
                        hash: *hash,
                        data: (**d).clone(),
                    },
                    None => Direct::NotFound,
                };
                self.send(from, reply);
            }
            Direct::Data { round, hash, data } => {
                if !self.r.fetch_pending.contains_key(hash) {
                    return;
                }
                if Hash::of(data) != *hash {
                    self.reject(from, "DATA", Reject::HashMismatch);
                    return;
                }
                self.r.fetch_pending.remove(hash);
                self.store.insert(*hash, (*round, Arc::new(data.clone())));
                self.leader_progress();
                self.try_apply();
            }
            Direct::SyncRequest { from: first } => self.on_sync_request(from, *first),
            Direct::SyncProofs(proofs) => {
                if let Some(p) = proofs.first() {
                    self.on_proof(from, p.clone());
                }
            }
            Direct::StateRequest => {
                if !self.synced {
                    // Say so at once: the asker frees its request slot for someone who has it.
                    self.send(from, Direct::NotFound);
                    return;
                }
                let current = matches!(self.history.back(), Some((r, _)) if r + 1 == self.round);
                if current && !self.may_serve_state(from) {
                    return; // sent it recently (to this peer or to too many): it asks elsewhere
                }
                match self.history.back() {
                    Some((r, proof)) if r + 1 == self.round => {
                        let msg = Direct::State {
                            round: self.round,
                            proof: Box::new(proof.clone()),
                            theta: codec::encode(Quantization::F32, &self.theta),
                            momentum: codec::encode(Quantization::F32, &self.momentum),
                        };
                        self.send(from, msg);
                    }
                    _ => self.send(from, Direct::NotFound),
                }
            }
            Direct::State {
                round,
                proof,
                theta,
                momentum,
            } => {
                if let Some(a) = self.state_asked.get_mut(&from) {
                    a.1 = true;
                }
                self.on_state(from, *round, proof, theta, momentum)
            }
            Direct::NotFound => {
                if let Some(a) = self.state_asked.get_mut(&from) {
                    a.1 = true;
                }
            }
            Direct::FetchEnvelope { hash, .. } => {
                let reply = match self.big.get(hash) {
                    Some((r, bytes)) => Direct::FullEnvelope {
                        round: *r,
                        bytes: (**bytes).clone(),
                    },
                    None => Direct::NotFound,
                };
                self.send(from, reply);
            }
            Direct::FullEnvelope { bytes, .. } => self.on_full_envelope(from, bytes),
        }
    }

    fn on_sync_request(&mut self, from: PeerId, first: u64) {
        if !self.synced || first >= self.round {
            return;
        }
        let proof = self
            .history
            .iter()
            .find(|(r, _)| *r == first)
            .map(|(_, p)| p.clone());
        match proof {
            Some(p) if self.round - first <= REPLAY_MAX_ROUNDS => {
                self.send(from, Direct::SyncProofs(vec![p]));
            }
            // Too far behind to replay quickly (or older than the proofs kept): send the state.
            _ => self.on_direct(from, Arc::new(Direct::StateRequest)),
        }
    }

    fn verify_proof(&self, proof: &DecisionProof) -> Result<(Propose, Commit), &'static str> {
        let seal = &proof.seal;
        let Body::Seal(p) = &seal.body else {
            return Err("not a SEAL");
        };
        if seal.run != self.cfg.run || seal.round != self.round || seal.chain != self.chain {
            return Err("SEAL for another round or chain");
        }
        if Some(seal.signer) != self.leader(p.ballot) || !seal.verify_signature() {
            return Err("SEAL signer");
        }
        self.check_seal(&p.seal)?;
        if proof.commits.len() > self.members.len() {
            return Err("more COMMITs than members");
        }
        let seal_hash = p.seal.hash();
        let mut signers = BTreeSet::new();
        let mut agreed: Option<Commit> = None;
        for c in &proof.commits {
            let Body::Commit(cm) = &c.body else {
                return Err("not a COMMIT");
            };
            if c.round != self.round || c.chain != self.chain || c.run != self.cfg.run {
                return Err("COMMIT for another round");
            }
            if cm.seal != seal_hash || cm.ballot != p.ballot || agreed.is_some_and(|a| a != *cm) {
                return Err("COMMITs disagree");
            }
            if self.members.binary_search(&c.signer).is_err() || !c.verify_signature() {
                return Err("COMMIT signer");
            }
            signers.insert(c.signer);
            agreed = Some(*cm);
        }
        match agreed {
            Some(c) if signers.len() >= self.quorum() => Ok((p.clone(), c)),
            _ => Err("no quorum"),
        }
    }

    fn on_proof(&mut self, from: PeerId, proof: DecisionProof) {
        if !self.synced || proof.seal.round != self.round || self.r.decide_target.is_some() {
            return;
        }
        match self.verify_proof(&proof) {
            Ok((p, c)) => {
                let env = Arc::new(proof.seal.clone());
                for ce in &proof.commits {
                    // A member whose COMMIT decided this round was active in it, even if its
                    // gossip never reached us: it must not be evicted as silent.
                    self.last_heard.insert(ce.signer, self.round);
                    self.r
                        .commits
                        .entry((c.ballot, c.seal, c.state))
                        .or_default()
                        .insert(ce.signer, Arc::new(ce.clone()));
                }
                self.r.proposals.insert(p.ballot, env.clone());
                self.r.decide_target = Some((c.ballot, c.seal, c.state));
                self.start_apply(env);
                // The peer that sent the proof holds the aggregates too.
                for (v, _) in self.r.fetch_pending.values_mut() {
                    if !v.contains(&from) {
                        v.insert(0, from);
                    }
                }
            }
            Err(why) => self.reject(from, "SYNC", Reject::BadDecision(why)),
        }
    }

    fn on_state(
        &mut self,
        from: PeerId,
        round: u64,
        proof: &DecisionProof,
        theta: &[u8],
        momentum: &[u8],
    ) {
        if self.synced && (round <= self.round + REPLAY_MAX_ROUNDS || !self.state_wanted) {
            return; // proofs are enough when this close behind; unasked-for states are ignored
        }
        let c = match self.check_state(round, proof, theta, momentum) {
            Ok(c) => c,
            Err(reason) => return self.reject(from, "STATE", reason),
        };
        if self.synced {
            // A peer that is merely behind holds agreed state: it adopts a later state whose
            // COMMITs a quorum of its own members signed (membership changes slowly, and a
            // minority of them cannot forge it). Otherwise (the membership changed while it was
            // away) two donors must agree, as for a joiner; a lone state is never accepted by a
            // synced peer.
            if signed_by(&c.signers, &self.members) >= self.quorum() {
                self.adopt_state(c);
            } else {
                self.cross_check(from, c);
            }
            return;
        }
        if self.contacts.len() <= 1 {
            // A joiner that knows a single contact: nobody to compare with.
            self.adopt_state(c);
            return;
        }
        self.cross_check(from, c);
    }

    /// Validates a State: payload lengths, and a quorum (of the SEAL's next member list) of
    /// validly signed COMMITs for the SEAL whose state hash matches the bytes received.
    fn check_state(
        &self,
        round: u64,
        proof: &DecisionProof,
        theta: &[u8],
        momentum: &[u8],
    ) -> Result<StateCandidate, Reject> {
        if round == 0 {
            return Err(Reject::BadDecision("state for round 0"));
        }
        let (Ok(t), Ok(m)) = (
            codec::decode(theta, self.cfg.len),
            codec::decode(momentum, self.cfg.len),
        ) else {
            return Err(Reject::BadDecision("state payload"));
        };
        if t.len() != self.cfg.len || m.len() != self.cfg.len {
            return Err(Reject::WrongLength {
                got: t.len(),
                expected: self.cfg.len,
            });
        }
        let Body::Seal(p) = &proof.seal.body else {
            return Err(Reject::BadDecision("not a SEAL"));
        };
        let seal_hash = p.seal.hash();
        let sh = state_hash(&t, &m);
        let members = &p.seal.next_members;
        if members.is_empty() || !members.windows(2).all(|w| w[0] < w[1]) {
            return Err(Reject::BadDecision("member list"));
        }
        // COMMITs come from the round's members, which differ a little from the next ones.
        if proof.commits.len() > 2 * members.len() + 8 {
            return Err(Reject::BadDecision("more COMMITs than members"));
        }
        let mut signers = BTreeSet::new();
        let mut next_chain = None;
        for c in &proof.commits {
            let Body::Commit(cm) = &c.body else { continue };
            if cm.seal == seal_hash
                && cm.state == sh
                && c.round.checked_add(1) == Some(round)
                && c.run == self.cfg.run
                && next_chain.is_none_or(|n| n == cm.next_chain)
                && members.binary_search(&c.signer).is_ok()
                && c.verify_signature()
            {
                signers.insert(c.signer);
                next_chain = Some(cm.next_chain);
            }
        }
        let Some(next_chain) = next_chain else {
            return Err(Reject::BadDecision("no matching COMMIT"));
        };
        if signers.len()
            < self
                .cfg
                .quorum
                .size(members.len())
                .min(proof.commits.len())
                .max(1)
        {
            return Err(Reject::BadDecision("no quorum"));
        }
        Ok(StateCandidate {
            round,
            state: sh,
            seal: seal_hash,
            next_chain,
            members: members.clone(),
            signers,
            proof: proof.clone(),
            theta: t,
            momentum: m,
            donors: BTreeSet::new(),
            since: self.now,
        })
    }

    /// A joiner's cross-check: it accepts a State once two donors vouch for the same (round,
    /// state hash); when they disagree it prefers the later round if that round's COMMIT
    /// signers include more than a third of the earlier state's members (so a donor that
    /// fabricates a history signed by keys of its own cannot win), and reports the other.
    /// A lone state is accepted after `LONE_STATE_RETRIES * retry` if no other donor answered
    /// by then (two more contacts are asked every `retry`).
    fn cross_check(&mut self, from: PeerId, mut c: StateCandidate) {
        let key = (c.round, c.state);
        if let Some(i) = self
            .candidates
            .iter()
            .position(|x| (x.round, x.state) == key)
        {
            self.candidates[i].donors.insert(from);
            if self.candidates[i].donors.len() >= 2 {
                let c = self.candidates.swap_remove(i);
                self.adopt_state(c);
            }
            return;
        }
        c.donors.insert(from);
        let mut adopt: Option<(StateCandidate, Vec<PeerId>)> = None;
        let mut conflicts: Vec<PeerId> = Vec::new();
        // Candidates that `c` replaces (same donors, an earlier round), and whether `c` itself
        // is an earlier round of a candidate already held from the same donors.
        let mut replaced: Vec<usize> = Vec::new();
        let mut stale = false;
        for (i, o) in self.candidates.iter().enumerate() {
            let (hi, lo) = if c.round >= o.round { (&c, o) } else { (o, &c) };
            if hi.round > lo.round && linked(hi, lo) {
                if hi.donors.is_subset(&lo.donors) {
                    // The same donor moved on a round or more: no independent evidence (a
                    // liar's fabricated states link to each other), and no conflict either.
                    // Keep only its latest state, and its age, so that a lone honest donor is
                    // still accepted after the lone-state timeout while the group advances.
                    if c.round > o.round {
                        replaced.push(i);
                    } else {
                        stale = true;
                    }
                    continue;
                }
                let losers: Vec<PeerId> = lo.donors.iter().copied().collect();
                adopt = Some((hi.clone(), losers));
                break;
            }
            conflicts.extend(o.donors.iter().copied());
        }
        if let Some((hi, losers)) = adopt {
            for p in losers {
                self.reject(
                    p,
                    "STATE",
                    Reject::BadDecision("state superseded by a later proven round"),
                );
            }
            self.adopt_state(hi);
            return;
        }
        if !conflicts.is_empty() {
            conflicts.push(from);
            conflicts.sort();
            conflicts.dedup();
            for p in conflicts {
                self.reject(
                    p,
                    "STATE",
                    Reject::BadDecision("donors disagree on the state"),
                );
            }
            // Ask someone else now rather than at the next retry.
            self.last_sync = None;
            self.request_state();
        }
        if stale {
            return;
        }
        for i in replaced.into_iter().rev() {
            let old = self.candidates.remove(i);
            c.since = c.since.min(old.since);
        }
        if self.candidates.len() >= MAX_STATE_CANDIDATES {
            // Keep the memory bounded: drop the oldest candidate.
            self.candidates.remove(0);
        }
        self.candidates.push(c);
    }

    /// Accepts a lone State that nobody contradicted within `LONE_STATE_RETRIES * retry`, once
    /// no request to another contact is still in flight (its answer could contradict it).
    fn lone_state_timeout(&mut self) {
        if self.synced || self.candidates.len() != 1 || self.state_requests_in_flight() > 0 {
            return;
        }
        if self.now
            >= self.candidates[0]
                .since
                .saturating_add(LONE_STATE_RETRIES * self.cfg.retry)
        {
            if let Some(c) = self.candidates.pop() {
                self.adopt_state(c);
            }
        }
    }

    fn adopt_state(&mut self, c: StateCandidate) {
        let round = c.round;
        self.theta = c.theta;
        self.momentum = c.momentum;
        self.round = round;
        self.chain = c.next_chain;
        self.members = c.members;
        self.reset_heard();
        self.synced = true;
        self.state_wanted = false;
        self.carry = None;
        self.candidates.clear();
        self.state_asked.clear();
        self.r = RoundState::default();
        self.future.clear();
        self.history.clear();
        self.history.push_back((round - 1, c.proof));
        self.out.push(OutEvent::Decided {
            round: round - 1,
            seal: c.seal,
            state: c.state,
        });
        if self.is_member() {
            self.out.push(OutEvent::Train { round });
        } else {
            self.gossip(Body::Join);
        }
    }
}

/// Whether the later state `hi` extends the history of `lo` as far as a joiner can tell: more
/// than a third of `lo`'s members signed `hi`'s decision (membership changes slowly; a donor
/// controlling fewer than a third of the members cannot forge this).
fn linked(hi: &StateCandidate, lo: &StateCandidate) -> bool {
    signed_by(&hi.signers, &lo.members) * 3 > lo.members.len()
}

/// How many of the (sorted) `members` are among `signers`.
fn signed_by(signers: &BTreeSet<PeerId>, members: &[PeerId]) -> usize {
    signers
        .iter()
        .filter(|p| members.binary_search(p).is_ok())
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The owner ranking as first written (full sort per shard), to check the linear-scan
    /// version and its memo against.
    fn owners_by_sorting(chain: &Hash, servers: &[PeerId], k: usize) -> Vec<Vec<PeerId>> {
        let cap = k.div_ceil(servers.len());
        let mut load: HashMap<PeerId, usize> = HashMap::new();
        (0..k)
            .map(|s| {
                let mut ranked: Vec<(Hash, PeerId)> = servers
                    .iter()
                    .map(|p| {
                        (
                            Hash::of_parts(&[&chain.0, &(s as u64).to_le_bytes(), &p.0]),
                            *p,
                        )
                    })
                    .collect();
                ranked.sort();
                let ranked: Vec<PeerId> = ranked.into_iter().map(|(_, p)| p).collect();
                let pos = ranked
                    .iter()
                    .position(|p| load.get(p).copied().unwrap_or(0) < cap)
                    .unwrap_or(0);
                let owner = ranked[pos];
                *load.entry(owner).or_default() += 1;
                let mut out = vec![owner];
                out.extend(ranked.iter().copied().filter(|p| *p != owner).take(1));
                out
            })
            .collect()
    }

    #[test]
    fn shard_owners_match_the_sorted_ranking() {
        for n in [1usize, 2, 3, 7, 64, 300] {
            for k in [1usize, 5, 64, 256] {
                let mut servers: Vec<PeerId> = (0..n as u32)
                    .map(|i| PeerId(Hash::of(&(i + 1000 * n as u32).to_le_bytes()).0))
                    .collect();
                servers.sort();
                let chain = Hash::of(&[n as u8, k as u8]);
                let want = owners_by_sorting(&chain, &servers, k);
                assert_eq!(shard_owners(&chain, &servers, k), want, "n={n} k={k}");
                // Memoized second call.
                assert_eq!(shard_owners(&chain, &servers, k), want, "n={n} k={k}");
            }
        }
    }
}
