//! The native CPU engine's kernels: matrix products (the `gemm` crate, the same micro-kernels
//! burn's CPU backend calls), row-wise layer norm, exact GELU, causal softmax and the
//! cross-entropy + z-loss, forward and backward, on row-major `f32` slices.
//!
//! **Determinism.** Every kernel gives the same bits whatever the number of threads: work is
//! split over rows (or over fixed-size row chunks whose partial sums are added in chunk order),
//! never over a reduction's terms in a thread-count-dependent way, and the matrix products
//! split only their output tiles.

use rayon::prelude::*;

/// Rows of a row-wise kernel handled by one task.
const ROWS_PER_TASK: usize = 16;
/// Rows per partial sum of a column reduction (fixed, so the sum order never changes).
const ROWS_PER_PARTIAL: usize = 64;
/// Matrix products with fewer multiply-adds run on the calling thread.
const PAR_GEMM_MIN_FLOPS: usize = 1 << 18;

/// Defines a function whose body runs compiled for AVX2 + FMA when the CPU has them, and for
/// the x86-64 baseline (SSE2) otherwise, so one binary runs on every volunteer's CPU and still
/// uses 8-lane vectors where it can. The body is the same code either way, and Rust never
/// contracts a multiply and an add into an FMA or reorders float operations, so both versions
/// give the same bits; only the vector width differs.
macro_rules! wide {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
                }
                if avx2_fma() {
                    // SAFETY: `avx2_fma` checked that this CPU has every feature `avx2` uses.
                    return unsafe { avx2($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}

/// Whether this CPU has AVX2 and FMA (checked once).
#[cfg(target_arch = "x86_64")]
fn avx2_fma() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    })
}

/// Independent partial sums a reduction keeps, so that it vectorises: a float sum in one
/// accumulator cannot, since its order is fixed. The order here is fixed too (lane by lane,
/// then the lanes in a fixed tree), so results never depend on the vector width.
const LANES: usize = 8;

#[inline(always)]
fn lanes_total(a: [f32; LANES]) -> f32 {
    ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
}

/// `Σ f(x[i])` in [`LANES`] partial sums.
#[inline(always)]
fn sum_map(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += f(c[l]);
        }
    }
    let mut s = lanes_total(acc);
    for &v in rest {
        s += f(v);
    }
    s
}

/// `Σ f(a[i], b[i])` in [`LANES`] partial sums.
#[inline(always)]
fn sum_map2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; LANES];
    for (ca, cb) in a.chunks_exact(LANES).zip(b.chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] += f(ca[l], cb[l]);
        }
    }
    let mut s = lanes_total(acc);
    let full = n / LANES * LANES;
    for i in full..n {
        s += f(a[i], b[i]);
    }
    s
}

/// The largest value of `x` (−∞ for an empty slice).
#[inline(always)]
fn max_of(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] = acc[l].max(c[l]);
        }
    }
    acc.iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

/// How a matrix operand is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// As used: an `r × c` operand stored row-major `r × c`.
    N,
    /// Transposed: an `r × c` operand stored row-major `c × r`.
    T,
}

/// `out[m×n] = op(a)[m×k] · op(b)[k×n]`, or `+=` when `accumulate`. `parallel` lets the product
/// split its output over the rayon pool (only when large enough to gain from it); pass `false`
/// from inside a parallel task.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    out: &mut [f32],
    a: &[f32],
    ta: Op,
    b: &[f32],
    tb: Op,
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
    parallel: bool,
) {
    assert!(out.len() >= m * n, "matmul: output too short");
    assert!(
        a.len() >= m * k && b.len() >= k * n,
        "matmul: operand too short"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            out[..m * n].fill(0.0);
        }
        return;
    }
    let (a_rs, a_cs) = match ta {
        Op::N => (k as isize, 1),
        Op::T => (1, m as isize),
    };
    let (b_rs, b_cs) = match tb {
        Op::N => (n as isize, 1),
        Op::T => (1, k as isize),
    };
    let par = if parallel && m * n * k >= PAR_GEMM_MIN_FLOPS && rayon::current_num_threads() > 1 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above bound every index gemm reads (`a`: m·k, `b`: k·n values with the
    // strides chosen for the storage order) and writes (`out`: m·n, row-major).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            par,
        );
    }
}

