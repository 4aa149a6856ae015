//! The decoder-only transformer every replica trains.
//!
//! Pre-norm blocks (LayerNorm → causal self-attention → residual, LayerNorm → GELU MLP →
//! residual), QK-LayerNorm (queries and keys are layer-normalised per head before the dot
//! product, which keeps attention logits bounded at high learning rates), learned absolute
//! position embeddings, an untied output head, and a byte vocabulary (256) by default so no
//! tokenizer has to be downloaded. The training loss adds a z-loss term (1e-4 · mean(lse²))
//! that keeps the softmax normaliser near zero, as in "Scaling Laws for DiLoCo".
//!
//! Initial parameters do not come from burn's initialisers: [`Transformer::new`] builds the
//! module and then [`crate::train::flat::init_params`] overwrites every parameter from a seeded
//! ChaCha stream in the documented parameter order, so every backend and every peer starts from
//! bit-identical parameters without any transfer.

use crate::train::flat::InitScheme;
use burn::module::Param;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::{gelu, softmax};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Weight of the z-loss term added to the training loss.
pub const Z_LOSS_WEIGHT: f64 = 1e-4;

/// Errors in a model configuration.
#[derive(Debug, Error, PartialEq)]
#[non_exhaustive]
pub enum ModelError {
    /// The model name is not one of the named sizes.
    #[error("unknown model '{0}': use tiny, small or base, or give explicit dimensions as d<d_model>-l<layers>-h<heads>-c<context> (e.g. d128-l4-h4-c128)")]
    UnknownName(String),
    /// A dimension is zero or inconsistent.
    #[error("invalid model dimensions: {0}")]
    Invalid(String),
}

/// Shape of the transformer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Vocabulary size (256 for bytes).
    pub vocab: usize,
    /// Residual stream width.
    pub d_model: usize,
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Attention heads per block (`d_model` must divide evenly).
    pub n_heads: usize,
    /// Maximum sequence length (size of the position table).
    pub context: usize,
    /// MLP hidden width as a multiple of `d_model`.
    pub mlp_ratio: usize,
    /// Whether the MLP's two linear layers have biases.
    #[serde(default = "yes")]
    pub mlp_bias: bool,
    /// How the initial parameters are drawn.
    #[serde(default)]
    pub init: InitScheme,
}

fn yes() -> bool {
    true
}

impl ModelConfig {
    /// `tiny`: ~0.9M parameters (d 128, 4 layers, 4 heads, context 128).
    pub fn tiny() -> Self {
        Self {
            vocab: 256,
            d_model: 128,
            n_layers: 4,
            n_heads: 4,
            context: 128,
            mlp_ratio: 4,
            mlp_bias: true,
            init: InitScheme::default(),
        }
    }
    /// `small`: ~25M parameters (d 512, 8 layers, 8 heads, context 256).
    pub fn small() -> Self {
        Self {
            vocab: 256,
            d_model: 512,
            n_layers: 8,
            n_heads: 8,
            context: 256,
            mlp_ratio: 4,
            mlp_bias: true,
            init: InitScheme::default(),
        }
    }
    /// `base`: ~128M parameters (d 768, 18 layers, 12 heads, context 1024).
    pub fn base() -> Self {
        Self {
            vocab: 256,
            d_model: 768,
            n_layers: 18,
            n_heads: 12,
            context: 1024,
            mlp_ratio: 4,
            mlp_bias: true,
            init: InitScheme::default(),
        }
    }

