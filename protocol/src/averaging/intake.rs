//! Gossip intake: local training results become READY, and every gossip envelope goes through
//! admission, the equivocation check and dispatch by body; oversized envelopes travel by
//! announcement and are fetched.

use std::sync::Arc;

use crate::codec;
use crate::wire::{
    self, Announce, Body, Direct, Envelope, Evidence, Hash, PeerKey, Ready, WireError,
};

use super::aggregate::norm;
use super::ranking::leader_order;
use super::{Contribution, OutEvent, Reject, State, Timer, MAX_ANNOUNCED_PENDING, MAX_BUFFERED};

impl State {
    pub(super) fn on_trained(&mut self, round: u64, mut delta: Vec<f32>, mut tokens: u64) {
        if round != self.round || !self.is_member() || self.r.contrib.is_some() {
            return;
        }
        if delta.len() != self.cfg.len {
            return;
        }
        if let Some((old, old_tokens)) = self.carry.take() {
            // A contribution that missed its CLOSE is folded in once, token-weighted.
            let (a, b) = (self.weight(old_tokens) as f64, self.weight(tokens) as f64);
            for (d, o) in delta.iter_mut().zip(&old) {
                *d = ((f64::from(*d) * b + f64::from(*o) * a) / (a + b)) as f32;
            }
            tokens = tokens.saturating_add(old_tokens);
        }
        // Beyond the run's cap no READY would be admitted: scale down to it (after the codec's
        // rounding, which may lengthen the vector a little, the claim must still fit).
        let len = norm(&delta);
        if len > self.cfg.norm_cap && len.is_finite() {
            let s = self.cfg.norm_cap / len * 0.99;
            delta.iter_mut().for_each(|d| *d *= s);
        }
        let k = self.k();
        let shards: Vec<Vec<u8>> = codec::shards(self.cfg.len, k)
            .into_iter()
            .map(|r| codec::encode(self.cfg.codec, &delta[r]))
            .collect();
        let leaves: Vec<Hash> = shards.iter().map(|s| Hash::of(s)).collect();
        let ready = Ready {
            tokens: tokens.min(self.cfg.token_cap),
            shard_root: wire::merkle_root(&leaves),
            norm_bits: norm(&codec::quantize_roundtrip(self.cfg.codec, &delta)).to_bits(),
            can_serve: self.cfg.can_serve,
        };
        self.r.contrib = Some(Contribution {
            delta,
            tokens,
            shards,
            leaves,
            ready_id: Hash::default(),
        });
        self.gossip(Body::Ready(ready));
    }

    pub(super) fn on_gossip(&mut self, env: Arc<Envelope>, verified: bool) {
        if !self.synced {
            if self.contacts.len() < 1024 {
                self.contacts.insert(env.signer);
            }
            return;
        }
        let kind = env.body.kind();
        if env.round > self.round {
            // We are behind: check the signature only, buffer the next round, ask for proofs.
            // Only a member's word counts (an outsider's later-round gossip could otherwise make
            // a synced peer want, and take, a state from it), unless this peer restarted from a
            // checkpoint whose member list may be stale and no decision has confirmed it yet.
            let ok = env.run == self.cfg.run && (verified || env.verify_signature());
            if !ok {
                self.reject(env.signer, kind, WireError::BadSignature(env.signer));
                return;
            }
            // The next round's messages are buffered from anyone (a newcomer the pending SEAL
            // admits speaks in it; they are checked against that round's members on replay).
            if env.round == self.round + 1 && self.future.len() < MAX_BUFFERED {
                self.future.push(env.clone());
            }
            if self.trusts_strangers() || self.members.binary_search(&env.signer).is_ok() {
                self.maybe_sync(env.signer);
            } else if env.round > self.round + 1 {
                self.reject(
                    env.signer,
                    kind,
                    Reject::NotAllowed("a later round from a non-member"),
                );
            }
            return;
        }
        let members = std::mem::take(&mut self.members);
        let res = self.verifier.check(&env, self.round, &members, |e| {
            verified || e.verify_signature()
        });
        self.members = members;
        if let Err(e) = res {
            // Stale messages are routine after a decision; everything else is worth reporting.
            if matches!(e, WireError::OldRound { got, .. } if got + 1 >= self.round) {
                self.heard_late(&env, verified);
            } else {
                self.reject(env.signer, kind, e);
            }
            return;
        }
        // A RECONFIG names the chain it replaces (checked in `on_reconfig`).
        if let Body::Reconfig(rc) = &env.body {
            let rc = rc.clone();
            return self.on_reconfig(env, &rc);
        }
        // A JOIN may be up to JOIN_WINDOW rounds old, signed under that round's chain; it only
        // asks to be listed, so its chain is not checked.
        if env.chain != self.chain && !matches!(env.body, Body::Evidence(_) | Body::Join(_)) {
            if self.reconfigs.iter().any(|e| e.chain == env.chain) {
                // A member of the round's replaced instance: it missed the RECONFIG.
                self.regossip_reconfigs();
                return;
            }
            self.reject(env.signer, kind, Reject::Malformed("chain hash"));
            return;
        }
        if self.equivocates(&env) {
            return;
        }
        self.process(env);
    }

