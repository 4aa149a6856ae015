//! Simulator properties over many seeds (`SEED=n` replays one seed, `SEEDS=n` sets the count).

use diloco_protocol::averaging::{max_joins, Admission, Quorum, Reject, Rule};
use diloco_protocol::codec::Quantization;
use diloco_protocol::sim::{self, Attack, Fault, Report, SimConfig};

fn check_safety(seed: u64, r: &Report) {
    if let Err(e) = r.decided_history() {
        panic!("seed {seed}: two SEALs decided: {e}");
    }
}

/// All live honest synced peers at the same round hold the same state.
fn check_identical(seed: u64, r: &Report) {
    let hist = r.decided_history().unwrap();
    for (i, s) in r.final_state.iter().enumerate() {
        let (Some((round, hash)), true) = (s, r.honest[i]) else {
            continue;
        };
        if *round == 0 {
            continue;
        }
        let (_, want) = hist.get(&(round - 1)).unwrap_or_else(|| {
            panic!("seed {seed}: peer {i} at round {round} with no decided history")
        });
        assert_eq!(
            hash, want,
            "seed {seed}: peer {i} state differs at round {round}"
        );
    }
}

/// Safe, identical, and every peer reached the configured number of rounds.
fn check_decides_all(seed: u64, c: &SimConfig, r: &Report) {
    check_safety(seed, r);
    check_identical(seed, r);
    assert!(
        r.min_round() >= c.rounds,
        "seed {seed}: reached only {} of {} (members up to {:?})",
        r.min_round(),
        c.rounds,
        r.max_members
    );
}

fn base(seed: u64, n: usize) -> SimConfig {
    let mut c = SimConfig::new(seed, n);
    c.rounds = 4;
    c
}

#[test]
fn no_faults_every_round_decides_and_matches_central_mean() {
    for seed in sim::seeds(200) {
        let n = 3 + (seed % 6) as usize;
        let mut c = base(seed, n);
        c.proto.codec =
            [Quantization::F32, Quantization::F16, Quantization::Int8][(seed % 3) as usize];
        let r = sim::run(c.clone());
        check_safety(seed, &r);
        check_identical(seed, &r);
        assert!(
            r.min_round() >= c.rounds,
            "seed {seed}: only {} rounds",
            r.min_round()
        );
        assert!(
            r.rejections.is_empty(),
            "seed {seed}: {:?}",
            &r.rejections[..1]
        );
        // Compare with the central computation at the round the peers reached.
        let (_, round, theta) = &r.thetas[0];
        let central = sim::central_reference(&c, *round);
        let tol = match c.proto.codec {
            Quantization::F32 => 1e-5,
            Quantization::F16 => 1e-3,
            _ => 2e-2,
        };
        for (a, b) in theta.iter().zip(&central) {
            assert!(
                (a - b).abs() <= tol * (1.0 + b.abs()),
                "seed {seed}: {a} vs {b}"
            );
        }
        assert_eq!((r.oversized_gossip, r.wire_errors), (0, 0), "seed {seed}");
        // Bandwidth: data bytes per peer per round within 1.1 x 2S(n-1)/n.
        let bound = 1.1 * 2.0 * r.vector_bytes as f64 * (n as f64 - 1.0) / n as f64;
        assert!(
            r.max_data_bytes_per_round as f64 <= bound,
            "seed {seed}: {} data bytes > {bound}",
            r.max_data_bytes_per_round
        );
    }
}

#[test]
fn crashes_at_every_phase_boundary_keep_deciding() {
    let kinds = ["READY", "PUSH", "CLOSE", "AGG", "SEAL", "COMMIT"];
    for seed in sim::seeds(200) {
        let n = 5 + (seed % 3) as usize;
        let mut c = base(seed, n);
        c.max_time = 120_000;
        let kind = kinds[(seed % kinds.len() as u64) as usize];
        let round = 1 + seed % 2;
        if seed % 4 == 0 {
            // Closer and an owner together (3 of 5 or more survive: still a majority).
            c.faults.push(Fault::CrashWhen {
                round,
                kind: "AGG",
                count: 1,
            });
            c.faults.push(Fault::CrashWhen {
                round,
                kind: "CLOSE",
                count: 1,
            });
        } else {
            c.faults.push(Fault::CrashWhen {
                round,
                kind,
                count: 1,
            });
        }
        let r = sim::run(c.clone());
        check_safety(seed, &r);
        check_identical(seed, &r);
        assert!(
            r.min_round() >= c.rounds,
            "seed {seed} ({kind} crash): survivors reached only {}",
            r.min_round()
        );
    }
}

