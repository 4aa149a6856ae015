//! The node's event loop state and one named handler per source: the network
//! ([`Node::on_net`]), the trainer thread ([`Node::on_done`]), protocol timers
//! ([`Node::fire_timers`]) and the one-second discovery tick ([`Node::on_tick`]). Each feeds
//! the averaging state machine or discovery and carries out what they ask for; none blocks.

use super::history::RoundRecord;
use super::status::{Control, Phase, Shared};
use super::tamper::{Raw, View};
use super::timers::Timers;
use super::votes::VoteLog;
use super::{report, JoinConfig, JoinError};
use crate::net::{peer, Client, ClientError, NetEvent, Topic};
use crate::train::checkpoint::NetCheckpoint;
use crate::train::flat::{self, ParamInfo};
use crate::train::worker::{Done, Job, SaveJob};
use diloco_protocol::averaging::{leader_order, Admission, InEvent, OutEvent, State};
use diloco_protocol::discovery::{self, Action, Discovery, Local, Wait};
use diloco_protocol::outer::hash_f32;
use diloco_protocol::wire::{Body, Direct, Envelope, Hash, Hello, PeerKey};
use ed25519_dalek::SigningKey;
use libp2p::PeerId;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// The trainer thread as the event loop sees it.
pub(super) struct Trainer {
    /// Where jobs go.
    pub(super) jobs: std::sync::mpsc::Sender<Job>,
    /// The round being trained.
    pub(super) training: Option<u64>,
    /// A round to train once the current one is done.
    pub(super) pending: Option<u64>,
    /// An eval is running.
    pub(super) eval_busy: bool,
    /// When training last finished, and for which round.
    pub(super) trained_at: Option<(u64, Instant)>,
}

/// What the node has done, for `/status` and the final report.
#[derive(Default)]
pub(super) struct Tally {
    pub(super) rounds_decided: u64,
    pub(super) rejected: u64,
    /// JOINs the admission policy refused.
    pub(super) refused_joins: u64,
    pub(super) last_decided: Option<Instant>,
    /// blake3 of the global parameters, hex (recomputed only when the state changes).
    pub(super) global_hash: String,
    /// Hash of the agreed state (parameters and momentum), hex.
    pub(super) state_hash: String,
    /// Whether this node leads the current round (first in its leader order).
    pub(super) leader: bool,
    /// When the node last warned that the run is stalled.
    pub(super) stall_warned: Option<Instant>,
    /// It warned that a group of two tolerates no crash.
    pub(super) pair_warned: bool,
    /// Refused direct frames already counted ([`crate::net::NetStats::frames_refused`]).
    pub(super) frames_refused: u64,
    pub(super) last_checkpoint: Option<PathBuf>,
    /// Rounds the run's operator restarted while this node was in them.
    pub(super) reconfigurations: u64,
}

/// How long a probe of a rival history waits for its answer.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The libp2p peer id of a protocol key, as the dashboard shows it.
fn peer_name(p: &PeerKey) -> String {
    peer::libp2p_peer(p)
        .map(|id| id.to_string())
        .unwrap_or_else(|| hex::encode(p.0))
}

/// One node.
pub(super) struct Node {
    pub(super) cfg: JoinConfig,
    pub(super) key: SigningKey,
    pub(super) layout: Vec<ParamInfo>,
    pub(super) discovery: Discovery,
    /// The averaging state machine, once the node founded, joined or restored a run.
    pub(super) state: Option<Box<State>>,
    pub(super) net: Client,
    pub(super) timers: Timers,
    pub(super) rng: ChaCha8Rng,
    pub(super) trainer: Trainer,
    pub(super) shared: Arc<Shared>,
    pub(super) votes: VoteLog,
    pub(super) tally: Tally,
    /// Rate limit of the warnings remote peers can trigger.
    pub(super) ratelog: super::ratelog::RateLog,
    /// Peers asked to prove the rival history their HELLO claims (discovery bounds them to
    /// [`discovery::MAX_PROBES`] at once), with when.
    pub(super) probes: HashMap<PeerKey, Instant>,
}

/// Whether `msg` can answer a probe: decision proofs, a state (with its proof), or "not found".
fn is_proof(msg: &Direct) -> bool {
    matches!(
        msg,
        Direct::SyncProofs(_) | Direct::State { .. } | Direct::NotFound
    )
}

