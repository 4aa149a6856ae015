//! The libp2p swarm of a training node, owned by one task; it knows the averaging protocol's
//! wire format (to encode and size-check what it sends) but no model.
//!
//! Everything else talks to it through a typed [`Client`] (bounded commands, never blocking
//! the caller) and a bounded channel of [`NetEvent`]s. The swarm ([`behaviour`]) speaks TCP
//! and QUIC with noise and yamux; identify, ping and Kademlia (through the bootstrap peers) for
//! discovery; gossipsub for the control plane (the averaging protocol's small signed envelopes
//! and node HELLOs); two request-response protocols for the data plane (`/diloco/shard/5` for
//! shards and aggregates, `/diloco/sync/5` for decision proofs and state) with the frame codec
//! ([`codec`]); AutoNAT, a relay client and DCUtR so that a peer behind NAT listens through a
//! bootstrap relay and upgrades to direct connections ([`relay`]); and connection limits.
//!
//! The swarm never interprets protocol messages it receives: it moves bytes, with every size
//! checked before allocation. Peers that announce another run are refused at identify time.

pub mod behaviour;
pub mod codec;
pub mod peer;
mod relay;

use behaviour::{topic, Behaviour, BehaviourEvent};
use diloco_p2p::addr::with_peer;
use diloco_p2p::{agent_run, learn_addresses};
use diloco_protocol::wire::{
    Direct, Envelope, Hello, PeerKey, WireError, MAX_GOSSIP_BYTES, MAX_HELLO_BYTES,
};
use futures::StreamExt;
use libp2p::request_response;
use libp2p::swarm::SwarmEvent;
use libp2p::{
    autonat, dcutr, gossipsub, identify, kad, relay as p2p_relay, Multiaddr, PeerId, Swarm,
};
use relay::Links;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::sync::mpsc;

/// Capacity of the command and event channels.
pub const CHANNEL_CAPACITY: usize = 4096;
/// Most connected peers (beyond it, inbound connections are refused).
pub const MAX_PEERS: u32 = 256;
/// Most protocol-key to peer-id conversions a [`Client`] caches.
const PEER_CACHE: usize = 65_536;

/// Errors starting the swarm.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum NetError {
    /// The transport could not be built.
    #[error("building the network transport")]
    Transport(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A listen address was refused.
    #[error("cannot listen on {addr} (is the port in use? pick another with --listen)")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        #[source]
        source: libp2p::TransportError<std::io::Error>,
    },
    /// The swarm task is gone.
    #[error("the network task stopped")]
    Closed,
}

/// Why a message was not handed to the swarm.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ClientError {
    /// It could not be encoded.
    #[error("cannot encode the message")]
    Encode(#[from] WireError),
    /// It is larger than its topic or protocol carries.
    #[error("a {bytes}-byte message exceeds the {max}-byte limit")]
    TooLarge {
        /// Its size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// The recipient's key is not an ed25519 public key libp2p accepts.
    #[error("the recipient {0} has no libp2p peer id")]
    NoPeerId(PeerKey),
    /// The swarm's queue is full (it is overloaded; the protocol retries what matters).
    #[error("the network queue is full")]
    QueueFull,
    /// The swarm task is gone.
    #[error("the network task stopped")]
    Closed,
}

/// Why a direct message was not delivered.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SendError {
    /// The recipient is reachable only through a relay too small for the message.
    #[error("reachable only through a relay that carries {budget} bytes per circuit; a {bytes}-byte message waits for a direct connection")]
    RelayBudget {
        /// The relay's per-circuit byte limit.
        budget: u64,
        /// The message's size.
        bytes: usize,
    },
    /// The request failed (timeout, refused, connection closed, ...).
    #[error("the direct message was not delivered")]
    Outbound(#[source] request_response::OutboundFailure),
}

/// Which gossip topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    /// Signed protocol envelopes (`/diloco/avg/5/<run>`).
    Avg,
    /// Node HELLOs (`/diloco/hello/1/<run>`).
    Hello,
}

impl Topic {
    /// Largest message on this topic.
    pub fn max_bytes(self) -> usize {
        match self {
            Topic::Avg => MAX_GOSSIP_BYTES,
            Topic::Hello => MAX_HELLO_BYTES,
        }
    }
}

