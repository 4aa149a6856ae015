//! The averaging state machine: sealed rounds, with no I/O.
//!
//! The caller feeds [`InEvent`]s together with the current time (ms) and a seeded RNG into
//! [`State::handle`] and carries out the [`OutEvent`]s it returns (gossip this envelope, send
//! this direct message, set this timer, train the next round). The same code runs inside the
//! node and inside the seeded simulator (`crate::sim`).
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
//!
//! # Layout
//!
//! One [`State`], its methods grouped by what they do:
//!
//! * `config`: [`Config`], [`Quorum`], [`Rule`] and the protocol's limits;
//! * `events`: [`InEvent`], [`OutEvent`], [`Timer`], [`Reject`];
//! * `ranking`: [`leader_order`], [`shard_owners`], [`shard_count`];
//! * `aggregate`: [`aggregate`], norms and norm bounds;
//! * `intake`: training results, READY, gossip admission, equivocation, announcements;
//! * `reduce`: CLOSE, shard pushes, owners and backups, AGG;
//! * `audits`: AUDIT projections and the leader's aggregate checks;
//! * `ballot`: the leader's SEAL, PREPARE / PROMISE, SEAL checks, timers and the periodic retry;
//! * `commit`: applying a SEAL, COMMIT, finalizing a round;
//! * `direct`: direct-stream intake and serving;
//! * `sync`: catch-up by decision proofs, state transfer, donor cross-checks.
//!
//! This file holds the `State` struct and its per-round bookkeeping, the constructors and
//! accessors, [`State::start`], [`State::handle`] and the helpers every module uses.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use ed25519_dalek::SigningKey;
use rand_chacha::rand_core::RngCore;

use crate::wire::{
    self, Agg, AuditEntry, Body, Certificate, Close, DecisionProof, Direct, Envelope, Hash, Invite,
    Join, PeerKey, Ready, Signature, Verifier,
};

mod aggregate;
mod audits;
mod ballot;
mod commit;
mod config;
mod direct;
mod events;
mod intake;
mod ranking;
mod reconfig;
mod reduce;
mod sync;

pub use aggregate::aggregate;
pub use config::{
    max_joins, Admission, Config, Quorum, Rule, BALLOT_EARLY, LONE_STATE_RETRIES,
    MAX_ANNOUNCED_PENDING, MAX_BUFFERED, MAX_STATES_SERVED, MAX_STATE_CANDIDATES,
    REPLAY_MAX_ROUNDS, RETAIN_ROUNDS, STATE_PATIENCE_RETRIES,
};
pub use events::{InEvent, OutEvent, Reject, Time, Timer};
pub use ranking::{leader_order, shard_count, shard_owners};
pub use sync::RivalHistory;

/// Hash of the replicated state (theta_g and momentum, little-endian f32).
pub fn state_hash(theta: &[f32], momentum: &[f32]) -> Hash {
    let mut h = blake3::Hasher::new();
    for v in theta.iter().chain(momentum) {
        h.update(&v.to_le_bytes());
    }
    Hash(*h.finalize().as_bytes())
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
    owners: Vec<Vec<PeerKey>>,
}

