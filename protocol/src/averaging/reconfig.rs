//! Operator reconfiguration: the way on for a run that lost its quorum. The run's operator key
//! (`Config::operator`) signs a RECONFIG under the round and chain of the stalled round, naming
//! the members that survive; every peer in that round checks it and restarts the round with
//! those members under a new chain, so nothing of the round's old instance (its CLOSEs, votes,
//! certificates) counts any more, and the state stays the survivors' last decided one. The
//! RECONFIGs a round went through travel in its decision proof, so a peer that missed one
//! catches up by replaying it.

use std::sync::Arc;

use crate::wire::{
    reconfig_chain, Body, DecisionProof, Envelope, Reconfig, MAX_RECONFIGS_PER_ROUND,
};

use super::{OutEvent, Reject, RoundState, State};

impl State {
    /// A RECONFIG received by gossip: applied if valid here; a copy of one already applied is
    /// dropped silently.
    pub(super) fn on_reconfig(&mut self, env: Arc<Envelope>, rc: &Reconfig) {
        if self.reconfigs.iter().any(|e| *e == *env) {
            return;
        }
        match self.check_reconfig(&env, rc) {
            Ok(()) => self.apply_reconfig(env, rc),
            Err(why) => self.reject(env.signer, "RECONFIG", Reject::Reconfig(why)),
        }
    }

    /// Whether `env` (carrying `rc`) may restart the current round: signed by the run's
    /// operator for this round of this history, naming a non-empty, sorted subset of the
    /// round's members, while no quorum has committed in the round (a round a quorum decided
    /// is not the operator's to redo) and fewer than [`MAX_RECONFIGS_PER_ROUND`] RECONFIGs
    /// restarted it already.
    pub(super) fn check_reconfig(&self, env: &Envelope, rc: &Reconfig) -> Result<(), &'static str> {
        if self.cfg.operator != Some(env.signer) {
            return Err("not signed by the run's operator");
        }
        if env.run != self.cfg.run || env.round != self.round || env.chain != self.chain {
            return Err("for another round or history");
        }
        if !env.verify_signature() {
            return Err("bad signature");
        }
        let m = &rc.members;
        if m.is_empty() || !m.windows(2).all(|w| w[0] < w[1]) {
            return Err("member list not sorted, empty or repeating a member");
        }
        if m.iter().any(|p| self.members.binary_search(p).is_err()) {
            return Err("names a peer that is no member of the round");
        }
        if self.r.decide_target.is_some() {
            return Err("a quorum already committed in this round");
        }
        if self.reconfigs.len() >= MAX_RECONFIGS_PER_ROUND {
            return Err("too many reconfigurations of one round");
        }
        Ok(())
    }

    /// Whether the RECONFIG envelope `env` would restart this peer's current round (what
    /// `diloco-node reconfig` is told when it hands one to a node); the error says why not.
    pub fn check_reconfig_envelope(&self, env: &Envelope) -> Result<(), &'static str> {
        let Body::Reconfig(rc) = &env.body else {
            return Err("not a RECONFIG");
        };
        if !self.synced {
            return Err("this peer holds no state of the run yet");
        }
        self.check_reconfig(env, rc)
    }

    /// Restarts the current round as `rc` says (checked by [`State::check_reconfig`]).
    fn apply_reconfig(&mut self, env: Arc<Envelope>, rc: &Reconfig) {
        let round = self.round;
        // A member that had already trained contributes the same outer gradient again, in the
        // new instance; one still training answers `Train` as usual.
        let contrib = self.r.contrib.take();
        self.chain = reconfig_chain(&self.chain, &env.id());
        self.members = rc.members.clone();
        self.reconfigs.push((*env).clone());
        self.r = RoundState::default();
        // Messages of the old instance are another chain's: what a member says in the new one
        // is neither a duplicate nor an equivocation.
        self.seen.retain(|(_, r, ..), _| *r != round);
        self.reset_heard();
        self.out.push(OutEvent::Reconfigured {
            round,
            chain: self.chain,
            members: self.members.clone(),
        });
        // Relayed, so that every survivor hears it even if the operator reached only some.
        self.out.push(OutEvent::Gossip(env));
        if self.is_member() {
            if let Some(c) = contrib {
                self.on_trained(round, c.delta, c.tokens);
            }
        } else {
            self.gossip(self.join_body());
        }
    }

    /// Applies the RECONFIGs a decision proof of the current round carries that this peer
    /// has not applied yet, in order; the proof's SEAL is then checked under the chain and
    /// members they lead to.
    pub(super) fn apply_proof_reconfigs(&mut self, proof: &DecisionProof) -> Result<(), Reject> {
        if proof.reconfigs.len() > MAX_RECONFIGS_PER_ROUND {
            return Err(Reject::Reconfig("too many reconfigurations of one round"));
        }
        for e in &proof.reconfigs {
            if self.reconfigs.contains(e) {
                continue;
            }
            let Body::Reconfig(rc) = &e.body else {
                return Err(Reject::BadDecision("not a RECONFIG"));
            };
            self.check_reconfig(e, rc).map_err(Reject::Reconfig)?;
            self.apply_reconfig(Arc::new(e.clone()), rc);
        }
        Ok(())
    }

    /// A member still speaking in an instance of this round that a RECONFIG replaced missed
    /// the RECONFIG: gossip it again, at most once per retry period.
    pub(super) fn regossip_reconfigs(&mut self) {
        if self
            .r
            .reconfig_sent
            .is_some_and(|t| self.now < t.saturating_add(self.cfg.retry))
        {
            return;
        }
        self.r.reconfig_sent = Some(self.now);
        for e in self.reconfigs.clone() {
            self.out.push(OutEvent::Gossip(Arc::new(e)));
        }
    }

    /// Whether the operator reconfigured this peer's history in the current round or a round
    /// whose decision it keeps.
    pub fn reconfigured(&self) -> bool {
        !self.reconfigs.is_empty() || self.history.iter().any(|(_, p)| !p.reconfigs.is_empty())
    }
}

