//! Command-line flags as the user typed them, and their validation into run configurations.
//!
//! Every flag can also be set through a `DILOCO_*` environment variable (useful in Docker).
//! Parsing (clap) and validation ([`TrainArgs::to_config`], [`SimulateArgs::to_config`]) are
//! separate so every check lives in one place and produces one clear message.

use crate::runconfig::RunConfig;
use crate::train::backend::BackendChoice;
use crate::train::data::{DataSpec, Sharding};
use crate::train::flat::InitScheme;
use crate::train::inner::InnerConfig;
use crate::train::model::ModelConfig;
use crate::train::plain::TrainConfig;
use crate::train::simulate::{Mode, SimulateConfig};
use clap::{Args, Parser, Subcommand};
use diloco_protocol::codec::Quantization;
use diloco_protocol::outer::OuterConfig;
use std::path::PathBuf;
use thiserror::Error;

/// A flag combination that cannot work.
#[derive(Debug, Error, PartialEq)]
#[error("{0}")]
pub struct UsageError(pub String);

fn usage<T>(msg: impl Into<String>) -> Result<T, UsageError> {
    Err(UsageError(msg.into()))
}

/// diloco-node: train one language model together with DiLoCo, peer to peer.
#[derive(Debug, Parser)]
#[command(name = "diloco-node", version, about, long_about = None)]
pub struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. "info" or "diloco_node=debug".
    #[arg(
        long,
        global = true,
        env = "DILOCO_LOG",
        default_value = "info,libp2p_gossipsub=error,libp2p_kad=error"
    )]
    pub log: String,
    /// Log format: `text` (for people) or `json` (one JSON object a line with its span fields,
    /// for log collectors).
    #[arg(long, global = true, env = "DILOCO_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Threads for the CPU backend's tensor kernels (matmuls, element-wise ops); 0 means one per
    /// core (or RAYON_NUM_THREADS when set). Larger models gain more from extra threads; set it
    /// lower to leave cores to other work. Results do not depend on it.
    #[arg(long, global = true, env = "DILOCO_THREADS", default_value_t = 0)]
    pub threads: usize,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How logs are written (to stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (colours on a terminal).
    Text,
    /// One JSON object a line: timestamp, level, target, message, fields, and the current span
    /// and its parents (peer id, run, round) as fields.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train one replica with plain AdamW (checkpoints, --resume).
    Train(TrainArgs),
    /// Run M replicas in one process with DiLoCo or data-parallel and compare traffic.
    Simulate(SimulateArgs),
    /// Join (or found) a run on the network and train with its peers.
    Join(JoinArgs),
    /// Invite a peer to an `invite` run: prints a token for its `join --invite`, signed with
    /// this node's key (the signer must be a member when the JOIN arrives). Takes the same run
    /// flags as `join` (the invitation is bound to the run id).
    Invite(InviteArgs),
    /// Ask a running node for its /status (exit 0 when it answers): a healthcheck that needs
    /// no curl in the image.
    Health(HealthArgs),
    /// The run operator's way on for a run that lost its quorum: restart the stalled round
    /// with the members that survive (a RECONFIG signed with the operator key named in the run
    /// config), handed to one surviving node, which relays it. Shows what it would do unless
    /// --yes.
    Reconfig(ReconfigArgs),
    /// Make an ed25519 key file (for example the run operator's) and print its peer id; an
    /// existing file is left as it is and its peer id printed.
    Keygen(KeygenArgs),
    /// Show the state of one or more running nodes side by side: round, phase, group, loss and
    /// global hash, flagging nodes at one round whose hashes differ (exit 1 then, or when a
    /// node does not answer).
    Status(StatusArgs),
    /// Start a bootstrap peer and N nodes on this machine (loopback, built-in corpus unless
    /// --data), print their dashboard addresses and follow the run until Ctrl+C, which stops
    /// every process cleanly (final checkpoints written).
    Demo(DemoArgs),
    /// Run a study: a grid file of `simulate` runs with seeds, several at once, results
    /// appended as JSON lines (re-running makes only what is missing); then a report with
    /// mean ± std over seeds, the change against data-parallel, and SVG plots.
    #[command(subcommand)]
    Study(StudyCommand),
    /// Compute utilization of data-parallel and DiLoCo on a given link, and the bandwidth each
    /// needs for 50–99 % utilization (the wall-clock model of "Scaling Laws for DiLoCo").
    Plan(PlanArgs),
}

/// `study` subcommands.
#[derive(Debug, Subcommand)]
pub enum StudyCommand {
    /// Make every run of a grid file that is not yet in the results file.
    Run(StudyRunArgs),
    /// Write report.md and SVG plots from a results file.
    Report(StudyReportArgs),
}

