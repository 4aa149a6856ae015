//! The native CPU engine (`--backend native`): the same transformer as [`crate::train::model`]
//! (same parameters in the same flat order, same loss), trained with hand-written fused
//! forward and backward passes over flat `f32` vectors instead of burn's autodiff graph.
//!
//! Why it exists: on the CPU, burn builds every step from hundreds of small allocating tensor
//! ops (softmax, layer norm and GELU fall back to composite ops under autodiff, AdamW is ten ops
//! per tensor), which cost more than the matrix products themselves on the model sizes a
//! volunteer's CPU can train (BENCHMARKS.md). Here a step is: one matrix product per linear
//! layer and direction (the `gemm` crate, the kernels burn's CPU backend uses), fused row
//! kernels for layer norm, per-head attention with its causal softmax, GELU and the loss, and
//! one fused AdamW pass over the flat parameter vector; activations live in a workspace reused
//! across steps, so a step allocates almost nothing.
//!
//! Parameters, gradients and AdamW moments are flat vectors in [`crate::train::flat`] order, so
//! DiLoCo's per-round work (reading the local parameters, loading the global ones) is a copy,
//! and a checkpoint or a peer cannot tell which engine trained a replica. Results do not depend
//! on the number of threads (see [`kernels`]). They are not bit-identical to burn's backends
//! (other summation orders), only equal to float precision: the tests compare losses and
//! gradients with burn's autodiff.

pub mod kernels;

use crate::train::data::Batch;
use crate::train::flat::{FlatError, ParamInfo};
use crate::train::model::{ModelConfig, Z_LOSS_WEIGHT};
use kernels::{matmul, Op};
use rayon::prelude::*;
use std::ops::Range;

/// Offsets of one block's parameters in the flat vector.
#[derive(Debug, Clone)]
struct BlockOffsets {
    ln1_g: Range<usize>,
    ln1_b: Range<usize>,
    qkv: Range<usize>,
    qn_g: Range<usize>,
    qn_b: Range<usize>,
    kn_g: Range<usize>,
    kn_b: Range<usize>,
    proj: Range<usize>,
    ln2_g: Range<usize>,
    ln2_b: Range<usize>,
    fc1_w: Range<usize>,
    fc1_b: Option<Range<usize>>,
    fc2_w: Range<usize>,
    fc2_b: Option<Range<usize>>,
}

/// Offsets of every parameter tensor.
#[derive(Debug, Clone)]
struct Offsets {
    tok: Range<usize>,
    pos: Range<usize>,
    blocks: Vec<BlockOffsets>,
    lnf_g: Range<usize>,
    lnf_b: Range<usize>,
    head: Range<usize>,
}

/// The flat layout of `cfg`'s model: the names and shapes [`crate::train::flat::layout`] gives
/// for the burn module (a test checks they agree), without building the module.
pub fn layout(cfg: &ModelConfig) -> Vec<ParamInfo> {
    let d = cfg.d_model;
    let hd = d / cfg.n_heads;
    let f = d * cfg.mlp_ratio;
    let mut out = Vec::new();
    let mut push = |name: String, shape: &[usize]| {
        out.push(ParamInfo {
            name,
            shape: shape.to_vec(),
        })
    };
    push("tok_emb.weight".into(), &[cfg.vocab, d]);
    push("pos_emb".into(), &[cfg.context, d]);
    for i in 0..cfg.n_layers {
        let p = |s: &str| format!("blocks.{i}.{s}");
        push(p("ln1.gamma"), &[d]);
        push(p("ln1.beta"), &[d]);
        push(p("qkv.weight"), &[d, 3 * d]);
        push(p("q_norm.gamma"), &[hd]);
        push(p("q_norm.beta"), &[hd]);
        push(p("k_norm.gamma"), &[hd]);
        push(p("k_norm.beta"), &[hd]);
        push(p("proj.weight"), &[d, d]);
        push(p("ln2.gamma"), &[d]);
        push(p("ln2.beta"), &[d]);
        push(p("fc1.weight"), &[d, f]);
        if cfg.mlp_bias {
            push(p("fc1.bias"), &[f]);
        }
        push(p("fc2.weight"), &[f, d]);
        if cfg.mlp_bias {
            push(p("fc2.bias"), &[d]);
        }
    }
    push("ln_f.gamma".into(), &[d]);
    push("ln_f.beta".into(), &[d]);
    push("head.weight".into(), &[d, cfg.vocab]);
    out
}

