//! Seeded discrete-event simulator for [`crate::averaging::State`].
//!
//! `n` peers run the real state machine over a simulated network with latency, jitter, loss
//! and duplication of gossip, partitions, crashes (at a time, or right after a peer emits a
//! given message kind in a given round: phase boundaries), mid-transfer crashes, restarts from
//! stale or empty disk, churn, joiners, slow peers and malicious peers. Everything random comes
//! from one ChaCha8 seed, so a seed replays the same trace: tests print the seed of a failure
//! and `SEED=... cargo test` reruns just that one.
//!
//! Training is modeled: peer `i` pulls theta toward its own target, so the outer gradient is
//! `delta_i = 0.1 * (theta_g - target_i)` with a fixed token count; the simulator can therefore
//! recompute the centrally expected result.
//!
//! `net` holds the simulated network (latency, loss, duplication, partitions, byte counts) and
//! `attacks` the malicious peers' behaviours; this file holds the configuration, the report,
//! the event loop and the peers' lifecycle (crash, restart, churn, join).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::sync::Arc;

use ed25519_dalek::SigningKey;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::averaging::{self, Admission, Config, InEvent, OutEvent, Reject, State, Time};
use crate::codec;
use crate::wire::{Body, Direct, Envelope, Hash, Invite, PeerKey};

mod attacks;
mod net;

/// A misbehaviour of a malicious peer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Attack {
    /// Also sends copies of its gossip re-signed... by nobody: another peer's id, own signature.
    ForgedSignature,
    /// Also sends validly signed copies of its gossip for another run.
    WrongRun,
    /// Re-sends its envelopes of two rounds ago.
    Replay,
    /// Announces and pushes shards one value too long.
    WrongLength,
    /// Announces and pushes shards containing NaN and Inf.
    NonFinite,
    /// Scales its outer gradient by this factor and claims the scaled norm (robust rules
    /// must bound its effect).
    Scaled(f32),
    /// Scales its outer gradient but claims the honest norm.
    NormLie(f32),
    /// Signs two different READYs in every round.
    Equivocate,
    /// Answers every state or sync request with a fabricated State three rounds ahead: random theta,
    /// a SEAL naming only itself as next member, and its own COMMIT as the "quorum".
    FakeState,
    /// As a shard owner, gossips AGGs for a tampered aggregate (every sign flipped: same norm)
    /// and serves the tampered bytes; the audits must keep it out of every SEAL.
    LyingOwner,
    /// Also gossips copies of its messages signed by a fresh key that is no member and no peer,
    /// five rounds ahead: an outsider pretending the run is further on.
    FutureRounds,
    /// A member that, with every READY, also gossips a PREPARE under the largest ballot it
    /// leads (near `u32::MAX`) and its own PROMISE of it, and as a leader its SEAL again under
    /// that ballot: peers that promised or accepted it could never accept an honest ballot.
    HugeBallot,
    /// A member that stays ahead: with its READY (ballot 0) and with every PROMISE it gives
    /// (ballot b), it also PREPAREs every ballot it leads in `b + 1 ..= b + k`, and never
    /// proposes under them. If peers let ballots a few slots early through, it holds their
    /// promise ahead of the honest leaders' ballots for good.
    AheadBallot(u32),
    /// With every READY, also gossips JOINs signed by this many fresh keys that never do
    /// anything else (Sybil joiners inflating the member list and its quorum).
    JoinFlood(u8),
    /// As a leader, seals with five made-up keys added to the next member list (a takeover of
    /// the group by its proposer).
    MemberTakeover,
    /// As a leader, seals what no one signed, one lie a round (by round number mod 6): every
    /// other member evicted (a takeover), a contributor's READY altered (tokens × 10), a
    /// shard's weight inflated, a shard credited to an owner that was never designated, a
    /// shard's aggregate replaced by one its owner never signed, the CLOSE id replaced.
    SealLies,
    /// As a leader, seals one made-up key into the next member list together with a JOIN
    /// validly signed by that key but carrying no invitation (a sneak past an `allowlist` or
    /// `invite` policy).
    SneakIn,
    /// Sybil donors: with every READY, the member and two fresh keys that are no members
    /// gossip copies of it three rounds ahead; all three answer every sync or state request
    /// with the same fabricated State (a SEAL naming the two keys as next members, their two
    /// COMMITs as the quorum), which the first key also sends to every peer unasked. Two such
    /// members are two member donors that agree.
    SybilDonors,
    /// A Byzantine leader. As the leader of a ballot it signs two SEALs under it: the honest
    /// one goes to the lowest `quorum − 1` peer indices (a quorum with itself), one with every
    /// shard MISSING to the others. It sends its COMMIT of the honest one (and in odd
    /// rounds its ACCEPT) to one peer only (that peer may decide, the rest fail over, in odd
    /// rounds without a certificate). In that
    /// round (whose COMMITs it ignores, to stay in it) its PROMISEs claim a certificate of the other SEAL under the ballot just below
    /// theirs, made of its own ACCEPT alone or of "votes" of a quorum of members that it
    /// signed itself (honest leaders refuse them, so they may lack a quorum of PROMISEs); and
    /// under the next ballot it leads in the round it proposes the other SEAL to
    /// everyone, by ballot with the PROMISEs its state collected (which certify the first),
    /// with none, or with a quorum of members' PROMISEs it signed itself; its ACCEPTs
    /// and COMMITs of the other SEAL for every ballot up to that one signed in advance.
    /// Without the acceptors' checks of PROMISE quorums and certificates, or COMMITs without a
    /// certificate, the peers that did not decide the first SEAL decide another.
    EquivocatingLeader,
}

