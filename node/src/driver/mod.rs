//! `join`: one peer of a DiLoCo run on the network, and the only place where training, the
//! averaging protocol and the network meet.
//!
//! Three actors, connected by bounded channels:
//! * the swarm task ([`crate::net`]) moves bytes;
//! * the trainer thread ([`crate::train::worker`]) owns the replica (burn model and AdamW
//!   state): it trains H inner steps from the global parameters it is given, evaluates, and
//!   writes checkpoints;
//! * the driver (this module's event loop, [`node`]) owns the averaging state machine
//!   ([`diloco_protocol::averaging::State`]) and discovery
//!   ([`diloco_protocol::discovery::Discovery`]), feeds them network messages, timers and
//!   finished training, and carries out what they ask for. It never blocks on training.
//!
//! Starting: with a checkpoint in `--checkpoint-dir`, the node restores the agreed state it
//! saved ([`restore`]) and catches up through decision proofs or a state transfer. Without
//! one, discovery listens to HELLOs for `--genesis-wait` and joins the run under way, or
//! founds it (docs/PROTOCOL.md, "Discovery").
//!
//! Signed statements are durable ([`votes`]): before any protocol message but JOIN leaves the
//! node, its round is written to `VOTED` in the checkpoint directory.

pub mod history;
mod node;
pub mod ratelog;
pub mod restore;
pub mod status;
pub mod tamper;
mod timers;
pub mod votes;

use crate::net::{self, NetConfig};
use crate::runconfig::Run;
use crate::train::backend::Compute;
use crate::train::checkpoint::CheckpointError;
use crate::train::data::Corpus;
use crate::train::flat::{self, ParamInfo};
use crate::train::inner::{AdamState, Evaluator, Replica};
use crate::train::worker::{Done, Job, ModelWork, Trainer, WorkerError, OPT_SUFFIXES};
use diloco_p2p::keys::Identity;
use diloco_protocol::averaging::Admission;
use diloco_protocol::discovery::{self, Discovery};
use diloco_protocol::wire::{Invite, PeerKey};
use ed25519_dalek::SigningKey;
use libp2p::{Multiaddr, PeerId};
use node::{Node, Tally};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use status::{Phase, Shared, Status, StatusError};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use timers::Timers;
use tracing::Instrument;
use votes::{VoteError, VoteLog};

