//! The inner loop: one replica's model, its AdamW state, and the learning-rate schedule.
//!
//! AdamW here is written out on burn tensors rather than taken from `burn-optim` because its
//! state must be checkpointed by parameter name and restored bit-exactly, and because LayerNorm
//! gains/shifts and biases are excluded from weight decay. The update is the decoupled one of
//! Loshchilov & Hutter with bias correction:
//!
//! ```text
//! m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g²
//! p = p (1 - lr wd) - lr (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)
//! ```
//!
//! Gradients are clipped to a global L2 norm of 1 first. The learning rate warms up linearly
//! and then follows a cosine to 5% of its peak, indexed by the global step (never reset per
//! DiLoCo round).

use crate::train::backend::Compute;
use crate::train::data::Batch;
use crate::train::flat::{self, ParamInfo};
use crate::train::model::{ModelConfig, Transformer};
use crate::train::native::{self, NativeModel};
use burn::module::{Module, ModuleMapper, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use diloco_protocol::outer::{outer_gradient, OuterError};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};

/// Inner optimizer hyperparameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InnerConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warmup steps.
    pub warmup: u64,
    /// Total steps of the run (end of the cosine).
    pub total_steps: u64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Adam beta1.
    pub beta1: f64,
    /// Adam beta2.
    pub beta2: f64,
    /// Adam epsilon.
    pub eps: f64,
    /// Global gradient-norm clip.
    pub clip: f32,
    /// Final learning rate as a fraction of the peak.
    pub min_lr_fraction: f64,
}

impl InnerConfig {
    /// Defaults from DESIGN.md: betas (0.9, 0.99), eps 1e-8, clip 1, cosine to 5%.
    pub fn new(lr: f64, warmup: u64, total_steps: u64, weight_decay: f64) -> Self {
        Self {
            lr,
            warmup,
            total_steps,
            weight_decay,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            clip: 1.0,
            min_lr_fraction: 0.05,
        }
    }

