//! Catch-up and state sync: asking for decision proofs or the full state, verifying them,
//! cross-checking donors, and adopting a state.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::codec;
use crate::wire::{Body, Commit, DecisionProof, Direct, Hash, PeerKey, Propose};

use super::{
    max_joins, state_hash, Admission, OutEvent, Quorum, Reject, RoundState, State, StateCandidate,
    Time, LONE_STATE_RETRIES, MAX_BUFFERED, MAX_STATES_SERVED, MAX_STATE_CANDIDATES,
    REPLAY_MAX_ROUNDS, STATE_PATIENCE_RETRIES,
};

impl State {
    pub(super) fn maybe_sync(&mut self, from: PeerKey) {
        // A restored peer not yet confirmed by a decision asks a different member each time
        // within the patience window: otherwise members that gossip later rounds the most
        // (say, attackers sending copies of their messages ahead) would be the only ones it
        // asks before it falls back on trusting strangers.
        let (now, patience) = (self.now, self.state_patience());
        if self.unconfirmed.is_some()
            && self
                .sync_asked
                .get(&from)
                .is_some_and(|t| now < t.saturating_add(patience))
        {
            return;
        }
        // Such a peer also asks each member that shows it a later round at once (each at most
        // once per patience window, so at most one request per member): with one request per
        // retry period an honest member's single READY of a round can fall between two
        // requests that went to attackers, and the patience window passes without an honest
        // member asked (simulator seed 49 of `sybil_donors_cannot_hand_a_member_a_state`).
        let due = self.unconfirmed.is_some()
            || self
                .last_sync
                .is_none_or(|t| self.now >= t + self.cfg.retry);
        if due {
            self.last_sync = Some(self.now);
            self.state_wanted = true;
            self.ask_sync(from);
        }
    }

    /// Sends a SyncRequest for this round to `to` and remembers having asked (its answer may
    /// be a State) for the patience window.
    pub(super) fn ask_sync(&mut self, to: PeerKey) {
        let (now, patience) = (self.now, self.state_patience());
        self.sync_asked
            .retain(|_, t| now < t.saturating_add(patience));
        if self.sync_asked.len() < MAX_BUFFERED {
            self.sync_asked.insert(to, now);
        }
        self.send(to, Direct::SyncRequest { from: self.round });
    }

    pub(super) fn request_state(&mut self) {
        let due = self
            .last_sync
            .is_none_or(|t| self.now >= t + self.cfg.retry);
        if !due {
            return;
        }
        self.last_sync = Some(self.now);
        self.state_wanted = true;
        // Two requests in flight while no state is held, one once a state is held (a second,
        // independent donor is what the cross-check needs; the lone-state timeout waits for
        // it). A request is in flight until answered or for the patience window, and nobody is
        // asked twice within that window. Contacts that have not sent a state held now come
        // first; chosen by time so that successive retries ask different contacts.
        let patience = self.state_patience();
        let now = self.now;
        let recent = |t: &Time| now < t.saturating_add(patience);
        let in_flight = self.state_requests_in_flight();
        let want: usize = if self.candidates.is_empty() { 2 } else { 1 };
        let need = want.saturating_sub(in_flight);
        let ready: Vec<PeerKey> = self
            .contacts
            .iter()
            .filter(|p| self.state_asked.get(p).is_none_or(|(t, _)| !recent(t)))
            .copied()
            .collect();
        let held = |p: &PeerKey| self.candidates.iter().any(|c| c.donors.contains(p));
        let fresh: Vec<PeerKey> = ready.iter().filter(|p| !held(p)).copied().collect();
        let pick = if fresh.is_empty() { ready } else { fresh };
        if pick.is_empty() || need == 0 {
            return;
        }
        let i = need * (self.now / self.cfg.retry.max(1)) as usize;
        for j in 0..need.min(pick.len()) {
            let p = pick[(i + j) % pick.len()];
            self.state_asked.insert(p, (now, false));
            self.send(p, Direct::StateRequest);
        }
        if self.state_asked.len() > 4 * MAX_BUFFERED {
            self.state_asked.retain(|_, (t, _)| recent(t));
        }
    }

    /// Whether this peer, restored from a checkpoint that no decision has confirmed, has
    /// waited the patience window for its own members in vain: it then takes later-round
    /// gossip from anyone as a reason to sync and two agreeing donors as proof of a state, as
    /// a joiner does (its checkpoint may be of a history the run abandoned).
    pub(super) fn trusts_strangers(&self) -> bool {
        self.unconfirmed
            .is_some_and(|since| self.now >= since.saturating_add(self.state_patience()))
    }

    /// The window of [`STATE_PATIENCE_RETRIES`] retry periods.
    fn state_patience(&self) -> Time {
        STATE_PATIENCE_RETRIES * self.cfg.retry
    }

