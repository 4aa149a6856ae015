//! `train`: one replica with plain AdamW, checkpoints and bit-exact resume.
//!
//! Resuming restores the parameters, the AdamW moments and step counter, and the step; data
//! batches are a pure function of (seed, replica, step), so a resumed run takes exactly the
//! batches the interrupted one would have, and on the CPU backend ends with the same
//! `global_hash` as a run that was never interrupted.

use crate::train::backend::Compute;
use crate::train::checkpoint::{self, CheckpointError, State};
use crate::train::data::{eval_batches, Corpus, Stream};
use crate::train::flat::{self, ParamInfo};
use crate::train::inner::{AdamState, Evaluator, InnerConfig, Replica};
use crate::train::model::ModelConfig;
use crate::train::progress::Progress;
use diloco_protocol::outer::hash_f32;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use thiserror::Error;

/// Errors from a training run.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TrainError {
    /// Checkpoint problem.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// Parameter vectors did not line up.
    #[error(transparent)]
    Flat(#[from] flat::FlatError),
    /// `--resume` without `--checkpoint-dir`.
    #[error("--resume needs --checkpoint-dir DIR")]
    ResumeWithoutDir,
}

/// Configuration of a `train` run.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// Model shape.
    pub model: ModelConfig,
    /// Inner optimizer (its `total_steps` is the run length).
    pub inner: InnerConfig,
    /// Sequences per step.
    pub batch: usize,
    /// Sequence length.
    pub seq: usize,
    /// Seed for initial parameters and data order.
    pub seed: u64,
    /// Where to write checkpoints.
    pub checkpoint_dir: Option<PathBuf>,
    /// Checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: u64,
    /// Continue from the newest checkpoint in `checkpoint_dir`.
    pub resume: bool,
    /// Number of eval windows.
    pub eval_windows: usize,
    /// Identity of the run's settings, stored in checkpoints and compared on resume.
    pub run: serde_json::Value,
}

/// Result of a `train` run.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    /// Always `train`.
    pub mode: &'static str,
    /// Step reached.
    pub steps: u64,
    /// Step the run started from (non-zero after `--resume`).
    pub resumed_from: u64,
    /// Parameter count.
    pub params: usize,
    /// Eval loss at the end (nats per byte).
    pub eval_loss: f32,
    /// Training loss of the last step.
    pub train_loss: f32,
    /// Training tokens per second.
    pub tokens_per_s: f64,
    /// blake3 of the final parameters.
    pub global_hash: String,
    /// Newest checkpoint written, if any.
    pub checkpoint: Option<String>,
    /// True when stopped early by Ctrl+C / SIGTERM.
    pub interrupted: bool,
}

const OPT_SUFFIXES: [&str; 2] = ["exp_avg", "exp_avg_sq"];

fn save(cfg: &TrainConfig, r: &Replica, step: u64) -> Result<Option<PathBuf>, TrainError> {
    let Some(dir) = &cfg.checkpoint_dir else {
        return Ok(None);
    };
    let params = r.params();
    let (m, v) = r.adam.to_flat(r.layout());
    let state = State {
        version: checkpoint::FORMAT_VERSION,
        step,
        round: 0,
        adam_t: r.adam.t,
        run: cfg.run.clone(),
        global_hash: hash_f32(&params),
        files: BTreeMap::new(),
        net: None,
    };
    let path = checkpoint::save(
        dir,
        r.layout(),
        &params,
        &[(OPT_SUFFIXES[0], &m), (OPT_SUFFIXES[1], &v)],
        state,
    )?;
    tracing::info!(step, path = %path.display(), "checkpoint written");
    Ok(Some(path))
}

/// Runs plain AdamW training; `stop` ends it at the next step boundary with a checkpoint.
pub fn run(
    cfg: &TrainConfig,
    corpus: &Corpus,
    device: &Compute,
    stop: &AtomicBool,
) -> Result<TrainReport, TrainError> {
    let layout: Vec<ParamInfo> = cfg.model.layout();
    let mut start = 0u64;
    let mut replica = if cfg.resume {
        let dir = cfg
            .checkpoint_dir
            .as_ref()
            .ok_or(TrainError::ResumeWithoutDir)?;
        match checkpoint::load_latest(dir, &layout, &OPT_SUFFIXES)? {
            Some(loaded) => {
                checkpoint::check_run(&loaded, &cfg.run, &["steps"])?;
                let mut r = Replica::new(&cfg.model, device, &loaded.params)?;
                r.adam = AdamState::from_flat(
                    loaded.state.adam_t,
                    &loaded.optimizer[OPT_SUFFIXES[0]],
                    &loaded.optimizer[OPT_SUFFIXES[1]],
                    &layout,
                    r.device(),
                );
                start = loaded.state.step;
                tracing::info!(step = start, path = %loaded.path.display(), "resumed from checkpoint");
                r
            }
            None => {
                tracing::warn!(dir = %dir.display(), "--resume: no checkpoint yet, starting from step 0");
                Replica::new(
                    &cfg.model,
                    device,
                    &flat::init_values(&layout, &cfg.model, cfg.seed),
                )?
            }
        }
    } else {
        Replica::new(
            &cfg.model,
            device,
            &flat::init_values(&layout, &cfg.model, cfg.seed),
        )?
    };
    let stream = Stream::new(corpus, 0, 1, 0, cfg.seed, cfg.batch, cfg.seq);
    let total = cfg.inner.total_steps;
    let mut progress = Progress::new(total, start);
    let t0 = Instant::now();
    let mut tokens = 0u64;
    let mut last_loss = f32::NAN;
    let mut checkpoint = None;
    let mut step = start;
    let mut interrupted = false;
    let mut warm: Option<(Instant, u64)> = None;
    while step < total {
        if stop.load(Ordering::Relaxed) {
            interrupted = true;
            break;
        }
        let stats = replica.step(
            &stream.batch(corpus, step),
            cfg.inner.lr_at(step),
            &cfg.inner,
        );
        step += 1;
        tokens += (cfg.batch * cfg.seq) as u64;
        last_loss = stats.loss;
        if warm.is_none() {
            warm = Some((Instant::now(), tokens));
        }
        progress.update(
            step,
            stats.loss,
            tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9),
        );
        if cfg.checkpoint_every > 0 && step % cfg.checkpoint_every == 0 && step < total {
            checkpoint = save(cfg, &replica, step)?.or(checkpoint);
        }
    }
    // Throughput excludes the first step, which includes one-time kernel compilation on wgpu.
    let tokens_per_s = match warm {
        Some((t1, tok1)) if tokens > tok1 => {
            (tokens - tok1) as f64 / t1.elapsed().as_secs_f64().max(1e-9)
        }
        _ => tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9),
    };
    progress.finish();
    if step > start || checkpoint.is_none() {
        checkpoint = save(cfg, &replica, step)?.or(checkpoint);
    }
    let params = replica.params();
    let eval_loss = Evaluator::new(&cfg.model, device).loss(
        &params,
        &eval_batches(corpus, cfg.seq, cfg.batch.max(1), cfg.eval_windows),
    )?;
    Ok(TrainReport {
        mode: "train",
        steps: step,
        resumed_from: start,
        params: params.len(),
        eval_loss,
        train_loss: last_loss,
        tokens_per_s,
        global_hash: hash_f32(&params),
        checkpoint: checkpoint.map(|p| p.display().to_string()),
        interrupted,
    })
}
