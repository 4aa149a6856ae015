//! Malicious peers: what each [`Attack`] does to the gossip and direct messages its peer
//! sends (bad shards behind a valid READY, lying aggregates and audits, forged signatures,
//! replays, equivocation, fabricated states).

use std::sync::Arc;

use crate::averaging;
use crate::codec;
use crate::wire::{self, Body, Direct, Envelope, Hash, Ready};

use super::{det_vec, model_delta, Attack, Sim};

impl Sim {
    /// Peer `i`'s leader rank in its current round and the number of members.
    fn rank_of(&self, i: usize) -> Option<(u64, u64)> {
        let st = self.peers[i].state.as_ref()?;
        let order = averaging::leader_order(&st.chain(), st.members());
        let rank = order.iter().position(|p| *p == self.peers[i].id)?;
        Some((rank as u64, order.len() as u64))
    }

    pub(super) fn send_gossip_with_attack(&mut self, i: usize, env: Arc<Envelope>) {
        let attack = self.peers[i].attack;
        let run = self.cfg.proto.run;
        let key = self.peers[i].key.clone();
        if attack == Some(Attack::EquivocatingLeader) && self.equivocating_leader(i, &env) {
            return;
        }
        let env = match (attack, &env.body) {
            (
                Some(
                    Attack::WrongLength
                    | Attack::NonFinite
                    | Attack::Scaled(_)
                    | Attack::NormLie(_),
                ),
                Body::Ready(r),
            ) => self.bad_ready(i, &env, r.clone()),
            (Some(Attack::MemberTakeover), Body::Seal(p)) => {
                let mut p = p.clone();
                for j in 0..5u8 {
                    let sybil = ed25519_dalek::SigningKey::from_bytes(&[0x70 + j; 32]);
                    p.seal.next_members.push(wire::PeerKey::of(&sybil));
                }
                p.seal.next_members.sort();
                p.seal.next_members.dedup();
                resigned(&key, &env, Body::Seal(p))
            }
            (Some(Attack::SealLies), Body::Seal(p)) => {
                let mut p = p.clone();
                let me = self.peers[i].id;
                let seal = &mut p.seal;
                let first_shard = seal.shards.iter().position(Option::is_some);
                match (env.round % 6, first_shard) {
                    (0, _) => seal.next_members = vec![me],
                    (1, _) => {
                        if let Some(c) = seal.close.contributors.iter_mut().find(|c| c.peer != me) {
                            c.info.tokens = c.info.tokens.saturating_mul(10);
                        }
                    }
                    (2, Some(s)) => {
                        if let Some(x) = seal.shards[s].as_mut() {
                            x.weight += 1;
                        }
                    }
                    (3, Some(s)) => {
                        let stranger = ed25519_dalek::SigningKey::from_bytes(&[0x6d; 32]);
                        if let Some(x) = seal.shards[s].as_mut() {
                            x.owner = wire::PeerKey::of(&stranger);
                        }
                    }
                    (4, Some(s)) => {
                        if let Some(x) = seal.shards[s].as_mut() {
                            x.data = Hash::of(b"made-up aggregate");
                        }
                    }
                    _ => seal.close_id = Hash::of(b"made-up CLOSE"),
                }
                resigned(&key, &env, Body::Seal(p))
            }
            (Some(Attack::SneakIn), Body::Seal(p)) => {
                // One made-up key, with a JOIN validly signed by it (but no invitation).
                let mut p = p.clone();
                let sneak = ed25519_dalek::SigningKey::from_bytes(&[0x7e; 32]);
                let id = wire::PeerKey::of(&sneak);
                if p.seal.next_members.binary_search(&id).is_err() {
                    let join = Envelope::sign(
                        &sneak,
                        run,
                        env.round,
                        env.chain,
                        Body::Join(wire::Join::default()),
                    );
                    p.seal.next_members.push(id);
                    p.seal.next_members.sort();
                    p.seal.joins.push(join);
                    p.seal.joins.sort_by_key(|e| e.signer);
                }
                resigned(&key, &env, Body::Seal(p))
            }
            (Some(Attack::LyingOwner), Body::Agg(a)) => self.lying_agg(i, &env, a.clone()),
            (Some(Attack::LyingOwner), Body::Audit(a)) => self.lying_audit(i, &env, a.clone()),
            _ => env,
        };
        self.gossip_from(i, env.clone());
        match attack {
            Some(Attack::ForgedSignature) => {
                let mut f = (*env).clone();
                f.signer = self.peers[(i + 1) % self.cfg.n].id;
                self.gossip_from(i, Arc::new(f));
            }
            Some(Attack::WrongRun) => {
                let f = Envelope::sign(
                    &key,
                    Hash::of(b"other run"),
                    env.round,
                    env.chain,
                    env.body.clone(),
                );
                self.gossip_from(i, Arc::new(f));
            }
            Some(Attack::Replay) => {
                let old: Vec<Arc<Envelope>> = self.peers[i]
                    .sent_envs
                    .iter()
                    .filter(|e| e.round + 2 == env.round)
                    .cloned()
                    .collect();
                for e in old.into_iter().take(2) {
                    self.gossip_from(i, e);
                }
                self.peers[i].sent_envs.push(env.clone());
                let keep = env.round.saturating_sub(3);
                self.peers[i].sent_envs.retain(|e| e.round >= keep);
            }
            Some(Attack::FutureRounds) => {
                let stranger = ed25519_dalek::SigningKey::from_bytes(&[0xa5; 32]);
                let f = Envelope::sign(&stranger, run, env.round + 5, env.chain, env.body.clone());
                self.gossip_from(i, Arc::new(f));
            }
            Some(Attack::AheadBallot(k)) => {
                let from = match &env.body {
                    Body::Ready(_) => Some(0u64),
                    Body::Promise(p) => Some(u64::from(p.ballot)),
                    _ => None,
                };
                if let (Some(b), Some((rank, n))) = (from, self.rank_of(i)) {
                    // Every b' in b+1..=b+k with b' = rank (mod n), lowest first: a peer
                    // promises the highest of them its bound lets through.
                    let top = (b + u64::from(k)).min(u64::from(u32::MAX));
                    for ahead in (b + 1..=top).filter(|x| x % n == rank) {
                        let f = Envelope::sign(
                            &key,
                            run,
                            env.round,
                            env.chain,
                            Body::Prepare(ahead as u32),
                        );
                        self.gossip_from(i, Arc::new(f));
                    }
                }
            }
            Some(Attack::HugeBallot) => {
                let huge = self.rank_of(i).map(|(rank, n)| {
                    let top = u64::from(u32::MAX);
                    let b = top - top % n + rank;
                    if b > top {
                        b - n
                    } else {
                        b
                    }
                });
                let body = huge.and_then(|b| match &env.body {
                    Body::Ready(_) => Some(Body::Prepare(b as u32)),
                    // Its own SEAL again, under the huge ballot (no PREPARE needed to try).
                    Body::Seal(p) => Some(Body::Seal(wire::Propose {
                        ballot: b as u32,
                        seal: p.seal.clone(),
                        promises: p.promises.clone(),
                    })),
                    _ => None,
                });
                if let Some(body) = body {
                    if let (Body::Prepare(b), Some(_)) = (&body, huge) {
                        // Its own PROMISE of it too: one member's word is not evidence enough.
                        let promise = Body::Promise(wire::Promise {
                            ballot: *b,
                            prepared: None,
                        });
                        self.gossip_from(i, resigned(&key, &env, body.clone()));
                        self.gossip_from(i, resigned(&key, &env, promise));
                    } else {
                        self.gossip_from(i, resigned(&key, &env, body));
                    }
                }
            }
            Some(Attack::JoinFlood(k)) => {
                if let Body::Ready(_) = &env.body {
                    for j in 0..k {
                        let mut seed = [0u8; 32];
                        seed[..8].copy_from_slice(&env.round.to_le_bytes());
                        seed[8] = j;
                        seed[9] = i as u8;
                        seed[31] = 0x5b;
                        let sybil = ed25519_dalek::SigningKey::from_bytes(&seed);
                        let f = Envelope::sign(
                            &sybil,
                            run,
                            env.round,
                            env.chain,
                            Body::Join(wire::Join::default()),
                        );
                        self.gossip_from(i, Arc::new(f));
                    }
                }
            }
            Some(Attack::SybilDonors) => {
                if let Body::Ready(_) = &env.body {
                    // Its own copy three rounds ahead (a member's word: peers ask it), then its
                    // Sybils' copies (outsiders' word).
                    let f = Envelope::sign(&key, run, env.round + 3, env.chain, env.body.clone());
                    self.gossip_from(i, Arc::new(f));
                    let keys = sybil_keys();
                    for key in &keys {
                        let id = wire::PeerKey::of(key);
                        self.aliases.insert(id, (i, key.clone()));
                        let f =
                            Envelope::sign(key, run, env.round + 3, env.chain, env.body.clone());
                        self.gossip_from(i, Arc::new(f));
                    }
                    // And the fabricated State, unasked, from the first Sybil to every peer.
                    if let Some(fake) = self.sybil_state(i) {
                        let fake = Arc::new(fake);
                        let from = wire::PeerKey::of(&keys[0]);
                        for t in 0..self.peers.len() {
                            if t != i && self.alive(t) && !self.cut(i, t) {
                                let at = self.now + self.latency();
                                self.schedule(
                                    at,
                                    t,
                                    super::Ev::In(averaging::InEvent::Direct {
                                        from,
                                        msg: fake.clone(),
                                    }),
                                );
                            }
                        }
                    }
                }
            }
            Some(Attack::Equivocate) => {
                if let Body::Ready(r) = &env.body {
                    let mut r2 = r.clone();
                    r2.tokens = r2.tokens.wrapping_add(1);
                    let f = Envelope::sign(&key, run, env.round, env.chain, Body::Ready(r2));
                    self.gossip_from(i, Arc::new(f));
                }
            }
            _ => {}
        }
    }

