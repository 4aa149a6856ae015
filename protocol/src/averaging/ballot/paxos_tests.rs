//! Unit tests of the Paxos steps inside one round, one rule at a time: the ballot bound (the
//! peer's own clock from half a slot early, or the `n − quorum + 1`-th highest ballot its
//! members promised), PREPAREs refused as early and promised once that evidence allows,
//! PROMISEs counted only from members and never lowered, and a leader that closes its ballot
//! only with a quorum of PROMISEs for exactly that ballot.

use super::*;
use crate::averaging::{Config, OutEvent, Quorum, Tentative};
use crate::wire::Signature;
use ed25519_dalek::SigningKey;

const RUN: &[u8] = b"paxos-test";

/// `n` members under `two-thirds`, the state of the first (sorted) one, and a key that is no
/// member. The round's reference time is 1,000 ms.
fn setup(n: u8) -> (Vec<SigningKey>, SigningKey, State) {
    let mut keys: Vec<SigningKey> = (1..=n).map(|i| SigningKey::from_bytes(&[i; 32])).collect();
    keys.sort_by_key(PeerKey::of);
    let members: Vec<PeerKey> = keys.iter().map(PeerKey::of).collect();
    let mut cfg = Config::new(Hash::of(RUN), 64);
    cfg.quorum = Quorum::TwoThirds;
    cfg.attempt_timeout = 1_000;
    let mut st = State::genesis(cfg, keys[0].clone(), vec![0.0; 64], members);
    st.now = 1_000;
    st.r.reference = Some(1_000);
    (keys, SigningKey::from_bytes(&[0xee; 32]), st)
}

fn promise_env(st: &State, key: &SigningKey, ballot: u32) -> (Arc<Envelope>, Promise) {
    let p = Promise {
        ballot,
        prepared: None,
    };
    let env = Envelope::sign(
        key,
        st.cfg.run,
        st.round,
        st.chain,
        Body::Promise(p.clone()),
    );
    (Arc::new(env), p)
}

fn promise_from(st: &mut State, key: &SigningKey, ballot: u32) {
    let (env, p) = promise_env(st, key, ballot);
    st.on_promise(env, &p);
}

/// What `pick` takes from each message this peer gossiped since `out` was last cleared.
fn gossiped<T>(st: &mut State, pick: impl Fn(&Body) -> Option<T>) -> Vec<T> {
    std::mem::take(&mut st.out)
        .into_iter()
        .filter_map(|e| match e {
            OutEvent::Gossip(env) => pick(&env.body),
            _ => None,
        })
        .collect()
}

/// The ballots this peer PROMISEd in what it gossiped since `out` was last cleared.
fn promised(st: &mut State) -> Vec<u32> {
    gossiped(st, |b| match b {
        Body::Promise(p) => Some(p.ballot),
        _ => None,
    })
}

/// The ballots this peer COMMITted under in what it gossiped since `out` was last cleared.
fn commits(st: &mut State) -> Vec<u32> {
    gossiped(st, |b| match b {
        Body::Commit(c) => Some(c.ballot),
        _ => None,
    })
}

#[test]
fn the_ballot_bound_is_the_clock_slot_from_half_a_slot_early() {
    let (_, _, mut st) = setup(4);
    let t = st.cfg.attempt_timeout;
    let early = t / BALLOT_EARLY;
    assert_eq!(st.ballot_bound(), 0);
    st.now = 1_000 + t - early - 1;
    assert_eq!(st.ballot_bound(), 0);
    st.now = 1_000 + t - early;
    assert_eq!(st.ballot_bound(), 1);
    st.now = 1_000 + 5 * t - early;
    assert_eq!(st.ballot_bound(), 5);
    st.now = 1_000 + 5 * t + early - 1;
    assert_eq!(st.ballot_bound(), 5);
    // A clock behind the reference (never in practice) counts as the reference itself.
    st.now = 10;
    assert_eq!(st.ballot_bound(), 0);
    // Without a reference yet, the first call takes now as it.
    st.r.reference = None;
    st.now = 50_000;
    assert_eq!(st.ballot_bound(), 0);
    assert_eq!(st.r.reference, Some(50_000));
}

