//! `join`: one peer of a DiLoCo run on the network.
//!
//! Three actors, connected by bounded channels:
//! * the swarm task ([`crate::net`]) moves bytes;
//! * a trainer thread owns the replica (burn model and AdamW state): it trains H inner steps
//!   from the global parameters it is given, evaluates, and writes checkpoints;
//! * the driver (this module's event loop) owns the averaging state machine
//!   ([`diloco_protocol::averaging::State`]), feeds it network messages, timers and finished
//!   training, and carries out what it asks for. It never blocks on training.
//!
//! Starting: with a checkpoint in `--checkpoint-dir`, the node restores the agreed state it
//! saved (round, chain, members, global parameters, outer momentum, AdamW state) and catches
//! up through decision proofs or a state transfer. Without one, it gossips HELLOs for
//! `--genesis-wait`: if a peer already holds run state, the node joins as a joiner (fetches
//! the state from peers, verified against a quorum of signed COMMITs, then announces JOIN and
//! becomes a member at the next SEAL). If nobody does, the peer with the lowest id among those
//! heard founds the run alone at round 0 (initial parameters come from the seed, so nothing
//! is transferred) and the others join it; founding alone means peers never need to agree on
//! a founding list.
//!
//! Signed statements are durable: before any protocol message but JOIN leaves the node, its
//! round is written to `VOTED` in the checkpoint directory. A restarted node does not vote again
//! up to that round (`State::set_vote_from`) and sends nothing but JOIN in those rounds, so
//! redoing a round's work after a restart can never look like equivocation.

use crate::checkpoint::{self, CheckpointError, NetCheckpoint};
use crate::data::{eval_batches, Corpus, Stream};
use crate::flat::{self, ParamInfo};
use crate::net::{self, Command, NetConfig, NetEvent, NetHandle, Topic};
use crate::runconfig::Run;
use crate::status::{Shared, Status, StatusError};
use crate::trainer::{AdamState, Evaluator, Replica};
use burn::prelude::Device;
use diloco_bootstrap::keys::Identity;
use diloco_protocol::averaging::{InEvent, OutEvent, State, Timer};
use diloco_protocol::outer::{hash_f32, outer_gradient};
use diloco_protocol::wire::{Body, Direct, Envelope, Hash, PeerId as ProtoPeer, MAX_GOSSIP_BYTES};
use ed25519_dalek::SigningKey;
use libp2p::{Multiaddr, PeerId};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::mpsc;
use tracing::Instrument;

/// Optimizer tensors in a node checkpoint.
pub const OPT_SUFFIXES: [&str; 3] = ["exp_avg", "exp_avg_sq", "outer_momentum"];

