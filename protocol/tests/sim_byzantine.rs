//! Simulator properties against Byzantine members, Sybils and lost quorums: leaders that equivocate,
//! forge or take over, early ballots, late messages, join floods, admission policies, operator
//! reconfiguration (`SEED=n` replays one seed, `SEEDS=n` sets the count).

mod common;

use common::{base, check_decides_all, check_identical, check_safety};
use diloco_protocol::averaging::{Admission, Quorum, Reject};
use diloco_protocol::sim::{self, Attack, Fault};

/// A member that PREPAREs ballots no honest leader can have reached: near `u32::MAX` with every
/// READY (`HugeBallot`), or up to eight slots ahead of the round's ballot with its READY and
/// every PROMISE it gives (`AheadBallot(8)`), never proposing under them. Peers refuse a ballot
/// ahead of their own clock (`BallotAhead`), so the honest ballots decide every round. Without
/// the bound every peer promised the huge ballot and no round decided after the first READY;
/// with a bound several slots wide the run stalls behind the attacker's ballots.
#[test]
fn ballots_ahead_of_their_time_neither_fork_nor_stall_the_run() {
    let mut refused = std::collections::BTreeMap::new();
    for seed in sim::seeds(200) {
        let n = 4 + (seed % 4) as usize;
        let mut c = base(seed, n);
        c.proto.quorum = if seed % 2 == 0 {
            Quorum::TwoThirds
        } else {
            Quorum::Majority
        };
        let attack = if seed % 3 == 0 {
            Attack::HugeBallot
        } else {
            Attack::AheadBallot(8)
        };
        c.malicious.push((n - 1, attack));
        c.max_time = 200_000;
        let r = sim::run(c.clone());
        check_decides_all(seed, &c, &r);
        *refused.entry(format!("{attack:?}")).or_insert(0) += r
            .rejections
            .iter()
            .filter(|(_, f, kind, w)| {
                *f == n - 1 && *kind == "PREPARE" && matches!(w, Reject::BallotAhead { .. })
            })
            .count();
    }
    if sim::seeds(200).len() >= 3 {
        assert!(
            refused.len() == 2 && refused.values().all(|&k| k > 0),
            "ballots ahead of their time were not refused: {refused:?}"
        );
    }
}

/// A Byzantine leader (`EquivocatingLeader`, n = 4–7 under `two-thirds`): it signs two SEALs
/// under each ballot it leads (the honest one to half the peers, one with every shard MISSING
/// to the others), sends its COMMITs to one peer only, so that at most that peer decides and
/// the others fail over, and claims in its PROMISEs to have accepted the other SEAL. The
/// honest peers never decide two SEALs for one round and decide every round.
#[test]
fn a_byzantine_leader_cannot_fork_the_run() {
    for seed in sim::seeds(200) {
        let n = 4 + (seed % 4) as usize;
        let mut c = base(seed, n);
        c.proto.quorum = Quorum::TwoThirds;
        c.malicious.push((n - 1, Attack::EquivocatingLeader));
        // Training far longer than a ballot: the one peer that decided speaks again only after
        // the others have failed over.
        c.train_time = 30_000;
        c.max_time = 600_000;
        let r = sim::run(c.clone());
        check_decides_all(seed, &c, &r);
    }
}

/// Messages that are very late: 20 % of all messages take up to three ballot slots longer
/// (congested links; messages overtake each other). A member that promised a ballot may then
/// receive a lower ballot's SEAL, or finish applying one, after the new leader was told that
/// nothing was certified: it must neither ACCEPT nor COMMIT it, or two SEALs are decided.
#[test]
fn late_messages_neither_fork_nor_stall_the_run() {
    for seed in sim::seeds(200) {
        let n = 3 + (seed % 5) as usize;
        let mut c = base(seed, n);
        c.proto.quorum = if seed % 2 == 0 {
            Quorum::TwoThirds
        } else {
            Quorum::Majority
        };
        c.spikes = (0.2, 3 * c.proto.attempt_timeout);
        c.max_time = 300_000;
        let r = sim::run(c.clone());
        check_decides_all(seed, &c, &r);
    }
}