/// `e^x` for `f32`, branch-free so that loops over slices vectorise: Cody–Waite range reduction
/// and Cephes' degree-6 polynomial (relative error about 2·10⁻⁷). Inputs below −87.3 give
/// about 10⁻³⁸ instead of 0, above 88.7 about 3·10³⁸.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
    let x = x.clamp(-87.3, 88.7);
    let kr = x * LOG2E + ROUND;
    let k = kr - ROUND;
    let r = x - k * LN2_HI - k * LN2_LO;
    let p = 1.987_569_1e-4f32;
    let p = p * r + 1.398_2e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5.000_000_1e-1;
    let y = p * r * r + r + 1.0;
    let ki = (kr.to_bits() as i32).wrapping_sub(0x4B40_0000);
    y * f32::from_bits(((ki + 127) << 23) as u32)
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// `erf(x)` from `e^{-x²}` (Abramowitz & Stegun 7.1.26, absolute error below 1.5·10⁻⁷).
#[inline(always)]
fn erf_with(x: f32, exp_neg_x2: f32) -> f32 {
    let ax = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * ax);
    let poly = ((((1.061_405_4 * t - 1.453_152) * t + 1.421_413_8) * t - 0.284_496_74) * t
        + 0.254_829_6)
        * t;
    let e = 1.0 - poly * exp_neg_x2;
    e.copysign(x)
}

wide! {
    fn gelu_chunk(x: &[f32], out: &mut [f32]) {
        for (o, &x) in out.iter_mut().zip(x) {
            let e = exp(-0.5 * x * x);
            *o = 0.5 * x * (1.0 + erf_with(x * FRAC_1_SQRT_2, e));
        }
    }
}

wide! {
    fn gelu_bwd_chunk(x: &[f32], dy: &mut [f32]) {
        for (d, &x) in dy.iter_mut().zip(x) {
            let e = exp(-0.5 * x * x);
            let cdf = 0.5 * (1.0 + erf_with(x * FRAC_1_SQRT_2, e));
            *d *= cdf + x * FRAC_1_SQRT_2PI * e;
        }
    }
}

/// Exact GELU, `x·Φ(x)`: `out[i] = gelu(x[i])`.
pub fn gelu_fwd(x: &[f32], out: &mut [f32]) {
    const CHUNK: usize = 4096;
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, x)| gelu_chunk(x, o));
}

/// GELU's backward: `dx[i] = dy[i] · gelu'(x[i])`, in place on `dy`.
pub fn gelu_bwd(x: &[f32], dy: &mut [f32]) {
    const CHUNK: usize = 4096;
    dy.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(d, x)| gelu_bwd_chunk(x, d));
}

wide! {
    /// Layer norm of one row (biased variance, as burn's): writes `(x − mean)·rstd` to `xhat`
    /// and `xhat·gamma + beta` to `out`; returns `rstd`.
    pub fn ln_row(
        x: &[f32],
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
        xhat: &mut [f32],
        out: &mut [f32],
    ) -> f32 {
        let d = x.len() as f32;
        let mean = sum_map(x, |v| v) / d;
        let var = sum_map(x, |v| (v - mean) * (v - mean)) / d;
        let rstd = 1.0 / (var + eps).sqrt();
        let n = x.len();
        let (gamma, beta, xhat, out) = (&gamma[..n], &beta[..n], &mut xhat[..n], &mut out[..n]);
        for i in 0..n {
            let h = (x[i] - mean) * rstd;
            xhat[i] = h;
            out[i] = h * gamma[i] + beta[i];
        }
        rstd
    }
}