/// A validated State offered by a donor, waiting for a second donor's word.
#[derive(Debug, Clone)]
struct StateCandidate {
    round: u64,
    state: Hash,
    seal: Hash,
    next_chain: Hash,
    members: Vec<PeerKey>,
    signers: BTreeSet<PeerKey>,
    proof: DecisionProof,
    theta: Vec<f32>,
    momentum: Vec<f32>,
    donors: BTreeSet<PeerKey>,
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
        /// Valid PROMISEs for the ballot, by signer (their certificates checked on arrival).
        promises: BTreeMap<PeerKey, Arc<Envelope>>,
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
    /// JOINs reported as over this round's admission bound.
    joins_deferred: BTreeSet<PeerKey>,
    reference: Option<Time>,
    contrib: Option<Contribution>,
    readies: BTreeMap<PeerKey, (Hash, Ready, Signature)>,
    closes: HashMap<Hash, CloseInfo>,
    owned: BTreeMap<(Hash, u32), OwnerState>,
    aggs: BTreeMap<(Hash, u32), Vec<(PeerKey, Agg, Signature)>>,
    promised: u32,
    /// The highest ballot this peer ACCEPTed a SEAL under, with the SEAL's hash (one SEAL per
    /// ballot at most).
    accepted: Option<(u32, Hash)>,
    /// The highest ballot this peer COMMITted under.
    committed: Option<u32>,
    /// ACCEPT votes seen: (ballot, SEAL hash) -> member -> signature.
    accepts: BTreeMap<(u32, Hash), BTreeMap<PeerKey, Signature>>,
    /// The highest-ballot certificate (quorum of ACCEPTs) this peer holds.
    prepared: Option<Certificate>,
    /// ACCEPT votes whose signatures were verified (gossip or certificates), by
    /// `ballot::vote_key`: each signature is checked once per round.
    votes_checked: BTreeSet<Hash>,
    /// The PROMISEs that justify the ballot this peer leads (attached to its SEAL).
    justification: Vec<Envelope>,
    proposals: BTreeMap<u32, Arc<Envelope>>,
    applying: Option<(Arc<Envelope>, Vec<PeerKey>)>,
    tentative: HashMap<Hash, Tentative>,
    commits: HashMap<(u32, Hash, Hash), BTreeMap<PeerKey, Arc<Envelope>>>,
    leading: Option<Leading>,
    /// The highest ballot each member was seen to PROMISE this round (evidence that an honest
    /// clock reached it, [`State::ballot_bound`]).
    promised_by: BTreeMap<PeerKey, u32>,
    /// Per leader, the highest PREPARE refused as ahead of this peer's clock: promised once
    /// the evidence catches up with it.
    ahead: BTreeMap<PeerKey, u32>,
    /// JOINs admissible under the run's policy, by signer.
    joins: BTreeMap<PeerKey, Arc<Envelope>>,
    decide_target: Option<(u32, Hash, Hash)>,
    fetch_pending: BTreeMap<Hash, (Vec<PeerKey>, Time)>,
    early_pushes: Vec<(PeerKey, Arc<Direct>)>,
    /// Audit projections received: (close, shard, aggregate) -> contributor index -> values.
    audits: HashMap<(Hash, u32, Hash), BTreeMap<usize, Vec<f64>>>,
    /// My audit entries not gossiped yet, per CLOSE, and every (close, shard, agg) I audited.
    audit_out: BTreeMap<Hash, Vec<AuditEntry>>,
    audited: BTreeSet<(Hash, u32, Hash)>,
    /// When this peer last gossiped the round's RECONFIGs again (for a member that missed
    /// them).
    reconfig_sent: Option<Time>,
}

/// One peer's protocol state.
pub struct State {
    cfg: Config,
    key: SigningKey,
    me: PeerKey,
    verifier: Verifier,
    round: u64,
    chain: Hash,
    members: Vec<PeerKey>,
    theta: Vec<f32>,
    momentum: Vec<f32>,
    synced: bool,
    r: RoundState,
    history: VecDeque<(u64, DecisionProof)>,
    store: HashMap<Hash, (u64, Arc<Vec<u8>>)>,
    carry: Option<(Vec<f32>, u64)>,
    seen: HashMap<(PeerKey, u64, u8, u32, Hash), Arc<Envelope>>,
    future: Vec<Arc<Envelope>>,
    last_heard: HashMap<PeerKey, u64>,
    contacts: BTreeSet<PeerKey>,
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
    state_asked: BTreeMap<PeerKey, (Time, bool)>,
    /// When this peer last sent a state to each peer (within the patience window: at most one
    /// state per peer in it, so its size is also how many were sent in all).
    state_served: BTreeMap<PeerKey, Time>,
    /// Peers sent a SyncRequest since the last adoption (a synced peer takes a State only from
    /// a peer it asked), with when.
    sync_asked: BTreeMap<PeerKey, Time>,
    /// The invitation this peer's JOINs carry (runs with `Admission::Invite`).
    invite: Option<Invite>,
    /// When this peer was restored from a checkpoint, until a decision or an adopted state
    /// confirms it: its member list may be stale or of an abandoned history. If its members
    /// have not brought it up to date within the state patience window, it listens to
    /// later-round gossip from non-members and cross-checks donors like a joiner
    /// ([`State::trusts_strangers`]).
    unconfirmed: Option<Time>,
    /// The operator's RECONFIGs applied in the current round (they go into its decision
    /// proof).
    reconfigs: Vec<Envelope>,
}