/// Why a node stopped with an error.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum JoinError {
    /// Network setup failed.
    #[error(transparent)]
    Net(#[from] net::NetError),
    /// The status server could not start.
    #[error(transparent)]
    Status(#[from] StatusError),
    /// A checkpoint could not be read or does not belong to this run.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// Parameter vectors did not line up.
    #[error(transparent)]
    Flat(#[from] flat::FlatError),
    /// The vote record could not be written: the node stops rather than risk voting twice.
    #[error("cannot record the vote in {path}: {source} (is the disk full?)")]
    Vote {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The trainer thread failed.
    #[error("trainer: {0}")]
    Trainer(String),
    /// The checkpoint written when stopping failed: the node stopped without its state on disk.
    #[error("the final checkpoint was not written: {0}; the node stopped without saving its state (free some disk space or fix --checkpoint-dir; the other peers still hold the run's state, so restarting rejoins the run)")]
    FinalCheckpoint(String),
}

/// Settings of a node.
#[derive(Debug, Clone)]
pub struct JoinConfig {
    /// The run.
    pub run: Run,
    /// Identity (libp2p peer id and protocol signing key).
    pub identity: Identity,
    /// Listen addresses.
    pub listen: Vec<Multiaddr>,
    /// Bootstrap peers.
    pub bootstrap: Vec<(PeerId, Multiaddr)>,
    /// Checkpoint directory (also holds the vote record).
    pub checkpoint_dir: Option<PathBuf>,
    /// Checkpoint every this many rounds (0: only when stopping).
    pub checkpoint_every: u64,
    /// Where to serve /status and /metrics.
    pub status_addr: Option<SocketAddr>,
    /// How long a fresh node listens for an existing run before founding one.
    pub genesis_wait: Duration,
    /// Eval windows evaluated after each decided round (0: no eval).
    pub eval_windows: usize,
    /// Status shared with the caller (tests, embedders); a fresh one when `None`.
    pub observer: Option<Arc<Shared>>,
    /// How many peers found a new run together (the lowest ids heard during the genesis
    /// wait); 1 = the lowest founds alone and the others join it.
    pub founders: usize,
    /// Listen through the bootstrap relays from the start (see [`NetConfig::relay_listen`]).
    pub relay_listen: bool,
    /// AutoNAT over private addresses too (see [`NetConfig::private_network`]).
    pub private_network: bool,
}

/// Final report of a node.
#[derive(Debug, Clone, Serialize)]
pub struct JoinReport {
    /// libp2p peer id.
    pub peer_id: String,
    /// Run id.
    pub run_id: String,
    /// Round reached.
    pub round: u64,
    /// Hash of the global parameters.
    pub global_hash: String,
    /// Rounds decided while running.
    pub rounds_decided: u64,
    /// Last eval loss.
    pub eval_loss: Option<f32>,
    /// Application bytes sent.
    pub bytes_sent: u64,
    /// Application bytes received.
    pub bytes_received: u64,
    /// Where the final checkpoint went.
    pub checkpoint: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Identity conversions.

/// The protocol peer id (ed25519 public key) of a libp2p peer id, when it is an inline
/// ed25519 key.
pub fn proto_peer(p: &PeerId) -> Option<ProtoPeer> {
    let mh = p.as_ref();
    if mh.code() != 0 {
        return None;
    }
    let pk = libp2p::identity::PublicKey::try_decode_protobuf(mh.digest()).ok()?;
    let ed = pk.try_into_ed25519().ok()?;
    Some(ProtoPeer(ed.to_bytes()))
}

/// The libp2p peer id of a protocol peer id.
pub fn libp2p_peer(p: &ProtoPeer) -> Option<PeerId> {
    let ed = libp2p::identity::ed25519::PublicKey::try_from_bytes(&p.0).ok()?;
    Some(libp2p::identity::PublicKey::from(ed).to_peer_id())
}

use diloco_bootstrap::keys::hex;

/// 64 hex digits to 32 bytes (the key-file parser, which has the same format).
fn unhex32(s: &str) -> Option<[u8; 32]> {
    diloco_bootstrap::keys::parse(s).ok()
}

// ---------------------------------------------------------------------------------------------
// HELLO: a node's public summary, gossiped every second on the run's hello topic.

#[derive(Debug, Clone, PartialEq, bincode::Encode, bincode::Decode)]
struct Hello {
    version: u32,
    peer: [u8; 32],
    seq: u64,
    synced: bool,
    round: u64,
    members: u32,
    /// Founder of the sender's history (zeros while it has none).
    founder: [u8; 32],
}

const HELLO_VERSION: u32 = 1;
/// A joiner that hears no peer holding run state for this long (or twice `--genesis-wait`, if
/// longer) gives up on that run and goes back to discovery.
const JOINER_GIVE_UP: Duration = Duration::from_secs(30);

fn decode_hello(data: &[u8]) -> Option<Hello> {
    let cfg = bincode::config::standard().with_limit::<{ net::MAX_HELLO_BYTES }>();
    match bincode::decode_from_slice::<Hello, _>(data, cfg) {
        Ok((h, used)) if used == data.len() && h.version == HELLO_VERSION => Some(h),
        _ => None,
    }
}

fn encode_hello(h: &Hello) -> Vec<u8> {
    bincode::encode_to_vec(h, bincode::config::standard()).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Durable vote record.

struct VoteLog {
    path: Option<PathBuf>,
    highest: Option<u64>,
}

impl VoteLog {
    fn open(dir: Option<&Path>) -> Result<Self, JoinError> {
        let path = dir.map(|d| d.join("VOTED"));
        let highest = match &path {
            Some(p) => match std::fs::read_to_string(p) {
                Ok(s) => s.trim().parse::<u64>().ok(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(source) => {
                    return Err(JoinError::Vote {
                        path: p.clone(),
                        source,
                    })
                }
            },
            None => None,
        };
        Ok(Self { path, highest })
    }

    /// Forgets every vote (after abandoning a history for another).
    fn reset(&mut self) -> Result<(), JoinError> {
        if let Some(p) = &self.path {
            match std::fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(JoinError::Vote {
                        path: p.clone(),
                        source,
                    })
                }
            }
        }
        self.highest = None;
        Ok(())
    }

    /// Records a vote in `round` before it is sent.
    fn record(&mut self, round: u64) -> Result<(), JoinError> {
        if self.highest.is_some_and(|h| h >= round) {
            return Ok(());
        }
        if let Some(p) = &self.path {
            let err = |source| JoinError::Vote {
                path: p.clone(),
                source,
            };
            if let Some(d) = p.parent() {
                std::fs::create_dir_all(d).map_err(err)?;
            }
            let tmp = p.with_extension("tmp");
            {
                use std::io::Write;
                let mut f = std::fs::File::create(&tmp).map_err(err)?;
                f.write_all(round.to_string().as_bytes()).map_err(err)?;
                f.sync_all().map_err(err)?;
            }
            std::fs::rename(&tmp, p).map_err(err)?;
        }
        self.highest = Some(round);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Trainer thread.

enum Job {
    Train { round: u64, theta: Vec<f32> },
    Eval { round: u64, theta: Vec<f32> },
    Save(Box<SaveJob>),
    Quit,
}

struct SaveJob {
    dir: PathBuf,
    round: u64,
    theta: Vec<f32>,
    momentum: Vec<f32>,
    net: NetCheckpoint,
    run: serde_json::Value,
}

enum Done {
    Trained {
        round: u64,
        delta: Vec<f32>,
        tokens: u64,
        loss: f32,
        secs: f64,
    },
    Aborted,
    Evaluated {
        round: u64,
        loss: f32,
    },
    Saved {
        round: u64,
        result: Result<PathBuf, String>,
    },
    Failed(String),
}

/// The model half of a trainer (absent in synthetic runs).
struct ModelWork {
    replica: Replica,
    evaluator: Evaluator,
}

struct Trainer {
    run: Run,
    /// `None`: synthetic outer gradients (`synthetic_params`), for network benchmarks.
    work: Option<ModelWork>,
    rng: ChaCha8Rng,
    eval: Vec<crate::data::Batch>,
    stream: Stream,
    corpus: Arc<Corpus>,
    layout: Vec<ParamInfo>,
    stop: Arc<AtomicBool>,
    /// Keep the AdamW state each round's training started from (only with a checkpoint
    /// directory).
    keep_round_start: bool,
    /// The AdamW state as the training of this round found it: a checkpoint of the state at the
    /// start of that round must carry these moments, not the ones its (possibly aborted)
    /// training has since moved on to. Burn tensors are immutable handles, so this holds the
    /// old moment buffers alive (twice the parameter count in floats), no copy.
    round_start: Option<(u64, AdamState)>,
}

impl Trainer {
    /// A trainer drawing this peer's stream (`shard_key`) of `corpus`, with `eval_windows` eval
    /// batches; `keep_round_start` when checkpoints are written.
    #[allow(clippy::too_many_arguments)]
    fn new(
        run: Run,
        work: Option<ModelWork>,
        corpus: Arc<Corpus>,
        layout: Vec<ParamInfo>,
        shard_key: u64,
        eval_windows: usize,
        stop: Arc<AtomicBool>,
        keep_round_start: bool,
    ) -> Self {
        let rc = &run.config;
        Trainer {
            rng: ChaCha8Rng::seed_from_u64(shard_key),
            eval: if eval_windows > 0 {
                eval_batches(&corpus, rc.seq, rc.batch, eval_windows)
            } else {
                Vec::new()
            },
            stream: Stream::new(&corpus, 0, 1, shard_key, rc.seed, rc.batch, rc.seq),
            run,
            work,
            corpus,
            layout,
            stop,
            keep_round_start,
            round_start: None,
        }
    }

    fn train(&mut self, round: u64, theta: Vec<f32>) -> Result<Done, String> {
        let t0 = Instant::now();
        let h = self.run.config.inner_steps;
        let Some(work) = &mut self.work else {
            // Synthetic: a small random outer gradient, so averaging is all that is measured.
            use rand_chacha::rand_core::RngCore;
            let delta = (0..theta.len())
                .map(|_| (self.rng.next_u32() as f32 / u32::MAX as f32 - 0.5) * 1e-3)
                .collect();
            let c = &self.run.config;
            let rest = Duration::from_millis(c.synthetic_train_ms).saturating_sub(t0.elapsed());
            std::thread::sleep(rest);
            return Ok(Done::Trained {
                round,
                delta,
                tokens: h * (c.batch * c.seq) as u64,
                loss: 0.0,
                secs: t0.elapsed().as_secs_f64(),
            });
        };
        work.replica.set_params(&theta).map_err(|e| e.to_string())?;
        // The first training of a round sets it; a retraining of the same round starts from
        // moments that already include the first attempt.
        if self.keep_round_start && self.round_start.as_ref().map(|(r, _)| *r) != Some(round) {
            self.round_start = Some((round, work.replica.adam.clone()));
        }
        let mut loss = 0.0f64;
        for k in 0..h {
            if self.stop.load(Ordering::Relaxed) {
                return Ok(Done::Aborted);
            }
            let step = round * h + k;
            let lr = self.run.inner.lr_at(step);
            let batch = self.stream.batch(&self.corpus, step);
            loss += work.replica.step(&batch, lr, &self.run.inner).loss as f64;
        }
        let local = work.replica.params();
        let delta = outer_gradient(&theta, &local).map_err(|e| e.to_string())?;
        Ok(Done::Trained {
            round,
            delta,
            tokens: work.replica.take_tokens(),
            loss: (loss / h as f64) as f32,
            secs: t0.elapsed().as_secs_f64(),
        })
    }

    fn save(&self, job: &SaveJob) -> Result<PathBuf, String> {
        let (m, v, t) = match &self.work {
            Some(w) => {
                // Moments at the start of the saved round: if its training already began (or
                // was aborted by Ctrl+C), the ones it started from.
                let adam = match &self.round_start {
                    Some((r, a)) if *r == job.round => a,
                    _ => &w.replica.adam,
                };
                let (m, v) = adam.to_flat(&self.layout);
                (m, v, adam.t)
            }
            None => (vec![0.0; job.theta.len()], vec![0.0; job.theta.len()], 0),
        };
        let state = checkpoint::State {
            version: checkpoint::FORMAT_VERSION,
            step: job.round * self.run.config.inner_steps,
            round: job.round,
            adam_t: t,
            run: job.run.clone(),
            global_hash: hash_f32(&job.theta),
            files: BTreeMap::new(),
            net: Some(job.net.clone()),
        };
        checkpoint::save(
            &job.dir,
            &self.layout,
            &job.theta,
            &[
                (OPT_SUFFIXES[0], &m),
                (OPT_SUFFIXES[1], &v),
                (OPT_SUFFIXES[2], &job.momentum),
            ],
            state,
        )
        .map_err(|e| e.to_string())
    }

    fn serve(mut self, jobs: std::sync::mpsc::Receiver<Job>, done: mpsc::Sender<Done>) {
        while let Ok(job) = jobs.recv() {
            let out = match job {
                Job::Quit => return,
                Job::Train { round, theta } => {
                    self.train(round, theta).unwrap_or_else(Done::Failed)
                }
                Job::Eval { round, theta } => match &mut self.work {
                    Some(w) => match w.evaluator.loss(&theta, &self.eval) {
                        Ok(loss) => Done::Evaluated { round, loss },
                        Err(e) => Done::Failed(e.to_string()),
                    },
                    None => Done::Evaluated {
                        round,
                        loss: f32::NAN,
                    },
                },
                Job::Save(job) => Done::Saved {
                    round: job.round,
                    result: self.save(&job),
                },
            };
            if done.blocking_send(out).is_err() {
                return;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The driver.

enum Phase {
    Discovering {
        /// When discovery started (connected to a bootstrap peer); `None` until then.
        since: Option<Instant>,
        /// Peers heard, with when and whether they hold run state.
        heard: HashMap<ProtoPeer, (Instant, bool)>,
        waiting_logged: bool,
    },
    Running(Box<State>),
}

struct Node {
    cfg: JoinConfig,
    me: ProtoPeer,
    key: SigningKey,
    layout: Vec<ParamInfo>,
    phase: Phase,
    net: NetHandle,
    timers: BTreeMap<(u64, u64), Timer>,
    timer_seq: u64,
    clock: Instant,
    rng: ChaCha8Rng,
    jobs: std::sync::mpsc::Sender<Job>,
    training: Option<u64>,
    pending_train: Option<u64>,
    eval_busy: bool,
    shared: Arc<Shared>,
    peer_cache: HashMap<ProtoPeer, PeerId>,
    votes: VoteLog,
    last_decided: Option<Instant>,
    hello_seq: u64,
    rounds_decided: u64,
    rejected: u64,
    global_hash: String,
    /// Hex of the state hash (theta and momentum), cached like `global_hash`.
    state_hash: String,
    last_checkpoint: Option<PathBuf>,
    /// Founder of the history this node follows.
    founder: Option<ProtoPeer>,
    /// When this node last finished training, and for which round.
    trained_at: Option<(u64, Instant)>,
    /// Highest round this node signed protocol messages in before it restarted.
    silent_until: Option<u64>,
    /// When this node last heard a HELLO from a peer holding run state (or became a joiner).
    last_synced_hello: Instant,
}

impl Node {
    fn now(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    fn state(&self) -> Option<&State> {
        match &self.phase {
            Phase::Running(s) => Some(s),
            Phase::Discovering { .. } => None,
        }
    }

    fn start_state(&mut self, st: State) -> Result<(), JoinError> {
        let now = self.now();
        let mut st = Box::new(st);
        let outs = st.start(now);
        self.phase = Phase::Running(st);
        self.refresh_hash();
        self.dispatch(outs)
    }

    fn feed(&mut self, ev: InEvent) -> Result<(), JoinError> {
        let now = self.now();
        let Phase::Running(st) = &mut self.phase else {
            return Ok(());
        };
        let outs = st.handle(now, ev, &mut self.rng);
        self.dispatch(outs)
    }

    fn libp2p_of(&mut self, p: &ProtoPeer) -> Option<PeerId> {
        if let Some(id) = self.peer_cache.get(p) {
            return Some(*id);
        }
        let id = libp2p_peer(p)?;
        if self.peer_cache.len() > 65_536 {
            self.peer_cache.clear();
        }
        self.peer_cache.insert(*p, id);
        Some(id)
    }

    fn send(&self, cmd: Command) {
        // The swarm task drains its queue continuously; a full queue means it is overloaded,
        // and the protocol recovers lost messages through its retries.
        if let Err(e) = self.net.commands.try_send(cmd) {
            tracing::warn!(error = %e, "network queue full; message dropped");
        }
    }

    fn dispatch(&mut self, outs: Vec<OutEvent>) -> Result<(), JoinError> {
        for out in outs {
            match out {
                OutEvent::Gossip(env) => self.publish(&env)?,
                OutEvent::Direct { to, msg } => {
                    let Some(peer) = self.libp2p_of(&to) else {
                        continue;
                    };
                    match msg.to_bytes() {
                        Ok(data) => self.send(Command::Send {
                            to: peer,
                            data,
                            sync: net::is_sync(&msg),
                        }),
                        Err(e) => tracing::error!(error = %e, "cannot encode a direct message"),
                    }
                }
                OutEvent::SetTimer { at, timer } => {
                    self.timer_seq += 1;
                    if self.timers.len() < 100_000 {
                        self.timers.insert((at, self.timer_seq), timer);
                    }
                }
                OutEvent::Train { round } => {
                    if self.training.is_some() {
                        self.pending_train = Some(round);
                    } else {
                        self.start_training(round);
                    }
                }
                OutEvent::Decided { round, seal, state } => self.on_decided(round, seal, state)?,
                OutEvent::Rejected { from, kind, reason } => {
                    self.rejected += 1;
                    tracing::warn!(from = %hex(&from.0[..8]), kind, %reason, "message rejected");
                }
                OutEvent::Banned { peer } => {
                    tracing::warn!(peer = %hex(&peer.0[..8]), "peer banned on equivocation evidence");
                }
            }
        }
        self.update_status();
        Ok(())
    }

    fn publish(&mut self, env: &Envelope) -> Result<(), JoinError> {
        let join = matches!(env.body, Body::Join);
        // A node restarted from disk may redo work of a round it already signed messages in
        // (a READY after retraining, a CLOSE, an AGG...); a second, different message for the
        // same round would be equivocation. Stay silent (except JOIN) up to the last round it
        // signed in before the restart, and record every round it signs in from now on.
        if !join && self.silent_until.is_some_and(|r| env.round <= r) {
            tracing::debug!(
                kind = env.body.kind(),
                round = env.round,
                "not signing again in a round signed before the restart"
            );
            return Ok(());
        }
        if !join {
            self.votes.record(env.round)?;
        }
        match env.to_bytes() {
            Ok(data) if data.len() <= MAX_GOSSIP_BYTES => self.send(Command::Publish {
                topic: Topic::Avg,
                data,
            }),
            Ok(data) => tracing::error!(
                kind = env.body.kind(),
                bytes = data.len(),
                "protocol message exceeds the gossip limit; not sent"
            ),
            Err(e) => tracing::error!(error = %e, "cannot encode a protocol message"),
        }
        Ok(())
    }

    fn start_training(&mut self, round: u64) {
        let Some(st) = self.state() else { return };
        let theta = st.theta().to_vec();
        self.training = Some(round);
        tracing::info!(
            round,
            "training {} inner steps",
            self.cfg.run.config.inner_steps
        );
        let _ = self.jobs.send(Job::Train { round, theta });
    }

    /// Recomputes the hashes of the agreed state; called only when that state changes (start,
    /// decisions), never per event: each hashes every parameter.
    fn refresh_hash(&mut self) {
        if let Some(st) = self.state() {
            let (global, state) = if st.is_synced() {
                (hash_f32(st.theta()), hex(&st.state_hash().0))
            } else {
                (String::new(), String::new())
            };
            self.global_hash = global;
            self.state_hash = state;
        }
    }

    fn on_decided(&mut self, round: u64, seal: Hash, state: Hash) -> Result<(), JoinError> {
        self.rounds_decided += 1;
        self.refresh_hash();
        let elapsed = self.last_decided.map(|t| t.elapsed().as_secs_f64());
        self.last_decided = Some(Instant::now());
        let (members, next) = match self.state() {
            Some(st) => (st.members().len(), st.round()),
            None => (0, round + 1),
        };
        tracing::info!(
            round,
            members,
            seal = %hex(&seal.0[..8]),
            state = %hex(&state.0[..8]),
            global_hash = %&self.global_hash[..16.min(self.global_hash.len())],
            round_s = elapsed.unwrap_or(0.0),
            "round decided"
        );
        let averaging = self
            .trained_at
            .filter(|(r, _)| *r == round)
            .map(|(_, t)| t.elapsed().as_secs_f64());
        self.shared.update(|s| {
            s.last_round_s = elapsed;
            if averaging.is_some() {
                s.last_averaging_s = averaging;
            }
        });
        if self.cfg.eval_windows > 0 && self.cfg.run.config.synthetic_params == 0 && !self.eval_busy
        {
            if let Some(st) = self.state() {
                let theta = st.theta().to_vec();
                self.eval_busy = true;
                let _ = self.jobs.send(Job::Eval { round: next, theta });
            }
        }
        if self.cfg.checkpoint_every > 0 && next % self.cfg.checkpoint_every == 0 {
            self.save_checkpoint();
        }
        Ok(())
    }

    fn save_checkpoint(&mut self) -> bool {
        let Some(dir) = self.cfg.checkpoint_dir.clone() else {
            return false;
        };
        let Some(st) = self.state() else { return false };
        if !st.is_synced() {
            return false;
        }
        let job = SaveJob {
            dir,
            round: st.round(),
            theta: st.theta().to_vec(),
            momentum: st.momentum().to_vec(),
            net: NetCheckpoint {
                chain: hex(&st.chain().0),
                members: st.members().iter().map(|p| hex(&p.0)).collect(),
                founder: self.founder.map(|f| hex(&f.0)).unwrap_or_default(),
            },
            run: self.cfg.run.json(),
        };
        self.jobs.send(Job::Save(Box::new(job))).is_ok()
    }

    fn update_status(&self) {
        let (phase, round, members, member, banned) = match &self.phase {
            Phase::Discovering { .. } => ("discovering", 0, 0, false, 0),
            Phase::Running(st) => {
                let phase = if !st.is_synced() {
                    "syncing"
                } else if self.training.is_some() {
                    "training"
                } else {
                    "averaging"
                };
                (
                    phase,
                    st.round(),
                    st.members().len(),
                    st.is_member(),
                    st.banned().len(),
                )
            }
        };
        let h = self.cfg.run.config.inner_steps;
        let hash = self.global_hash.clone();
        let state_hash = self.state_hash.clone();
        let (decided, rejected) = (self.rounds_decided, self.rejected);
        self.shared.update(|s| {
            s.phase = phase.into();
            s.round = round;
            s.step = round * h;
            s.group_size = members;
            s.member = member;
            s.banned = banned;
            s.global_hash = hash;
            s.state_hash = state_hash;
            s.rounds_decided = decided;
            s.rejected = rejected;
        });
    }

    fn on_net(&mut self, ev: NetEvent) -> Result<(), JoinError> {
        match ev {
            NetEvent::Listening(addr) => {
                println!("listening on {addr}");
            }
            NetEvent::Gossip {
                from,
                topic: Topic::Hello,
                data,
            } => self.on_hello(from, &data)?,
            NetEvent::Gossip {
                from,
                topic: Topic::Avg,
                data,
            } => match Envelope::from_bytes(&data) {
                Ok(env) => {
                    self.feed(InEvent::Gossip {
                        env: Arc::new(env),
                        verified: false,
                    })?;
                }
                Err(e) => {
                    self.rejected += 1;
                    tracing::warn!(peer = %from, error = %e, "malformed gossip message dropped");
                }
            },
            NetEvent::Direct { from, data } => {
                let Some(sender) = proto_peer(&from) else {
                    tracing::warn!(peer = %from, "direct message from a non-ed25519 peer dropped");
                    return Ok(());
                };
                match Direct::from_bytes(&data) {
                    Ok(msg) => self.feed(InEvent::Direct {
                        from: sender,
                        msg: Arc::new(msg),
                    })?,
                    Err(e) => {
                        self.rejected += 1;
                        tracing::warn!(peer = %from, error = %e, "malformed direct message dropped");
                    }
                }
            }
            NetEvent::PeerJoined(p) => {
                if let Some(pp) = proto_peer(&p) {
                    self.feed(InEvent::Contact(pp))?;
                }
            }
            NetEvent::PeerLeft(p) => tracing::info!(peer = %p, "peer disconnected"),
            NetEvent::Bootstrapped => {
                if let Phase::Discovering { since, .. } = &mut self.phase {
                    if since.is_none() {
                        *since = Some(Instant::now());
                        tracing::info!(
                            wait_s = self.cfg.genesis_wait.as_secs_f64(),
                            "looking for a run under way"
                        );
                    }
                }
            }
            NetEvent::SendFailed { to, error } => {
                tracing::debug!(peer = %to, %error, "direct message not delivered (the protocol retries)")
            }
        }
        Ok(())
    }

    fn on_hello(&mut self, from: PeerId, data: &[u8]) -> Result<(), JoinError> {
        let Some(hello) = decode_hello(data) else {
            tracing::debug!(peer = %from, "malformed HELLO dropped");
            return Ok(());
        };
        let Some(sender) = proto_peer(&from) else {
            return Ok(());
        };
        if sender.0 != hello.peer {
            tracing::warn!(peer = %from, "HELLO signed by one peer for another; dropped");
            return Ok(());
        }
        let mut join_with: Option<Vec<ProtoPeer>> = None;
        let mut contact = false;
        let mut fork = false;
        if hello.synced {
            self.last_synced_hello = Instant::now();
        }
        match &mut self.phase {
            Phase::Discovering { heard, .. } => {
                if heard.len() < 4096 || heard.contains_key(&sender) {
                    heard.insert(sender, (Instant::now(), hello.synced));
                }
                if hello.synced {
                    join_with = Some(
                        heard
                            .iter()
                            .filter(|(_, (_, synced))| *synced)
                            .map(|(p, _)| *p)
                            .collect(),
                    );
                }
            }
            Phase::Running(st) => {
                contact = hello.synced && !st.is_synced();
                // Two histories of one run (peers that founded without hearing each other):
                // the one with more members, then more rounds, then the lower founder id, wins;
                // every peer of the other abandons its history and joins it.
                if let (true, true, Some(mine)) = (hello.synced, st.is_synced(), self.founder) {
                    if hello.founder != mine.0 {
                        let theirs = (
                            hello.members as usize,
                            hello.round,
                            std::cmp::Reverse(hello.founder),
                        );
                        let ours = (st.members().len(), st.round(), std::cmp::Reverse(mine.0));
                        fork = theirs > ours;
                    }
                }
            }
        }
        if fork {
            tracing::warn!(
                peer = %from, their_round = hello.round, their_members = hello.members,
                founder = %hex(&hello.founder[..8]),
                "another history of this run is ahead of ours: abandoning ours and joining it"
            );
            // Votes cast in the abandoned history say nothing about the new one.
            self.votes.reset()?;
            self.shared.update(|s| s.forks_abandoned += 1);
            self.timers.clear();
            self.pending_train = None;
            join_with = Some(vec![sender]);
        }
        if let Some(contacts) = join_with {
            self.founder = Some(ProtoPeer(hello.founder));
            tracing::info!(
                peer = %from, round = hello.round, members = hello.members,
                "found the run under way: joining (fetching its state from peers)"
            );
            let proto = self.cfg.run.protocol(self.layout_len());
            let st = State::joiner(proto, self.key.clone(), contacts);
            self.last_synced_hello = Instant::now();
            self.start_state(st)?;
        } else if contact {
            self.feed(InEvent::Contact(sender))?;
        }
        Ok(())
    }

    fn layout_len(&self) -> usize {
        self.layout.iter().map(ParamInfo::len).sum()
    }

    fn on_hello_tick(&mut self) -> Result<(), JoinError> {
        self.hello_seq += 1;
        let founder = self.founder.map(|f| f.0).unwrap_or([0; 32]);
        let (synced, round, members) = match self.state() {
            Some(st) => (st.is_synced(), st.round(), st.members().len() as u32),
            None => (false, 0, 0),
        };
        let hello = Hello {
            version: HELLO_VERSION,
            peer: self.me.0,
            seq: self.hello_seq,
            synced,
            round,
            members,
            founder,
        };
        self.send(Command::Publish {
            topic: Topic::Hello,
            data: encode_hello(&hello),
        });
        let me = self.me;
        let wait = self.cfg.genesis_wait;
        // A joiner that hears nobody holding run state for this long (the run it was joining
        // died: say its lone founder was killed before anyone synced) goes back to discovery,
        // where the peers present found the run afresh, instead of waiting forever.
        let give_up = (wait * 2).max(JOINER_GIVE_UP);
        if let Some(st) = self.state() {
            if !st.is_synced() && self.last_synced_hello.elapsed() > give_up {
                tracing::warn!(
                    silent_s = self.last_synced_hello.elapsed().as_secs(),
                    "no peer holding the run's state heard from: back to discovery"
                );
                self.founder = None;
                self.timers.clear();
                self.pending_train = None;
                self.phase = Phase::Discovering {
                    since: Some(Instant::now()),
                    heard: HashMap::new(),
                    waiting_logged: false,
                };
                self.update_status();
                return Ok(());
            }
        }
        let mut found: Option<Vec<ProtoPeer>> = None;
        if let Phase::Discovering {
            since,
            heard,
            waiting_logged,
        } = &mut self.phase
        {
            let Some(since) = since else {
                return Ok(());
            };
            if since.elapsed() < wait {
                return Ok(());
            }
            let recent = Duration::from_secs(3).max(wait / 2);
            let mut candidates: Vec<ProtoPeer> = heard
                .iter()
                .filter(|(_, (t, synced))| !synced && t.elapsed() < recent)
                .map(|(p, _)| *p)
                .chain(std::iter::once(me))
                .collect();
            candidates.sort();
            candidates.dedup();
            let need = self.cfg.founders.max(1);
            if candidates.len() >= need {
                // The `need` lowest ids found the run together; everyone else joins it.
                candidates.truncate(need);
                if candidates.contains(&me) {
                    found = Some(candidates);
                } else if !*waiting_logged {
                    *waiting_logged = true;
                    tracing::info!(
                        founder = %hex(&candidates[0].0[..8]),
                        "waiting for the peers with the lowest ids to found the run"
                    );
                }
            } else if !*waiting_logged {
                *waiting_logged = true;
                tracing::info!(
                    heard = candidates.len(),
                    founders = need,
                    "waiting for enough peers to found the run together (--founders)"
                );
            }
        }
        if let Some(members) = found {
            tracing::info!(
                founders = members.len(),
                "no run found: founding it at round 0 (others join as they come)"
            );
            let theta0 =
                flat::init_values(&self.layout, &self.cfg.run.model, self.cfg.run.config.seed);
            let proto = self.cfg.run.protocol(theta0.len());
            self.founder = Some(members[0]);
            let st = State::genesis(proto, self.key.clone(), theta0, members);
            self.start_state(st)?;
        }
        Ok(())
    }

    fn on_done(&mut self, done: Done) -> Result<(), JoinError> {
        match done {
            Done::Trained {
                round,
                delta,
                tokens,
                loss,
                secs,
            } => {
                self.training = None;
                self.trained_at = Some((round, Instant::now()));
                let tok_s = tokens as f64 / secs.max(1e-9);
                tracing::info!(
                    round,
                    loss,
                    tokens_per_s = tok_s as u64,
                    "local training done"
                );
                self.shared.update(|s| s.last_loss = Some(loss));
                self.feed(InEvent::Trained {
                    round,
                    delta,
                    tokens,
                })?;
                if let Some(r) = self.pending_train.take() {
                    self.start_training(r);
                }
            }
            Done::Aborted => self.training = None,
            Done::Evaluated { round, loss } => {
                self.eval_busy = false;
                tracing::info!(round, eval_loss = loss, "eval of the global parameters");
                self.shared.update(|s| {
                    s.eval_loss = Some(loss);
                    if s.eval_history.len() < 10_000 {
                        s.eval_history.push((round, loss));
                    }
                });
            }
            Done::Saved { round, result } => match result {
                Ok(path) => {
                    tracing::info!(round, path = %path.display(), "checkpoint written");
                    self.last_checkpoint = Some(path);
                }
                Err(e) => {
                    tracing::error!(round, error = %e, "checkpoint failed; training continues")
                }
            },
            Done::Failed(e) => return Err(JoinError::Trainer(e)),
        }
        self.update_status();
        Ok(())
    }

    fn fire_timers(&mut self) -> Result<(), JoinError> {
        let now = self.now();
        while let Some((&(at, seq), _)) = self.timers.iter().next() {
            if at > now {
                break;
            }
            let Some(t) = self.timers.remove(&(at, seq)) else {
                break;
            };
            self.feed(InEvent::Timer(t))?;
        }
        Ok(())
    }

    fn next_timer(&self) -> tokio::time::Instant {
        let base = tokio::time::Instant::from_std(self.clock);
        match self.timers.keys().next() {
            Some(&(at, _)) => base + Duration::from_millis(at),
            None => tokio::time::Instant::now() + Duration::from_secs(3600),
        }
    }
}

fn restore(
    cfg: &JoinConfig,
    layout: &[ParamInfo],
    key: &SigningKey,
) -> Result<Option<(State, checkpoint::Loaded)>, JoinError> {
    let Some(dir) = &cfg.checkpoint_dir else {
        return Ok(None);
    };
    let Some(loaded) = checkpoint::load_latest(dir, layout, &OPT_SUFFIXES)? else {
        return Ok(None);
    };
    checkpoint::check_run(&loaded, &cfg.run.json(), &[])?;
    let corrupt = |reason: &str| CheckpointError::Corrupt {
        path: loaded.path.clone(),
        reason: reason.to_string(),
    };
    let net = loaded
        .state
        .net
        .clone()
        .ok_or_else(|| corrupt("no network state (written by `train`, not `join`?)"))?;
    let chain = unhex32(&net.chain).ok_or_else(|| corrupt("bad chain hash"))?;
    let members = net
        .members
        .iter()
        .map(|m| unhex32(m).map(ProtoPeer))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| corrupt("bad member id"))?;
    let momentum = loaded
        .optimizer
        .get(OPT_SUFFIXES[2])
        .cloned()
        .ok_or_else(|| corrupt("no outer momentum"))?;
    let proto = cfg.run.protocol(loaded.params.len());
    let st = State::restore(
        proto,
        key.clone(),
        loaded.state.round,
        Hash(chain),
        members,
        loaded.params.clone(),
        momentum,
    );
    Ok(Some((st, loaded)))
}

/// Runs a node until `stop` is set (Ctrl+C, SIGTERM) or the run's last round is decided.
pub async fn run(
    cfg: JoinConfig,
    corpus: Arc<Corpus>,
    device: Device,
    stop: Arc<AtomicBool>,
) -> Result<JoinReport, JoinError> {
    let key = SigningKey::from_bytes(&cfg.identity.secret);
    let me = ProtoPeer::of(&key);
    let peer_id = cfg.identity.peer_id();
    let span = tracing::info_span!("node", peer = %peer_id, run = %cfg.run.id_hex());
    run_node(cfg, corpus, device, stop, key, me, peer_id)
        .instrument(span)
        .await
}

async fn run_node(
    cfg: JoinConfig,
    corpus: Arc<Corpus>,
    device: Device,
    stop: Arc<AtomicBool>,
    key: SigningKey,
    me: ProtoPeer,
    peer_id: PeerId,
) -> Result<JoinReport, JoinError> {
    let synthetic = cfg.run.config.synthetic_params as usize;
    let layout = if synthetic > 0 {
        vec![ParamInfo {
            name: "synthetic".into(),
            shape: vec![synthetic],
        }]
    } else {
        flat::layout(&cfg.run.model.init(&device))
    };
    let n_params: usize = layout.iter().map(ParamInfo::len).sum();
    tracing::info!(params = n_params, model = %cfg.run.model.describe(), "node starting");

    let restored = restore(&cfg, &layout, &key)?;
    let votes = VoteLog::open(cfg.checkpoint_dir.as_deref())?;
    let vote_from = votes.highest.map(|v| v + 1);

    // The trainer thread.
    let init = match &restored {
        Some((_, l)) => l.params.clone(),
        None => flat::init_values(&layout, &cfg.run.model, cfg.run.config.seed),
    };
    let work = if synthetic > 0 {
        None
    } else {
        let mut replica = Replica::new(&cfg.run.model, &device, &init)?;
        if let Some((_, l)) = &restored {
            if let (Some(m), Some(v)) = (
                l.optimizer.get(OPT_SUFFIXES[0]),
                l.optimizer.get(OPT_SUFFIXES[1]),
            ) {
                replica.adam =
                    AdamState::from_flat(l.state.adam_t, m, v, &layout, replica.device());
            }
        }
        Some(ModelWork {
            replica,
            evaluator: Evaluator::new(&cfg.run.model, &device),
        })
    };
    let shard_key = u64::from_le_bytes(me.0[..8].try_into().unwrap_or([0; 8]));
    let eval_windows = if synthetic == 0 { cfg.eval_windows } else { 0 };
    let trainer = Trainer::new(
        cfg.run.clone(),
        work,
        corpus.clone(),
        layout.clone(),
        shard_key,
        eval_windows,
        stop.clone(),
        cfg.checkpoint_dir.is_some(),
    );
    let (job_tx, job_rx) = std::sync::mpsc::channel();
    let (done_tx, mut done_rx) = mpsc::channel(64);
    let trainer_thread = std::thread::Builder::new()
        .name("trainer".into())
        .spawn(move || trainer.serve(job_rx, done_tx))
        .map_err(|e| JoinError::Trainer(e.to_string()))?;

    // Network and status.
    let max_direct = (2 * diloco_protocol::codec::max_encoded_len(
        diloco_protocol::codec::Quantization::F32,
        n_params,
    ) + (1 << 20))
        .min(diloco_protocol::wire::MAX_DIRECT_BYTES);
    let shared = cfg
        .observer
        .clone()
        .unwrap_or_else(|| Shared::new(Status::default(), Arc::new(net::NetStats::default())));
    shared.update(|s| {
        s.peer_id = peer_id.to_string();
        s.run_id = cfg.run.id_hex();
        s.phase = "discovering".into();
    });
    let net = net::spawn(
        &cfg.identity.keypair,
        NetConfig {
            listen: cfg.listen.clone(),
            bootstrap: cfg.bootstrap.clone(),
            run: cfg.run.id_hex(),
            max_direct,
            request_timeout: Duration::from_secs(120),
            relay_listen: cfg.relay_listen,
            private_network: cfg.private_network,
        },
        shared.net.clone(),
    )?;
    if let Some(addr) = cfg.status_addr {
        let bound = crate::status::serve(addr, shared.clone()).await?;
        println!("status on http://{bound}/status");
        tracing::info!(addr = %bound, "serving /status and /metrics");
    }

    let mut seed = [0u8; 32];
    seed.copy_from_slice(
        blake3::Hasher::new()
            .update(&cfg.identity.secret)
            .update(
                &std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0)
                    .to_le_bytes(),
            )
            .finalize()
            .as_bytes(),
    );
    let mut node = Node {
        cfg: cfg.clone(),
        me,
        key: key.clone(),
        layout,
        phase: Phase::Discovering {
            since: cfg.bootstrap.is_empty().then(Instant::now),
            heard: HashMap::new(),
            waiting_logged: false,
        },
        net,
        timers: BTreeMap::new(),
        timer_seq: 0,
        clock: Instant::now(),
        rng: ChaCha8Rng::from_seed(seed),
        jobs: job_tx,
        training: None,
        pending_train: None,
        eval_busy: false,
        shared: shared.clone(),
        peer_cache: HashMap::new(),
        votes,
        last_decided: None,
        hello_seq: 0,
        rounds_decided: 0,
        rejected: 0,
        global_hash: String::new(),
        state_hash: String::new(),
        last_checkpoint: None,
        founder: None,
        trained_at: None,
        silent_until: vote_from.map(|v| v - 1),
        last_synced_hello: Instant::now(),
    };
    if let Some((mut st, loaded)) = restored {
        node.founder = loaded
            .state
            .net
            .as_ref()
            .and_then(|n| unhex32(&n.founder))
            .map(ProtoPeer);
        if let Some(v) = vote_from {
            st.set_vote_from(v);
        }
        tracing::info!(
            round = loaded.state.round,
            path = %loaded.path.display(),
            "restored from checkpoint; catching up with the run"
        );
        node.start_state(st)?;
    }

    let mut hello = tokio::time::interval(Duration::from_secs(1));
    let mut stop_poll = tokio::time::interval(Duration::from_millis(100));
    let result: Result<(), JoinError> = loop {
        let wake = node.next_timer();
        let step = tokio::select! {
            ev = node.net.events.recv() => match ev {
                Some(ev) => node.on_net(ev),
                None => Err(JoinError::Net(net::NetError::Closed)),
            },
            done = done_rx.recv() => match done {
                Some(d) => node.on_done(d),
                None => Err(JoinError::Trainer("the trainer thread stopped".into())),
            },
            _ = tokio::time::sleep_until(wake) => node.fire_timers(),
            _ = hello.tick() => node.on_hello_tick(),
            _ = stop_poll.tick() => {
                let last = node.state().is_some_and(|s| s.round() >= node.cfg.run.config.rounds);
                if last {
                    tracing::info!(rounds = node.cfg.run.config.rounds, "the run's last round is decided");
                    stop.store(true, Ordering::SeqCst);
                }
                if stop.load(Ordering::Relaxed) {
                    break Ok(());
                }
                Ok(())
            }
        };
        if let Err(e) = step {
            break Err(e);
        }
    };

    // Shut down at a safe point: the agreed state of the current round.
    tracing::info!("stopping");
    let mut checkpoint = None;
    let mut final_error = None;
    if result.is_ok() && node.save_checkpoint() {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
        loop {
            match tokio::time::timeout_at(deadline, done_rx.recv()).await {
                Ok(Some(Done::Saved { result, round })) => {
                    match result {
                        Ok(p) => {
                            tracing::info!(round, path = %p.display(), "final checkpoint written");
                            checkpoint = Some(p.display().to_string());
                        }
                        Err(e) => {
                            tracing::error!(round, error = %e, "final checkpoint failed");
                            final_error = Some(JoinError::FinalCheckpoint(e));
                        }
                    }
                    break;
                }
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => {
                    let why = if deadline <= tokio::time::Instant::now() {
                        "the checkpoint writer did not finish within 300 s"
                    } else {
                        "the checkpoint writer stopped before finishing"
                    };
                    tracing::error!("final checkpoint did not complete: {why}");
                    final_error = Some(JoinError::FinalCheckpoint(why.into()));
                    break;
                }
            }
        }
    }
    let _ = node.jobs.send(Job::Quit);
    let _ = node.net.commands.send(Command::Shutdown).await;
    drop(done_rx);
    let _ = tokio::task::spawn_blocking(move || trainer_thread.join()).await;
    node.update_status();
    shared.update(|s| s.phase = "stopped".into());
    result?;
    if let Some(e) = final_error {
        return Err(e);
    }
    let snap = shared.snapshot();
    Ok(JoinReport {
        peer_id: peer_id.to_string(),
        run_id: cfg.run.id_hex(),
        round: snap.round,
        global_hash: snap.global_hash,
        rounds_decided: snap.rounds_decided,
        eval_loss: snap.eval_loss,
        bytes_sent: snap.bytes_sent,
        bytes_received: snap.bytes_received,
        checkpoint: checkpoint.or(node.last_checkpoint.map(|p| p.display().to_string())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_ids_convert_both_ways() {
        let id = Identity::generate();
        let key = SigningKey::from_bytes(&id.secret);
        let p = ProtoPeer::of(&key);
        assert_eq!(libp2p_peer(&p), Some(id.peer_id()));
        assert_eq!(proto_peer(&id.peer_id()), Some(p));
        // A hashed (non-inline) peer id has no ed25519 key to recover.
        let rsa_like =
            PeerId::from_multihash(libp2p::multihash::Multihash::wrap(0x12, &[7u8; 32]).unwrap())
                .unwrap();
        assert_eq!(proto_peer(&rsa_like), None);
    }

    #[test]
    fn hellos_roundtrip_and_garbage_is_refused() {
        let h = Hello {
            version: HELLO_VERSION,
            peer: [3; 32],
            seq: 9,
            synced: true,
            round: 4,
            members: 3,
            founder: [1; 32],
        };
        let b = encode_hello(&h);
        assert_eq!(decode_hello(&b), Some(h.clone()));
        assert_eq!(decode_hello(&b[..b.len() - 1]), None);
        let mut long = b.clone();
        long.push(0);
        assert_eq!(decode_hello(&long), None);
        assert_eq!(decode_hello(&[0xff; 2000]), None);
        assert_eq!(decode_hello(&[]), None);
    }

    /// A trainer for a 1-layer model on the built-in corpus, 2 inner steps per round.
    fn small_trainer() -> (Trainer, Vec<f32>) {
        let corpus = Arc::new(
            Corpus::load(&crate::data::DataSpec {
                eval_fraction: 0.05,
                ..Default::default()
            })
            .unwrap(),
        );
        let rc = crate::runconfig::RunConfig {
            model: "d16-l1-h2-c16".into(),
            inner_steps: 2,
            batch: 2,
            seq: 16,
            ..Default::default()
        };
        let run = rc.validate(&corpus).unwrap();
        let device = Device::flex();
        let layout = flat::layout(&run.model.init(&device));
        let init = flat::init_values(&layout, &run.model, 0);
        let work = ModelWork {
            replica: Replica::new(&run.model, &device, &init).unwrap(),
            evaluator: Evaluator::new(&run.model, &device),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let trainer = Trainer::new(run, Some(work), corpus, layout, 1, 0, stop, true);
        (trainer, init)
    }

    fn save_job(dir: &Path, round: u64, theta: &[f32]) -> SaveJob {
        SaveJob {
            dir: dir.to_path_buf(),
            round,
            theta: theta.to_vec(),
            momentum: vec![0.0; theta.len()],
            net: NetCheckpoint {
                chain: String::new(),
                members: Vec::new(),
                founder: String::new(),
            },
            run: serde_json::json!({}),
        }
    }

    fn saved_moments(dir: &Path, t: &Trainer) -> (u64, Vec<f32>) {
        let l = checkpoint::load_latest(dir, &t.layout, &OPT_SUFFIXES)
            .unwrap()
            .unwrap();
        (l.state.adam_t, l.optimizer[OPT_SUFFIXES[0]].clone())
    }

    #[test]
    fn a_checkpoint_carries_the_moments_its_round_started_from() {
        let dir = tempfile::tempdir().unwrap();
        let (mut t, theta) = small_trainer();
        // Round 0 trained; the state of round 1 starts from the moments it left.
        assert!(matches!(
            t.train(0, theta.clone()),
            Ok(Done::Trained { .. })
        ));
        let (after0, _) = t.work.as_ref().unwrap().replica.adam.to_flat(&t.layout);
        t.save(&save_job(dir.path(), 1, &theta)).unwrap();
        assert_eq!(saved_moments(dir.path(), &t), (2, after0.clone()));

        // Round 1 trained (or aborted) before the checkpoint of its start is written: the
        // checkpoint still carries the moments round 1 started from, not the newer ones.
        assert!(matches!(
            t.train(1, theta.clone()),
            Ok(Done::Trained { .. })
        ));
        let (after1, _) = t.work.as_ref().unwrap().replica.adam.to_flat(&t.layout);
        assert_ne!(after0, after1);
        t.save(&save_job(dir.path(), 1, &theta)).unwrap();
        assert_eq!(saved_moments(dir.path(), &t), (2, after0));

        // Retraining round 1 keeps the first start; the state of round 2 gets the latest.
        assert!(matches!(
            t.train(1, theta.clone()),
            Ok(Done::Trained { .. })
        ));
        t.save(&save_job(dir.path(), 2, &theta)).unwrap();
        let (now, _) = t.work.as_ref().unwrap().replica.adam.to_flat(&t.layout);
        assert_eq!(saved_moments(dir.path(), &t), (6, now));
    }

    #[test]
    fn votes_are_durable_and_monotonic() {
        let dir = tempfile::tempdir().unwrap();
        let mut v = VoteLog::open(Some(dir.path())).unwrap();
        assert_eq!(v.highest, None);
        v.record(3).unwrap();
        v.record(2).unwrap();
        assert_eq!(VoteLog::open(Some(dir.path())).unwrap().highest, Some(3));
        v.record(7).unwrap();
        assert_eq!(VoteLog::open(Some(dir.path())).unwrap().highest, Some(7));
    }
}
