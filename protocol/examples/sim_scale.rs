//! Times fault-free simulator rounds at a given scale (the setup of the `sim` benchmark):
//! `cargo run --release -p diloco-protocol --example sim_scale -- 1000 1`.
use std::time::Instant;

use diloco_protocol::sim::{self, SimConfig};

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let n = args.first().copied().unwrap_or(256) as usize;
    let rounds = args.get(1).copied().unwrap_or(1);
    let mut cfg = SimConfig::new(7, n);
    cfg.len = 64 * 64;
    cfg.proto.max_shards = 64;
    cfg.rounds = rounds;
    cfg.max_time = 1_000_000;
    let t = Instant::now();
    let r = sim::run(cfg);
    let s = t.elapsed().as_secs_f64();
    println!(
        "n={n} rounds={} events={} secs={s:.2} rounds/s={:.4} max_gossip_bytes={} announces={} oversized={} wire_errors={}",
        r.min_round(),
        r.events,
        r.min_round() as f64 / s,
        r.max_gossip_bytes,
        r.announces,
        r.oversized_gossip,
        r.wire_errors
    );
}