wide! {
    /// Layer norm backward of one row: `dx` from the gradient `dy` of the output, with
    /// `dgamma += dy·xhat` and `dbeta += dy`.
    pub fn ln_row_bwd(
        dy: &[f32],
        xhat: &[f32],
        rstd: f32,
        gamma: &[f32],
        dx: &mut [f32],
        dgamma: &mut [f32],
        dbeta: &mut [f32],
    ) {
        let n = dy.len();
        let (xhat, gamma, dx) = (&xhat[..n], &gamma[..n], &mut dx[..n]);
        let (dgamma, dbeta) = (&mut dgamma[..n], &mut dbeta[..n]);
        let d = n as f32;
        let s1 = sum_map2(dy, gamma, |a, g| a * g);
        let mut acc = [0.0f32; LANES];
        for ((a, g), h) in dy
            .chunks_exact(LANES)
            .zip(gamma.chunks_exact(LANES))
            .zip(xhat.chunks_exact(LANES))
        {
            for l in 0..LANES {
                acc[l] += a[l] * g[l] * h[l];
            }
        }
        let mut s2 = lanes_total(acc);
        for i in n / LANES * LANES..n {
            s2 += dy[i] * gamma[i] * xhat[i];
        }
        for i in 0..n {
            dgamma[i] += dy[i] * xhat[i];
            dbeta[i] += dy[i];
        }
        let (m1, m2) = (s1 / d, s2 / d);
        for i in 0..n {
            dx[i] = rstd * (dy[i] * gamma[i] - m1 - xhat[i] * m2);
        }
    }
}

/// Layer norm over the rows of `x` (`rows × d`): `xhat`, `out` as in [`ln_row`], `rstd` per row.
pub fn ln_fwd(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    d: usize,
    xhat: &mut [f32],
    out: &mut [f32],
    rstd: &mut [f32],
) {
    let c = ROWS_PER_TASK * d;
    xhat.par_chunks_mut(c)
        .zip(out.par_chunks_mut(c))
        .zip(rstd.par_chunks_mut(ROWS_PER_TASK))
        .zip(x.par_chunks(c))
        .for_each(|(((h, o), r), x)| {
            for (i, r) in r.iter_mut().enumerate() {
                let s = i * d..(i + 1) * d;
                *r = ln_row(
                    &x[s.clone()],
                    gamma,
                    beta,
                    1e-5,
                    &mut h[s.clone()],
                    &mut o[s],
                );
            }
        });
}

/// Layer norm backward over rows: `dx` (written, or added to when `accumulate`), and the
/// gain/shift gradients `dgamma`, `dbeta` (written), summed in a fixed order.
#[allow(clippy::too_many_arguments)]
pub fn ln_bwd(
    dy: &[f32],
    xhat: &[f32],
    rstd: &[f32],
    gamma: &[f32],
    d: usize,
    dx: &mut [f32],
    accumulate: bool,
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    let rows = rstd.len();
    let chunks = rows.div_ceil(ROWS_PER_PARTIAL);
    let mut partial = vec![0.0f32; chunks * 2 * d];
    let c = ROWS_PER_PARTIAL * d;
    partial
        .par_chunks_mut(2 * d)
        .zip(dx.par_chunks_mut(c))
        .zip(dy.par_chunks(c).zip(xhat.par_chunks(c)))
        .zip(rstd.par_chunks(ROWS_PER_PARTIAL))
        .for_each(|(((p, dx), (dy, xh)), r)| {
            let (pg, pb) = p.split_at_mut(d);
            let mut row = vec![0.0f32; d];
            for (i, &r) in r.iter().enumerate() {
                let s = i * d..(i + 1) * d;
                ln_row_bwd(&dy[s.clone()], &xh[s.clone()], r, gamma, &mut row, pg, pb);
                if accumulate {
                    dx[s].iter_mut().zip(&row).for_each(|(a, b)| *a += b);
                } else {
                    dx[s].copy_from_slice(&row);
                }
            }
        });
    dgamma.fill(0.0);
    dbeta.fill(0.0);
    for p in partial.chunks(2 * d) {
        dgamma.iter_mut().zip(&p[..d]).for_each(|(a, b)| *a += b);
        dbeta.iter_mut().zip(&p[d..]).for_each(|(a, b)| *a += b);
    }
}

