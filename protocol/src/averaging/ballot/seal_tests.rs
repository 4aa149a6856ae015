//! The acceptors' check of a SEAL against its signed inputs ([`State::check_seal`]), one field
//! at a time: from a SEAL an honest leader could propose, each test changes one thing a
//! dishonest leader could change (a contributor's READY, its norm claim, the CLOSE id, a
//! shard's bitmap, owner, weight or AGG signature, the member list, a newcomer's JOIN) and
//! checks that exactly that is refused, and that the honest limits (a claim equal to the cap,
//! a backup owner, a JOIN at the edge of its window) still pass. Also the decision proof a
//! replaying peer checks around such a SEAL (`State::verify_proof`).

use ed25519_dalek::SigningKey;

use crate::averaging::{max_joins, Admission, Config, Quorum, State};
use crate::wire::{
    Agg, Body, Close, Commit, Contributor, DecisionProof, Envelope, Hash, Invite, Join, PeerKey,
    Propose, Ready, Seal, SealedShard, Signature, JOIN_WINDOW,
};

const RUN: &[u8] = b"seal-check-test";
/// The round the tests run in (a JOIN may be from this round back to `ROUND - JOIN_WINDOW`).
const ROUND: u64 = 10;
/// Tokens each contributor reports.
const TOKENS: u64 = 100;

/// Four members under `two-thirds`, in round [`ROUND`], with four shards (256 parameters),
/// seen from the first member; and keys that are no members.
struct World {
    keys: Vec<SigningKey>,
    outsiders: Vec<SigningKey>,
    st: State,
}

impl World {
    fn new() -> Self {
        let mut keys: Vec<SigningKey> = (1..=4u8)
            .map(|i| SigningKey::from_bytes(&[i; 32]))
            .collect();
        keys.sort_by_key(PeerKey::of);
        let mut outsiders: Vec<SigningKey> = (20..=24u8)
            .map(|i| SigningKey::from_bytes(&[i; 32]))
            .collect();
        outsiders.sort_by_key(PeerKey::of);
        let members: Vec<PeerKey> = keys.iter().map(PeerKey::of).collect();
        let mut cfg = Config::new(Hash::of(RUN), 256);
        cfg.quorum = Quorum::TwoThirds;
        let mut st = State::genesis(cfg, keys[0].clone(), vec![0.0; 256], members);
        st.round = ROUND;
        assert_eq!(st.k(), 4, "the tests want one shard per member");
        World {
            keys,
            outsiders,
            st,
        }
    }

    fn key(&self, p: PeerKey) -> &SigningKey {
        self.keys
            .iter()
            .chain(&self.outsiders)
            .find(|k| PeerKey::of(k) == p)
            .expect("a key of the test")
    }

    fn sign(&self, key: &SigningKey, body: Body) -> Envelope {
        Envelope::sign(key, self.st.cfg.run, self.st.round, self.st.chain, body)
    }

    /// `key`'s signed READY as a CLOSE lists it.
    fn contributor(&self, key: &SigningKey, norm: f32) -> Contributor {
        let info = Ready {
            tokens: TOKENS,
            shard_root: Hash::of(b"root"),
            norm_bits: norm.to_bits(),
            can_serve: true,
        };
        let e = self.sign(key, Body::Ready(info.clone()));
        Contributor {
            peer: e.signer,
            ready: e.id(),
            info,
            sig: e.sig,
        }
    }

    /// The id of `close` as its ballot's leader signs it.
    fn close_id(&self, close: &Close) -> Hash {
        let leader = self.st.leader(close.ballot).expect("a leader");
        self.sign(self.key(leader), Body::Close(close.clone())).id()
    }

    /// Shard `s` of `close` aggregated by `owner` over the contributors in `included`.
    fn shard(
        &self,
        close: &Close,
        close_id: Hash,
        s: usize,
        owner: PeerKey,
        included: u8,
    ) -> SealedShard {
        let weight = (0..close.contributors.len())
            .filter(|i| included & (1 << i) != 0)
            .map(|i| self.st.weight(close.contributors[i].info.tokens))
            .sum();
        let data = Hash::of(&[s as u8, included]);
        let agg = Agg {
            close: close_id,
            shard: s as u32,
            included: vec![included],
            data,
            weight,
        };
        let e = self.sign(self.key(owner), Body::Agg(agg));
        SealedShard {
            owner,
            data,
            included: vec![included],
            weight,
            sig: e.sig,
        }
    }