    /// State requests sent less than the patience window ago and not answered yet.
    fn state_requests_in_flight(&self) -> usize {
        let patience = self.state_patience();
        self.state_asked
            .values()
            .filter(|(t, answered)| !answered && self.now < t.saturating_add(patience))
            .count()
    }

    /// Whether a full state may be sent to `to` now (see [`STATE_PATIENCE_RETRIES`]); records
    /// it if so.
    pub(super) fn may_serve_state(&mut self, to: PeerKey) -> bool {
        let window = self.state_patience();
        let now = self.now;
        self.state_served
            .retain(|_, t| now < t.saturating_add(window));
        if self.state_served.contains_key(&to) || self.state_served.len() >= MAX_STATES_SERVED {
            return false;
        }
        self.state_served.insert(to, now);
        true
    }

    pub(super) fn on_sync_request(&mut self, from: PeerKey, first: u64) {
        if !self.synced || first >= self.round {
            return;
        }
        let proof = self
            .history
            .iter()
            .find(|(r, _)| *r == first)
            .map(|(_, p)| p.clone());
        // Replay up to and through a reconfigured round, however far behind the asker is: that
        // round's proof carries the RECONFIG, the one thing that leads a peer still in the
        // replaced instance (a member found lost, back from its checkpoint) to the run's
        // history; a state alone it could not check when the survivors are a third of its
        // members or fewer.
        let reconfigured_ahead = self
            .history
            .iter()
            .any(|(r, p)| *r >= first && !p.reconfigs.is_empty());
        match proof {
            Some(p) if self.round - first <= REPLAY_MAX_ROUNDS || reconfigured_ahead => {
                self.send(from, Direct::SyncProofs(vec![p]));
            }
            // Too far behind to replay quickly (or older than the proofs kept): send the state.
            _ => self.on_direct(from, Arc::new(Direct::StateRequest)),
        }
    }