/// Column sums of `x` (`rows × cols`) into `out` (written), in a fixed order.
pub fn col_sums(x: &[f32], cols: usize, out: &mut [f32]) {
    let c = ROWS_PER_PARTIAL * cols;
    let partial: Vec<Vec<f32>> = x
        .par_chunks(c)
        .map(|rows| {
            let mut s = vec![0.0f32; cols];
            for r in rows.chunks(cols) {
                s.iter_mut().zip(r).for_each(|(a, b)| *a += b);
            }
            s
        })
        .collect();
    out.fill(0.0);
    for p in &partial {
        out.iter_mut().zip(p).for_each(|(a, b)| *a += b);
    }
}

/// Adds `bias` (`cols`) to every row of `x`.
pub fn add_bias(x: &mut [f32], bias: &[f32]) {
    let cols = bias.len();
    x.par_chunks_mut(ROWS_PER_TASK * cols).for_each(|rows| {
        for r in rows.chunks_mut(cols) {
            r.iter_mut().zip(bias).for_each(|(a, b)| *a += b);
        }
    });
}

wide! {
    /// Causal softmax of a `t × t` score matrix in place, scaled by `scale` first; entries
    /// above the diagonal become 0.
    pub fn causal_softmax(s: &mut [f32], t: usize, scale: f32) {
        for i in 0..t {
            let row = &mut s[i * t..(i + 1) * t];
            let (live, masked) = row.split_at_mut(i + 1);
            live.iter_mut().for_each(|v| *v *= scale);
            let max = max_of(live);
            live.iter_mut().for_each(|v| *v = exp(*v - max));
            let inv = 1.0 / sum_map(live, |v| v);
            live.iter_mut().for_each(|v| *v *= inv);
            masked.fill(0.0);
        }
    }
}

wide! {
    /// Softmax backward for a causal `t × t` probability matrix: turns `dp` (the gradient of
    /// the probabilities) into the gradient of the unscaled scores, `p·(dp − Σ p·dp)·scale`,
    /// in place.
    pub fn causal_softmax_bwd(p: &[f32], dp: &mut [f32], t: usize, scale: f32) {
        for i in 0..t {
            let pr = &p[i * t..i * t + i + 1];
            let (live, masked) = dp[i * t..(i + 1) * t].split_at_mut(i + 1);
            let dot = sum_map2(pr, live, |p, d| p * d);
            for (d, &p) in live.iter_mut().zip(pr) {
                *d = p * (*d - dot) * scale;
            }
            masked.fill(0.0);
        }
    }
}

/// Cross-entropy with z-loss over `logits` (`rows × v`), turned in place into the gradient of
/// `mean(lse − logit[target]) + z·mean(lse²)`. Returns the summed cross-entropy (f64, in row
/// order) and the summed `lse²`.
pub fn xent_fwd_bwd(logits: &mut [f32], targets: &[i64], v: usize, z: f32) -> (f64, f64) {
    let rows = targets.len();
    let inv_n = 1.0 / rows as f32;
    let per_chunk: Vec<(f64, f64)> = logits
        .par_chunks_mut(ROWS_PER_TASK * v)
        .zip(targets.par_chunks(ROWS_PER_TASK))
        .map(|(l, tg)| {
            let (mut ce, mut zz) = (0.0f64, 0.0f64);
            for (row, &target) in l.chunks_mut(v).zip(tg) {
                let (ce_row, lse) = xent_row(row, target, inv_n, z);
                ce += ce_row as f64;
                zz += (lse as f64) * (lse as f64);
            }
            (ce, zz)
        })
        .collect();
    per_chunk
        .iter()
        .fold((0.0, 0.0), |(a, b), (c, d)| (a + c, b + d))
}

wide! {
    /// One row of [`xent_fwd_bwd`]: returns (cross-entropy, lse). A target outside the
    /// vocabulary counts as the last token (the data pipeline only produces bytes, so this
    /// never happens).
    fn xent_row(row: &mut [f32], target: i64, inv_n: f32, z: f32) -> (f32, f32) {
        let target = (target.max(0) as usize).min(row.len() - 1);
        let lse = log_sum_exp(row);
        let ce = lse - row[target];
        let coef = inv_n * (1.0 + 2.0 * z * lse);
        for x in row.iter_mut() {
            *x = exp(*x - lse) * coef;
        }
        row[target] -= inv_n;
        (ce, lse)
    }
}