    /// Parses a named size (`tiny`, `small`, `base`) or explicit dimensions
    /// `d<d_model>-l<layers>-h<heads>-c<context>`.
    pub fn parse(name: &str) -> Result<Self, ModelError> {
        let cfg = match name {
            "tiny" => Self::tiny(),
            "small" => Self::small(),
            "base" => Self::base(),
            other => Self::parse_explicit(other)?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn parse_explicit(s: &str) -> Result<Self, ModelError> {
        let unknown = || ModelError::UnknownName(s.to_string());
        let mut cfg = Self::tiny();
        let (mut d, mut l, mut h, mut c) = (false, false, false, false);
        for part in s.split('-') {
            let (key, value) = part.split_at(part.len().min(1));
            let v: usize = value.parse().map_err(|_| unknown())?;
            match key {
                "d" => (cfg.d_model, d) = (v, true),
                "l" => (cfg.n_layers, l) = (v, true),
                "h" => (cfg.n_heads, h) = (v, true),
                "c" => (cfg.context, c) = (v, true),
                "v" => cfg.vocab = v,
                _ => return Err(unknown()),
            }
        }
        if d && l && h && c {
            Ok(cfg)
        } else {
            Err(unknown())
        }
    }

    /// Checks that the dimensions are usable.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |m: &str| Err(ModelError::Invalid(m.to_string()));
        if self.vocab == 0 || self.d_model == 0 || self.n_layers == 0 || self.n_heads == 0 {
            return bad("vocab, d_model, layers and heads must all be at least 1");
        }
        if self.context < 2 {
            return bad("context must be at least 2");
        }
        if self.d_model % self.n_heads != 0 {
            return bad("d_model must be a multiple of the number of heads");
        }
        if self.mlp_ratio == 0 {
            return bad("mlp_ratio must be at least 1");
        }
        Ok(())
    }

    /// Short, stable name used in logs and checkpoints.
    pub fn describe(&self) -> String {
        format!(
            "d{}-l{}-h{}-c{}-v{}{}-init-{}",
            self.d_model,
            self.n_layers,
            self.n_heads,
            self.context,
            self.vocab,
            if self.mlp_bias { "" } else { "-nobias" },
            self.init
        )
    }

    /// Exact parameter count of the model this config builds.
    pub fn num_params(&self) -> usize {
        let d = self.d_model;
        let hd = d / self.n_heads;
        let hidden = d * self.mlp_ratio;
        let block = 2 * (2 * d) // ln1, ln2 (gamma + beta)
            + 2 * (2 * hd) // q_norm, k_norm
            + d * 3 * d // qkv
            + d * d // proj
            + d * hidden // fc1
            + hidden * d // fc2
            + if self.mlp_bias { hidden + d } else { 0 };
        self.vocab * d + self.context * d + self.n_layers * block + 2 * d + d * self.vocab
    }

    /// Names and shapes of the parameters in flat order ([`crate::train::flat`]), as
    /// [`crate::train::flat::layout`] gives them for the module [`ModelConfig::init`] builds,
    /// without building it.
    pub fn layout(&self) -> Vec<crate::train::flat::ParamInfo> {
        crate::train::native::layout(self)
    }

    /// Builds the module on `device` (parameters still need [`crate::train::flat::init_params`]).
    pub fn init(&self, device: &Device) -> Transformer {
        let d = self.d_model;
        let hd = d / self.n_heads;
        let hidden = d * self.mlp_ratio;
        let blocks = (0..self.n_layers)
            .map(|_| Block {
                ln1: LayerNormConfig::new(d).init(device),
                qkv: LinearConfig::new(d, 3 * d).with_bias(false).init(device),
                q_norm: LayerNormConfig::new(hd).init(device),
                k_norm: LayerNormConfig::new(hd).init(device),
                proj: LinearConfig::new(d, d).with_bias(false).init(device),
                ln2: LayerNormConfig::new(d).init(device),
                fc1: LinearConfig::new(d, hidden)
                    .with_bias(self.mlp_bias)
                    .init(device),
                fc2: LinearConfig::new(hidden, d)
                    .with_bias(self.mlp_bias)
                    .init(device),
                n_heads: self.n_heads,
            })
            .collect();
        Transformer {
            tok_emb: EmbeddingConfig::new(self.vocab, d).init(device),
            pos_emb: Param::from_tensor(Tensor::zeros([self.context, d], device)),
            blocks,
            ln_f: LayerNormConfig::new(d).init(device),
            head: LinearConfig::new(d, self.vocab)
                .with_bias(false)
                .init(device),
        }
    }
}

/// One pre-norm transformer block with QK-LayerNorm.
#[derive(Module, Debug)]
pub struct Block {
    ln1: LayerNorm,
    qkv: Linear,
    q_norm: LayerNorm,
    k_norm: LayerNorm,
    proj: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    n_heads: usize,
}

impl Block {
    /// `x`: `[batch, seq, d_model]`, `mask`: `[seq, seq]` true where attention is forbidden.
    fn forward(&self, x: Tensor<3>, mask: Tensor<4, Bool>) -> Tensor<3> {
        let [b, t, d] = x.dims();
        let h = self.n_heads;
        let hd = d / h;
        let qkv = self.qkv.forward(self.ln1.forward(x.clone())); // [b, t, 3d]
        let qkv = qkv.reshape([b, t, 3, h, hd]).permute([2, 0, 3, 1, 4]); // [3, b, h, t, hd]
        let q = qkv.clone().narrow(0, 0, 1).reshape([b, h, t, hd]);
        let k = qkv.clone().narrow(0, 1, 1).reshape([b, h, t, hd]);
        let v = qkv.narrow(0, 2, 1).reshape([b, h, t, hd]);
        let q = self.q_norm.forward(q);
        let k = self.k_norm.forward(k);
        let scores = q.matmul(k.swap_dims(2, 3)).div_scalar((hd as f64).sqrt()); // [b, h, t, t]
        let scores = scores.mask_fill(mask, -1e9);
        let att = softmax(scores, 3).matmul(v); // [b, h, t, hd]
        let att = att.swap_dims(1, 2).reshape([b, t, d]);
        let x = x + self.proj.forward(att);
        let y = self
            .fc2
            .forward(gelu(self.fc1.forward(self.ln2.forward(x.clone()))));
        x + y
    }
}

/// The whole model.
#[derive(Module, Debug)]
pub struct Transformer {
    tok_emb: Embedding,
    pos_emb: Param<Tensor<2>>,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    head: Linear,
}

/// Loss terms of one batch.
pub struct Loss {
    /// Scalar the optimizer minimises: cross-entropy + z-loss.
    pub total: Tensor<1>,
    /// Mean next-byte cross-entropy in nats (what we report).
    pub ce: Tensor<1>,
}

impl Transformer {
    /// `tokens`: `[batch, seq]` byte ids; returns logits `[batch, seq, vocab]`.
    pub fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        let [b, t] = tokens.dims();
        let device = tokens.device();
        let x = self.tok_emb.forward(tokens);
        let d = x.dims()[2];
        let pos = self.pos_emb.val().narrow(0, 0, t).reshape([1, t, d]);
        let mut x = x + pos;
        // `tril_mask` is true strictly above the diagonal: the future positions to hide.
        let mask = Tensor::<2, Bool>::tril_mask([t, t], 0, &device).reshape([1, 1, t, t]);
        let mask = mask.expand([b, self.blocks[0].n_heads, t, t]);
        for block in &self.blocks {
            x = block.forward(x, mask.clone());
        }
        self.head.forward(self.ln_f.forward(x))
    }