/// A scheduled fault.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Crash `peer` at time `at`.
    Crash {
        /// Peer index.
        peer: usize,
        /// When.
        at: Time,
    },
    /// The first `count` peers that emit `kind` (a [`Body::kind`] or "PUSH") in `round` crash
    /// right after emitting it (for "PUSH": after sending half of their pushes).
    CrashWhen {
        /// Round.
        round: u64,
        /// Message kind.
        kind: &'static str,
        /// How many peers.
        count: usize,
    },
    /// Restart every crashed peer at `at`, from its saved state of `stale_rounds` decisions
    /// earlier (`None`: from an empty disk, as a joiner).
    RestartAll {
        /// When.
        at: Time,
        /// How stale the disk is.
        stale_rounds: Option<u64>,
    },
    /// Crash `peer` at `at` and restart it at once from its latest saved state, but with the
    /// chain and member list of another history (a checkpoint of a fork it abandoned: made-up
    /// members nobody in the run knows).
    RestartForeign {
        /// Peer index.
        peer: usize,
        /// When.
        at: Time,
    },
    /// Cut the peers in `side` off from the rest during `from..until`.
    Partition {
        /// Peer indices on one side.
        side: Vec<usize>,
        /// Start.
        from: Time,
        /// End (healed).
        until: Time,
    },
    /// Every `period`: restart the peers churned out last time (half stale, half empty), then
    /// crash `frac` of the live peers.
    Churn {
        /// Fraction crashed per period.
        frac: f64,
        /// Period.
        period: Time,
        /// Stop churning at this time.
        until: Time,
    },
    /// A new peer (blank state) appears at `at`.
    Join {
        /// When.
        at: Time,
    },
    /// A new peer with an empty disk joins at `at` with an invitation signed by peer 0.
    InvitedJoin {
        /// When.
        at: Time,
    },
    /// At `at` the run's operator ([`operator_key`], made the run's operator by this fault)
    /// signs a RECONFIG restarting the round `survivors[0]` is in with the peers `survivors`,
    /// under that peer's chain, and hands it to that peer alone (as `diloco-node reconfig`
    /// posts it to one node), which relays it.
    Reconfig {
        /// When.
        at: Time,
        /// Peer indices of the members the round restarts with (the first one must be up).
        survivors: Vec<usize>,
    },
}

/// The simulator's operator key (see [`Fault::Reconfig`]).
pub fn operator_key() -> SigningKey {
    SigningKey::from_bytes(&[0x0b; 32])
}

/// Simulation parameters.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The seed: everything random derives from it.
    pub seed: u64,
    /// Founding peers.
    pub n: usize,
    /// Parameters per model.
    pub len: usize,
    /// Protocol config template (run id and len are set by the simulator).
    pub proto: Config,
    /// Builds the run's admission policy from the founders' sorted ids (which the simulator
    /// draws), replacing `proto.admission`.
    pub admission: Option<fn(Vec<PeerKey>) -> Admission>,
    /// One-way latency range in ms.
    pub latency: (Time, Time),
    /// Latency spikes: with this probability a message (gossip or direct) takes up to this
    /// many ms more (a congested or stalled link; messages overtake each other).
    pub spikes: (f64, Time),
    /// Probability that one gossip delivery is lost.
    pub loss: f64,
    /// Probability that one gossip delivery is duplicated.
    pub dup: f64,
    /// Training time per round, ms (each peer gets +-20% jitter per round).
    pub train_time: Time,
    /// Peers that train `factor` times slower.
    pub slow: Vec<(usize, f64)>,
    /// Malicious peers.
    pub malicious: Vec<(usize, Attack)>,
    /// Scheduled faults.
    pub faults: Vec<Fault>,
    /// Stop at this simulated time.
    pub max_time: Time,
    /// Stop once every live honest peer has decided this many rounds.
    pub rounds: u64,
    /// Bytes per millisecond a full State travels at (`None`: as fast as control messages), to
    /// model state transfers that take longer than `retry`.
    pub state_bandwidth: Option<u64>,
}