#[test]
fn the_ballot_bound_follows_the_kth_highest_promise_of_members() {
    // Four members, quorum 3: the second-highest promise is the evidence (one of the two
    // highest promisers is honest with at most one fault).
    let (k, outsider, mut st) = setup(4);
    assert_eq!(st.quorum(), 3);
    promise_from(&mut st, &k[1], 9);
    assert_eq!(
        st.ballot_bound(),
        0,
        "one member's promise alone moves nothing"
    );
    promise_from(&mut st, &outsider, 9);
    assert_eq!(
        st.ballot_bound(),
        0,
        "a non-member's promise is no evidence"
    );
    promise_from(&mut st, &k[2], 7);
    assert_eq!(st.ballot_bound(), 7);
    promise_from(&mut st, &k[3], 8);
    assert_eq!(st.ballot_bound(), 8);
    // A member's lower promise later does not lower what it was seen to promise.
    promise_from(&mut st, &k[3], 2);
    assert_eq!(st.r.promised_by[&PeerKey::of(&k[3])], 8);
    assert_eq!(st.ballot_bound(), 8);
    // The clock still counts when it is ahead of the evidence.
    st.now = 1_000 + 12 * st.cfg.attempt_timeout;
    assert_eq!(st.ballot_bound(), 12);

    // Seven members, quorum 5: the third-highest.
    let (k, _, mut st) = setup(7);
    assert_eq!(st.quorum(), 5);
    for (key, b) in k[1..].iter().zip([20, 30, 10, 40, 5, 1]) {
        promise_from(&mut st, key, b);
    }
    assert_eq!(st.ballot_bound(), 20);
}

#[test]
fn a_prepare_is_promised_only_from_its_leader_within_the_bound_and_above_the_last_promise() {
    let (_, _, mut st) = setup(4);
    let me = st.me;
    // A ballot led by another member than me, so that every promise seen is someone else's.
    let b = (1..40).find(|b| st.leader(*b) != Some(me)).unwrap();
    let leader = st.leader(b).unwrap();
    let not_leader = *st.members.iter().find(|p| **p != leader).unwrap();
    st.now = 1_000 + u64::from(b) * st.cfg.attempt_timeout;
    st.on_prepare(not_leader, b);
    assert_eq!(
        promised(&mut st),
        Vec::<u32>::new(),
        "not the ballot's leader"
    );
    st.on_prepare(leader, b);
    assert_eq!(promised(&mut st), vec![b]);
    assert_eq!(st.r.promised, b);
    st.on_prepare(leader, b);
    assert_eq!(promised(&mut st), Vec::<u32>::new(), "promised once");
    let lower = (0..b).rev().find(|x| st.leader(*x).is_some()).unwrap();
    let lower_leader = st.leader(lower).unwrap();
    st.on_prepare(lower_leader, lower);
    assert_eq!(promised(&mut st), Vec::<u32>::new(), "below the promise");
    // A peer that may not vote in this round (it may have voted before a restart) promises
    // nothing.
    let higher = (b + 1..b + 40).find(|x| st.leader(*x).is_some()).unwrap();
    st.now = 1_000 + u64::from(higher) * st.cfg.attempt_timeout;
    st.vote_from = st.round + 1;
    st.on_prepare(st.leader(higher).unwrap(), higher);
    assert_eq!(
        promised(&mut st),
        Vec::<u32>::new(),
        "no vote in this round"
    );
    st.vote_from = 0;
    st.on_prepare(st.leader(higher).unwrap(), higher);
    assert_eq!(promised(&mut st), vec![higher]);
}

#[test]
fn a_prepare_ahead_of_the_bound_is_promised_once_members_promised_it() {
    let (k, _, mut st) = setup(4);
    let me = st.me;
    let b = (3..40).find(|b| st.leader(*b) != Some(me)).unwrap();
    let leader = st.leader(b).unwrap();
    st.on_prepare(leader, b);
    assert_eq!(promised(&mut st), Vec::<u32>::new(), "ahead of the clock");
    assert_eq!(st.r.ahead.get(&leader), Some(&b));
    // Evidence below the ballot is not enough; k = 2 members at b or above is.
    let others: Vec<&SigningKey> = k
        .iter()
        .filter(|x| PeerKey::of(x) != leader && PeerKey::of(x) != me)
        .collect();
    promise_from(&mut st, others[0], b);
    promise_from(&mut st, others[1], b - 1);
    assert_eq!(promised(&mut st), Vec::<u32>::new());
    assert_eq!(st.r.ahead.get(&leader), Some(&b));
    promise_from(&mut st, others[1], b);
    assert_eq!(
        promised(&mut st),
        vec![b],
        "retried once the bound reached it"
    );
    assert!(st.r.ahead.is_empty());
    assert_eq!(st.r.promised, b);
}

/// Per leader only its highest PREPARE refused as early is kept (a lower one after it does not
/// replace it), and that is the one promised once the evidence reaches it.
#[test]
fn of_a_leaders_prepares_ahead_the_highest_is_the_one_promised() {
    let (k, _, mut st) = setup(4);
    let me = st.me;
    let n = st.members.len() as u32;
    let b = (3..40).find(|b| st.leader(*b) != Some(me)).unwrap();
    let leader = st.leader(b).unwrap();
    assert_eq!(st.leader(b + n), Some(leader), "a leader's next ballot");
    for x in [b, b + n, b] {
        st.on_prepare(leader, x);
    }
    assert_eq!(promised(&mut st), Vec::<u32>::new());
    assert_eq!(st.r.ahead.get(&leader), Some(&(b + n)));
    let others: Vec<&SigningKey> = k
        .iter()
        .filter(|x| PeerKey::of(x) != leader && PeerKey::of(x) != me)
        .collect();
    for o in &others[..2] {
        promise_from(&mut st, o, b + n);
    }
    assert_eq!(promised(&mut st), vec![b + n]);
}

