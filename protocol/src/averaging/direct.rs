//! Direct-stream intake: the one dispatcher for [`Direct`] messages, and what a peer serves on
//! request (its shards, payloads, announced envelopes, decision proofs and its state).

use std::sync::Arc;

use crate::codec::{self, Quantization};
use crate::wire::{self, Direct, Hash, PeerKey};

use super::{Reject, State};

impl State {
    pub(super) fn on_direct(&mut self, from: PeerKey, msg: Arc<Direct>) {
        match &*msg {
            Direct::PushShard {
                round,
                close,
                shard,
                data,
                proof,
            } => {
                if self.synced {
                    self.on_push(from, *round, *close, *shard, data, proof);
                }
            }
            Direct::PullShard {
                round,
                close,
                shard,
            } => {
                if *round != self.round {
                    return;
                }
                let Some(c) = self.r.contrib.as_ref() else {
                    return;
                };
                let Some(data) = c.shards.get(*shard as usize).cloned() else {
                    return;
                };
                let proof = wire::merkle_proof(&c.leaves, *shard as usize);
                self.send(
                    from,
                    Direct::PushShard {
                        round: *round,
                        close: *close,
                        shard: *shard,
                        data,
                        proof,
                    },
                );
            }
            Direct::Fetch { round, hash } => {
                let reply = match self.store.get(hash) {
                    Some((_, d)) => Direct::Data {
                        round: *round,
                        hash: *hash,
                        data: (**d).clone(),
                    },
                    None => Direct::NotFound,
                };
                self.send(from, reply);
            }
            Direct::Data { round, hash, data } => {
                if !self.r.fetch_pending.contains_key(hash) {
                    return;
                }
                if Hash::of(data) != *hash {
                    self.reject(from, "DATA", Reject::HashMismatch);
                    return;
                }
                self.r.fetch_pending.remove(hash);
                self.store.insert(*hash, (*round, Arc::new(data.clone())));
                self.leader_progress();
                self.try_apply();
            }
            Direct::SyncRequest { from: first } => self.on_sync_request(from, *first),
            Direct::SyncProofs(proofs) => {
                if let Some(p) = proofs.first() {
                    self.on_proof(from, p.clone());
                }
            }
            Direct::StateRequest => {
                if !self.synced {
                    // Say so at once: the asker frees its request slot for someone who has it.
                    self.send(from, Direct::NotFound);
                    return;
                }
                let current = matches!(self.history.back(), Some((r, _)) if r + 1 == self.round);
                if current && !self.may_serve_state(from) {
                    return; // sent it recently (to this peer or to too many): it asks elsewhere
                }
                match self.history.back() {
                    Some((r, proof)) if r + 1 == self.round => {
                        let msg = Direct::State {
                            round: self.round,
                            proof: Box::new(proof.clone()),
                            theta: codec::encode(Quantization::F32, &self.theta),
                            momentum: codec::encode(Quantization::F32, &self.momentum),
                        };
                        self.send(from, msg);
                    }
                    _ => self.send(from, Direct::NotFound),
                }
            }
            Direct::State {
                round,
                proof,
                theta,
                momentum,
            } => {
                if let Some(a) = self.state_asked.get_mut(&from) {
                    a.1 = true;
                }
                self.on_state(from, *round, proof, theta, momentum)
            }
            Direct::NotFound => {
                if let Some(a) = self.state_asked.get_mut(&from) {
                    a.1 = true;
                }
            }
            Direct::FetchEnvelope { hash, .. } => {
                let reply = match self.big.get(hash) {
                    Some((r, bytes)) => Direct::FullEnvelope {
                        round: *r,
                        bytes: (**bytes).clone(),
                    },
                    None => Direct::NotFound,
                };
                self.send(from, reply);
            }
            Direct::FullEnvelope { bytes, .. } => self.on_full_envelope(from, bytes),
        }
    }
}