    /// Learning rate at global step `step` (0-based).
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup).max(1);
        let progress = ((step - self.warmup) as f64 / decay_steps as f64).min(1.0);
        let min = self.lr * self.min_lr_fraction;
        min + (self.lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// AdamW moments of one replica, one entry per parameter tensor in flat order.
#[derive(Debug, Clone, Default)]
pub struct AdamState {
    /// Steps taken (for bias correction).
    pub t: u64,
    moments: Moments,
}

/// Where the moments live: burn tensors on the replica's device, or flat vectors (the native
/// engine).
#[derive(Debug, Clone)]
enum Moments {
    /// First and second moments per parameter tensor, `None` until the first step.
    Tensors {
        m: Vec<Option<Tensor<1>>>,
        v: Vec<Option<Tensor<1>>>,
    },
    /// Flat moments in parameter order; empty before the first step.
    Flat { m: Vec<f32>, v: Vec<f32> },
}

impl Default for Moments {
    fn default() -> Self {
        Moments::Tensors {
            m: Vec::new(),
            v: Vec::new(),
        }
    }
}

impl AdamState {
    /// Moments as flat vectors in parameter order (zeros before the first step).
    pub fn to_flat(&self, layout: &[ParamInfo]) -> (Vec<f32>, Vec<f32>) {
        let total: usize = layout.iter().map(ParamInfo::len).sum();
        let (m, v) = match &self.moments {
            Moments::Flat { m, v } => (m, v),
            Moments::Tensors { m, v } => {
                let read = |xs: &Vec<Option<Tensor<1>>>| {
                    let mut out = Vec::with_capacity(total);
                    for (i, p) in layout.iter().enumerate() {
                        match xs.get(i).and_then(|x| x.as_ref()) {
                            Some(t) => out.extend(
                                t.to_data()
                                    .convert::<f32>()
                                    .try_into_vec::<f32>()
                                    .unwrap_or_default(),
                            ),
                            None => out.extend(std::iter::repeat_n(0.0, p.len())),
                        }
                    }
                    out
                };
                return (read(m), read(v));
            }
        };
        if m.len() == total && v.len() == total {
            (m.clone(), v.clone())
        } else {
            (vec![0.0; total], vec![0.0; total])
        }
    }

    /// Rebuilds state from flat moments (as written by [`AdamState::to_flat`]) for a replica
    /// on `compute`: burn tensors on its (inner) device, or flat vectors for the native engine.
    pub fn from_flat(
        t: u64,
        m: &[f32],
        v: &[f32],
        layout: &[ParamInfo],
        compute: &Compute,
    ) -> Self {
        let device = match compute {
            Compute::Native => {
                return AdamState {
                    t,
                    moments: Moments::Flat {
                        m: m.to_vec(),
                        v: v.to_vec(),
                    },
                }
            }
            Compute::Burn(device) => &device.clone().inner(),
        };
        let (mut ms, mut vs) = (Vec::new(), Vec::new());
        let mut off = 0;
        for p in layout {
            let n = p.len();
            let mk = |x: &[f32]| {
                (t > 0).then(|| {
                    Tensor::<1>::from_data(TensorData::new(x[off..off + n].to_vec(), [n]), device)
                })
            };
            ms.push(mk(m));
            vs.push(mk(v));
            off += n;
        }
        AdamState {
            t,
            moments: Moments::Tensors { m: ms, v: vs },
        }
    }

    /// The moments as burn tensors (converting flat ones, which only a state restored for
    /// another engine has).
    fn tensors(
        &mut self,
        layout: &[ParamInfo],
        compute: &Compute,
    ) -> (&mut Vec<Option<Tensor<1>>>, &mut Vec<Option<Tensor<1>>>) {
        if matches!(self.moments, Moments::Flat { .. }) {
            let (m, v) = self.to_flat(layout);
            *self = AdamState::from_flat(self.t, &m, &v, layout, compute);
        }
        match &mut self.moments {
            Moments::Tensors { m, v } => (m, v),
            Moments::Flat { .. } => unreachable!("converted to tensors above"),
        }
    }

    /// The moments as flat vectors of `total` values (zeros before the first step).
    fn flat(&mut self, layout: &[ParamInfo]) -> (&mut Vec<f32>, &mut Vec<f32>) {
        let total: usize = layout.iter().map(ParamInfo::len).sum();
        let ok =
            matches!(&self.moments, Moments::Flat { m, v } if m.len() == total && v.len() == total);
        if !ok {
            let (m, v) = self.to_flat(layout);
            self.moments = Moments::Flat { m, v };
        }
        match &mut self.moments {
            Moments::Flat { m, v } => (m, v),
            Moments::Tensors { .. } => unreachable!("converted to flat vectors above"),
        }
    }
}

struct AdamMapper<'a> {
    cfg: &'a InnerConfig,
    grads: &'a mut GradientsParams,
    t: u64,
    m: &'a mut Vec<Option<Tensor<1>>>,
    v: &'a mut Vec<Option<Tensor<1>>>,
    decay: &'a [bool],
    lr: f64,
    index: usize,
}

impl ModuleMapper for AdamMapper<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let i = self.index;
        self.index += 1;
        let Some(grad) = self.grads.remove::<D>(param.id) else {
            return param;
        };
        let (id, tensor, mapper) = param.consume();
        let require_grad = tensor.is_require_grad();
        let shape = grad.shape();
        let n = shape.num_elements();
        let g = grad.reshape([n]);
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        if self.m.len() <= i {
            self.m.resize(i + 1, None);
            self.v.resize(i + 1, None);
        }
        let m = match self.m[i].take() {
            Some(m) => m.mul_scalar(b1) + g.clone().mul_scalar(1.0 - b1),
            None => g.clone().mul_scalar(1.0 - b1),
        };
        let v = match self.v[i].take() {
            Some(v) => v.mul_scalar(b2) + g.square().mul_scalar(1.0 - b2),
            None => g.square().mul_scalar(1.0 - b2),
        };
        let t = self.t as i32;
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        let update =
            m.clone().div_scalar(bc1) / (v.clone().div_scalar(bc2).sqrt().add_scalar(self.cfg.eps));
        self.m[i] = Some(m);
        self.v[i] = Some(v);
        let wd = if self.decay.get(i).copied().unwrap_or(false) {
            self.cfg.weight_decay
        } else {
            0.0
        };
        let p = tensor.inner();
        let p = p.mul_scalar(1.0 - self.lr * wd) - update.reshape(shape).mul_scalar(self.lr);
        let mut p = Tensor::from_inner(p);
        if require_grad {
            p = p.require_grad();
        }
        Param::from_mapped_value(id, p, mapper)
    }
}

/// What one inner step reports.
#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    /// Cross-entropy of the batch before the update (nats per byte).
    pub loss: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    /// Learning rate used.
    pub lr: f64,
}

