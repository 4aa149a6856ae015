//! The behaviours of a training node's swarm and how the swarm is built: TCP and QUIC with
//! noise and yamux, a relay client, identify, ping, Kademlia, gossipsub (strict signing,
//! content-addressed message ids), two request-response protocols with the size-checked frame
//! codec, AutoNAT, DCUtR and connection limits.

use super::codec::FrameCodec;
use super::{NetConfig, NetError, Topic, MAX_PEERS};
use diloco_p2p::{agent_version, topic_name, AVG_TOPIC, HELLO_TOPIC, IDENTIFY_PROTOCOL};
use diloco_protocol::wire::{MAX_GOSSIP_BYTES, SHARD_PROTOCOL, SYNC_PROTOCOL};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::NetworkBehaviour;
use libp2p::{
    autonat, connection_limits, dcutr, gossipsub, identify, kad, noise, ping, relay, tcp, yamux,
    StreamProtocol, Swarm,
};
use std::io;
use std::time::Duration;

/// All behaviours of a node.
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    pub(super) limits: connection_limits::Behaviour,
    pub(super) relay: relay::client::Behaviour,
    pub(super) identify: identify::Behaviour,
    pub(super) ping: ping::Behaviour,
    pub(super) kad: kad::Behaviour<kad::store::MemoryStore>,
    pub(super) gossipsub: gossipsub::Behaviour,
    pub(super) shard: request_response::Behaviour<FrameCodec>,
    pub(super) sync: request_response::Behaviour<FrameCodec>,
    pub(super) autonat: autonat::Behaviour,
    pub(super) dcutr: dcutr::Behaviour,
}

/// The gossip topic of `kind` in run `run` (hex).
pub(super) fn topic(kind: Topic, run: &str) -> gossipsub::IdentTopic {
    let prefix = match kind {
        Topic::Avg => AVG_TOPIC,
        Topic::Hello => HELLO_TOPIC,
    };
    gossipsub::IdentTopic::new(topic_name(prefix, run))
}

/// Builds the swarm: transports, behaviours, topics, listeners and the bootstrap peers.
pub(super) fn build(
    key: &libp2p::identity::Keypair,
    cfg: &NetConfig,
    stats: std::sync::Arc<super::NetStats>,
) -> Result<Swarm<Behaviour>, NetError> {
    fn transport<E: std::error::Error + Send + Sync + 'static>(e: E) -> NetError {
        NetError::Transport(Box::new(e))
    }
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
        .map_err(transport)?
        .with_quic()
        .with_dns()
        .map_err(transport)?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(transport)?
        .with_behaviour(|key, relay| {
            let me = key.public().to_peer_id();
            let kad = diloco_p2p::kademlia(me, Duration::from_secs(30));
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
                    FrameCodec::new(max_direct, stats.clone()),
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
        .map_err(transport)?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
        .build();
    for kind in [Topic::Avg, Topic::Hello] {
        swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(&topic(kind, &cfg.run))
            .map_err(transport)?;
    }
    for addr in &cfg.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| NetError::Listen {
                addr: addr.clone(),
                source: e,
            })?;
    }
    for (peer, addr) in &cfg.bootstrap {
        swarm.behaviour_mut().kad.add_address(peer, addr.clone());
    }
    Ok(swarm)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gossip topic prefix (in `diloco-p2p`, which the bootstrap node shares) must name the
    /// averaging protocol's current wire version, or nodes of two versions would share a topic.
    #[test]
    fn the_gossip_topic_is_the_averaging_protocol_id() {
        assert_eq!(AVG_TOPIC, diloco_protocol::wire::AVG_PROTOCOL);
    }
}
