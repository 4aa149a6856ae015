//! Applying and deciding: fetch a SEAL's aggregates, apply the Nesterov step tentatively,
//! COMMIT (with the SEAL's certificate), and once a quorum of COMMITs agrees finalize the round and move to the next.

use std::sync::Arc;

use crate::codec;
use crate::outer;
use crate::wire::{Body, Commit, DecisionProof, Direct, Envelope, Hash};

use super::{state_hash, OutEvent, Reject, RoundState, State, Tentative, RETAIN_ROUNDS};

impl State {
    /// Begins (or resumes) fetching the aggregates of a proposal, then applies it.
    pub(super) fn start_apply(&mut self, env: Arc<Envelope>) {
        let Body::Seal(p) = &env.body else { return };
        let h = p.seal.hash();
        // Once a decision is known (a quorum of COMMITs, or a verified proof) only its SEAL is
        // worth applying: another one arriving meanwhile must not take its place (the decided
        // one would never be finished, and a later proof of it is dropped as known).
        if self.r.decide_target.is_some_and(|(_, seal, _)| seal != h) {
            return;
        }
        // Whoever accepted or committed this SEAL has applied it and holds its aggregates.
        let mut sources = vec![env.signer];
        for (_, m) in self.r.commits.iter().filter(|((_, x, _), _)| *x == h) {
            sources.extend(m.keys().copied());
        }
        for (_, m) in self.r.accepts.iter().filter(|((_, x), _)| *x == h) {
            sources.extend(m.keys().copied());
        }
        let mut seen = std::collections::BTreeSet::new();
        sources.retain(|p| seen.insert(*p));
        for s in p.seal.shards.iter().flatten() {
            if !self.store.contains_key(&s.data) {
                let mut src = vec![s.owner];
                src.extend(sources.iter().copied().filter(|x| *x != s.owner).take(8));
                if !self.r.fetch_pending.contains_key(&s.data) {
                    self.send(
                        s.owner,
                        Direct::Fetch {
                            round: self.round,
                            hash: s.data,
                        },
                    );
                }
                let now = self.now;
                self.r.fetch_pending.insert(s.data, (src, now));
            }
        }
        self.r.applying = Some((env, sources));
        self.try_apply();
    }

    pub(super) fn try_apply(&mut self) {
        let Some((env, _)) = self.r.applying.clone() else {
            return;
        };
        let Body::Seal(p) = &env.body else { return };
        if p.seal
            .shards
            .iter()
            .flatten()
            .any(|s| !self.store.contains_key(&s.data))
        {
            return;
        }
        let seal_hash = p.seal.hash();
        if !self.r.tentative.contains_key(&seal_hash) {
            let mut delta = vec![0f32; self.cfg.len];
            let ranges = codec::shards(self.cfg.len, self.k());
            for (s, range) in p.seal.shards.iter().zip(ranges) {
                let Some(s) = s else { continue };
                let Some((_, data)) = self.store.get(&s.data) else {
                    return;
                };
                match codec::decode(data, range.len()) {
                    Ok(v) if v.len() == range.len() => delta[range].copy_from_slice(&v),
                    _ => {
                        // A sealed aggregate that does not decode: this proposal can never be
                        // applied; wait for failover.
                        self.reject(env.signer, "SEAL", Reject::Malformed("sealed aggregate"));
                        self.r.applying = None;
                        return;
                    }
                }
            }
            let mut theta = self.theta.clone();
            let mut momentum = self.momentum.clone();
            if outer::nesterov_step(self.cfg.outer, &mut theta, &mut momentum, &delta).is_err() {
                // The sealed aggregate would make the state non-finite: never commit it; wait
                // for failover.
                self.reject(
                    env.signer,
                    "SEAL",
                    Reject::Malformed("outer step not finite"),
                );
                self.r.applying = None;
                return;
            }
            let state = state_hash(&theta, &momentum);
            let next_chain = Hash::of_parts(&[&self.chain.0, &seal_hash.0]);
            self.r.tentative.insert(
                seal_hash,
                Tentative {
                    theta,
                    momentum,
                    state,
                    next_chain,
                },
            );
        }
        self.r.applying = None;
        let state = self.r.tentative[&seal_hash].state;
        if let Some((_, h, st)) = self.r.decide_target {
            if h == seal_hash && st == state {
                self.finalize(seal_hash);
                return;
            }
        }
        // ACCEPT, then COMMIT once the SEAL's certificate (a quorum of ACCEPTs) is complete:
        // here if it already is, else in `on_accept`.
        self.accept(p.ballot, seal_hash);
        self.maybe_commit(p.ballot, seal_hash);
    }