impl Node {
    fn local(&self) -> Option<Local> {
        self.state.as_ref().map(|st| Local {
            synced: st.is_synced(),
            round: st.round(),
            members: st.members().len(),
        })
    }

    /// Starts the averaging state machine `st`.
    pub(super) fn start_state(&mut self, st: State) -> Result<(), JoinError> {
        let now = self.timers.now();
        let mut st = Box::new(st);
        st.set_invite(self.cfg.invite);
        // Every state (founded, joined, restored) follows the history discovery names: the
        // vote record of that history says up to which round this node stays silent.
        self.votes.switch(self.discovery.founder());
        if let Some(v) = self.votes.vote_from() {
            st.set_vote_from(v);
        }
        let outs = st.start(now);
        self.state = Some(st);
        self.refresh_hash();
        self.dispatch(outs)
    }

    fn feed(&mut self, ev: InEvent) -> Result<(), JoinError> {
        let now = self.timers.now();
        let Some(st) = &mut self.state else {
            return Ok(());
        };
        let outs = st.handle(now, ev, &mut self.rng);
        self.dispatch(outs)
    }

    fn net_error(&self, what: &str, e: ClientError) {
        match e {
            // The swarm task drains its queue continuously; a full queue means it is
            // overloaded, and the protocol recovers lost messages through its retries.
            ClientError::QueueFull => tracing::warn!("network queue full; {what} dropped"),
            e => tracing::error!(error = %report(&e), "{what} not sent"),
        }
    }

    fn dispatch(&mut self, outs: Vec<OutEvent>) -> Result<(), JoinError> {
        let outs = match &self.cfg.tamper {
            Some(t) => {
                let view = View {
                    state: self.state.as_deref(),
                    key: &self.key,
                };
                t.with(|t| {
                    outs.into_iter()
                        .flat_map(|o| match o {
                            o @ (OutEvent::Gossip(_) | OutEvent::Direct { .. }) => {
                                t.outgoing(&view, o)
                            }
                            o => vec![o],
                        })
                        .collect()
                })
            }
            None => outs,
        };
        for out in outs {
            match out {
                OutEvent::Gossip(env) => self.publish(&env)?,
                OutEvent::Direct { to, msg } => {
                    if let Err(e) = self.net.send_direct(&to, &msg) {
                        self.net_error("direct message", e);
                    }
                }
                OutEvent::SetTimer { at, timer } => self.timers.set(at, timer),
                OutEvent::Train { round } => {
                    if self.trainer.training.is_some() {
                        self.trainer.pending = Some(round);
                    } else {
                        self.start_training(round);
                    }
                }
                OutEvent::Decided { round, seal, state } => self.on_decided(round, seal, state),
                OutEvent::Rejected { from, kind, reason } => {
                    if kind == "JOIN" {
                        self.tally.refused_joins += 1;
                    }
                    self.reject(&peer_name(&from), kind, reason.label(), &reason);
                }
                OutEvent::Reconfigured {
                    round,
                    chain,
                    members,
                } => self.on_reconfigured(round, chain, &members),
                OutEvent::Banned { peer } => {
                    tracing::warn!(peer = %hex::encode(&peer.0[..8]), "peer banned on equivocation evidence");
                }
            }
        }
        self.update_status();
        Ok(())
    }

    /// Counts a message rejected from `peer` (its libp2p id) in `/status` and `/metrics`, by
    /// kind and reason, and logs it (rate-limited per peer, kind and reason: a remote peer can
    /// send rejections at will).
    fn reject(
        &mut self,
        peer: &str,
        kind: &'static str,
        reason: &'static str,
        detail: &dyn std::fmt::Display,
    ) {
        self.tally.rejected += 1;
        let now = self.shared.now_s();
        self.shared.peers(|b| b.rejected(peer, now));
        self.shared.count_rejections(kind, reason, 1);
        if let Some(skipped) = self.ratelog.allow(peer, kind, reason, Instant::now()) {
            tracing::warn!(%peer, kind, reason, %detail, skipped, "message rejected");
        }
    }

