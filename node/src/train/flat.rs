//! Flat parameter vectors: every parameter of a module in one `Vec<f32>`, and back.
//!
//! **Order.** Parameters appear in module-tree order: struct fields in declaration order,
//! `Vec` elements by index, depth first — for [`crate::train::model::Transformer`] that is
//! `tok_emb.weight, pos_emb, blocks.0.ln1.gamma, blocks.0.ln1.beta, blocks.0.qkv.weight, ...,
//! ln_f.gamma, ln_f.beta, head.weight`; each tensor's values are in row-major order. The same
//! names (path components joined by `.`) label the tensors of a checkpoint. Peers only agree
//! when they use the same order, so [`layout`] is part of what a run id hashes.
//!
//! Writing a vector back maps each `Param` in place, which keeps its `ParamId`: the inner
//! optimizer's state (keyed by id) stays attached across outer steps.

use crate::train::model::ModelConfig;
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

/// How initial parameters are drawn (a run setting: every peer must use the same scheme).
///
/// LayerNorm gains are 1 and shifts 0 in every scheme. `fan_in` is a linear layer's input
/// width (burn stores linear weights as `[in, out]`, so it is the first dimension).
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum InitScheme {
    /// PyTorch's module defaults, positions being an `nn.Embedding`: token and position
    /// embeddings N(0, 1), linear weights and biases U(±1/√fan_in). DiLoCo trains best from
    /// it (docs/RECIPE.md).
    #[default]
    Torch,
    /// GPT-2 / nanoGPT: every weight and both embeddings N(0, 0.02), residual output
    /// projections (`proj`, `fc2`) N(0, 0.02/√(2·layers)), biases 0. The default until the
    /// recipe study.
    Gpt2,
    /// Fan-in normal: linear weights N(0, 1/√fan_in), token and position embeddings N(0, 1),
    /// biases 0.
    Fanin,
    /// "Small init" (Nguyen & Salazar 2019): every weight and both embeddings
    /// N(0, √(2 / (5·d_model))), biases 0.
    Small,
}

impl std::fmt::Display for InitScheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Torch => "torch",
            Self::Gpt2 => "gpt2",
            Self::Fanin => "fanin",
            Self::Small => "small",
        })
    }
}

/// A seeded stream of the draws an initialiser needs, computed with integer and f32
/// arithmetic only so every platform produces the same bits.
struct Draws(ChaCha8Rng);

impl Draws {
    fn new(seed: u64, name: &str) -> Self {
        let mut key = blake3::Hasher::new();
        key.update(b"diloco-init");
        key.update(&seed.to_le_bytes());
        key.update(name.as_bytes());
        Self(ChaCha8Rng::from_seed(*key.finalize().as_bytes()))
    }
    /// Uniform in [0, 1) with 24 bits.
    fn unit(&mut self) -> f32 {
        (self.0.next_u32() >> 8) as f32 / (1u32 << 24) as f32
    }
    /// Approximately N(0, 1): an Irwin–Hall sum of 12 uniforms.
    fn normal(&mut self) -> f32 {
        let mut s = 0u64;
        for _ in 0..12 {
            s += (self.0.next_u32() >> 8) as u64;
        }
        s as f32 / (1u32 << 24) as f32 - 6.0
    }
}

/// What one parameter tensor is drawn from.
enum Dist {
    Const(f32),
    Normal(f32),
    Uniform(f32),
}

fn dist_for(p: &ParamInfo, layout: &[ParamInfo], model: &ModelConfig) -> Dist {
    let leaf = p.name.rsplit('.').next().unwrap_or("");
    match leaf {
        "gamma" => return Dist::Const(1.0),
        "beta" => return Dist::Const(0.0),
        _ => {}
    }
    let d = model.d_model as f32;
    let resid = p.name.ends_with("proj.weight") || p.name.ends_with("fc2.weight");
    let small = (2.0 / (5.0 * d)).sqrt();
    let fan_in = |p: &ParamInfo| p.shape.first().copied().unwrap_or(1).max(1) as f32;
    if leaf == "bias" {
        return match model.init {
            InitScheme::Torch => {
                let weight = p.name.trim_end_matches("bias").to_string() + "weight";
                let fi = layout
                    .iter()
                    .find(|q| q.name == weight)
                    .map_or(p.len().max(1) as f32, fan_in);
                Dist::Uniform(1.0 / fi.sqrt())
            }
            _ => Dist::Const(0.0),
        };
    }
    match (p.name.as_str(), model.init) {
        ("tok_emb.weight" | "pos_emb", InitScheme::Torch | InitScheme::Fanin) => Dist::Normal(1.0),
        ("tok_emb.weight" | "pos_emb", InitScheme::Gpt2) => Dist::Normal(0.02),
        ("tok_emb.weight" | "pos_emb", InitScheme::Small) => Dist::Normal(small),
        (_, InitScheme::Torch) => Dist::Uniform(1.0 / fan_in(p).sqrt()),
        (_, InitScheme::Fanin) => Dist::Normal(1.0 / fan_in(p).sqrt()),
        (_, InitScheme::Small) => Dist::Normal(small),
        (_, InitScheme::Gpt2) if resid => {
            Dist::Normal(0.02 / (2.0 * model.n_layers.max(1) as f32).sqrt())
        }
        (_, InitScheme::Gpt2) => Dist::Normal(0.02),
    }
}

