//! The trainer thread a node runs beside its event loop.
//!
//! It owns the replica (burn model and AdamW state) and does the slow work the event loop
//! must never wait on: one round of inner steps from the global parameters it is given, the
//! eval of the global parameters, and checkpoints. Jobs come in on a channel and results go
//! back on a bounded tokio channel. It knows nothing of the network or the protocol: a
//! checkpoint's network part ([`NetCheckpoint`]) is opaque data to it.

use crate::runconfig::Run;
use crate::train::checkpoint::{self, CheckpointError, NetCheckpoint};
use crate::train::data::{eval_batches, Batch, Corpus, Stream};
use crate::train::flat::{FlatError, ParamInfo};
use crate::train::inner::{AdamState, Evaluator, Replica, RoundError};
use diloco_protocol::outer::hash_f32;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::mpsc;

/// Optimizer tensors in a node checkpoint.
pub const OPT_SUFFIXES: [&str; 3] = ["exp_avg", "exp_avg_sq", "outer_momentum"];

/// Capacity of the channel results come back on.
pub const DONE_CAPACITY: usize = 64;

/// Work for the trainer thread.
#[derive(Debug)]
pub enum Job {
    /// Train one round from the global parameters `theta`.
    Train {
        /// The round.
        round: u64,
        /// Global parameters at its start.
        theta: Vec<f32>,
    },
    /// Evaluate the global parameters `theta` (the state at the start of `round`).
    Eval {
        /// The round.
        round: u64,
        /// Global parameters.
        theta: Vec<f32>,
    },
    /// Write a checkpoint.
    Save(Box<SaveJob>),
    /// Stop the thread.
    Quit,
}

/// A checkpoint of the agreed state at the start of `round`.
#[derive(Debug)]
pub struct SaveJob {
    /// Checkpoint directory.
    pub dir: PathBuf,
    /// The round whose starting state this is.
    pub round: u64,
    /// Global parameters.
    pub theta: Vec<f32>,
    /// Outer momentum.
    pub momentum: Vec<f32>,
    /// The network part of the agreed state.
    pub net: NetCheckpoint,
    /// The run definition, to refuse the checkpoint in another run.
    pub run: serde_json::Value,
}

/// What the trainer thread reports.
#[derive(Debug)]
pub enum Done {
    /// A round trained.
    Trained {
        /// The round.
        round: u64,
        /// Its outer gradient.
        delta: Vec<f32>,
        /// Tokens trained on.
        tokens: u64,
        /// Mean training loss.
        loss: f32,
        /// Seconds it took.
        secs: f64,
    },
    /// Training stopped early (the node is stopping).
    Aborted,
    /// The global parameters were evaluated.
    Evaluated {
        /// The round.
        round: u64,
        /// Eval loss (NaN in synthetic runs).
        loss: f32,
    },
    /// A checkpoint was written, or failed.
    Saved {
        /// The round.
        round: u64,
        /// Where it went.
        result: Result<PathBuf, CheckpointError>,
    },
    /// Training or evaluation failed: the node cannot go on.
    Failed(WorkerError),
}

