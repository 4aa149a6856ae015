//! Ballots and SEAL: the leader collects and fetches aggregates and seals one per shard; on
//! failover the next ballot's leader runs Paxos phase 1 (PREPARE / PROMISE); every peer checks
//! a SEAL before it applies it. Also the timers that drive all this (what each [`Timer`] does
//! when it fires) and the periodic retry (JOIN, missing envelopes and payloads, state
//! requests).

use std::collections::BTreeMap;
use std::sync::Arc;

use rand_chacha::rand_core::RngCore;

use crate::codec;
use crate::wire::{
    Accept, Agg, Body, Certificate, Close, Commit, Direct, Envelope, Hash, PeerKey, Promise,
    Propose, Seal, SealedShard, Signature,
};

use super::aggregate::{norm, norm_bound};
use super::{bit, max_joins, now_ge, Leading, Reject, Rule, State, Timer, BALLOT_EARLY};

impl State {
    pub(super) fn leader_progress(&mut self) {
        let Some(Leading::Collecting { close_id, .. }) = &self.r.leading else {
            return;
        };
        let close_id = *close_id;
        let k = self.k();
        let complete = (0..k as u32).all(|s| self.r.aggs.contains_key(&(close_id, s)));
        // Fetch every candidate we do not hold yet.
        let mut wanted = Vec::new();
        for s in 0..k as u32 {
            for (owner, a, _) in self.r.aggs.get(&(close_id, s)).into_iter().flatten() {
                if !self.store.contains_key(&a.data) && !self.r.fetch_pending.contains_key(&a.data)
                {
                    wanted.push((a.data, *owner));
                }
            }
        }
        for (h, owner) in wanted {
            self.r.fetch_pending.insert(h, (vec![owner], self.now));
            self.send(
                owner,
                Direct::Fetch {
                    round: self.round,
                    hash: h,
                },
            );
        }
        if complete && self.r.fetch_pending.is_empty() && self.audits_complete(close_id) {
            if let Some(Leading::Collecting { ballot, .. }) = self.r.leading {
                self.seal_deadline(ballot);
            }
        }
    }