/// Members that crash early in a round and restart from their disks several ballot slots
/// later, when the survivor's ballots have moved on and the round needs them to decide: they
/// take the survivor's ballots on the evidence of its PROMISE (`ballot_bound`), not only on
/// their own clock, so the round decides. With the clock alone a late peer refused the
/// leader's ballots forever (both advance one per attempt timeout).
#[test]
fn members_restarted_into_a_round_catch_up_with_its_ballots() {
    for seed in sim::seeds(200) {
        let n = 2 + (seed % 2) as usize;
        let mut c = base(seed, n);
        c.rounds = 3;
        for peer in 1..n {
            c.faults.push(Fault::Crash {
                peer,
                at: 50 + seed % 300,
            });
        }
        c.faults.push(Fault::RestartAll {
            at: 6_000 + (seed % 5) * 1_000,
            stale_rounds: Some(0),
        });
        c.max_time = 120_000;
        let r = sim::run(c.clone());
        check_decides_all(seed, &c, &r);
    }
}

/// A leader that seals a member list with five made-up keys added: acceptors refuse the SEAL
/// (more newcomers than a round admits), the next ballot's leader decides the round, and the
/// made-up keys never become members.
#[test]
fn a_leader_cannot_fill_the_group_with_its_own_keys() {
    leader_seals_no_key_in(
        Attack::MemberTakeover,
        None,
        "more newcomers than a round admits",
    );
}

/// A malicious last peer leads some rounds and seals, one lie a round, what no one signed:
/// every other member evicted, a contributor's READY altered, a shard's weight inflated, a
/// shard credited to an owner never designated, an aggregate its owner never signed, a
/// made-up CLOSE id. Every round still
/// decides (under the next ballot), nobody is evicted, the replicas stay identical, and over
/// the seeds each lie is refused with its reason.
#[test]
fn a_leader_cannot_seal_what_its_signers_did_not_sign() {
    let lies = [
        "a contributor evicted",
        "a contributor without its signed READY",
        "a shard's weight is not its contributors'",
        "a shard of no designated owner",
        "a shard without its owner's signed AGG",
        "a CLOSE id that is not its CLOSE's",
    ];
    let mut refused: std::collections::BTreeMap<&str, usize> = Default::default();
    for seed in sim::seeds(200) {
        let n = 4 + (seed % 3) as usize;
        let mut c = base(seed, n);
        c.rounds = 7;
        c.malicious.push((n - 1, Attack::SealLies));
        c.max_time = 400_000;
        let r = sim::run(c.clone());
        check_decides_all(seed, &c, &r);
        assert_eq!(
            (r.min_members, r.max_members),
            (Some(n), Some(n)),
            "seed {seed}: a lying SEAL changed the group"
        );
        for (_, _, kind, w) in &r.rejections {
            if let (true, Reject::Malformed(m)) = (*kind == "SEAL", w) {
                *refused.entry(m).or_default() += 1;
            }
        }
    }
    if sim::seeds(200).len() >= 20 {
        for why in lies {
            assert!(
                refused.get(why).copied().unwrap_or(0) > 0,
                "no lying SEAL refused with '{why}': {refused:?}"
            );
        }
    }
}

/// A malicious last peer leads some rounds and seals keys of its own into the member list:
/// every round still decides, the group never grows, and acceptors refuse such a SEAL with
/// `why` in some seed.
fn leader_seals_no_key_in(
    attack: Attack,
    admission: Option<fn(Vec<diloco_protocol::wire::PeerKey>) -> Admission>,
    why: &'static str,
) {
    let mut refused = 0;
    for seed in sim::seeds(200) {
        let n = 4 + (seed % 3) as usize;
        let mut c = base(seed, n);
        c.admission = admission;
        c.malicious.push((n - 1, attack));
        c.max_time = 300_000;
        let r = sim::run(c.clone());
        check_decides_all(seed, &c, &r);
        assert_eq!(
            r.max_members,
            Some(n),
            "seed {seed}: {attack:?} put a key of its own in"
        );
        refused += r
            .rejections
            .iter()
            .filter(|(_, f, kind, w)| {
                *f == n - 1 && *kind == "SEAL" && matches!(w, Reject::Malformed(m) if *m == why)
            })
            .count();
    }
    assert!(refused > 0, "no {attack:?} SEAL was refused with '{why}'");
}