    pub(super) fn verify_proof(
        &self,
        proof: &DecisionProof,
    ) -> Result<(Propose, Commit), &'static str> {
        let seal = &proof.seal;
        let Body::Seal(p) = &seal.body else {
            return Err("not a SEAL");
        };
        if seal.run != self.cfg.run || seal.round != self.round || seal.chain != self.chain {
            return Err("SEAL for another round or chain");
        }
        if Some(seal.signer) != self.leader(p.ballot) || !seal.verify_signature() {
            return Err("SEAL signer");
        }
        self.check_seal(&p.seal, p.ballot)?;
        if proof.commits.len() > self.members.len() {
            return Err("more COMMITs than members");
        }
        let seal_hash = p.seal.hash();
        let mut signers = BTreeSet::new();
        let mut agreed: Option<Commit> = None;
        for c in &proof.commits {
            let Body::Commit(cm) = &c.body else {
                return Err("not a COMMIT");
            };
            if c.round != self.round || c.chain != self.chain || c.run != self.cfg.run {
                return Err("COMMIT for another round");
            }
            if cm.seal != seal_hash || cm.ballot != p.ballot || agreed.is_some_and(|a| a != *cm) {
                return Err("COMMITs disagree");
            }
            if self.members.binary_search(&c.signer).is_err() || !c.verify_signature() {
                return Err("COMMIT signer");
            }
            signers.insert(c.signer);
            agreed = Some(*cm);
        }
        match agreed {
            Some(c) if signers.len() >= self.quorum() => Ok((p.clone(), c)),
            _ => Err("no quorum"),
        }
    }

    pub(super) fn on_proof(&mut self, from: PeerKey, proof: DecisionProof) {
        if !self.synced || proof.seal.round != self.round {
            return;
        }
        // Awaiting a decision (a quorum of COMMITs seen) whose SEAL is already being applied:
        // a proof adds nothing. Without the SEAL, the proof is what this peer asked for.
        if let Some((ballot, _, _)) = self.r.decide_target {
            if self.r.proposals.contains_key(&ballot) {
                return;
            }
        }
        // RECONFIGs that restarted the round first: the SEAL is under the chain they made.
        if let Err(why) = self.apply_proof_reconfigs(&proof) {
            return self.reject(from, "SYNC", why);
        }
        match self.verify_proof(&proof) {
            Ok((_, c))
                if self
                    .r
                    .decide_target
                    .is_some_and(|(_, seal, state)| (seal, state) != (c.seal, c.state)) =>
            {
                // A quorum committed one SEAL and this proof shows a quorum for another: with
                // honest quorums that cannot happen in one round; keep what the quorum seen
                // first said.
                self.reject(
                    from,
                    "SYNC",
                    Reject::BadDecision("a decision other than the one a quorum committed"),
                )
            }
            Ok((p, c)) => {
                let env = Arc::new(proof.seal.clone());
                for ce in &proof.commits {
                    // A member whose COMMIT decided this round was active in it, even if its
                    // gossip never reached us: it must not be evicted as silent.
                    self.last_heard.insert(ce.signer, self.round);
                    self.r
                        .commits
                        .entry((c.ballot, c.seal, c.state))
                        .or_default()
                        .insert(ce.signer, Arc::new(ce.clone()));
                }
                self.r.proposals.insert(p.ballot, env.clone());
                self.r.decide_target = Some((c.ballot, c.seal, c.state));
                self.start_apply(env);
                // The peer that sent the proof holds the aggregates too.
                for (v, _) in self.r.fetch_pending.values_mut() {
                    if !v.contains(&from) {
                        v.insert(0, from);
                    }
                }
            }
            Err(why) => self.reject(from, "SYNC", Reject::BadDecision(why)),
        }
    }

    pub(super) fn on_state(
        &mut self,
        from: PeerKey,
        round: u64,
        proof: &DecisionProof,
        theta: &[u8],
        momentum: &[u8],
    ) {
        if self.synced && (round <= self.round + REPLAY_MAX_ROUNDS || !self.state_wanted) {
            return; // proofs are enough when this close behind; unasked-for states are ignored
        }
        // Only answers count: a State from a peer this one never asked is dropped unread.
        if !self.state_asked.contains_key(&from) && !self.sync_asked.contains_key(&from) {
            return self.reject(
                from,
                "STATE",
                Reject::NotAllowed("a State nobody asked for"),
            );
        }
        let c = match self.check_state(round, proof, theta, momentum) {
            Ok(c) => c,
            Err(reason) => return self.reject(from, "STATE", reason),
        };
        if self.synced {
            // A peer that is merely behind holds agreed state: it adopts a later state (whose
            // proof a quorum of that round's members signed) if more than a third of its own
            // members are among the signers: with fewer than a third of them dishonest (what
            // `two-thirds` tolerates) one honest member of ours vouches for it, and keys outside
            // our member list, however many, count for nothing. (A quorum of ours is too much:
            // while it was away the others may have evicted it and decided with a quorum of
            // the smaller group.) A peer restored from a
            // checkpoint that no decision has confirmed yet may hold a stale or abandoned
            // member list: it falls back on two agreeing donors, as a joiner does. A confirmed
            // peer whose members changed past a quorum while it was away takes no state: it
            // reports itself stalled and syncs after a restart (docs/PROTOCOL.md).
            if vouched(&c.signers, &self.members) {
                self.adopt_state(c);
            } else if self.trusts_strangers() {
                self.cross_check(from, c);
            } else {
                self.reject(
                    from,
                    "STATE",
                    Reject::BadDecision("state not signed by a third of our members"),
                );
            }
            return;
        }
        if self.contacts.len() <= 1 {
            // A joiner that knows a single contact: nobody to compare with.
            self.adopt_state(c);
            return;
        }
        self.cross_check(from, c);
    }

    /// Validates a State: payload lengths, and a quorum (of the SEAL's next member list) of
    /// validly signed COMMITs for the SEAL whose state hash matches the bytes received.
    fn check_state(
        &self,
        round: u64,
        proof: &DecisionProof,
        theta: &[u8],
        momentum: &[u8],
    ) -> Result<StateCandidate, Reject> {
        if round == 0 {
            return Err(Reject::BadDecision("state for round 0"));
        }
        let (Ok(t), Ok(m)) = (
            codec::decode(theta, self.cfg.len),
            codec::decode(momentum, self.cfg.len),
        ) else {
            return Err(Reject::BadDecision("state payload"));
        };
        if t.len() != self.cfg.len || m.len() != self.cfg.len {
            return Err(Reject::WrongLength {
                got: t.len(),
                expected: self.cfg.len,
            });
        }
        let sh = state_hash(&t, &m);
        let d = self.check_decision(proof, Some(sh))?;
        if d.round.checked_add(1) != Some(round) {
            return Err(Reject::BadDecision("no matching COMMIT"));
        }
        let (seal_hash, members, signers, next_chain) =
            (d.seal, d.members, d.signers, d.next_chain);
        Ok(StateCandidate {
            round,
            state: sh,
            seal: seal_hash,
            next_chain,
            members,
            signers,
            proof: proof.clone(),
            theta: t,
            momentum: m,
            donors: BTreeSet::new(),
            since: self.now,
        })
    }

    /// Checks a decision proof on its own, without this peer's member list: the SEAL names the
    /// next round's members (sorted, under an allowlist all listed) and a quorum of them
    /// ([`state_quorum`]) validly signed COMMITs of that SEAL, with one next chain and, with
    /// `state`, that state hash.
    fn check_decision(
        &self,
        proof: &DecisionProof,
        state: Option<Hash>,
    ) -> Result<Decision, Reject> {
        let Body::Seal(p) = &proof.seal.body else {
            return Err(Reject::BadDecision("not a SEAL"));
        };
        if proof.seal.run != self.cfg.run {
            return Err(Reject::BadDecision("SEAL of another run"));
        }
        let seal_hash = p.seal.hash();
        let members = &p.seal.next_members;
        if members.is_empty() || !members.windows(2).all(|w| w[0] < w[1]) {
            return Err(Reject::BadDecision("member list"));
        }
        // Under an allowlist every member is listed: a history naming other keys (Sybils
        // vouching for each other) is none of this run's, whoever sends it.
        if let Admission::Allowlist(list) = &self.cfg.admission {
            if members.iter().any(|m| list.binary_search(m).is_err()) {
                return Err(Reject::BadDecision("member list outside the allowlist"));
            }
        }
        // COMMITs come from the round's members, which differ a little from the next ones.
        if proof.commits.len() > 2 * members.len() + 8 {
            return Err(Reject::BadDecision("more COMMITs than members"));
        }
        let round = proof.seal.round;
        let mut signers = BTreeSet::new();
        let mut next_chain = None;
        for c in &proof.commits {
            let Body::Commit(cm) = &c.body else { continue };
            if cm.seal == seal_hash
                && state.is_none_or(|s| cm.state == s)
                && c.round == round
                && c.chain == proof.seal.chain
                && c.run == self.cfg.run
                && next_chain.is_none_or(|n| n == cm.next_chain)
                && members.binary_search(&c.signer).is_ok()
                && c.verify_signature()
            {
                signers.insert(c.signer);
                next_chain = Some(cm.next_chain);
            }
        }
        let Some(next_chain) = next_chain else {
            return Err(Reject::BadDecision("no matching COMMIT"));
        };
        if signers.len() < state_quorum(self.cfg.quorum, members.len()) {
            return Err(Reject::BadDecision("no quorum"));
        }
        Ok(Decision {
            round,
            seal: seal_hash,
            members: members.clone(),
            signers,
            next_chain,
        })
    }

    /// The round whose decision proof to ask of a peer whose HELLO claims another history at
    /// `claimed` (the round it is in): this peer's own round if the other is ahead (both
    /// chains are known there), else the other's last decided round. `None` when the other
    /// has decided nothing.
    pub fn rival_probe_round(&self, claimed: u64) -> Option<u64> {
        if claimed > self.round {
            Some(self.round)
        } else {
            claimed.checked_sub(1)
        }
    }

    /// Verifies what a peer that claims another history of this run answered to the request
    /// for [`State::rival_probe_round`]: a decision proof a quorum of its members signed, of a
    /// round this peer can compare with its own, and of another history than this one (the
    /// round's chain differs from this peer's chain in that round, or its SEAL from the one
    /// this peer decided). Discovery ranks histories by what this returns, never by a HELLO's
    /// claim; a proof of this peer's own history (a member relabelling it with another
    /// founder) is refused.
    pub fn check_rival(&self, proof: &DecisionProof) -> Result<RivalHistory, Reject> {
        if !self.synced {
            return Err(Reject::BadDecision("no history of our own to compare with"));
        }
        // The operator's reconfiguration is the word on which history the run follows: the
        // history it left (that of the members it found lost) is no rival.
        if self.reconfigured() {
            return Err(Reject::BadDecision(
                "this history was reconfigured by the run's operator; it follows no other",
            ));
        }
        let d = self.check_decision(proof, None)?;
        let ours = if d.round == self.round {
            proof.seal.chain == self.chain
        } else {
            let Some((_, p)) = self.history.iter().find(|(r, _)| *r == d.round) else {
                return Err(Reject::BadDecision(
                    "a round this peer cannot compare (not its round nor one it keeps)",
                ));
            };
            let same_seal = matches!(&p.seal.body, Body::Seal(s) if s.seal.hash() == d.seal);
            same_seal || p.seal.chain == proof.seal.chain
        };
        if ours {
            return Err(Reject::BadDecision(
                "a decision of our own history under another founder",
            ));
        }
        Ok(RivalHistory {
            round: d.round + 1,
            members: d.members.len(),
        })
    }

    /// A joiner's cross-check: it accepts a State once two donors vouch for the same (round,
    /// state hash); when they disagree it prefers the later round if that round's COMMIT
    /// signers include more than a third of the earlier state's members (so a donor that
    /// fabricates a history signed by keys of its own cannot win), and reports the other.
    /// A lone state is accepted after `LONE_STATE_RETRIES * retry` if no other donor answered
    /// by then (two more contacts are asked every `retry`).
    fn cross_check(&mut self, from: PeerKey, mut c: StateCandidate) {
        let key = (c.round, c.state);
        if let Some(i) = self
            .candidates
            .iter()
            .position(|x| (x.round, x.state) == key)
        {
            self.candidates[i].donors.insert(from);
            if self.candidates[i].donors.len() >= 2 {
                let c = self.candidates.swap_remove(i);
                self.adopt_state(c);
            }
            return;
        }
        c.donors.insert(from);
        let mut adopt: Option<(StateCandidate, Vec<PeerKey>)> = None;
        let mut conflicts: Vec<PeerKey> = Vec::new();
        // Candidates that `c` replaces (same donors, an earlier round), and whether `c` itself
        // is an earlier round of a candidate already held from the same donors.
        let mut replaced: Vec<usize> = Vec::new();
        let mut stale = false;
        for (i, o) in self.candidates.iter().enumerate() {
            let (hi, lo) = if c.round >= o.round { (&c, o) } else { (o, &c) };
            if hi.round > lo.round && linked(hi, lo) {
                if hi.donors.is_subset(&lo.donors) {
                    // The same donor moved on a round or more: no independent evidence (a
                    // liar's fabricated states link to each other), and no conflict either.
                    // Keep only its latest state, and its age, so that a lone honest donor is
                    // still accepted after the lone-state timeout while the group advances.
                    if c.round > o.round {
                        replaced.push(i);
                    } else {
                        stale = true;
                    }
                    continue;
                }
                let losers: Vec<PeerKey> = lo.donors.iter().copied().collect();
                adopt = Some((hi.clone(), losers));
                break;
            }
            conflicts.extend(o.donors.iter().copied());
        }
        if let Some((hi, losers)) = adopt {
            for p in losers {
                self.reject(
                    p,
                    "STATE",
                    Reject::BadDecision("state superseded by a later proven round"),
                );
            }
            self.adopt_state(hi);
            return;
        }
        if !conflicts.is_empty() {
            conflicts.push(from);
            conflicts.sort();
            conflicts.dedup();
            for p in conflicts {
                self.reject(
                    p,
                    "STATE",
                    Reject::BadDecision("donors disagree on the state"),
                );
            }
            // Ask someone else now rather than at the next retry.
            self.last_sync = None;
            self.request_state();
        }
        if stale {
            return;
        }
        for i in replaced.into_iter().rev() {
            let old = self.candidates.remove(i);
            c.since = c.since.min(old.since);
        }
        if self.candidates.len() >= MAX_STATE_CANDIDATES {
            // Keep the memory bounded: drop the oldest candidate.
            self.candidates.remove(0);
        }
        self.candidates.push(c);
    }

    /// Accepts a lone State that nobody contradicted within `LONE_STATE_RETRIES * retry`, once
    /// no request to another contact is still in flight (its answer could contradict it): a
    /// joiner's, or a restored peer's that trusts strangers ([`State::trusts_strangers`]).
    pub(super) fn lone_state_timeout(&mut self) {
        if (self.synced && !self.trusts_strangers())
            || self.candidates.len() != 1
            || self.state_requests_in_flight() > 0
        {
            return;
        }
        if self.now
            >= self.candidates[0]
                .since
                .saturating_add(LONE_STATE_RETRIES * self.cfg.retry)
        {
            if let Some(c) = self.candidates.pop() {
                self.adopt_state(c);
            }
        }
    }

    fn adopt_state(&mut self, c: StateCandidate) {
        let round = c.round;
        self.theta = c.theta;
        self.momentum = c.momentum;
        self.round = round;
        self.chain = c.next_chain;
        self.members = c.members;
        self.reset_heard();
        self.synced = true;
        self.state_wanted = false;
        self.carry = None;
        self.candidates.clear();
        self.state_asked.clear();
        self.sync_asked.clear();
        self.unconfirmed = None;
        self.reconfigs.clear();
        self.r = RoundState::default();
        self.future.clear();
        self.history.clear();
        self.history.push_back((round - 1, c.proof));
        self.out.push(OutEvent::Decided {
            round: round - 1,
            seal: c.seal,
            state: c.state,
        });
        if self.is_member() {
            self.out.push(OutEvent::Train { round });
        } else {
            self.gossip(self.join_body());
        }
    }
}

