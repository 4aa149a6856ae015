//! The libp2p swarm of a training node, owned by one task.
//!
//! Everything else talks to it through a [`NetHandle`]: bounded command and event channels and
//! shared counters. The swarm speaks TCP and QUIC with noise and yamux; identify, ping and
//! Kademlia (through the bootstrap peers) for discovery; gossipsub for the control plane (the
//! averaging protocol's small signed envelopes and node HELLOs); two request-response
//! protocols for the data plane (`/diloco/shard/1` for shards and aggregates,
//! `/diloco/sync/1` for decision proofs and state); AutoNAT, a relay client and DCUtR so that
//! a peer behind NAT listens through a bootstrap relay and upgrades to direct connections; and
//! connection limits.
//!
//! The swarm never interprets protocol messages: it moves bytes, with every size checked
//! before allocation. Peers that announce another run are refused at identify time.

use diloco_bootstrap::addr::with_peer;
use diloco_bootstrap::{learn_addresses, IDENTIFY_PROTOCOL, KAD_PROTOCOL};
use diloco_protocol::wire::{self, Direct, MAX_GOSSIP_BYTES, SHARD_PROTOCOL, SYNC_PROTOCOL};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    autonat, connection_limits, dcutr, gossipsub, identify, kad, noise, ping, relay, tcp, yamux,
    Multiaddr, PeerId, StreamProtocol, Swarm,
};
use std::collections::{BTreeSet, HashMap};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::sync::mpsc;

/// Capacity of the command and event channels.
pub const CHANNEL_CAPACITY: usize = 4096;
/// Largest HELLO accepted.
pub const MAX_HELLO_BYTES: usize = 1024;
/// Most connected peers (beyond it, inbound connections are refused).
pub const MAX_PEERS: u32 = 256;

/// Errors starting the swarm.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum NetError {
    /// The transport could not be built.
    #[error("building the network transport: {0}")]
    Transport(String),
    /// A listen address was refused.
    #[error("cannot listen on {addr}: {reason} (is the port in use? pick another with --listen)")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
    /// The swarm task is gone.
    #[error("the network task stopped")]
    Closed,
}

/// Which gossip topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    /// Signed protocol envelopes (`/diloco/avg/1/<run>`).
    Avg,
    /// Node HELLOs (`/diloco/hello/1/<run>`).
    Hello,
}

/// Requests to the swarm task.
#[derive(Debug)]
pub enum Command {
    /// Publish on a topic.
    Publish {
        /// Topic.
        topic: Topic,
        /// Payload (already size-checked by the sender).
        data: Vec<u8>,
    },
    /// Send an encoded [`Direct`] message.
    Send {
        /// Recipient.
        to: PeerId,
        /// `Direct::to_bytes`.
        data: Vec<u8>,
        /// Use the sync protocol (proofs, state) rather than the shard protocol.
        sync: bool,
    },
    /// Stop the task.
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
    /// A direct send failed.
    SendFailed {
        /// Recipient.
        to: PeerId,
        /// Why.
        error: String,
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
}

/// The node's side of the swarm task.
pub struct NetHandle {
    /// Commands to the swarm.
    pub commands: mpsc::Sender<Command>,
    /// Events from the swarm.
    pub events: mpsc::Receiver<NetEvent>,
    /// Counters.
    pub stats: Arc<NetStats>,
    /// This peer's id.
    pub peer_id: PeerId,
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

/// Length-prefixed request-response codec: a u32 LE length checked against the cap before
/// anything is allocated, then the bytes. Responses are a bare acknowledgement.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max: usize,
}

async fn read_frame<T: AsyncRead + Unpin + Send>(io: &mut T, max: usize) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message of {len} bytes exceeds the {max}-byte limit"),
        ));
    }
    // Grow as bytes arrive: a peer that announces a large frame and stalls costs nothing.
    let mut buf = Vec::with_capacity(len.min(1 << 20));
    io.take(len as u64).read_to_end(&mut buf).await?;
    if buf.len() != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "truncated message",
        ));
    }
    Ok(buf)
}

async fn write_frame<T: AsyncWrite + Unpin + Send>(io: &mut T, data: &[u8]) -> io::Result<()> {
    let len = u32::try_from(data.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "message too large"))?;
    io.write_all(&len.to_le_bytes()).await?;
    io.write_all(data).await?;
    io.close().await
}

impl request_response::Codec for FrameCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, self.max).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, 64).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &req).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &res).await
    }
}

/// All behaviours of a node.
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    limits: connection_limits::Behaviour,
    relay: relay::client::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    kad: kad::Behaviour<kad::store::MemoryStore>,
    gossipsub: gossipsub::Behaviour,
    shard: request_response::Behaviour<FrameCodec>,
    sync: request_response::Behaviour<FrameCodec>,
    autonat: autonat::Behaviour,
    dcutr: dcutr::Behaviour,
}

