//! The bootstrap peer: helps diloco peers find each other and nothing else.
//!
//! It runs Kademlia in server mode on the diloco DHT, identify (so peers learn their observed
//! addresses), ping, a relay server (so peers behind NAT get a reachable address and can then
//! upgrade to a direct connection with DCUtR) and AutoNAT (so peers learn whether they are
//! reachable). It never trains, never joins a run and never sees protocol messages; a run keeps
//! going when every bootstrap peer is gone.

use crate::status::{lock, Book};
use diloco_p2p::keys::Identity;
use diloco_p2p::IDENTIFY_PROTOCOL;
use futures::StreamExt;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    autonat, connection_limits, identify, kad, noise, ping, relay, tcp, yamux, Multiaddr, Swarm,
};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;

/// Why the bootstrap peer could not start.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The transport could not be built.
    #[error("building the transport: {0}")]
    Transport(String),
    /// Listening failed (port in use, address not local, ...).
    #[error("cannot listen on {addr}: {reason} (is the port in use? pick another with --listen)")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
}

/// The bootstrap peer's behaviours.
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    limits: connection_limits::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    kad: kad::Behaviour<kad::store::MemoryStore>,
    relay: relay::Behaviour,
    autonat: autonat::Behaviour,
}

/// Settings of a bootstrap peer.
#[derive(Debug, Clone)]
pub struct Config {
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// Addresses to announce in addition to the observed ones (e.g. a public IP behind a
    /// port forward).
    pub external: Vec<Multiaddr>,
    /// Most simultaneous connections.
    pub max_connections: u32,
    /// What the relay server lets each peer use.
    pub relay: RelayLimits,
    /// Peers reach it on private addresses (LAN, Docker, lab): answer AutoNAT probes for
    /// private IPs too (libp2p refuses them by default, so on a LAN no peer ever learns it is
    /// unreachable).
    pub private_network: bool,
}

/// Limits of the relay server. The defaults are libp2p's: enough to coordinate a DCUtR hole
/// punch and to carry control messages, not to move outer gradients (a `tiny` model's int8
/// outer gradient alone is about 1 MB). An operator who wants peers that cannot punch a hole to
/// train through the relay raises `max_circuit_bytes` and `max_circuit_duration`, and pays for
/// that traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayLimits {
    /// Peers that may hold a reservation (listen through this relay) at once.
    pub max_reservations: usize,
    /// Relayed connections at once.
    pub max_circuits: usize,
    /// Bytes one relayed connection may carry (both directions) before the relay closes it.
    pub max_circuit_bytes: u64,
    /// How long one relayed connection may last before the relay closes it.
    pub max_circuit_duration: Duration,
}

impl Default for RelayLimits {
    fn default() -> Self {
        let d = relay::Config::default();
        RelayLimits {
            max_reservations: d.max_reservations,
            max_circuits: d.max_circuits,
            max_circuit_bytes: d.max_circuit_bytes,
            max_circuit_duration: d.max_circuit_duration,
        }
    }
}

/// Builds the bootstrap swarm and starts listening.
pub fn build(id: &Identity, cfg: &Config) -> Result<Swarm<Behaviour>, ServerError> {
    let transport = |e: &dyn std::fmt::Display| ServerError::Transport(e.to_string());
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(id.keypair.clone())
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| transport(&e))?
        .with_quic()
        .with_behaviour(|key| {
            let me = key.public().to_peer_id();
            let kad = diloco_p2p::kademlia(me, Duration::from_secs(60));
            let limits = connection_limits::ConnectionLimits::default()
                .with_max_established(Some(cfg.max_connections))
                .with_max_established_per_peer(Some(4))
                .with_max_pending_incoming(Some(cfg.max_connections.min(256)));
            Behaviour {
                limits: connection_limits::Behaviour::new(limits),
                identify: identify::Behaviour::new(
                    identify::Config::new(IDENTIFY_PROTOCOL.to_string(), key.public())
                        .with_agent_version(format!(
                            "diloco-bootstrap/{}",
                            env!("CARGO_PKG_VERSION")
                        )),
                ),
                ping: ping::Behaviour::new(ping::Config::new()),
                kad,
                relay: relay::Behaviour::new(
                    me,
                    relay::Config {
                        max_reservations: cfg.relay.max_reservations,
                        max_circuits: cfg.relay.max_circuits,
                        max_circuit_bytes: cfg.relay.max_circuit_bytes,
                        max_circuit_duration: cfg.relay.max_circuit_duration,
                        ..relay::Config::default()
                    },
                ),
                autonat: autonat::Behaviour::new(
                    me,
                    autonat::Config {
                        only_global_ips: !cfg.private_network,
                        ..autonat::Config::default()
                    },
                ),
            }
        })
        .map_err(|e| transport(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build();
    for addr in &cfg.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| ServerError::Listen {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
    }
    for addr in &cfg.external {
        swarm.add_external_address(addr.clone());
    }
    Ok(swarm)
}

/// Whether `addr` is on a loopback interface.
fn is_loopback(addr: &Multiaddr) -> bool {
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => ip.is_loopback(),
        Some(Protocol::Ip6(ip)) => ip.is_loopback(),
        _ => false,
    }
}