#[test]
fn partitions_minority_never_decides_and_catches_up() {
    for seed in sim::seeds(200) {
        let n = 5 + (seed % 4) as usize;
        let mut c = base(seed, n);
        c.rounds = 6;
        c.max_time = 120_000;
        let minority = match seed % 3 {
            0 => vec![0],                            // 1 vs rest
            1 => (0..(n * 3 / 10).max(1)).collect(), // 30/70
            _ => (0..(n - 1) / 2).collect(),         // as close to 50/50 as a majority allows
        };
        c.faults.push(Fault::Partition {
            side: minority.clone(),
            from: 700,
            until: 6_000,
        });
        let r = sim::run(c.clone());
        check_safety(seed, &r);
        check_identical(seed, &r);
        assert!(
            r.min_round() >= c.rounds,
            "seed {seed}: reached only {} after healing",
            r.min_round()
        );
    }
}

#[test]
fn exact_half_partition_decides_nothing_on_either_side() {
    for seed in sim::seeds(200) {
        let n = 4 + 2 * (seed % 2) as usize;
        let mut c = base(seed, n);
        c.faults.push(Fault::Partition {
            side: (0..n / 2).collect(),
            from: 0,
            until: 1_000_000,
        });
        c.max_time = 20_000;
        let r = sim::run(c);
        assert!(
            r.decided.iter().all(|d| d.is_empty()),
            "seed {seed}: a half decided alone"
        );
    }
}

#[test]
fn churn_joins_and_stale_restarts() {
    for seed in sim::seeds(200) {
        let n = 7 + (seed % 2) as usize;
        let mut c = base(seed, n);
        c.rounds = 4;
        c.max_time = 40_000;
        c.proto.evict_after_rounds = 2;
        match seed % 3 {
            0 => c.faults.push(Fault::Churn {
                frac: 0.3,
                period: 1_500,
                until: 9_000,
            }),
            1 => {
                c.faults.push(Fault::Crash { peer: 1, at: 300 });
                c.faults.push(Fault::Crash { peer: 2, at: 900 });
                c.faults.push(Fault::RestartAll {
                    at: 5_000,
                    stale_rounds: Some(2),
                });
                c.faults.push(Fault::Join { at: 2_500 });
            }
            _ => {
                c.faults.push(Fault::Join { at: 400 });
                c.faults.push(Fault::Join { at: 1_900 });
                c.faults.push(Fault::CrashWhen {
                    round: 1,
                    kind: "CLOSE",
                    count: 1,
                });
                c.faults.push(Fault::RestartAll {
                    at: 4_000,
                    stale_rounds: None,
                });
            }
        }
        let r = sim::run(c.clone());
        check_safety(seed, &r);
        check_identical(seed, &r);
        assert!(
            r.min_round() >= 1,
            "seed {seed}: stuck at {}",
            r.min_round()
        );
    }
}

