//! Smoke test of the WebGPU path: a few training steps on wgpu (lavapipe on machines without a
//! GPU) must lower the loss. Set `DILOCO_SKIP_WGPU=1` to skip on a machine with no Vulkan driver.

use burn::prelude::Device;
use diloco_node::train::backend::{select, BackendChoice, Compute};
use diloco_node::train::data::{Corpus, DataSpec, Stream};
use diloco_node::train::flat;
use diloco_node::train::inner::{InnerConfig, Replica};
use diloco_node::train::model::ModelConfig;

#[test]
fn wgpu_trains_and_matches_cpu_closely() {
    if std::env::var_os("DILOCO_SKIP_WGPU").is_some() {
        eprintln!("DILOCO_SKIP_WGPU set: skipping the wgpu smoke test");
        return;
    }
    let selected =
        select(BackendChoice::Wgpu).expect("a wgpu adapter (install mesa-vulkan-drivers)");
    eprintln!("wgpu adapter: {}", selected.description);
    let cfg = ModelConfig::parse("d32-l1-h2-c32").unwrap();
    let layout = flat::layout(&cfg.init(&Device::flex()));
    let init = flat::init_values(&layout, &cfg, 11);
    let corpus = Corpus::load(&DataSpec::default()).unwrap();
    let stream = Stream::new(&corpus, 0, 1, 0, 11, 4, 32);
    let inner = InnerConfig::new(1e-2, 1, 8, 0.0);

    let mut gpu = Replica::new(&cfg, &selected.device, &init).unwrap();
    let mut cpu = Replica::new(&cfg, &Compute::Burn(Device::flex()), &init).unwrap();
    let batch0 = stream.batch(&corpus, 0);
    let mut losses = Vec::new();
    for s in 0..8 {
        let b = if s % 2 == 0 {
            batch0.clone()
        } else {
            stream.batch(&corpus, s)
        };
        let g = gpu.step(&b, inner.lr_at(s), &inner);
        let c = cpu.step(&b, inner.lr_at(s), &inner);
        assert!(
            (g.loss - c.loss).abs() < 0.05,
            "step {s}: wgpu loss {} vs cpu {}",
            g.loss,
            c.loss
        );
        if s % 2 == 0 {
            losses.push(g.loss);
        }
    }
    assert!(
        losses.last().unwrap() < &(losses[0] - 0.3),
        "wgpu loss did not fall on a repeated batch: {losses:?}"
    );
}