#[test]
fn a_leader_closes_its_ballot_only_with_a_quorum_of_promises_for_it() {
    let (k, _, mut st) = setup(4);
    let b = 5;
    st.r.leading = Some(Leading::Preparing {
        ballot: b,
        promises: BTreeMap::new(),
    });
    let waiting = |st: &State| matches!(st.r.leading, Some(Leading::Preparing { .. }));
    promise_from(&mut st, &k[1], b);
    promise_from(&mut st, &k[2], b + 1);
    promise_from(&mut st, &k[3], b - 1);
    promise_from(&mut st, &k[1], b);
    assert!(
        waiting(&st),
        "two of the promises are for other ballots, one is repeated"
    );
    assert!(st.r.justification.is_empty());
    promise_from(&mut st, &k[2], b);
    assert!(waiting(&st));
    promise_from(&mut st, &k[3], b);
    assert!(!waiting(&st), "a quorum of three promised ballot {b}");
    let signers: Vec<PeerKey> = st.r.justification.iter().map(|e| e.signer).collect();
    let mut want: Vec<PeerKey> = k[1..].iter().map(PeerKey::of).collect();
    want.sort();
    assert_eq!(signers, want);
}

/// The COMMIT rule, one condition at a time: a member that applied the SEAL and holds a
/// quorum of ACCEPTs for it COMMITs once; not when it is no member, may not vote in this round
/// (vote record), promised a higher ballot, already committed under this ballot or a higher
/// one, or holds fewer ACCEPTs than a quorum.
#[test]
fn a_commit_needs_every_condition_of_the_rule() {
    let b = 4;
    let seal = Hash::of(b"sealed");
    let ready = |votes: usize| {
        let (k, _, mut st) = setup(4);
        st.r.tentative.insert(
            seal,
            Tentative {
                theta: vec![0.0; 64],
                momentum: vec![0.0; 64],
                state: Hash::of(b"state"),
                next_chain: Hash::of(b"next"),
            },
        );
        let accepts = st.r.accepts.entry((b, seal)).or_default();
        for key in &k[..votes] {
            accepts.insert(PeerKey::of(key), Signature([0; 64]));
        }
        st
    };
    let mut st = ready(3);
    st.maybe_commit(b, seal);
    assert_eq!(commits(&mut st), vec![b]);
    st.maybe_commit(b, seal);
    assert_eq!(commits(&mut st), Vec::<u32>::new(), "once per ballot");

    let cases: Vec<(&str, Box<dyn Fn(&mut State)>)> = vec![
        (
            "no member",
            Box::new(|st| st.members.retain(|p| *p != st.me)),
        ),
        (
            "barred from voting",
            Box::new(|st| st.vote_from = st.round + 1),
        ),
        ("promised higher", Box::new(|st| st.r.promised = b + 1)),
        (
            "committed at this ballot",
            Box::new(|st| st.r.committed = Some(b)),
        ),
        (
            "committed higher",
            Box::new(|st| st.r.committed = Some(b + 3)),
        ),
        (
            "two ACCEPTs",
            Box::new(|st| {
                st.r.accepts.get_mut(&(b, seal)).unwrap().pop_first();
            }),
        ),
    ];
    for (what, change) in cases {
        let mut st = ready(3);
        change(&mut st);
        st.maybe_commit(b, seal);
        assert_eq!(commits(&mut st), Vec::<u32>::new(), "{what}");
    }
    // Committed under a lower ballot only: this one may still be committed.
    let mut st = ready(3);
    st.r.committed = Some(b - 1);
    st.r.promised = b;
    st.maybe_commit(b, seal);
    assert_eq!(commits(&mut st), vec![b]);
}

/// An ACCEPT under a ballot above this peer's bound is refused (`BallotAhead`) and not
/// counted; one within it is.
#[test]
fn an_accept_ahead_of_the_bound_is_not_counted() {
    let (k, _, mut st) = setup(4);
    let seal = Hash::of(b"sealed");
    let accept = |st: &State, ballot: u32| {
        Envelope::sign(
            &k[1],
            st.cfg.run,
            st.round,
            st.chain,
            Body::Accept(Accept { ballot, seal }),
        )
    };
    let env = accept(&st, 7);
    st.on_accept(&env, Accept { ballot: 7, seal });
    assert!(st.r.accepts.is_empty());
    assert!(st.out.iter().any(|e| matches!(
        e,
        OutEvent::Rejected {
            reason: Reject::BallotAhead {
                ballot: 7,
                bound: 0
            },
            ..
        }
    )));
    let env = accept(&st, 0);
    st.on_accept(&env, Accept { ballot: 0, seal });
    assert_eq!(st.r.accepts[&(0, seal)].len(), 1);
}