fn topic(kind: Topic, run: &str) -> gossipsub::IdentTopic {
    match kind {
        Topic::Avg => gossipsub::IdentTopic::new(format!("{}/{run}", wire::AVG_PROTOCOL)),
        Topic::Hello => gossipsub::IdentTopic::new(format!("/diloco/hello/1/{run}")),
    }
}

/// Agent string carrying the run id; peers compare it at identify time.
pub fn agent_version(run: &str) -> String {
    format!("diloco-node/{} run={run}", env!("CARGO_PKG_VERSION"))
}

fn agent_run(agent: &str) -> Option<&str> {
    agent
        .strip_prefix("diloco-node/")?
        .split_whitespace()
        .find_map(|w| w.strip_prefix("run="))
}

fn build(key: &libp2p::identity::Keypair, cfg: &NetConfig) -> Result<Swarm<Behaviour>, NetError> {
    let transport = |e: &dyn std::fmt::Display| NetError::Transport(e.to_string());
    let max_direct = cfg.max_direct;
    let timeout = cfg.request_timeout;
    let run = cfg.run.clone();
    let private_network = cfg.private_network;
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key.clone())
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| transport(&e))?
        .with_quic()
        .with_dns()
        .map_err(|e| transport(&e))?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| transport(&e))?
        .with_behaviour(|key, relay| {
            let me = key.public().to_peer_id();
            let mut kad_cfg = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
            kad_cfg.set_periodic_bootstrap_interval(Some(Duration::from_secs(30)));
            let mut kad =
                kad::Behaviour::with_config(me, kad::store::MemoryStore::new(me), kad_cfg);
            kad.set_mode(Some(kad::Mode::Server));
            let gs_cfg = gossipsub::ConfigBuilder::default()
                .max_transmit_size(MAX_GOSSIP_BYTES + 4096)
                .heartbeat_interval(Duration::from_millis(500))
                .validation_mode(gossipsub::ValidationMode::Strict)
                .validate_messages()
                .message_id_fn(|m: &gossipsub::Message| {
                    gossipsub::MessageId::from(&blake3::hash(&m.data).as_bytes()[..20])
                })
                .build()
                .map_err(|e| io::Error::other(e.to_string()))?;
            let gossipsub = gossipsub::Behaviour::new(
                gossipsub::MessageAuthenticity::Signed(key.clone()),
                gs_cfg,
            )
            .map_err(io::Error::other)?;
            let rr_cfg = request_response::Config::default()
                .with_request_timeout(timeout)
                .with_max_concurrent_streams(16);
            let rr = |name: &'static str| {
                request_response::Behaviour::with_codec(
                    FrameCodec { max: max_direct },
                    [(StreamProtocol::new(name), ProtocolSupport::Full)],
                    rr_cfg.clone(),
                )
            };
            let limits = connection_limits::ConnectionLimits::default()
                .with_max_established(Some(MAX_PEERS))
                .with_max_established_per_peer(Some(4))
                .with_max_pending_incoming(Some(64));
            Ok(Behaviour {
                limits: connection_limits::Behaviour::new(limits),
                relay,
                identify: identify::Behaviour::new(
                    identify::Config::new(IDENTIFY_PROTOCOL.to_string(), key.public())
                        .with_agent_version(agent_version(&run))
                        // A relayed address appears after the first identify exchange: push it,
                        // or the bootstrap peer's Kademlia would learn it only at the next
                        // periodic identify (5 minutes), and nobody could find this node.
                        // A push arrives as an ordinary `Received` on the other side.
                        .with_push_listen_addr_updates(true),
                ),
                ping: ping::Behaviour::new(ping::Config::new()),
                kad,
                gossipsub,
                shard: rr(SHARD_PROTOCOL),
                sync: rr(SYNC_PROTOCOL),
                autonat: autonat::Behaviour::new(
                    me,
                    autonat::Config {
                        only_global_ips: !private_network,
                        // First probe 5 s after start rather than 15: a node behind NAT
                        // should be reachable through a relay soon after it starts.
                        boot_delay: Duration::from_secs(5),
                        ..autonat::Config::default()
                    },
                ),
                dcutr: dcutr::Behaviour::new(me),
            })
        })
        .map_err(|e| transport(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
        .build();
    for kind in [Topic::Avg, Topic::Hello] {
        swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(&topic(kind, &cfg.run))
            .map_err(|e| transport(&e))?;
    }
    for addr in &cfg.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| NetError::Listen {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
    }
    for (peer, addr) in &cfg.bootstrap {
        swarm.behaviour_mut().kad.add_address(peer, addr.clone());
    }
    Ok(swarm)
}

/// Starts the swarm task on the current tokio runtime.
/// `stats` receives the traffic counters (shared with the status page).
pub fn spawn(
    key: &libp2p::identity::Keypair,
    cfg: NetConfig,
    stats: Arc<NetStats>,
) -> Result<NetHandle, NetError> {
    let swarm = build(key, &cfg)?;
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
    Ok(NetHandle {
        commands: cmd_tx,
        events: ev_rx,
        stats,
        peer_id,
    })
}

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

/// Open connections to one peer.
#[derive(Debug, Default, Clone, Copy)]
struct Links {
    direct: u32,
    relayed: u32,
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
                        error: format!(
                            "reachable only through a relay that carries {budget} bytes per circuit; a {}-byte message waits for a direct connection",
                            data.len()
                        ),
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
                if info.protocol_version != IDENTIFY_PROTOCOL {
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
                relay::client::Event::ReservationReqAccepted { limit, .. }
                | relay::client::Event::OutboundCircuitEstablished { limit, .. }
                | relay::client::Event::InboundCircuitEstablished { limit, .. },
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

    /// Whether every open connection to `peer` goes through a relay.
    fn relayed_only(&self, peer: PeerId) -> bool {
        self.links
            .get(&peer)
            .is_some_and(|l| l.direct == 0 && l.relayed > 0)
    }

    /// The relay's per-circuit byte limit, if a message of `len` bytes to `peer` (reachable only
    /// through a relay) would take more than half of it.
    fn over_relay_budget(&self, peer: PeerId, len: usize) -> Option<u64> {
        let budget = self.circuit_bytes?;
        (self.relayed_only(peer) && len as u64 > budget / 2).then_some(budget)
    }

    /// Logs (at most once a minute) that a message could not go over a relayed connection.
    fn warn_relay(&mut self, peer: PeerId, why: &str) {
        let now = tokio::time::Instant::now();
        if self
            .relay_warned
            .is_some_and(|t| now < t + Duration::from_secs(60))
        {
            return;
        }
        self.relay_warned = Some(now);
        tracing::warn!(
            %peer, why,
            "a direct message cannot go over a relayed connection: relays limit what each circuit carries (128 KiB by default), too little for outer gradients; this needs a direct connection (hole punching, a reachable --listen address) or a bootstrap peer with a raised --relay-max-circuit-bytes"
        );
    }

    /// Listens through the relay of every bootstrap peer (once): peers then reach this node
    /// through a relayed connection, which DCUtR tries to upgrade to a direct one.
    fn listen_via_relays(&mut self, why: &str) {
        if self.relayed {
            return;
        }
        self.relayed = true;
        for (peer, addr) in self.cfg.bootstrap.clone() {
            // The relay client needs the relay's peer id in the address.
            let circuit = with_peer(addr, peer).with(Protocol::P2pCircuit);
            match self.swarm.listen_on(circuit) {
                Ok(_) => {
                    tracing::info!(relay = %peer, why, "listening through the bootstrap relay")
                }
                Err(e) => tracing::warn!(relay = %peer, error = %e, "cannot listen through relay"),
            }
        }
    }

    /// Decides whether a gossip message is worth forwarding (size and topic only: signatures
    /// are the state machine's job) and what to hand to the node.
    fn classify(&self, m: &gossipsub::Message) -> (bool, Option<NetEvent>) {
        let Some(from) = m.source else {
            return (false, None);
        };
        let kind = if m.topic == topic(Topic::Avg, &self.cfg.run).hash() {
            if m.data.len() > MAX_GOSSIP_BYTES {
                return (false, None);
            }
            Topic::Avg
        } else if m.topic == topic(Topic::Hello, &self.cfg.run).hash() {
            if m.data.len() > MAX_HELLO_BYTES {
                return (false, None);
            }
            Topic::Hello
        } else {
            return (false, None);
        };
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
                    error: error.to_string(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_versions_carry_the_run() {
        let a = agent_version("abcd");
        assert_eq!(agent_run(&a), Some("abcd"));
        assert_eq!(agent_run("diloco-bootstrap/0.1.0"), None);
        assert_eq!(agent_run("rust-libp2p/0.1"), None);
    }

    #[test]
    fn frames_are_size_checked_before_allocation() {
        futures::executor::block_on(async {
            let mut buf = Vec::new();
            write_frame(&mut futures::io::Cursor::new(&mut buf), b"hello")
                .await
                .unwrap();
            let got = read_frame(&mut futures::io::Cursor::new(&buf), 16)
                .await
                .unwrap();
            assert_eq!(got, b"hello");
            // Over the cap: refused from the prefix alone.
            let err = read_frame(&mut futures::io::Cursor::new(&buf), 4)
                .await
                .unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            // A huge announced length with no body: error, no 4 GiB allocation.
            let lie = u32::MAX.to_le_bytes().to_vec();
            let err = read_frame(&mut futures::io::Cursor::new(&lie), usize::MAX)
                .await
                .unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
            // Truncated body.
            let mut t = buf.clone();
            t.truncate(6);
            assert!(read_frame(&mut futures::io::Cursor::new(&t), 16)
                .await
                .is_err());
        });
    }
}