/// Deterministic initial parameters for `layout` of `model`, derived from `seed` and
/// `model.init` alone. Each tensor draws from its own ChaCha8 stream keyed by
/// blake3(seed, parameter name), so every platform and backend produces the same bits.
pub fn init_values(layout: &[ParamInfo], model: &ModelConfig, seed: u64) -> Vec<f32> {
    let mut out = Vec::with_capacity(layout.iter().map(ParamInfo::len).sum());
    for p in layout {
        let n = p.len();
        match dist_for(p, layout, model) {
            Dist::Const(c) => out.extend(std::iter::repeat_n(c, n)),
            Dist::Normal(std) => {
                let mut r = Draws::new(seed, &p.name);
                out.extend((0..n).map(|_| r.normal() * std));
            }
            Dist::Uniform(bound) => {
                let mut r = Draws::new(seed, &p.name);
                out.extend((0..n).map(|_| (2.0 * r.unit() - 1.0) * bound));
            }
        }
    }
    out
}

/// Overwrites every parameter with [`init_values`] for `seed`.
pub fn init_params<M: Module>(module: M, model: &ModelConfig, seed: u64) -> M {
    let values = init_values(&layout(&module), model, seed);
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
    use crate::train::model::ModelConfig;

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
        let a = read(&init_params(cfg.init(&device), &cfg, 7));
        let b = read(&init_params(cfg.init(&device), &cfg, 7));
        let c = read(&init_params(cfg.init(&device), &cfg, 8));
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mean = a.iter().map(|x| *x as f64).sum::<f64>() / a.len() as f64;
        assert!(mean.abs() < 0.05);
    }

    fn stats(layout: &[ParamInfo], values: &[f32], name: &str) -> (f32, f32, f32) {
        let mut off = 0;
        for p in layout {
            if p.name == name {
                let v = &values[off..off + p.len()];
                let n = v.len() as f32;
                let mean = v.iter().sum::<f32>() / n;
                let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / n;
                let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
                return (mean, var.sqrt(), max);
            }
            off += p.len();
        }
        panic!("no parameter {name}");
    }

    #[test]
    fn each_scheme_draws_what_it_documents() {
        let device = Device::flex();
        let mut cfg = ModelConfig::parse("d64-l4-h2-c32").unwrap();
        let lay = layout(&cfg.init(&device));
        let close = |got: f32, want: f32, what: &str| {
            assert!(
                (got - want).abs() <= 0.06 * want,
                "{what}: std {got}, want {want}"
            );
        };
        cfg.init = InitScheme::Torch;
        let v = init_values(&lay, &cfg, 1);
        close(stats(&lay, &v, "tok_emb.weight").1, 1.0, "torch tok_emb");
        close(stats(&lay, &v, "pos_emb").1, 1.0, "torch pos_emb");
        // U(±1/√fan_in): std bound/√3, never beyond the bound. fc2 has fan_in 4·64.
        let (_, std, max) = stats(&lay, &v, "blocks.1.fc2.weight");
        close(std, 1.0 / (256f32.sqrt() * 3f32.sqrt()), "torch fc2");
        assert!(max <= 1.0 / 16.0);
        let (_, _, max) = stats(&lay, &v, "blocks.1.fc2.bias");
        assert!(
            max > 0.0 && max <= 1.0 / 16.0,
            "fc2 bias bound is its layer's fan_in"
        );
        let (_, _, max) = stats(&lay, &v, "blocks.0.fc1.bias");
        assert!(max > 1.0 / 16.0 && max <= 1.0 / 8.0, "fc1 bias: fan_in 64");
        assert_eq!(stats(&lay, &v, "blocks.0.ln1.gamma").0, 1.0);
        assert_eq!(stats(&lay, &v, "blocks.0.ln1.beta").1, 0.0);

        cfg.init = InitScheme::Gpt2;
        let v = init_values(&lay, &cfg, 1);
        close(stats(&lay, &v, "tok_emb.weight").1, 0.02, "gpt2 tok_emb");
        close(stats(&lay, &v, "pos_emb").1, 0.02, "gpt2 pos_emb");
        close(stats(&lay, &v, "blocks.2.qkv.weight").1, 0.02, "gpt2 qkv");
        close(
            stats(&lay, &v, "blocks.2.proj.weight").1,
            0.02 / 8f32.sqrt(),
            "gpt2 proj",
        );
        assert_eq!(stats(&lay, &v, "blocks.0.fc1.bias").2, 0.0);

        cfg.init = InitScheme::Fanin;
        let v = init_values(&lay, &cfg, 1);
        close(stats(&lay, &v, "head.weight").1, 0.125, "fanin head");
        close(
            stats(&lay, &v, "blocks.3.fc2.weight").1,
            1.0 / 16.0,
            "fanin fc2",
        );

        cfg.init = InitScheme::Small;
        let v = init_values(&lay, &cfg, 1);
        let small = (2.0f32 / 320.0).sqrt();
        close(stats(&lay, &v, "tok_emb.weight").1, small, "small tok_emb");
        close(stats(&lay, &v, "blocks.0.fc2.weight").1, small, "small fc2");
    }
}