/// `study run` flags.
#[derive(Debug, Args)]
pub struct StudyRunArgs {
    /// The grid file (JSON; see docs/STUDY.md).
    pub grid: PathBuf,
    /// Results file (JSON lines, appended; default: the grid's path with .jsonl).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Training text for every run.
    #[arg(
        long,
        env = "DILOCO_DATA",
        default_value = "../shared/data/shakespeare.txt"
    )]
    pub data: PathBuf,
    /// Runs at once (default: cores / --threads-per-run).
    #[arg(long)]
    pub jobs: Option<usize>,
    /// CPU threads each run may use.
    #[arg(long, default_value_t = 1)]
    pub threads_per_run: usize,
    /// Compute backend of the runs (`cpu` and `native` give results that repeat bit for bit,
    /// whatever the thread count; a grid's `backend` key overrides this per run).
    #[arg(long, value_enum, default_value_t = BackendChoice::Cpu)]
    pub backend: BackendChoice,
    /// Write the report when the runs are done, into a folder named like the results file
    /// without its extension (results.jsonl: results/report.md and its plots).
    #[arg(long)]
    pub report: bool,
    /// Only the runs whose key has every one of these `k=v` pairs (as in the results' `key`
    /// field, e.g. `--only "replicas=2 seed=0"`; repeatable).
    #[arg(long, value_name = "PAIRS")]
    pub only: Vec<String>,
    /// Re-make runs that are already recorded (with --only: some of them) and check that they
    /// repeat their recorded eval loss, eval history and final parameters' hash; nothing is
    /// appended, and a difference is an error.
    #[arg(long, conflicts_with = "report")]
    pub check: bool,
}

/// `study report` flags.
#[derive(Debug, Args)]
pub struct StudyReportArgs {
    /// Results file(s) written by `study run`.
    #[arg(required = true)]
    pub results: Vec<PathBuf>,
    /// Folder for report.md and the plots (default: the first results file's folder).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Title of the report.
    #[arg(long, default_value = "DiLoCo study")]
    pub title: String,
}

/// `plan` flags.
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Model parameters (e.g. 25.6e6, or a model name: tiny, small, base).
    #[arg(long, default_value = "small")]
    pub params: String,
    /// Compute seconds of one inner step on one peer.
    #[arg(long, default_value_t = 1.0)]
    pub step_time: f64,
    /// Inner steps per round H.
    #[arg(long, default_value_t = 100)]
    pub inner_steps: u64,
    /// Outer-gradient codec DiLoCo sends (f32, f16, bf16, int8, fp4).
    #[arg(long, default_value = "int8")]
    pub quantize: String,
    /// Bits per gradient value data-parallel sends.
    #[arg(long, default_value_t = 16.0)]
    pub dp_bits: f64,
    /// Peers in the all-reduce.
    #[arg(long, default_value_t = 8)]
    pub peers: u64,
    /// Each peer's link bandwidth in Mbit/s.
    #[arg(long, default_value_t = 100.0)]
    pub bandwidth_mbit: f64,
    /// Latency of one all-reduce in milliseconds.
    #[arg(long, default_value_t = 50.0)]
    pub latency_ms: f64,
    /// Fraction of a step's compute that can hide a sync (0: none, as the node does today).
    #[arg(long, default_value_t = 0.0)]
    pub overlap: f64,
}

impl PlanArgs {
    /// Validates the flags into the model's inputs.
    pub fn to_plan(&self) -> Result<crate::study::plan::Plan, UsageError> {
        let params = match ModelConfig::parse(&self.params) {
            Ok(m) => m.num_params() as f64,
            Err(_) => match self.params.parse::<f64>() {
                Ok(n) if n.is_finite() && n >= 1.0 => n,
                _ => {
                    return usage(format!(
                        "--params '{}': give a count such as 25.6e6 or a model name (tiny, small, base)",
                        self.params
                    ))
                }
            },
        };
        let q: Quantization = self
            .quantize
            .parse()
            .map_err(|e| UsageError(format!("--quantize: {e}")))?;
        let pos = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(v)
            } else {
                usage(format!("{name} must be a positive number, not {v}"))
            }
        };
        if self.inner_steps == 0 || self.peers == 0 {
            return usage("--inner-steps and --peers must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.overlap)
            || !self.latency_ms.is_finite()
            || self.latency_ms < 0.0
        {
            return usage("--overlap must be within 0..1 and --latency-ms at least 0");
        }
        Ok(crate::study::plan::Plan {
            params,
            step_time: pos("--step-time", self.step_time)?,
            inner_steps: self.inner_steps,
            // Block-quantized codecs also send one f32 scale per block.
            diloco_bits: q.bits() as f64
                + match q {
                    Quantization::Int8 | Quantization::Fp4 => {
                        32.0 / diloco_protocol::codec::BLOCK as f64
                    }
                    _ => 0.0,
                },
            dp_bits: pos("--dp-bits", self.dp_bits)?,
            peers: self.peers,
            bandwidth: pos("--bandwidth-mbit", self.bandwidth_mbit)? * 1e6,
            latency: self.latency_ms / 1e3,
            overlap: self.overlap,
        })
    }
}