/// Requests to the swarm task.
#[derive(Debug)]
enum Command {
    Publish {
        topic: Topic,
        data: Vec<u8>,
    },
    Send {
        to: PeerId,
        data: Vec<u8>,
        sync: bool,
    },
    Shutdown,
}

/// What the swarm reports.
#[derive(Debug)]
pub enum NetEvent {
    /// Listening on this full address (with `/p2p/<id>`).
    Listening(Multiaddr),
    /// A gossip message from `from` (the gossipsub source, authenticated).
    Gossip {
        /// Origin.
        from: PeerId,
        /// Topic.
        topic: Topic,
        /// Payload.
        data: Vec<u8>,
    },
    /// A direct message from an authenticated peer.
    Direct {
        /// Sender (transport-authenticated).
        from: PeerId,
        /// Payload (`Direct::from_bytes` decodes it).
        data: Vec<u8>,
    },
    /// Connected to a bootstrap peer for the first time (discovery has started).
    Bootstrapped,
    /// A peer of this run was identified.
    PeerJoined(PeerId),
    /// A peer has no connection left.
    PeerLeft(PeerId),
    /// A gossip message from `from` was refused before decoding (too large for its topic);
    /// the node counts it as a rejection. (Refused direct frames have no sender in libp2p's
    /// events: see [`NetStats::frames_refused`].)
    Refused {
        /// Sender (transport-authenticated).
        from: PeerId,
        /// `gossip`.
        kind: &'static str,
        /// A short label: `too_large`.
        reason: &'static str,
        /// What exactly.
        detail: String,
    },
    /// A direct send failed.
    SendFailed {
        /// Recipient.
        to: PeerId,
        /// Why.
        error: SendError,
    },
}

/// Traffic and health counters, shared with the status page.
#[derive(Debug, Default)]
pub struct NetStats {
    /// Application payload bytes sent (direct messages, and gossip × peers it went to).
    pub bytes_sent: AtomicU64,
    /// Application payload bytes received.
    pub bytes_received: AtomicU64,
    /// Events dropped because the node was too busy to take them.
    pub events_dropped: AtomicU64,
    /// Peers currently connected.
    pub connected: AtomicU64,
    /// Peers refused because they are on another run.
    pub refused: AtomicU64,
    /// Inbound direct frames refused by the frame codec (over the size limit, or not a
    /// frame); libp2p reports no peer for them, so the node counts them as rejections of kind
    /// `direct`, reason `bad_frame`.
    pub frames_refused: AtomicU64,
}

/// The events of a swarm task.
pub type Events = mpsc::Receiver<NetEvent>;

/// The node's side of the swarm task. Every method returns at once: a full queue is an error,
/// not a wait, so the caller's event loop never blocks on the network.
pub struct Client {
    commands: mpsc::Sender<Command>,
    /// Counters.
    pub stats: Arc<NetStats>,
    /// This peer's id.
    pub peer_id: PeerId,
    peers: HashMap<PeerKey, PeerId>,
}

impl Client {
    fn command(&self, cmd: Command) -> Result<(), ClientError> {
        self.commands.try_send(cmd).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => ClientError::QueueFull,
            mpsc::error::TrySendError::Closed(_) => ClientError::Closed,
        })
    }

    /// Publishes raw bytes on a topic (at most [`Topic::max_bytes`]).
    pub fn publish(&self, topic: Topic, data: Vec<u8>) -> Result<(), ClientError> {
        if data.len() > topic.max_bytes() {
            return Err(ClientError::TooLarge {
                bytes: data.len(),
                max: topic.max_bytes(),
            });
        }
        self.command(Command::Publish { topic, data })
    }

    /// Publishes bytes without the local size check, for fault injection
    /// ([`crate::driver::tamper`]): the receivers' checks are what is tested.
    pub fn publish_unchecked(&self, topic: Topic, data: Vec<u8>) -> Result<(), ClientError> {
        self.command(Command::Publish { topic, data })
    }

    /// Publishes a signed protocol envelope on the run's averaging topic.
    pub fn publish_envelope(&self, env: &Envelope) -> Result<(), ClientError> {
        self.publish(Topic::Avg, env.to_bytes()?)
    }

    /// Publishes a HELLO on the run's hello topic.
    pub fn publish_hello(&self, hello: &Hello) -> Result<(), ClientError> {
        self.publish(Topic::Hello, hello.to_bytes()?)
    }

    /// Sends raw bytes to `to` on the shard protocol, or the sync protocol with `sync`.
    pub fn send(&self, to: PeerId, data: Vec<u8>, sync: bool) -> Result<(), ClientError> {
        self.command(Command::Send { to, data, sync })
    }

    /// Sends a direct protocol message to the peer with protocol key `to`, on the protocol its
    /// kind goes on ([`is_sync`]).
    pub fn send_direct(&mut self, to: &PeerKey, msg: &Direct) -> Result<(), ClientError> {
        let peer = match self.peers.get(to) {
            Some(p) => *p,
            None => {
                let p = peer::libp2p_peer(to).ok_or(ClientError::NoPeerId(*to))?;
                if self.peers.len() >= PEER_CACHE {
                    self.peers.clear();
                }
                self.peers.insert(*to, p);
                p
            }
        };
        self.send(peer, msg.to_bytes()?, is_sync(msg))
    }

    /// Stops the swarm task (waits for room in its queue).
    pub async fn shutdown(&self) {
        let _ = self.commands.send(Command::Shutdown).await;
    }
}