    /// A member's message of the previous round, arriving after this peer moved on: the member
    /// is alive, just a little behind, and must not be evicted as silent. One signature check
    /// per member and round at most.
    fn heard_late(&mut self, env: &Envelope, verified: bool) {
        if self
            .last_heard
            .get(&env.signer)
            .is_some_and(|r| *r >= env.round)
            || !self.members.contains(&env.signer)
        {
            return;
        }
        if env.run == self.cfg.run && (verified || env.verify_signature()) {
            self.last_heard.insert(env.signer, env.round);
        }
    }

    /// Records the first message per (signer, round, kind, slot); a different second one is
    /// evidence.
    fn equivocates(&mut self, env: &Arc<Envelope>) -> bool {
        let slot: Option<(u8, u32, Hash)> = match &env.body {
            Body::Ready(_) => Some((0, 0, Hash::default())),
            Body::Close(c) => Some((1, c.ballot, Hash::default())),
            Body::Agg(a) => Some((2, a.shard, a.close)),
            Body::Seal(p) => Some((3, p.ballot, Hash::default())),
            Body::Commit(c) => Some((4, c.ballot, Hash::default())),
            Body::Accept(a) => Some((5, a.ballot, Hash::default())),
            _ => None,
        };
        let Some((tag, n, h)) = slot else {
            return false;
        };
        let key = (env.signer, env.round, tag, n, h);
        match self.seen.get(&key) {
            None => {
                if self.seen.len() < 1 << 20 {
                    self.seen.insert(key, env.clone());
                }
                false
            }
            Some(first) if first.body == env.body => true, // duplicate: drop silently
            Some(first) => {
                let ev = Evidence {
                    a: Box::new((**first).clone()),
                    b: Box::new((**env).clone()),
                };
                self.reject(env.signer, env.body.kind(), Reject::Equivocation);
                self.ban(env.signer);
                self.gossip(Body::Evidence(ev));
                true
            }
        }
    }

    /// Starts every member's silence clock at the current round. A state just taken (genesis,
    /// restore, adoption) says nothing about who has been silent: a member is evicted only after
    /// `evict_after_rounds` rounds that this peer watched without hearing from it (before, a
    /// member never heard from counted as silent forever, so a peer that restored or adopted a
    /// state and then led a round could evict every member whose gossip it had not yet seen).
    pub(super) fn reset_heard(&mut self) {
        self.last_heard.clear();
        for p in &self.members {
            self.last_heard.insert(*p, self.round);
        }
    }

    fn ban(&mut self, peer: PeerKey) {
        if peer != self.me && self.verifier.banned.insert(peer) {
            self.out.push(OutEvent::Banned { peer });
        }
    }

    pub(super) fn process(&mut self, env: Arc<Envelope>) {
        // Any signed message of this round shows its signer alive, except a JOIN (below).
        if env.round == self.round && !matches!(env.body, Body::Join(_)) {
            self.last_heard.insert(env.signer, self.round);
        }
        let signer = env.signer;
        match &env.body {
            Body::Ready(r) => self.on_ready(&env, r.clone()),
            Body::Close(c) => self.on_close(&env, c.clone()),
            Body::Agg(a) => self.on_agg(signer, a.clone(), env.sig),
            Body::Prepare(b) => self.on_prepare(signer, *b),
            Body::Promise(p) => self.on_promise(env.clone(), p),
            Body::Accept(a) => self.on_accept(&env, *a),
            Body::Seal(p) => self.on_seal(env.clone(), p.ballot),
            Body::Commit(c) => self.on_commit(env.clone(), *c),
            Body::Join(j) => {
                // A JOIN only asks to be listed; it does not count as being heard from: a
                // newcomer must speak (READY, votes) in its first round as a member, or the next
                // SEAL evicts it. One the run's admission policy refuses is reported.
                match self
                    .cfg
                    .admission
                    .admits(self.cfg.run, signer, j, &self.members)
                {
                    Ok(()) => {
                        if self.r.joins.len() < 1024 || self.r.joins.contains_key(&signer) {
                            self.r.joins.insert(signer, env.clone());
                        }
                    }
                    Err(why) => self.reject(signer, "JOIN", Reject::NotAllowed(why)),
                }
            }
            Body::Reconfig(rc) => self.on_reconfig(env.clone(), &rc.clone()),
            Body::Announce(a) => self.on_announce(env.clone(), *a),
            Body::Audit(a) => self.on_audit(signer, a),
            Body::Evidence(e) => match wire::check_evidence(e) {
                Some(p) => self.ban(p),
                None => self.reject(
                    signer,
                    "EVIDENCE",
                    Reject::BadDecision("evidence does not verify"),
                ),
            },
        }
    }