/// The model a replica trains, on one of the engines.
enum Engine {
    /// burn's autodiff over the selected device (`None` only while a step holds it).
    Burn(Option<Transformer>),
    /// The native CPU engine.
    Native(Box<NativeModel>),
}

/// One replica: the model on its engine, AdamW state, tokens processed.
pub struct Replica {
    engine: Engine,
    /// Inner optimizer state.
    pub adam: AdamState,
    layout: Vec<ParamInfo>,
    decay: Vec<bool>,
    compute: Compute,
    /// Tokens trained on since the last [`Replica::take_tokens`].
    pub tokens: u64,
}

impl Replica {
    /// Builds a replica of `cfg` on `compute` (autodiff is added here for burn devices)
    /// holding `params`.
    pub fn new(
        cfg: &ModelConfig,
        compute: &Compute,
        params: &[f32],
    ) -> Result<Self, flat::FlatError> {
        let (engine, layout, compute) = match compute {
            Compute::Burn(device) => {
                let device = device.clone().autodiff();
                let model = cfg.init(&device);
                let layout = flat::layout(&model);
                let model = flat::write(model, params)?;
                (Engine::Burn(Some(model)), layout, Compute::Burn(device))
            }
            Compute::Native => (
                Engine::Native(Box::new(NativeModel::new(cfg, params)?)),
                native::layout(cfg),
                Compute::Native,
            ),
        };
        let decay = layout
            .iter()
            .map(|p| {
                let leaf = p.name.rsplit('.').next().unwrap_or("");
                !matches!(leaf, "gamma" | "beta" | "bias")
            })
            .collect();
        Ok(Self {
            engine,
            adam: AdamState::default(),
            layout,
            decay,
            compute,
            tokens: 0,
        })
    }

    /// Parameter names and shapes in flat order.
    pub fn layout(&self) -> &[ParamInfo] {
        &self.layout
    }

    /// Current parameters as a flat vector.
    pub fn params(&self) -> Vec<f32> {
        match &self.engine {
            Engine::Burn(Some(m)) => flat::read(m),
            Engine::Burn(None) => unreachable!("model is only taken out inside step()"),
            Engine::Native(n) => n.params.clone(),
        }
    }

    /// Replaces the parameters (keeps the AdamW state, as DiLoCo prescribes).
    pub fn set_params(&mut self, params: &[f32]) -> Result<(), flat::FlatError> {
        // Check first: `flat::write` consumes the model, and an error must leave it in place.
        let expected: usize = self.layout.iter().map(ParamInfo::len).sum();
        if params.len() != expected {
            return Err(flat::FlatError::Length {
                expected,
                got: params.len(),
            });
        }
        match &mut self.engine {
            Engine::Burn(slot) => {
                let model = slot.take().unwrap_or_else(|| unreachable!());
                *slot = Some(flat::write(model, params)?);
            }
            Engine::Native(n) => n.params.copy_from_slice(params),
        }
        Ok(())
    }

    /// What tensors live on: a burn device (with autodiff) or the native engine.
    pub fn device(&self) -> &Compute {
        &self.compute
    }

    /// One AdamW step on `batch` with learning rate `lr`.
    pub fn step(&mut self, batch: &Batch, lr: f64, cfg: &InnerConfig) -> StepStats {
        self.adam.t += 1;
        let (loss, grad_norm) = match &mut self.engine {
            Engine::Native(n) => {
                let ce = n.loss_and_grads(batch);
                let (norm, scale) = native::clip_scale(&n.grads, cfg.clip);
                let t = self.adam.t;
                let (m, v) = self.adam.flat(&self.layout);
                let n = &mut **n;
                native::adamw(
                    &mut n.params,
                    &n.grads,
                    m,
                    v,
                    &self.layout,
                    &self.decay,
                    t,
                    lr,
                    cfg,
                    scale,
                );
                (ce, norm)
            }
            Engine::Burn(slot) => {
                let Compute::Burn(device) = &self.compute else {
                    unreachable!("a burn engine has a burn device")
                };
                let model = slot.take().unwrap_or_else(|| unreachable!());
                let (inputs, targets) = batch_tensors(batch, device);
                let loss = model.loss(inputs, targets);
                let ce: f32 = loss.ce.clone().into_scalar();
                let grads = loss.total.backward();
                let mut grads = GradientsParams::from_grads(grads, &model);
                let grad_norm = flat::clip_global_norm(&model, &mut grads, cfg.clip);
                let t = self.adam.t;
                let (m, v) = self.adam.tensors(&self.layout, &self.compute);
                let mut mapper = AdamMapper {
                    cfg,
                    grads: &mut grads,
                    t,
                    m,
                    v,
                    decay: &self.decay,
                    lr,
                    index: 0,
                };
                *slot = Some(model.map(&mut mapper));
                (ce, grad_norm)
            }
        };
        self.tokens += batch.tokens() as u64;
        StepStats {
            loss,
            grad_norm,
            lr,
        }
    }