#[test]
fn malicious_messages_are_rejected_and_honest_peers_agree() {
    let attacks = [
        Attack::ForgedSignature,
        Attack::WrongRun,
        Attack::Replay,
        Attack::WrongLength,
        Attack::NonFinite,
        Attack::NormLie(100.0),
        Attack::Equivocate,
    ];
    let seeds = sim::seeds(200);
    let mut hits: std::collections::HashMap<String, usize> = Default::default();
    for &seed in &seeds {
        let n = 5 + (seed % 3) as usize;
        let mut c = base(seed, n);
        c.proto.quorum = Quorum::TwoThirds;
        let attack = attacks[(seed % attacks.len() as u64) as usize];
        c.malicious.push((n - 1, attack));
        c.max_time = 120_000;
        let r = sim::run(c.clone());
        check_safety(seed, &r);
        check_identical(seed, &r);
        assert!(
            r.min_round() >= c.rounds,
            "seed {seed} {attack:?}: reached only {}",
            r.min_round()
        );
        let from_attacker: Vec<&Reject> = r
            .rejections
            .iter()
            .filter(|(_, f, _, _)| *f == n - 1)
            .map(|(_, _, _, why)| why)
            .collect();
        let expected = match attack {
            Attack::ForgedSignature => r
                .rejections
                .iter()
                .any(|(_, _, _, w)| matches!(w, Reject::Wire(_))),
            Attack::WrongRun | Attack::Replay => {
                from_attacker.iter().any(|w| matches!(w, Reject::Wire(_)))
            }
            Attack::WrongLength | Attack::NonFinite => from_attacker.iter().any(|w| {
                matches!(
                    w,
                    Reject::Codec(_) | Reject::WrongLength { .. } | Reject::BadProof
                )
            }),
            // Rejected when the attacker is included and an owner checks its shard; when the
            // attacker is excluded (late) nothing of it arrives: only agreement is checked.
            Attack::NormLie(_) => true,
            Attack::Equivocate => r.bans.iter().any(|(_, whom)| *whom == n - 1),
            Attack::Scaled(_)
            | Attack::FakeState
            | Attack::LyingOwner
            | Attack::FutureRounds
            | Attack::HugeBallot
            | Attack::AheadBallot(_)
            | Attack::JoinFlood(_)
            | Attack::MemberTakeover
            | Attack::SneakIn
            | Attack::SealLies
            | Attack::SybilDonors
            | Attack::EquivocatingLeader => true,
        };
        // Per seed the attacker may miss the CLOSE (then nothing of it reaches an owner); over
        // all seeds every attack must have been caught with its reason.
        if expected {
            *hits.entry(format!("{attack:?}")).or_default() += 1;
        }
        // No honest peer is ever banned.
        assert!(
            r.bans.iter().all(|(_, whom)| *whom == n - 1),
            "seed {seed}: honest peer banned"
        );
    }
    if seeds.len() >= 2 * attacks.len() {
        for a in attacks {
            assert!(
                hits.get(&format!("{a:?}")).copied().unwrap_or(0) > 0,
                "{a:?} never rejected: {hits:?}"
            );
        }
    }
}

#[test]
fn robust_rules_or_the_norm_cap_bound_a_scaled_gradient_attacker() {
    for seed in sim::seeds(200) {
        let n = 7;
        let mut clean = base(seed, n);
        clean.rounds = 1;
        let rule = match seed % 3 {
            0 => Rule::NormScreen { factor: 3.0 },
            1 => Rule::TrimmedMean { trim: 0.2 },
            // The plain mean trusts every contribution; the run's norm cap refuses the
            // attacker's READY, whose (truthful) claim is far beyond what honest members reach.
            _ => {
                let theta0 = sim::run(clean.clone())
                    .thetas
                    .first()
                    .map(|(_, _, t)| t.iter().map(|x| x * x).sum::<f32>().sqrt());
                clean.proto.norm_cap = theta0.unwrap_or(1.0);
                Rule::Mean
            }
        };
        clean.proto.rule = rule;
        let mut attacked = clean.clone();
        attacked.malicious.push((n - 1, Attack::Scaled(1000.0)));
        let a = sim::run(clean.clone());
        let b = sim::run(attacked);
        let (Some((_, _, ta)), Some((_, _, tb))) = (a.thetas.first(), b.thetas.first()) else {
            panic!("seed {seed}: no state")
        };
        // The honest update has size ~0.1 * |theta - target|; the attacker multiplies its own
        // by 1000. Robust rules keep the difference within a few honest updates.
        let diff: f32 = ta
            .iter()
            .zip(tb)
            .map(|(x, y)| (x - y) * (x - y))
            .sum::<f32>()
            .sqrt();
        let scale: f32 = ta.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!(
            diff < 0.5 * scale,
            "seed {seed} {rule:?}: moved by {diff} (|theta| = {scale})"
        );
        if rule == Rule::Mean {
            assert!(
                b.rejections.iter().any(|(_, f, kind, w)| *f == n - 1
                    && *kind == "READY"
                    && matches!(w, Reject::NormTooLarge { .. })),
                "seed {seed}: the attacker's READY was not refused"
            );
            assert!(a.rejections.is_empty(), "seed {seed}: honest READY refused");
        }
    }
}

