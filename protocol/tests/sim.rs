//! Simulator properties over many seeds (`SEED=n` replays one seed, `SEEDS=n` sets the count).

#[allow(unused_imports)]
use diloco_protocol::averaging::Quorum as _Q;
use diloco_protocol::averaging::{Quorum, Reject, Rule};
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
        // Bandwidth: data bytes per peer per round within 1.1 x 2S(n-1)/n.
        let bound = 1.1 * 2.0 * r.vector_bytes as f64 * (n as f64 - 1.0) / n as f64;
        assert!(
            r.max_data_bytes_per_round as f64 <= bound,
            "seed {seed}: {} data bytes > {bound}",
            r.max_data_bytes_per_round
        );
    }
}