/// Settings of the swarm.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// Bootstrap peers.
    pub bootstrap: Vec<(PeerId, Multiaddr)>,
    /// Run id as hex: topics are per run, and identify carries it.
    pub run: String,
    /// Largest direct message accepted (bounded by the run's parameter count).
    pub max_direct: usize,
    /// Request timeout for direct messages.
    pub request_timeout: Duration,
    /// Listen through every bootstrap peer's relay from the start (a node that knows it is
    /// behind NAT); otherwise only once AutoNAT reports this node unreachable.
    pub relay_listen: bool,
    /// Peers reach each other on private addresses (LAN, Docker, lab): AutoNAT probes and
    /// answers over private IPs too, instead of only public ones (libp2p's default).
    pub private_network: bool,
}

/// Starts the swarm task on the current tokio runtime.
/// `stats` receives the traffic counters (shared with the status page).
pub fn spawn(
    key: &libp2p::identity::Keypair,
    cfg: NetConfig,
    stats: Arc<NetStats>,
) -> Result<(Client, Events), NetError> {
    let swarm = behaviour::build(key, &cfg, stats.clone())?;
    let peer_id = *swarm.local_peer_id();
    let (cmd_tx, cmd_rx) = mpsc::channel(CHANNEL_CAPACITY);
    let (ev_tx, ev_rx) = mpsc::channel(CHANNEL_CAPACITY);
    let task = Task {
        swarm,
        cfg,
        events: ev_tx,
        stats: stats.clone(),
        run_peers: BTreeSet::new(),
        refused: BTreeSet::new(),
        relayed: false,
        dial_backoff: HashMap::new(),
        bootstrapped: false,
        links: HashMap::new(),
        relay_warned: None,
        circuit_bytes: None,
    };
    tokio::spawn(tracing::Instrument::instrument(
        task.run(cmd_rx),
        tracing::Span::current(),
    ));
    let client = Client {
        commands: cmd_tx,
        stats,
        peer_id,
        peers: HashMap::new(),
    };
    Ok((client, ev_rx))
}

/// The swarm task's state.
struct Task {
    swarm: Swarm<Behaviour>,
    cfg: NetConfig,
    events: mpsc::Sender<NetEvent>,
    stats: Arc<NetStats>,
    /// Identified peers of this run.
    run_peers: BTreeSet<PeerId>,
    /// Peers of another run: never dialed again.
    refused: BTreeSet<PeerId>,
    /// Listening through relays already.
    relayed: bool,
    /// Next time a peer may be dialed again (discovery retries).
    dial_backoff: HashMap<PeerId, tokio::time::Instant>,
    /// A bootstrap peer has answered.
    bootstrapped: bool,
    /// Open connections per connected peer, direct and relayed.
    links: HashMap<PeerId, Links>,
    /// When the last "failed over a relay" warning was logged (at most one a minute).
    relay_warned: Option<tokio::time::Instant>,
    /// Bytes a relayed circuit may carry, as the relay last told (`u64::MAX`: no limit;
    /// `None`: no relayed circuit seen yet).
    circuit_bytes: Option<u64>,
}