#[test]
fn same_seed_same_trace() {
    for seed in sim::seeds(200).into_iter().take(50) {
        let mut c = base(seed, 6);
        c.loss = 0.05;
        c.dup = 0.05;
        c.faults.push(Fault::CrashWhen {
            round: 1,
            kind: "CLOSE",
            count: 1,
        });
        let a = sim::run(c.clone());
        let b = sim::run(c);
        assert_eq!(a.trace, b.trace, "seed {seed}");
        assert_eq!(a.events, b.events);
    }
}

#[test]
fn lossy_gossip_still_converges() {
    for seed in sim::seeds(200) {
        let mut c = base(seed, 6);
        c.loss = 0.05;
        c.dup = 0.05;
        c.max_time = 200_000;
        c.slow.push((0, 1.5));
        let r = sim::run(c.clone());
        check_safety(seed, &r);
        check_identical(seed, &r);
        assert!(
            r.min_round() >= c.rounds,
            "seed {seed}: reached only {}",
            r.min_round()
        );
    }
}

/// Lost gossip must not get a live member evicted as silent. Before the fix 21 of these 200 runs
/// evicted one (down to a group of 1 in a run of 3): a member never heard from since genesis,
/// restore or state adoption counted as silent forever; a member one round late had all its
/// messages dropped as stale; a member whose COMMIT reached us only inside a decision proof went
/// unheard. An evicted member has to JOIN again, and a group of three that loses one that way and
/// then a crash has no quorum left (the Docker chaos test failed like that once).
#[test]
fn lossy_gossip_evicts_no_live_member() {
    for seed in sim::seeds(200) {
        let n = 3 + (seed % 2) as usize;
        let mut c = base(seed, n);
        c.rounds = 8;
        c.loss = 0.05;
        c.max_time = 400_000;
        let r = sim::run(c.clone());
        check_safety(seed, &r);
        check_identical(seed, &r);
        assert!(
            r.min_round() >= c.rounds,
            "seed {seed}: reached only {}",
            r.min_round()
        );
        assert_eq!(
            r.min_members,
            Some(n),
            "seed {seed}: a live member was evicted"
        );
    }
}

/// With a small gossip limit, CLOSE, SEAL and PROMISE go out as ANNOUNCE + direct fetch (as
/// they do above ~500 contributors under the real 64 KiB cap): under loss, duplication and
/// crashes of the announcer every round still decides, and every gossip fits its cap.
#[test]
fn announced_envelopes_under_loss_and_crashes() {
    let mut announced = 0;
    for seed in sim::seeds(200) {
        let n = 5 + (seed % 3) as usize;
        let mut c = base(seed, n);
        c.rounds = 3;
        c.max_time = 120_000;
        c.proto.gossip_limit = 700;
        c.loss = 0.03;
        c.dup = 0.03;
        if seed % 2 == 0 {
            let kind = ["CLOSE", "SEAL", "ANNOUNCE"][(seed / 2 % 3) as usize];
            c.faults.push(Fault::CrashWhen {
                round: 1,
                kind,
                count: 1,
            });
        }
        let r = sim::run(c.clone());
        check_safety(seed, &r);
        check_identical(seed, &r);
        assert!(
            r.min_round() >= c.rounds,
            "seed {seed}: reached only {}",
            r.min_round()
        );
        assert_eq!((r.oversized_gossip, r.wire_errors), (0, 0), "seed {seed}");
        assert!(
            r.max_gossip_bytes <= 700,
            "seed {seed}: {}",
            r.max_gossip_bytes
        );
        announced += r.announces;
    }
    assert!(announced > 0, "nothing was announced");
}