impl Offsets {
    fn new(cfg: &ModelConfig, layout: &[ParamInfo]) -> Self {
        let mut ranges = std::collections::HashMap::new();
        let mut off = 0;
        for p in layout {
            ranges.insert(p.name.clone(), off..off + p.len());
            off += p.len();
        }
        // `layout` above made every name looked up here; a miss is a bug in this file.
        let r = |name: &str| match ranges.get(name) {
            Some(r) => r.clone(),
            None => unreachable!("native layout lacks {name}"),
        };
        let blocks = (0..cfg.n_layers)
            .map(|i| {
                let b = |s: &str| r(&format!("blocks.{i}.{s}"));
                let opt = |s: &str| ranges.get(&format!("blocks.{i}.{s}")).cloned();
                BlockOffsets {
                    ln1_g: b("ln1.gamma"),
                    ln1_b: b("ln1.beta"),
                    qkv: b("qkv.weight"),
                    qn_g: b("q_norm.gamma"),
                    qn_b: b("q_norm.beta"),
                    kn_g: b("k_norm.gamma"),
                    kn_b: b("k_norm.beta"),
                    proj: b("proj.weight"),
                    ln2_g: b("ln2.gamma"),
                    ln2_b: b("ln2.beta"),
                    fc1_w: b("fc1.weight"),
                    fc1_b: opt("fc1.bias"),
                    fc2_w: b("fc2.weight"),
                    fc2_b: opt("fc2.bias"),
                }
            })
            .collect();
        Offsets {
            tok: r("tok_emb.weight"),
            pos: r("pos_emb"),
            blocks,
            lnf_g: r("ln_f.gamma"),
            lnf_b: r("ln_f.beta"),
            head: r("head.weight"),
        }
    }
}

/// `y = x·W`, or `y += x·W` when `accumulate`, for rows `x` of width `k` and `W` stored
/// `[k, m]` row-major (burn's `Linear` layout).
fn linear(y: &mut [f32], x: &[f32], w: &[f32], k: usize, accumulate: bool) {
    let (n, m) = (x.len() / k, w.len() / k);
    matmul(y, x, Op::N, w, Op::N, n, m, k, accumulate, true);
}

/// Backward of [`linear`] for the output gradient `dy`: `dw = xᵀ·dy` and `dx = dy·Wᵀ` (both
/// written, not added to).
fn linear_bwd(x: &[f32], w: &[f32], dy: &[f32], k: usize, dw: &mut [f32], dx: &mut [f32]) {
    let (n, m) = (x.len() / k, w.len() / k);
    matmul(dw, x, Op::T, dy, Op::N, k, m, n, false, true);
    matmul(dx, dy, Op::N, w, Op::T, n, k, m, false, true);
}

/// Two disjoint mutable ranges of one slice.
fn two_mut(x: &mut [f32], a: Range<usize>, b: Range<usize>) -> (&mut [f32], &mut [f32]) {
    assert!(a.end <= b.start || b.end <= a.start, "ranges overlap");
    if a.start < b.start {
        let (lo, hi) = x.split_at_mut(b.start);
        (&mut lo[a], &mut hi[..b.end - b.start])
    } else {
        let (lo, hi) = x.split_at_mut(a.start);
        (&mut hi[..a.end - a.start], &mut lo[b])
    }
}

/// Sizes of one batch through the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Dims {
    b: usize,
    t: usize,
    d: usize,
    h: usize,
    hd: usize,
    f: usize,
    v: usize,
}