    /// `EquivocatingLeader`: splits its SEALs, withholds its ACCEPTs and COMMITs, lies in its
    /// PROMISEs.
    /// Returns whether it sent `env` (or what replaced it) itself.
    fn equivocating_leader(&mut self, i: usize, env: &Arc<Envelope>) -> bool {
        let key = self.peers[i].key.clone();
        // Under later ballots of the split round its state's votes are dropped (it signed its
        // own in advance, `propose_later`), and its state's proposal is replaced by the other
        // SEAL with the PROMISEs the state collected (which certify the first SEAL).
        let later = |b: u32| {
            self.peers[i]
                .other_seal
                .clone()
                .filter(|(r, split, _)| *r == env.round && b > *split)
        };
        match &env.body {
            Body::Accept(wire::Accept { ballot, .. })
            | Body::Commit(wire::Commit { ballot, .. })
                if later(*ballot).is_some() =>
            {
                true
            }
            Body::Seal(p) if later(p.ballot).is_some() => {
                let Some((_, _, other)) = later(p.ballot) else {
                    return true;
                };
                // By ballot: the PROMISEs its state collected, none, or a quorum of PROMISEs
                // (claiming no certificate) "signed" by members with its own signature.
                let promises = match p.ballot % 3 {
                    0 => p.promises.clone(),
                    1 => Vec::new(),
                    _ => {
                        let Some(st) = self.peers[i].state.as_ref() else {
                            return true;
                        };
                        let q = st.quorum();
                        let body = Body::Promise(wire::Promise {
                            ballot: p.ballot,
                            prepared: None,
                        });
                        let mine = resigned(&key, env, body.clone());
                        st.members()
                            .iter()
                            .take(q)
                            .map(|m| Envelope {
                                signer: *m,
                                ..(*mine).clone()
                            })
                            .collect()
                    }
                };
                let alt = resigned(
                    &key,
                    env,
                    Body::Seal(wire::Propose {
                        ballot: p.ballot,
                        seal: other,
                        promises,
                    }),
                );
                self.gossip_from(i, alt);
                true
            }
            Body::Seal(p) => {
                let mut other = p.seal.clone();
                for s in &mut other.shards {
                    *s = None;
                }
                self.peers[i].other_seal = Some((env.round, p.ballot, other.clone()));
                let alt = resigned(
                    &key,
                    env,
                    Body::Seal(wire::Propose {
                        ballot: p.ballot,
                        seal: other,
                        promises: p.promises.clone(),
                    }),
                );
                // The honest SEAL to one peer short of a quorum with itself, so that only the
                // peer its COMMIT reaches sees a quorum; the other SEAL to the rest.
                let q = self.peers[i].state.as_ref().map_or(1, |st| st.quorum());
                let got_v = move |t: usize| t < q - 1 || t == i;
                self.gossip_to(i, env.clone(), got_v);
                self.gossip_to(i, alt, move |t| !got_v(t));
                self.propose_later(i, env, p.ballot);
                true
            }
            // Its COMMIT of its own SEAL always, its ACCEPT in odd rounds only: then the peers
            // other than `one` may commit (and `one` decide) without holding a certificate.
            Body::Commit(wire::Commit { ballot, .. })
            | Body::Accept(wire::Accept { ballot, .. })
                if self.peers[i]
                    .other_seal
                    .as_ref()
                    .is_some_and(|(r, b, _)| *r == env.round && b == ballot)
                    && (matches!(env.body, Body::Commit(_)) || env.round % 2 == 1) =>
            {
                let one = usize::from(i == 0);
                self.gossip_to(i, env.clone(), |t| t == one);
                true
            }
            Body::Promise(p) => {
                let Some((round, ballot, other)) = self.peers[i].other_seal.clone() else {
                    return false;
                };
                if round != env.round || ballot >= p.ballot {
                    return false;
                }
                // A certificate of the other SEAL under the highest ballot below the PROMISE's
                // (so it outranks any honest one): in turn its own ACCEPT alone, or its ACCEPT
                // with a quorum's worth of members' "votes" it signed itself.
                let seal = other.hash();
                let under = p.ballot - 1;
                let vote = Envelope::sign(
                    &key,
                    env.run,
                    env.round,
                    env.chain,
                    Body::Accept(wire::Accept {
                        ballot: under,
                        seal,
                    }),
                );
                let mut votes = vec![(vote.signer, vote.sig)];
                if (env.round + u64::from(p.ballot)) % 2 == 0 {
                    if let Some(st) = self.peers[i].state.as_ref() {
                        let q = st.quorum();
                        let others = st.members().iter().filter(|m| **m != vote.signer);
                        votes.extend(others.take(q - 1).map(|m| (*m, vote.sig)));
                    }
                }
                votes.sort_by_key(|v| v.0);
                let lie = wire::Promise {
                    ballot: p.ballot,
                    prepared: Some(wire::Certificate {
                        ballot: under,
                        seal,
                        votes,
                    }),
                };
                self.gossip_from(i, resigned(&key, env, Body::Promise(lie)));
                true
            }
            _ => false,
        }
    }