/// COMMIT signers, among the `n` members a SEAL lists for the next round, that a State's
/// decision proof must carry. The COMMITs are signed by the round's members, a quorum of them;
/// the SEAL may have added up to [`max_joins`] newcomers (who signed nothing yet), so the round
/// had at least `n - max_joins(n)` members and its quorum of that many is required.
pub(super) fn state_quorum(q: Quorum, n: usize) -> usize {
    q.size(n.saturating_sub(max_joins(n)).max(1))
}

/// Whether the later state `hi` extends the history of `lo` as far as a joiner can tell: more
/// than a third of `lo`'s members signed `hi`'s decision (membership changes slowly; a donor
/// controlling fewer than a third of the members cannot forge this).
fn linked(hi: &StateCandidate, lo: &StateCandidate) -> bool {
    vouched(&hi.signers, &lo.members)
}

/// Whether more than a third of `members` are among `signers` (then, with fewer than a third
/// of them dishonest, at least one honest member signed).
fn vouched(signers: &BTreeSet<PeerKey>, members: &[PeerKey]) -> bool {
    signed_by(signers, members) * 3 > members.len()
}

/// How many of the (sorted) `members` are among `signers`.
fn signed_by(signers: &BTreeSet<PeerKey>, members: &[PeerKey]) -> usize {
    signers
        .iter()
        .filter(|p| members.binary_search(p).is_ok())
        .count()
}