    pub(super) fn seal_deadline(&mut self, ballot: u32) {
        let Some(Leading::Collecting {
            ballot: b,
            close_id,
        }) = &self.r.leading
        else {
            return;
        };
        if *b != ballot {
            return;
        }
        let close_id = *close_id;
        let Some(info) = self.r.closes.get(&close_id).cloned() else {
            return;
        };
        let k = self.k();
        let mut shards = Vec::with_capacity(k);
        for s in 0..k {
            let range = self.shard_range(s);
            let mut cands: Vec<(u64, usize, Hash, PeerKey, Agg, Signature)> = self
                .r
                .aggs
                .get(&(close_id, s as u32))
                .into_iter()
                .flatten()
                .map(|(p, a, sig)| {
                    let rank = info.owners[s]
                        .iter()
                        .position(|o| o == p)
                        .unwrap_or(usize::MAX);
                    (u64::MAX - a.weight, rank, a.data, *p, a.clone(), *sig)
                })
                .collect();
            cands.sort_by_key(|x| (x.0, x.1, x.2));
            let mut pick = None;
            for (_, _, h, p, a, sig) in cands {
                let Some((_, data)) = self.store.get(&h) else {
                    continue;
                };
                let Ok(v) = codec::decode(data, range.len()) else {
                    continue;
                };
                if v.len() != range.len() {
                    continue;
                }
                let claims = info
                    .close
                    .contributors
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| bit(&a.included, *i))
                    .map(|(_, c)| f32::from_bits(c.info.norm_bits));
                // A (weighted) mean is no longer than its longest input; a coordinate-wise
                // trimmed mean is bounded by the root of the sum of squared input norms.
                let max_in = match self.cfg.rule {
                    Rule::TrimmedMean { .. } => claims.map(|c| c * c).sum::<f32>().sqrt(),
                    _ => claims.fold(0f32, f32::max),
                };
                if norm(&v) > norm_bound(self.cfg.codec, max_in, v.len()) {
                    self.reject(
                        p,
                        "AGG",
                        Reject::NormTooLarge {
                            got: norm(&v),
                            bound: max_in,
                        },
                    );
                    continue;
                }
                if let Some(Err(why)) = self.audit_check(&info, close_id, s as u32, p, &a, &v) {
                    self.reject(p, "AGG", why);
                    continue;
                }
                pick = Some(SealedShard {
                    owner: p,
                    data: h,
                    included: a.included.clone(),
                    weight: a.weight,
                    sig,
                });
                break;
            }
            shards.push(pick);
        }
        let round = self.round;
        let evict = self.cfg.evict_after_rounds;
        let mut next: Vec<PeerKey> = self
            .members
            .iter()
            .filter(|p| {
                **p == self.me
                    || self
                        .last_heard
                        .get(p)
                        .is_some_and(|r| r.saturating_add(evict) > round)
            })
            .filter(|p| !self.verifier.banned.contains(p))
            .copied()
            .collect();
        // Contributors stay (acceptors refuse a SEAL evicting one: it was heard this round),
        // even one banned since the CLOSE; it cannot contribute again and goes next round.
        next.extend(info.close.contributors.iter().map(|c| c.peer));
        // Admission: at most `max_joins` newcomers a round, in an order no joiner can choose
        // (blake3 of chain and key: a fresh chain every round), so a flood of JOINs from
        // made-up keys cannot inflate the group and its quorum faster than silent members are
        // evicted, and honest joiners still get in.
        let mut joins: Vec<(Hash, PeerKey, Arc<Envelope>)> = self
            .r
            .joins
            .iter()
            .filter(|(p, _)| self.members.binary_search(p).is_err())
            .filter(|(p, _)| !self.verifier.banned.contains(p))
            .map(|(p, e)| (Hash::of_parts(&[&self.chain.0, &p.0]), *p, e.clone()))
            .collect();
        joins.sort_by_key(|(h, p, _)| (*h, *p));
        let bound = max_joins(self.members.len());
        if joins.len() > bound {
            // Refused for this round (reported once per round and key; an honest joiner
            // gossips its JOIN again and gets in later).
            let deferred: Vec<PeerKey> = joins[bound..].iter().map(|(_, p, _)| *p).collect();
            for p in deferred {
                if self.r.joins_deferred.insert(p) {
                    self.reject(
                        p,
                        "JOIN",
                        Reject::NotAllowed("JOIN over this round's admission bound (max_joins)"),
                    );
                }
            }
        }
        joins.truncate(bound);
        joins.sort_by_key(|(_, p, _)| *p);
        next.extend(joins.iter().map(|(_, p, _)| *p));
        next.sort();
        next.dedup();
        let seal = Seal {
            close: info.close,
            close_id,
            shards,
            next_members: next,
            joins: joins.into_iter().map(|(_, _, e)| (*e).clone()).collect(),
        };
        self.r.leading = Some(Leading::Proposed);
        let promises = if ballot == 0 {
            Vec::new()
        } else {
            std::mem::take(&mut self.r.justification)
        };
        self.gossip(Body::Seal(Propose {
            ballot,
            seal,
            promises,
        }));
    }

    /// The highest ballot this peer promises or accepts now. Ballot `b`'s leader starts
    /// `b * attempt_timeout` after the round's first READY (the `Attempt` timers); this peer
    /// accepts ballot `b` from `1 / BALLOT_EARLY` of a slot before its own clock reaches that
    /// time (peers see the first READY at slightly different times), or once `n − quorum + 1`
    /// members promised a ballot at least that high (one of them is honest unless the run has
    /// more faults than it tolerates, and an honest member promises only what its clock or
    /// this same evidence allowed): a peer that entered the round late, say restarted from
    /// its checkpoint, catches up with the leaders' ballots instead of refusing them forever.
    /// Without the bound one PREPARE near `u32::MAX` from a member that leads it takes every
    /// peer's promise, no honest ballot can pass it, and the round never decides; with it a
    /// malicious leader holds at most its own slots.
    pub(super) fn ballot_bound(&mut self) -> u32 {
        self.note_reference();
        let t = self.cfg.attempt_timeout.max(1);
        let since = self
            .now
            .saturating_sub(self.r.reference.unwrap_or(self.now));
        let slot = since.saturating_add(t / BALLOT_EARLY) / t;
        let clock = u32::try_from(slot).unwrap_or(u32::MAX);
        let k = self.members.len().saturating_sub(self.quorum()) + 1;
        let mut seen: Vec<u32> = self.r.promised_by.values().copied().collect();
        seen.sort_unstable_by(|a, b| b.cmp(a));
        clock.max(seen.get(k - 1).copied().unwrap_or(0))
    }

    /// Promises the PREPAREs refused as early that the evidence now allows, lowest first.
    fn retry_ahead(&mut self) {
        if self.r.ahead.is_empty() {
            return;
        }
        let bound = self.ballot_bound();
        let mut due: Vec<(u32, PeerKey)> = self
            .r
            .ahead
            .iter()
            .filter(|(_, b)| **b <= bound)
            .map(|(p, b)| (*b, *p))
            .collect();
        due.sort_unstable();
        for (b, p) in due {
            self.r.ahead.remove(&p);
            self.on_prepare(p, b);
        }
    }

    pub(super) fn on_prepare(&mut self, signer: PeerKey, b: u32) {
        if Some(signer) != self.leader(b) {
            self.reject(signer, "PREPARE", Reject::NotAllowed("PREPARE"));
            return;
        }
        let bound = self.ballot_bound();
        if b > bound {
            if self.r.ahead.get(&signer).is_none_or(|x| *x < b) {
                self.r.ahead.insert(signer, b);
            }
            self.reject(signer, "PREPARE", Reject::BallotAhead { ballot: b, bound });
            return;
        }
        if b > self.r.promised && self.may_vote() {
            self.r.promised = b;
            let prepared = self.r.prepared.clone();
            self.gossip(Body::Promise(Promise {
                ballot: b,
                prepared,
            }));
        }
    }

    pub(super) fn on_promise(&mut self, env: Arc<Envelope>, p: &Promise) {
        let signer = env.signer;
        if self.members.binary_search(&signer).is_ok() {
            let seen = self.r.promised_by.entry(signer).or_insert(0);
            if p.ballot > *seen {
                *seen = p.ballot;
                self.retry_ahead();
            }
        }
        let Some(Leading::Preparing { ballot, .. }) = &self.r.leading else {
            return;
        };
        if p.ballot != *ballot {
            return;
        }
        // A PROMISE whose certificate does not verify would make this leader's SEAL one that
        // every acceptor refuses: reported, not counted.
        if let Some(c) = &p.prepared {
            if let Err(why) = self.check_certificate(c, p.ballot) {
                self.reject(signer, "PROMISE", Reject::Malformed(why));
                return;
            }
        }
        if let Some(Leading::Preparing { promises, .. }) = &mut self.r.leading {
            promises.insert(signer, env);
        }
        self.finish_prepare();
    }

    /// With a quorum of valid PROMISEs for the ballot it leads, the leader re-proposes the SEAL
    /// of the highest certificate among them (it must hold that SEAL; if it does not, it
    /// waits for it: [`State::on_seal`] calls this again) or, with none certified, closes the
    /// round afresh under its ballot. Either way its SEAL carries the PROMISEs.
    pub(super) fn finish_prepare(&mut self) {
        let q = self.quorum();
        let Some(Leading::Preparing { ballot, promises }) = &self.r.leading else {
            return;
        };
        if promises.len() < q {
            return;
        }
        let ballot = *ballot;
        let best = promises
            .values()
            .filter_map(|e| match &e.body {
                Body::Promise(p) => p.prepared.as_ref().map(|c| (c.ballot, c.seal)),
                _ => None,
            })
            .max();
        let justification: Vec<Envelope> = promises.values().map(|e| (**e).clone()).collect();
        match best {
            Some((_, h)) => {
                let Some(seal) = self.r.proposals.values().find_map(|e| match &e.body {
                    Body::Seal(p) if p.seal.hash() == h => Some(p.seal.clone()),
                    _ => None,
                }) else {
                    return;
                };
                self.r.leading = Some(Leading::Proposed);
                self.gossip(Body::Seal(Propose {
                    ballot,
                    seal,
                    promises: justification,
                }));
            }
            None => {
                self.r.leading = None;
                self.r.justification = justification;
                self.do_close(ballot);
            }
        }
    }

    pub(super) fn on_seal(&mut self, env: Arc<Envelope>, ballot: u32) {
        let Body::Seal(p) = &env.body else { return };
        if Some(env.signer) != self.leader(ballot) {
            self.reject(env.signer, "SEAL", Reject::NotAllowed("SEAL"));
            return;
        }
        let bound = self.ballot_bound();
        if ballot > bound {
            self.reject(env.signer, "SEAL", Reject::BallotAhead { ballot, bound });
            return;
        }
        if let Err(why) = self.check_seal(&p.seal, ballot) {
            self.reject(env.signer, "SEAL", Reject::Malformed(why));
            return;
        }
        if let Err(why) = self.check_justification(p) {
            self.reject(env.signer, "SEAL", Reject::Malformed(why));
            return;
        }
        // A SEAL its PROMISEs show certified was already accepted by a quorum: it must stay
        // acceptable whatever this peer's view (refusing it could stall the round for good).
        let certified = p
            .promises
            .iter()
            .any(|e| matches!(&e.body, Body::Promise(pr) if pr.prepared.is_some()));
        if !certified {
            if let Err(why) = self.check_evictions(&p.seal) {
                self.reject(env.signer, "SEAL", Reject::Malformed(why));
                return;
            }
        }
        self.r.proposals.insert(ballot, env.clone());
        self.finish_prepare();
        if ballot < self.r.promised {
            return;
        }
        self.start_apply(env);
    }

    /// Votes ACCEPT for a valid SEAL under `ballot` once this peer has applied it (so it
    /// holds, and serves, every sealed aggregate: a certified SEAL, which later leaders must
    /// re-propose, is never one whose data is lost): at most one SEAL per ballot, never under
    /// a ballot below this peer's promise, never in a round it may have voted in before a
    /// restart.
    pub(super) fn accept(&mut self, ballot: u32, seal: Hash) {
        if !self.is_member()
            || !self.may_vote()
            || ballot < self.r.promised
            || self.r.accepted.is_some_and(|(b, _)| b >= ballot)
        {
            return;
        }
        self.r.promised = ballot;
        self.r.accepted = Some((ballot, seal));
        self.gossip(Body::Accept(Accept { ballot, seal }));
    }

    /// A member's ACCEPT: counted towards that SEAL's certificate; with a quorum this peer
    /// holds the certificate and may COMMIT the SEAL once it has applied it.
    pub(super) fn on_accept(&mut self, env: &Envelope, a: Accept) {
        let bound = self.ballot_bound();
        if a.ballot > bound {
            self.reject(
                env.signer,
                "ACCEPT",
                Reject::BallotAhead {
                    ballot: a.ballot,
                    bound,
                },
            );
            return;
        }
        let q = self.quorum();
        let votes = self.r.accepts.entry((a.ballot, a.seal)).or_default();
        votes.insert(env.signer, env.sig);
        if votes.len() < q
            || self
                .r
                .prepared
                .as_ref()
                .is_some_and(|c| c.ballot >= a.ballot)
        {
            return;
        }
        let votes: Vec<(PeerKey, Signature)> = votes.iter().map(|(p, s)| (*p, *s)).collect();
        for v in &votes {
            self.r.votes_checked.insert(vote_key(a.ballot, a.seal, v));
        }
        self.r.prepared = Some(Certificate {
            ballot: a.ballot,
            seal: a.seal,
            votes,
        });
        self.maybe_commit(a.ballot, a.seal);
    }

    /// Checks a certificate carried by a PROMISE for `ballot`: under a lower ballot, at least
    /// a quorum of distinct members (sorted), every signature theirs over the round's ACCEPT.
    pub(super) fn check_certificate(
        &mut self,
        c: &Certificate,
        ballot: u32,
    ) -> Result<(), &'static str> {
        if c.ballot >= ballot {
            return Err("a certificate under a ballot not below the PROMISE's");
        }
        if c.votes.len() < self.quorum() || c.votes.len() > self.members.len() {
            return Err("a certificate without a quorum");
        }
        if !c.votes.windows(2).all(|w| w[0].0 < w[1].0) {
            return Err("a certificate with unsorted or repeated votes");
        }
        for vote in &c.votes {
            if self.members.binary_search(&vote.0).is_err() {
                return Err("a certificate with a non-member's vote");
            }
            // Keyed by the signature bytes too: a vote known to be genuine does not vouch for
            // other bytes claimed to be its signature (which peers without the cache refuse).
            let key = vote_key(c.ballot, c.seal, vote);
            if self.r.votes_checked.contains(&key) {
                continue;
            }
            if !c
                .vote_envelope(self.cfg.run, self.round, self.chain, *vote)
                .verify_signature()
            {
                return Err("a certificate with a bad signature");
            }
            if self.r.votes_checked.len() < 1 << 16 {
                self.r.votes_checked.insert(key);
            }
        }
        Ok(())
    }

    /// Checks that a proposal under ballot > 0 follows from a quorum of signed PROMISEs for
    /// its ballot (this round, distinct members, sorted by signer) and re-proposes the SEAL of
    /// the highest certificate among them, if any (Paxos' rule, checked by every acceptor
    /// rather than trusted to the leader). A proposal under ballot 0 carries no PROMISEs.
    pub(super) fn check_justification(&mut self, p: &Propose) -> Result<(), &'static str> {
        if p.ballot == 0 {
            return if p.promises.is_empty() {
                Ok(())
            } else {
                Err("PROMISEs under ballot 0")
            };
        }
        if p.promises.len() < self.quorum() || p.promises.len() > self.members.len() {
            return Err("a SEAL without a quorum of PROMISEs");
        }
        if !p.promises.windows(2).all(|w| w[0].signer < w[1].signer) {
            return Err("PROMISEs unsorted or repeated");
        }
        let mut best: Option<(u32, Hash)> = None;
        for e in &p.promises {
            let Body::Promise(pr) = &e.body else {
                return Err("a justification that is no PROMISE");
            };
            if pr.ballot != p.ballot
                || e.run != self.cfg.run
                || e.round != self.round
                || e.chain != self.chain
                || self.members.binary_search(&e.signer).is_err()
                || !e.verify_signature()
            {
                return Err("a PROMISE of another ballot, round or signer");
            }
            if let Some(c) = &pr.prepared {
                self.check_certificate(c, p.ballot)?;
                match best {
                    Some((b, h)) if b == c.ballot && h != c.seal => {
                        return Err("two certificates under one ballot");
                    }
                    Some((b, _)) if b >= c.ballot => {}
                    _ => best = Some((c.ballot, c.seal)),
                }
            }
        }
        match best {
            Some((_, h)) if h != p.seal.hash() => Err("a SEAL that is not the certified one"),
            _ => Ok(()),
        }
    }

    /// COMMITs `(ballot, seal)` once this peer has applied the SEAL and holds its certificate,
    /// under a ballot not below its promise, once per ballot.
    pub(super) fn maybe_commit(&mut self, ballot: u32, seal: Hash) {
        if !self.is_member()
            || !self.may_vote()
            || ballot < self.r.promised
            || self.r.committed.is_some_and(|b| b >= ballot)
            || self
                .r
                .accepts
                .get(&(ballot, seal))
                .is_none_or(|v| v.len() < self.quorum())
        {
            return;
        }
        let Some(t) = self.r.tentative.get(&seal) else {
            return;
        };
        let (state, next_chain) = (t.state, t.next_chain);
        self.r.promised = ballot;
        self.r.committed = Some(ballot);
        self.gossip(Body::Commit(Commit {
            ballot,
            seal,
            next_chain,
            state,
        }));
    }

    /// Checks a SEAL proposed under `ballot` against what its inputs' signers signed, the
    /// same way at every peer of the round: the CLOSE (its id, made by the leader of its
    /// ballot, not above `ballot`) lists members' READYs with their signatures and bounded
    /// norm claims; each sealed shard comes from one of its designated owners, whose AGG
    /// signature it carries, includes only contributors, at least one, and claims exactly
    /// their capped weights; the next member list keeps every contributor and adds only
    /// newcomers whose signed JOINs the run's policy admits, at most `max_joins` of them.
    pub(super) fn check_seal(&self, seal: &Seal, ballot: u32) -> Result<(), &'static str> {
        let close = &seal.close;
        let n = close.contributors.len();
        if seal.shards.len() != self.k() {
            return Err("shard count");
        }
        if close.ballot > ballot {
            return Err("a CLOSE of a later ballot");
        }
        self.check_contributors(close)?;
        let Some(closer) = self.leader(close.ballot) else {
            return Err("contributors");
        };
        let close_id = Hash::of(&Envelope::signing_bytes(
            &closer,
            &self.cfg.run,
            self.round,
            &self.chain,
            &Body::Close(close.clone()),
        ));
        if seal.close_id != close_id {
            return Err("a CLOSE id that is not its CLOSE's");
        }
        let owners = match self.r.closes.get(&close_id) {
            Some(info) => info.owners.clone(),
            None => self.close_owners(close),
        };
        for (s, shard) in seal.shards.iter().enumerate() {
            let Some(shard) = shard else { continue };
            if shard.included.len() != n.div_ceil(8)
                || (n..shard.included.len() * 8).any(|i| bit(&shard.included, i))
            {
                return Err("bitmap");
            }
            if !owners.get(s).is_some_and(|o| o.contains(&shard.owner)) {
                return Err("a shard of no designated owner");
            }
            let included: Vec<usize> = (0..n).filter(|i| bit(&shard.included, *i)).collect();
            let weight = included
                .iter()
                .map(|i| self.weight(close.contributors[*i].info.tokens))
                .fold(0u64, u64::saturating_add);
            if included.is_empty() || weight != shard.weight {
                return Err("a shard's weight is not its contributors'");
            }
            let known = self.r.aggs.get(&(close_id, s as u32)).is_some_and(|l| {
                l.iter().any(|(o, a, sig)| {
                    *o == shard.owner
                        && a.data == shard.data
                        && a.included == shard.included
                        && a.weight == shard.weight
                        && *sig == shard.sig
                })
            });
            if !known
                && !shard
                    .agg_envelope(self.cfg.run, self.round, self.chain, close_id, s as u32)
                    .verify_signature()
            {
                return Err("a shard without its owner's signed AGG");
            }
        }
        if seal.next_members.is_empty() || !seal.next_members.windows(2).all(|w| w[0] < w[1]) {
            return Err("member list");
        }
        // A contributor was heard this round: no rule evicts it.
        if close
            .contributors
            .iter()
            .any(|c| seal.next_members.binary_search(&c.peer).is_err())
        {
            return Err("a contributor evicted");
        }
        let newcomers: Vec<&PeerKey> = seal
            .next_members
            .iter()
            .filter(|p| self.members.binary_search(p).is_err())
            .collect();
        if newcomers.len() > max_joins(self.members.len()) {
            return Err("more newcomers than a round admits");
        }
        // Every newcomer asked to join, in a JOIN of its own that the run's policy admits.
        let mut joins = seal.joins.iter();
        for p in newcomers {
            let Some(j) = joins.next() else {
                return Err("a newcomer without its JOIN");
            };
            let Body::Join(join) = &j.body else {
                return Err("a newcomer without its JOIN");
            };
            if j.signer != *p
                || j.run != self.cfg.run
                || j.round > self.round
                || j.round.saturating_add(crate::wire::JOIN_WINDOW) < self.round
                || !j.verify_signature()
            {
                return Err("a newcomer without its JOIN");
            }
            self.cfg
                .admission
                .admits(self.cfg.run, *p, join, &self.members)?;
        }
        if joins.next().is_some() {
            return Err("a JOIN of no newcomer");
        }
        Ok(())
    }

    /// Checks a CLOSE's contributor list: sorted, distinct members of this round, none with a
    /// norm claim its READY could not have carried, each entry the id and signature of a READY
    /// its contributor signed (not checked again for READYs this peer received itself).
    pub(super) fn check_contributors(&self, close: &Close) -> Result<(), &'static str> {
        let c = &close.contributors;
        if c.is_empty() || !c.windows(2).all(|w| w[0].peer < w[1].peer) {
            return Err("contributors");
        }
        for x in c {
            if self.members.binary_search(&x.peer).is_err() {
                return Err("a contributor that is no member");
            }
            let claim = f32::from_bits(x.info.norm_bits);
            if !(claim >= 0.0 && claim <= self.cfg.norm_cap) {
                return Err("a contributor's norm claim out of bounds");
            }
            let known = self
                .r
                .readies
                .get(&x.peer)
                .is_some_and(|(id, r, sig)| (*id, r, *sig) == (x.ready, &x.info, x.sig));
            if known {
                continue;
            }
            let env = x.ready_envelope(self.cfg.run, self.round, self.chain);
            if env.id() != x.ready || !env.verify_signature() {
                return Err("a contributor without its signed READY");
            }
        }
        Ok(())
    }

    /// The acceptor's own view of evictions, checked before it votes (never on a decided
    /// SEAL): a member this peer heard from more recently than an honest leader could have
    /// missed it for `evict_after_rounds` rounds (two rounds of slack for gossip delays) is
    /// not silent, and a SEAL evicting it is a leader dropping members it chose.
    pub(super) fn check_evictions(&self, seal: &Seal) -> Result<(), &'static str> {
        let evict = self.cfg.evict_after_rounds;
        let heard = |p: &PeerKey| {
            self.last_heard
                .get(p)
                .is_some_and(|r| r.saturating_add(evict) > self.round.saturating_add(1))
        };
        let dropped = self
            .members
            .iter()
            .filter(|p| seal.next_members.binary_search(p).is_err());
        for p in dropped {
            if heard(p) && !self.verifier.banned.contains(p) {
                return Err("a member evicted that is not silent");
            }
        }
        Ok(())
    }

    pub(super) fn on_timer(&mut self, t: Timer, rng: &mut dyn RngCore) {
        match t {
            Timer::Straggler(r)
                if r == self.round
                    && self.r.leading.is_none()
                    && self.leader(0) == Some(self.me) =>
            {
                if self.r.readies.is_empty() {
                    self.set_timer(self.now + self.cfg.straggler_timeout, Timer::Straggler(r));
                } else {
                    self.do_close(0);
                }
            }
            Timer::OwnerDeadline(r) if r == self.round => {
                let keys: Vec<(Hash, u32)> = self.r.owned.keys().copied().collect();
                for (c, s) in keys {
                    self.maybe_finish_shard(c, s, true);
                }
            }
            Timer::BackupCheck(r) if r == self.round => self.backup_check(),
            Timer::AuditFlush(r) if r == self.round => self.flush_audits(),
            Timer::SealDeadline(r, b) if r == self.round => self.seal_deadline(b),
            Timer::Attempt(r, b) if r == self.round => {
                let n = self.members.len().max(1) as u32;
                self.set_timer(
                    self.now + u64::from(n) * self.cfg.attempt_timeout,
                    Timer::Attempt(r, b.saturating_add(n)),
                );
                if self.r.decide_target.is_none() && self.leader(b) == Some(self.me) {
                    self.r.leading = Some(Leading::Preparing {
                        ballot: b,
                        promises: BTreeMap::new(),
                    });
                    self.gossip(Body::Prepare(b));
                }
            }
            Timer::Retry(_) => {
                let round = self.round;
                self.set_timer(self.now + self.cfg.retry, Timer::Retry(round));
                self.retry(rng);
            }
            _ => {}
        }
    }

    fn retry(&mut self, rng: &mut dyn RngCore) {
        if !self.synced {
            self.lone_state_timeout();
            if !self.synced {
                self.request_state();
            }
            return;
        }
        // A restored peer that waited for its own members in vain treats states as a joiner
        // does, the lone-state timeout included: when every member of its stale list is gone
        // (say its checkpoint predates the round that admitted the survivors), one survivor's
        // uncontradicted state is all it will ever be offered.
        if self.trusts_strangers() {
            self.lone_state_timeout();
        }
        if !self.is_member() {
            self.gossip(self.join_body());
        }
        // Until the reconfigured round is decided, its RECONFIGs go out again every retry
        // period: a survivor that missed them, or a member found lost that comes back from its
        // checkpoint, would otherwise go on in the replaced instance.
        if !self.reconfigs.is_empty() && self.r.decide_target.is_none() {
            self.regossip_reconfigs();
        }
        // Re-ask for announced envelopes still missing: the signer first, then random members
        // (everyone who fetched one serves it too).
        let (t_now, t_retry) = (self.now, self.cfg.retry);
        let mut stale: Vec<(Hash, PeerKey, u64)> = self
            .announced
            .iter_mut()
            .filter(|(_, (_, t))| now_ge(t_now, *t, t_retry))
            .map(|(h, (a, t))| {
                *t = t_now;
                (*h, a.signer, a.round)
            })
            .collect();
        stale.sort(); // HashMap order is not deterministic; the simulator's traces must be
        for (hash, signer, round) in stale {
            let to = if self.members.is_empty() || rng.next_u32().is_multiple_of(2) {
                signer
            } else {
                self.members[rng.next_u32() as usize % self.members.len()]
            };
            self.send(to, Direct::FetchEnvelope { round, hash });
        }
        // Re-ask for payloads still missing, rotating through the known holders.
        let now = self.now;
        let retry = self.cfg.retry;
        let pending: Vec<(Hash, Vec<PeerKey>)> = self
            .r
            .fetch_pending
            .iter_mut()
            .filter(|(_, (_, t))| now >= *t + retry)
            .map(|(h, (v, t))| {
                *t = now;
                (*h, v.clone())
            })
            .collect();
        for (h, sources) in pending {
            if sources.is_empty() {
                continue;
            }
            let to = sources[(rng.next_u32() as usize) % sources.len()];
            self.send(
                to,
                Direct::Fetch {
                    round: self.round,
                    hash: h,
                },
            );
        }
    }
}