    /// A SEAL an honest leader of ballot 0 could propose: every member contributed with norm
    /// claim `norm`, every shard's first owner aggregated all of them, nobody is evicted and
    /// nobody joins.
    fn honest(&self, norm: f32) -> Seal {
        let close = Close {
            ballot: 0,
            contributors: self
                .keys
                .iter()
                .map(|k| self.contributor(k, norm))
                .collect(),
        };
        self.seal_of(close)
    }

    /// The honest SEAL of `close` (its CLOSE id, every shard from its first owner over all
    /// contributors, the same members next round).
    fn seal_of(&self, close: Close) -> Seal {
        let close_id = self.close_id(&close);
        let all = (1u8 << close.contributors.len()) - 1;
        let shards = self
            .st
            .close_owners(&close)
            .iter()
            .enumerate()
            .map(|(s, o)| Some(self.shard(&close, close_id, s, o[0], all)))
            .collect();
        Seal {
            close,
            close_id,
            shards,
            next_members: self.st.members.clone(),
            joins: Vec::new(),
        }
    }

    /// `key`'s JOIN signed for round `round`.
    fn join(&self, key: &SigningKey, round: u64, invite: Option<Invite>) -> Envelope {
        Envelope::sign(
            key,
            self.st.cfg.run,
            round,
            self.st.chain,
            Body::Join(Join { invite }),
        )
    }

    /// `seal` with these outsiders added as newcomers, each with a JOIN made by `join`.
    fn with_newcomers(
        &self,
        mut seal: Seal,
        newcomers: &[&SigningKey],
        join: impl Fn(&SigningKey) -> Envelope,
    ) -> Seal {
        for k in newcomers {
            seal.next_members.push(PeerKey::of(k));
            seal.joins.push(join(k));
        }
        seal.next_members.sort();
        seal.joins.sort_by_key(|e| e.signer);
        seal
    }

    fn check(&self, seal: &Seal) -> Result<(), &'static str> {
        self.st.check_seal(seal, 0)
    }
}

/// Asserts that each changed SEAL is refused with `why`.
fn refused(w: &World, why: &str, cases: Vec<(&str, Seal)>) {
    for (what, seal) in cases {
        assert_eq!(w.check(&seal), Err(why), "{what}");
    }
}

#[test]
fn an_honest_seal_passes() {
    let w = World::new();
    assert_eq!(w.check(&w.honest(1.0)), Ok(()));
    // Partial shards and MISSING shards are honest too.
    let mut s = w.honest(1.0);
    let owner = s.shards[1].as_ref().unwrap().owner;
    s.shards[1] = Some(w.shard(&s.close, s.close_id, 1, owner, 0b0101));
    s.shards[2] = None;
    assert_eq!(w.check(&s), Ok(()));
}

#[test]
fn the_shard_count_and_the_close_are_the_rounds() {
    let w = World::new();
    let mut fewer = w.honest(1.0);
    fewer.shards.pop();
    let mut more = w.honest(1.0);
    more.shards.push(None);
    refused(&w, "shard count", vec![("fewer", fewer), ("more", more)]);

    let mut close = w.honest(1.0).close;
    close.ballot = 1;
    let later = w.seal_of(close);
    assert_eq!(w.check(&later), Err("a CLOSE of a later ballot"));
    // Under ballot 1 that CLOSE is fine, made by ballot 1's leader ...
    assert_eq!(w.st.check_seal(&later, 1), Ok(()));
    // ... and not when its id is that of the same CLOSE signed by someone else.
    let mut other = later.clone();
    let not_leader = w
        .keys
        .iter()
        .find(|k| Some(PeerKey::of(k)) != w.st.leader(1))
        .unwrap();
    other.close_id = w.sign(not_leader, Body::Close(other.close.clone())).id();
    assert_eq!(
        w.st.check_seal(&other, 1),
        Err("a CLOSE id that is not its CLOSE's")
    );

    let mut wrong_id = w.honest(1.0);
    wrong_id.close_id = Hash::of(b"another close");
    let mut changed = w.honest(1.0);
    changed.close.contributors.pop();
    refused(
        &w,
        "a CLOSE id that is not its CLOSE's",
        vec![("another id", wrong_id), ("a CLOSE changed after", changed)],
    );
}