/// `demo` flags. Flags after `--` are passed to every node's `join`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Nodes to start (1 to 16).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub nodes: u16,
    /// Folder for each process's log, key and checkpoints (default: a new folder under the
    /// system's temporary directory; it is kept after the demo so the checkpoints stay).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Dashboard port of the bootstrap peer; node i gets port + i. 0 lets the system pick free
    /// ports.
    #[arg(long, default_value_t = 8480)]
    pub port: u16,
    /// Training text (default: the built-in corpus).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Model preset.
    #[arg(long, default_value = "tiny")]
    pub model: String,
    /// Inner steps per round (small, so rounds come every few seconds).
    #[arg(long, default_value_t = 10)]
    pub inner_steps: u64,
    /// Sequences per inner step.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Stop after this many rounds (0: run until Ctrl+C).
    #[arg(long, default_value_t = 0)]
    pub rounds: u64,
    /// Compute backend of the nodes.
    #[arg(long, value_enum, default_value_t = BackendChoice::Native)]
    pub backend: BackendChoice,
    /// The `diloco-bootstrap` binary (default: the one beside this binary, then $PATH).
    #[arg(long, env = "DILOCO_BOOTSTRAP_BIN")]
    pub bootstrap_bin: Option<PathBuf>,
    /// More `join` flags for every node.
    #[arg(last = true)]
    pub join_args: Vec<String>,
}

/// `reconfig` flags.
#[derive(Debug, Args)]
pub struct ReconfigArgs {
    /// A surviving node's --status-addr: the stalled round, its chain and members are read from
    /// its /status, and the signed RECONFIG is handed to it.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub node: std::net::SocketAddr,
    /// The operator's key file (`diloco-node keygen`; its peer id is the run config's
    /// `operator`).
    #[arg(long)]
    pub operator_key: PathBuf,
    /// The members the round restarts with (peer ids, comma-separated or repeated).
    #[arg(long, value_delimiter = ',', conflicts_with = "drop")]
    pub keep: Vec<String>,
    /// The members left out, those that are gone (peer ids); the rest are kept.
    #[arg(long, value_delimiter = ',')]
    pub drop: Vec<String>,
    /// Sign and send it; without this the command only shows what it would do.
    #[arg(long)]
    pub yes: bool,
    /// Seconds to wait for the node.
    #[arg(long, default_value_t = 30.0)]
    pub timeout: f64,
}

/// `keygen` flags.
#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// The key file to write (kept if it exists).
    pub path: PathBuf,
}

/// `status` flags.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Status addresses of the nodes (their --status-addr), comma-separated or repeated.
    #[arg(
        long,
        required = true,
        value_delimiter = ',',
        env = "DILOCO_STATUS_ADDRS"
    )]
    pub addr: Vec<std::net::SocketAddr>,
    /// Seconds to wait for each node's answer.
    #[arg(long, default_value_t = 3.0)]
    pub timeout: f64,
    /// One JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// `health` flags.
#[derive(Debug, Args)]
pub struct HealthArgs {
    /// The node's --status-addr.
    #[arg(long, env = "DILOCO_HEALTH_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: std::net::SocketAddr,
    /// Seconds to wait for an answer.
    #[arg(long, default_value_t = 3.0)]
    pub timeout: f64,
}