impl Dims {
    fn n(&self) -> usize {
        self.b * self.t
    }
    fn bh(&self) -> usize {
        self.b * self.h
    }
    /// Values one head's forward buffer holds: q̂, k̂, q, k, v, o (each `t × hd`), the two
    /// reciprocal standard deviations (`t` each) and the probabilities (`t × t`).
    fn head_len(&self) -> usize {
        6 * self.t * self.hd + 2 * self.t + self.t * self.t
    }
}

/// One head's forward values, carved from its chunk of [`LayerActs::heads`].
struct Head<'a> {
    qhat: &'a mut [f32],
    khat: &'a mut [f32],
    q: &'a mut [f32],
    k: &'a mut [f32],
    v: &'a mut [f32],
    o: &'a mut [f32],
    rq: &'a mut [f32],
    rk: &'a mut [f32],
    p: &'a mut [f32],
}

fn split_head(c: &mut [f32], t: usize, hd: usize) -> Head<'_> {
    let th = t * hd;
    let (qhat, c) = c.split_at_mut(th);
    let (khat, c) = c.split_at_mut(th);
    let (q, c) = c.split_at_mut(th);
    let (k, c) = c.split_at_mut(th);
    let (v, c) = c.split_at_mut(th);
    let (o, c) = c.split_at_mut(th);
    let (rq, c) = c.split_at_mut(t);
    let (rk, p) = c.split_at_mut(t);
    Head {
        qhat,
        khat,
        q,
        k,
        v,
        o,
        rq,
        rk,
        p,
    }
}

/// What one block keeps from the forward pass for the backward pass.
struct LayerActs {
    xhat1: Vec<f32>,
    xn1: Vec<f32>,
    rstd1: Vec<f32>,
    qkv: Vec<f32>,
    heads: Vec<f32>,
    att: Vec<f32>,
    x2: Vec<f32>,
    xhat2: Vec<f32>,
    xn2: Vec<f32>,
    rstd2: Vec<f32>,
    h1: Vec<f32>,
    g: Vec<f32>,
}

impl LayerActs {
    fn new(s: &Dims) -> Self {
        let (n, d, f) = (s.n(), s.d, s.f);
        LayerActs {
            xhat1: vec![0.0; n * d],
            xn1: vec![0.0; n * d],
            rstd1: vec![0.0; n],
            qkv: vec![0.0; n * 3 * d],
            heads: vec![0.0; s.bh() * s.head_len()],
            att: vec![0.0; n * d],
            x2: vec![0.0; n * d],
            xhat2: vec![0.0; n * d],
            xn2: vec![0.0; n * d],
            rstd2: vec![0.0; n],
            h1: vec![0.0; n * f],
            g: vec![0.0; n * f],
        }
    }
}

/// Activations and scratch for one batch shape, reused across steps.
struct Workspace {
    dims: Dims,
    /// Block inputs; `xs[layers]` is the last block's output.
    xs: Vec<Vec<f32>>,
    layers: Vec<LayerActs>,
    xhatf: Vec<f32>,
    xnf: Vec<f32>,
    rstdf: Vec<f32>,
    logits: Vec<f32>,
    // Backward scratch.
    dx: Vec<f32>,
    dxn: Vec<f32>,
    dh: Vec<f32>,
    dqkv: Vec<f32>,
    datt: Vec<f32>,
    /// Per head: dq, dk, dv, do (`t × hd` each) and dp (`t × t`).
    dheads: Vec<f32>,
    /// Per head: partial q/k norm gain and shift gradients (`4 × hd`).
    dnorm: Vec<f32>,
}

