//! The DiLoCo outer optimizer and flat-vector helpers.
//!
//! Every peer applies the same outer step to the same averaged outer gradient, so this code is
//! deliberately plain: f32, element-wise, in index order, no SIMD reductions, no fast-math. Two
//! peers on different hardware that feed it the same bytes get the same bits back.
//!
//! The update (Nesterov SGD, as in DiLoCo):
//!
//! ```text
//! m       = mu * m + delta
//! theta_g = theta_g - eta * (delta + mu * m)
//! ```
//!
//! where `delta` is the (token-weighted) mean of the replicas' outer gradients
//! `delta_i = theta_g - theta_i` (old minus new).

use thiserror::Error;

/// Errors from the outer-step helpers.
#[derive(Debug, Error, PartialEq)]
#[non_exhaustive]
pub enum OuterError {
    /// Two vectors that must have the same length did not.
    #[error("length mismatch: expected {expected} values, got {got}")]
    LengthMismatch {
        /// The length required.
        expected: usize,
        /// The length given.
        got: usize,
    },
    /// A weight was negative, NaN or infinite, or all weights were zero.
    #[error("invalid weights: {0}")]
    InvalidWeights(&'static str),
    /// The outer step would make a parameter or its momentum NaN or infinite (an outer
    /// gradient far too large, or not finite): nothing was changed.
    #[error("the outer step would leave parameter {index} non-finite; nothing was changed")]
    NonFinite {
        /// The first such coordinate.
        index: usize,
    },
}

/// Hyperparameters of the outer optimizer.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OuterConfig {
    /// Outer learning rate eta (DiLoCo: 0.7).
    pub lr: f32,
    /// Nesterov momentum mu (DiLoCo: 0.9).
    pub momentum: f32,
}

impl Default for OuterConfig {
    fn default() -> Self {
        Self {
            lr: 0.7,
            momentum: 0.9,
        }
    }
}

/// Applies one Nesterov outer step in place: updates `momentum` and `global` from `delta`.
///
/// All or nothing: if any parameter or momentum would become NaN or infinite, it returns
/// [`OuterError::NonFinite`] and leaves both unchanged (a first pass computes and checks, the
/// second writes the very same arithmetic, so the bits are those of a single pass).
pub fn nesterov_step(
    cfg: OuterConfig,
    global: &mut [f32],
    momentum: &mut [f32],
    delta: &[f32],
) -> Result<(), OuterError> {
    check_len(global.len(), momentum.len())?;
    check_len(global.len(), delta.len())?;
    let (eta, mu) = (cfg.lr, cfg.momentum);
    let step = |g: f32, m: f32, d: f32| {
        let m = mu * m + d;
        (g - eta * (d + mu * m), m)
    };
    for (index, ((g, m), d)) in global.iter().zip(momentum.iter()).zip(delta).enumerate() {
        let (g, m) = step(*g, *m, *d);
        if !g.is_finite() || !m.is_finite() {
            return Err(OuterError::NonFinite { index });
        }
    }
    for ((g, m), d) in global.iter_mut().zip(momentum.iter_mut()).zip(delta) {
        (*g, *m) = step(*g, *m, *d);
    }
    Ok(())
}

/// Outer gradient of one replica: `global - local` (old minus new).
pub fn outer_gradient(global: &[f32], local: &[f32]) -> Result<Vec<f32>, OuterError> {
    check_len(global.len(), local.len())?;
    Ok(global.iter().zip(local).map(|(g, l)| g - l).collect())
}

/// Weighted mean of equally long vectors, accumulated in f32 in the order given.
///
/// `weights` are typically token counts. The result is `sum_i w_i v_i / sum_i w_i`.
pub fn weighted_mean(vectors: &[&[f32]], weights: &[f64]) -> Result<Vec<f32>, OuterError> {
    if vectors.len() != weights.len() {
        return Err(OuterError::LengthMismatch {
            expected: vectors.len(),
            got: weights.len(),
        });
    }
    let Some(first) = vectors.first() else {
        return Err(OuterError::InvalidWeights("no vectors to average"));
    };
    if weights.iter().any(|w| !w.is_finite() || *w < 0.0) {
        return Err(OuterError::InvalidWeights(
            "weights must be finite and non-negative",
        ));
    }
    let total: f64 = weights.iter().sum();
    if total <= 0.0 {
        return Err(OuterError::InvalidWeights("weights sum to zero"));
    }
    let mut out = vec![0f32; first.len()];
    for (v, w) in vectors.iter().zip(weights) {
        check_len(out.len(), v.len())?;
        let scale = (*w / total) as f32;
        for (o, x) in out.iter_mut().zip(v.iter()) {
            *o += scale * *x;
        }
    }
    Ok(out)
}