/// `join` flags. Run settings left unset come from --run-config, else the defaults; all peers
/// of a run must end up with the same run settings and data (the run id compares them).
#[derive(Debug, Args)]
pub struct JoinArgs {
    /// Bootstrap peer multiaddr ending in /p2p/<peer id> (repeat or comma-separate for several).
    #[arg(long, env = "DILOCO_BOOTSTRAP", value_delimiter = ',', num_args = 1..)]
    pub bootstrap: Vec<String>,
    /// Address to listen on (repeat for several): /ip4/0.0.0.0/tcp/0 picks a free port.
    #[arg(
        long,
        env = "DILOCO_LISTEN",
        value_delimiter = ',',
        default_value = "/ip4/0.0.0.0/tcp/0"
    )]
    pub listen: Vec<String>,
    /// Run settings as JSON (fields of the run config; flags below override it).
    #[arg(long, env = "DILOCO_RUN_CONFIG")]
    pub run_config: Option<PathBuf>,
    /// Training data (text file, directory, or JSONL); omit for the built-in corpus.
    #[arg(long, env = "DILOCO_DATA")]
    pub data: Option<PathBuf>,
    /// Held-out data for evaluation (default: the last --eval-fraction of --data).
    #[arg(long, env = "DILOCO_EVAL_DATA")]
    pub eval_data: Option<PathBuf>,
    /// Fraction of the data held out for evaluation when --eval-data is absent.
    #[arg(long, env = "DILOCO_EVAL_FRACTION", default_value_t = 0.05)]
    pub eval_fraction: f64,
    /// Eval windows evaluated after each decided round (0: none).
    #[arg(long, env = "DILOCO_EVAL_WINDOWS", default_value_t = 16)]
    pub eval_windows: usize,
    /// Model: tiny, small, base, or d<D>-l<L>-h<H>-c<C>.
    #[arg(long, env = "DILOCO_MODEL")]
    pub model: Option<String>,
    /// Inner steps per round H.
    #[arg(long, env = "DILOCO_INNER_STEPS")]
    pub inner_steps: Option<u64>,
    /// Rounds in the run (learning-rate schedule length; nodes stop after it).
    #[arg(long, env = "DILOCO_ROUNDS")]
    pub rounds: Option<u64>,
    /// Sequences per inner step on this peer.
    #[arg(long, env = "DILOCO_BATCH")]
    pub batch: Option<usize>,
    /// Sequence length in bytes.
    #[arg(long, env = "DILOCO_SEQ")]
    pub seq: Option<usize>,
    /// Peak inner learning rate.
    #[arg(long, env = "DILOCO_LR")]
    pub lr: Option<f64>,
    /// Linear warmup steps.
    #[arg(long, env = "DILOCO_WARMUP")]
    pub warmup: Option<u64>,
    /// Inner AdamW weight decay.
    #[arg(long, env = "DILOCO_WEIGHT_DECAY")]
    pub weight_decay: Option<f64>,
    /// Outer learning rate.
    #[arg(long, env = "DILOCO_OUTER_LR")]
    pub outer_lr: Option<f32>,
    /// Outer Nesterov momentum.
    #[arg(long, env = "DILOCO_OUTER_MOMENTUM")]
    pub outer_momentum: Option<f32>,
    /// Outer-gradient codec: none, f16, bf16, int8, fp4.
    #[arg(long, env = "DILOCO_QUANTIZE")]
    pub quantize: Option<String>,
    /// How owners combine outer gradients: norm-screen[:factor] (default), trimmed-mean[:fraction]
    /// or mean.
    #[arg(long, env = "DILOCO_AGGREGATION")]
    pub aggregation: Option<String>,
    /// Seed of the initial parameters.
    #[arg(long, env = "DILOCO_SEED")]
    pub seed: Option<u64>,
    /// How initial parameters are drawn.
    #[arg(long, env = "DILOCO_INIT", value_enum)]
    pub init: Option<InitScheme>,
    /// Biases in the MLP's linear layers.
    #[arg(long, env = "DILOCO_MLP_BIAS", action = clap::ArgAction::Set)]
    pub mlp_bias: Option<bool>,
    /// Who may become a member: open (default), allowlist (only the peers in --allowlist) or
    /// invite (those, and peers with an invitation from a member: `diloco-node invite`).
    #[arg(long, env = "DILOCO_ADMISSION")]
    pub admission: Option<String>,
    /// File of peer ids (one per line, `#` comments) that may found the run (and, under
    /// `--admission allowlist`, join it); part of the run config and its id.
    #[arg(long, env = "DILOCO_ALLOWLIST")]
    pub allowlist: Option<PathBuf>,
    /// The run's operator: the peer id (or 64 hex digits) of the one key that may restart a
    /// round that lost its quorum with the members that survive (`diloco-node reconfig`);
    /// part of the run config and its id. Default: none (such a run waits for its members).
    #[arg(long, env = "DILOCO_OPERATOR")]
    pub operator: Option<String>,
    /// This node's invitation to an `invite` run (the token `diloco-node invite` printed).
    #[arg(long, env = "DILOCO_INVITE")]
    pub invite: Option<String>,
    /// Compute backend.
    #[arg(long, env = "DILOCO_BACKEND", value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
    /// Directory for checkpoints and the vote record; a node restarted with it resumes.
    #[arg(long, env = "DILOCO_CHECKPOINT_DIR")]
    pub checkpoint_dir: Option<PathBuf>,
    /// Write a checkpoint every N rounds (0: only when stopping).
    #[arg(long, env = "DILOCO_CHECKPOINT_EVERY", default_value_t = 5)]
    pub checkpoint_every: u64,
    /// Serve GET /status (JSON) and GET /metrics (Prometheus) on HOST:PORT.
    #[arg(long, env = "DILOCO_STATUS_ADDR")]
    pub status_addr: Option<std::net::SocketAddr>,
    /// Identity key file (created if absent). Default: node.key in --checkpoint-dir, else a
    /// new identity each start.
    #[arg(long, env = "DILOCO_KEY")]
    pub key: Option<PathBuf>,
    /// Seconds a fresh node listens for a run under way before founding one.
    #[arg(long, env = "DILOCO_GENESIS_WAIT", default_value_t = 5.0)]
    pub genesis_wait: f64,
    /// Peers that found a new run together: the node waits until it hears this many (itself
    /// included) and the lowest ids start at round 0 as members, with no state transfer.
    /// Use it for a planned cohort of exactly N peers; with 1 the lowest id founds alone and
    /// the others join it.
    #[arg(long, env = "DILOCO_FOUNDERS", default_value_t = 1)]
    pub founders: usize,
    /// Listen through the bootstrap peers' relays from the start, for a node that knows it is
    /// behind NAT or a firewall (without it, only once AutoNAT finds the node unreachable).
    /// Peers then reach it through the relay and DCUtR tries to upgrade to a direct connection.
    #[arg(long, env = "DILOCO_RELAY_LISTEN")]
    pub relay_listen: bool,
    /// The peers reach each other on private addresses (a LAN, Docker networks, a lab): let
    /// AutoNAT test reachability over private IPs too. Without it AutoNAT only trusts public
    /// addresses, which is right on the internet but never concludes anything on a LAN.
    #[arg(long, env = "DILOCO_PRIVATE_NETWORK")]
    pub private_network: bool,
    /// Print the final report as one JSON line.
    #[arg(long, env = "DILOCO_JSON")]
    pub json: bool,
}