/// Five honest joiners arrive at once at a group of three: leaders admit at most `max_joins`
/// a round (a SEAL with more is refused by every acceptor), so they come in over a few rounds
/// and every one of them ends up a member.
#[test]
fn many_joiners_at_once_are_admitted_a_few_a_round() {
    for seed in sim::seeds(200) {
        let n = 3;
        let mut c = base(seed, n);
        c.rounds = 10;
        c.max_time = 400_000;
        for _ in 0..5 {
            c.faults.push(Fault::Join { at: 400 });
        }
        let r = sim::run(c.clone());
        check_decides_all(seed, &c, &r);
        assert_eq!(
            r.max_members,
            Some(n + 5),
            "seed {seed}: not every joiner got in"
        );
    }
}

/// Sybil donors: two malicious members (n = 7, two-thirds tolerates two) and two keys of
/// theirs that are no members gossip copies of their READYs three rounds ahead and answer
/// every sync or state request with one fabricated State, signed by the two keys and both
/// malicious members, which one key also sends every peer unasked. Honest peers never ask an
/// outsider (`syncs_to_strangers`), refuse the unasked State, and refuse the two members'
/// agreeing State because it is signed by only two of their seven members (more than a third
/// is needed): every round decides, one history. In half the seeds two honest peers crash and
/// restart from a checkpoint a round old: their own members bring them up to date before they
/// would listen to strangers. Before, a synced peer that was "behind" cross-checked two donors
/// like a joiner and took the fabricated state.
#[test]
fn sybil_donors_cannot_hand_a_member_a_state() {
    let (mut unasked, mut unsigned) = (0, 0);
    for seed in sim::seeds(200) {
        let n = 7;
        let mut c = base(seed, n);
        c.proto.quorum = Quorum::TwoThirds;
        c.rounds = 5;
        c.malicious.push((n - 1, Attack::SybilDonors));
        c.malicious.push((n - 2, Attack::SybilDonors));
        c.max_time = 300_000;
        if seed % 2 == 1 {
            // Restored peers trust only their members until a decision confirms them. They
            // stay members while down: evicting them would leave the two attackers 2 of 5, more
            // than `two-thirds` tolerates (then a third of the members vouching for a State is
            // no longer proof that an honest one did).
            c.proto.evict_after_rounds = 1_000;
            c.rounds = 8;
            c.faults.push(Fault::Crash { peer: 0, at: 900 });
            c.faults.push(Fault::Crash { peer: 1, at: 1_300 });
            c.faults.push(Fault::RestartAll {
                at: 2_500,
                stale_rounds: Some(1),
            });
        }
        let r = sim::run(c.clone());
        check_decides_all(seed, &c, &r);
        assert_eq!(
            r.syncs_to_strangers, 0,
            "seed {seed}: an honest peer asked a non-member for a state"
        );
        for (_, _, kind, why) in &r.rejections {
            match (*kind, why) {
                ("STATE", Reject::NotAllowed("a State nobody asked for")) => unasked += 1,
                ("STATE", Reject::BadDecision("state not signed by a third of our members")) => {
                    unsigned += 1
                }
                _ => {}
            }
        }
    }
    assert!(unasked > 0, "no unasked State was refused");
    assert!(
        unsigned > 0,
        "no State signed by too few of our members was refused"
    );
}

/// A peer restarted from a checkpoint of another history (one it abandoned: a member list and
/// chain nobody in the run shares) is not confirmed by any decision yet, so it listens to the
/// run's later rounds from non-members and takes a state two donors agree on, as a joiner does;
/// then it is confirmed and trusts only its members again. Without that fallback it stayed
/// behind for good (no member of its list ever spoke).
#[test]
fn a_peer_restored_into_a_foreign_history_catches_up() {
    for seed in sim::seeds(200) {
        let n = 4 + (seed % 3) as usize;
        let mut c = base(seed, n);
        c.rounds = 10;
        c.max_time = 200_000;
        c.faults.push(Fault::RestartForeign {
            peer: (seed % n as u64) as usize,
            at: 1_200 + (seed % 5) * 300,
        });
        let r = sim::run(c.clone());
        check_decides_all(seed, &c, &r);
    }
}