#[test]
fn contributors_are_sorted_distinct_members() {
    let w = World::new();
    let mut none = w.honest(1.0);
    none.close.contributors.clear();
    let mut unsorted = w.honest(1.0);
    unsorted.close.contributors.swap(0, 1);
    let mut twice = w.honest(1.0);
    twice.close.contributors[1] = twice.close.contributors[0].clone();
    refused(
        &w,
        "contributors",
        vec![("none", none), ("unsorted", unsorted), ("twice", twice)],
    );

    let mut stranger = w.honest(1.0);
    stranger
        .close
        .contributors
        .push(w.contributor(&w.outsiders[0], 1.0));
    stranger.close.contributors.sort_by_key(|c| c.peer);
    assert_eq!(w.check(&stranger), Err("a contributor that is no member"));
}

#[test]
fn norm_claims_are_bounded() {
    let mut w = World::new();
    w.st.cfg.norm_cap = 2.0;
    for ok in [0.0, 1.0, 2.0] {
        assert_eq!(w.check(&w.honest(ok)), Ok(()), "a claim of {ok}");
    }
    for bad in [2.0001, -1.0, -0.0001, f32::NAN, f32::INFINITY] {
        assert_eq!(
            w.check(&w.honest(bad)),
            Err("a contributor's norm claim out of bounds"),
            "a claim of {bad}"
        );
    }
}

#[test]
fn every_contributor_carries_its_signed_ready() {
    let w = World::new();
    let why = "a contributor without its signed READY";
    let edit = |f: &dyn Fn(&mut Contributor)| {
        let mut s = w.honest(1.0);
        f(&mut s.close.contributors[2]);
        // The CLOSE's id follows its (changed) content: only the READY is wrong.
        s.close_id = w.close_id(&s.close);
        s
    };
    refused(
        &w,
        why,
        vec![
            ("another READY id", edit(&|c| c.ready = Hash::of(b"x"))),
            ("a forged signature", edit(&|c| c.sig.0[5] ^= 1)),
            ("more tokens", edit(&|c| c.info.tokens += 1)),
            ("another norm", edit(&|c| c.info.norm_bits ^= 1)),
            (
                "another root",
                edit(&|c| c.info.shard_root = Hash::of(b"y")),
            ),
            ("can serve", edit(&|c| c.info.can_serve = false)),
        ],
    );
    // Another round's READY, properly signed there, is not this round's.
    let mut old = w.honest(1.0);
    let info = old.close.contributors[2].info.clone();
    let e = Envelope::sign(
        &w.keys[2],
        w.st.cfg.run,
        ROUND - 1,
        w.st.chain,
        Body::Ready(info),
    );
    old.close.contributors[2].ready = e.id();
    old.close.contributors[2].sig = e.sig;
    old.close_id = w.close_id(&old.close);
    assert_eq!(w.check(&old), Err(why));
}

/// A READY this peer received itself is not verified again, but only when every field is the
/// one received: the stored entry stands in for a signature check, so a SEAL differing from
/// it in one field is checked as if unknown.
#[test]
fn a_known_ready_is_trusted_only_when_identical() {
    let mut w = World::new();
    // A forged signature, recorded as received (as if it had been verified).
    let mut close = w.honest(1.0).close;
    close.contributors[2].sig.0[5] ^= 1;
    let s = w.seal_of(close);
    let c = s.close.contributors[2].clone();
    w.st.r
        .readies
        .insert(c.peer, (c.ready, c.info.clone(), c.sig));
    assert_eq!(w.check(&s), Ok(()), "identical to the one received");
    let stored = |w: &mut World, id: Hash, info: Ready, sig: Signature| {
        w.st.r.readies.insert(c.peer, (id, info, sig));
    };
    let mut other = c.info.clone();
    other.tokens += 1;
    let variants = [
        (Hash::of(b"x"), c.info.clone(), c.sig),
        (c.ready, other, c.sig),
        (c.ready, c.info.clone(), Signature([7; 64])),
    ];
    for (i, (id, info, sig)) in variants.into_iter().enumerate() {
        stored(&mut w, id, info, sig);
        assert_eq!(
            w.check(&s),
            Err("a contributor without its signed READY"),
            "variant {i}"
        );
    }
    // Received from another peer's key: not this contributor's.
    w.st.r.readies.clear();
    w.st.r
        .readies
        .insert(PeerKey::of(&w.keys[1]), (c.ready, c.info.clone(), c.sig));
    assert!(w.check(&s).is_err());
}

