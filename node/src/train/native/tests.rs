//! The native engine against burn's autodiff: same layout, same loss, same gradients (to float
//! precision), and results that do not depend on the number of threads.

use super::*;
use crate::train::data::Batch;
use crate::train::flat;
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;

fn batch(b: usize, t: usize, seed: u64) -> Batch {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((x >> 33) % 256) as i64
    };
    let inputs: Vec<i64> = (0..b * t).map(|_| next()).collect();
    let targets: Vec<i64> = (0..b * t).map(|_| next()).collect();
    Batch {
        inputs,
        targets,
        batch: b,
        seq: t,
    }
}

struct GradReader<'a> {
    grads: &'a GradientsParams,
    out: Vec<f32>,
}

impl ModuleVisitor for GradReader<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let n = param.lazy_shape().num_elements();
        match self.grads.get::<D>(param.id) {
            Some(g) => self.out.extend(
                g.into_data()
                    .convert::<f32>()
                    .try_into_vec::<f32>()
                    .unwrap(),
            ),
            None => self.out.extend(std::iter::repeat_n(0.0, n)),
        }
    }
}

/// burn's loss and flat gradients for `params` on `batch`.
fn burn_reference(cfg: &ModelConfig, params: &[f32], b: &Batch) -> (f32, f32, Vec<f32>) {
    let device = Device::flex().autodiff();
    let model = flat::write(cfg.init(&device), params).unwrap();
    let shape = [b.batch, b.seq];
    let inputs = Tensor::<2, Int>::from_data(TensorData::new(b.inputs.clone(), shape), &device);
    let targets = Tensor::<2, Int>::from_data(TensorData::new(b.targets.clone(), shape), &device);
    let loss = model.loss(inputs, targets);
    let ce: f32 = loss.ce.clone().into_scalar();
    let total: f32 = loss.total.clone().into_scalar();
    let grads = GradientsParams::from_grads(loss.total.backward(), &model);
    let mut r = GradReader {
        grads: &grads,
        out: Vec::new(),
    };
    model.visit(&mut r);
    (ce, total, r.out)
}

#[test]
fn the_layout_is_burns() {
    for name in ["d32-l2-h2-c16", "tiny"] {
        let mut cfg = ModelConfig::parse(name).unwrap();
        let burn = flat::layout(&cfg.init(&Device::flex()));
        assert_eq!(layout(&cfg), burn, "{name}");
        cfg.mlp_bias = false;
        assert_eq!(layout(&cfg), flat::layout(&cfg.init(&Device::flex())));
    }
}

#[test]
fn loss_and_gradients_match_burns_autodiff() {
    for (name, bias) in [("d32-l2-h2-c16", true), ("d48-l2-h3-c16", false)] {
        let mut cfg = ModelConfig::parse(name).unwrap();
        cfg.mlp_bias = bias;
        let params = flat::init_values(&layout(&cfg), &cfg, 7);
        let b = batch(3, 12, 1);
        let (ce_ref, _total, g_ref) = burn_reference(&cfg, &params, &b);
        let mut m = NativeModel::new(&cfg, &params).unwrap();
        let ce = m.loss_and_grads(&b);
        assert!(
            (ce - ce_ref).abs() < 1e-5 * ce_ref,
            "{name}: ce {ce} vs burn {ce_ref}"
        );
        assert!((m.eval_loss(&b) - ce_ref).abs() < 1e-5 * ce_ref);
        let mut off = 0;
        for info in layout(&cfg) {
            let r = off..off + info.len();
            off = r.end;
            let (a, e) = (&m.grads[r.clone()], &g_ref[r]);
            let scale = e.iter().fold(0.0f32, |s, x| s.max(x.abs()));
            let worst = a
                .iter()
                .zip(e)
                .fold(0.0f32, |s, (x, y)| s.max((x - y).abs()));
            assert!(
                worst <= 2e-4 * scale + 1e-7,
                "{name}: gradient of {} differs by {worst} (largest {scale})",
                info.name
            );
            assert!(scale > 0.0, "{name}: {} has no gradient", info.name);
        }
    }
}

#[test]
fn a_wrong_gradient_is_caught() {
    // The comparison above must fail when the engine is wrong: perturb one gradient entry of
    // a small tensor by 1 % of its scale and check the same criterion rejects it.
    let cfg = ModelConfig::parse("d32-l2-h2-c16").unwrap();
    let params = flat::init_values(&layout(&cfg), &cfg, 7);
    let b = batch(2, 8, 3);
    let (_, _, g_ref) = burn_reference(&cfg, &params, &b);
    let mut m = NativeModel::new(&cfg, &params).unwrap();
    m.loss_and_grads(&b);
    let lay = layout(&cfg);
    let start: usize = lay
        .iter()
        .take_while(|p| p.name != "blocks.1.q_norm.gamma")
        .map(ParamInfo::len)
        .sum();
    let len = 32 / 2;
    let scale = g_ref[start..start + len]
        .iter()
        .fold(0.0f32, |s, x| s.max(x.abs()));
    m.grads[start] += 0.01 * scale;
    let worst = m.grads[start..start + len]
        .iter()
        .zip(&g_ref[start..start + len])
        .fold(0.0f32, |s, (x, y)| s.max((x - y).abs()));
    assert!(worst > 2e-4 * scale + 1e-7);
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let cfg = ModelConfig::parse("d64-l2-h4-c32").unwrap();
    let params = flat::init_values(&layout(&cfg), &cfg, 11);
    let b = batch(8, 32, 5);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut m = NativeModel::new(&cfg, &params).unwrap();
            let ce = m.loss_and_grads(&b);
            (ce, m.grads.clone())
        })
    };
    let (ce1, g1) = run(1);
    let (ce3, g3) = run(3);
    assert_eq!(ce1.to_bits(), ce3.to_bits());
    assert!(g1.iter().zip(&g3).all(|(a, b)| a.to_bits() == b.to_bits()));
}

#[test]
fn a_batch_shape_change_reallocates_the_workspace() {
    let cfg = ModelConfig::parse("d32-l1-h2-c16").unwrap();
    let params = flat::init_values(&layout(&cfg), &cfg, 2);
    let mut m = NativeModel::new(&cfg, &params).unwrap();
    let (a, b) = (batch(2, 16, 1), batch(5, 7, 2));
    let la = m.loss_and_grads(&a);
    let lb = m.loss_and_grads(&b);
    assert_eq!(m.loss_and_grads(&a).to_bits(), la.to_bits());
    let mut fresh = NativeModel::new(&cfg, &params).unwrap();
    assert_eq!(fresh.loss_and_grads(&b).to_bits(), lb.to_bits());
}

#[test]
fn a_wrong_parameter_count_is_an_error() {
    let cfg = ModelConfig::parse("d32-l1-h2-c16").unwrap();
    assert!(matches!(
        NativeModel::new(&cfg, &[0.0; 10]),
        Err(FlatError::Length { got: 10, .. })
    ));
}