impl Workspace {
    fn new(dims: Dims, layers: usize) -> Self {
        let (n, d) = (dims.n(), dims.d);
        let th = dims.t * dims.hd;
        Workspace {
            dims,
            xs: (0..=layers).map(|_| vec![0.0; n * d]).collect(),
            layers: (0..layers).map(|_| LayerActs::new(&dims)).collect(),
            xhatf: vec![0.0; n * d],
            xnf: vec![0.0; n * d],
            rstdf: vec![0.0; n],
            logits: vec![0.0; n * dims.v],
            dx: vec![0.0; n * d],
            dxn: vec![0.0; n * d],
            dh: vec![0.0; n * dims.f],
            dqkv: vec![0.0; n * 3 * d],
            datt: vec![0.0; n * d],
            dheads: vec![0.0; dims.bh() * (4 * th + dims.t * dims.t)],
            dnorm: vec![0.0; dims.bh() * 4 * dims.hd],
        }
    }
}

/// The model's parameters and gradients as flat vectors, and the workspace of its last batch
/// shape.
pub struct NativeModel {
    cfg: ModelConfig,
    off: Offsets,
    /// Parameters in flat order.
    pub params: Vec<f32>,
    /// Gradients of the last [`NativeModel::loss_and_grads`], in flat order (empty before).
    pub grads: Vec<f32>,
    ws: Option<Workspace>,
}

impl NativeModel {
    /// A model of `cfg` holding `params` (in [`layout`] order).
    pub fn new(cfg: &ModelConfig, params: &[f32]) -> Result<Self, FlatError> {
        Self::from_vec(cfg, params.to_vec())
    }

    /// [`NativeModel::new`] taking the parameters by value (no copy).
    pub fn from_vec(cfg: &ModelConfig, params: Vec<f32>) -> Result<Self, FlatError> {
        let lay = layout(cfg);
        let expected: usize = lay.iter().map(ParamInfo::len).sum();
        if params.len() != expected {
            return Err(FlatError::Length {
                expected,
                got: params.len(),
            });
        }
        Ok(NativeModel {
            cfg: cfg.clone(),
            off: Offsets::new(cfg, &lay),
            params,
            grads: Vec::new(),
            ws: None,
        })
    }

    fn dims(&self, batch: &Batch) -> Dims {
        let d = self.cfg.d_model;
        Dims {
            b: batch.batch,
            t: batch.seq,
            d,
            h: self.cfg.n_heads,
            hd: d / self.cfg.n_heads,
            f: d * self.cfg.mlp_ratio,
            v: self.cfg.vocab,
        }
    }

    fn workspace(&mut self, dims: Dims) -> Workspace {
        match self.ws.take() {
            Some(ws) if ws.dims == dims => ws,
            _ => Workspace::new(dims, self.cfg.n_layers),
        }
    }

    /// Mean cross-entropy of `batch` (nats per token), forward only.
    pub fn eval_loss(&mut self, batch: &Batch) -> f32 {
        let dims = self.dims(batch);
        let mut ws = self.workspace(dims);
        self.forward(batch, &mut ws);
        let ce = kernels::xent_fwd(&ws.logits, &batch.targets, dims.v);
        self.ws = Some(ws);
        (ce / dims.n().max(1) as f64) as f32
    }

    /// Forward and backward on `batch`: fills [`NativeModel::grads`] with the gradient of
    /// cross-entropy + z-loss and returns the mean cross-entropy.
    pub fn loss_and_grads(&mut self, batch: &Batch) -> f32 {
        let dims = self.dims(batch);
        let mut ws = self.workspace(dims);
        self.forward(batch, &mut ws);
        let (ce, _) =
            kernels::xent_fwd_bwd(&mut ws.logits, &batch.targets, dims.v, Z_LOSS_WEIGHT as f32);
        self.backward(batch, &mut ws);
        self.ws = Some(ws);
        (ce / dims.n().max(1) as f64) as f32
    }