/// `ln Σ e^x` of a row, shifted by its maximum.
#[inline(always)]
fn log_sum_exp(row: &[f32]) -> f32 {
    let max = max_of(row);
    sum_map(row, |x| exp(x - max)).ln() + max
}

wide! {
    /// Cross-entropy of one row (evaluation).
    fn xent_only(row: &[f32], target: i64) -> f32 {
        let target = (target.max(0) as usize).min(row.len() - 1);
        log_sum_exp(row) - row[target]
    }
}

/// Cross-entropy only (evaluation): the summed cross-entropy of the rows, in row order.
pub fn xent_fwd(logits: &[f32], targets: &[i64], v: usize) -> f64 {
    let per_chunk: Vec<f64> = logits
        .par_chunks(ROWS_PER_TASK * v)
        .zip(targets.par_chunks(ROWS_PER_TASK))
        .map(|(l, tg)| {
            let mut ce = 0.0f64;
            for (row, &target) in l.chunks(v).zip(tg) {
                ce += xent_only(row, target) as f64;
            }
            ce
        })
        .collect();
    per_chunk.iter().sum()
}

/// The constants of one AdamW step (see [`crate::train::native::adamw`]), as `f32`.
#[derive(Debug, Clone, Copy)]
pub struct AdamConsts {
    /// Gradient scale from global-norm clipping.
    pub grad_scale: f32,
    /// β₁ and 1 − β₁.
    pub b1: f32,
    /// 1 − β₁.
    pub ob1: f32,
    /// β₂.
    pub b2: f32,
    /// 1 − β₂.
    pub ob2: f32,
    /// Bias corrections 1 − β₁ᵗ and 1 − β₂ᵗ.
    pub bc1: f32,
    /// 1 − β₂ᵗ.
    pub bc2: f32,
    /// ε.
    pub eps: f32,
    /// Learning rate.
    pub lr: f32,
    /// 1 − lr·wd (1 for tensors without decay).
    pub keep: f32,
}

wide! {
    /// AdamW on one chunk: moments updated, bias-corrected step, decoupled decay.
    pub fn adamw_chunk(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: &AdamConsts) {
        let n = p.len();
        let (g, m, v) = (&g[..n], &mut m[..n], &mut v[..n]);
        for i in 0..n {
            let gi = g[i] * c.grad_scale;
            let mi = m[i] * c.b1 + gi * c.ob1;
            let vi = v[i] * c.b2 + gi * gi * c.ob2;
            m[i] = mi;
            v[i] = vi;
            let upd = (mi / c.bc1) / ((vi / c.bc2).sqrt() + c.eps);
            p[i] = p[i] * c.keep - upd * c.lr;
        }
    }
}