/// Admission policies. Under `invite` (the founders listed), joiners whose JOIN carries an
/// invitation signed by a member get in and uninvited ones are refused with a reason; under
/// `allowlist` (the founders only) nobody else gets in, invited or not. Every round decides.
#[test]
fn admission_policies_admit_whom_they_name_and_nobody_else() {
    let mut refused = 0;
    for seed in sim::seeds(200) {
        let n = 3 + (seed % 2) as usize;
        let mut c = base(seed, n);
        c.rounds = 8;
        c.max_time = 300_000;
        let invite = seed % 2 == 0;
        c.admission = Some(if invite {
            Admission::Invite
        } else {
            Admission::Allowlist
        });
        for at in [300, 900] {
            c.faults.push(Fault::InvitedJoin { at });
            c.faults.push(Fault::Join { at: at + 100 });
        }
        let r = sim::run(c.clone());
        check_safety(seed, &r);
        check_identical(seed, &r);
        let want = if invite { n + 2 } else { n };
        assert_eq!(
            r.max_members,
            Some(want),
            "seed {seed}: {} policy let {:?} members in (expected {want})",
            if invite { "invite" } else { "allowlist" },
            r.max_members
        );
        let founders_rounds = r.decided[..n].iter().map(Vec::len).min().unwrap_or(0);
        assert!(
            founders_rounds as u64 >= c.rounds,
            "seed {seed}: founders decided only {founders_rounds} rounds"
        );
        refused += r
            .rejections
            .iter()
            .filter(|(_, _, kind, why)| *kind == "JOIN" && matches!(why, Reject::NotAllowed(_)))
            .count();
    }
    assert!(refused > 0, "no JOIN was refused with a reason");
}

/// A leader that seals one made-up key into the member list, with a JOIN validly signed by
/// that key but no invitation: under `invite` acceptors refuse the SEAL (the policy checks
/// every newcomer's JOIN carried in the SEAL), the next ballot decides, and the key never
/// becomes a member.
#[test]
fn a_leader_cannot_sneak_an_uninvited_key_in() {
    leader_seals_no_key_in(
        Attack::SneakIn,
        Some(Admission::Invite),
        "JOIN without an invitation",
    );
}

/// Under an allowlist a joiner's trust has an anchor: every member of a history must be listed.
/// Two founders lose their disks and come back as joiners (listed keys) while a malicious
/// member and two unlisted keys of its own hand out one fabricated State (`SybilDonors`): the
/// joiners refuse it (`member list outside the allowlist`) and end identical to the others.
/// Without the check an open run's joiner takes two agreeing Sybil donors at their word.
#[test]
fn allowlisted_joiners_take_no_state_from_sybils() {
    let mut refused = 0;
    for seed in sim::seeds(200) {
        let n = 5;
        let mut c = base(seed, n);
        c.rounds = 8;
        c.max_time = 300_000;
        c.admission = Some(Admission::Allowlist);
        c.malicious.push((n - 1, Attack::SybilDonors));
        c.faults.push(Fault::Crash { peer: 0, at: 700 });
        c.faults.push(Fault::Crash { peer: 1, at: 800 });
        c.faults.push(Fault::RestartAll {
            at: 2_000 + (seed % 4) * 300,
            stale_rounds: None,
        });
        let r = sim::run(c.clone());
        check_decides_all(seed, &c, &r);
        refused += r
            .rejections
            .iter()
            .filter(|(_, _, _, w)| {
                matches!(w, Reject::BadDecision("member list outside the allowlist"))
            })
            .count();
    }
    assert!(refused > 0, "no joiner ever refused a Sybil state");
}