    pub(super) fn on_commit(&mut self, env: Arc<Envelope>, c: Commit) {
        let key = (c.ballot, c.seal, c.state);
        let q = self.quorum();
        let set = self.r.commits.entry(key).or_default();
        set.insert(env.signer, env.clone());
        if set.len() >= q && self.r.decide_target.is_none() {
            self.r.decide_target = Some(key);
            if self
                .r
                .tentative
                .get(&c.seal)
                .is_some_and(|t| t.state == c.state)
            {
                self.finalize(c.seal);
            } else if let Some(p) = self.r.proposals.get(&c.ballot).cloned() {
                self.start_apply(p);
            } else {
                // We never saw the SEAL: ask a committer for the decision proof.
                self.ask_sync(env.signer);
            }
        }
    }

    fn finalize(&mut self, seal_hash: Hash) {
        let Some((ballot, _, state)) = self.r.decide_target else {
            return;
        };
        let Some(t) = self.r.tentative.remove(&seal_hash) else {
            return;
        };
        if t.state != state {
            return;
        }
        let Some(seal_env) = self.r.proposals.get(&ballot).cloned() else {
            return;
        };
        let Body::Seal(p) = &seal_env.body else {
            return;
        };
        // Every COMMIT received so far (at least a quorum, at most one per member): a peer that
        // catches up by state transfer looks for its own members among the signers.
        let commits: Vec<Envelope> = self.r.commits[&(ballot, seal_hash, state)]
            .values()
            .map(|e| (**e).clone())
            .collect();
        let round = self.round;
        self.history.push_back((
            round,
            DecisionProof {
                seal: (*seal_env).clone(),
                commits,
                reconfigs: std::mem::take(&mut self.reconfigs),
            },
        ));
        while self.history.len() as u64 > RETAIN_ROUNDS {
            self.history.pop_front();
        }
        // Straggler: my READY missed the CLOSE -> fold my delta into the next one.
        if let Some(c) = self.r.contrib.take() {
            if !p.seal.close.contributors.iter().any(|x| x.peer == self.me) {
                self.carry = Some((c.delta, c.tokens));
            }
        }
        self.theta = t.theta;
        self.momentum = t.momentum;
        self.chain = t.next_chain;
        self.members = p.seal.next_members.clone();
        let members = &self.members;
        self.last_heard
            .retain(|p, _| members.binary_search(p).is_ok());
        self.round += 1;
        self.unconfirmed = None;
        self.r = RoundState::default();
        let keep_from = self.round.saturating_sub(RETAIN_ROUNDS);
        self.store.retain(|_, (r, _)| *r >= keep_from);
        self.big.retain(|_, (r, _)| *r >= keep_from);
        let round_now = self.round;
        self.announced.retain(|_, (a, _)| a.round >= round_now);
        self.seen.retain(|(_, r, ..), _| *r >= self.round);
        self.out.push(OutEvent::Decided {
            round,
            seal: seal_hash,
            state,
        });
        if self.is_member() {
            self.out.push(OutEvent::Train { round: self.round });
        } else {
            self.gossip(self.join_body());
        }
        // A peer catching up asks for the next round at once rather than after `retry`.
        self.last_sync = None;
        let future = std::mem::take(&mut self.future);
        for env in future {
            self.on_gossip(env, true);
        }
    }
}