    /// Returns and resets the token counter (the replica's weight in an outer step).
    pub fn take_tokens(&mut self) -> u64 {
        std::mem::take(&mut self.tokens)
    }

    /// One DiLoCo round of this replica, as `join` and `simulate` both run it: sets the
    /// parameters to the global ones `theta` (the AdamW state carries over), trains `steps`
    /// inner steps at global steps `first..first + steps` on `batch(step)` with the schedule of
    /// `cfg`, calling `on_step(step, stats)` after each, and returns the outer gradient
    /// `theta − local` with the mean loss and the tokens trained on. `Ok(None)` when `stop` was
    /// set before the round finished (the replica then holds a partly trained state).
    #[allow(clippy::too_many_arguments)]
    pub fn train_round(
        &mut self,
        theta: &[f32],
        first: u64,
        steps: u64,
        cfg: &InnerConfig,
        mut batch: impl FnMut(u64) -> Batch,
        stop: Option<&AtomicBool>,
        mut on_step: impl FnMut(u64, &StepStats),
    ) -> Result<Option<RoundResult>, RoundError> {
        self.set_params(theta)?;
        let mut loss = 0.0f64;
        let mut inner_s = 0.0f64;
        for step in first..first + steps {
            if stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
                return Ok(None);
            }
            let t = std::time::Instant::now();
            let stats = self.step(&batch(step), cfg.lr_at(step), cfg);
            inner_s += t.elapsed().as_secs_f64();
            loss += stats.loss as f64;
            on_step(step, &stats);
        }
        let delta = match &self.engine {
            // The native engine holds the parameters as one flat vector: no copy needed.
            Engine::Native(n) => outer_gradient(theta, &n.params)?,
            Engine::Burn(_) => outer_gradient(theta, &self.params())?,
        };
        Ok(Some(RoundResult {
            delta,
            loss: (loss / steps.max(1) as f64) as f32,
            tokens: self.take_tokens(),
            inner_s,
        }))
    }
}

/// What one replica's round of inner steps produced.
#[derive(Debug, Clone)]
pub struct RoundResult {
    /// The outer gradient: global parameters minus the trained local ones.
    pub delta: Vec<f32>,
    /// Mean training loss over the round's steps.
    pub loss: f32,
    /// Tokens trained on (the replica's weight in the outer step).
    pub tokens: u64,
    /// Seconds spent in the inner steps themselves (batches included); the rest of the round's
    /// time is DiLoCo's per-round overhead.
    pub inner_s: f64,
}

