//! CLOSE and reduce: the leader closes the contributor set, contributors push their shards to
//! the owners, owners (or backups, when an owner is silent) aggregate and gossip AGG.

use std::sync::Arc;

use crate::codec;
use crate::wire::{
    self, Agg, Body, Close, Contributor, Direct, Envelope, Hash, PeerKey, Ready, Signature,
};

use super::aggregate::{aggregate, norm};
use super::ranking::shard_owners;
use super::{bitmap, CloseInfo, Leading, Reject, Rule, State, Timer, MAX_BUFFERED};

impl State {
    pub(super) fn do_close(&mut self, ballot: u32) {
        let mut readies: Vec<(PeerKey, Hash, Ready, Signature)> = self
            .r
            .readies
            .iter()
            .filter(|(p, _)| {
                !self.verifier.banned.contains(p) && self.members.binary_search(p).is_ok()
            })
            .map(|(p, (h, r, sig))| (*p, *h, r.clone(), *sig))
            .collect();
        if let Rule::NormScreen { factor } = self.cfg.rule {
            let mut norms: Vec<f32> = readies
                .iter()
                .map(|(_, _, r, _)| f32::from_bits(r.norm_bits))
                .collect();
            norms.sort_by(|a, b| a.total_cmp(b));
            if let Some(med) = norms.get(norms.len() / 2).copied() {
                readies.retain(|(_, _, r, _)| {
                    let n = f32::from_bits(r.norm_bits);
                    n.is_finite() && n <= factor * med
                });
            }
        }
        if readies.is_empty() {
            return;
        }
        let close = Close {
            ballot,
            contributors: readies
                .into_iter()
                .map(|(peer, ready, info, sig)| Contributor {
                    peer,
                    ready,
                    info,
                    sig,
                })
                .collect(),
        };
        self.r.leading = Some(Leading::Collecting {
            ballot,
            close_id: Hash::default(),
        });
        let round = self.round;
        self.set_timer(
            self.now + self.cfg.agg_timeout,
            Timer::SealDeadline(round, ballot),
        );
        self.gossip(Body::Close(close));
    }

    /// Owner then backup of every shard of `close`: ranked among its contributors that can
    /// serve.
    pub(super) fn close_owners(&self, close: &Close) -> Vec<Vec<PeerKey>> {
        let servers: Vec<PeerKey> = close
            .contributors
            .iter()
            .filter(|c| c.info.can_serve)
            .map(|c| c.peer)
            .collect();
        shard_owners(&self.chain, &servers, self.k())
    }