    /// `EquivocatingLeader`, for every later ballot up to the next one it leads in the round
    /// (`ballot + n`): its ACCEPT and COMMIT of the other SEAL (the state after a zero step),
    /// signed now and delivered to everyone when that ballot's slot begins: whichever ballot
    /// proposes the other SEAL, its votes are there to complete a certificate and a quorum.
    fn propose_later(&mut self, i: usize, env: &Envelope, ballot: u32) {
        let Some((_, _, other)) = self.peers[i].other_seal.clone() else {
            return;
        };
        let Some(st) = self.peers[i].state.as_ref() else {
            return;
        };
        let n = st.members().len().max(1) as u32;
        let (mut theta, mut momentum) = (st.theta().to_vec(), st.momentum().to_vec());
        let zero = vec![0f32; theta.len()];
        if crate::outer::nesterov_step(st.config().outer, &mut theta, &mut momentum, &zero).is_err()
        {
            return;
        }
        let seal = other.hash();
        let state = averaging::state_hash(&theta, &momentum);
        let next_chain = Hash::of_parts(&[&env.chain.0, &seal.0]);
        let slot = st.config().attempt_timeout;
        let key = self.peers[i].key.clone();
        let now = self.now;
        for b in ballot.saturating_add(1)..=ballot.saturating_add(n) {
            let bodies = [
                Body::Accept(wire::Accept { ballot: b, seal }),
                Body::Commit(wire::Commit {
                    ballot: b,
                    seal,
                    next_chain,
                    state,
                }),
            ];
            // Once that ballot's SEAL may have gone out.
            let at = now + u64::from(b) * slot + slot / 4;
            for (k, body) in bodies.into_iter().enumerate() {
                let e = resigned(&key, env, body);
                for t in (0..self.peers.len()).filter(|t| *t != i) {
                    let ev = averaging::InEvent::Gossip {
                        env: e.clone(),
                        verified: false,
                    };
                    self.schedule(at + 5 * k as u64, t, super::Ev::In(ev));
                }
            }
        }
    }