impl SimConfig {
    /// A fault-free run of `n` peers.
    pub fn new(seed: u64, n: usize) -> Self {
        let len = 64 * 8 * n.clamp(2, 32);
        let mut proto = Config::new(Hash::of(b"sim-run"), len);
        proto.straggler_timeout = 400;
        proto.agg_timeout = 600;
        proto.attempt_timeout = 2_000;
        proto.retry = 300;
        Self {
            seed,
            n,
            len,
            proto,
            latency: (10, 60),
            spikes: (0.0, 0),
            loss: 0.0,
            dup: 0.0,
            train_time: 500,
            slow: Vec::new(),
            malicious: Vec::new(),
            admission: None,
            faults: Vec::new(),
            max_time: 60_000,
            rounds: 5,
            state_bandwidth: None,
        }
    }
}

/// What a run produced.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Per peer index: decided (round, seal hash, state hash), in order.
    pub decided: Vec<Vec<(u64, Hash, Hash)>>,
    /// Per peer: round reached and state hash at the end (None if down or unsynced).
    pub final_state: Vec<Option<(u64, Hash)>>,
    /// Per peer: whether it is honest.
    pub honest: Vec<bool>,
    /// Rejections: (receiver, sender index or usize::MAX, kind, reason).
    pub rejections: Vec<(usize, usize, &'static str, Reject)>,
    /// Bans: (who banned, whom).
    pub bans: Vec<(usize, usize)>,
    /// Largest data bytes (PushShard + Data) one peer sent in one round.
    pub max_data_bytes_per_round: u64,
    /// Largest control bytes (gossip and small direct messages) one peer sent in one round.
    pub max_control_bytes_per_round: u64,
    /// Encoded size of one full outer gradient (S).
    pub vector_bytes: u64,
    /// Hash of the whole event trace (same seed, same hash).
    pub trace: Hash,
    /// Events processed.
    pub events: u64,
    /// Simulated time at the end.
    pub end_time: Time,
    /// theta of every live honest synced peer at its final round (index, round, theta).
    pub thetas: Vec<(usize, u64, Vec<f32>)>,
    /// Largest gossip message sent, in bytes (every gossip is serialized and decoded again).
    pub max_gossip_bytes: u64,
    /// Gossip messages over [`wire::MAX_GOSSIP_BYTES`](crate::wire::MAX_GOSSIP_BYTES) (must
    /// stay 0).
    pub oversized_gossip: u64,
    /// Messages that failed to serialize or to decode again (must stay 0).
    pub wire_errors: u64,
    /// ANNOUNCE messages sent (bodies too large for gossip, fetched directly).
    pub announces: u64,
    /// Tampered aggregates a lying owner gossiped.
    pub lies_told: u64,
    /// Sealed shards, in the decisions honest peers hold at the end, whose aggregate is a lie.
    pub lies_sealed: u64,
    /// Full States sent (by anyone), and StateRequests.
    pub states_sent: u64,
    /// StateRequests sent.
    pub state_requests: u64,
    /// SyncRequests and StateRequests sent to a key that is no peer of the simulation (an
    /// outsider's made-up id): must stay 0.
    pub syncs_to_strangers: u64,
    /// The smallest member list any peer held right after deciding a round (`None`: nothing
    /// decided). Eviction shrinks it; with every peer alive it must stay n.
    pub min_members: Option<usize>,
    /// The largest member list any peer held right after deciding a round.
    pub max_members: Option<usize>,
}

impl Report {
    /// Every (round -> seal) decided by any honest peer; `Err` on two different SEALs.
    pub fn decided_history(&self) -> Result<BTreeMap<u64, (Hash, Hash)>, String> {
        let mut h = BTreeMap::new();
        for (i, d) in self.decided.iter().enumerate() {
            if !self.honest[i] {
                continue;
            }
            for (r, s, st) in d {
                if let Some(prev) = h.insert(*r, (*s, *st)) {
                    if prev != (*s, *st) {
                        return Err(format!(
                            "round {r}: peer {i} decided {s:?}/{st:?}, another {prev:?}"
                        ));
                    }
                }
            }
        }
        Ok(h)
    }

    /// Highest round every live honest synced peer has finished.
    pub fn min_round(&self) -> u64 {
        self.final_state
            .iter()
            .zip(&self.honest)
            .filter_map(|(s, h)| if *h { s.map(|(r, _)| r) } else { None })
            .min()
            .unwrap_or(0)
    }
}

#[derive(Debug, Clone)]
enum Ev {
    In(InEvent),
    Train(u64),
    Crash,
    Restart(Option<u64>),
    RestartForeign,
    Churn,
    /// A new peer joins; with an invitation from peer 0 if true.
    Join(bool),
    /// The operator reconfigures (peer indices of the survivors).
    Reconfig(Vec<usize>),
}