    fn forward(&self, batch: &Batch, ws: &mut Workspace) {
        let s = ws.dims;
        let (n, d, t) = (s.n(), s.d, s.t);
        assert!(
            t <= self.cfg.context && batch.inputs.len() == n,
            "batch does not fit the model"
        );
        let p = &self.params;
        let (tok, pos) = (&p[self.off.tok.clone()], &p[self.off.pos.clone()]);
        let vocab = self.cfg.vocab;
        ws.xs[0]
            .par_chunks_mut(d)
            .zip(batch.inputs.par_iter())
            .enumerate()
            .for_each(|(i, (x, &id))| {
                let id = (id.max(0) as usize).min(vocab - 1);
                let tt = i % t;
                let (te, pe) = (&tok[id * d..(id + 1) * d], &pos[tt * d..(tt + 1) * d]);
                x.iter_mut()
                    .zip(te.iter().zip(pe))
                    .for_each(|(x, (a, b))| *x = a + b);
            });
        for l in 0..self.cfg.n_layers {
            let (before, after) = ws.xs.split_at_mut(l + 1);
            self.block_forward(l, &before[l], &mut after[0], &mut ws.layers[l], &s);
        }
        let last = &ws.xs[self.cfg.n_layers];
        kernels::ln_fwd(
            last,
            &p[self.off.lnf_g.clone()],
            &p[self.off.lnf_b.clone()],
            d,
            &mut ws.xhatf,
            &mut ws.xnf,
            &mut ws.rstdf,
        );
        linear(&mut ws.logits, &ws.xnf, &p[self.off.head.clone()], d, false);
    }

    fn block_forward(&self, l: usize, x: &[f32], out: &mut [f32], a: &mut LayerActs, s: &Dims) {
        let o = &self.off.blocks[l];
        let p = &self.params;
        let (d, f, t, hd, h) = (s.d, s.f, s.t, s.hd, s.h);
        kernels::ln_fwd(
            x,
            &p[o.ln1_g.clone()],
            &p[o.ln1_b.clone()],
            d,
            &mut a.xhat1,
            &mut a.xn1,
            &mut a.rstd1,
        );
        linear(&mut a.qkv, &a.xn1, &p[o.qkv.clone()], d, false);
        let (qg, qb) = (&p[o.qn_g.clone()], &p[o.qn_b.clone()]);
        let (kg, kb) = (&p[o.kn_g.clone()], &p[o.kn_b.clone()]);
        let scale = 1.0 / (hd as f32).sqrt();
        let qkv = &a.qkv;
        a.heads
            .par_chunks_mut(s.head_len())
            .enumerate()
            .for_each(|(bh, chunk)| {
                let (b, hh) = (bh / h, bh % h);
                let hb = split_head(chunk, t, hd);
                for tt in 0..t {
                    let row = &qkv[(b * t + tt) * 3 * d..(b * t + tt + 1) * 3 * d];
                    let r = tt * hd..(tt + 1) * hd;
                    let src = |part: usize| &row[part * d + hh * hd..part * d + (hh + 1) * hd];
                    hb.rq[tt] = kernels::ln_row(
                        src(0),
                        qg,
                        qb,
                        1e-5,
                        &mut hb.qhat[r.clone()],
                        &mut hb.q[r.clone()],
                    );
                    hb.rk[tt] = kernels::ln_row(
                        src(1),
                        kg,
                        kb,
                        1e-5,
                        &mut hb.khat[r.clone()],
                        &mut hb.k[r.clone()],
                    );
                    hb.v[r].copy_from_slice(src(2));
                }
                matmul(hb.p, hb.q, Op::N, hb.k, Op::T, t, t, hd, false, false);
                kernels::causal_softmax(hb.p, t, scale);
                matmul(hb.o, hb.p, Op::N, hb.v, Op::N, t, hd, t, false, false);
            });
        // Heads back to rows: att[b, t, h·hd + e] = o[b, h][t, e].
        let heads = &a.heads;
        let hl = s.head_len();
        a.att.par_chunks_mut(d).enumerate().for_each(|(i, row)| {
            let (b, tt) = (i / t, i % t);
            for hh in 0..h {
                let base = (b * h + hh) * hl + 5 * t * hd + tt * hd;
                row[hh * hd..(hh + 1) * hd].copy_from_slice(&heads[base..base + hd]);
            }
        });
        a.x2.copy_from_slice(x);
        linear(&mut a.x2, &a.att, &p[o.proj.clone()], d, true);
        kernels::ln_fwd(
            &a.x2,
            &p[o.ln2_g.clone()],
            &p[o.ln2_b.clone()],
            d,
            &mut a.xhat2,
            &mut a.xn2,
            &mut a.rstd2,
        );
        linear(&mut a.h1, &a.xn2, &p[o.fc1_w.clone()], d, false);
        if let Some(b1) = &o.fc1_b {
            kernels::add_bias(&mut a.h1, &p[b1.clone()]);
        }
        kernels::gelu_fwd(&a.h1, &mut a.g);
        out.copy_from_slice(&a.x2);
        linear(out, &a.g, &p[o.fc2_w.clone()], f, true);
        if let Some(b2) = &o.fc2_b {
            kernels::add_bias(out, &p[b2.clone()]);
        }
    }