/// What [`State::check_decision`] established.
struct Decision {
    /// The decided round.
    round: u64,
    /// Hash of the decided SEAL.
    seal: Hash,
    /// The next round's members it names.
    members: Vec<PeerKey>,
    /// The members among them whose COMMITs verified.
    signers: BTreeSet<PeerKey>,
    /// The next round's chain.
    next_chain: Hash,
}

/// Another history of this run, as a verified decision proof shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RivalHistory {
    /// The round after the proven decision (at least that far along).
    pub round: u64,
    /// Members of that round.
    pub members: usize,
}

#[cfg(test)]
mod tests {
    //! [`State::check_rival`] case by case: what a peer claiming another history must prove,
    //! and the forgeries and relabellings it must not get away with.
    use super::*;
    use crate::averaging::{Config, InEvent, Quorum, Timer};
    use crate::wire::{Close, Envelope, Seal};
    use ed25519_dalek::SigningKey;
    use rand_chacha::rand_core::SeedableRng;

    const RUN: &[u8] = b"rival-test";

    fn keys(from: u8, n: u8) -> Vec<SigningKey> {
        let mut k: Vec<SigningKey> = (from..from + n)
            .map(|i| SigningKey::from_bytes(&[i; 32]))
            .collect();
        k.sort_by_key(PeerKey::of);
        k
    }