    fn publish(&mut self, env: &Envelope) -> Result<(), JoinError> {
        // Another key's envelope (the operator's RECONFIG, relayed) is no signature of ours.
        let mine = self.state.as_ref().is_some_and(|st| st.id() == env.signer);
        if !mine {
            if let Err(e) = self.net.publish_envelope(env) {
                self.net_error(env.body.kind(), e);
            }
            return Ok(());
        }
        // A node restarted from disk may redo work of a round it already signed messages in
        // (a READY after retraining, a CLOSE, an AGG...); a second, different message for the
        // same round would be equivocation. Stay silent (except JOIN) up to the last round it
        // signed in before the restart, and record every round it signs in from now on.
        if !self
            .votes
            .may_sign(env.round, matches!(env.body, Body::Join(_)))?
        {
            tracing::debug!(
                kind = env.body.kind(),
                round = env.round,
                "not signing again in a round signed before the restart"
            );
            return Ok(());
        }
        if let Err(e) = self.net.publish_envelope(env) {
            self.net_error(env.body.kind(), e);
        }
        Ok(())
    }

    fn start_training(&mut self, round: u64) {
        let Some(st) = &self.state else { return };
        let theta = st.theta().to_vec();
        self.trainer.training = Some(round);
        tracing::info!(
            round,
            "training {} inner steps",
            self.cfg.run.config.inner_steps
        );
        let _ = self.trainer.jobs.send(Job::Train { round, theta });
    }

    /// Recomputes the hashes of the agreed state; called only when that state changes (start,
    /// decisions), never per event: each hashes every parameter.
    fn refresh_hash(&mut self) {
        if let Some(st) = &self.state {
            let (global, state) = if st.is_synced() {
                (hash_f32(st.theta()), hex::encode(st.state_hash().0))
            } else {
                (String::new(), String::new())
            };
            self.tally.global_hash = global;
            self.tally.state_hash = state;
            self.tally.leader =
                st.is_member() && leader_order(&st.chain(), st.members()).first() == Some(&st.id());
        }
    }

    fn on_decided(&mut self, round: u64, seal: Hash, state: Hash) {
        self.tally.rounds_decided += 1;
        self.refresh_hash();
        let elapsed = self.tally.last_decided.map(|t| t.elapsed().as_secs_f64());
        self.tally.last_decided = Some(Instant::now());
        let (members, next) = match &self.state {
            Some(st) => (st.members().len(), st.round()),
            None => (0, round + 1),
        };
        let g = &self.tally.global_hash;
        tracing::info!(
            round,
            members,
            seal = %hex::encode(&seal.0[..8]),
            state = %hex::encode(&state.0[..8]),
            global_hash = %&g[..16.min(g.len())],
            round_s = elapsed.unwrap_or(0.0),
            "round decided"
        );
        let averaging = self
            .trainer
            .trained_at
            .filter(|(r, _)| *r == round)
            .map(|(_, t)| t.elapsed().as_secs_f64());
        self.shared.update(|s| {
            s.last_round_s = elapsed;
            s.stalled_s = None;
            if averaging.is_some() {
                s.last_averaging_s = averaging;
            }
        });
        if self.tally.stall_warned.take().is_some() {
            tracing::info!(
                round,
                "a round was decided again: the run is no longer stalled"
            );
        }
        self.warn_if_fragile();
        self.record_round(round, members, elapsed, averaging);
        let eval = self.cfg.eval_windows > 0 && self.cfg.run.config.synthetic_params == 0;
        if eval && !self.trainer.eval_busy {
            if let Some(st) = &self.state {
                let theta = st.theta().to_vec();
                self.trainer.eval_busy = true;
                let _ = self.trainer.jobs.send(Job::Eval { round: next, theta });
            }
        }
        if self.cfg.checkpoint_every > 0 && next % self.cfg.checkpoint_every == 0 {
            self.save_checkpoint();
        }
    }

    /// The run's operator restarted `round` with `members` under `chain`: said loudly, and
    /// written to the checkpoint (its chain and member list), so that a restart resumes the
    /// restarted round rather than the replaced one.
    fn on_reconfigured(&mut self, round: u64, chain: Hash, members: &[PeerKey]) {
        self.tally.reconfigurations += 1;
        let me = self.state.as_ref().map(|s| s.id());
        tracing::warn!(
            round,
            members = members.len(),
            chain = %hex::encode(&chain.0[..8]),
            member = me.is_some_and(|m| members.contains(&m)),
            "the run's operator restarted this round with the members that survive (RECONFIG)"
        );
        self.shared.update(|s| s.stalled_s = None);
        self.tally.stall_warned = None;
        self.warn_if_fragile();
        self.save_checkpoint();
    }