/// A decided state a peer held: (round, state hash, members, theta, momentum).
type Snapshot = (u64, Hash, Vec<PeerKey>, Vec<f32>, Vec<f32>);

struct Peer {
    key: SigningKey,
    id: PeerKey,
    state: Option<State>,
    epoch: u64,
    snapshots: Vec<Snapshot>,
    attack: Option<Attack>,
    slow: f64,
    target: Vec<f32>,
    sent_envs: Vec<Arc<Envelope>>,
    bad_shards: Option<(u64, Vec<Vec<u8>>, Vec<Hash>)>,
    fake_payloads: HashMap<Hash, Vec<u8>>,
    lie_map: HashMap<Hash, Hash>,
    /// `EquivocatingLeader`: the other SEAL it signed in a round (round, ballot, SEAL).
    other_seal: Option<(u64, u32, crate::wire::Seal)>,
    /// The invitation its JOINs carry.
    invite: Option<Invite>,
    churned: bool,
    voted: Option<u64>,
}

/// The simulator.
pub struct Sim {
    cfg: SimConfig,
    rng: ChaCha8Rng,
    now: Time,
    seq: u64,
    queue: BinaryHeap<Reverse<(Time, u64, usize)>>,
    events: HashMap<u64, (usize, u64, Ev)>,
    peers: Vec<Peer>,
    index: HashMap<PeerKey, usize>,
    /// Keys a malicious peer holds besides its own (its Sybils): messages to them reach it.
    aliases: HashMap<PeerKey, (usize, ed25519_dalek::SigningKey)>,
    sig_cache: HashMap<Hash, bool>,
    report: Report,
    bytes: HashMap<(usize, u64), (u64, u64)>,
    crash_when: Vec<(u64, &'static str, usize, BTreeSet<usize>)>,
    partitions: Vec<(BTreeSet<usize>, Time, Time)>,
    trace: blake3::Hasher,
    theta0: Vec<f32>,
    churn_frac: f64,
}

fn det_vec(seed: u64, tag: u64, len: usize, scale: f32) -> Vec<f32> {
    let mut r = ChaCha8Rng::seed_from_u64(seed ^ tag.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    (0..len)
        .map(|_| ((r.next_u32() as f32 / u32::MAX as f32) * 2.0 - 1.0) * scale)
        .collect()
}

/// The modeled outer gradient of a peer: `0.1 * (theta - target)`.
pub fn model_delta(theta: &[f32], target: &[f32]) -> Vec<f32> {
    theta
        .iter()
        .zip(target)
        .map(|(t, g)| 0.1 * (t - g))
        .collect()
}

/// Tokens a peer reports per round.
pub fn model_tokens(peer: usize) -> u64 {
    1000 + (peer as u64 * 37) % 500
}

impl Sim {
    /// Builds the peers and schedules the faults.
    pub fn new(mut cfg: SimConfig) -> Self {
        cfg.proto.len = cfg.len;
        if cfg
            .faults
            .iter()
            .any(|f| matches!(f, Fault::Reconfig { .. }))
        {
            cfg.proto.operator = Some(PeerKey::of(&operator_key()));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let theta0 = det_vec(cfg.seed, 1, cfg.len, 1.0);
        let mut sim = Sim {
            rng: ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x5eed),
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            peers: Vec::new(),
            index: HashMap::new(),
            aliases: HashMap::new(),
            sig_cache: HashMap::new(),
            report: Report::default(),
            bytes: HashMap::new(),
            crash_when: Vec::new(),
            partitions: Vec::new(),
            trace: blake3::Hasher::new(),
            theta0,
            churn_frac: 0.0,
            cfg: cfg.clone(),
        };
        let mut keys = Vec::new();
        for _ in 0..cfg.n {
            let mut b = [0u8; 32];
            rng.fill_bytes(&mut b);
            keys.push(SigningKey::from_bytes(&b));
        }
        let members: Vec<PeerKey> = keys.iter().map(PeerKey::of).collect();
        if let Some(policy) = cfg.admission {
            let mut founders = members.clone();
            founders.sort();
            sim.cfg.proto.admission = policy(founders);
        }
        for key in keys {
            let mut st = State::genesis(
                sim.cfg.proto.clone(),
                key.clone(),
                sim.theta0.clone(),
                members.clone(),
            );
            let i = sim.add_peer(key);
            let outs = st.start(0);
            sim.peers[i].state = Some(st);
            sim.dispatch(i, outs);
        }
        for (p, f) in &cfg.slow {
            if let Some(peer) = sim.peers.get_mut(*p) {
                peer.slow = *f;
            }
        }
        for (p, a) in &cfg.malicious {
            if let Some(peer) = sim.peers.get_mut(*p) {
                peer.attack = Some(*a);
            }
        }
        for f in cfg.faults.clone() {
            match f {
                Fault::Crash { peer, at } => sim.schedule(at, peer, Ev::Crash),
                Fault::CrashWhen { round, kind, count } => {
                    sim.crash_when.push((round, kind, count, BTreeSet::new()))
                }
                Fault::RestartAll { at, stale_rounds } => {
                    for p in 0..cfg.n {
                        sim.schedule(at, p, Ev::Restart(stale_rounds));
                    }
                }
                Fault::RestartForeign { peer, at } => {
                    sim.schedule(at, peer, Ev::RestartForeign);
                }
                Fault::Partition { side, from, until } => {
                    sim.partitions
                        .push((side.into_iter().collect(), from, until))
                }
                Fault::Churn {
                    frac,
                    period,
                    until,
                } => {
                    let mut t = period;
                    while t < until {
                        sim.schedule(t, usize::MAX, Ev::Churn);
                        t += period;
                    }
                    sim.churn_frac = frac;
                }
                Fault::Join { at } => sim.schedule(at, usize::MAX, Ev::Join(false)),
                Fault::InvitedJoin { at } => sim.schedule(at, usize::MAX, Ev::Join(true)),
                Fault::Reconfig { at, survivors } => {
                    sim.schedule(at, usize::MAX, Ev::Reconfig(survivors))
                }
            }
        }
        sim
    }

    fn add_peer(&mut self, key: SigningKey) -> usize {
        let i = self.peers.len();
        let id = PeerKey::of(&key);
        let target = det_vec(self.cfg.seed, 1000 + i as u64, self.cfg.len, 1.0);
        self.peers.push(Peer {
            key,
            id,
            state: None,
            epoch: 0,
            snapshots: Vec::new(),
            attack: None,
            slow: 1.0,
            target,
            sent_envs: Vec::new(),
            bad_shards: None,
            fake_payloads: HashMap::new(),
            lie_map: HashMap::new(),
            other_seal: None,
            invite: None,
            churned: false,
            voted: None,
        });
        self.index.insert(id, i);
        self.report.decided.push(Vec::new());
        i
    }

    fn schedule(&mut self, at: Time, peer: usize, ev: Ev) {
        self.seq += 1;
        let epoch = self.peers.get(peer).map_or(0, |p| p.epoch);
        self.events.insert(self.seq, (peer, epoch, ev));
        self.queue.push(Reverse((at, self.seq, peer)));
    }

    fn alive(&self, i: usize) -> bool {
        self.peers[i].state.is_some()
    }

    fn round_of(&self, i: usize) -> u64 {
        self.peers[i].state.as_ref().map_or(0, |s| s.round())
    }

    fn dispatch(&mut self, i: usize, outs: Vec<OutEvent>) {
        let mut crash_after = false;
        let round = self.round_of(i);
        let mut pushes_seen = 0usize;
        let total_pushes =
            outs.iter().filter(|o| matches!(o, OutEvent::Direct { msg, .. } if matches!(**msg, Direct::PushShard { .. }))).count();
        for out in outs {
            match out {
                OutEvent::Gossip(env) => {
                    let kind = env.body.kind();
                    if env.body.is_vote() {
                        // The durable vote record a real node writes before sending.
                        let v = &mut self.peers[i].voted;
                        *v = Some(v.map_or(env.round, |x| x.max(env.round)));
                    }
                    if self.should_crash(i, round, kind) {
                        crash_after = true;
                    }
                    self.send_gossip_with_attack(i, env);
                }
                OutEvent::Direct { to, msg } => {
                    let is_push = matches!(*msg, Direct::PushShard { .. });
                    if is_push {
                        pushes_seen += 1;
                        if self.should_crash(i, round, "PUSH") && pushes_seen * 2 > total_pushes {
                            self.crash(i);
                            return;
                        }
                    }
                    let msg = if is_push {
                        self.attack_push(i, msg)
                    } else {
                        msg
                    };
                    self.direct_from(i, to, msg);
                }
                OutEvent::SetTimer { at, timer } => {
                    self.schedule(at, i, Ev::In(InEvent::Timer(timer)))
                }
                OutEvent::Train { round } => {
                    let jitter = 0.8 + 0.4 * (self.rng.next_u32() as f64 / u32::MAX as f64);
                    let t = (self.cfg.train_time as f64 * jitter * self.peers[i].slow) as Time;
                    self.schedule(self.now + t, i, Ev::Train(round));
                }
                OutEvent::Decided { round, seal, state } => {
                    self.trace.update(&[i as u8]);
                    self.trace.update(&round.to_le_bytes());
                    self.trace.update(&seal.0);
                    self.report.decided[i].push((round, seal, state));
                    if let Some(s) = &self.peers[i].state {
                        let m = s.members().len();
                        self.report.min_members =
                            Some(self.report.min_members.map_or(m, |x| x.min(m)));
                        self.report.max_members =
                            Some(self.report.max_members.map_or(m, |x| x.max(m)));
                    }
                    self.save_snapshot(i);
                }
                // A node persists the round's new chain and members before going on.
                OutEvent::Reconfigured { .. } => self.save_snapshot(i),
                OutEvent::Rejected { from, kind, reason } => {
                    let f = self.index.get(&from).copied().unwrap_or(usize::MAX);
                    if self.report.rejections.len() < 100_000 {
                        self.report.rejections.push((i, f, kind, reason));
                    }
                }
                OutEvent::Banned { peer } => {
                    let f = self.index.get(&peer).copied().unwrap_or(usize::MAX);
                    self.report.bans.push((i, f));
                }
            }
        }
        if crash_after {
            self.crash(i);
        }
    }

    /// What peer `i`'s disk holds after a decision or a reconfiguration (the last six kept).
    fn save_snapshot(&mut self, i: usize) {
        let Some(s) = &self.peers[i].state else {
            return;
        };
        let snap = (
            s.round(),
            s.chain(),
            s.members().to_vec(),
            s.theta().to_vec(),
            s.momentum().to_vec(),
        );
        let p = &mut self.peers[i];
        p.snapshots.push(snap);
        if p.snapshots.len() > 6 {
            p.snapshots.remove(0);
        }
    }

    fn should_crash(&mut self, i: usize, round: u64, kind: &str) -> bool {
        for (r, k, count, who) in &mut self.crash_when {
            if *r == round && *k == kind && (who.contains(&i) || who.len() < *count) {
                who.insert(i);
                return true;
            }
        }
        false
    }

    fn crash(&mut self, i: usize) {
        if self.peers[i].state.take().is_some() {
            self.peers[i].epoch += 1;
        }
    }

    fn restart(&mut self, i: usize, stale: Option<u64>) {
        if self.alive(i) {
            return;
        }
        let contacts: Vec<PeerKey> = (0..self.peers.len())
            .filter(|j| *j != i)
            .map(|j| self.peers[j].id)
            .collect();
        let key = self.peers[i].key.clone();
        let st = match stale {
            Some(back) if !self.peers[i].snapshots.is_empty() => {
                let snaps = &self.peers[i].snapshots;
                let idx = snaps.len().saturating_sub(1 + back as usize);
                let (round, chain, members, theta, m) = snaps[idx].clone();
                State::restore(self.cfg.proto.clone(), key, round, chain, members, theta, m)
            }
            Some(_) => State::genesis(
                self.cfg.proto.clone(),
                key,
                self.theta0.clone(),
                (0..self.cfg.n).map(|j| self.peers[j].id).collect(),
            ),
            None => State::joiner(self.cfg.proto.clone(), key, contacts),
        };
        let mut st = st;
        st.set_invite(self.peers[i].invite);
        if let Some(v) = self.peers[i].voted {
            st.set_vote_from(v + 1);
        }
        let outs = st.start(self.now);
        self.peers[i].state = Some(st);
        self.dispatch(i, outs);
    }

    /// The operator's RECONFIG of the round `survivors[0]` is in, handed to that peer.
    fn reconfigure(&mut self, survivors: &[usize]) {
        let Some(&first) = survivors.first() else {
            return;
        };
        let Some(st) = self.peers.get(first).and_then(|p| p.state.as_ref()) else {
            return;
        };
        let mut members: Vec<PeerKey> = survivors.iter().map(|i| self.peers[*i].id).collect();
        members.sort();
        let env = Envelope::sign(
            &operator_key(),
            self.cfg.proto.run,
            st.round(),
            st.chain(),
            Body::Reconfig(crate::wire::Reconfig { members }),
        );
        self.feed(
            first,
            InEvent::Gossip {
                env: Arc::new(env),
                verified: false,
            },
        );
    }

    /// Restarts crashed peer `i` from its latest snapshot under a made-up history: the same
    /// round, theta and momentum, another chain, and itself plus three made-up keys as members.
    fn restart_foreign(&mut self, i: usize) {
        let Some((round, _, _, theta, m)) = self.peers[i].snapshots.last().cloned() else {
            return;
        };
        let mut members: Vec<PeerKey> = (0..3u8)
            .map(|j| PeerKey::of(&SigningKey::from_bytes(&[0xf0 + j; 32])))
            .collect();
        members.push(self.peers[i].id);
        let chain = Hash::of(b"an abandoned fork");
        let key = self.peers[i].key.clone();
        let mut st = State::restore(self.cfg.proto.clone(), key, round, chain, members, theta, m);
        if let Some(v) = self.peers[i].voted {
            st.set_vote_from(v + 1);
        }
        let outs = st.start(self.now);
        self.peers[i].state = Some(st);
        self.dispatch(i, outs);
    }

    /// Runs to completion and returns the report.
    pub fn run(mut self) -> Report {
        while let Some(Reverse((at, seq, i))) = self.queue.pop() {
            if at > self.cfg.max_time {
                break;
            }
            self.now = at;
            let Some((peer, epoch, ev)) = self.events.remove(&seq) else {
                continue;
            };
            self.report.events += 1;
            self.trace.update(&at.to_le_bytes());
            self.trace.update(&(i as u64).to_le_bytes());
            match ev {
                Ev::Churn => {
                    self.churn();
                    continue;
                }
                Ev::Join(invited) => {
                    let mut b = [0u8; 32];
                    self.rng.fill_bytes(&mut b);
                    let j = self.add_peer(SigningKey::from_bytes(&b));
                    if invited {
                        let inv =
                            Invite::sign(&self.peers[0].key, self.cfg.proto.run, self.peers[j].id);
                        self.peers[j].invite = Some(inv);
                    }
                    self.restart(j, None);
                    continue;
                }
                Ev::Reconfig(survivors) => {
                    self.reconfigure(&survivors);
                    continue;
                }
                Ev::RestartForeign => {
                    if peer < self.peers.len() && self.alive(peer) {
                        self.crash(peer);
                        self.restart_foreign(peer);
                    }
                    continue;
                }
                // A restart is scheduled for whichever incarnation is down at the time.
                Ev::Restart(stale) => {
                    if peer < self.peers.len() {
                        self.restart(peer, stale);
                    }
                    if self.done() {
                        break;
                    }
                    continue;
                }
                _ => {}
            }
            if peer >= self.peers.len() || self.peers[peer].epoch != epoch {
                continue; // event for a previous incarnation
            }
            match ev {
                Ev::Crash => self.crash(peer),
                Ev::Train(round) => {
                    let Some(st) = self.peers[peer].state.as_ref() else {
                        continue;
                    };
                    if st.round() != round {
                        continue;
                    }
                    let delta = model_delta(st.theta(), &self.peers[peer].target);
                    let ev = InEvent::Trained {
                        round,
                        delta,
                        tokens: model_tokens(peer),
                    };
                    self.feed(peer, ev);
                }
                Ev::In(ev) => self.feed(peer, ev),
                _ => {}
            }
            if self.done() {
                break;
            }
        }
        self.finish()
    }

    fn feed(&mut self, i: usize, ev: InEvent) {
        if let (
            Some(a @ (Attack::FakeState | Attack::SybilDonors)),
            InEvent::Direct { from, msg },
        ) = (self.peers[i].attack, &ev)
        {
            if matches!(**msg, Direct::StateRequest | Direct::SyncRequest { .. }) {
                let fake = if a == Attack::FakeState {
                    self.fake_state(i)
                } else {
                    self.sybil_state(i)
                };
                if let Some(fake) = fake {
                    self.direct_from(i, *from, Arc::new(fake));
                }
                return;
            }
        }
        if let (Some(Attack::EquivocatingLeader), InEvent::Gossip { env, .. }) =
            (self.peers[i].attack, &ev)
        {
            // It ignores COMMITs of the round it split, so that its state stays in that round
            // (and keeps lying in its PROMISEs) after the others decided.
            let split = self.peers[i].other_seal.as_ref().map(|(r, ..)| *r);
            if matches!(env.body, Body::Commit(_)) && split == Some(env.round) {
                return;
            }
        }
        if let InEvent::Direct { from, msg } = &ev {
            if let Direct::Fetch { round, hash } = &**msg {
                if let Some(data) = self.peers[i].fake_payloads.get(hash).cloned() {
                    let reply = Direct::Data {
                        round: *round,
                        hash: *hash,
                        data,
                    };
                    self.direct_from(i, *from, Arc::new(reply));
                    return;
                }
            }
        }
        let now = self.now;
        let Some(st) = self.peers[i].state.as_mut() else {
            return;
        };
        let outs = st.handle(now, ev, &mut self.rng);
        self.dispatch(i, outs);
    }

    fn churn(&mut self) {
        for i in 0..self.peers.len() {
            if self.peers[i].churned && !self.alive(i) {
                self.peers[i].churned = false;
                let stale = if self.rng.next_u32().is_multiple_of(2) {
                    Some(1)
                } else {
                    None
                };
                self.restart(i, stale);
            }
        }
        let alive: Vec<usize> = (0..self.peers.len()).filter(|i| self.alive(*i)).collect();
        let k = (alive.len() as f64 * self.churn_frac).floor() as usize;
        let mut pool = alive;
        for _ in 0..k {
            if pool.is_empty() {
                break;
            }
            let j = pool.swap_remove(self.rng.next_u32() as usize % pool.len());
            self.peers[j].churned = true;
            self.crash(j);
        }
    }

    fn done(&self) -> bool {
        let target = self.cfg.rounds;
        let mut any = false;
        for (i, p) in self.peers.iter().enumerate() {
            if p.attack.is_some() {
                continue;
            }
            if let Some(s) = &p.state {
                any = true;
                if s.round() < target {
                    return false;
                }
            } else if self.peers[i].churned {
                return false;
            }
        }
        any && self.queue.iter().all(|Reverse((at, ..))| *at >= self.now)
    }

    fn finish(mut self) -> Report {
        let mut r = std::mem::take(&mut self.report);
        r.honest = self.peers.iter().map(|p| p.attack.is_none()).collect();
        r.final_state = self
            .peers
            .iter()
            .map(|p| {
                p.state
                    .as_ref()
                    .filter(|s| s.is_synced())
                    .map(|s| (s.round(), s.state_hash()))
            })
            .collect();
        let lies: std::collections::HashSet<Hash> = self
            .peers
            .iter()
            .flat_map(|p| p.fake_payloads.keys().copied())
            .collect();
        for (i, p) in self.peers.iter().enumerate() {
            if let Some(s) = p
                .state
                .as_ref()
                .filter(|s| s.is_synced() && p.attack.is_none())
            {
                r.thetas.push((i, s.round(), s.theta().to_vec()));
                for d in s.decisions() {
                    if let Body::Seal(prop) = &d.seal.body {
                        r.lies_sealed += prop
                            .seal
                            .shards
                            .iter()
                            .flatten()
                            .filter(|x| lies.contains(&x.data))
                            .count() as u64;
                    }
                }
            }
        }
        for ((_, _), (d, c)) in &self.bytes {
            r.max_data_bytes_per_round = r.max_data_bytes_per_round.max(*d);
            r.max_control_bytes_per_round = r.max_control_bytes_per_round.max(*c);
        }
        let k = averaging::shard_count(&self.cfg.proto, self.cfg.n);
        let delta = model_delta(
            &self.theta0,
            &det_vec(self.cfg.seed, 1000, self.cfg.len, 1.0),
        );
        r.vector_bytes = codec::shards(self.cfg.len, k)
            .into_iter()
            .map(|rg| codec::encode(self.cfg.proto.codec, &delta[rg]).len() as u64)
            .sum();
        r.trace = Hash(*self.trace.finalize().as_bytes());
        r.end_time = self.now;
        r
    }
}

/// Runs one simulation.
pub fn run(cfg: SimConfig) -> Report {
    Sim::new(cfg).run()
}

/// The seeds a property test runs: `SEED=x` selects one, `SEEDS=n` sets how many (default
/// `default`).
pub fn seeds(default: u64) -> Vec<u64> {
    if let Some(s) = std::env::var("SEED").ok().and_then(|s| s.parse().ok()) {
        return vec![s];
    }
    let n = std::env::var("SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    (0..n).collect()
}

/// Reference: the centrally computed global parameters after `rounds` fault-free rounds in
/// which every peer contributes (token-weighted mean of the codec-rounded deltas, the
/// aggregate rounded once more by the codec, then the Nesterov step).
pub fn central_reference(cfg: &SimConfig, rounds: u64) -> Vec<f32> {
    let sim = Sim::new(cfg.clone());
    let mut theta = sim.theta0.clone();
    let mut m = vec![0f32; cfg.len];
    // Contributors are ordered by peer id, as in CLOSE.
    let mut order: Vec<(PeerKey, usize)> = sim
        .peers
        .iter()
        .enumerate()
        .map(|(i, p)| (p.id, i))
        .collect();
    order.sort();
    let k = averaging::shard_count(&cfg.proto, cfg.n);
    let q = cfg.proto.codec;
    for _ in 0..rounds {
        let deltas: Vec<Vec<f32>> = order
            .iter()
            .map(|(_, i)| codec::quantize_roundtrip(q, &model_delta(&theta, &sim.peers[*i].target)))
            .collect();
        let mut delta = vec![0f32; cfg.len];
        for rg in codec::shards(cfg.len, k) {
            let inputs: Vec<(&[f32], u64)> = order
                .iter()
                .zip(&deltas)
                .map(|((_, i), d)| (&d[rg.clone()], model_tokens(*i)))
                .collect();
            let agg = averaging::aggregate(cfg.proto.rule, &inputs);
            delta[rg].copy_from_slice(&codec::quantize_roundtrip(q, &agg));
        }
        let _ = crate::outer::nesterov_step(cfg.proto.outer, &mut theta, &mut m, &delta);
    }
    theta
}