    fn on_ready(&mut self, env: &Envelope, r: Ready) {
        let claim = f32::from_bits(r.norm_bits);
        if !(claim >= 0.0 && claim <= self.cfg.norm_cap) {
            self.reject(
                env.signer,
                "READY",
                Reject::NormTooLarge {
                    got: claim,
                    bound: self.cfg.norm_cap,
                },
            );
            return;
        }
        if env.signer == self.me {
            if let Some(c) = self.r.contrib.as_mut() {
                c.ready_id = env.id();
            }
        }
        self.r.readies.insert(env.signer, (env.id(), r, env.sig));
        self.note_reference();
        // READYs are only admitted from members, so fewer READYs than unbanned members means
        // someone is missing (checked first: the full scan is O(members)).
        let all_ready = self.r.readies.len() + self.verifier.banned.len() >= self.members.len()
            && self
                .members
                .iter()
                .all(|m| self.r.readies.contains_key(m) || self.banned().contains(m));
        if all_ready && self.leader(0) == Some(self.me) && self.r.leading.is_none() {
            self.do_close(0);
        }
    }

    pub(super) fn note_reference(&mut self) {
        if self.r.reference.is_some() {
            return;
        }
        let now = self.now;
        self.r.reference = Some(now);
        let round = self.round;
        let order = leader_order(&self.chain, &self.members);
        if order.first() == Some(&self.me) {
            self.set_timer(now + self.cfg.straggler_timeout, Timer::Straggler(round));
        }
        if let Some(rank) = order.iter().position(|p| *p == self.me) {
            let b = if rank == 0 { order.len() } else { rank };
            if b > 0 && b < u32::MAX as usize {
                self.set_timer(
                    now + b as u64 * self.cfg.attempt_timeout,
                    Timer::Attempt(round, b as u32),
                );
            }
        }
    }

    fn on_announce(&mut self, env: Arc<Envelope>, a: Announce) {
        if self.big.contains_key(&a.hash) || self.announced.contains_key(&a.hash) {
            return;
        }
        if a.size > wire::MAX_ANNOUNCED_BYTES as u64 {
            let got = a.size;
            self.reject(
                env.signer,
                "ANNOUNCE",
                WireError::TooLarge {
                    got,
                    max: wire::MAX_ANNOUNCED_BYTES,
                },
            );
            return;
        }
        // Bounded memory: a member has a handful of large messages per round at most (CLOSE,
        // SEAL, PROMISE, EVIDENCE), so at most 4 pending fetches per signer.
        let per_signer = self
            .announced
            .values()
            .filter(|(x, _)| x.signer == env.signer)
            .count();
        if self.announced.len() >= MAX_ANNOUNCED_PENDING || per_signer >= 4 {
            return;
        }
        let to = env.signer;
        self.announced.insert(a.hash, (env, self.now));
        self.send(
            to,
            Direct::FetchEnvelope {
                round: self.round,
                hash: a.hash,
            },
        );
    }

    pub(super) fn on_full_envelope(&mut self, from: PeerKey, bytes: &[u8]) {
        let hash = Hash::of(bytes);
        let Some((ann, _)) = self.announced.get(&hash).cloned() else {
            return;
        };
        match wire::open_announced(&ann, bytes) {
            Ok(env) => {
                self.announced.remove(&hash);
                self.big.insert(hash, (ann.round, Arc::new(bytes.to_vec())));
                // Admission again: the round may have moved on while we fetched.
                self.on_gossip(Arc::new(env), true);
            }
            Err(e) => self.reject(from, "ENVELOPE", e),
        }
    }
}