impl Task {
    fn emit(&self, ev: NetEvent) {
        if self.events.try_send(ev).is_err() {
            self.stats.events_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut bootstrap_backoff = Duration::from_secs(1);
        let mut next_bootstrap = tokio::time::Instant::now();
        let mut discover = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    None | Some(Command::Shutdown) => return,
                    Some(cmd) => self.on_command(cmd),
                },
                ev = self.swarm.select_next_some() => self.on_swarm(ev),
                _ = tokio::time::sleep_until(next_bootstrap) => {
                    // Dial the bootstrap peers until one answers, backing off to 60 s.
                    let connected = self.cfg.bootstrap.iter().any(|(p, _)| self.swarm.is_connected(p));
                    if !connected && !self.cfg.bootstrap.is_empty() {
                        for (peer, addr) in self.cfg.bootstrap.clone() {
                            if let Err(e) = self.swarm.dial(addr.clone()) {
                                tracing::warn!(bootstrap = %addr, error = %e, "cannot dial bootstrap peer");
                            } else {
                                tracing::debug!(bootstrap = %peer, "dialing bootstrap peer");
                            }
                        }
                        if bootstrap_backoff > Duration::from_secs(1) {
                            tracing::warn!(retry_in_s = bootstrap_backoff.as_secs(), "no bootstrap peer reachable yet; retrying");
                        }
                        next_bootstrap = tokio::time::Instant::now() + bootstrap_backoff;
                        bootstrap_backoff = (bootstrap_backoff * 2).min(Duration::from_secs(60));
                    } else {
                        bootstrap_backoff = Duration::from_secs(1);
                        next_bootstrap = tokio::time::Instant::now() + Duration::from_secs(30);
                    }
                }
                _ = discover.tick() => {
                    if self.swarm.connected_peers().next().is_some() {
                        self.swarm.behaviour_mut().kad.get_closest_peers(PeerId::random());
                    }
                }
            }
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Publish { topic: kind, data } => {
                let t = topic(kind, &self.cfg.run);
                let fanout = self
                    .swarm
                    .behaviour()
                    .gossipsub
                    .all_peers()
                    .filter(|(_, topics)| topics.iter().any(|h| **h == t.hash()))
                    .count() as u64;
                let len = data.len() as u64;
                match self.swarm.behaviour_mut().gossipsub.publish(t, data) {
                    Ok(_) => {
                        self.stats
                            .bytes_sent
                            .fetch_add(len * fanout, Ordering::Relaxed);
                    }
                    // No peer on the topic yet: the protocol retries what matters.
                    Err(gossipsub::PublishError::NoPeersSubscribedToTopic)
                    | Err(gossipsub::PublishError::Duplicate) => {}
                    Err(e) => tracing::warn!(error = %e, "gossip publish failed"),
                }
            }
            Command::Send { to, data, sync } => {
                if let Some(budget) = self.over_relay_budget(to, data.len()) {
                    // It would exceed what the relay lets one circuit carry: the relay would
                    // cut the connection mid-message (and any hole punch running over it).
                    self.warn_relay(
                        to,
                        &format!(
                            "{} bytes > half of the relay's {budget}-byte circuit limit",
                            data.len()
                        ),
                    );
                    self.emit(NetEvent::SendFailed {
                        to,
                        error: SendError::RelayBudget {
                            budget,
                            bytes: data.len(),
                        },
                    });
                    return;
                }
                self.stats
                    .bytes_sent
                    .fetch_add(data.len() as u64 + 4, Ordering::Relaxed);
                let b = self.swarm.behaviour_mut();
                if sync {
                    b.sync.send_request(&to, data);
                } else {
                    b.shard.send_request(&to, data);
                }
            }
            Command::Shutdown => {}
        }
    }

    fn maybe_dial(&mut self, peer: PeerId) {
        if peer == *self.swarm.local_peer_id()
            || self.refused.contains(&peer)
            || self.swarm.is_connected(&peer)
            || self.stats.connected.load(Ordering::Relaxed) >= MAX_PEERS as u64
        {
            return;
        }
        let now = tokio::time::Instant::now();
        if self.dial_backoff.get(&peer).is_some_and(|t| *t > now) {
            return;
        }
        if self.dial_backoff.len() > 4096 {
            self.dial_backoff.retain(|_, t| *t > now);
        }
        self.dial_backoff
            .insert(peer, now + Duration::from_secs(10));
        if let Err(e) = self.swarm.dial(peer) {
            tracing::debug!(%peer, error = %e, "dial failed");
        }
    }

    fn on_swarm(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        let me = *self.swarm.local_peer_id();
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                // Relayed addresses already end in /p2p/<me>.
                let full = with_peer(address, me);
                tracing::info!(addr = %full, "listening");
                self.emit(NetEvent::Listening(full));
            }
            SwarmEvent::ListenerError { error, .. } => tracing::warn!(%error, "listener error"),
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => {
                let links = self.links.entry(peer_id).or_default();
                if endpoint.is_relayed() {
                    links.relayed += 1;
                } else {
                    links.direct += 1;
                }
                self.stats
                    .connected
                    .store(self.links.len() as u64, Ordering::Relaxed);
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                endpoint,
                num_established,
                ..
            } => {
                if num_established == 0 {
                    self.links.remove(&peer_id);
                    self.stats
                        .connected
                        .store(self.links.len() as u64, Ordering::Relaxed);
                    if self.run_peers.remove(&peer_id) {
                        self.emit(NetEvent::PeerLeft(peer_id));
                    }
                } else if let Some(links) = self.links.get_mut(&peer_id) {
                    let n = if endpoint.is_relayed() {
                        &mut links.relayed
                    } else {
                        &mut links.direct
                    };
                    *n = n.saturating_sub(1);
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                let bootstrap =
                    peer_id.is_some_and(|p| self.cfg.bootstrap.iter().any(|(b, _)| *b == p));
                if bootstrap {
                    tracing::warn!(%error, "bootstrap peer unreachable");
                } else {
                    tracing::debug!(peer = ?peer_id, %error, "outgoing connection failed");
                }
            }
            SwarmEvent::Behaviour(ev) => self.on_behaviour(ev),
            _ => {}
        }
    }

    fn on_behaviour(&mut self, ev: BehaviourEvent) {
        match ev {
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                if !diloco_p2p::is_diloco(&info) {
                    tracing::info!(peer = %peer_id, version = %info.protocol_version, "not a diloco peer; disconnecting");
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                    return;
                }
                if let Some(run) = agent_run(&info.agent_version) {
                    if run != self.cfg.run {
                        if self.refused.insert(peer_id) {
                            self.stats.refused.fetch_add(1, Ordering::Relaxed);
                        }
                        tracing::warn!(
                            peer = %peer_id, their_run = %run, our_run = %self.cfg.run,
                            "refusing a peer of another run: every peer of a run needs the same --model, --inner-steps, hyperparameters (--run-config) and data"
                        );
                        let _ = self.swarm.disconnect_peer_id(peer_id);
                        return;
                    }
                }
                let agent_is_node = agent_run(&info.agent_version).is_some();
                learn_addresses(&mut self.swarm.behaviour_mut().kad, &peer_id, info);
                if self.cfg.bootstrap.iter().any(|(b, _)| *b == peer_id) {
                    if self.cfg.relay_listen {
                        // Only once connected: the relay client's own dial of the relay would be
                        // refused while ours is in flight, and the listener would close at once.
                        self.listen_via_relays("asked to (--relay-listen)");
                    }
                    // Look ourselves up right away: the answer lists the peers already there.
                    let _ = self.swarm.behaviour_mut().kad.bootstrap();
                    if !self.bootstrapped {
                        self.bootstrapped = true;
                        tracing::info!(bootstrap = %peer_id, "connected to a bootstrap peer");
                        self.emit(NetEvent::Bootstrapped);
                    }
                }
                if agent_is_node && self.run_peers.insert(peer_id) {
                    if self.run_peers.len() > 4 * MAX_PEERS as usize {
                        self.run_peers.pop_first();
                    }
                    tracing::info!(peer = %peer_id, "peer of this run connected");
                    self.emit(NetEvent::PeerJoined(peer_id));
                }
            }
            BehaviourEvent::Kad(kad::Event::RoutingUpdated { peer, .. }) => self.maybe_dial(peer),
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                result: kad::QueryResult::GetClosestPeers(Ok(ok)),
                ..
            }) => {
                for p in ok.peers {
                    self.maybe_dial(p.peer_id);
                }
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => {
                let (accept, out) = self.classify(&message);
                if !accept && out.is_none() {
                    if let Some(from) = message.source {
                        self.emit(NetEvent::Refused {
                            from,
                            kind: "gossip",
                            reason: "too_large",
                            detail: format!(
                                "{} bytes, more than its topic carries (or another topic)",
                                message.data.len()
                            ),
                        });
                    }
                }
                let acceptance = if accept {
                    gossipsub::MessageAcceptance::Accept
                } else {
                    gossipsub::MessageAcceptance::Reject
                };
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&message_id, &propagation_source, acceptance);
                if let Some(ev) = out {
                    self.stats
                        .bytes_received
                        .fetch_add(message.data.len() as u64, Ordering::Relaxed);
                    self.emit(ev);
                }
            }
            BehaviourEvent::Shard(ev) | BehaviourEvent::Sync(ev) => self.on_request(ev),
            BehaviourEvent::Autonat(autonat::Event::StatusChanged { old, new }) => {
                tracing::info!(?old, ?new, "NAT status");
                if matches!(new, autonat::NatStatus::Private) {
                    self.listen_via_relays("not reachable directly (AutoNAT)");
                }
            }
            BehaviourEvent::Relay(
                p2p_relay::client::Event::ReservationReqAccepted { limit, .. }
                | p2p_relay::client::Event::OutboundCircuitEstablished { limit, .. }
                | p2p_relay::client::Event::InboundCircuitEstablished { limit, .. },
            ) => {
                self.circuit_bytes =
                    Some(limit.and_then(|l| l.data_in_bytes()).unwrap_or(u64::MAX));
            }
            BehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            }) => match result {
                Ok(_) => {
                    tracing::info!(peer = %remote_peer_id, "hole punched (DCUtR): direct connection replaces the relayed one")
                }
                Err(e) => {
                    tracing::info!(peer = %remote_peer_id, error = %e, "hole punching (DCUtR) failed; the connection stays relayed")
                }
            },
            _ => {}
        }
    }

    /// Decides whether a gossip message is worth forwarding (size and topic only: signatures
    /// are the state machine's job) and what to hand to the node.
    fn classify(&self, m: &gossipsub::Message) -> (bool, Option<NetEvent>) {
        let Some(from) = m.source else {
            return (false, None);
        };
        let Some(kind) = [Topic::Avg, Topic::Hello]
            .into_iter()
            .find(|&k| m.topic == topic(k, &self.cfg.run).hash())
        else {
            return (false, None);
        };
        if m.data.len() > kind.max_bytes() {
            return (false, None);
        }
        (
            true,
            Some(NetEvent::Gossip {
                from,
                topic: kind,
                data: m.data.clone(),
            }),
        )
    }

    fn on_request(&mut self, ev: request_response::Event<Vec<u8>, Vec<u8>>) {
        match ev {
            request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                self.stats
                    .bytes_received
                    .fetch_add(request.len() as u64 + 4, Ordering::Relaxed);
                // Acknowledge on both protocols (the behaviours share a codec type).
                let b = self.swarm.behaviour_mut();
                if b.shard.send_response(channel, Vec::new()).is_err() {
                    tracing::debug!(%peer, "could not acknowledge a direct message");
                }
                self.emit(NetEvent::Direct {
                    from: peer,
                    data: request,
                });
            }
            request_response::Event::OutboundFailure { peer, error, .. } => {
                if self.relayed_only(peer) {
                    self.warn_relay(peer, &error.to_string());
                }
                self.emit(NetEvent::SendFailed {
                    to: peer,
                    error: SendError::Outbound(error),
                });
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "inbound direct message failed");
            }
            _ => {}
        }
    }
}

/// Whether a direct message goes on the sync protocol (proofs and state) rather than the shard
/// protocol.
pub fn is_sync(msg: &Direct) -> bool {
    matches!(
        msg,
        Direct::SyncRequest { .. }
            | Direct::SyncProofs(_)
            | Direct::StateRequest
            | Direct::State { .. }
            | Direct::NotFound
    )
}