#[cfg(test)]
mod tests {
    //! What a RECONFIG must be to restart a round, field by field, and what restarting does.
    use super::*;
    use crate::averaging::{Config, OutEvent};
    use crate::wire::{Hash, PeerKey};
    use ed25519_dalek::SigningKey;

    /// Three members, seen from the first, with `operator` as the run's operator key.
    fn setup(operator: &SigningKey) -> (Vec<SigningKey>, State) {
        let mut keys: Vec<SigningKey> = (1..=3u8)
            .map(|i| SigningKey::from_bytes(&[i; 32]))
            .collect();
        keys.sort_by_key(PeerKey::of);
        let mut cfg = Config::new(Hash::of(b"reconfig-test"), 64);
        cfg.operator = Some(PeerKey::of(operator));
        let members = keys.iter().map(PeerKey::of).collect();
        let st = State::genesis(cfg, keys[0].clone(), vec![0.0; 64], members);
        (keys, st)
    }

    fn reconfig(st: &State, key: &SigningKey, members: Vec<PeerKey>) -> Envelope {
        Envelope::sign(
            key,
            st.cfg.run,
            st.round,
            st.chain,
            Body::Reconfig(Reconfig { members }),
        )
    }

    fn check(st: &State, e: &Envelope) -> Result<(), &'static str> {
        let Body::Reconfig(rc) = &e.body else {
            unreachable!()
        };
        st.check_reconfig(e, rc)
    }

    #[test]
    fn only_the_operator_restarts_this_round_with_some_of_its_members() {
        let op = SigningKey::from_bytes(&[42; 32]);
        let (keys, mut st) = setup(&op);
        let two: Vec<PeerKey> = st.members[..2].to_vec();
        let good = reconfig(&st, &op, two.clone());
        assert_eq!(check(&st, &good), Ok(()));
        let mut forged = good.clone();
        forged.sig.0[3] ^= 1;
        let mut reversed = two.clone();
        reversed.reverse();
        let stranger = PeerKey::of(&SigningKey::from_bytes(&[77; 32]));
        let mut with_stranger = vec![two[0], stranger];
        with_stranger.sort();
        let run = st.cfg.run;
        let cases = vec![
            ("a member's key", reconfig(&st, &keys[1], two.clone())),
            ("a forged signature", forged),
            ("no members", reconfig(&st, &op, Vec::new())),
            ("unsorted", reconfig(&st, &op, reversed)),
            ("a member twice", reconfig(&st, &op, vec![two[0], two[0]])),
            ("a non-member", reconfig(&st, &op, with_stranger)),
            (
                "another round",
                Envelope::sign(&op, run, 1, st.chain, good.body.clone()),
            ),
            (
                "another chain",
                Envelope::sign(&op, run, 0, Hash::of(b"x"), good.body.clone()),
            ),
            (
                "another run",
                Envelope::sign(&op, Hash::of(b"y"), 0, st.chain, good.body.clone()),
            ),
        ];
        for (what, e) in cases {
            assert!(check(&st, &e).is_err(), "a RECONFIG with {what} passed");
        }
        // Without an operator key nobody can.
        st.cfg.operator = None;
        assert!(check(&st, &good).is_err());
    }

    #[test]
    fn a_reconfig_restarts_the_round_under_a_new_chain_with_the_survivors() {
        let op = SigningKey::from_bytes(&[42; 32]);
        let (_, mut st) = setup(&op);
        let survivors: Vec<PeerKey> = st.members[..2].to_vec();
        let e = Arc::new(reconfig(&st, &op, survivors.clone()));
        let (old_chain, state) = (st.chain, st.state_hash());
        let Body::Reconfig(rc) = &e.body else {
            unreachable!()
        };
        st.on_reconfig(e.clone(), rc);
        assert_eq!(st.round, 0, "the round is not decided");
        assert_eq!(st.members, survivors);
        assert_eq!(st.chain, reconfig_chain(&old_chain, &e.id()));
        assert_eq!(st.state_hash(), state, "the state is the last decided one");
        assert!(st.reconfigured());
        let out = std::mem::take(&mut st.out);
        assert!(out
            .iter()
            .any(|o| matches!(o, OutEvent::Reconfigured { members, .. } if *members == survivors)));
        assert!(out
            .iter()
            .any(|o| matches!(o, OutEvent::Gossip(g) if **g == *e)));
        // The same RECONFIG again changes nothing, and is no rejection.
        st.on_reconfig(e.clone(), rc);
        assert_eq!(st.chain, reconfig_chain(&old_chain, &e.id()));
        assert!(st.out.is_empty());
        // Once a quorum committed in the round, the operator cannot redo it.
        let again = Arc::new(reconfig(&st, &op, survivors[..1].to_vec()));
        st.r.decide_target = Some((0, Hash::of(b"s"), Hash::of(b"t")));
        let Body::Reconfig(rc2) = &again.body else {
            unreachable!()
        };
        assert_eq!(
            st.check_reconfig(&again, rc2),
            Err("a quorum already committed in this round")
        );
        st.r.decide_target = None;
        assert_eq!(st.check_reconfig(&again, rc2), Ok(()));
    }

    #[test]
    fn a_round_is_reconfigured_a_bounded_number_of_times() {
        let op = SigningKey::from_bytes(&[42; 32]);
        let (_, mut st) = setup(&op);
        for i in 0..MAX_RECONFIGS_PER_ROUND {
            let members = st.members.clone();
            let e = Arc::new(reconfig(&st, &op, members));
            let Body::Reconfig(rc) = &e.body else {
                unreachable!()
            };
            assert_eq!(st.check_reconfig(&e, rc), Ok(()), "reconfiguration {i}");
            st.on_reconfig(e.clone(), rc);
        }
        let members = st.members.clone();
        let e = reconfig(&st, &op, members);
        assert_eq!(
            check(&st, &e),
            Err("too many reconfigurations of one round")
        );
    }
}