/// Sum of squares of `x` in f64, in fixed-size chunks added in order.
pub fn sum_squares(x: &[f32]) -> f64 {
    const CHUNK: usize = 16384;
    let parts: Vec<f64> = x
        .par_chunks(CHUNK)
        .map(|c| c.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>())
        .collect();
    parts.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_to_a_few_ulps() {
        let mut worst = 0.0f32;
        let mut x = -80.0f32;
        while x < 80.0 {
            let (a, b) = (exp(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.0137;
        }
        assert!(worst < 5e-7, "relative error {worst}");
        assert!(exp(-200.0) < 1e-37 && exp(-200.0) >= 0.0);
    }

    /// `x·Φ(x)` in f64, Φ by Simpson's rule on the normal density (error far below f32's).
    fn gelu_reference(x: f64) -> f64 {
        let n = 2000;
        let h = x / n as f64;
        let phi = |t: f64| (-0.5 * t * t).exp() / (2.0 * std::f64::consts::PI).sqrt();
        let mut s = phi(0.0) + phi(x);
        for i in 1..n {
            s += phi(i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
        }
        x * (0.5 + s * h / 3.0)
    }

    #[test]
    fn gelu_matches_the_erf_definition() {
        let xs: Vec<f32> = (-800..800).map(|i| i as f32 * 0.01).collect();
        let mut out = vec![0.0; xs.len()];
        gelu_fwd(&xs, &mut out);
        for (&x, &y) in xs.iter().zip(&out) {
            let want = gelu_reference(x as f64);
            assert!(
                (y as f64 - want).abs() < 2e-6,
                "gelu({x}) = {y}, want {want}"
            );
        }
        // The derivative against a central difference.
        let mut d = vec![1.0f32; xs.len()];
        gelu_bwd(&xs, &mut d);
        for (&x, &g) in xs.iter().zip(&d) {
            let h = 1e-4;
            let x = x as f64;
            let want = (gelu_reference(x + h) - gelu_reference(x - h)) / (2.0 * h);
            assert!(
                (g as f64 - want).abs() < 1e-5,
                "gelu'({x}) = {g}, want {want}"
            );
        }
    }

    #[test]
    fn matmul_agrees_with_a_naive_product_in_every_storage_order() {
        let (m, n, k) = (7, 5, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        let at: Vec<f32> = (0..m * k).map(|i| a[(i % m) * k + i / m]).collect();
        let bt: Vec<f32> = (0..k * n).map(|i| b[(i % k) * n + i / k]).collect();
        let mut want = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                want[i * n + j] = (0..k).map(|l| a[i * k + l] * b[l * n + j]).sum();
            }
        }
        for (aa, ta) in [(&a, Op::N), (&at, Op::T)] {
            for (bb, tb) in [(&b, Op::N), (&bt, Op::T)] {
                let mut out = vec![1.0f32; m * n];
                matmul(&mut out, aa, ta, bb, tb, m, n, k, false, true);
                for (x, y) in out.iter().zip(&want) {
                    assert!((x - y).abs() < 1e-5, "{ta:?}{tb:?}: {x} vs {y}");
                }
                matmul(&mut out, aa, ta, bb, tb, m, n, k, true, false);
                for (x, y) in out.iter().zip(&want) {
                    assert!((x - 2.0 * y).abs() < 1e-5, "accumulate {ta:?}{tb:?}");
                }
            }
        }
    }

    #[test]
    fn softmax_rows_sum_to_one_and_hide_the_future() {
        let t = 5;
        let mut s: Vec<f32> = (0..t * t).map(|i| i as f32 * 0.1).collect();
        causal_softmax(&mut s, t, 0.5);
        for i in 0..t {
            let row = &s[i * t..(i + 1) * t];
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
            assert!(row[i + 1..].iter().all(|&v| v == 0.0));
        }
    }

    #[test]
    fn layer_norm_backward_matches_finite_differences() {
        let d = 6;
        let x: Vec<f32> = (0..d).map(|i| (i as f32 * 1.3).sin() * 2.0).collect();
        let gamma: Vec<f32> = (0..d).map(|i| 1.0 + i as f32 * 0.1).collect();
        let beta = vec![0.1f32; d];
        let w: Vec<f32> = (0..d).map(|i| (i as f32 * 0.7).cos()).collect();
        let loss = |x: &[f32]| -> f64 {
            let (mut h, mut o) = (vec![0.0; d], vec![0.0; d]);
            ln_row(x, &gamma, &beta, 1e-5, &mut h, &mut o);
            o.iter().zip(&w).map(|(a, b)| (a * b) as f64).sum()
        };
        let (mut h, mut o) = (vec![0.0; d], vec![0.0; d]);
        let rstd = ln_row(&x, &gamma, &beta, 1e-5, &mut h, &mut o);
        let (mut dx, mut dg, mut db) = (vec![0.0; d], vec![0.0; d], vec![0.0; d]);
        ln_row_bwd(&w, &h, rstd, &gamma, &mut dx, &mut dg, &mut db);
        for i in 0..d {
            let (mut p, mut q) = (x.clone(), x.clone());
            p[i] += 1e-2;
            q[i] -= 1e-2;
            let want = (loss(&p) - loss(&q)) / 2e-2;
            assert!(
                (dx[i] as f64 - want).abs() < 2e-3,
                "dx[{i}] {} vs {want}",
                dx[i]
            );
        }
    }
}