/// `diloco-node invite`.
#[derive(Debug, Args)]
pub struct InviteArgs {
    /// The invited peer's id (libp2p `12D3Koo…`, as its log and dashboard show it, or 64 hex
    /// digits).
    #[arg(long = "peer")]
    pub invitee: String,
    /// The run and this node's key (--key or --checkpoint-dir), as for `join`.
    #[command(flatten)]
    pub join: JoinArgs,
}

impl JoinArgs {
    /// Where the data comes from.
    pub fn data_spec(&self) -> DataSpec {
        DataSpec {
            path: self.data.clone(),
            eval_path: self.eval_data.clone(),
            eval_fraction: self.eval_fraction,
        }
    }

    /// The run settings: --run-config, then the flags given on top.
    pub fn run_config(&self) -> Result<RunConfig, UsageError> {
        let mut rc = match &self.run_config {
            Some(p) => RunConfig::load(p).map_err(|e| UsageError(e.to_string()))?,
            None => RunConfig::default(),
        };
        if let Some(v) = &self.model {
            rc.model = v.clone();
        }
        if let Some(v) = self.inner_steps {
            rc.inner_steps = v;
        }
        if let Some(v) = self.rounds {
            rc.rounds = v;
        }
        if let Some(v) = self.batch {
            rc.batch = v;
        }
        if let Some(v) = self.seq {
            rc.seq = v;
        }
        if let Some(v) = self.lr {
            rc.lr = v;
        }
        if let Some(v) = self.warmup {
            rc.warmup = v;
        }
        if let Some(v) = self.weight_decay {
            rc.weight_decay = v;
        }
        if let Some(v) = self.outer_lr {
            rc.outer_lr = v;
        }
        if let Some(v) = self.outer_momentum {
            rc.outer_momentum = v;
        }
        if let Some(v) = &self.quantize {
            rc.quantize = v.clone();
        }
        if let Some(v) = self.seed {
            rc.seed = v;
        }
        if let Some(v) = &self.aggregation {
            rc.aggregation = v.clone();
        }
        if let Some(v) = self.init {
            rc.init = v;
        }
        if let Some(v) = self.mlp_bias {
            rc.mlp_bias = v;
        }
        if let Some(v) = &self.admission {
            rc.admission = v.clone();
        }
        if let Some(v) = &self.operator {
            rc.operator = v.trim().to_string();
        }
        if let Some(p) = &self.allowlist {
            rc.allowlist =
                crate::runconfig::read_allowlist(p).map_err(|e| UsageError(e.to_string()))?;
        }
        Ok(rc)
    }