    pub(super) fn on_close(&mut self, env: &Envelope, close: Close) {
        if Some(env.signer) != self.leader(close.ballot) {
            self.reject(env.signer, "CLOSE", Reject::NotAllowed("CLOSE"));
            return;
        }
        if let Err(why) = self.check_contributors(&close) {
            self.reject(env.signer, "CLOSE", Reject::Malformed(why));
            return;
        }
        let id = env.id();
        if let Some(Leading::Collecting { ballot, close_id }) = &mut self.r.leading {
            if *ballot == close.ballot && env.signer == self.me {
                *close_id = id;
            }
        }
        let owners = self.close_owners(&close);
        let round = self.round;
        let me = self.me;
        let mine_owner = owners.iter().any(|o| o.first() == Some(&me));
        let mine_backup = owners.iter().any(|o| o.get(1) == Some(&me));
        for (s, o) in owners.iter().enumerate() {
            if o.first() == Some(&me) {
                self.r.owned.entry((id, s as u32)).or_default();
            }
        }
        self.r.closes.insert(
            id,
            CloseInfo {
                close: close.clone(),
                owners: owners.clone(),
            },
        );
        // Push my shards.
        if let Some(c) = self.r.contrib.clone() {
            if let Some(idx) = close
                .contributors
                .iter()
                .position(|x| x.peer == me && x.ready == c.ready_id)
            {
                for (s, o) in owners.iter().enumerate() {
                    let Some(owner) = o.first().copied() else {
                        continue;
                    };
                    if owner == me {
                        self.owner_input(id, s as u32, idx, &c.shards[s]);
                    } else {
                        let proof = wire::merkle_proof(&c.leaves, s);
                        self.send(
                            owner,
                            Direct::PushShard {
                                round,
                                close: id,
                                shard: s as u32,
                                data: c.shards[s].clone(),
                                proof,
                            },
                        );
                    }
                }
            }
        }
        let early = std::mem::take(&mut self.r.early_pushes);
        for (from, msg) in early {
            if let Direct::PushShard {
                round,
                close,
                shard,
                data,
                proof,
            } = &*msg
            {
                if *close == id {
                    self.on_push(from, *round, *close, *shard, data, proof);
                } else {
                    self.r.early_pushes.push((from, msg.clone()));
                }
            }
        }
        let keys: Vec<(Hash, u32)> = self
            .r
            .owned
            .keys()
            .filter(|(c, _)| *c == id)
            .copied()
            .collect();
        for (c, s) in keys {
            self.maybe_finish_shard(c, s, false);
        }
        if mine_owner {
            self.set_timer(
                self.now + self.cfg.agg_timeout * 2 / 5,
                Timer::OwnerDeadline(round),
            );
        }
        if self.audited_rule() && self.r.contrib.is_some() {
            self.set_timer(
                self.now + self.cfg.agg_timeout / 2,
                Timer::AuditFlush(round),
            );
            self.set_timer(
                self.now + self.cfg.agg_timeout * 9 / 10,
                Timer::AuditFlush(round),
            );
        }
        if mine_backup {
            self.set_timer(
                self.now + self.cfg.agg_timeout * 3 / 5,
                Timer::BackupCheck(round),
            );
        }
    }

    pub(super) fn shard_range(&self, s: usize) -> std::ops::Range<usize> {
        codec::shards(self.cfg.len, self.k())
            .get(s)
            .cloned()
            .unwrap_or(0..0)
    }

    fn owner_input(&mut self, close_id: Hash, shard: u32, idx: usize, data: &[u8]) {
        let range = self.shard_range(shard as usize);
        let Ok(v) = codec::decode(data, range.len()) else {
            return;
        };
        if let Some(st) = self.r.owned.get_mut(&(close_id, shard)) {
            st.inputs.insert(idx, v);
        }
        self.maybe_finish_shard(close_id, shard, false);
    }

    pub(super) fn on_push(
        &mut self,
        from: PeerKey,
        round: u64,
        close_id: Hash,
        shard: u32,
        data: &[u8],
        proof: &[Hash],
    ) {
        if round != self.round {
            return;
        }
        let Some(info) = self.r.closes.get(&close_id) else {
            // The push overtook the CLOSE gossip: keep it until the CLOSE arrives.
            if self.r.early_pushes.len() < MAX_BUFFERED {
                let msg = Direct::PushShard {
                    round,
                    close: close_id,
                    shard,
                    data: data.to_vec(),
                    proof: proof.to_vec(),
                };
                self.r.early_pushes.push((from, Arc::new(msg)));
            }
            return;
        };
        let Some(idx) = info.close.contributors.iter().position(|c| c.peer == from) else {
            self.reject(from, "PUSH", Reject::NotAllowed("PUSH"));
            return;
        };
        let c = &info.close.contributors[idx];
        let claimed = f32::from_bits(c.info.norm_bits);
        let root = c.info.shard_root;
        if !self.r.owned.contains_key(&(close_id, shard)) {
            self.reject(from, "PUSH", Reject::NotAllowed("PUSH to a non-owner"));
            return;
        }
        if !wire::merkle_verify(root, Hash::of(data), shard as usize, proof) {
            self.reject(from, "PUSH", Reject::BadProof);
            return;
        }
        let range = self.shard_range(shard as usize);
        let v = match codec::decode(data, range.len()) {
            Ok(v) => v,
            Err(e) => return self.reject(from, "PUSH", e),
        };
        if v.len() != range.len() {
            return self.reject(
                from,
                "PUSH",
                Reject::WrongLength {
                    got: v.len(),
                    expected: range.len(),
                },
            );
        }
        let n = norm(&v);
        let bound = claimed * (1.0 + 1e-5) + 1e-6;
        // Incomparable (a NaN norm or claim) is rejected too.
        if n.partial_cmp(&bound).is_none_or(|o| o.is_gt()) {
            return self.reject(from, "PUSH", Reject::NormTooLarge { got: n, bound });
        }
        if let Some(st) = self.r.owned.get_mut(&(close_id, shard)) {
            st.inputs.insert(idx, v);
        }
        self.maybe_finish_shard(close_id, shard, false);
    }