    /// A request from the HTTP server (`POST /reconfig`).
    pub(super) fn on_control(&mut self, c: Control) -> Result<(), JoinError> {
        match c {
            Control::Reconfig(env, reply) => {
                let Some(st) = &self.state else {
                    let _ = reply.send(Err("this node holds no state of the run yet".into()));
                    return Ok(());
                };
                if let Err(why) = st.check_reconfig_envelope(&env) {
                    let _ = reply.send(Err(format!(
                        "{why} (this node is in round {} with {} members)",
                        st.round(),
                        st.members().len()
                    )));
                    return Ok(());
                }
                let round = st.round();
                self.feed(InEvent::Gossip {
                    env: Arc::new(*env),
                    verified: false,
                })?;
                let n = self.state.as_ref().map_or(0, |s| s.members().len());
                let _ = reply.send(Ok(format!(
                    "round {round} restarted with {n} members; the RECONFIG is relayed to the run"
                )));
                self.update_status();
                Ok(())
            }
        }
    }

    /// Adds the decided `round` to the dashboard's history and peer table.
    fn record_round(
        &self,
        round: u64,
        members: usize,
        round_s: Option<f64>,
        averaging_s: Option<f64>,
    ) {
        let Some(st) = &self.state else { return };
        let me = st.id();
        // The contributors are in the SEAL of the decision just made (the newest proof).
        let all: Vec<PeerKey> = st
            .decisions()
            .last()
            .filter(|p| p.seal.round == round)
            .and_then(|p| match &p.seal.body {
                Body::Seal(prop) => Some(&prop.seal.close.contributors),
                _ => None,
            })
            .map(|cs| cs.iter().map(|c| c.peer).collect())
            .unwrap_or_default();
        // The peer table lists the others; this node is in the cards.
        let others = |ps: &[PeerKey]| -> Vec<String> {
            ps.iter().filter(|p| **p != me).map(peer_name).collect()
        };
        let contributors = others(&all);
        let next = others(st.members());
        let now = self.shared.now_s();
        let rec = RoundRecord {
            round,
            at_s: now,
            members,
            contributors: all.len(),
            round_s,
            averaging_s,
            ..RoundRecord::default()
        };
        let net = &self.shared.net;
        let sent = net.bytes_sent.load(std::sync::atomic::Ordering::Relaxed);
        let received = net
            .bytes_received
            .load(std::sync::atomic::Ordering::Relaxed);
        self.shared.history(|h| h.decided(rec, sent, received));
        self.shared.peers(|b| b.decided(&contributors, &next, now));
    }

    /// Heard from `from` (which says it is in `round`, if the message says).
    fn seen(&self, from: &PeerId, round: Option<u64>) {
        let now = self.shared.now_s();
        self.shared.peers(|b| b.seen(&from.to_string(), now, round));
    }

    /// Asks the trainer thread for a checkpoint of the agreed state; false if there is none
    /// to write (no directory, not synced).
    pub(super) fn save_checkpoint(&mut self) -> bool {
        let Some(dir) = self.cfg.checkpoint_dir.clone() else {
            return false;
        };
        let Some(st) = &self.state else { return false };
        if !st.is_synced() {
            return false;
        }
        let job = SaveJob {
            dir,
            round: st.round(),
            theta: st.theta().to_vec(),
            momentum: st.momentum().to_vec(),
            net: NetCheckpoint {
                chain: hex::encode(st.chain().0),
                members: st.members().iter().map(|p| hex::encode(p.0)).collect(),
                founder: self
                    .discovery
                    .founder()
                    .map(|f| hex::encode(f.0))
                    .unwrap_or_default(),
            },
            run: self.cfg.run.json(),
        };
        self.trainer.jobs.send(Job::Save(Box::new(job))).is_ok()
    }