    /// Checks the flags that do not depend on the data.
    pub fn validate(&self) -> Result<(), UsageError> {
        if !(self.genesis_wait.is_finite() && (0.0..=3600.0).contains(&self.genesis_wait)) {
            return usage("--genesis-wait must be between 0 and 3600 seconds");
        }
        if !(0.0..0.5).contains(&self.eval_fraction) {
            return usage("--eval-fraction must be in [0, 0.5)");
        }
        if self.listen.is_empty() {
            return usage("--listen needs at least one address");
        }
        if !(1..=1024).contains(&self.founders) {
            return usage("--founders must be between 1 and 1024");
        }
        Ok(())
    }
}

/// Flags shared by `train` and `simulate`.
#[derive(Debug, Args, Clone)]
pub struct CommonArgs {
    /// Training data: a text file, a directory of .txt/.jsonl files, or a .jsonl file with a
    /// "text" field. Omit for the built-in generated corpus.
    #[arg(long, env = "DILOCO_DATA")]
    pub data: Option<PathBuf>,
    /// Held-out data for evaluation (default: the last --eval-fraction of --data).
    #[arg(long, env = "DILOCO_EVAL_DATA")]
    pub eval_data: Option<PathBuf>,
    /// Fraction of the data held out for evaluation when --eval-data is absent.
    #[arg(long, env = "DILOCO_EVAL_FRACTION", default_value_t = 0.05)]
    pub eval_fraction: f64,
    /// Number of evaluation windows (evenly spaced over the held-out split). 128 windows read
    /// about 1 % lower than 1024 on shakespeare.txt for the same parameters (docs/RECIPE.md).
    #[arg(long, env = "DILOCO_EVAL_WINDOWS", default_value_t = 1024)]
    pub eval_windows: usize,
    /// Total inner steps.
    #[arg(long, env = "DILOCO_STEPS", default_value_t = 400)]
    pub steps: u64,
    /// Model: tiny, small, base, or d<D>-l<L>-h<H>-c<C>.
    #[arg(long, env = "DILOCO_MODEL", default_value = "tiny")]
    pub model: String,
    /// Compute backend.
    #[arg(long, env = "DILOCO_BACKEND", value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
    /// Sequences per step (for simulate: global, split evenly over the replicas).
    #[arg(long, env = "DILOCO_BATCH", default_value_t = 16)]
    pub batch: usize,
    /// Sequence length in bytes (at most the model's context).
    #[arg(long, env = "DILOCO_SEQ", default_value_t = 128)]
    pub seq: usize,
    /// Peak inner learning rate.
    #[arg(long, env = "DILOCO_LR", default_value_t = 3e-3)]
    pub lr: f64,
    /// Linear warmup steps.
    #[arg(long, env = "DILOCO_WARMUP", default_value_t = 40)]
    pub warmup: u64,
    /// Decoupled weight decay of the inner AdamW.
    #[arg(long, env = "DILOCO_WEIGHT_DECAY", default_value_t = 0.1)]
    pub weight_decay: f64,
    /// Seed for initial parameters and data order.
    #[arg(long, env = "DILOCO_SEED", default_value_t = 0)]
    pub seed: u64,
    /// How initial parameters are drawn (docs/RECIPE.md compares them).
    #[arg(long, env = "DILOCO_INIT", value_enum, default_value_t = InitScheme::default())]
    pub init: InitScheme,
    /// Biases in the MLP's linear layers.
    #[arg(long, env = "DILOCO_MLP_BIAS", default_value_t = true, action = clap::ArgAction::Set)]
    pub mlp_bias: bool,
    /// Print the result as one JSON object on the last line of stdout.
    #[arg(long, env = "DILOCO_JSON")]
    pub json: bool,
}

/// `train` flags.
#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Directory for checkpoints.
    #[arg(long, env = "DILOCO_CHECKPOINT_DIR")]
    pub checkpoint_dir: Option<PathBuf>,
    /// Write a checkpoint every N steps (0: only at the end).
    #[arg(long, env = "DILOCO_CHECKPOINT_EVERY", default_value_t = 100)]
    pub checkpoint_every: u64,
    /// Continue from the newest checkpoint in --checkpoint-dir.
    #[arg(long, env = "DILOCO_RESUME")]
    pub resume: bool,
}