/// A run that lost its quorum (three of five members crash for good) stalls; the operator's
/// RECONFIG, handed to one survivor, restarts the stalled round with the two survivors, who
/// then decide every round and stay identical. On every third seed the crashed members come
/// back from their checkpoints after the reconfiguration: they still hold the old instance,
/// where they would have a quorum, and must not decide the round there (the survivors gossip
/// the RECONFIG again every retry period until the round is decided, and send a reconfigured
/// round's proof to whoever still speaks in its old instance); they follow the survivors'
/// history and end identical. On odd seeds 10 % of messages are lost: then the lost members
/// may have decided the stalled round before they crashed without any survivor seeing one of
/// its COMMITs, and the RECONFIG forks that round, the operator's risk (docs/PROTOCOL.md); the
/// survivors' histories must still agree and every peer must end in theirs. Without the
/// RECONFIG the survivors never reach the end.
#[test]
fn an_operator_reconfiguration_restarts_a_run_that_lost_its_quorum() {
    let mut overridden = 0;
    for seed in sim::seeds(200) {
        // Two survivors of five, or one of four (then a returning member cannot check the
        // survivors' state by its own members' signatures: a third of them or fewer signed
        // it; it follows the reconfigured round's proof).
        let (n, survivors) = if seed % 4 == 0 {
            (4, vec![0])
        } else {
            (5, vec![0, 1])
        };
        let mut c = base(seed, n);
        c.rounds = 8;
        c.max_time = 90_000;
        let crash_at = 1_200 + (seed % 7) * 300;
        for p in survivors.len()..n {
            c.faults.push(Fault::Crash {
                peer: p,
                at: crash_at,
            });
        }
        let lossy = seed % 2 == 1;
        if lossy {
            c.loss = 0.1;
        }
        if seed % 10 == 0 {
            let stalled = sim::run(c.clone());
            check_safety(seed, &stalled);
            assert!(
                stalled.final_state[..survivors.len()]
                    .iter()
                    .all(|s| s.is_some_and(|(round, _)| round < 8)),
                "seed {seed}: the survivors decided without a reconfiguration: {:?}",
                stalled.final_state
            );
        }
        let reconfig_at = crash_at + 15_000;
        c.faults.push(Fault::Reconfig {
            at: reconfig_at,
            survivors: survivors.clone(),
        });
        let back = seed % 3 == 0;
        if back {
            // From the latest checkpoint, or (every other time) one a round older.
            c.faults.push(Fault::RestartAll {
                at: reconfig_at + 400 + (seed % 4) * 700,
                stale_rounds: Some((seed / 3) % 2),
            });
        }
        let r = sim::run(c.clone());
        // The survivors' history: what they decided agrees, and is the run's.
        let mut history = std::collections::BTreeMap::new();
        for p in survivors.clone() {
            for (round, seal, state) in &r.decided[p] {
                let prev = history.insert(*round, (*seal, *state));
                assert!(
                    prev.is_none_or(|x| x == (*seal, *state)),
                    "seed {seed}: the survivors decided round {round} differently"
                );
            }
        }
        if r.decided_history().is_err() {
            assert!(lossy, "seed {seed}: a fork without lost messages");
            overridden += 1;
        }
        for (p, s) in r.final_state.iter().enumerate() {
            let Some((round, hash)) = s else { continue };
            if *round > 0 {
                assert_eq!(
                    history.get(&(round - 1)).map(|x| x.1),
                    Some(*hash),
                    "seed {seed}: peer {p} ends in round {round} outside the survivors' history"
                );
            }
        }
        for p in survivors.clone() {
            assert!(
                r.final_state[p].is_some_and(|(round, _)| round >= 8),
                "seed {seed}: survivor {p} did not go on after the reconfiguration: {:?} (end {} ms)",
                r.final_state,
                r.end_time
            );
        }
        if back {
            for p in survivors.len()..n {
                assert!(
                    r.final_state[p].is_some_and(|(round, _)| round >= 7),
                    "seed {seed}: member {p}, back from its checkpoint, did not catch up: {:?}",
                    r.final_state
                );
            }
        }
    }
    println!("rounds the lost members had decided, reconfigured by the operator: {overridden}");
}