#[test]
fn shard_bitmaps_cover_exactly_the_contributors() {
    let w = World::new();
    let edit = |f: &dyn Fn(&mut SealedShard)| {
        let mut s = w.honest(1.0);
        f(s.shards[0].as_mut().unwrap());
        s
    };
    refused(
        &w,
        "bitmap",
        vec![
            ("empty", edit(&|x| x.included.clear())),
            ("a byte too many", edit(&|x| x.included.push(0))),
            ("a bit beyond", edit(&|x| x.included[0] |= 1 << 4)),
            ("the last bit", edit(&|x| x.included[0] |= 1 << 7)),
        ],
    );
}

#[test]
fn a_shard_comes_from_a_designated_owner_that_signed_it() {
    let w = World::new();
    let base = w.honest(1.0);
    let owners = w.st.close_owners(&base.close);
    // The backup may seal a shard; any other member may not, nor may an outsider.
    let mut backup = base.clone();
    backup.shards[0] = Some(w.shard(&base.close, base.close_id, 0, owners[0][1], 0b1111));
    assert_eq!(w.check(&backup), Ok(()));
    let other = *w
        .st
        .members
        .iter()
        .find(|p| !owners[0].contains(p))
        .unwrap();
    let mut wrong = base.clone();
    wrong.shards[0] = Some(w.shard(&base.close, base.close_id, 0, other, 0b1111));
    let mut stranger = base.clone();
    let o = PeerKey::of(&w.outsiders[0]);
    stranger.shards[0] = Some(w.shard(&base.close, base.close_id, 0, o, 0b1111));
    refused(
        &w,
        "a shard of no designated owner",
        vec![("a non-owner member", wrong), ("an outsider", stranger)],
    );

    let why = "a shard without its owner's signed AGG";
    let edit = |f: &dyn Fn(&mut SealedShard)| {
        let mut s = base.clone();
        f(s.shards[3].as_mut().unwrap());
        s
    };
    // Shard 0's owner, signing an AGG of shard 1, has not vouched for shard 0.
    let mut misplaced = base.clone();
    misplaced.shards[0] = Some(w.shard(&base.close, base.close_id, 1, owners[0][0], 0b1111));
    refused(
        &w,
        why,
        vec![
            ("other data", edit(&|x| x.data = Hash::of(b"z"))),
            ("a forged signature", edit(&|x| x.sig.0[0] ^= 1)),
            ("the other owner named", edit(&|x| x.owner = owners[3][1])),
            ("another shard's AGG", misplaced),
        ],
    );
    // Another CLOSE's AGG, signed by the right owner, is not this CLOSE's.
    let mut elsewhere = base.clone();
    let mut close2 = base.close.clone();
    close2.ballot = 1;
    let id2 = w.close_id(&close2);
    elsewhere.shards[3] = Some(w.shard(&close2, id2, 3, owners[3][0], 0b1111));
    assert_eq!(w.check(&elsewhere), Err(why));
}

#[test]
fn a_shards_weight_is_its_contributors_capped_tokens() {
    let mut w = World::new();
    let why = "a shard's weight is not its contributors'";
    let edit = |w: &World, f: &dyn Fn(&mut SealedShard)| {
        let mut s = w.honest(1.0);
        f(s.shards[2].as_mut().unwrap());
        s
    };
    let cases = vec![
        ("one more", edit(&w, &|x| x.weight += 1)),
        ("one less", edit(&w, &|x| x.weight -= 1)),
        ("nobody included", edit(&w, &|x| x.included[0] = 0)),
        ("one fewer included", edit(&w, &|x| x.included[0] = 0b0111)),
    ];
    refused(&w, why, cases);
    // Under a token cap, each contributor weighs at most the cap.
    w.st.cfg.token_cap = TOKENS / 4;
    let s = w.honest(1.0);
    assert_eq!(s.shards[0].as_ref().unwrap().weight, TOKENS);
    assert_eq!(w.check(&s), Ok(()));
    let mut uncapped = s.clone();
    let x = uncapped.shards[0].as_mut().unwrap();
    x.weight = 4 * TOKENS;
    assert_eq!(w.check(&uncapped), Err(why));
}