    /// Replaces a malicious peer's READY with one announcing bad shards.
    fn bad_ready(&mut self, i: usize, env: &Envelope, r: Ready) -> Arc<Envelope> {
        let Some(st) = self.peers[i].state.as_ref() else {
            return Arc::new(env.clone());
        };
        let k = averaging::shard_count(st.config(), st.members().len());
        let q = st.config().codec;
        let delta = model_delta(st.theta(), &self.peers[i].target);
        let attack = self.peers[i].attack;
        let ranges = codec::shards(self.cfg.len, k);
        let mut claimed = f32::from_bits(r.norm_bits);
        let shards: Vec<Vec<u8>> = ranges
            .iter()
            .map(|rg| match attack {
                Some(Attack::WrongLength) => codec::encode(q, &vec![0.01; rg.len() + 1]),
                Some(Attack::NonFinite) => {
                    let mut raw = Vec::new();
                    for j in 0..rg.len() {
                        let v = if j % 2 == 0 { f32::NAN } else { f32::INFINITY };
                        raw.extend_from_slice(&v.to_le_bytes());
                    }
                    let mut b = vec![codec::FORMAT_VERSION, 0, 0, 0];
                    b.extend_from_slice(&(rg.len() as u64).to_le_bytes());
                    b.extend_from_slice(&zstd::bulk::compress(&raw, 1).unwrap_or_default());
                    b
                }
                Some(Attack::Scaled(s) | Attack::NormLie(s)) => {
                    let v: Vec<f32> = delta[rg.clone()].iter().map(|x| x * s).collect();
                    codec::encode(q, &v)
                }
                _ => codec::encode(q, &delta[rg.clone()]),
            })
            .collect();
        if let Some(Attack::Scaled(s)) = attack {
            claimed *= s.abs();
        }
        let leaves: Vec<Hash> = shards.iter().map(|s| Hash::of(s)).collect();
        let ready = Ready {
            shard_root: wire::merkle_root(&leaves),
            norm_bits: claimed.to_bits(),
            ..r
        };
        self.peers[i].bad_shards = Some((env.round, shards, leaves));
        Arc::new(Envelope::sign(
            &self.peers[i].key,
            env.run,
            env.round,
            env.chain,
            Body::Ready(ready),
        ))
    }

