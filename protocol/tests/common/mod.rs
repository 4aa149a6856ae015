//! Checks and the base configuration shared by the simulator property files.

#![allow(dead_code)]

use diloco_protocol::sim::{Report, SimConfig};

pub fn check_safety(seed: u64, r: &Report) {
    if let Err(e) = r.decided_history() {
        panic!("seed {seed}: two SEALs decided: {e}");
    }
}

/// All live honest synced peers at the same round hold the same state.
pub fn check_identical(seed: u64, r: &Report) {
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
pub fn check_decides_all(seed: u64, c: &SimConfig, r: &Report) {
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

pub fn base(seed: u64, n: usize) -> SimConfig {
    let mut c = SimConfig::new(seed, n);
    c.rounds = 4;
    c
}