    fn backward(&mut self, batch: &Batch, ws: &mut Workspace) {
        let s = ws.dims;
        let (d, t) = (s.d, s.t);
        let total: usize = self.params.len();
        if self.grads.len() != total {
            self.grads = vec![0.0; total];
        }
        let off = self.off.clone();
        let p = &self.params;
        let g = &mut self.grads;
        // Head and final layer norm.
        linear_bwd(
            &ws.xnf,
            &p[off.head.clone()],
            &ws.logits,
            d,
            &mut g[off.head.clone()],
            &mut ws.dxn,
        );
        {
            let (dg, db) = two_mut(g, off.lnf_g.clone(), off.lnf_b.clone());
            kernels::ln_bwd(
                &ws.dxn,
                &ws.xhatf,
                &ws.rstdf,
                &p[off.lnf_g.clone()],
                d,
                &mut ws.dx,
                false,
                dg,
                db,
            );
        }
        for l in (0..self.cfg.n_layers).rev() {
            block_backward(
                p,
                g,
                &off.blocks[l],
                &ws.layers[l],
                &mut Scratch {
                    dx: &mut ws.dx,
                    dxn: &mut ws.dxn,
                    dh: &mut ws.dh,
                    dqkv: &mut ws.dqkv,
                    datt: &mut ws.datt,
                    dheads: &mut ws.dheads,
                    dnorm: &mut ws.dnorm,
                },
                &s,
            );
        }
        // Embeddings: scatter-add, in row order.
        g[off.tok.clone()].fill(0.0);
        g[off.pos.clone()].fill(0.0);
        let vocab = self.cfg.vocab;
        for (i, &id) in batch.inputs.iter().enumerate() {
            let id = (id.max(0) as usize).min(vocab - 1);
            let tt = i % t;
            let row = &ws.dx[i * d..(i + 1) * d];
            let te = &mut g[off.tok.start + id * d..off.tok.start + (id + 1) * d];
            te.iter_mut().zip(row).for_each(|(a, b)| *a += b);
            let pe = &mut g[off.pos.start + tt * d..off.pos.start + (tt + 1) * d];
            pe.iter_mut().zip(row).for_each(|(a, b)| *a += b);
        }
    }
}

/// Backward scratch buffers borrowed from the workspace.
struct Scratch<'a> {
    /// In: the gradient of the block's output; out: of its input.
    dx: &'a mut [f32],
    dxn: &'a mut [f32],
    dh: &'a mut [f32],
    dqkv: &'a mut [f32],
    datt: &'a mut [f32],
    dheads: &'a mut [f32],
    dnorm: &'a mut [f32],
}