    /// Replaces an owner's AGG with one for the sign-flipped aggregate.
    fn lying_agg(&mut self, i: usize, env: &Arc<Envelope>, mut a: wire::Agg) -> Arc<Envelope> {
        let Some(st) = self.peers[i].state.as_ref() else {
            return env.clone();
        };
        let k = averaging::shard_count(st.config(), st.members().len());
        let Some(range) = codec::shards(self.cfg.len, k)
            .get(a.shard as usize)
            .cloned()
        else {
            return env.clone();
        };
        let Some(Ok(v)) = st.payload(&a.data).map(|d| codec::decode(d, range.len())) else {
            return env.clone();
        };
        let lie: Vec<f32> = v.iter().map(|x| -x).collect();
        let bytes = codec::encode(st.config().codec, &lie);
        let honest = a.data;
        a.data = Hash::of(&bytes);
        self.peers[i].lie_map.insert(honest, a.data);
        self.peers[i].fake_payloads.insert(a.data, bytes);
        self.report.lies_told += 1;
        Arc::new(Envelope::sign(
            &self.peers[i].key,
            env.run,
            env.round,
            env.chain,
            Body::Agg(a),
        ))
    }

    /// A lying owner also audits its own tampered aggregate (honestly projecting its own shard
    /// for the tampered aggregate's seed), so only the projections can give it away.
    fn lying_audit(&mut self, i: usize, env: &Arc<Envelope>, mut a: wire::Audit) -> Arc<Envelope> {
        let Some(st) = self.peers[i].state.as_ref() else {
            return env.clone();
        };
        let k = averaging::shard_count(st.config(), st.members().len());
        let ranges = codec::shards(self.cfg.len, k);
        let delta = codec::quantize_roundtrip(
            st.config().codec,
            &model_delta(st.theta(), &self.peers[i].target),
        );
        for e in &mut a.entries {
            let (Some(fake), Some(r)) = (
                self.peers[i].lie_map.get(&e.agg).copied(),
                ranges.get(e.shard as usize),
            ) else {
                continue;
            };
            let seed = crate::audit::seed(&a.close, e.shard, &fake);
            let proj =
                crate::audit::project(&seed, &delta[r.clone()], crate::audit::AUDIT_PROJECTIONS);
            e.agg = fake;
            e.proj = proj.into_iter().map(f64::to_bits).collect();
        }
        Arc::new(Envelope::sign(
            &self.peers[i].key,
            env.run,
            env.round,
            env.chain,
            Body::Audit(a),
        ))
    }

