//! The bootstrap peer: helps diloco peers find each other and nothing else.
//!
//! It runs Kademlia in server mode on the diloco DHT, identify (so peers learn their observed
//! addresses), ping, a relay server (so peers behind NAT get a reachable address and can then
//! upgrade to a direct connection with DCUtR) and AutoNAT (so peers learn whether they are
//! reachable). It never trains, never joins a run and never sees protocol messages; a run keeps
//! going when every bootstrap peer is gone.

use crate::keys::Identity;
use crate::{IDENTIFY_PROTOCOL, KAD_PROTOCOL};
use futures::StreamExt;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    autonat, connection_limits, identify, kad, noise, ping, relay, tcp, yamux, Multiaddr,
    StreamProtocol, Swarm,
};
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
            let mut kad_cfg = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
            kad_cfg.set_periodic_bootstrap_interval(Some(Duration::from_secs(60)));
            let mut kad =
                kad::Behaviour::with_config(me, kad::store::MemoryStore::new(me), kad_cfg);
            kad.set_mode(Some(kad::Mode::Server));
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
                relay: relay::Behaviour::new(me, relay::Config::default()),
                autonat: autonat::Behaviour::new(me, autonat::Config::default()),
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

/// Drives the swarm until `shutdown` resolves. Each listen address is reported through
/// `on_listen` as a full multiaddr ending in `/p2p/<peer id>`.
pub async fn run(
    mut swarm: Swarm<Behaviour>,
    mut on_listen: impl FnMut(Multiaddr),
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServerError> {
    let me = *swarm.local_peer_id();
    // Without explicit external addresses, announce the ones it listens on: the relay hands
    // its external addresses to clients in their reservations, and a client with none gets no
    // relayed address at all.
    let auto_external = swarm.external_addresses().next().is_none();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            ev = swarm.select_next_some() => match ev {
                SwarmEvent::NewListenAddr { address, .. } => {
                    if auto_external {
                        swarm.add_external_address(address.clone());
                    }
                    on_listen(address.with(libp2p::multiaddr::Protocol::P2p(me)));
                }
                SwarmEvent::ListenerError { error, .. } => {
                    tracing::warn!(%error, "listener error");
                }
                SwarmEvent::ListenerClosed { addresses, reason, .. } => {
                    if let Err(e) = reason {
                        let addr = addresses.first().cloned().unwrap_or_else(Multiaddr::empty);
                        return Err(ServerError::Listen { addr, reason: e.to_string() });
                    }
                }
                SwarmEvent::ConnectionEstablished { peer_id, endpoint, .. } => {
                    tracing::debug!(peer = %peer_id, addr = %endpoint.get_remote_address(), "connected");
                }
                SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } => {
                    tracing::debug!(peer = %peer_id, "disconnected");
                }
                SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. })) => {
                    if info.protocol_version != IDENTIFY_PROTOCOL {
                        tracing::info!(peer = %peer_id, version = %info.protocol_version, "not a diloco peer; disconnecting");
                        let _ = swarm.disconnect_peer_id(peer_id);
                        continue;
                    }
                    let kad_proto = StreamProtocol::new(KAD_PROTOCOL);
                    if info.protocols.contains(&kad_proto) {
                        for addr in info.listen_addrs.into_iter().take(16) {
                            swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                        }
                    }
                    tracing::info!(peer = %peer_id, agent = %info.agent_version, "peer identified");
                }
                _ => {}
            }
        }
    }
}