/// blake3 hash of a flat f32 vector in little-endian byte order, as lowercase hex.
pub fn hash_f32(values: &[f32]) -> String {
    let mut h = blake3::Hasher::new();
    for chunk in values.chunks(4096) {
        let mut buf = [0u8; 4 * 4096];
        for (i, v) in chunk.iter().enumerate() {
            buf[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
        }
        h.update(&buf[..4 * chunk.len()]);
    }
    h.finalize().to_hex().to_string()
}

fn check_len(expected: usize, got: usize) -> Result<(), OuterError> {
    if expected == got {
        Ok(())
    } else {
        Err(OuterError::LengthMismatch { expected, got })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_round_moves_by_minus_eta_times_one_plus_mu() {
        let mut g = vec![1.0f32, -2.0, 0.5];
        let mut m = vec![0.0f32; 3];
        let d = vec![0.1f32, 0.2, -0.3];
        nesterov_step(OuterConfig::default(), &mut g, &mut m, &d).unwrap();
        for ((g1, g0), d) in g.iter().zip([1.0f32, -2.0, 0.5]).zip(&d) {
            let expected = g0 - 0.7 * 1.9 * d; // -1.33 * delta
            assert!((g1 - expected).abs() < 1e-6, "{g1} vs {expected}");
        }
        assert_eq!(m, d);
    }

    #[test]
    fn a_step_that_would_overflow_changes_nothing() {
        let g0 = vec![1.0f32, 2.0, 3.0];
        let m0 = vec![0.5f32, f32::MAX / 2.0, 0.0];
        for d in [
            vec![0.1f32, f32::MAX, 0.1],
            vec![0.1f32, 0.1, f32::NAN],
            vec![f32::INFINITY, 0.1, 0.1],
        ] {
            let (mut g, mut m) = (g0.clone(), m0.clone());
            let err = nesterov_step(OuterConfig::default(), &mut g, &mut m, &d).unwrap_err();
            assert!(matches!(err, OuterError::NonFinite { .. }), "{err}");
            assert_eq!((g.as_slice(), m.as_slice()), (g0.as_slice(), m0.as_slice()));
        }
        // The two-pass step gives the bits of the one-pass formula.
        let (mut g, mut m) = (g0.clone(), vec![0.25f32, -0.5, 0.125]);
        let d = [0.3f32, -0.7, 1e-3];
        let (mut g1, mut m1) = (g.clone(), m.clone());
        for i in 0..3 {
            m1[i] = 0.9 * m1[i] + d[i];
            g1[i] -= 0.7 * (d[i] + 0.9 * m1[i]);
        }
        nesterov_step(OuterConfig::default(), &mut g, &mut m, &d).unwrap();
        assert_eq!(
            g.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            g1.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(m, m1);
    }

    #[test]
    fn eta_one_mu_zero_is_fedavg() {
        let global = vec![1.0f32, 2.0, 3.0];
        let a = vec![0.5f32, 2.5, 3.0];
        let b = vec![1.5f32, 1.5, 2.0];
        let da = outer_gradient(&global, &a).unwrap();
        let db = outer_gradient(&global, &b).unwrap();
        let delta = weighted_mean(&[&da, &db], &[1.0, 1.0]).unwrap();
        let mut g = global.clone();
        let mut m = vec![0.0; 3];
        nesterov_step(
            OuterConfig {
                lr: 1.0,
                momentum: 0.0,
            },
            &mut g,
            &mut m,
            &delta,
        )
        .unwrap();
        for i in 0..3 {
            assert!((g[i] - (a[i] + b[i]) / 2.0).abs() < 1e-6);
        }
    }

    #[test]
    fn weighted_mean_uses_token_weights() {
        let a = vec![1.0f32];
        let b = vec![4.0f32];
        let m = weighted_mean(&[&a, &b], &[3.0, 1.0]).unwrap();
        assert!((m[0] - 1.75).abs() < 1e-6);
    }

    #[test]
    fn rejects_bad_inputs() {
        assert!(weighted_mean(&[], &[]).is_err());
        assert!(weighted_mean(&[&[1.0]], &[0.0]).is_err());
        assert!(weighted_mean(&[&[1.0]], &[f64::NAN]).is_err());
        assert!(weighted_mean(&[&[1.0], &[1.0, 2.0]], &[1.0, 1.0]).is_err());
        let mut g = vec![0.0; 2];
        let mut m = vec![0.0; 3];
        assert!(nesterov_step(OuterConfig::default(), &mut g, &mut m, &[0.0; 2]).is_err());
    }

    #[test]
    fn hash_is_stable_and_sensitive() {
        let a = hash_f32(&[1.0, 2.0]);
        assert_eq!(a, hash_f32(&[1.0, 2.0]));
        assert_ne!(a, hash_f32(&[1.0, 2.000001]));
    }
}