    pub(super) fn update_status(&self) {
        let (chain, member_ids) = match &self.state {
            Some(st) => (
                hex::encode(st.chain().0),
                st.members().iter().map(|m| hex::encode(m.0)).collect(),
            ),
            None => (String::new(), Vec::new()),
        };
        let reconfigurations = self.tally.reconfigurations;
        let (phase, round, members, member, banned) = match &self.state {
            None => (Phase::Discovering, 0, 0, false, 0),
            Some(st) => {
                let phase = if !st.is_synced() {
                    Phase::Syncing
                } else if self.trainer.training.is_some() {
                    Phase::Training
                } else {
                    Phase::Averaging
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
        let t = &self.tally;
        let (hash, state_hash) = (t.global_hash.clone(), t.state_hash.clone());
        let (decided, rejected, refused_joins) = (t.rounds_decided, t.rejected, t.refused_joins);
        let role = match phase {
            Phase::Discovering | Phase::Stopped => phase.to_string(),
            Phase::Syncing => "syncing".to_string(),
            _ if member && t.leader => "leader".to_string(),
            _ if member => "member".to_string(),
            _ => "observer".to_string(),
        };
        let quorum = self
            .state
            .as_ref()
            .map_or(0, |st| st.config().quorum.size(members));
        self.shared.update(|s| {
            s.phase = phase;
            s.role = role;
            s.quorum = quorum;
            s.tolerates = members.saturating_sub(quorum);
            s.round = round;
            s.chain = chain;
            s.member_ids = member_ids;
            s.reconfigurations = reconfigurations;
            s.step = round * h;
            s.group_size = members;
            s.member = member;
            s.banned = banned;
            s.global_hash = hash;
            s.state_hash = state_hash;
            s.rounds_decided = decided;
            s.rejected = rejected;
            s.refused_joins = refused_joins;
        });
    }

    /// Handles what the swarm reports.
    pub(super) fn on_net(&mut self, ev: NetEvent) -> Result<(), JoinError> {
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
                    // The round counts only when the gossip's (authenticated) source signed it.
                    let own = peer::proto_peer(&from) == Some(env.signer);
                    self.seen(&from, own.then_some(env.round));
                    self.feed(InEvent::Gossip {
                        env: Arc::new(env),
                        verified: false,
                    })?;
                }
                Err(e) => self.reject(&from.to_string(), "gossip", e.label(), &e),
            },
            NetEvent::Direct { from, data } => {
                let Some(sender) = peer::proto_peer(&from) else {
                    tracing::warn!(peer = %from, "direct message from a non-ed25519 peer dropped");
                    return Ok(());
                };
                self.seen(&from, None);
                match Direct::from_bytes(&data) {
                    Ok(msg) if self.probes.contains_key(&sender) && is_proof(&msg) => {
                        self.on_probe_answer(from, sender, msg)?
                    }
                    Ok(msg) => {
                        if let Some(replies) = self.tampered_incoming(sender, &msg) {
                            return self.dispatch(replies);
                        }
                        self.feed(InEvent::Direct {
                            from: sender,
                            msg: Arc::new(msg),
                        })?
                    }
                    Err(e) => self.reject(&from.to_string(), "direct", e.label(), &e),
                }
            }
            NetEvent::PeerJoined(p) => {
                self.seen(&p, None);
                if let Some(pp) = peer::proto_peer(&p) {
                    self.feed(InEvent::Contact(pp))?;
                }
            }
            NetEvent::PeerLeft(p) => tracing::info!(peer = %p, "peer disconnected"),
            NetEvent::Refused {
                from,
                kind,
                reason,
                detail,
            } => self.reject(&from.to_string(), kind, reason, &detail),
            NetEvent::Bootstrapped => self.discover(discovery::Event::Bootstrapped)?,
            NetEvent::SendFailed { to, error } => {
                tracing::debug!(peer = %to, error = %report(&error), "direct message not delivered (the protocol retries)")
            }
        }
        Ok(())
    }