    fn cfg() -> Config {
        let mut cfg = Config::new(Hash::of(RUN), 8);
        cfg.quorum = Quorum::TwoThirds;
        cfg
    }

    fn genesis(k: &[SigningKey]) -> State {
        let members = k.iter().map(PeerKey::of).collect();
        State::genesis(cfg(), k[0].clone(), vec![0.0; 8], members)
    }

    /// The proof that `st` decided its round with a SEAL tagged `tag`, COMMITted by `signers`.
    fn proof(st: &State, signers: &[SigningKey], tag: u8) -> DecisionProof {
        proof_naming(st, signers, tag, st.members().to_vec())
    }

    /// [`proof`] with `next_members` as the SEAL's next member list.
    fn proof_naming(
        st: &State,
        signers: &[SigningKey],
        tag: u8,
        next_members: Vec<PeerKey>,
    ) -> DecisionProof {
        proof_of(st, signers, tag, next_members, Hash::of(b"state"))
    }

    /// [`proof_naming`] whose COMMITs name the state hash `state`.
    fn proof_of(
        st: &State,
        signers: &[SigningKey],
        tag: u8,
        next_members: Vec<PeerKey>,
        state: Hash,
    ) -> DecisionProof {
        let seal = Seal {
            close: Close {
                ballot: 0,
                contributors: Vec::new(),
            },
            close_id: Hash::of(&[tag]),
            shards: Vec::new(),
            next_members,
            joins: Vec::new(),
        };
        let sh = seal.hash();
        let body = Body::Seal(Propose {
            ballot: 0,
            seal,
            promises: Vec::new(),
        });
        let seal_env = Envelope::sign(&st.key, st.cfg.run, st.round, st.chain, body);
        let commit = Commit {
            ballot: 0,
            seal: sh,
            next_chain: Hash::of_parts(&[&st.chain.0, &sh.0]),
            state,
        };
        let commits = signers
            .iter()
            .map(|k| Envelope::sign(k, st.cfg.run, st.round, st.chain, Body::Commit(commit)))
            .collect();
        DecisionProof {
            seal: seal_env,
            commits,
            reconfigs: Vec::new(),
        }
    }

    /// A proof checked on its own (`check_decision`, what state adoption and fork choice rest
    /// on) names a sorted, distinct, non-empty next member list, and carries a bounded number
    /// of COMMITs (up to twice the members plus 8, copies included).
    #[test]
    fn a_proofs_member_list_and_commit_count_are_checked() {
        let ks = keys(1, 4);
        let st = genesis(&ks);
        assert!(st.check_decision(&proof(&st, &ks[..3], 1), None).is_ok());
        let m = st.members().to_vec();
        let mut unsorted = m.clone();
        unsorted.swap(0, 1);
        let mut twice = m.clone();
        twice[1] = twice[0];
        for (what, list) in [
            ("no", Vec::new()),
            ("unsorted", unsorted),
            ("repeated", twice),
        ] {
            assert_eq!(
                st.check_decision(&proof_naming(&st, &ks[..3], 1, list), None)
                    .err(),
                Some(Reject::BadDecision("member list")),
                "{what} members"
            );
        }
        let mut most = proof(&st, &ks[..3], 1);
        let extra = most.commits[0].clone();
        while most.commits.len() < 2 * m.len() + 8 {
            most.commits.push(extra.clone());
        }
        assert!(
            st.check_decision(&most, None).is_ok(),
            "the most COMMITs allowed"
        );
        most.commits.push(extra);
        assert_eq!(
            st.check_decision(&most, None).err(),
            Some(Reject::BadDecision("more COMMITs than members"))
        );
    }