    pub(super) fn attack_push(&mut self, i: usize, msg: Arc<Direct>) -> Arc<Direct> {
        let Direct::PushShard {
            round,
            close,
            shard,
            ..
        } = &*msg
        else {
            return msg;
        };
        match &self.peers[i].bad_shards {
            Some((r, shards, leaves)) if r == round => {
                let s = *shard as usize;
                match shards.get(s) {
                    Some(d) => Arc::new(Direct::PushShard {
                        round: *round,
                        close: *close,
                        shard: *shard,
                        data: d.clone(),
                        proof: wire::merkle_proof(leaves, s),
                    }),
                    None => msg,
                }
            }
            _ => msg,
        }
    }

    /// A fabricated State, validly signed by peer `i` alone.
    pub(super) fn fake_state(&mut self, i: usize) -> Option<Direct> {
        let key = self.peers[i].key.clone();
        self.fabricated_state(i, &[key])
    }

    /// The State the Sybil keys and every [`Attack::SybilDonors`] member send: identical, so
    /// the "donors" agree; signed by the Sybil keys and by those members.
    pub(super) fn sybil_state(&mut self, i: usize) -> Option<Direct> {
        let mut keys = sybil_keys().to_vec();
        keys.extend(
            self.peers
                .iter()
                .filter(|p| p.attack == Some(Attack::SybilDonors))
                .map(|p| p.key.clone()),
        );
        self.fabricated_state(i, &keys)
    }

    /// A State two rounds past peer `i`'s: made-up theta, a SEAL by `keys[0]` naming `keys`
    /// as the next members, and a COMMIT from each key as the "quorum".
    fn fabricated_state(&mut self, i: usize, keys: &[ed25519_dalek::SigningKey]) -> Option<Direct> {
        let st = self.peers[i].state.as_ref()?;
        let key = keys.first()?;
        let me = wire::PeerKey::of(key);
        let mut next_members: Vec<wire::PeerKey> = keys.iter().map(wire::PeerKey::of).collect();
        next_members.sort();
        let round = st.round() + 2;
        let chain = Hash::of(&round.to_le_bytes());
        let k = averaging::shard_count(st.config(), 1);
        let theta = det_vec(self.cfg.seed, 77, self.cfg.len, 5.0);
        let momentum = vec![0f32; self.cfg.len];
        let ready = Ready {
            tokens: 1,
            shard_root: Hash::default(),
            norm_bits: 0,
            can_serve: true,
        };
        let seal = wire::Seal {
            close: wire::Close {
                ballot: 0,
                contributors: vec![wire::Contributor {
                    peer: me,
                    ready: Hash::default(),
                    info: ready,
                    sig: wire::Signature([0; 64]),
                }],
            },
            close_id: Hash::default(),
            shards: vec![None; k],
            next_members,
            joins: vec![],
        };
        let seal_hash = seal.hash();
        let run = self.cfg.proto.run;
        let seal_env = Envelope::sign(
            key,
            run,
            round,
            chain,
            Body::Seal(wire::Propose {
                ballot: 0,
                seal,
                promises: Vec::new(),
            }),
        );
        let commit = wire::Commit {
            ballot: 0,
            seal: seal_hash,
            next_chain: Hash::of_parts(&[&chain.0, &seal_hash.0]),
            state: averaging::state_hash(&theta, &momentum),
        };
        let commits = keys
            .iter()
            .map(|k| Envelope::sign(k, run, round, chain, Body::Commit(commit)))
            .collect();
        Some(Direct::State {
            round: round + 1,
            proof: Box::new(wire::DecisionProof {
                seal: seal_env,
                commits,
                reconfigs: Vec::new(),
            }),
            theta: codec::encode(codec::Quantization::F32, &theta),
            momentum: codec::encode(codec::Quantization::F32, &momentum),
        })
    }
}

/// The two Sybil keys of every [`Attack::SybilDonors`] peer (shared, so that two such members
/// send the very same State).
fn sybil_keys() -> [ed25519_dalek::SigningKey; 2] {
    [0x5e, 0x5f].map(|b| ed25519_dalek::SigningKey::from_bytes(&[b; 32]))
}

/// `env` with its body replaced by `body`, signed by `key`.
fn resigned(key: &ed25519_dalek::SigningKey, env: &Envelope, body: Body) -> Arc<Envelope> {
    Arc::new(Envelope::sign(key, env.run, env.round, env.chain, body))
}