/// An AGG this peer received itself is not verified again, but only when owner, data,
/// bitmap, weight and signature all match the one received.
#[test]
fn a_known_agg_is_trusted_only_when_identical() {
    let mut w = World::new();
    let mut s = w.honest(1.0);
    let x = s.shards[1].as_mut().unwrap();
    x.sig.0[9] ^= 1;
    let x = x.clone();
    let agg = Agg {
        close: s.close_id,
        shard: 1,
        included: x.included.clone(),
        data: x.data,
        weight: x.weight,
    };
    let key = (s.close_id, 1u32);
    w.st.r.aggs.insert(key, vec![(x.owner, agg.clone(), x.sig)]);
    assert_eq!(w.check(&s), Ok(()), "identical to the one received");
    let other_owner = *w.st.members.iter().find(|p| **p != x.owner).unwrap();
    let variants = [
        (other_owner, agg.clone(), x.sig),
        (
            x.owner,
            Agg {
                data: Hash::of(b"d"),
                ..agg.clone()
            },
            x.sig,
        ),
        (
            x.owner,
            Agg {
                included: vec![0b0111],
                ..agg.clone()
            },
            x.sig,
        ),
        (
            x.owner,
            Agg {
                weight: x.weight + 1,
                ..agg.clone()
            },
            x.sig,
        ),
        (x.owner, agg.clone(), Signature([3; 64])),
    ];
    for (i, entry) in variants.into_iter().enumerate() {
        w.st.r.aggs.insert(key, vec![entry]);
        assert_eq!(
            w.check(&s),
            Err("a shard without its owner's signed AGG"),
            "variant {i}"
        );
    }
    // Received for another shard of the CLOSE: not this one's.
    w.st.r.aggs.clear();
    w.st.r
        .aggs
        .insert((s.close_id, 2), vec![(x.owner, agg, x.sig)]);
    assert!(w.check(&s).is_err());
}

#[test]
fn the_member_list_is_sorted_distinct_and_keeps_every_contributor() {
    let w = World::new();
    let mut empty = w.honest(1.0);
    empty.next_members.clear();
    let mut unsorted = w.honest(1.0);
    unsorted.next_members.swap(1, 2);
    let mut twice = w.honest(1.0);
    twice.next_members.insert(1, twice.next_members[1]);
    refused(
        &w,
        "member list",
        vec![("empty", empty), ("unsorted", unsorted), ("twice", twice)],
    );
    let mut evicted = w.honest(1.0);
    evicted.next_members.remove(3);
    assert_eq!(w.check(&evicted), Err("a contributor evicted"));
    // A member that did not contribute may be dropped (whether it was silent long enough is
    // the acceptor's own view, `check_evictions`).
    let mut close = w.honest(1.0).close;
    let silent = close.contributors.remove(3).peer;
    let mut s = w.seal_of(close);
    s.next_members.retain(|p| *p != silent);
    assert_eq!(w.check(&s), Ok(()));
}

