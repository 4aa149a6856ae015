//! `simulate`: M replicas in one process, DiLoCo or data-parallel, with traffic accounting.
//!
//! DiLoCo: every replica trains H inner steps on its own shard; the outer gradients
//! `global - local` pass through the chosen codec (quantise and back, exactly what a peer would
//! receive), may be dropped with `--drop-prob`, are averaged weighted by tokens, and one
//! Nesterov outer step updates the global parameters, which every replica then loads (keeping
//! its own AdamW state).
//!
//! Data-parallel: all replicas hold the same parameters and all-reduce f32 gradients every step.
//! Averaging the gradients of M equal shards of a batch equals the gradient of the whole batch,
//! so DP is computed as one model stepping on the concatenation of the replicas' batches.
//!
//! Traffic is what a bandwidth-optimal all-reduce would send per replica: `2·S·(M−1)/M` bytes per
//! sync with `S = params × bits / 8` — f32 gradients every step for DP, codec-encoded outer
//! gradients every H steps for DiLoCo (nominal bits; the codec's per-block scales and zstd are
//! not counted, so the ratio is exactly `H × 32 / bits`).

use crate::train::backend::Compute;
use crate::train::data::{eval_batches, Batch, Corpus, Sharding, Stream};
use crate::train::flat::{self, ParamInfo};
use crate::train::inner::{Evaluator, InnerConfig, Replica, RoundError};
use crate::train::model::ModelConfig;
use crate::train::progress::Progress;
use diloco_protocol::codec::{quantize_roundtrip_owned, ErrorFeedback, Quantization};
use diloco_protocol::outer::{self, OuterConfig};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use thiserror::Error;

/// Training mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// DiLoCo: H local steps, then an outer Nesterov step on averaged outer gradients.
    Diloco,
    /// Data-parallel: gradients averaged every step.
    Dp,
}