    /// Next-token loss for `inputs` / `targets` (both `[batch, seq]`).
    pub fn loss(&self, inputs: Tensor<2, Int>, targets: Tensor<2, Int>) -> Loss {
        let logits = self.forward(inputs); // [b, t, v]
        let [b, t, v] = logits.dims();
        let logits = logits.reshape([b * t, v]);
        let max = logits.clone().max_dim(1).detach(); // [n, 1]
        let lse = (logits.clone() - max.clone()).exp().sum_dim(1).log() + max; // [n, 1]
        let target_logit = logits.gather(1, targets.reshape([b * t, 1]));
        let ce = (lse.clone() - target_logit).mean();
        let z = lse.powi_scalar(2).mean().mul_scalar(Z_LOSS_WEIGHT);
        Loss {
            total: ce.clone() + z,
            ce,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_sizes_match_their_parameter_budget() {
        let tiny = ModelConfig::tiny().num_params();
        assert!((800_000..1_200_000).contains(&tiny), "tiny has {tiny}");
        let small = ModelConfig::small().num_params();
        assert!(
            (20_000_000..30_000_000).contains(&small),
            "small has {small}"
        );
        let base = ModelConfig::base().num_params();
        assert!(
            (110_000_000..140_000_000).contains(&base),
            "base has {base}"
        );
    }

    #[test]
    fn parses_names_and_explicit_dimensions() {
        assert_eq!(ModelConfig::parse("tiny").unwrap(), ModelConfig::tiny());
        let c = ModelConfig::parse("d64-l2-h2-c32").unwrap();
        assert_eq!(
            (c.d_model, c.n_layers, c.n_heads, c.context),
            (64, 2, 2, 32)
        );
        assert!(matches!(
            ModelConfig::parse("huge"),
            Err(ModelError::UnknownName(_))
        ));
        assert!(matches!(
            ModelConfig::parse("d64-l2-h3-c32"),
            Err(ModelError::Invalid(_))
        ));
        assert!(matches!(
            ModelConfig::parse("d64-l2"),
            Err(ModelError::UnknownName(_))
        ));
    }

    #[test]
    fn module_parameter_count_matches_formula() {
        let mut cfg = ModelConfig::parse("d32-l2-h2-c16").unwrap();
        let model = cfg.init(&Device::flex());
        assert_eq!(model.num_params(), cfg.num_params());
        cfg.mlp_bias = false;
        let model = cfg.init(&Device::flex());
        assert_eq!(model.num_params(), cfg.num_params());
        assert_eq!(
            ModelConfig::parse("d32-l2-h2-c16").unwrap().num_params() - cfg.num_params(),
            2 * (4 * 32 + 32)
        );
    }

    #[test]
    fn attention_is_causal() {
        let cfg = ModelConfig::parse("d32-l2-h2-c16").unwrap();
        let device = Device::flex();
        let model = crate::train::flat::init_params(cfg.init(&device), &cfg, 3);
        let a: Vec<i64> = (0..8).map(|i| 40 + i).collect();
        let mut b = a.clone();
        b[5] = 200;
        let logits = |v: Vec<i64>| -> Vec<f32> {
            let t = Tensor::<2, Int>::from_data(TensorData::new(v, [1, 8]), &device);
            model
                .forward(t)
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .unwrap()
        };
        let (la, lb) = (logits(a), logits(b));
        let per_pos = 256;
        assert_eq!(
            la[..5 * per_pos],
            lb[..5 * per_pos],
            "positions before 5 saw the future"
        );
        assert_ne!(la[5 * per_pos..], lb[5 * per_pos..]);
    }

    #[test]
    fn forward_shapes_and_finite_loss() {
        let cfg = ModelConfig::parse("d32-l2-h2-c16").unwrap();
        let device = Device::flex();
        let model = cfg.init(&device);
        let tokens =
            Tensor::<2, Int>::from_data(TensorData::new(vec![1i64; 2 * 8], [2, 8]), &device);
        assert_eq!(model.forward(tokens.clone()).dims(), [2, 8, 256]);
        let loss: f32 = model.loss(tokens.clone(), tokens).ce.into_scalar();
        assert!(loss.is_finite());
    }
}
