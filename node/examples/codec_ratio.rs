//! Compression of a real outer gradient: trains the `tiny` model for H inner steps from the
//! seeded initial parameters on a text file, takes the outer gradient (global − local) and
//! encodes it with every codec (quantization, then zstd), and with top-k and error feedback.
//! Prints the encoded size, the ratio against raw f32, and the relative L2 error.
//!
//! `cargo run --release -p diloco-node --example codec_ratio -- [DATA] [H]`
//! (default ../shared/data/shakespeare.txt, H = 50).

use diloco_node::train::backend::{self, BackendChoice};
use diloco_node::train::data::{Corpus, DataSpec, Stream};
use diloco_node::train::flat;
use diloco_node::train::inner::{InnerConfig, Replica};
use diloco_node::train::model::ModelConfig;
use diloco_protocol::codec::{self, ErrorFeedback, Quantization};
use diloco_protocol::outer::outer_gradient;
use std::path::PathBuf;

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        num += ((x - y) as f64).powi(2);
        den += (*x as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let data = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("../shared/data/shakespeare.txt"));
    let h: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(50);
    let corpus = Corpus::load(&DataSpec {
        path: Some(data.clone()),
        eval_path: None,
        eval_fraction: 0.05,
    })?;
    let model = ModelConfig::tiny();
    let device = backend::select(BackendChoice::Native)?.device;
    let layout = model.layout();
    let global = flat::init_values(&layout, &model, 0);
    let inner = InnerConfig::new(3e-3, 40, 400, 0.1);
    let mut r = Replica::new(&model, &device, &global)?;
    let stream = Stream::new(&corpus, 0, 1, 0, 0, 16, 128);
    // Two rounds: the second round's outer gradient is the typical one (warmup is over).
    let mut theta = global.clone();
    let mut delta = Vec::new();
    for round in 0..2 {
        r.set_params(&theta)?;
        for k in 0..h {
            let step = round * h + k;
            r.step(&stream.batch(&corpus, step), inner.lr_at(step), &inner);
        }
        let local = r.params();
        delta = outer_gradient(&theta, &local)?;
        theta = local;
    }
    let raw = (delta.len() * 4) as f64;
    println!(
        "outer gradient of the tiny model after round 2 (H = {h}, {} values) on {}",
        delta.len(),
        data.display()
    );
    println!("| codec | encoded bytes | ratio vs raw f32 | relative L2 error |");
    println!("|---|---|---|---|");
    for q in Quantization::ALL {
        let enc = codec::encode(q, &delta);
        let dec = codec::decode(&enc, delta.len())?;
        println!(
            "| {} | {} | {:.2}x | {:.2e} |",
            q.name(),
            enc.len(),
            raw / enc.len() as f64,
            rel_err(&delta, &dec)
        );
    }
    for (q, frac) in [
        (Quantization::Int8, 0.1),
        (Quantization::Fp4, 0.1),
        (Quantization::Int8, 0.01),
    ] {
        let k = (delta.len() as f64 * frac) as usize;
        let mut ef = ErrorFeedback::new(delta.len());
        let (enc, sent) = ef.encode(q, Some(k), &delta)?;
        println!(
            "| {} top-{:.0}% (error feedback) | {} | {:.2}x | {:.2e} (carried to the next round) |",
            q.name(),
            frac * 100.0,
            enc.len(),
            raw / enc.len() as f64,
            rel_err(&delta, &sent)
        );
    }
    Ok(())
}