/// How long the final checkpoint may take before the node stops without it.
const FINAL_CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(300);

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
    #[error(transparent)]
    Vote(#[from] VoteError),
    /// The trainer thread failed.
    #[error("the trainer failed")]
    Trainer(#[source] WorkerError),
    /// The checkpoint written when stopping failed: the node stopped without its state on disk.
    #[error("the final checkpoint was not written; the node stopped without saving its state (free some disk space or fix --checkpoint-dir; the other peers still hold the run's state, so restarting rejoins the run)")]
    FinalCheckpoint(#[source] CheckpointError),
    /// The run's admission policy does not let this node in.
    #[error("{0}")]
    NotAdmitted(String),
    /// The final checkpoint did not complete.
    #[error("the final checkpoint did not complete: {0}; the node stopped without saving its state (the other peers still hold the run's state, so restarting rejoins the run)")]
    FinalCheckpointIncomplete(&'static str),
}

/// Refuses to start a node the run's admission policy would never admit, saying what to do.
fn check_admission(cfg: &JoinConfig, me: PeerKey, peer_id: &PeerId) -> Result<(), JoinError> {
    let listed = cfg.run.admission.lists(&me);
    match (&cfg.run.admission, &cfg.invite) {
        (Admission::Allowlist(_), _) if !listed => Err(JoinError::NotAdmitted(format!(
            "this node ({peer_id}) is not on the run's allowlist: ask the run's operator to add \
             it, or use the identity key of a listed peer (--key)"
        ))),
        (Admission::Invite(_), None) if !listed => Err(JoinError::NotAdmitted(format!(
            "this run admits members by invitation: ask a member to run `diloco-node invite \
             --peer {peer_id}` with the run's flags and pass the token with --invite"
        ))),
        (Admission::Invite(_), Some(inv)) if !inv.verify(cfg.run.id, me) => {
            Err(JoinError::NotAdmitted(format!(
                "--invite: the invitation is not for this node ({peer_id}) in this run ({}); \
                 it was signed for another peer id or run config",
                cfg.run.id_hex()
            )))
        }
        (Admission::Open, Some(_)) => {
            tracing::warn!(
                "--invite given but the run is open to anyone: the invitation is ignored"
            );
            Ok(())
        }
        _ => Ok(()),
    }
}

/// An error and its sources on one line (`a: b: c`), for logs.
pub fn report(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
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
    /// This node's invitation to an `invite` run.
    pub invite: Option<Invite>,
    /// Fault injection for adversarial tests ([`tamper`]); `None` for every real node.
    pub tamper: Option<tamper::TamperHook>,
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

/// Runs a node until `stop` is set (Ctrl+C, SIGTERM) or the run's last round is decided.
pub async fn run(
    cfg: JoinConfig,
    corpus: Arc<Corpus>,
    device: Compute,
    stop: Arc<AtomicBool>,
) -> Result<JoinReport, JoinError> {
    let peer_id = cfg.identity.peer_id();
    let span = tracing::info_span!("node", peer = %peer_id, run = %cfg.run.id_hex());
    run_node(cfg, corpus, device, stop, peer_id)
        .instrument(span)
        .await
}

/// The parameter layout of the run's model (one flat vector in synthetic runs).
fn layout_of(cfg: &JoinConfig) -> Vec<ParamInfo> {
    match cfg.run.config.synthetic_params as usize {
        0 => cfg.run.model.layout(),
        n => vec![ParamInfo {
            name: "synthetic".into(),
            shape: vec![n],
        }],
    }
}

/// The trainer of this node: the replica from the checkpoint's (or the initial) parameters
/// and AdamW moments, on this peer's data stream.
fn trainer_of(
    cfg: &JoinConfig,
    corpus: &Arc<Corpus>,
    device: &Compute,
    layout: &[ParamInfo],
    restored: Option<&crate::train::checkpoint::Loaded>,
    me: PeerKey,
    stop: &Arc<AtomicBool>,
) -> Result<Trainer, JoinError> {
    let synthetic = cfg.run.config.synthetic_params > 0;
    let work = if synthetic {
        None
    } else {
        let init = match restored {
            Some(l) => l.params.clone(),
            None => flat::init_values(layout, &cfg.run.model, cfg.run.config.seed),
        };
        let mut replica = Replica::new(&cfg.run.model, device, &init)?;
        if let Some(l) = restored {
            if let (Some(m), Some(v)) = (
                l.optimizer.get(OPT_SUFFIXES[0]),
                l.optimizer.get(OPT_SUFFIXES[1]),
            ) {
                replica.adam = AdamState::from_flat(l.state.adam_t, m, v, layout, replica.device());
            }
        }
        Some(ModelWork {
            replica,
            evaluator: Evaluator::new(&cfg.run.model, device),
        })
    };
    let shard_key = u64::from_le_bytes(me.0[..8].try_into().unwrap_or([0; 8]));
    let eval_windows = if synthetic { 0 } else { cfg.eval_windows };
    Ok(Trainer::new(
        cfg.run.clone(),
        work,
        corpus.clone(),
        layout.to_vec(),
        shard_key,
        eval_windows,
        stop.clone(),
        cfg.checkpoint_dir.is_some(),
    ))
}

/// A seed for the protocol's randomness (retry jitter): this node's secret and the time.
fn rng_seed(secret: &[u8; 32]) -> [u8; 32] {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    *blake3::Hasher::new()
        .update(secret)
        .update(&nanos.to_le_bytes())
        .finalize()
        .as_bytes()
}

async fn run_node(
    cfg: JoinConfig,
    corpus: Arc<Corpus>,
    device: Compute,
    stop: Arc<AtomicBool>,
    peer_id: PeerId,
) -> Result<JoinReport, JoinError> {
    let key = SigningKey::from_bytes(&cfg.identity.secret);
    let me = PeerKey::of(&key);
    check_admission(&cfg, me, &peer_id)?;
    let layout = layout_of(&cfg);
    let n_params: usize = layout.iter().map(ParamInfo::len).sum();
    tracing::info!(params = n_params, model = %cfg.run.model.describe(), "node starting");

    let restored = restore::restore(cfg.checkpoint_dir.as_deref(), &cfg.run, &layout, &key)?;
    let votes = VoteLog::open(cfg.checkpoint_dir.as_deref())?;
    let trainer = trainer_of(
        &cfg,
        &corpus,
        &device,
        &layout,
        restored.as_ref().map(|(_, l)| l),
        me,
        &stop,
    )?;
    let (jobs, mut done_rx, trainer_thread) = trainer.spawn().map_err(JoinError::Trainer)?;

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
        s.run_hash = hex::encode(cfg.run.id.0);
        s.phase = Phase::Discovering;
    });
    let (client, mut events) = net::spawn(
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
        let bound = status::serve(addr, shared.clone()).await?;
        println!("status on http://{bound}/status");
        println!("dashboard on http://{bound}/");
        tracing::info!(addr = %bound, "serving the dashboard, /status, /history, /peers and /metrics");
    }

    let timers = Timers::new();
    let mut dcfg = discovery::Config::new(cfg.genesis_wait.as_millis() as u64, cfg.founders);
    dcfg.may_found = cfg.run.admission.lists(&me);
    let disc = match &restored {
        Some((_, loaded)) => Discovery::restored(dcfg, me, timers.now(), restore::founder(loaded)),
        None => Discovery::new(dcfg, me, timers.now(), cfg.bootstrap.is_empty()),
    };
    let mut node = Node {
        cfg: cfg.clone(),
        key: key.clone(),
        layout,
        discovery: disc,
        state: None,
        net: client,
        timers,
        rng: ChaCha8Rng::from_seed(rng_seed(&cfg.identity.secret)),
        trainer: node::Trainer {
            jobs,
            training: None,
            pending: None,
            eval_busy: false,
            trained_at: None,
        },
        shared: shared.clone(),
        votes,
        tally: Tally::default(),
        ratelog: ratelog::RateLog::default(),
        probes: std::collections::HashMap::new(),
    };
    if let Some((st, loaded)) = restored {
        tracing::info!(
            round = loaded.state.round,
            path = %loaded.path.display(),
            "restored from checkpoint; catching up with the run"
        );
        node.start_state(st)?;
    }

    // `POST /reconfig` reaches the loop through this (a few requests at most are queued).
    let (control_tx, mut control_rx) = tokio::sync::mpsc::channel(4);
    if shared.control.set(control_tx).is_err() {
        tracing::debug!("the status server already serves another node's requests");
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut stop_poll = tokio::time::interval(Duration::from_millis(100));
    let result: Result<(), JoinError> = loop {
        let wake = node.timers.next_wake();
        let step = tokio::select! {
            ev = events.recv() => match ev {
                Some(ev) => node.on_net(ev),
                None => Err(JoinError::Net(net::NetError::Closed)),
            },
            done = done_rx.recv() => match done {
                Some(d) => node.on_done(d),
                None => Err(JoinError::Trainer(WorkerError::Stopped)),
            },
            Some(c) = control_rx.recv() => node.on_control(c),
            _ = tokio::time::sleep_until(wake) => node.fire_timers(),
            _ = tick.tick() => node.on_tick(),
            _ = stop_poll.tick() => {
                let rounds = node.cfg.run.config.rounds;
                if node.state.as_ref().is_some_and(|s| s.round() >= rounds) {
                    tracing::info!(rounds, "the run's last round is decided");
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
    let (checkpoint, final_error) = if result.is_ok() && node.save_checkpoint() {
        final_checkpoint(&mut done_rx).await
    } else {
        (None, None)
    };
    let _ = node.trainer.jobs.send(Job::Quit);
    node.net.shutdown().await;
    drop(done_rx);
    let _ = tokio::task::spawn_blocking(move || trainer_thread.join()).await;
    node.update_status();
    shared.update(|s| s.phase = Phase::Stopped);
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
        checkpoint: checkpoint.or(node.tally.last_checkpoint.map(|p| p.display().to_string())),
    })
}

/// Waits for the checkpoint asked for at shutdown: where it went, or why it is missing.
async fn final_checkpoint(
    done_rx: &mut tokio::sync::mpsc::Receiver<Done>,
) -> (Option<String>, Option<JoinError>) {
    let deadline = tokio::time::Instant::now() + FINAL_CHECKPOINT_TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline, done_rx.recv()).await {
            Ok(Some(Done::Saved { result, round })) => {
                return match result {
                    Ok(p) => {
                        tracing::info!(round, path = %p.display(), "final checkpoint written");
                        (Some(p.display().to_string()), None)
                    }
                    Err(e) => {
                        tracing::error!(round, error = %report(&e), "final checkpoint failed");
                        (None, Some(JoinError::FinalCheckpoint(e)))
                    }
                };
            }
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => {
                let why = if deadline <= tokio::time::Instant::now() {
                    "the checkpoint writer did not finish within 300 s"
                } else {
                    "the checkpoint writer stopped before finishing"
                };
                tracing::error!("final checkpoint did not complete: {why}");
                return (None, Some(JoinError::FinalCheckpointIncomplete(why)));
            }
        }
    }
}
