//! Aggregate audits by random projections.
//!
//! An owner could gossip an AGG whose aggregate is not the weighted mean of the shards it was
//! pushed: its norm can be honest (say, every sign flipped) and still pass the norm check. To
//! catch that cheaply, every contributor included in an AGG projects its own shard (decoded
//! exactly as the owner decoded it) onto [`AUDIT_PROJECTIONS`] pseudo-random ±1/√d directions
//! and gossips the projections in an AUDIT. The directions are seeded by
//! `blake3("diloco/audit/1", CLOSE id, shard, aggregate hash)`, so they are fixed only once the
//! owner has committed to its aggregate (after READY, CLOSE and AGG): the owner cannot pick a
//! lie orthogonal to them. Projection is linear, so for the weighted mean `m = Σ wᵢxᵢ / W`:
//! `p·m = Σ wᵢ (p·xᵢ) / W`. The leader checks every candidate aggregate against the
//! contributors' projections before sealing it, within a tolerance covering the f32 arithmetic
//! of the mean and the error of re-encoding it with the run's codec ([`tolerance`]).
//!
//! What the check does not cover: a contributor can lie in its own AUDIT and make an honest
//! aggregate fail (an availability attack: that shard is sealed MISSING, nothing wrong is
//! applied, and the lie is not yet attributed); coordinate-wise trimmed means are not linear and
//! are not audited; a candidate whose included contributors did not all send an AUDIT by the
//! seal deadline is sealed unaudited.

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::codec::{Quantization, BLOCK};
use crate::wire::Hash;

/// Projections per audited aggregate.
pub const AUDIT_PROJECTIONS: usize = 2;

/// Deviations (in units of the codec noise's standard deviation along a random direction)
/// tolerated before an aggregate fails: by Hoeffding's inequality an honest aggregate fails one
/// projection with probability at most `2 exp(-Z²/2)` ≈ 2.5e-14.
pub const AUDIT_Z: f64 = 8.0;

/// The seed of the directions for one aggregate.
pub fn seed(close: &Hash, shard: u32, agg: &Hash) -> Hash {
    Hash::of_parts(&[b"diloco/audit/1", &close.0, &shard.to_le_bytes(), &agg.0])
}

/// Projections of `values` onto the `count` directions seeded by `seed`: direction `j` has
/// entries ±1/√len with signs from ChaCha8 seeded by `blake3(seed, j)`; sums in f64.
pub fn project(seed: &Hash, values: &[f32], count: usize) -> Vec<f64> {
    let scale = 1.0 / (values.len().max(1) as f64).sqrt();
    (0..count as u32)
        .map(|j| {
            let mut rng = ChaCha8Rng::from_seed(Hash::of_parts(&[&seed.0, &j.to_le_bytes()]).0);
            let mut acc = 0f64;
            for chunk in values.chunks(64) {
                let bits = rng.next_u64();
                for (i, v) in chunk.iter().enumerate() {
                    let x = f64::from(*v);
                    acc += if (bits >> i) & 1 == 1 { x } else { -x };
                }
            }
            acc * scale
        })
        .collect()
}

/// `Σ wᵢ pᵢ / Σ wᵢ`, per direction: what the projections of a correct weighted mean are.
/// `None` if the inputs are empty, of different lengths, or the weights sum to zero.
pub fn expected(inputs: &[(&[f64], u64)]) -> Option<Vec<f64>> {
    let count = inputs.first()?.0.len();
    let total: f64 = inputs.iter().map(|(_, w)| *w as f64).sum();
    if total <= 0.0 || inputs.iter().any(|(p, _)| p.len() != count) {
        return None;
    }
    Some(
        (0..count)
            .map(|j| inputs.iter().map(|(p, w)| p[j] * (*w as f64 / total)).sum())
            .collect(),
    )
}

/// How far an honest aggregate's projection may sit from [`expected`]: the f32 accumulation of
/// the mean over `inputs` contributions (at most `inputs · 2⁻²³ · max_norm` in L2, a hard bound)
/// plus `AUDIT_Z` standard deviations of the codec's re-encoding error along a random ±1/√d
/// direction, bounded per element from the decoded aggregate `agg` (the codec's stated error
/// bounds, loosened to apply to decoded rather than original values), plus f64 slack.
pub fn tolerance(q: Quantization, agg: &[f32], inputs: usize, max_norm: f32) -> f64 {
    let d = agg.len().max(1) as f64;
    let mut sq = 0f64;
    for block in agg.chunks(BLOCK) {
        let s = block.iter().fold(0f64, |m, x| m.max(f64::from(x.abs())));
        for x in block {
            let a = f64::from(x.abs());
            let e = match q {
                Quantization::F32 => 0.0,
                Quantization::F16 => (a * 2f64.powi(-10)).max(2f64.powi(-24)),
                Quantization::Bf16 => a * 2f64.powi(-7),
                Quantization::Int8 => s / 200.0,
                Quantization::Fp4 => (a * 0.5).max(s / 100.0),
            };
            sq += e * e;
        }
    }
    let codec = AUDIT_Z * sq.sqrt() / d.sqrt();
    let arith = inputs as f64 * 2f64.powi(-22) * f64::from(max_norm);
    codec + arith + 1e-9 * (1.0 + f64::from(max_norm))
}

