//! Relayed connections: which peers this node reaches only through a relay, the relay's
//! per-circuit byte budget (a message that would exceed it waits for a direct connection
//! instead of being cut off mid-way), and listening through the bootstrap relays.

use super::Task;
use diloco_p2p::addr::with_peer;
use libp2p::multiaddr::Protocol;
use libp2p::PeerId;
use std::time::Duration;

/// Open connections to one peer.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Links {
    /// Direct connections.
    pub(super) direct: u32,
    /// Relayed connections.
    pub(super) relayed: u32,
}

impl Task {
    /// Whether every open connection to `peer` goes through a relay.
    pub(super) fn relayed_only(&self, peer: PeerId) -> bool {
        self.links
            .get(&peer)
            .is_some_and(|l| l.direct == 0 && l.relayed > 0)
    }

    /// The relay's per-circuit byte limit, if a message of `len` bytes to `peer` (reachable only
    /// through a relay) would take more than half of it.
    pub(super) fn over_relay_budget(&self, peer: PeerId, len: usize) -> Option<u64> {
        let budget = self.circuit_bytes?;
        (self.relayed_only(peer) && len as u64 > budget / 2).then_some(budget)
    }

    /// Logs (at most once a minute) that a message could not go over a relayed connection.
    pub(super) fn warn_relay(&mut self, peer: PeerId, why: &str) {
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
    pub(super) fn listen_via_relays(&mut self, why: &str) {
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
}
