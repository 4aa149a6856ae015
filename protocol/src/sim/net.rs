//! The simulated network: latency and jitter, loss, duplication, partitions and per-peer byte
//! counts; gossip and direct messages go through the real wire encoding on the way.

use std::sync::Arc;

use rand_chacha::rand_core::RngCore;

use crate::averaging::{InEvent, Time};
use crate::wire::{Body, Direct, Envelope, Hash, PeerKey};

use super::{Ev, Sim};

impl Sim {
    pub(super) fn latency(&mut self) -> Time {
        let (a, b) = self.cfg.latency;
        let base = a + (self.rng.next_u64() % (b - a + 1));
        let (p, max) = self.cfg.spikes;
        if max > 0 && self.chance(p) {
            base + self.rng.next_u64() % max
        } else {
            base
        }
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && (self.rng.next_u64() as f64 / u64::MAX as f64) < p
    }

    pub(super) fn cut(&self, a: usize, b: usize) -> bool {
        self.partitions.iter().any(|(side, from, until)| {
            self.now >= *from && self.now < *until && side.contains(&a) != side.contains(&b)
        })
    }

    fn count_bytes(&mut self, i: usize, round: Option<u64>, data: u64, control: u64) {
        let r = round.unwrap_or_else(|| self.round_of(i));
        let e = self.bytes.entry((i, r)).or_default();
        e.0 += data;
        e.1 += control;
    }

    pub(super) fn gossip_from(&mut self, from: usize, env: Arc<Envelope>) {
        self.gossip_to(from, env, |_| true);
    }

    /// Gossip that reaches only the peers `to` picks (a malicious sender choosing its
    /// audience; honest gossip goes to everyone).
    pub(super) fn gossip_to(
        &mut self,
        from: usize,
        env: Arc<Envelope>,
        pick: impl Fn(usize) -> bool,
    ) {
        // Every gossip goes through the wire format and the cap, as on a real network.
        let (size, env) = match env.to_bytes() {
            Ok(b) => match Envelope::from_bytes(&b) {
                Ok(back) => (b.len() as u64, Arc::new(back)),
                Err(_) => {
                    self.report.wire_errors += 1;
                    (b.len() as u64, env)
                }
            },
            Err(_) => {
                self.report.oversized_gossip += 1;
                (env.to_full_bytes().map_or(0, |b| b.len() as u64), env)
            }
        };
        if matches!(env.body, Body::Announce(_)) {
            self.report.announces += 1;
        }
        self.report.max_gossip_bytes = self.report.max_gossip_bytes.max(size);
        self.count_bytes(from, Some(env.round), 0, size);
        // Verify once for all receivers (cached by content and signature); receivers of an
        // invalid signature check it themselves and reject it.
        let key = Hash::of_parts(&[&env.id().0, &env.sig.0]);
        let verified = match self.sig_cache.get(&key) {
            Some(v) => *v,
            None => {
                let v = env.verify_signature();
                if self.sig_cache.len() < 1 << 22 {
                    self.sig_cache.insert(key, v);
                }
                v
            }
        };
        for to in 0..self.peers.len() {
            if to == from
                || !pick(to)
                || !self.alive(to)
                || self.cut(from, to)
                || self.chance(self.cfg.loss)
            {
                continue;
            }
            let at = self.now + self.latency();
            let ev = InEvent::Gossip {
                env: env.clone(),
                verified,
            };
            self.schedule(at, to, Ev::In(ev.clone()));
            if self.chance(self.cfg.dup) {
                let at2 = at + self.latency();
                self.schedule(at2, to, Ev::In(ev));
            }
        }
    }

    pub(super) fn direct_from(&mut self, from: usize, to: PeerKey, msg: Arc<Direct>) {
        let (data, control, round) = match &*msg {
            Direct::PushShard {
                data, proof, round, ..
            } => (
                data.len() as u64,
                48 + 32 * proof.len() as u64,
                Some(*round),
            ),
            Direct::Data { data, round, .. } => (data.len() as u64, 48, Some(*round)),
            Direct::State {
                theta, momentum, ..
            } => (0, (theta.len() + momentum.len()) as u64, None),
            Direct::FullEnvelope { bytes, round } => (0, bytes.len() as u64, Some(*round)),
            _ => (0, 64, None),
        };
        // Through the wire format, as on a real stream.
        let msg = match msg.to_bytes().and_then(|b| Direct::from_bytes(&b)) {
            Ok(back) => Arc::new(back),
            Err(_) => {
                self.report.wire_errors += 1;
                msg
            }
        };
        self.count_bytes(from, round, data, control);
        let mut slow = 0;
        match &*msg {
            Direct::State { .. } => {
                self.report.states_sent += 1;
                slow = self.cfg.state_bandwidth.map_or(0, |b| control / b.max(1));
            }
            Direct::StateRequest => self.report.state_requests += 1,
            _ => {}
        }
        if let Some((owner, alias)) = self.aliases.get(&to).cloned() {
            // A request to one of a malicious peer's Sybil keys: answered by that key.
            if matches!(&*msg, Direct::SyncRequest { .. } | Direct::StateRequest) {
                self.report.syncs_to_strangers += 1;
                if let Some(fake) = self.sybil_state(owner) {
                    let at = self.now + self.latency();
                    if self.alive(owner) && !self.cut(from, owner) {
                        self.report.states_sent += 1;
                        self.schedule(
                            at,
                            from,
                            Ev::In(InEvent::Direct {
                                from: PeerKey::of(&alias),
                                msg: Arc::new(fake),
                            }),
                        );
                    }
                }
            }
            return;
        }
        let Some(&t) = self.index.get(&to) else {
            if matches!(&*msg, Direct::SyncRequest { .. } | Direct::StateRequest) {
                self.report.syncs_to_strangers += 1;
            }
            return;
        };
        if !self.alive(t) || self.cut(from, t) {
            return;
        }
        // Streams are reliable but slower for bulk data: latency + size / (100 MB/s).
        let at = self.now + self.latency() + data / 100_000 + slow;
        let me = self.peers[from].id;
        self.schedule(at, t, Ev::In(InEvent::Direct { from: me, msg }));
    }
}