/// The key of one ACCEPT vote in `RoundState::votes_checked`: ballot, SEAL, signer and the
/// signature's bytes.
fn vote_key(ballot: u32, seal: Hash, (signer, sig): &(PeerKey, Signature)) -> Hash {
    Hash::of_parts(&[&ballot.to_le_bytes(), &seal.0, &signer.0, &sig.0])
}

#[cfg(test)]
mod seal_tests;

#[cfg(test)]
mod paxos_tests;

#[cfg(test)]
mod tests {
    //! The acceptors' checks of a SEAL's justification, case by case: every field of every
    //! PROMISE and certificate that could be forged, replayed from elsewhere or repeated.
    use super::*;
    use crate::averaging::{Config, Quorum};
    use crate::wire::Close;
    use ed25519_dalek::SigningKey;

    const RUN: &[u8] = b"justification-test";

    /// Four members under `two-thirds` (quorum 3), the state of the first, and a fifth key
    /// that is no member.
    fn setup() -> (Vec<SigningKey>, SigningKey, State) {
        let mut keys: Vec<SigningKey> = (1..=4u8)
            .map(|i| SigningKey::from_bytes(&[i; 32]))
            .collect();
        keys.sort_by_key(PeerKey::of);
        let members: Vec<PeerKey> = keys.iter().map(PeerKey::of).collect();
        let mut cfg = Config::new(Hash::of(RUN), 64);
        cfg.quorum = Quorum::TwoThirds;
        let st = State::genesis(cfg, keys[0].clone(), vec![0.0; 64], members);
        (keys, SigningKey::from_bytes(&[9; 32]), st)
    }

