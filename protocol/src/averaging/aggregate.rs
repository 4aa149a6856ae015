//! How an owner combines the contributions to a shard ([`aggregate`] under a [`Rule`]), and
//! the norms and norm bounds the shards and aggregates are checked against.

use crate::codec::Quantization;
use crate::outer;

use super::Rule;

pub(super) fn norm(v: &[f32]) -> f32 {
    v.iter()
        .map(|x| f64::from(*x) * f64::from(*x))
        .sum::<f64>()
        .sqrt() as f32
}

/// Bound on an aggregate's norm from its inputs' claimed norms, with slack for two codec passes.
pub(super) fn norm_bound(q: Quantization, max_input: f32, len: usize) -> f32 {
    let rel = match q {
        Quantization::F32 => 1e-5,
        Quantization::F16 | Quantization::Bf16 => 0.02,
        Quantization::Int8 => 0.05,
        Quantization::Fp4 => 0.7,
    };
    max_input * (1.0 + rel) + 1e-6 * (len as f32).sqrt()
}

/// Combines shard inputs (in contributor order) with `rule`.
pub fn aggregate(rule: Rule, inputs: &[(&[f32], u64)]) -> Vec<f32> {
    let Some((first, _)) = inputs.first() else {
        return Vec::new();
    };
    let len = first.len();
    match rule {
        Rule::Mean | Rule::NormScreen { .. } => {
            let vs: Vec<&[f32]> = inputs.iter().map(|(v, _)| *v).collect();
            let ws: Vec<f64> = inputs.iter().map(|(_, w)| *w as f64).collect();
            outer::weighted_mean(&vs, &ws).unwrap_or_else(|_| vec![0.0; len])
        }
        Rule::TrimmedMean { trim } => {
            let m = inputs.len();
            let cut = ((m as f32) * trim.clamp(0.0, 0.49)).floor() as usize;
            let mut out = vec![0f32; len];
            let mut col: Vec<(f32, usize)> = Vec::with_capacity(m);
            for (j, o) in out.iter_mut().enumerate() {
                col.clear();
                col.extend(inputs.iter().enumerate().map(|(i, (v, _))| (v[j], i)));
                col.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                let kept = &col[cut..m - cut];
                let total: f64 = kept.iter().map(|(_, i)| inputs[*i].1 as f64).sum();
                if total > 0.0 {
                    let mut acc = 0f32;
                    for (x, i) in kept {
                        acc += (inputs[*i].1 as f64 / total) as f32 * x;
                    }
                    *o = acc;
                }
            }
            out
        }
    }
}