#[test]
fn newcomers_come_with_their_own_recent_signed_joins() {
    let w = World::new();
    let o = &w.outsiders;
    let fresh = |k: &SigningKey| w.join(k, ROUND, None);
    let ok = w.with_newcomers(w.honest(1.0), &[&o[0]], fresh);
    assert_eq!(w.check(&ok), Ok(()));
    // A JOIN is good from its round up to JOIN_WINDOW rounds later.
    let oldest = w.with_newcomers(w.honest(1.0), &[&o[0]], |k| {
        w.join(k, ROUND - JOIN_WINDOW, None)
    });
    assert_eq!(w.check(&oldest), Ok(()));

    let why = "a newcomer without its JOIN";
    let mut no_join = ok.clone();
    no_join.joins.clear();
    let mut someone_elses = ok.clone();
    someone_elses.joins[0] = w.join(&o[1], ROUND, None);
    let mut forged = ok.clone();
    forged.joins[0].sig.0[0] ^= 1;
    let mut other_run = ok.clone();
    other_run.joins[0] = Envelope::sign(
        &o[0],
        Hash::of(b"another run"),
        ROUND,
        w.st.chain,
        Body::Join(Join { invite: None }),
    );
    let mut not_a_join = ok.clone();
    not_a_join.joins[0] = Envelope::sign(&o[0], w.st.cfg.run, ROUND, w.st.chain, Body::Prepare(1));
    let future = w.with_newcomers(w.honest(1.0), &[&o[0]], |k| w.join(k, ROUND + 1, None));
    let stale = w.with_newcomers(w.honest(1.0), &[&o[0]], |k| {
        w.join(k, ROUND - JOIN_WINDOW - 1, None)
    });
    refused(
        &w,
        why,
        vec![
            ("no JOIN", no_join),
            ("another key's JOIN", someone_elses),
            ("a forged JOIN", forged),
            ("another run's JOIN", other_run),
            ("no JOIN but another message", not_a_join),
            ("a JOIN from a later round", future),
            ("a JOIN older than its window", stale),
        ],
    );
    let mut extra = w.honest(1.0);
    extra.joins.push(fresh(&o[0]));
    assert_eq!(w.check(&extra), Err("a JOIN of no newcomer"));
}

#[test]
fn newcomers_are_bounded_and_admitted_by_the_runs_policy() {
    let mut w = World::new();
    let o: Vec<SigningKey> = w.outsiders.clone();
    let fresh = |w: &World, k: &SigningKey| w.join(k, ROUND, None);
    let cap = max_joins(w.st.members.len());
    let most: Vec<&SigningKey> = o.iter().take(cap).collect();
    let too_many: Vec<&SigningKey> = o.iter().take(cap + 1).collect();
    let s = w.with_newcomers(w.honest(1.0), &most, |k| fresh(&w, k));
    assert_eq!(w.check(&s), Ok(()));
    let s = w.with_newcomers(w.honest(1.0), &too_many, |k| fresh(&w, k));
    assert_eq!(w.check(&s), Err("more newcomers than a round admits"));

    let mut list: Vec<PeerKey> = vec![PeerKey::of(&o[1])];
    list.sort();
    w.st.cfg.admission = Admission::Allowlist(list.clone());
    let listed = w.with_newcomers(w.honest(1.0), &[&o[1]], |k| fresh(&w, k));
    assert_eq!(w.check(&listed), Ok(()));
    let unlisted = w.with_newcomers(w.honest(1.0), &[&o[0]], |k| fresh(&w, k));
    assert_eq!(
        w.check(&unlisted),
        Err("JOIN from a key not on the run's allowlist")
    );

    w.st.cfg.admission = Admission::Invite(list);
    let run = w.st.cfg.run;
    let invited = w.with_newcomers(w.honest(1.0), &[&o[0]], |k| {
        let inv = Invite::sign(&w.keys[2], run, PeerKey::of(k));
        w.join(k, ROUND, Some(inv))
    });
    assert_eq!(w.check(&invited), Ok(()));
    let by_outsider = w.with_newcomers(w.honest(1.0), &[&o[0]], |k| {
        let inv = Invite::sign(&o[3], run, PeerKey::of(k));
        w.join(k, ROUND, Some(inv))
    });
    assert_eq!(w.check(&by_outsider), Err("JOIN invited by a non-member"));
    let uninvited = w.with_newcomers(w.honest(1.0), &[&o[0]], |k| fresh(&w, k));
    assert_eq!(w.check(&uninvited), Err("JOIN without an invitation"));
}

/// A decision proof of `seal`: its SEAL envelope from ballot 0's leader and COMMITs of it from
/// the members `signers` (indices).
fn decided(w: &World, seal: Seal, signers: &[usize]) -> DecisionProof {
    let leader = w.st.leader(0).expect("a leader");
    let h = seal.hash();
    let env = w.sign(
        w.key(leader),
        Body::Seal(Propose {
            ballot: 0,
            seal,
            promises: Vec::new(),
        }),
    );
    let commit = commit_of(w, h);
    let commits = signers
        .iter()
        .map(|i| w.sign(&w.keys[*i], Body::Commit(commit)))
        .collect();
    DecisionProof {
        seal: env,
        commits,
        reconfigs: Vec::new(),
    }
}