    fn seal(tag: u8) -> Seal {
        Seal {
            close: Close {
                ballot: 0,
                contributors: Vec::new(),
            },
            close_id: Hash::of(&[tag]),
            shards: Vec::new(),
            next_members: Vec::new(),
            joins: Vec::new(),
        }
    }

    /// A leader may drop only members this acceptor has not heard from for about
    /// `evict_after_rounds` rounds (or banned ones); one heard lately is not silent.
    #[test]
    fn a_seal_evicting_a_member_heard_lately_is_refused() {
        let (keys, _, mut st) = setup();
        let gone = PeerKey::of(&keys[3]);
        let mut s = seal(1);
        s.next_members = st.members.clone();
        assert_eq!(st.check_evictions(&s), Ok(()));
        s.next_members.retain(|p| *p != gone);
        st.round = 10;
        st.last_heard.insert(gone, 9);
        assert_eq!(
            st.check_evictions(&s),
            Err("a member evicted that is not silent")
        );
        // An honest leader evicts what it last heard in round 10 − evict or before; heard
        // one round after that, the member may still have been silent to the leader.
        st.last_heard
            .insert(gone, 10 + 1 - st.cfg.evict_after_rounds);
        assert_eq!(st.check_evictions(&s), Ok(()));
        st.last_heard
            .insert(gone, 10 + 2 - st.cfg.evict_after_rounds);
        assert!(st.check_evictions(&s).is_err());
        st.last_heard.remove(&gone);
        assert_eq!(st.check_evictions(&s), Ok(()));
        st.last_heard.insert(gone, 10);
        st.verifier.banned.insert(gone);
        assert_eq!(st.check_evictions(&s), Ok(()));
    }