/// Drives the swarm until `shutdown` resolves. Each listen address is reported through
/// `on_listen` as a full multiaddr ending in `/p2p/<peer id>`.
pub async fn run(
    swarm: Swarm<Behaviour>,
    on_listen: impl FnMut(Multiaddr),
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServerError> {
    let book = Arc::new(Mutex::new(Book::new(*swarm.local_peer_id())));
    run_with(swarm, book, on_listen, shutdown).await
}

/// [`run`], recording connections, peers and relay use in `book` (what the status server
/// shows).
pub async fn run_with(
    mut swarm: Swarm<Behaviour>,
    book: crate::status::Shared,
    mut on_listen: impl FnMut(Multiaddr),
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServerError> {
    let me = *swarm.local_peer_id();
    let mut sample = tokio::time::interval(crate::status::SAMPLE_EVERY);
    // Without explicit external addresses, announce the ones it listens on: the relay hands
    // its external addresses to clients in their reservations, and a client with none gets no
    // relayed address at all.
    let auto_external = swarm.external_addresses().next().is_none();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = sample.tick() => lock(&book).sample(),
            ev = swarm.select_next_some() => match ev {
                SwarmEvent::NewListenAddr { address, .. } => {
                    if auto_external {
                        // Loopback only while there is nothing better: a peer on another host
                        // given 127.0.0.1 dials itself.
                        if !is_loopback(&address) {
                            let lo: Vec<Multiaddr> =
                                swarm.external_addresses().filter(|a| is_loopback(a)).cloned().collect();
                            for a in lo {
                                swarm.remove_external_address(&a);
                            }
                            swarm.add_external_address(address.clone());
                        } else if swarm.external_addresses().all(is_loopback) {
                            swarm.add_external_address(address.clone());
                        }
                    }
                    let full = address.with(Protocol::P2p(me));
                    lock(&book).listening(full.to_string());
                    on_listen(full);
                }
                SwarmEvent::ListenerError { error, .. } => {
                    tracing::warn!(%error, "listener error");
                }
                SwarmEvent::ListenerClosed { addresses, reason: Err(e), .. } => {
                    let addr = addresses.first().cloned().unwrap_or_else(Multiaddr::empty);
                    return Err(ServerError::Listen { addr, reason: e.to_string() });
                }
                SwarmEvent::ConnectionEstablished { peer_id, endpoint, .. } => {
                    lock(&book).connected(peer_id, endpoint.get_remote_address().to_string());
                    tracing::debug!(peer = %peer_id, addr = %endpoint.get_remote_address(), "connected");
                }
                SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } => {
                    lock(&book).disconnected(peer_id);
                    tracing::debug!(peer = %peer_id, "disconnected");
                }
                SwarmEvent::Behaviour(BehaviourEvent::Relay(relay::Event::ReservationReqAccepted { src_peer_id, renewed: true })) => {
                    lock(&book).reservation(src_peer_id, true);
                }
                SwarmEvent::Behaviour(BehaviourEvent::Relay(
                    relay::Event::ReservationClosed { src_peer_id } | relay::Event::ReservationTimedOut { src_peer_id },
                )) => {
                    lock(&book).reservation(src_peer_id, false);
                }
                SwarmEvent::Behaviour(BehaviourEvent::Relay(relay::Event::CircuitReqAccepted { .. })) => {
                    lock(&book).circuit(true);
                }
                SwarmEvent::Behaviour(BehaviourEvent::Relay(relay::Event::CircuitClosed { .. })) => {
                    lock(&book).circuit(false);
                }
                SwarmEvent::Behaviour(BehaviourEvent::Relay(relay::Event::ReservationReqAccepted { src_peer_id, renewed: false })) => {
                    lock(&book).reservation(src_peer_id, true);
                    // The peer is now reachable through this relay: peers that look it up must
                    // get that address at once, not when its identify push (or the next periodic
                    // identify, minutes later) tells the same.
                    let circuits: Vec<Multiaddr> = swarm
                        .external_addresses()
                        .filter(|a| !a.iter().any(|p| p == Protocol::P2pCircuit))
                        .take(16)
                        .map(|a| {
                            // An --external-addr may already end in /p2p/<this peer>.
                            diloco_p2p::addr::with_peer(a.clone(), me)
                                .with(Protocol::P2pCircuit)
                                .with(Protocol::P2p(src_peer_id))
                        })
                        .collect();
                    for addr in circuits {
                        swarm.behaviour_mut().kad.add_address(&src_peer_id, addr);
                    }
                    tracing::debug!(peer = %src_peer_id, "relay reservation accepted");
                }
                SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. })) => {
                    if !diloco_p2p::is_diloco(&info) {
                        tracing::info!(peer = %peer_id, version = %info.protocol_version, "not a diloco peer; disconnecting");
                        let _ = swarm.disconnect_peer_id(peer_id);
                        continue;
                    }
                    tracing::info!(peer = %peer_id, agent = %info.agent_version, "peer identified");
                    lock(&book).identified(peer_id, &info.agent_version);
                    diloco_p2p::learn_addresses(&mut swarm.behaviour_mut().kad, &peer_id, info);
                }
                _ => {}
            }
        }
    }
}