/// Checks an aggregate's projections against the expected ones: `Err(worst deviation)` if any
/// direction deviates by more than `tol`.
pub fn check(actual: &[f64], expected: &[f64], tol: f64) -> Result<(), f64> {
    if actual.len() != expected.len() {
        return Err(f64::INFINITY);
    }
    let worst = actual
        .iter()
        .zip(expected)
        .map(|(a, e)| (a - e).abs())
        .fold(0f64, f64::max);
    if worst.is_finite() && worst <= tol {
        Ok(())
    } else {
        Err(worst)
    }
}

#[cfg(test)]
mod tests {
    use super::{check, expected, project, seed, tolerance, AUDIT_PROJECTIONS};
    use crate::averaging::{aggregate, Rule};
    use crate::codec;
    use crate::codec::Quantization;
    use crate::wire::Hash;
    use proptest::prelude::*;
    use rand_chacha::rand_core::{RngCore, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn vecs(seed: u64, n: usize, len: usize) -> Vec<Vec<f32>> {
        let mut r = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                (0..len)
                    .map(|_| (r.next_u32() as f32 / u32::MAX as f32 - 0.5) * 0.02)
                    .collect()
            })
            .collect()
    }

    /// Runs the owner's computation (decode inputs, weighted mean in f32, re-encode) and the
    /// audit; returns whether the aggregate (optionally tampered) passes.
    fn run(q: Quantization, n: usize, len: usize, seed: u64, tamper: impl Fn(&mut [f32])) -> bool {
        let raw = vecs(seed, n, len);
        let decoded: Vec<Vec<f32>> = raw
            .iter()
            .map(|v| codec::decode(&codec::encode(q, v), len).unwrap())
            .collect();
        let weights: Vec<u64> = (0..n as u64).map(|i| 1000 + 37 * i).collect();
        let inputs: Vec<(&[f32], u64)> = decoded
            .iter()
            .map(|v| v.as_slice())
            .zip(weights.iter().copied())
            .collect();
        let mut mean = aggregate(Rule::Mean, &inputs);
        tamper(&mut mean);
        let enc = codec::encode(q, &mean);
        let agg = codec::decode(&enc, len).unwrap();
        let s = seed_for(&enc);
        let projs: Vec<Vec<f64>> = decoded
            .iter()
            .map(|v| project(&s, v, AUDIT_PROJECTIONS))
            .collect();
        let pin: Vec<(&[f64], u64)> = projs
            .iter()
            .map(|p| p.as_slice())
            .zip(weights.iter().copied())
            .collect();
        let want = expected(&pin).unwrap();
        let max_norm = decoded
            .iter()
            .map(|v| v.iter().map(|x| x * x).sum::<f32>().sqrt())
            .fold(0f32, f32::max);
        let tol = tolerance(q, &agg, n, max_norm);
        check(&project(&s, &agg, AUDIT_PROJECTIONS), &want, tol).is_ok()
    }

    fn seed_for(enc: &[u8]) -> Hash {
        seed(&Hash::of(b"close"), 3, &Hash::of(enc))
    }

    #[test]
    fn projections_are_linear_and_deterministic() {
        let s = Hash::of(b"s");
        let a = vecs(1, 2, 1000);
        let pa = project(&s, &a[0], 2);
        assert_eq!(pa, project(&s, &a[0], 2));
        let sum: Vec<f32> = a[0].iter().zip(&a[1]).map(|(x, y)| x + y).collect();
        let pb = project(&s, &a[1], 2);
        let ps = project(&s, &sum, 2);
        for j in 0..2 {
            assert!((ps[j] - pa[j] - pb[j]).abs() < 1e-6);
        }
        assert_ne!(pa, project(&Hash::of(b"t"), &a[0], 2));
    }

    #[test]
    fn sign_flip_and_scaled_lies_fail() {
        // Detection rate over 50 aggregates of 5 contributors x 512 values. The tolerance
        // follows the codec's error bound, so lies smaller than the codec's own error pass:
        // fp4 (up to a third of each value) hides both lies; int8 most of the time not.
        for (q, flip_min, half_min) in [
            (Quantization::F32, 50, 50),
            (Quantization::F16, 50, 50),
            (Quantization::Bf16, 50, 50),
            (Quantization::Int8, 47, 35),
            (Quantization::Fp4, 0, 0),
        ] {
            let flip = (0..50)
                .filter(|s| !run(q, 5, 512, *s, |m| m.iter_mut().for_each(|x| *x = -*x)))
                .count();
            let half = (0..50)
                .filter(|s| !run(q, 5, 512, *s, |m| m.iter_mut().for_each(|x| *x *= 0.5)))
                .count();
            println!("{q:?}: sign flip caught {flip}/50, halving caught {half}/50");
            assert!(flip >= flip_min && half >= half_min, "{q:?}: {flip} {half}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn honest_aggregates_pass(seed in any::<u64>(), n in 1usize..40, len in 1usize..700, qi in 0usize..5) {
            let q = Quantization::ALL[qi];
            prop_assert!(run(q, n, len, seed, |_| {}), "{:?} n={} len={}", q, n, len);
        }
    }
}