    fn on_hello(&mut self, from: PeerId, data: &[u8]) -> Result<(), JoinError> {
        let hello = match Hello::from_bytes(data) {
            Ok(h) => h,
            Err(e) => {
                self.reject(&from.to_string(), "HELLO", e.label(), &e);
                return Ok(());
            }
        };
        let Some(sender) = peer::proto_peer(&from) else {
            return Ok(());
        };
        if sender.0 != hello.peer {
            self.reject(
                &from.to_string(),
                "HELLO",
                "foreign_peer",
                &"a HELLO naming another peer than its sender",
            );
            return Ok(());
        }
        self.seen(&from, hello.synced.then_some(hello.round));
        // Under an allowlist or invitations, only listed peers found the run: an unlisted
        // peer's unsynced HELLO must not make it a founder, a history whose founder is not
        // listed is none of this run's, and under an allowlist an unlisted peer is nobody.
        // (Under invitations, synced unlisted peers may be invited members: state donors.)
        let admission = &self.cfg.run.admission;
        if !admission.lists(&sender)
            && (!hello.synced || matches!(admission, Admission::Allowlist(_)))
        {
            return Ok(());
        }
        if hello.synced && !admission.lists(&PeerKey(hello.founder)) {
            tracing::debug!(peer = %from, "HELLO of a history no listed peer founded; ignored");
            return Ok(());
        }
        self.discover(discovery::Event::Hello {
            from: sender,
            hello,
        })
    }

    /// A tamper's answer to a direct message, if one is installed and consumes it.
    fn tampered_incoming(&self, from: PeerKey, msg: &Direct) -> Option<Vec<OutEvent>> {
        let t = self.cfg.tamper.as_ref()?;
        let view = View {
            state: self.state.as_deref(),
            key: &self.key,
        };
        t.with(|t| t.incoming(&view, from, msg))
    }

    /// Counts the direct frames the network refused since the last tick as rejections (libp2p
    /// does not say who sent them).
    fn count_refused_frames(&mut self) {
        let total = self
            .net
            .stats
            .frames_refused
            .load(std::sync::atomic::Ordering::Relaxed);
        let new = total.saturating_sub(self.tally.frames_refused);
        self.tally.frames_refused = total;
        if new == 0 {
            return;
        }
        self.tally.rejected += new;
        self.shared.count_rejections("direct", "bad_frame", new);
        tracing::warn!(
            frames = new,
            kind = "direct",
            reason = "bad_frame",
            "message rejected: direct frames over the size limit or not frames (sender unknown)"
        );
    }

    /// Sends what a tamper injects this tick.
    fn tampered_tick(&mut self) {
        let Some(t) = &self.cfg.tamper else { return };
        let view = View {
            state: self.state.as_deref(),
            key: &self.key,
        };
        let raws = t.with(|t| t.tick(&view));
        for r in raws {
            let sent = match r {
                Raw::Gossip { hello, data } => {
                    let topic = if hello { Topic::Hello } else { Topic::Avg };
                    self.net.publish_unchecked(topic, data)
                }
                Raw::Direct { to, data, sync } => match peer::libp2p_peer(&to) {
                    Some(p) => self.net.send(p, data, sync),
                    None => continue,
                },
            };
            if let Err(e) = sent {
                tracing::debug!(error = %e, "injected message not sent");
            }
        }
    }

    /// The one-second tick: gossip this node's HELLO, then let discovery act on time.
    pub(super) fn on_tick(&mut self) -> Result<(), JoinError> {
        self.tampered_tick();
        self.count_refused_frames();
        let hello = self.discovery.hello(self.local());
        if let Err(e) = self.net.publish_hello(&hello) {
            self.net_error("HELLO", e);
        }
        self.check_stall();
        self.discover(discovery::Event::Tick)
    }