/// `simulate` flags.
#[derive(Debug, Args)]
pub struct SimulateArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Number of replicas M.
    #[arg(long, env = "DILOCO_REPLICAS", default_value_t = 2)]
    pub replicas: usize,
    /// DiLoCo or data-parallel.
    #[arg(long, env = "DILOCO_MODE", value_enum, default_value_t = Mode::Diloco)]
    pub mode: Mode,
    /// Inner steps per round H.
    #[arg(long, env = "DILOCO_INNER_STEPS", default_value_t = 50)]
    pub inner_steps: u64,
    /// Outer learning rate.
    #[arg(long, env = "DILOCO_OUTER_LR", default_value_t = 0.7)]
    pub outer_lr: f32,
    /// Outer Nesterov momentum.
    #[arg(long, env = "DILOCO_OUTER_MOMENTUM", default_value_t = 0.9)]
    pub outer_momentum: f32,
    /// Codec for outer gradients: none (f32), f16, bf16, int8, fp4.
    #[arg(long, env = "DILOCO_QUANTIZE", default_value = "none")]
    pub quantize: String,
    /// Probability that a replica's outer gradient is lost in a round.
    #[arg(long, env = "DILOCO_DROP_PROB", default_value_t = 0.0)]
    pub drop_prob: f64,
    /// Send only this fraction of each outer gradient's entries (the largest; 0 < f ≤ 1),
    /// with error feedback: what a replica leaves out is added to its next round's gradient.
    #[arg(long, env = "DILOCO_TOP_K")]
    pub top_k: Option<f64>,
    /// Evaluate the global model every N steps (0: only at the end).
    #[arg(long, env = "DILOCO_EVAL_EVERY", default_value_t = 0)]
    pub eval_every: u64,
    /// How the training data is split over replicas: iid (disjoint blocks spread over the
    /// whole corpus, so every replica sees the same distribution) or contiguous (replica r
    /// takes the r-th slice: a non-i.i.d. split).
    #[arg(long, env = "DILOCO_SHARDS", value_enum, default_value_t = Sharding::Iid)]
    pub shards: Sharding,
    /// Write the initial parameters (init.safetensors) and every window offset the replicas
    /// will sample (batches.bin) to this directory before training, so another implementation
    /// can train on exactly the same inputs (bench/torch_diloco.py --init-from --batches).
    #[arg(long, env = "DILOCO_DUMP_BATCHES")]
    pub dump_batches: Option<PathBuf>,
}

impl CommonArgs {
    /// Where the data comes from.
    pub fn data_spec(&self) -> DataSpec {
        DataSpec {
            path: self.data.clone(),
            eval_path: self.eval_data.clone(),
            eval_fraction: self.eval_fraction,
        }
    }

