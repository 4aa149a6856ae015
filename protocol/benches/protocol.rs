//! Codec throughput per quantization and simulator rounds per second.
use std::time::Duration;

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use diloco_protocol::codec::{self, Quantization};
use diloco_protocol::sim::{self, SimConfig};

fn codec_bench(c: &mut Criterion) {
    let n = 1 << 20; // 4 MiB of f32
    let values: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin() * 1e-3).collect();
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Bytes((n * 4) as u64));
    g.sample_size(10);
    for q in Quantization::ALL {
        g.bench_with_input(BenchmarkId::new("encode", q), &q, |b, &q| {
            b.iter(|| codec::encode(q, &values))
        });
        let enc = codec::encode(q, &values);
        g.bench_with_input(BenchmarkId::new("decode", q), &q, |b, _| {
            b.iter(|| codec::decode(&enc, n).unwrap())
        });
    }
    g.finish();
}

fn sim_run(n: usize, rounds: u64) {
    let mut cfg = SimConfig::new(7, n);
    cfg.len = 64 * 64;
    cfg.proto.max_shards = 64;
    cfg.rounds = rounds;
    cfg.max_time = 1_000_000;
    let r = sim::run(cfg);
    assert!(r.min_round() >= rounds);
    assert_eq!((r.oversized_gossip, r.wire_errors), (0, 0));
}

fn sim_bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("sim");
    g.sample_size(10);
    for n in [4usize, 16, 64, 256] {
        let rounds = if n >= 256 { 1 } else { 3 };
        g.throughput(Throughput::Elements(rounds));
        g.bench_with_input(BenchmarkId::new("rounds", n), &n, |b, &n| {
            b.iter(|| sim_run(n, rounds))
        });
    }
    g.finish();
    // n = 1000: one round takes ~20 s (about 2 million message deliveries), so this group takes
    // exactly criterion's minimum of 10 samples of one iteration each (~4 minutes).
    let mut g = c.benchmark_group("sim");
    g.sample_size(10);
    g.sampling_mode(SamplingMode::Flat);
    g.warm_up_time(Duration::from_millis(1));
    g.measurement_time(Duration::from_secs(60));
    g.throughput(Throughput::Elements(1));
    g.bench_with_input(BenchmarkId::new("rounds", 1000), &1000usize, |b, &n| {
        b.iter(|| sim_run(n, 1))
    });
    g.finish();
}

criterion_group!(benches, codec_bench, sim_bench);
criterion_main!(benches);