    /// A member that finished training its round and has seen no decision for longer than the
    /// run's timeouts allow (the closer's wait, the aggregation and three leader attempts) is in
    /// a stalled run: fewer than a quorum of the members answer. It says so in /status at once
    /// and in the log once a minute; nothing else changes (rounds resume when enough members
    /// come back).
    fn check_stall(&mut self) {
        let stalled = self.state.as_ref().and_then(|st| {
            let (r, t) = self.trainer.trained_at?;
            let waiting = r == st.round()
                && st.is_synced()
                && st.is_member()
                && self.trainer.training.is_none();
            let c = st.config();
            let after = std::time::Duration::from_millis(
                c.straggler_timeout + c.agg_timeout + 3 * c.attempt_timeout,
            );
            (waiting && t.elapsed() >= after).then(|| t.elapsed())
        });
        let (Some(waited), Some(st)) = (stalled, &self.state) else {
            if self.tally.stall_warned.take().is_some() {
                self.shared.update(|s| s.stalled_s = None);
            }
            return;
        };
        let c = st.config();
        let (n, q) = (st.members().len(), c.quorum.size(st.members().len()));
        let secs = waited.as_secs_f64();
        self.shared.update(|s| s.stalled_s = Some(secs));
        if self
            .tally
            .stall_warned
            .is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(60))
        {
            self.tally.stall_warned = Some(Instant::now());
            tracing::warn!(
                round = st.round(),
                waited_s = secs as u64,
                members = n,
                quorum = q,
                "no decision since this node's READY: fewer than {q} of the {n} members answer \
                 (crashed, stopped or cut off); the run resumes when enough of them come back"
            );
        }
    }

    /// Warns once when the group is two members under a majority quorum: both must answer.
    fn warn_if_fragile(&mut self) {
        let Some(st) = &self.state else { return };
        let n = st.members().len();
        if self.tally.pair_warned || n != 2 || st.config().quorum.size(n) < n {
            return;
        }
        self.tally.pair_warned = true;
        tracing::warn!(
            "the group has 2 members and needs both to decide a round: one crash or disconnect \
             stops the run until it comes back (3 or more members tolerate one)"
        );
    }

    /// Feeds discovery and carries out what it decides.
    fn discover(&mut self, ev: discovery::Event) -> Result<(), JoinError> {
        let now = self.timers.now();
        let local = self.local();
        let actions = self.discovery.handle(now, ev, local);
        for a in actions {
            self.on_discovery(a)?;
        }
        Ok(())
    }

    fn on_discovery(&mut self, action: Action) -> Result<(), JoinError> {
        match action {
            Action::Started => tracing::info!(
                wait_s = self.cfg.genesis_wait.as_secs_f64(),
                "looking for a run under way"
            ),
            Action::Waiting(Wait::ForFounder(f)) => tracing::info!(
                founder = %hex::encode(&f.0[..8]),
                "waiting for the peers with the lowest ids to found the run"
            ),
            Action::Waiting(Wait::ForMember) => tracing::info!(
                "waiting for a member of the run to join it (this node is not listed to found it)"
            ),
            Action::Waiting(Wait::ForPeers { heard, need }) => tracing::info!(
                heard,
                founders = need,
                "waiting for enough peers to found the run together (--founders)"
            ),
            Action::Found { founders } => {
                tracing::info!(
                    founders = founders.len(),
                    "no run found: founding it at round 0 (others join as they come)"
                );
                let theta0 =
                    flat::init_values(&self.layout, &self.cfg.run.model, self.cfg.run.config.seed);
                let proto = self.cfg.run.protocol(theta0.len());
                let st = State::genesis(proto, self.key.clone(), theta0, founders);
                self.start_state(st)?;
            }
            Action::Join {
                contacts,
                founder,
                abandon,
                round,
                members,
            } => {
                if abandon {
                    tracing::warn!(
                        their_round = round, their_members = members,
                        founder = %hex::encode(&founder.0[..8]),
                        "another history of this run is ahead of ours: abandoning ours and joining it"
                    );
                    // Votes cast in the abandoned history say nothing about the new one; its
                    // record stays (switched below), should this node ever follow it again.
                    self.shared.update(|s| s.forks_abandoned += 1);
                    self.timers.clear();
                    self.trainer.pending = None;
                }
                tracing::info!(
                    round,
                    members,
                    "found the run under way: joining (fetching its state from peers)"
                );
                let proto = self.cfg.run.protocol(self.layout_len());
                let st = State::joiner(proto, self.key.clone(), contacts);
                self.start_state(st)?;
            }
            Action::Contact(p) => self.feed(InEvent::Contact(p))?,
            Action::Probe { peer, round } => {
                let Some(from) = self
                    .state
                    .as_ref()
                    .and_then(|st| st.rival_probe_round(round))
                else {
                    return Ok(());
                };
                tracing::info!(
                    peer = %peer_name(&peer), claimed_round = round, proof_of = from,
                    "a peer claims a better history of this run: asking it for a decision proof"
                );
                let now = Instant::now();
                self.probes
                    .retain(|_, t| now.duration_since(*t) < PROBE_TIMEOUT);
                if self.probes.len() < 4 * discovery::MAX_PROBES {
                    self.probes.insert(peer, now);
                    if let Err(e) = self.net.send_direct(&peer, &Direct::SyncRequest { from }) {
                        self.net_error("probe", e);
                    }
                }
            }
            Action::Rival {
                founder,
                round,
                members,
            } => {
                tracing::warn!(
                    founder = %hex::encode(&founder.0[..8]), claimed_round = round, claimed_members = members,
                    "another history of this run claims to be ahead, but ours is past the fork window: \
                     staying (to join it instead, restart this node with an empty --checkpoint-dir)"
                );
                self.shared.update(|s| s.rival_histories += 1);
            }
            Action::GiveUp { silent_ms } => {
                tracing::warn!(
                    silent_s = silent_ms / 1000,
                    "no peer holding the run's state heard from: back to discovery"
                );
                self.timers.clear();
                self.trainer.pending = None;
                self.state = None;
                self.update_status();
            }
        }
        Ok(())
    }

    /// What a probed peer answered: a decision proof of its history (in SyncProofs, or inside
    /// a State when it found us too far behind), or nothing. A verified proof goes to
    /// discovery, which ranks it; anything else is a rejection.
    fn on_probe_answer(
        &mut self,
        from: PeerId,
        sender: PeerKey,
        msg: Direct,
    ) -> Result<(), JoinError> {
        self.probes.remove(&sender);
        let proof = match msg {
            Direct::SyncProofs(mut v) if v.len() == 1 => v.pop(),
            Direct::State { proof, .. } => Some(*proof),
            _ => None,
        };
        let (Some(proof), Some(st)) = (proof, &self.state) else {
            self.reject(
                &from.to_string(),
                "SYNC",
                "no_proof",
                &"a peer claiming a better history sent no decision proof",
            );
            return Ok(());
        };
        match st.check_rival(&proof) {
            Ok(rival) => {
                tracing::info!(
                    peer = %from, round = rival.round, members = rival.members,
                    "another history of this run proved by a quorum of its members"
                );
                self.discover(discovery::Event::Verified {
                    from: sender,
                    rival,
                })
            }
            Err(e) => {
                self.reject(&from.to_string(), "SYNC", e.label(), &e);
                Ok(())
            }
        }
    }

    fn layout_len(&self) -> usize {
        self.layout.iter().map(ParamInfo::len).sum()
    }

    /// Handles what the trainer thread reports.
    pub(super) fn on_done(&mut self, done: Done) -> Result<(), JoinError> {
        match done {
            Done::Trained {
                round,
                delta,
                tokens,
                loss,
                secs,
            } => {
                self.trainer.training = None;
                self.trainer.trained_at = Some((round, Instant::now()));
                let tok_s = tokens as f64 / secs.max(1e-9);
                tracing::info!(
                    round,
                    loss,
                    tokens_per_s = tok_s as u64,
                    "local training done"
                );
                self.shared.history(|h| h.trained(round, loss, tok_s));
                self.shared.update(|s| s.last_loss = Some(loss));
                self.feed(InEvent::Trained {
                    round,
                    delta,
                    tokens,
                })?;
                if let Some(r) = self.trainer.pending.take() {
                    self.start_training(r);
                }
            }
            Done::Aborted => self.trainer.training = None,
            Done::Evaluated { round, loss } => {
                self.trainer.eval_busy = false;
                tracing::info!(round, eval_loss = loss, "eval of the global parameters");
                self.shared.update(|s| {
                    s.eval_loss = Some(loss);
                    if s.eval_history.len() < 10_000 {
                        s.eval_history.push((round, loss));
                    }
                });
                // The eval job is named for the round after the decision it evaluates.
                self.shared.history(|h| {
                    h.evaluated(round.saturating_sub(1), loss);
                });
            }
            Done::Saved { round, result } => match result {
                Ok(path) => {
                    tracing::info!(round, path = %path.display(), "checkpoint written");
                    self.tally.last_checkpoint = Some(path);
                }
                Err(e) => {
                    tracing::error!(round, error = %report(&e), "checkpoint failed; training continues")
                }
            },
            Done::Failed(e) => return Err(JoinError::Trainer(e)),
        }
        self.update_status();
        Ok(())
    }

    /// Feeds every protocol timer that is due.
    pub(super) fn fire_timers(&mut self) -> Result<(), JoinError> {
        while let Some(t) = self.timers.pop_due() {
            self.feed(InEvent::Timer(t))?;
        }
        Ok(())
    }
}