fn commit_of(w: &World, seal: Hash) -> Commit {
    Commit {
        ballot: 0,
        seal,
        next_chain: Hash::of_parts(&[&w.st.chain.0, &seal.0]),
        state: Hash::of(b"state"),
    }
}

/// What a peer replaying a round checks in its decision proof (`State::verify_proof`): the
/// SEAL envelope of this run, round and chain from the ballot's leader, a SEAL that passes
/// every acceptor check, and a quorum of distinct members' valid COMMITs that agree on it.
#[test]
fn a_decision_proof_is_checked_field_by_field() {
    let w = World::new();
    let (run, round, chain) = (w.st.cfg.run, w.st.round, w.st.chain);
    let good = decided(&w, w.honest(1.0), &[0, 1, 2]);
    assert!(w.st.verify_proof(&good).is_ok());
    assert!(w
        .st
        .verify_proof(&decided(&w, w.honest(1.0), &[0, 1, 2, 3]))
        .is_ok());
    let leader = w.key(w.st.leader(0).unwrap()).clone();
    let resign = |key: &SigningKey, run: Hash, round: u64, chain: Hash| {
        let mut p = good.clone();
        p.seal = Envelope::sign(key, run, round, chain, good.seal.body.clone());
        p
    };
    let not_leader = w
        .keys
        .iter()
        .find(|k| PeerKey::of(k) != PeerKey::of(&leader))
        .unwrap()
        .clone();
    let mut forged = good.clone();
    forged.seal.sig.0[1] ^= 1;
    let mut not_a_seal = good.clone();
    not_a_seal.seal = Envelope::sign(&leader, run, round, chain, Body::Prepare(0));
    let mut invalid = w.honest(1.0);
    invalid.close.contributors.clear();
    let mut bad_seal = decided(&w, invalid, &[0, 1, 2]);
    bad_seal.commits = good.commits.clone();
    let commit = commit_of(&w, w.honest(1.0).hash());
    let with_commit = |i: usize, e: Envelope| {
        let mut p = good.clone();
        p.commits[i] = e;
        p
    };
    let sign_commit = |k: &SigningKey, c: Commit, run: Hash, round: u64, chain: Hash| -> Envelope {
        Envelope::sign(k, run, round, chain, Body::Commit(c))
    };
    let mut forged_commit = good.clone();
    forged_commit.commits[2].sig.0[0] ^= 1;
    let mut twice = good.clone();
    twice.commits[2] = twice.commits[0].clone();
    let mut too_many = good.clone();
    for _ in 0..3 {
        too_many.commits.push(good.commits[0].clone());
    }
    let k2 = &w.keys[2];
    // Every COMMIT changed alike: they agree with each other, so only the comparison with
    // the SEAL can refuse them.
    let all_commits = |c: Commit| {
        let mut p = good.clone();
        p.commits = [0, 1, 2]
            .iter()
            .map(|i| sign_commit(&w.keys[*i], c, run, round, chain))
            .collect();
        p
    };
    let cases = vec![
        (
            "every COMMIT of another SEAL",
            all_commits(Commit {
                seal: Hash::of(b"s"),
                ..commit
            }),
        ),
        (
            "every COMMIT under another ballot",
            all_commits(Commit {
                ballot: 1,
                ..commit
            }),
        ),
        (
            "a SEAL of another run",
            resign(&leader, Hash::of(b"x"), round, chain),
        ),
        (
            "a SEAL of another round",
            resign(&leader, run, round + 1, chain),
        ),
        (
            "a SEAL under another chain",
            resign(&leader, run, round, Hash::of(b"y")),
        ),
        (
            "a SEAL not from the ballot's leader",
            resign(&not_leader, run, round, chain),
        ),
        ("a forged SEAL signature", forged),
        ("no SEAL", not_a_seal),
        ("a SEAL that fails the acceptors' checks", bad_seal),
        ("two COMMITs", {
            let mut p = good.clone();
            p.commits.truncate(2);
            p
        }),
        ("one member's COMMIT twice", twice),
        ("more COMMITs than members", too_many),
        ("a forged COMMIT", forged_commit),
        (
            "a COMMIT that is no COMMIT",
            with_commit(2, w.sign(k2, Body::Prepare(0))),
        ),
        (
            "a COMMIT of another run",
            with_commit(2, sign_commit(k2, commit, Hash::of(b"x"), round, chain)),
        ),
        (
            "a COMMIT of another round",
            with_commit(2, sign_commit(k2, commit, run, round + 1, chain)),
        ),
        (
            "a COMMIT under another chain",
            with_commit(2, sign_commit(k2, commit, run, round, Hash::of(b"y"))),
        ),
        (
            "a COMMIT of another SEAL",
            with_commit(
                2,
                sign_commit(
                    k2,
                    Commit {
                        seal: Hash::of(b"s"),
                        ..commit
                    },
                    run,
                    round,
                    chain,
                ),
            ),
        ),
        (
            "a COMMIT under another ballot",
            with_commit(
                2,
                sign_commit(
                    k2,
                    Commit {
                        ballot: 1,
                        ..commit
                    },
                    run,
                    round,
                    chain,
                ),
            ),
        ),
        (
            "a COMMIT of another state",
            with_commit(
                2,
                sign_commit(
                    k2,
                    Commit {
                        state: Hash::of(b"other"),
                        ..commit
                    },
                    run,
                    round,
                    chain,
                ),
            ),
        ),
        (
            "a non-member's COMMIT",
            with_commit(2, sign_commit(&w.outsiders[0], commit, run, round, chain)),
        ),
    ];
    for (what, p) in cases {
        assert!(w.st.verify_proof(&p).is_err(), "a proof with {what} passed");
    }
}