    /// A State whose parameters or momentum are shorter than the model is refused for its
    /// length, whichever of the two is short.
    #[test]
    fn a_state_of_the_wrong_length_is_refused() {
        let ks = keys(1, 4);
        let st = genesis(&ks);
        let p = proof(&st, &ks[..3], 1);
        let q = codec::Quantization::F32;
        let (full, short) = (codec::encode(q, &[0.0; 8]), codec::encode(q, &[0.0; 7]));
        for (t, m) in [(&short, &full), (&full, &short)] {
            assert!(matches!(
                st.check_state(1, &p, t, m).err(),
                Some(Reject::WrongLength { .. })
            ));
        }
    }

    /// A State is the state after the round its proof decided: labelled with any other round
    /// it is refused, whatever else checks out.
    #[test]
    fn a_state_labelled_with_another_round_than_its_proof_is_refused() {
        let ks = keys(1, 4);
        let st = genesis(&ks);
        let q = codec::Quantization::F32;
        let (t, m) = (vec![0.5f32; 8], vec![0.25f32; 8]);
        let (te, me) = (codec::encode(q, &t), codec::encode(q, &m));
        let p = proof_of(&st, &ks[..3], 1, st.members().to_vec(), state_hash(&t, &m));
        assert_eq!(
            st.check_state(st.round + 1, &p, &te, &me)
                .map(|c| c.round)
                .ok(),
            Some(1)
        );
        for label in [st.round + 2, st.round + 7] {
            assert_eq!(
                st.check_state(label, &p, &te, &me).err(),
                Some(Reject::BadDecision("no matching COMMIT")),
                "labelled round {label}"
            );
        }
    }

    /// A proof checked on its own passes with exactly [`state_quorum`] of the next members'
    /// COMMITs and not with one fewer; with a state hash, only COMMITs of that state count.
    #[test]
    fn a_proof_needs_exactly_the_state_quorum_of_commits_of_that_state() {
        for n in [3u8, 4, 7, 10] {
            let ks = keys(1, n);
            let st = genesis(&ks);
            let q = state_quorum(st.cfg.quorum, ks.len());
            let sh = Hash::of(b"s");
            let exact = proof_of(&st, &ks[..q], 1, st.members().to_vec(), sh);
            assert!(
                st.check_decision(&exact, Some(sh)).is_ok(),
                "n = {n}, {q} signers"
            );
            assert!(st.check_decision(&exact, None).is_ok());
            assert_eq!(
                st.check_decision(&exact, Some(Hash::of(b"other"))).err(),
                Some(Reject::BadDecision("no matching COMMIT")),
                "n = {n}: COMMITs of another state"
            );
            let short = proof_of(&st, &ks[..q - 1], 1, st.members().to_vec(), sh);
            assert_eq!(
                st.check_decision(&short, Some(sh)).err(),
                Some(Reject::BadDecision("no quorum")),
                "n = {n}, {} signers",
                q - 1
            );
        }
    }

    /// More than a third of the members must be among the signers, whoever else signed.
    #[test]
    fn vouched_needs_more_than_a_third_of_the_members() {
        let m: Vec<PeerKey> = keys(1, 9).iter().map(PeerKey::of).collect();
        let outsiders: BTreeSet<PeerKey> = keys(40, 9).iter().map(PeerKey::of).collect();
        for k in 0..=m.len() {
            let mut signers: BTreeSet<PeerKey> = m[..k].iter().copied().collect();
            assert_eq!(signed_by(&signers, &m), k);
            signers.extend(outsiders.iter().copied());
            assert_eq!(signed_by(&signers, &m), k, "outsiders are not counted");
            assert_eq!(vouched(&signers, &m), k > 3, "{k} of 9 members");
        }
    }