fn block_backward(
    p: &[f32],
    g: &mut [f32],
    o: &BlockOffsets,
    a: &LayerActs,
    sc: &mut Scratch<'_>,
    s: &Dims,
) {
    let (d, f, t, hd, h) = (s.d, s.f, s.t, s.hd, s.h);
    // MLP: out = x2 + gelu(ln2(x2)·W1 + b1)·W2 + b2.
    linear_bwd(
        &a.g,
        &p[o.fc2_w.clone()],
        sc.dx,
        f,
        &mut g[o.fc2_w.clone()],
        sc.dh,
    );
    if let Some(b2) = &o.fc2_b {
        kernels::col_sums(sc.dx, d, &mut g[b2.clone()]);
    }
    kernels::gelu_bwd(&a.h1, sc.dh);
    linear_bwd(
        &a.xn2,
        &p[o.fc1_w.clone()],
        sc.dh,
        d,
        &mut g[o.fc1_w.clone()],
        sc.dxn,
    );
    if let Some(b1) = &o.fc1_b {
        kernels::col_sums(sc.dh, f, &mut g[b1.clone()]);
    }
    {
        let (dg, db) = two_mut(g, o.ln2_g.clone(), o.ln2_b.clone());
        kernels::ln_bwd(
            sc.dxn,
            &a.xhat2,
            &a.rstd2,
            &p[o.ln2_g.clone()],
            d,
            sc.dx,
            true,
            dg,
            db,
        );
    }
    // Attention: x2 = x + att·Wp.
    linear_bwd(
        &a.att,
        &p[o.proj.clone()],
        sc.dx,
        d,
        &mut g[o.proj.clone()],
        sc.datt,
    );
    let (qg, kg) = (&p[o.qn_g.clone()], &p[o.kn_g.clone()]);
    let scale = 1.0 / (hd as f32).sqrt();
    let th = t * hd;
    let dhl = 4 * th + t * t;
    let hl = s.head_len();
    let datt = &*sc.datt;
    sc.dheads
        .par_chunks_mut(dhl)
        .zip(sc.dnorm.par_chunks_mut(4 * hd))
        .enumerate()
        .for_each(|(bh, (c, dn))| {
            let (b, hh) = (bh / h, bh % h);
            // The forward values of this head (read only).
            let fw = &a.heads[bh * hl..(bh + 1) * hl];
            let (qhat, rest) = fw.split_at(th);
            let (khat, rest) = rest.split_at(th);
            let (q, rest) = rest.split_at(th);
            let (k, rest) = rest.split_at(th);
            let (v, rest) = rest.split_at(th);
            let (_o, rest) = rest.split_at(th);
            let (rq, rest) = rest.split_at(t);
            let (rk, pr) = rest.split_at(t);
            let (dq, c) = c.split_at_mut(th);
            let (dk, c) = c.split_at_mut(th);
            let (dv, c) = c.split_at_mut(th);
            let (dout, dp) = c.split_at_mut(th);
            for tt in 0..t {
                let src = &datt[(b * t + tt) * d + hh * hd..(b * t + tt) * d + (hh + 1) * hd];
                dout[tt * hd..(tt + 1) * hd].copy_from_slice(src);
            }
            matmul(dp, dout, Op::N, v, Op::T, t, t, hd, false, false);
            matmul(dv, pr, Op::T, dout, Op::N, t, hd, t, false, false);
            kernels::causal_softmax_bwd(pr, dp, t, scale);
            // dq̃ = dS·K, dk̃ = dSᵀ·Q (into dout as scratch for dk̃, then layer-norm backward).
            matmul(dq, dp, Op::N, k, Op::N, t, hd, t, false, false);
            matmul(dout, dp, Op::T, q, Op::N, t, hd, t, false, false);
            dn.fill(0.0);
            let (dqg, rest) = dn.split_at_mut(hd);
            let (dqb, rest) = rest.split_at_mut(hd);
            let (dkg, dkb) = rest.split_at_mut(hd);
            let mut row = vec![0.0f32; hd];
            for tt in 0..t {
                let r = tt * hd..(tt + 1) * hd;
                kernels::ln_row_bwd(
                    &dq[r.clone()],
                    &qhat[r.clone()],
                    rq[tt],
                    qg,
                    &mut row,
                    dqg,
                    dqb,
                );
                dq[r.clone()].copy_from_slice(&row);
                kernels::ln_row_bwd(
                    &dout[r.clone()],
                    &khat[r.clone()],
                    rk[tt],
                    kg,
                    &mut row,
                    dkg,
                    dkb,
                );
                dk[r].copy_from_slice(&row);
            }
        });
    // Heads back to rows of dqkv.
    let dheads = &*sc.dheads;
    sc.dqkv
        .par_chunks_mut(3 * d)
        .enumerate()
        .for_each(|(i, row)| {
            let (b, tt) = (i / t, i % t);
            for hh in 0..h {
                let base = (b * h + hh) * dhl + tt * hd;
                for part in 0..3 {
                    let src = &dheads[base + part * th..base + part * th + hd];
                    row[part * d + hh * hd..part * d + (hh + 1) * hd].copy_from_slice(src);
                }
            }
        });
    // q/k norm gains and shifts: per-head partials added in head order.
    for (range, part) in [(&o.qn_g, 0), (&o.qn_b, 1), (&o.kn_g, 2), (&o.kn_b, 3)] {
        let dst = &mut g[range.clone()];
        dst.fill(0.0);
        for dn in sc.dnorm.chunks(4 * hd) {
            dst.iter_mut()
                .zip(&dn[part * hd..(part + 1) * hd])
                .for_each(|(a, b)| *a += b);
        }
    }
    linear_bwd(
        &a.xn1,
        &p[o.qkv.clone()],
        sc.dqkv,
        d,
        &mut g[o.qkv.clone()],
        sc.dxn,
    );
    let (dg, db) = two_mut(g, o.ln1_g.clone(), o.ln1_b.clone());
    kernels::ln_bwd(
        sc.dxn,
        &a.xhat1,
        &a.rstd1,
        &p[o.ln1_g.clone()],
        d,
        sc.dx,
        true,
        dg,
        db,
    );
}

