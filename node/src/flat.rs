//! Flat parameter vectors: every parameter of a module in one `Vec<f32>`, and back.
//!
//! **Order.** Parameters appear in module-tree order: struct fields in declaration order,
//! `Vec` elements by index, depth first — for [`crate::model::Transformer`] that is
//! `tok_emb.weight, pos_emb, blocks.0.ln1.gamma, blocks.0.ln1.beta, blocks.0.qkv.weight, ...,
//! ln_f.gamma, ln_f.beta, head.weight`; each tensor's values are in row-major order. The same
//! names (path components joined by `.`) label the tensors of a checkpoint. Peers only agree
//! when they use the same order, so [`layout`] is part of what a run id hashes.
//!
//! Writing a vector back maps each `Param` in place, which keeps its `ParamId`: the inner
//! optimizer's state (keyed by id) stays attached across outer steps.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use thiserror::Error;

/// Errors moving parameters between a module and a flat vector.
#[derive(Debug, Error, PartialEq)]
#[non_exhaustive]
pub enum FlatError {
    /// The vector does not have one value per parameter.
    #[error("flat vector has {got} values but the model has {expected} parameters")]
    Length {
        /// Parameters in the model.
        expected: usize,
        /// Values given.
        got: usize,
    },
}

/// Name and shape of one parameter tensor, in flat order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamInfo {
    /// Module path joined by `.` (e.g. `blocks.0.qkv.weight`).
    pub name: String,
    /// Tensor shape.
    pub shape: Vec<usize>,
}

impl ParamInfo {
    /// Number of values.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    /// True when the tensor has no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Default)]
struct Path(Vec<String>);

impl Path {
    fn enter(&mut self, name: &str) {
        self.0.push(name.to_string());
    }
    fn exit(&mut self) {
        self.0.pop();
    }
    fn joined(&self) -> String {
        self.0.join(".")
    }
}

struct LayoutVisitor {
    path: Path,
    out: Vec<ParamInfo>,
}

impl ModuleVisitor for LayoutVisitor {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.out.push(ParamInfo {
            name: self.path.joined(),
            shape: param.lazy_shape().to_vec(),
        });
    }
}

/// Names and shapes of all parameters, in flat order.
pub fn layout<M: Module>(module: &M) -> Vec<ParamInfo> {
    let mut v = LayoutVisitor {
        path: Path::default(),
        out: Vec::new(),
    };
    module.visit(&mut v);
    v.out
}

struct ReadVisitor {
    out: Vec<f32>,
}

impl ModuleVisitor for ReadVisitor {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let data = param.val().into_data().convert::<f32>();
        match data.as_slice::<f32>() {
            Ok(values) => self.out.extend_from_slice(values),
            // `convert::<f32>` above guarantees the dtype; an error here is a burn bug.
            Err(e) => unreachable!("converted tensor data is not f32: {e:?}"),
        }
    }
}

/// Reads every parameter into one vector, in [`layout`] order.
pub fn read<M: Module>(module: &M) -> Vec<f32> {
    let mut v = ReadVisitor {
        out: Vec::with_capacity(module.num_params()),
    };
    module.visit(&mut v);
    v.out
}

struct WriteMapper<'a> {
    values: &'a [f32],
    offset: usize,
}

impl ModuleMapper for WriteMapper<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let values = self.values;
        let start = self.offset;
        let shape = param.lazy_shape();
        let n = shape.num_elements();
        self.offset += n;
        let (id, old, mapper) = param.consume();
        let require_grad = old.is_require_grad();
        let device = old.device();
        drop(old);
        let data = TensorData::new(values[start..start + n].to_vec(), shape);
        let mut t = Tensor::from_data(data, &device);
        if require_grad {
            t = t.require_grad();
        }
        Param::from_mapped_value(id, t, mapper)
    }
}

/// Writes `values` (in [`layout`] order) into the module's parameters, keeping their ids.
pub fn write<M: Module>(module: M, values: &[f32]) -> Result<M, FlatError> {
    let expected = module.num_params();
    if values.len() != expected {
        return Err(FlatError::Length {
            expected,
            got: values.len(),
        });
    }
    Ok(module.map(&mut WriteMapper { values, offset: 0 }))
}