    /// A member restored from a checkpoint older than the round that admitted the survivors
    /// holds a member list none of whom is left (real-socket seed: `b` back from round 4 of
    /// `{b, c}` while `a`, admitted in round 5, went on alone after a RECONFIG). Within the
    /// patience window it refuses the survivor's state (no member of its own signed it); after
    /// it the state is a candidate, taken once nobody contradicted it for the lone-state
    /// timeout, as a joiner takes one. A peer that no restart made doubt its members never
    /// takes such a state.
    #[test]
    fn a_restored_peer_whose_members_are_all_gone_takes_a_lone_survivors_state() {
        let (gone, survivor) = (keys(1, 2), keys(11, 1));
        let mut donor = genesis(&survivor);
        donor.round = 40;
        let q = codec::Quantization::F32;
        let (t, m) = (vec![0.5f32; 8], vec![0.25f32; 8]);
        let (te, me) = (codec::encode(q, &t), codec::encode(q, &m));
        let p = proof_of(
            &donor,
            &survivor,
            1,
            donor.members().to_vec(),
            state_hash(&t, &m),
        );
        let a = PeerKey::of(&survivor[0]);
        let members: Vec<PeerKey> = gone.iter().map(PeerKey::of).collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let patience = STATE_PATIENCE_RETRIES * cfg().retry;
        let lone = LONE_STATE_RETRIES * cfg().retry;
        for restored in [true, false] {
            let mut b = if restored {
                State::restore(
                    cfg(),
                    gone[0].clone(),
                    4,
                    Hash::of(b"c4"),
                    members.clone(),
                    vec![0.0; 8],
                    vec![0.0; 8],
                )
            } else {
                genesis(&gone)
            };
            b.round = 4;
            b.start(0);
            b.now = 10;
            b.maybe_sync(a);
            b.on_state(a, 41, &p, &te, &me);
            assert_eq!(b.round, 4, "refused within the patience window");
            assert!(b.candidates.is_empty());
            b.now = patience + 10;
            b.maybe_sync(a);
            b.on_state(a, 41, &p, &te, &me);
            assert_eq!(b.round, 4, "a lone donor is not taken at once");
            assert_eq!(b.candidates.len(), usize::from(restored));
            b.handle(
                patience + lone + 9,
                InEvent::Timer(Timer::Retry(4)),
                &mut rng,
            );
            assert_eq!(b.round, 4, "taken only after the lone-state timeout");
            b.handle(
                patience + lone + 10,
                InEvent::Timer(Timer::Retry(4)),
                &mut rng,
            );
            if restored {
                assert_eq!((b.round, b.members()), (41, &[a][..]));
                assert_eq!(b.theta, t);
            } else {
                assert_eq!(b.round, 4, "a confirmed peer keeps its members");
            }
        }
    }

    #[test]
    fn a_rival_history_proven_by_a_quorum_of_its_members_is_verified() {
        let (ours, theirs) = (keys(1, 3), keys(11, 4));
        let me = genesis(&ours);
        let rival = genesis(&theirs);
        // Both at round 0: two histories founded apart differ already in round 0's chain.
        assert_ne!(me.chain(), rival.chain());
        let p = proof(&rival, &theirs[..3], 1);
        assert_eq!(
            me.check_rival(&p),
            Ok(RivalHistory {
                round: 1,
                members: 4
            })
        );
        assert_eq!(me.rival_probe_round(5), Some(0));
        assert_eq!(me.rival_probe_round(0), None);
    }

    #[test]
    fn forged_short_foreign_or_relabelled_proofs_are_refused() {
        let (ours, theirs) = (keys(1, 3), keys(11, 4));
        let me = genesis(&ours);
        let rival = genesis(&theirs);
        let refused = |p: &DecisionProof| me.check_rival(p).map_err(|e| e.label());
        // Fewer signers than its own state quorum (of 4 members, up to two of them just
        // admitted: two).
        assert_eq!(
            refused(&proof(&rival, &theirs[..1], 1)),
            Err("bad_decision")
        );
        // Signers that are not the members the SEAL names (Sybils of the claimant).
        let sybils = keys(31, 3);
        assert_eq!(refused(&proof(&rival, &sybils, 1)), Err("bad_decision"));
        // A signature that does not verify.
        let mut p = proof(&rival, &theirs[..3], 1);
        p.commits[0].sig = p.commits[1].sig;
        p.commits[1].sig = p.commits[2].sig;
        assert_eq!(refused(&p), Err("bad_decision"));
        // Another run's proof.
        let mut other = genesis(&theirs);
        other.cfg.run = Hash::of(b"another run");
        assert_eq!(
            refused(&proof(&other, &theirs[..3], 1)),
            Err("bad_decision")
        );
        // Our own history under another founder: the chain is ours.
        assert_eq!(refused(&proof(&me, &ours, 1)), Err("bad_decision"));
        // An unsynced peer has nothing to compare with.
        let joiner = State::joiner(cfg(), ours[0].clone(), Vec::new());
        assert!(joiner.check_rival(&proof(&rival, &theirs[..3], 1)).is_err());
    }

    #[test]
    fn under_an_allowlist_a_rival_must_name_listed_members() {
        let (ours, theirs) = (keys(1, 3), keys(11, 4));
        let mut me = genesis(&ours);
        let mut list: Vec<PeerKey> = ours.iter().map(PeerKey::of).collect();
        list.sort();
        me.cfg.admission = Admission::Allowlist(list);
        let rival = genesis(&theirs);
        assert!(me.check_rival(&proof(&rival, &theirs[..3], 1)).is_err());
    }
}