/// The AdamW update of [`crate::train::inner`] on flat vectors, fused into one pass: gradients
/// scaled by `grad_scale` (global-norm clipping), moments updated, bias-corrected step with
/// decoupled weight decay where `decay` says so (one flag per tensor of `layout`).
#[allow(clippy::too_many_arguments)]
pub fn adamw(
    params: &mut [f32],
    grads: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    layout: &[ParamInfo],
    decay: &[bool],
    t: u64,
    lr: f64,
    cfg: &crate::train::inner::InnerConfig,
    grad_scale: f32,
) {
    const CHUNK: usize = 8192;
    let (b1, b2) = (cfg.beta1, cfg.beta2);
    let t = t as i32;
    let mut c = kernels::AdamConsts {
        grad_scale,
        b1: b1 as f32,
        ob1: (1.0 - b1) as f32,
        b2: b2 as f32,
        ob2: (1.0 - b2) as f32,
        bc1: (1.0 - b1.powi(t)) as f32,
        bc2: (1.0 - b2.powi(t)) as f32,
        eps: cfg.eps as f32,
        lr: lr as f32,
        keep: 1.0,
    };
    let mut off = 0;
    for (info, &dec) in layout.iter().zip(decay) {
        let r = off..off + info.len();
        off = r.end;
        c.keep = (1.0 - lr * if dec { cfg.weight_decay } else { 0.0 }) as f32;
        params[r.clone()]
            .par_chunks_mut(CHUNK)
            .zip(grads[r.clone()].par_chunks(CHUNK))
            .zip(m[r.clone()].par_chunks_mut(CHUNK))
            .zip(v[r].par_chunks_mut(CHUNK))
            .for_each(|(((p, g), m), v)| kernels::adamw_chunk(p, g, m, v, &c));
    }
}

/// The global L2 norm of `grads` (f64 sums in a fixed order) and the scale that clips it to
/// `max_norm`, as [`crate::train::flat::clip_global_norm`] computes it.
pub fn clip_scale(grads: &[f32], max_norm: f32) -> (f32, f32) {
    let norm = kernels::sum_squares(grads).sqrt() as f32;
    let scale = if norm.is_finite() && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    };
    (norm, scale)
}

#[cfg(test)]
mod tests;