/// Errors from a simulation.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SimError {
    /// Parameter vectors did not line up (a bug, reported instead of panicking).
    #[error(transparent)]
    Flat(#[from] flat::FlatError),
    /// The outer step was given inconsistent inputs.
    #[error(transparent)]
    Outer(#[from] outer::OuterError),
    /// A replica's round of inner steps failed.
    #[error(transparent)]
    Round(#[from] RoundError),
    /// Encoding an outer gradient failed (a bug: lengths are fixed by the model).
    #[error(transparent)]
    Codec(#[from] diloco_protocol::codec::CodecError),
}

/// Everything a simulation needs (serialised into its report, so a result says what made it).
#[derive(Debug, Clone, Serialize)]
pub struct SimulateConfig {
    /// DiLoCo or DP.
    pub mode: Mode,
    /// Number of replicas M.
    pub replicas: usize,
    /// Inner steps per round H (DiLoCo).
    pub inner_steps: u64,
    /// Total inner steps T.
    pub steps: u64,
    /// Outer optimizer.
    pub outer: OuterConfig,
    /// Global batch (sequences); each replica gets `batch / replicas`.
    pub batch: usize,
    /// Sequence length.
    pub seq: usize,
    /// Inner optimizer.
    pub inner: InnerConfig,
    /// Outer-gradient codec.
    pub quantize: Quantization,
    /// Fraction of the outer gradient's entries each replica sends (the largest, with error
    /// feedback carrying the rest into its next round); `None`: all, dense.
    pub top_k: Option<f64>,
    /// Probability that a replica's outer gradient is lost in a round.
    pub drop_prob: f64,
    /// Seed for initial parameters, data order and drops.
    pub seed: u64,
    /// Model shape.
    pub model: ModelConfig,
    /// Evaluate every this many steps (0: only at the end).
    pub eval_every: u64,
    /// Number of eval windows.
    pub eval_windows: usize,
    /// How the training data is split over the replicas.
    pub shards: Sharding,
}

/// The replicas' batch streams for `cfg`: replica `r` draws `batch / replicas` windows a step.
pub fn streams(cfg: &SimulateConfig, corpus: &Corpus) -> Vec<Stream> {
    let m = cfg.replicas;
    let per = cfg.batch / m;
    (0..m)
        .map(|r| match cfg.shards {
            Sharding::Iid => Stream::iid(corpus, r, m, cfg.seed, per, cfg.seq),
            Sharding::Contiguous => Stream::new(corpus, r, m, r as u64, cfg.seed, per, cfg.seq),
        })
        .collect()
}

/// Writes what `cfg` will train on to `dir`: `init.safetensors` (the initial global
/// parameters, tensor names as in checkpoints) and `batches.bin` (little-endian u32: replicas,
/// windows per replica, seq; then for every step and replica its window start offsets into
/// the training split), so another implementation can reproduce the run input for input.
pub fn dump_inputs(
    cfg: &SimulateConfig,
    corpus: &Corpus,
    dir: &std::path::Path,
) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let layout: Vec<ParamInfo> = cfg.model.layout();
    let init = flat::init_values(&layout, &cfg.model, cfg.seed);
    crate::train::checkpoint::write_params(&dir.join("init.safetensors"), &layout, &init)?;
    let streams = streams(cfg, corpus);
    let mut out = std::io::BufWriter::new(std::fs::File::create(dir.join("batches.bin"))?);
    let per = (cfg.batch / cfg.replicas) as u32;
    for v in [cfg.replicas as u32, per, cfg.seq as u32] {
        out.write_all(&v.to_le_bytes())?;
    }
    for step in 0..cfg.steps {
        for s in &streams {
            for o in s.offsets(step) {
                out.write_all(&(o as u32).to_le_bytes())?;
            }
        }
    }
    out.flush()
}

/// One evaluation point.
#[derive(Debug, Clone, Serialize)]
pub struct EvalPoint {
    /// Inner steps done.
    pub step: u64,
    /// Eval loss of the global parameters.
    pub eval_loss: f32,
}

/// Result of a simulation (printed as JSON with `--json`).
#[derive(Debug, Clone, Serialize)]
pub struct SimReport {
    /// `diloco` or `dp`.
    pub mode: Mode,
    /// M.
    pub replicas: usize,
    /// H (1 for DP).
    pub inner_steps: u64,
    /// Steps done.
    pub steps: u64,
    /// Outer rounds done (DP: steps).
    pub rounds: u64,
    /// Parameter count.
    pub params: usize,
    /// Eval loss of the final global parameters (nats per byte).
    pub eval_loss: f32,
    /// Mean training loss over the last round.
    pub train_loss: f32,
    /// Training tokens per second over all replicas (eval time excluded).
    pub tokens_per_s: f64,
    /// Bytes one replica sends in a bandwidth-optimal all-reduce over the run.
    pub bytes_sent_per_replica: u64,
    /// Codec of the synced vectors.
    pub quantize: String,
    /// blake3 of the final global parameters.
    pub global_hash: String,
    /// Outer gradients dropped.
    pub dropped: u64,
    /// Wall-clock seconds.
    pub elapsed_s: f64,
    /// Seconds a round spends outside its inner steps (DiLoCo: loading the global parameters,
    /// reading the local ones, outer gradients, codec round trip, averaging, Nesterov step;
    /// summed over the replicas, which a real run does in parallel on their own machines), mean
    /// over rounds; 0 for DP.
    pub overhead_s_per_round: f64,
    /// Eval loss over the run.
    pub eval_history: Vec<EvalPoint>,
    /// The configuration that produced this report.
    pub config: SimulateConfig,
    /// Final global parameters (not serialised).
    #[serde(skip)]
    pub global: Vec<f32>,
}

/// Bytes one replica sends per all-reduce of `params` values at `bits` each among `m` peers:
/// `2·S·(m−1)/m`.
pub fn allreduce_bytes(params: usize, bits: u32, m: usize) -> u64 {
    if m <= 1 {
        return 0;
    }
    let s = params as u128 * bits as u128 / 8;
    (2 * s * (m as u128 - 1) / m as u128) as u64
}

struct Eval {
    evaluator: Evaluator,
    batches: Vec<Batch>,
    history: Vec<EvalPoint>,
}

impl Eval {
    fn run(&mut self, step: u64, params: &[f32], progress: &Progress) -> Result<f32, SimError> {
        let loss = self.evaluator.loss(params, &self.batches)?;
        progress.println(&format!("step {step}: eval loss {loss:.4}"));
        self.history.push(EvalPoint {
            step,
            eval_loss: loss,
        });
        Ok(loss)
    }
}

/// Runs the simulation. `stop` ends it early at the next round boundary.
pub fn run(
    cfg: &SimulateConfig,
    corpus: &Corpus,
    device: &Compute,
    progress: &mut Progress,
    stop: &AtomicBool,
) -> Result<SimReport, SimError> {
    let started = Instant::now();
    let layout: Vec<ParamInfo> = cfg.model.layout();
    let n_params: usize = layout.iter().map(ParamInfo::len).sum();
    let mut global = flat::init_values(&layout, &cfg.model, cfg.seed);
    let m = cfg.replicas;
    let per = cfg.batch / m;
    let streams = streams(cfg, corpus);
    let mut eval = Eval {
        evaluator: Evaluator::new(&cfg.model, device),
        batches: eval_batches(corpus, cfg.seq, per.max(1), cfg.eval_windows),
        history: Vec::new(),
    };
    let mut train_time = 0.0f64;
    let mut overhead = 0.0f64;
    let mut tokens = 0u64;
    let mut step = 0u64;
    let mut rounds = 0u64;
    let mut bytes = 0u64;
    let mut dropped = 0u64;
    let mut last_loss = f32::NAN;
    let (h, bits) = match cfg.mode {
        Mode::Diloco => (cfg.inner_steps, cfg.quantize.bits()),
        Mode::Dp => (1, 32),
    };
    let mut replicas: Vec<Replica> = match cfg.mode {
        Mode::Diloco => (0..m)
            .map(|_| Replica::new(&cfg.model, device, &global))
            .collect::<Result<_, _>>()?,
        Mode::Dp => vec![Replica::new(&cfg.model, device, &global)?],
    };
    let mut momentum = vec![0f32; n_params];
    // Top-k: each replica's residual (what its encodings left out so far), and the number kept.
    let top_k = cfg
        .top_k
        .map(|f| ((n_params as f64 * f).ceil() as usize).clamp(1, n_params));
    let mut feedback: Vec<ErrorFeedback> = match top_k {
        Some(_) => (0..m).map(|_| ErrorFeedback::new(n_params)).collect(),
        None => Vec::new(),
    };
    let mut drop_rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0xd209_d209);
    while step < cfg.steps && !stop.load(Ordering::Relaxed) {
        let round_steps = h.min(cfg.steps - step);
        let t0 = Instant::now();
        let mut loss_sum = 0.0f64;
        match cfg.mode {
            Mode::Diloco => {
                // Each replica trains its round in turn (they are independent); the progress
                // line follows the last one, with the mean loss over replicas of each step.
                let mut step_loss = vec![0.0f64; round_steps as usize];
                let mut deltas = Vec::with_capacity(m);
                let mut weights = Vec::with_capacity(m);
                let mut inner_s = 0.0f64;
                let mut sparse_bytes = 0u64;
                for (i, (r, stream)) in replicas.iter_mut().zip(&streams).enumerate() {
                    let last = i + 1 == m;
                    let done = r.train_round(
                        &global,
                        step,
                        round_steps,
                        &cfg.inner,
                        |s| stream.batch(corpus, s),
                        None,
                        |s, stats| {
                            let k = (s - step) as usize;
                            step_loss[k] += stats.loss as f64 / m as f64;
                            if last {
                                loss_sum += step_loss[k];
                                tokens += (per * m * cfg.seq) as u64;
                                let elapsed = train_time + t0.elapsed().as_secs_f64();
                                progress.update(
                                    s + 1,
                                    step_loss[k] as f32,
                                    tokens as f64 / elapsed.max(1e-9),
                                );
                            }
                        },
                    )?;
                    let Some(done) = done else {
                        unreachable!("a round without a stop flag always finishes")
                    };
                    inner_s += done.inner_s;
                    let lost = cfg.drop_prob > 0.0
                        && (drop_rng.next_u64() as f64 / u64::MAX as f64) < cfg.drop_prob;
                    if lost {
                        dropped += 1;
                    } else {
                        match (top_k, feedback.get_mut(i)) {
                            (Some(k), Some(ef)) => {
                                let (bytes_sent, sent) =
                                    ef.encode(cfg.quantize, Some(k), &done.delta)?;
                                // A sparse vector cannot be reduce-scattered: every replica's
                                // message reaches the m − 1 others (ring all-gather).
                                sparse_bytes += bytes_sent.len() as u64 * (m as u64 - 1);
                                deltas.push(sent);
                            }
                            _ => deltas.push(quantize_roundtrip_owned(cfg.quantize, done.delta)),
                        }
                        weights.push(done.tokens as f64);
                    }
                }
                if !deltas.is_empty() {
                    let views: Vec<&[f32]> = deltas.iter().map(Vec::as_slice).collect();
                    let delta = outer::weighted_mean(&views, &weights)?;
                    outer::nesterov_step(cfg.outer, &mut global, &mut momentum, &delta)?;
                }
                overhead += t0.elapsed().as_secs_f64() - inner_s;
                bytes += match top_k {
                    // Mean over replicas of what each sent this round.
                    Some(_) => std::mem::take(&mut sparse_bytes) / m as u64,
                    None => allreduce_bytes(n_params, bits, m),
                };
            }
            Mode::Dp => {
                for k in 0..round_steps {
                    let s = step + k;
                    let lr = cfg.inner.lr_at(s);
                    let parts: Vec<Batch> = streams.iter().map(|st| st.batch(corpus, s)).collect();
                    let step_loss = replicas[0]
                        .step(&Batch::concat(&parts), lr, &cfg.inner)
                        .loss as f64;
                    loss_sum += step_loss;
                    tokens += (per * m * cfg.seq) as u64;
                    let elapsed = train_time + t0.elapsed().as_secs_f64();
                    progress.update(s + 1, step_loss as f32, tokens as f64 / elapsed.max(1e-9));
                }
                global = replicas[0].params();
                bytes += round_steps * allreduce_bytes(n_params, bits, m);
            }
        }
        step += round_steps;
        last_loss = (loss_sum / round_steps as f64) as f32;
        rounds += match cfg.mode {
            Mode::Diloco => 1,
            Mode::Dp => round_steps,
        };
        train_time += t0.elapsed().as_secs_f64();
        if cfg.eval_every > 0 && step < cfg.steps && step % cfg.eval_every < round_steps {
            eval.run(step, &global, progress)?;
        }
    }
    let eval_loss = eval.run(step, &global, progress)?;
    Ok(SimReport {
        mode: cfg.mode,
        replicas: m,
        inner_steps: h,
        steps: step,
        rounds,
        params: n_params,
        eval_loss,
        train_loss: last_loss,
        tokens_per_s: tokens as f64 / train_time.max(1e-9),
        bytes_sent_per_replica: bytes,
        quantize: match (cfg.mode, cfg.top_k) {
            (Mode::Diloco, Some(f)) => format!("{}+top{}%", cfg.quantize, (f * 1e4).round() / 1e2),
            (Mode::Diloco, None) => cfg.quantize.to_string(),
            (Mode::Dp, _) => "f32".into(),
        },
        global_hash: outer::hash_f32(&global),
        dropped,
        elapsed_s: started.elapsed().as_secs_f64(),
        overhead_s_per_round: match cfg.mode {
            Mode::Diloco if rounds > 0 => overhead / rounds as f64,
            _ => 0.0,
        },
        eval_history: eval.history,
        config: cfg.clone(),
        global,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::data::DataSpec;
    use burn::prelude::Device;

    fn cfg(mode: Mode, replicas: usize, h: u64, steps: u64) -> SimulateConfig {
        SimulateConfig {
            top_k: None,
            mode,
            replicas,
            inner_steps: h,
            steps,
            outer: OuterConfig::default(),
            batch: 4,
            seq: 16,
            inner: InnerConfig::new(3e-3, 2, steps, 0.1),
            quantize: Quantization::Int8,
            drop_prob: 0.0,
            seed: 5,
            model: ModelConfig::parse("d16-l1-h2-c16").unwrap(),
            eval_every: 0,
            eval_windows: 8,
            shards: Sharding::Iid,
        }
    }

    #[test]
    fn traffic_ratio_is_h_times_bits_ratio() {
        assert_eq!(allreduce_bytes(1000, 32, 1), 0);
        assert_eq!(allreduce_bytes(1000, 32, 2), 4000);
        assert_eq!(allreduce_bytes(1000, 32, 4), 6000);
        let corpus = Corpus::load(&DataSpec {
            eval_fraction: 0.05,
            ..Default::default()
        })
        .unwrap();
        let stop = AtomicBool::new(false);
        let dev = Compute::Burn(Device::flex());
        let dp = run(
            &cfg(Mode::Dp, 2, 1, 10),
            &corpus,
            &dev,
            &mut Progress::hidden(),
            &stop,
        )
        .unwrap();
        let dl = run(
            &cfg(Mode::Diloco, 2, 5, 10),
            &corpus,
            &dev,
            &mut Progress::hidden(),
            &stop,
        )
        .unwrap();
        assert_eq!(
            dp.bytes_sent_per_replica,
            20 * allreduce_bytes(dp.params, 32, 2) / 2
        );
        assert_eq!(dp.bytes_sent_per_replica, 5 * 4 * dl.bytes_sent_per_replica);
        assert_eq!(dl.rounds, 2);
        assert!(
            dl.eval_loss.is_finite() && dp.eval_loss.is_finite(),
            "{dl:?} {dp:?}"
        );
    }

    #[test]
    fn top_k_sends_a_fraction_and_carries_the_rest() {
        let corpus = Corpus::load(&DataSpec {
            eval_fraction: 0.05,
            ..Default::default()
        })
        .unwrap();
        let (stop, dev) = (AtomicBool::new(false), Compute::Burn(Device::flex()));
        let go =
            |c: &SimulateConfig| run(c, &corpus, &dev, &mut Progress::hidden(), &stop).unwrap();
        let dense = go(&cfg(Mode::Diloco, 2, 5, 10));
        let mut c = cfg(Mode::Diloco, 2, 5, 10);
        c.top_k = Some(0.05);
        let sparse = go(&c);
        // 5 % of the entries (index + int8 value + block scales, zstd) is far less than dense.
        assert!(
            sparse.bytes_sent_per_replica * 4 < dense.bytes_sent_per_replica,
            "{} vs {}",
            sparse.bytes_sent_per_replica,
            dense.bytes_sent_per_replica
        );
        assert!(sparse.bytes_sent_per_replica > 0);
        assert_ne!(sparse.global_hash, dense.global_hash);
        assert_eq!(sparse.quantize, "int8+top5%");
        assert!(sparse.eval_loss.is_finite());
        assert_eq!(go(&c).global_hash, sparse.global_hash, "not deterministic");
    }

    #[test]
    fn same_seed_same_hash() {
        let corpus = Corpus::load(&DataSpec {
            eval_fraction: 0.05,
            ..Default::default()
        })
        .unwrap();
        let stop = AtomicBool::new(false);
        let dev = Compute::Burn(Device::flex());
        let c = cfg(Mode::Diloco, 2, 3, 6);
        let a = run(&c, &corpus, &dev, &mut Progress::hidden(), &stop).unwrap();
        let b = run(&c, &corpus, &dev, &mut Progress::hidden(), &stop).unwrap();
        assert_eq!(a.global_hash, b.global_hash);
    }

    #[test]
    fn one_replica_h1_eta1_mu0_is_plain_adamw() {
        let corpus = Corpus::load(&DataSpec {
            eval_fraction: 0.05,
            ..Default::default()
        })
        .unwrap();
        let stop = AtomicBool::new(false);
        let dev = Compute::Burn(Device::flex());
        let mut d = cfg(Mode::Diloco, 1, 1, 6);
        d.outer = OuterConfig {
            lr: 1.0,
            momentum: 0.0,
        };
        d.quantize = Quantization::F32;
        let diloco = run(&d, &corpus, &dev, &mut Progress::hidden(), &stop).unwrap();
        let plain = run(
            &cfg(Mode::Dp, 1, 1, 6),
            &corpus,
            &dev,
            &mut Progress::hidden(),
            &stop,
        )
        .unwrap();
        let max_diff = diloco
            .global
            .iter()
            .zip(&plain.global)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        // Only f32 rounding of g - (g - l) separates the two; a real outer step (eta 0.7, mu 0.9)
        // moves parameters by ~lr = 3e-3 per step.
        assert!(max_diff < 1e-4, "max |diloco - adamw| = {max_diff}");
    }

    #[test]
    fn dumped_inputs_are_the_batches_the_run_trains_on() {
        let corpus = Corpus::load(&DataSpec {
            eval_fraction: 0.05,
            ..Default::default()
        })
        .unwrap();
        let c = cfg(Mode::Diloco, 2, 2, 3);
        let dir = tempfile::tempdir().unwrap();
        dump_inputs(&c, &corpus, dir.path()).unwrap();
        let raw = std::fs::read(dir.path().join("batches.bin")).unwrap();
        let words: Vec<u32> = raw
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(words[..3], [2, 2, 16]);
        let streams = streams(&c, &corpus);
        let mut want = Vec::new();
        for step in 0..3 {
            for s in &streams {
                want.extend(s.offsets(step).into_iter().map(|o| o as u32));
            }
        }
        assert_eq!(words[3..], want[..]);
        let layout = c.model.layout();
        let init = flat::init_values(&layout, &c.model, c.seed);
        let bytes = std::fs::read(dir.path().join("init.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let emb = st.tensor("tok_emb.weight").unwrap();
        assert_eq!(emb.data()[..4], init[0].to_le_bytes());
    }

    #[test]
    fn dropping_everything_leaves_global_unchanged() {
        let corpus = Corpus::load(&DataSpec {
            eval_fraction: 0.05,
            ..Default::default()
        })
        .unwrap();
        let stop = AtomicBool::new(false);
        let dev = Compute::Burn(Device::flex());
        let mut c = cfg(Mode::Diloco, 2, 2, 4);
        c.drop_prob = 1.0;
        let r = run(&c, &corpus, &dev, &mut Progress::hidden(), &stop).unwrap();
        assert_eq!(r.dropped, 4);
        let layout = c.model.layout();
        let init = flat::init_values(&layout, &c.model, c.seed);
        assert_eq!(r.global_hash, outer::hash_f32(&init));
    }
}