    pub(super) fn maybe_finish_shard(&mut self, close_id: Hash, shard: u32, deadline: bool) {
        let Some(info) = self.r.closes.get(&close_id) else {
            return;
        };
        let n = info.close.contributors.len();
        let Some(st) = self.r.owned.get(&(close_id, shard)) else {
            return;
        };
        if st.done || st.inputs.is_empty() || (!deadline && st.inputs.len() < n) {
            return;
        }
        let inputs: Vec<(&[f32], u64)> = st
            .inputs
            .iter()
            .map(|(i, v)| {
                (
                    v.as_slice(),
                    self.weight(info.close.contributors[*i].info.tokens),
                )
            })
            .collect();
        let weight: u64 = inputs
            .iter()
            .map(|(_, w)| *w)
            .fold(0u64, |a, b| a.saturating_add(b));
        let agg = aggregate(self.cfg.rule, &inputs);
        let included = bitmap((0..n).map(|i| st.inputs.contains_key(&i)), n);
        let data = codec::encode(self.cfg.codec, &agg);
        let hash = Hash::of(&data);
        self.store.insert(hash, (self.round, Arc::new(data)));
        if let Some(st) = self.r.owned.get_mut(&(close_id, shard)) {
            st.done = true;
        }
        self.gossip(Body::Agg(Agg {
            close: close_id,
            shard,
            included,
            data: hash,
            weight,
        }));
    }

    pub(super) fn on_agg(&mut self, signer: PeerKey, a: Agg, sig: Signature) {
        let Some(info) = self.r.closes.get(&a.close) else {
            // CLOSE not seen (lost or still in flight): keep it anyway, checked at SEAL time.
            self.r
                .aggs
                .entry((a.close, a.shard))
                .or_default()
                .push((signer, a, sig));
            return;
        };
        let allowed = info
            .owners
            .get(a.shard as usize)
            .is_some_and(|o| o.contains(&signer));
        if !allowed || a.included.len() != info.close.contributors.len().div_ceil(8) {
            self.reject(signer, "AGG", Reject::NotAllowed("AGG"));
            return;
        }
        let list = self.r.aggs.entry((a.close, a.shard)).or_default();
        if list.len() < 8 {
            list.push((signer, a.clone(), sig));
            self.audit_agg(&a);
        }
        self.leader_progress();
    }

    pub(super) fn backup_check(&mut self) {
        let me = self.me;
        let round = self.round;
        let closes: Vec<(Hash, CloseInfo)> =
            self.r.closes.iter().map(|(h, c)| (*h, c.clone())).collect();
        for (id, info) in closes {
            for (s, o) in info.owners.iter().enumerate() {
                if o.get(1) != Some(&me) || self.r.aggs.contains_key(&(id, s as u32)) {
                    continue;
                }
                let st = self.r.owned.entry((id, s as u32)).or_default();
                st.backup = true;
                for (i, c) in info.close.contributors.iter().enumerate() {
                    if c.peer == me {
                        if let Some(data) = self.r.contrib.as_ref().map(|x| x.shards[s].clone()) {
                            self.owner_input(id, s as u32, i, &data);
                        }
                    } else {
                        self.send(
                            c.peer,
                            Direct::PullShard {
                                round,
                                close: id,
                                shard: s as u32,
                            },
                        );
                    }
                }
                let at = self.now + self.cfg.agg_timeout / 5;
                self.set_timer(at, Timer::OwnerDeadline(round));
            }
        }
    }
}