    fn promise(
        st: &State,
        key: &SigningKey,
        ballot: u32,
        prepared: Option<Certificate>,
    ) -> Envelope {
        let body = Body::Promise(Promise { ballot, prepared });
        Envelope::sign(key, st.cfg.run, st.round, st.chain, body)
    }

    /// A certificate of `seal` under `ballot`, voted by `keys` (sorted by signer).
    fn cert(st: &State, keys: &[&SigningKey], ballot: u32, seal: Hash) -> Certificate {
        let mut votes: Vec<(PeerKey, Signature)> = keys
            .iter()
            .map(|k| {
                let e = Envelope::sign(
                    k,
                    st.cfg.run,
                    st.round,
                    st.chain,
                    Body::Accept(Accept { ballot, seal }),
                );
                (e.signer, e.sig)
            })
            .collect();
        votes.sort_by_key(|v| v.0);
        Certificate {
            ballot,
            seal,
            votes,
        }
    }

    fn check(
        st: &mut State,
        ballot: u32,
        seal: Seal,
        mut promises: Vec<Envelope>,
    ) -> Result<(), &'static str> {
        promises.sort_by_key(|e| e.signer);
        st.check_justification(&Propose {
            ballot,
            seal,
            promises,
        })
    }

    #[test]
    fn a_quorum_of_valid_promises_justifies_a_fresh_seal_and_fewer_do_not() {
        let (k, _, mut st) = setup();
        let p: Vec<Envelope> = k[..3].iter().map(|x| promise(&st, x, 1, None)).collect();
        assert_eq!(check(&mut st, 1, seal(1), p.clone()), Ok(()));
        assert!(check(&mut st, 1, seal(1), p[..2].to_vec()).is_err());
        assert!(
            check(&mut st, 0, seal(1), p.clone()).is_err(),
            "ballot 0 carries none"
        );
        assert_eq!(check(&mut st, 0, seal(1), Vec::new()), Ok(()));
        // The same member twice is one promise, however many copies.
        let twice = vec![p[0].clone(), p[0].clone(), p[1].clone()];
        assert!(check(&mut st, 1, seal(1), twice).is_err());
        // Unsorted.
        let mut unsorted = p.clone();
        unsorted.sort_by_key(|e| std::cmp::Reverse(e.signer));
        let r = st.check_justification(&Propose {
            ballot: 1,
            seal: seal(1),
            promises: unsorted,
        });
        assert!(r.is_err());
    }

    #[test]
    fn every_field_of_a_promise_is_checked() {
        let (k, outsider, mut st) = setup();
        let good = |st: &State| -> Vec<Envelope> {
            k[..2].iter().map(|x| promise(st, x, 1, None)).collect()
        };
        let (run, round, chain) = (st.cfg.run, st.round, st.chain);
        let body = |b| {
            Body::Promise(Promise {
                ballot: b,
                prepared: None,
            })
        };
        let bad = [
            (
                "another ballot",
                Envelope::sign(&k[2], run, round, chain, body(2)),
            ),
            (
                "another run",
                Envelope::sign(&k[2], Hash::of(b"x"), round, chain, body(1)),
            ),
            (
                "another round",
                Envelope::sign(&k[2], run, round + 1, chain, body(1)),
            ),
            (
                "another chain",
                Envelope::sign(&k[2], run, round, Hash::of(b"x"), body(1)),
            ),
            (
                "a non-member",
                Envelope::sign(&outsider, run, round, chain, body(1)),
            ),
            ("a bad signature", {
                let mut e = Envelope::sign(&k[2], run, round, chain, body(1));
                e.sig.0[0] ^= 1;
                e
            }),
            (
                "no PROMISE",
                Envelope::sign(&k[2], run, round, chain, Body::Prepare(1)),
            ),
        ];
        for (what, e) in bad {
            let mut p = good(&st);
            p.push(e);
            assert!(
                check(&mut st, 1, seal(1), p).is_err(),
                "a PROMISE of {what} was counted"
            );
        }
    }

    #[test]
    fn the_seal_must_be_the_one_the_highest_certificate_names() {
        let (k, _, mut st) = setup();
        let (a, b) = (seal(1), seal(2));
        let ca = cert(&st, &[&k[0], &k[1], &k[2]], 0, a.hash());
        let cb = cert(&st, &[&k[1], &k[2], &k[3]], 1, b.hash());
        // One certificate: only its SEAL.
        let one = |st: &State| {
            vec![
                promise(st, &k[0], 2, Some(ca.clone())),
                promise(st, &k[1], 2, None),
                promise(st, &k[2], 2, None),
            ]
        };
        let p = one(&st);
        assert_eq!(check(&mut st, 2, a.clone(), p.clone()), Ok(()));
        assert!(check(&mut st, 2, b.clone(), p).is_err());
        // Two certificates under different ballots, in either order: the higher wins.
        for (x, y) in [(0, 1), (1, 0)] {
            let certs = [Some(ca.clone()), Some(cb.clone())];
            let p = vec![
                promise(&st, &k[x], 2, certs[0].clone()),
                promise(&st, &k[y], 2, certs[1].clone()),
                promise(&st, &k[3], 2, None),
            ];
            assert_eq!(
                check(&mut st, 2, b.clone(), p.clone()),
                Ok(()),
                "order {x}{y}"
            );
            assert!(check(&mut st, 2, a.clone(), p).is_err(), "order {x}{y}");
        }
        // Two certificates under one ballot (impossible with fewer than a third dishonest):
        // refused whichever SEAL is proposed.
        let ca1 = cert(&st, &[&k[0], &k[1], &k[2]], 1, a.hash());
        let p = vec![
            promise(&st, &k[0], 2, Some(ca1)),
            promise(&st, &k[1], 2, Some(cb.clone())),
            promise(&st, &k[3], 2, None),
        ];
        assert!(check(&mut st, 2, a.clone(), p.clone()).is_err());
        assert!(check(&mut st, 2, b.clone(), p).is_err());
    }

    #[test]
    fn every_vote_of_a_certificate_is_checked() {
        let (k, outsider, mut st) = setup();
        let a = seal(1);
        let h = a.hash();
        let valid = cert(&st, &[&k[0], &k[1], &k[2]], 0, h);
        assert_eq!(st.check_certificate(&valid, 1), Ok(()));
        let mut bad = vec![
            ("too few votes", cert(&st, &[&k[0], &k[1]], 0, h)),
            (
                "a non-member's vote",
                cert(&st, &[&k[0], &k[1], &outsider], 0, h),
            ),
            (
                "a ballot not below the PROMISE's",
                cert(&st, &[&k[0], &k[1], &k[2]], 1, h),
            ),
        ];
        let mut repeated = valid.clone();
        repeated.votes = vec![valid.votes[0]; 3];
        bad.push(("one vote three times", repeated));
        let mut forged = valid.clone();
        forged.votes[2].1 = forged.votes[0].1;
        bad.push(("a signature not the signer's", forged));
        let mut unsorted = valid.clone();
        unsorted.votes.reverse();
        bad.push(("unsorted votes", unsorted));
        for (what, c) in bad {
            assert!(
                st.check_certificate(&c, 1).is_err(),
                "a certificate with {what} passed"
            );
        }
        // A PROMISE carrying such a certificate spoils the SEAL's justification.
        let mut few = valid.clone();
        few.votes.truncate(2);
        let p = vec![
            promise(&st, &k[0], 1, Some(few)),
            promise(&st, &k[1], 1, None),
            promise(&st, &k[2], 1, None),
        ];
        assert!(check(&mut st, 1, a, p).is_err());
    }
}