/// Deterministic initial parameters for `layout`, derived from `seed` alone.
///
/// LayerNorm gains are 1, biases and LayerNorm shifts 0; the residual output projections
/// (`proj`, `fc2`) draw from N(0, 0.02/sqrt(2·layers)), every other weight from N(0, 0.02).
/// Normal draws are Irwin–Hall sums of 12 uniforms from a ChaCha8 stream keyed by
/// blake3(seed, parameter name): integer and f32 arithmetic only, so every platform and backend
/// produces the same bits.
pub fn init_values(layout: &[ParamInfo], n_layers: usize, seed: u64) -> Vec<f32> {
    let mut out = Vec::with_capacity(layout.iter().map(ParamInfo::len).sum());
    let resid_std = 0.02 / (2.0 * n_layers.max(1) as f32).sqrt();
    for p in layout {
        let leaf = p.name.rsplit('.').next().unwrap_or("");
        let n = p.len();
        if leaf == "gamma" {
            out.extend(std::iter::repeat_n(1.0f32, n));
        } else if leaf == "beta" || leaf == "bias" {
            out.extend(std::iter::repeat_n(0.0f32, n));
        } else {
            let std = if p.name.ends_with("proj.weight") || p.name.ends_with("fc2.weight") {
                resid_std
            } else {
                0.02
            };
            let mut key = blake3::Hasher::new();
            key.update(b"diloco-init");
            key.update(&seed.to_le_bytes());
            key.update(p.name.as_bytes());
            let mut rng = ChaCha8Rng::from_seed(*key.finalize().as_bytes());
            for _ in 0..n {
                let mut s = 0u64;
                for _ in 0..12 {
                    s += (rng.next_u32() >> 8) as u64; // 24-bit uniforms
                }
                let z = s as f32 / (1u32 << 24) as f32 - 6.0;
                out.push(z * std);
            }
        }
    }
    out
}

/// Overwrites every parameter with [`init_values`] for `seed`.
pub fn init_params<M: Module>(module: M, n_layers: usize, seed: u64) -> M {
    let values = init_values(&layout(&module), n_layers, seed);
    match write(module, &values) {
        Ok(m) => m,
        // init_values yields exactly one value per parameter of this layout.
        Err(e) => unreachable!("init_values produced a wrong length: {e}"),
    }
}

struct GradNorm<'a> {
    grads: &'a GradientsParams,
    sum: Option<Tensor<1>>,
}

impl ModuleVisitor for GradNorm<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(param.id) {
            let sq = g.square().sum();
            self.sum = Some(match self.sum.take() {
                Some(s) => s + sq,
                None => sq,
            });
        }
    }
}

struct GradScale<'a> {
    grads: &'a mut GradientsParams,
    scale: f32,
}

impl ModuleVisitor for GradScale<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.remove::<D>(param.id) {
            self.grads.register::<D>(param.id, g.mul_scalar(self.scale));
        }
    }
}

/// Clips the global L2 norm of all gradients of `module` to `max_norm`; returns the norm
/// before clipping.
pub fn clip_global_norm<M: Module>(module: &M, grads: &mut GradientsParams, max_norm: f32) -> f32 {
    let mut v = GradNorm { grads, sum: None };
    module.visit(&mut v);
    let norm = match v.sum {
        Some(s) => s.into_scalar::<f32>().sqrt(),
        None => 0.0,
    };
    if norm.is_finite() && norm > max_norm {
        let mut s = GradScale {
            grads,
            scale: max_norm / (norm + 1e-6),
        };
        module.visit(&mut s);
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;

    #[test]
    fn read_write_roundtrip_keeps_ids_and_order() {
        let cfg = ModelConfig::parse("d16-l2-h2-c8").unwrap();
        let device = Device::flex();
        let model = cfg.init(&device);
        let lay = layout(&model);
        assert_eq!(lay.first().unwrap().name, "tok_emb.weight");
        assert_eq!(lay[1].name, "pos_emb");
        assert_eq!(lay[2].name, "blocks.0.ln1.gamma");
        assert_eq!(lay.last().unwrap().name, "head.weight");
        assert_eq!(
            lay.iter().map(ParamInfo::len).sum::<usize>(),
            cfg.num_params()
        );
        let values: Vec<f32> = (0..cfg.num_params()).map(|i| i as f32 * 0.001).collect();
        let model = write(model, &values).unwrap();
        assert_eq!(read(&model), values);
        assert!(matches!(
            write(model, &values[1..]),
            Err(FlatError::Length { .. })
        ));
    }

    #[test]
    fn init_is_deterministic_and_seed_dependent() {
        let cfg = ModelConfig::parse("d16-l2-h2-c8").unwrap();
        let device = Device::flex();
        let a = read(&init_params(cfg.init(&device), 2, 7));
        let b = read(&init_params(cfg.init(&device), 2, 7));
        let c = read(&init_params(cfg.init(&device), 2, 8));
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mean = a.iter().map(|x| *x as f64).sum::<f64>() / a.len() as f64;
        assert!(mean.abs() < 0.05);
    }
}