    fn validate(&self) -> Result<(ModelConfig, InnerConfig), UsageError> {
        let mut model = ModelConfig::parse(&self.model).map_err(|e| UsageError(e.to_string()))?;
        model.init = self.init;
        model.mlp_bias = self.mlp_bias;
        if self.steps == 0 {
            return usage("--steps must be at least 1");
        }
        if self.batch == 0 {
            return usage("--batch must be at least 1");
        }
        if self.seq == 0 || self.seq > model.context {
            return usage(format!(
                "--seq {} must be between 1 and the model's context ({}); pass a smaller --seq or a model with a longer context",
                self.seq, model.context
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return usage("--lr must be a positive number");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return usage("--weight-decay must be zero or positive");
        }
        if !(0.0..0.5).contains(&self.eval_fraction) || self.eval_fraction.is_nan() {
            return usage("--eval-fraction must be in [0, 0.5)");
        }
        if self.eval_fraction == 0.0 && self.eval_data.is_none() {
            return usage("--eval-fraction 0 needs --eval-data FILE");
        }
        if self.eval_windows == 0 {
            return usage("--eval-windows must be at least 1");
        }
        let inner = InnerConfig::new(self.lr, self.warmup, self.steps, self.weight_decay);
        Ok((model, inner))
    }

    fn run_json(&self, model: &ModelConfig) -> serde_json::Value {
        serde_json::json!({
            "model": model,
            "steps": self.steps,
            "batch": self.batch,
            "seq": self.seq,
            "lr": self.lr,
            "warmup": self.warmup,
            "weight_decay": self.weight_decay,
            "seed": self.seed,
            "data": self.data.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "builtin".into()),
            "eval_data": self.eval_data.as_ref().map(|p| p.display().to_string()),
            "eval_fraction": self.eval_fraction,
        })
    }
}

impl TrainArgs {
    /// Validates the flags into a [`TrainConfig`].
    pub fn to_config(&self) -> Result<TrainConfig, UsageError> {
        let (model, inner) = self.common.validate()?;
        if self.resume && self.checkpoint_dir.is_none() {
            return usage(
                "--resume needs --checkpoint-dir DIR (the directory the earlier run wrote to)",
            );
        }
        let run = self.common.run_json(&model);
        Ok(TrainConfig {
            model,
            inner,
            batch: self.common.batch,
            seq: self.common.seq,
            seed: self.common.seed,
            checkpoint_dir: self.checkpoint_dir.clone(),
            checkpoint_every: self.checkpoint_every,
            resume: self.resume,
            eval_windows: self.common.eval_windows,
            run,
        })
    }
}

impl SimulateArgs {
    /// Validates the flags into a [`SimulateConfig`].
    pub fn to_config(&self) -> Result<SimulateConfig, UsageError> {
        let (model, inner) = self.common.validate()?;
        let c = &self.common;
        if self.replicas == 0 {
            return usage("--replicas must be at least 1");
        }
        if self.replicas > c.batch {
            return usage(format!(
                "--replicas {} is more than --batch {}: each replica needs at least one sequence per step (batch is global)",
                self.replicas, c.batch
            ));
        }
        if c.batch % self.replicas != 0 {
            tracing::warn!(
                batch = c.batch,
                replicas = self.replicas,
                "batch is not a multiple of replicas; each replica gets {}",
                c.batch / self.replicas
            );
        }
        if self.mode == Mode::Diloco {
            if self.inner_steps == 0 {
                return usage("--inner-steps (H) must be at least 1");
            }
            if c.steps < self.inner_steps {
                return usage(format!(
                    "--steps {} is less than --inner-steps {}: DiLoCo would never complete a round; raise --steps or lower --inner-steps",
                    c.steps, self.inner_steps
                ));
            }
        }
        if !(self.outer_lr.is_finite() && self.outer_lr > 0.0) {
            return usage("--outer-lr must be a positive number");
        }
        if !(0.0..1.0).contains(&self.outer_momentum) {
            return usage("--outer-momentum must be in [0, 1)");
        }
        if !(0.0..=1.0).contains(&self.drop_prob) {
            return usage("--drop-prob must be in [0, 1]");
        }
        let quantize: Quantization = self
            .quantize
            .parse()
            .map_err(|e| UsageError(format!("--quantize: {e}")))?;
        if let Some(f) = self.top_k {
            if !(f > 0.0 && f <= 1.0) {
                return usage(format!("--top-k {f}: give a fraction in (0, 1], e.g. 0.01"));
            }
            if self.mode == Mode::Dp {
                return usage("--top-k applies to DiLoCo's outer gradients, not --mode dp");
            }
        }
        Ok(SimulateConfig {
            top_k: self.top_k,
            mode: self.mode,
            replicas: self.replicas,
            inner_steps: self.inner_steps,
            steps: c.steps,
            outer: OuterConfig {
                lr: self.outer_lr,
                momentum: self.outer_momentum,
            },
            batch: c.batch,
            seq: c.seq,
            inner,
            quantize,
            drop_prob: self.drop_prob,
            seed: c.seed,
            model,
            eval_every: self.eval_every,
            eval_windows: c.eval_windows,
            shards: self.shards,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sim(args: &[&str]) -> Result<SimulateConfig, UsageError> {
        let mut v = vec!["diloco-node", "simulate"];
        v.extend_from_slice(args);
        match Cli::try_parse_from(v).unwrap().command {
            Command::Simulate(a) => a.to_config(),
            _ => unreachable!(),
        }
    }

    #[test]
    fn rejects_impossible_combinations_with_a_reason() {
        assert!(sim(&[]).is_ok());
        assert!(sim(&["--inner-steps", "0"])
            .unwrap_err()
            .0
            .contains("inner-steps"));
        assert!(sim(&["--steps", "10", "--inner-steps", "50"])
            .unwrap_err()
            .0
            .contains("less than"));
        assert!(sim(&["--replicas", "64", "--batch", "32"])
            .unwrap_err()
            .0
            .contains("more than --batch"));
        assert!(sim(&["--model", "gigantic"])
            .unwrap_err()
            .0
            .contains("unknown model"));
        assert!(sim(&["--seq", "1000"]).unwrap_err().0.contains("context"));
        assert!(sim(&["--quantize", "int3"])
            .unwrap_err()
            .0
            .contains("--quantize"));
        assert!(sim(&["--drop-prob", "2"]).is_err());
        assert!(sim(&["--mode", "dp", "--steps", "10", "--inner-steps", "50"]).is_ok());
    }
}