impl State {
    /// A founding member of a run: everyone starts from the same `theta0`, zero momentum, round
    /// 0, chain `blake3(run)`, and the same sorted member list.
    pub fn genesis(
        cfg: Config,
        key: SigningKey,
        theta0: Vec<f32>,
        mut members: Vec<PeerKey>,
    ) -> Self {
        members.sort();
        members.dedup();
        let mut s = Self::blank(cfg, key);
        s.momentum = vec![0.0; theta0.len()];
        s.theta = theta0;
        // Round 0's chain names the founder (the lowest founding key), so that two histories
        // founded apart differ in every round, round 0 included ([`State::check_rival`]).
        if let Some(f) = members.first() {
            s.chain = Hash::of_parts(&[&s.cfg.run.0, &f.0]);
        }
        s.members = members;
        s.synced = true;
        s.reset_heard();
        s
    }

    /// A peer with no state (a joiner, or a restart that lost its disk): it asks its contacts
    /// for the state, then gossips JOIN.
    pub fn joiner(cfg: Config, key: SigningKey, contacts: Vec<PeerKey>) -> Self {
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
        members: Vec<PeerKey>,
        theta: Vec<f32>,
        momentum: Vec<f32>,
    ) -> Self {
        let mut s = Self::genesis(cfg, key, theta, members);
        s.momentum = momentum;
        s.round = round;
        s.chain = chain;
        s.reset_heard();
        s.unconfirmed = Some(0);
        s
    }

    fn blank(cfg: Config, key: SigningKey) -> Self {
        let me = PeerKey::of(&key);
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
            sync_asked: BTreeMap::new(),
            unconfirmed: None,
            reconfigs: Vec::new(),
            invite: None,
        }
    }

    /// This peer's id.
    pub fn id(&self) -> PeerKey {
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
    pub fn members(&self) -> &[PeerKey] {
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
    pub fn banned(&self) -> &BTreeSet<PeerKey> {
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

    /// Sets the invitation this peer's JOINs carry.
    pub fn set_invite(&mut self, invite: Option<Invite>) {
        self.invite = invite;
    }

    /// The JOIN this peer gossips while it is no member.
    fn join_body(&self) -> Body {
        Body::Join(Join {
            invite: self.invite,
        })
    }

    /// Starts the peer: founding members are asked to train round 0; others ask for state.
    pub fn start(&mut self, now: Time) -> Vec<OutEvent> {
        self.now = now;
        if self.unconfirmed.is_some() {
            self.unconfirmed = Some(now);
        }
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

    fn set_timer(&mut self, at: Time, timer: Timer) {
        self.out.push(OutEvent::SetTimer { at, timer });
    }

    fn reject(&mut self, from: PeerKey, kind: &'static str, reason: impl Into<Reject>) {
        self.out.push(OutEvent::Rejected {
            from,
            kind,
            reason: reason.into(),
        });
    }

    fn send(&mut self, to: PeerKey, msg: Direct) {
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

    fn k(&self) -> usize {
        shard_count(&self.cfg, self.members.len())
    }

    /// How many members' votes decide (or certify) in the current round.
    pub fn quorum(&self) -> usize {
        self.cfg.quorum.size(self.members.len())
    }

    fn leader(&self, ballot: u32) -> Option<PeerKey> {
        let order = leader_order(&self.chain, &self.members);
        order.get(ballot as usize % order.len().max(1)).copied()
    }

    /// Whether this peer may vote (PROMISE, ACCEPT, COMMIT) in its current round: not in a
    /// round it may have voted in before a restart ([`State::set_vote_from`]).
    fn may_vote(&self) -> bool {
        self.round >= self.vote_from
    }

    fn weight(&self, tokens: u64) -> u64 {
        tokens.min(self.cfg.token_cap).max(1)
    }
}