/// A joiner asks two donors and compares: a donor that fabricates a later "decided" state
/// signed only by itself is reported and never adopted; joiners end on the honest history.
#[test]
fn joiner_cross_checks_donors_against_a_fake_state() {
    let mut caught = 0;
    for seed in sim::seeds(200) {
        let n = 6 + (seed % 2) as usize;
        let mut c = base(seed, n);
        c.rounds = 7;
        c.max_time = 60_000;
        c.malicious.push((n - 1, Attack::FakeState));
        c.faults.push(Fault::Join {
            at: 300 + (seed % 5) * 150,
        });
        c.faults.push(Fault::Join { at: 1_000 });
        let r = sim::run(c.clone());
        check_safety(seed, &r);
        check_identical(seed, &r);
        assert_eq!(
            r.final_state.len(),
            n + 2,
            "seed {seed}: joiners missing; end {} {:?}",
            r.end_time,
            r.final_state
        );
        for j in [n, n + 1] {
            assert!(
                matches!(r.final_state[j], Some((round, _)) if round >= 2),
                "seed {seed}: joiner {j} not synced: {:?}",
                r.final_state[j]
            );
        }
        caught += r
            .rejections
            .iter()
            .filter(|(to, from, kind, _)| *to >= n && *from == n - 1 && *kind == "STATE")
            .count();
    }
    assert!(caught > 0, "the fake state was never reported");
}

/// A full state is large: when it takes longer than `retry` to arrive, joiners must not ask for
/// it again every `retry` (each ask makes a donor upload the whole state). Two joiners, states
/// that take ~3.5 × retry to arrive: both sync, honestly, with a handful of transfers each.
/// (Asking two contacts every retry, as before, sent 17.1 states per run on average, up to 22;
/// now 5.4, up to 13. Some are unavoidable: a joiner whose state arrives more than a round
/// late is sent the state once more to catch up.)
#[test]
fn slow_state_transfers_are_not_requested_again_and_again() {
    let (mut states, mut requests, mut runs) = (0, 0, 0);
    for seed in sim::seeds(100) {
        let n = 5 + (seed % 2) as usize;
        let mut c = base(seed, n);
        c.rounds = 8;
        c.max_time = 60_000;
        // theta + momentum in f32: 8 bytes per parameter, over ~3.5 retry periods.
        let state_bytes = 8 * c.len as u64;
        c.state_bandwidth = Some(state_bytes / (c.proto.retry * 7 / 2));
        c.faults.push(Fault::Join {
            at: 400 + (seed % 5) * 200,
        });
        c.faults.push(Fault::Join { at: 1_500 });
        let r = sim::run(c.clone());
        check_safety(seed, &r);
        check_identical(seed, &r);
        for j in [n, n + 1] {
            assert!(
                matches!(r.final_state[j], Some((round, _)) if round >= 3),
                "seed {seed}: joiner {j} not synced: {:?}",
                r.final_state[j]
            );
        }
        // Two to start, one more in flight until two agree; never two per retry.
        assert!(
            r.states_sent <= 14,
            "seed {seed}: {} states sent for two joiners ({} requests)",
            r.states_sent,
            r.state_requests
        );
        states += r.states_sent;
        requests += r.state_requests;
        runs += 1;
    }
    eprintln!("{runs} runs: {states} states sent, {requests} requested");
    assert!(
        states <= 8 * runs,
        "{states} states sent in {runs} runs: more than 8 per run on average"
    );
}

/// An owner that gossips AGGs for a sign-flipped aggregate (same norm, so the norm check
/// passes) is caught by the random-projection audits: its aggregate is never sealed, it is
/// rejected with `AuditFailed`, and honest peers agree.
#[test]
fn audits_keep_a_lying_owner_out_of_every_seal() {
    let (mut told, mut caught, mut by_projection) = (0, 0, 0);
    for seed in sim::seeds(200) {
        let n = 5 + (seed % 3) as usize;
        let mut c = base(seed, n);
        c.rounds = 3;
        c.max_time = 60_000;
        c.malicious.push((n - 1, Attack::LyingOwner));
        let r = sim::run(c.clone());
        check_safety(seed, &r);
        check_identical(seed, &r);
        assert!(
            r.min_round() >= c.rounds,
            "seed {seed}: reached only {}",
            r.min_round()
        );
        assert_eq!(r.lies_sealed, 0, "seed {seed}: a lie was sealed");
        told += r.lies_told;
        caught += r
            .rejections
            .iter()
            .filter(|(_, f, _, w)| {
                *f == n - 1
                    && matches!(
                        w,
                        Reject::AuditFailed { .. }
                            | Reject::Malformed("AGG not audited by its own owner")
                    )
            })
            .count();
        by_projection += r
            .rejections
            .iter()
            .filter(|(_, f, _, w)| *f == n - 1 && matches!(w, Reject::AuditFailed { .. }))
            .count();
        // No honest owner fails an audit.
        assert!(
            r.rejections
                .iter()
                .all(|(_, f, _, w)| *f == n - 1 || !matches!(w, Reject::AuditFailed { .. })),
            "seed {seed}: honest aggregate failed its audit"
        );
    }
    println!("lies told {told}, rejected {caught}, of which by projection {by_projection}");
    assert!(told > 0 && caught > 0, "told {told}, caught {caught}");
    if sim::seeds(200).len() >= 20 {
        assert!(by_projection > 0, "no lie was caught by its projections");
    }
}