/// Why the trainer thread could not do a job.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// A round of inner steps failed.
    #[error("training a round")]
    Round(#[from] RoundError),
    /// The eval could not load the global parameters.
    #[error("evaluating the global parameters")]
    Eval(#[source] FlatError),
    /// The thread could not be started.
    #[error("starting the trainer thread")]
    Spawn(#[source] std::io::Error),
    /// The thread is gone.
    #[error("the trainer thread stopped")]
    Stopped,
}

/// The model half of a trainer (absent in synthetic runs).
pub struct ModelWork {
    /// The replica.
    pub replica: Replica,
    /// Eval copy of the model.
    pub evaluator: Evaluator,
}

/// The trainer: replica, data stream and eval batches.
pub struct Trainer {
    run: Run,
    /// `None`: synthetic outer gradients (`synthetic_params`), for network benchmarks.
    work: Option<ModelWork>,
    rng: ChaCha8Rng,
    eval: Vec<Batch>,
    stream: Stream,
    corpus: Arc<Corpus>,
    layout: Vec<ParamInfo>,
    stop: Arc<AtomicBool>,
    /// Keep the AdamW state each round's training started from (only with a checkpoint
    /// directory).
    keep_round_start: bool,
    /// The AdamW state as the training of this round found it: a checkpoint of the state at the
    /// start of that round must carry these moments, not the ones its (possibly aborted)
    /// training has since moved on to. Burn tensors are immutable handles, so this holds the
    /// old moment buffers alive (twice the parameter count in floats), no copy.
    round_start: Option<(u64, AdamState)>,
}

impl Trainer {
    /// A trainer drawing this peer's stream (`shard_key`) of `corpus`, with `eval_windows` eval
    /// batches; `keep_round_start` when checkpoints are written.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        run: Run,
        work: Option<ModelWork>,
        corpus: Arc<Corpus>,
        layout: Vec<ParamInfo>,
        shard_key: u64,
        eval_windows: usize,
        stop: Arc<AtomicBool>,
        keep_round_start: bool,
    ) -> Self {
        let rc = &run.config;
        Trainer {
            rng: ChaCha8Rng::seed_from_u64(shard_key),
            eval: if eval_windows > 0 {
                eval_batches(&corpus, rc.seq, rc.batch, eval_windows)
            } else {
                Vec::new()
            },
            stream: Stream::new(&corpus, 0, 1, shard_key, rc.seed, rc.batch, rc.seq),
            run,
            work,
            corpus,
            layout,
            stop,
            keep_round_start,
            round_start: None,
        }
    }

    /// Starts the thread. Returns where to send jobs, where results come back and the thread.
    pub fn spawn(
        self,
    ) -> Result<
        (
            std::sync::mpsc::Sender<Job>,
            mpsc::Receiver<Done>,
            std::thread::JoinHandle<()>,
        ),
        WorkerError,
    > {
        let (job_tx, job_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel(DONE_CAPACITY);
        let thread = std::thread::Builder::new()
            .name("trainer".into())
            .spawn(move || self.serve(job_rx, done_tx))
            .map_err(WorkerError::Spawn)?;
        Ok((job_tx, done_rx, thread))
    }

    /// Trains round `round` from `theta`.
    pub fn train(&mut self, round: u64, theta: Vec<f32>) -> Result<Done, WorkerError> {
        let t0 = Instant::now();
        let h = self.run.config.inner_steps;
        let Some(work) = &mut self.work else {
            // Synthetic: a small random outer gradient, so averaging is all that is measured.
            let delta = (0..theta.len())
                .map(|_| (self.rng.next_u32() as f32 / u32::MAX as f32 - 0.5) * 1e-3)
                .collect();
            let c = &self.run.config;
            let rest = Duration::from_millis(c.synthetic_train_ms).saturating_sub(t0.elapsed());
            std::thread::sleep(rest);
            return Ok(Done::Trained {
                round,
                delta,
                tokens: h * (c.batch * c.seq) as u64,
                loss: 0.0,
                secs: t0.elapsed().as_secs_f64(),
            });
        };
        // The first training of a round sets it; a retraining of the same round starts from
        // moments that already include the first attempt.
        if self.keep_round_start && self.round_start.as_ref().map(|(r, _)| *r) != Some(round) {
            self.round_start = Some((round, work.replica.adam.clone()));
        }
        let (stream, corpus) = (&self.stream, &self.corpus);
        let done = work.replica.train_round(
            &theta,
            round * h,
            h,
            &self.run.inner,
            |step| stream.batch(corpus, step),
            Some(&self.stop),
            |_, _| {},
        )?;
        if let Some(r) = &done {
            let secs = t0.elapsed().as_secs_f64();
            tracing::debug!(
                round,
                inner_s = r.inner_s,
                overhead_s = secs - r.inner_s,
                "round trained (overhead: loading the global parameters, reading the local ones, outer gradient)"
            );
        }
        Ok(match done {
            Some(r) => Done::Trained {
                round,
                delta: r.delta,
                tokens: r.tokens,
                loss: r.loss,
                secs: t0.elapsed().as_secs_f64(),
            },
            None => Done::Aborted,
        })
    }

    /// Writes the checkpoint `job` asks for, with the AdamW moments its round started from.
    pub fn save(&self, job: &SaveJob) -> Result<PathBuf, CheckpointError> {
        let (m, v, t) = match &self.work {
            Some(w) => {
                // Moments at the start of the saved round: if its training already began (or
                // was aborted by Ctrl+C), the ones it started from.
                let adam = match &self.round_start {
                    Some((r, a)) if *r == job.round => a,
                    _ => &w.replica.adam,
                };
                let (m, v) = adam.to_flat(&self.layout);
                (m, v, adam.t)
            }
            None => (vec![0.0; job.theta.len()], vec![0.0; job.theta.len()], 0),
        };
        let state = checkpoint::State {
            version: checkpoint::FORMAT_VERSION,
            step: job.round * self.run.config.inner_steps,
            round: job.round,
            adam_t: t,
            run: job.run.clone(),
            global_hash: hash_f32(&job.theta),
            files: BTreeMap::new(),
            net: Some(job.net.clone()),
        };
        checkpoint::save(
            &job.dir,
            &self.layout,
            &job.theta,
            &[
                (OPT_SUFFIXES[0], &m),
                (OPT_SUFFIXES[1], &v),
                (OPT_SUFFIXES[2], &job.momentum),
            ],
            state,
        )
    }

    fn serve(mut self, jobs: std::sync::mpsc::Receiver<Job>, done: mpsc::Sender<Done>) {
        while let Ok(job) = jobs.recv() {
            let out = match job {
                Job::Quit => return,
                Job::Train { round, theta } => {
                    self.train(round, theta).unwrap_or_else(Done::Failed)
                }
                Job::Eval { round, theta } => match &mut self.work {
                    Some(w) => match w.evaluator.loss(&theta, &self.eval) {
                        Ok(loss) => Done::Evaluated { round, loss },
                        Err(e) => Done::Failed(WorkerError::Eval(e)),
                    },
                    None => Done::Evaluated {
                        round,
                        loss: f32::NAN,
                    },
                },
                Job::Save(job) => Done::Saved {
                    round: job.round,
                    result: self.save(&job),
                },
            };
            if done.blocking_send(out).is_err() {
                return;
            }
        }
    }

    /// The parameter layout.
    pub fn layout(&self) -> &[ParamInfo] {
        &self.layout
    }

    /// The replica, if this trainer has a model.
    pub fn replica(&self) -> Option<&Replica> {
        self.work.as_ref().map(|w| &w.replica)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::flat;
    use burn::prelude::Device;
    use std::path::Path;

    /// A trainer for a 1-layer model on the built-in corpus, 2 inner steps per round.
    fn small_trainer() -> (Trainer, Vec<f32>) {
        let corpus = Arc::new(
            Corpus::load(&crate::train::data::DataSpec {
                eval_fraction: 0.05,
                ..Default::default()
            })
            .unwrap(),
        );
        let rc = crate::runconfig::RunConfig {
            model: "d16-l1-h2-c16".into(),
            inner_steps: 2,
            batch: 2,
            seq: 16,
            ..Default::default()
        };
        let run = rc.validate(&corpus).unwrap();
        let device = crate::train::backend::Compute::Burn(Device::flex());
        let layout = run.model.layout();
        let init = flat::init_values(&layout, &run.model, 0);
        let work = ModelWork {
            replica: Replica::new(&run.model, &device, &init).unwrap(),
            evaluator: Evaluator::new(&run.model, &device),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let trainer = Trainer::new(run, Some(work), corpus, layout, 1, 0, stop, true);
        (trainer, init)
    }

    fn save_job(dir: &Path, round: u64, theta: &[f32]) -> SaveJob {
        SaveJob {
            dir: dir.to_path_buf(),
            round,
            theta: theta.to_vec(),
            momentum: vec![0.0; theta.len()],
            net: NetCheckpoint {
                chain: String::new(),
                members: Vec::new(),
                founder: String::new(),
            },
            run: serde_json::json!({}),
        }
    }

    fn saved_moments(dir: &Path, t: &Trainer) -> (u64, Vec<f32>) {
        let l = checkpoint::load_latest(dir, &t.layout, &OPT_SUFFIXES)
            .unwrap()
            .unwrap();
        (l.state.adam_t, l.optimizer[OPT_SUFFIXES[0]].clone())
    }

    fn moments(t: &Trainer) -> Vec<f32> {
        t.replica().unwrap().adam.to_flat(&t.layout).0
    }

    #[test]
    fn a_checkpoint_carries_the_moments_its_round_started_from() {
        let dir = tempfile::tempdir().unwrap();
        let (mut t, theta) = small_trainer();
        // Round 0 trained; the state of round 1 starts from the moments it left.
        assert!(matches!(
            t.train(0, theta.clone()),
            Ok(Done::Trained { .. })
        ));
        let after0 = moments(&t);
        t.save(&save_job(dir.path(), 1, &theta)).unwrap();
        assert_eq!(saved_moments(dir.path(), &t), (2, after0.clone()));

        // Round 1 trained (or aborted) before the checkpoint of its start is written: the
        // checkpoint still carries the moments round 1 started from, not the newer ones.
        assert!(matches!(
            t.train(1, theta.clone()),
            Ok(Done::Trained { .. })
        ));
        let after1 = moments(&t);
        assert_ne!(after0, after1);
        t.save(&save_job(dir.path(), 1, &theta)).unwrap();
        assert_eq!(saved_moments(dir.path(), &t), (2, after0));

        // Retraining round 1 keeps the first start; the state of round 2 gets the latest.
        assert!(matches!(
            t.train(1, theta.clone()),
            Ok(Done::Trained { .. })
        ));
        t.save(&save_job(dir.path(), 2, &theta)).unwrap();
        let now = moments(&t);
        assert_eq!(saved_moments(dir.path(), &t), (6, now));
    }
}