/// Why a round of inner steps could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RoundError {
    /// The global parameters do not fit the model.
    #[error("the global parameters do not fit the model")]
    Params(#[from] flat::FlatError),
    /// The outer gradient could not be formed.
    #[error("computing the outer gradient")]
    Outer(#[from] OuterError),
}

fn batch_tensors(batch: &Batch, device: &Device) -> (Tensor<2, Int>, Tensor<2, Int>) {
    let shape = [batch.batch, batch.seq];
    let inputs = Tensor::<2, Int>::from_data(TensorData::new(batch.inputs.clone(), shape), device);
    let targets =
        Tensor::<2, Int>::from_data(TensorData::new(batch.targets.clone(), shape), device);
    (inputs, targets)
}

/// An evaluation-only copy of the model (no autodiff).
pub enum Evaluator {
    /// burn on the selected device.
    Burn {
        /// The model (`None` only while a loss is computed).
        model: Option<Transformer>,
        /// Its device.
        device: Device,
    },
    /// The native CPU engine.
    Native(Box<NativeModel>),
}

impl Evaluator {
    /// Builds an evaluator for `cfg` on `compute`.
    pub fn new(cfg: &ModelConfig, compute: &Compute) -> Self {
        match compute {
            Compute::Burn(device) => Evaluator::Burn {
                model: Some(cfg.init(device)),
                device: device.clone(),
            },
            Compute::Native => {
                match NativeModel::from_vec(cfg, vec![0.0; cfg.num_params()]) {
                    Ok(m) => Evaluator::Native(Box::new(m)),
                    // `num_params` is the layout's length by construction (tested).
                    Err(e) => unreachable!("native layout disagrees with num_params: {e}"),
                }
            }
        }
    }

    /// Mean cross-entropy (nats per byte) of `params` over `batches`.
    pub fn loss(&mut self, params: &[f32], batches: &[Batch]) -> Result<f32, flat::FlatError> {
        let (mut sum, mut tokens) = (0.0f64, 0usize);
        match self {
            Evaluator::Native(n) => {
                if params.len() != n.params.len() {
                    return Err(flat::FlatError::Length {
                        expected: n.params.len(),
                        got: params.len(),
                    });
                }
                n.params.copy_from_slice(params);
                for b in batches {
                    sum += n.eval_loss(b) as f64 * b.tokens() as f64;
                    tokens += b.tokens();
                }
            }
            Evaluator::Burn {
                model: slot,
                device,
            } => {
                // Check the length first: `flat::write` consumes the model, and a failed write
                // must leave the evaluator usable.
                let expected = slot.as_ref().map_or(0, |m| m.num_params());
                if params.len() != expected {
                    return Err(flat::FlatError::Length {
                        expected,
                        got: params.len(),
                    });
                }
                let model = slot.take().unwrap_or_else(|| unreachable!());
                let model = flat::write(model, params)?;
                for b in batches {
                    let (inputs, targets) = batch_tensors(b, device);
                    let ce: f32 = model.loss(inputs, targets).ce.into_scalar();
                    sum += ce as f64 * b.tokens() as f64;
                    tokens += b.tokens();
                }
                *slot = Some(model);
            }
        }
        Ok(if tokens == 0 {
            f32::NAN
        } else {
            (sum / tokens as f64) as f32
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::data::{Corpus, DataSpec, Stream};

    #[test]
    fn schedule_warms_up_then_decays_to_five_percent() {
        let c = InnerConfig::new(1.0, 10, 110, 0.1);
        assert!((c.lr_at(0) - 0.1).abs() < 1e-12);
        assert!((c.lr_at(9) - 1.0).abs() < 1e-12);
        assert!((c.lr_at(10) - 1.0).abs() < 1e-12);
        assert!((c.lr_at(60) - 0.525).abs() < 1e-9);
        assert!((c.lr_at(110) - 0.05).abs() < 1e-12);
        assert!((c.lr_at(10_000) - 0.05).abs() < 1e-12);
    }

    #[test]
    fn a_few_steps_reduce_the_loss() {
        let cfg = ModelConfig::parse("d32-l2-h2-c32").unwrap();
        let device = Device::flex();
        let init = flat::init_values(&flat::layout(&cfg.init(&device)), &cfg, 1);
        let mut r = Replica::new(&cfg, &Compute::Burn(device), &init).unwrap();
        let corpus = Corpus::load(&DataSpec::default()).unwrap();
        let stream = Stream::new(&corpus, 0, 1, 0, 1, 8, 32);
        let inner = InnerConfig::new(3e-3, 2, 30, 0.1);
        let first = r
            .step(&stream.batch(&corpus, 0), inner.lr_at(0), &inner)
            .loss;
        let mut last = first;
        for s in 1..30 {
            last = r
                .step(&stream.batch(&corpus, s), inner.lr_at(s), &inner)
                .loss;
        }
        assert!(last < first - 0.5, "loss {first} -> {last}");
        // Writing parameters back keeps the model trainable.
        let p = r.params();
        r.set_params(&p).unwrap();
        assert_eq!(r.params(), p);
        let after = r.step(&stream.batch(&corpus, 30), inner.lr_at(30), &inner);
        assert!(after.grad_norm > 0.0);
        assert_ne!(r.params(), p);
    }

    #[test]
    fn adam_state_roundtrips_through_flat_vectors() {
        let cfg = ModelConfig::parse("d16-l1-h2-c16").unwrap();
        let init = flat::init_values(&native::layout(&cfg), &cfg, 3);
        let corpus = Corpus::load(&DataSpec::default()).unwrap();
        let stream = Stream::new(&corpus, 0, 1, 0, 1, 4, 16);
        let inner = InnerConfig::new(1e-3, 1, 10, 0.1);
        for compute in [Compute::Burn(Device::flex()), Compute::Native] {
            let mut a = Replica::new(&cfg, &compute, &init).unwrap();
            for s in 0..3 {
                a.step(&stream.batch(&corpus, s), inner.lr_at(s), &inner);
            }
            let (m, v) = a.adam.to_flat(a.layout());
            let mut b = Replica::new(&cfg, &compute, &a.params()).unwrap();
            b.adam = AdamState::from_flat(a.adam.t, &m, &v, b.layout(), b.device());
            for s in 3..5 {
                a.step(&stream.batch(&corpus, s), inner.lr_at(s), &inner);
                b.step(&stream.batch(&corpus, s), inner.lr_at(s), &inner);
            }
            assert_eq!(a.params(), b.params(), "{compute:?}");
        }
    }

    /// The native engine trains like burn's: same losses and parameters to float precision
    /// after a few AdamW steps with clipping and weight decay, and an AdamW state moves between
    /// the engines (a checkpoint written by one resumes on the other).
    #[test]
    fn the_native_engine_trains_like_burn() {
        let cfg = ModelConfig::parse("d32-l2-h2-c32").unwrap();
        let init = flat::init_values(&native::layout(&cfg), &cfg, 4);
        let corpus = Corpus::load(&DataSpec::default()).unwrap();
        let stream = Stream::new(&corpus, 0, 1, 0, 1, 4, 32);
        // A high rate and a tight clip so that clipping and decay both act.
        let mut inner = InnerConfig::new(1e-2, 2, 20, 0.1);
        inner.clip = 0.5;
        let mut burn = Replica::new(&cfg, &Compute::Burn(Device::flex()), &init).unwrap();
        let mut native = Replica::new(&cfg, &Compute::Native, &init).unwrap();
        for s in 0..6 {
            let b = stream.batch(&corpus, s);
            let x = burn.step(&b, inner.lr_at(s), &inner);
            let y = native.step(&b, inner.lr_at(s), &inner);
            assert!(
                (x.loss - y.loss).abs() < 1e-4 * x.loss,
                "step {s}: {} vs {}",
                x.loss,
                y.loss
            );
            assert!((x.grad_norm - y.grad_norm).abs() < 1e-3 * x.grad_norm);
        }
        // Adam divides by √v, so an element whose gradient is at rounding level moves by up to
        // a full step either way: compare the change from the start as a whole, not element-wise.
        let rel = |a: &[f32], b: &[f32]| {
            let diff: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
            let moved: f64 = a
                .iter()
                .zip(&init)
                .map(|(x, y)| ((x - y) as f64).powi(2))
                .sum();
            (diff / moved).sqrt()
        };
        let (pb, pn) = (burn.params(), native.params());
        let r = rel(&pb, &pn);
        assert!(
            r < 1e-3,
            "parameters differ by {r} of their change after 6 steps"
        );
        // Burn's state into a native replica and on: it keeps tracking burn.
        let (m, v) = burn.adam.to_flat(burn.layout());
        let mut moved = Replica::new(&cfg, &Compute::Native, &pb).unwrap();
        moved.adam = AdamState::from_flat(burn.adam.t, &m, &v, moved.layout(), moved.device());
        let b = stream.batch(&corpus, 6);
        burn.step(&b, inner.lr_at(6), &inner);
        moved.step(&b, inner.lr_at(6), &inner);
        let r = rel(&burn.params(), &moved.params());
        assert!(r < 1e-3, "a moved AdamW state diverges by {r}");
    }
}

#[cfg(test)]
mod eval_tests {
    use super::*;
    use crate::train::data::{eval_batches, Corpus, DataSpec};

    #[test]
    fn untrained_model_scores_about_ln_256() {
        let cfg = ModelConfig::parse("d16-l1-h2-c16").unwrap();
        let device = Device::flex();
        let init = flat::init_values(&flat::layout(&cfg.init(&device)), &cfg, 5);
        let corpus = Corpus::load(&DataSpec {
            eval_fraction: 0.05,
            ..Default::default()
        })
        .unwrap();
        let batches = eval_batches(&corpus, 16, 2, 8);
        assert_eq!(batches.len(), 4);
        let loss = Evaluator::new(&cfg, &Compute::Burn(device))
            .loss(&init, &batches)
            .unwrap();
        assert!((loss - 256f32.ln()).abs() < 0.2, "{loss}");
        let native = Evaluator::new(&cfg, &Compute::Native)
            .loss(&init, &batches)
            .unwrap();
        assert!(
            (native - loss).abs() < 1e-5 * loss,
            "native {native} vs burn {loss}"
        );
        assert!(Evaluator::new(&cfg, &Compute::Native)
            .loss(&init[1..], &batches)
            .is_err());
    }
}