/// A member restored from a disk several rounds stale catches up with one state transfer (its
/// decided rounds jump) instead of replaying round by round, adopts only a state a quorum of its
/// own members signed (a donor answering every sync with a fabricated state signed by itself
/// alone is never adopted), and ends identical to the others.
#[test]
fn stale_member_takes_a_state_transfer_not_a_fake_one() {
    let mut jumped = 0;
    for seed in sim::seeds(200) {
        let n = 5 + (seed % 2) as usize;
        let mut c = base(seed, n);
        c.rounds = 14;
        c.max_time = 60_000;
        c.malicious.push((n - 1, Attack::FakeState));
        c.faults.push(Fault::Crash {
            peer: 1,
            at: 1_500 + (seed % 4) * 200,
        });
        c.faults.push(Fault::RestartAll {
            at: 4_500,
            stale_rounds: Some(1),
        });
        let r = sim::run(c.clone());
        check_safety(seed, &r);
        check_identical(seed, &r);
        let top = r
            .final_state
            .iter()
            .flatten()
            .map(|(round, _)| *round)
            .max()
            .unwrap_or(0);
        assert!(
            matches!(r.final_state[1], Some((round, _)) if round + 1 >= top),
            "seed {seed}: restored peer did not catch up: {:?} vs round {top} (end {} ms, decided {:?})",
            r.final_state[1],
            r.end_time,
            r.decided[1].iter().map(|d| d.0).collect::<Vec<_>>()
        );
        let rounds: Vec<u64> = r.decided[1].iter().map(|(round, ..)| *round).collect();
        if rounds.windows(2).any(|w| w[1] > w[0] + 1) {
            jumped += 1;
        }
    }
    assert!(jumped > 0, "no restored peer ever took a state transfer");
}

/// A peer that saw a quorum of COMMITs but lost the SEAL asks a committer for the decision
/// proof; that proof must be taken, not dropped because the peer is "awaiting a decision" (it
/// then fell back to a whole state transfer: 85 needless transfers in 40 runs at 10 % loss).
/// With no crash, join or partition no peer ever needs a state.
#[test]
fn a_peer_that_missed_only_the_seal_takes_the_decision_proof() {
    let mut transfers = 0;
    for seed in sim::seeds(200) {
        let mut c = base(seed, 4);
        c.rounds = 6;
        c.loss = 0.10;
        c.max_time = 400_000;
        let r = sim::run(c.clone());
        check_decides_all(seed, &c, &r);
        if r.states_sent > 0 {
            eprintln!("seed {seed}: {} state transfers", r.states_sent);
        }
        transfers += r.states_sent;
    }
    assert_eq!(transfers, 0, "state transfers in runs that needed none");
}

/// Sybil joiners: a member gossips JOINs from six fresh keys every round, keys that never train
/// or vote. Admission is bounded per round (`max_joins`), and silent members are evicted, so
/// the member list stays bounded and the honest members keep a quorum: every round decides.
/// Without the bound the list grew to 25 and the run stalled at round 2.
#[test]
fn a_join_flood_neither_grows_the_group_without_bound_nor_stalls_it() {
    for seed in sim::seeds(200) {
        let n = 5;
        let mut c = base(seed, n);
        c.rounds = 8;
        c.malicious.push((n - 1, Attack::JoinFlood(6)));
        c.max_time = 400_000;
        let r = sim::run(c.clone());
        check_decides_all(seed, &c, &r);
        // One round's newcomers at a time: they are evicted by the next SEAL.
        let bound = n + max_joins(n);
        assert!(
            r.max_members.is_some_and(|m| m <= bound),
            "seed {seed}: the group grew to {:?} (bound {bound})",
            r.max_members
        );
    }
}

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