/// What `on_seal` itself refuses before anything is applied: a SEAL under a ballot above this
/// peer's bound (its ballot is checked before the SEAL, reason `BallotAhead`), and a fresh
/// SEAL (no certified PROMISE) that evicts a member this peer heard lately; evicting a silent
/// member passes.
#[test]
fn on_seal_refuses_ballots_ahead_and_fresh_seals_evicting_members_heard_lately() {
    use crate::averaging::{OutEvent, Reject};
    use std::sync::Arc;
    let mut w = World::new();
    let gone = PeerKey::of(&w.keys[3]);
    let close = Close {
        ballot: 0,
        contributors: w.keys[..3].iter().map(|k| w.contributor(k, 1.0)).collect(),
    };
    let mut seal = w.seal_of(close);
    seal.next_members.retain(|p| *p != gone);
    assert_eq!(w.check(&seal), Ok(()));
    let propose = |w: &World, ballot: u32| {
        let leader = w.st.leader(ballot).unwrap();
        let body = Body::Seal(Propose {
            ballot,
            seal: seal.clone(),
            promises: Vec::new(),
        });
        Arc::new(w.sign(w.key(leader), body))
    };
    let rejections = |st: &mut State| -> Vec<Reject> {
        std::mem::take(&mut st.out)
            .into_iter()
            .filter_map(|e| match e {
                OutEvent::Rejected { reason, .. } => Some(reason),
                _ => None,
            })
            .collect()
    };
    w.st.now = 1_000;
    w.st.r.reference = Some(1_000);
    let ahead = propose(&w, 7);
    w.st.on_seal(ahead, 7);
    assert_eq!(
        rejections(&mut w.st),
        vec![Reject::BallotAhead {
            ballot: 7,
            bound: 0
        }]
    );
    w.st.last_heard.insert(gone, ROUND);
    let fresh = propose(&w, 0);
    w.st.on_seal(fresh.clone(), 0);
    assert_eq!(
        rejections(&mut w.st),
        vec![Reject::Malformed("a member evicted that is not silent")]
    );
    assert!(w.st.r.proposals.is_empty());
    w.st.last_heard.remove(&gone);
    w.st.on_seal(fresh, 0);
    assert_eq!(rejections(&mut w.st), Vec::<Reject>::new());
    assert_eq!(w.st.r.proposals.len(), 1);
}
