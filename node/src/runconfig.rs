//! The run a node takes part in: everything every peer must agree on, and the run id.
//!
//! The run id is `blake3("diloco-run/1" ‖ canonical JSON of the [`RunConfig`] ‖ blake3 of the
//! training and eval data)`. Peers announce it (identify agent string, gossip topics, every
//! signed protocol message), so a peer started with another model, other hyperparameters or
//! other data never mixes into the run: it is refused with a log line saying why.
//!
//! A run config comes from `--run-config FILE` (JSON, unknown fields refused) and/or the
//! individual `join` flags; a flag given on the command line overrides the file.

use crate::train::data::Corpus;
use crate::train::flat::InitScheme;
use crate::train::inner::InnerConfig;
use crate::train::model::ModelConfig;
use diloco_protocol::averaging::{Admission, Config as ProtoConfig, Quorum, Rule};
use diloco_protocol::codec::Quantization;
use diloco_protocol::outer::OuterConfig;
use diloco_protocol::wire::{Hash, PeerKey};
use serde::{Deserialize, Serialize};
use std::path::Path;
use thiserror::Error;

/// A run configuration that cannot be used.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RunConfigError {
    /// The file could not be read.
    #[error("run config {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a valid run config.
    #[error("run config {path} is not valid: {reason}")]
    Parse {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// A value is out of range.
    #[error("run config: {0}")]
    Invalid(String),
}

/// Everything the peers of one run share.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Model: tiny, small, base or d<D>-l<L>-h<H>-c<C>.
    pub model: String,
    /// Inner steps per round H.
    pub inner_steps: u64,
    /// Rounds in the run (the inner learning rate decays over `rounds × H` steps; nodes stop
    /// after the last round).
    pub rounds: u64,
    /// Sequences per inner step on each peer.
    pub batch: usize,
    /// Sequence length in bytes.
    pub seq: usize,
    /// Peak inner learning rate.
    pub lr: f64,
    /// Linear warmup steps.
    pub warmup: u64,
    /// Inner AdamW weight decay.
    pub weight_decay: f64,
    /// Outer learning rate.
    pub outer_lr: f32,
    /// Outer Nesterov momentum.
    pub outer_momentum: f32,
    /// Outer-gradient codec: none, f16, bf16, int8, fp4.
    pub quantize: String,
    /// Seed of the initial parameters (data order is keyed by peer id).
    pub seed: u64,
    /// How the initial parameters are drawn: torch, gpt2, fanin or small.
    pub init: InitScheme,
    /// Biases in the MLP's linear layers.
    pub mlp_bias: bool,
    /// Decision quorum: majority or two-thirds.
    pub quorum: String,
    /// How shard owners combine the outer gradients: `norm-screen` (default: the leader drops
    /// contributors whose claimed norm exceeds 4× the median, owners drop shards larger than
    /// their claim, then the token-weighted mean; `norm-screen:F` for another factor),
    /// `trimmed-mean` (coordinate-wise, 20 % trimmed from each end; `trimmed-mean:T`) or
    /// `mean` (plain DiLoCo, trusts every member).
    pub aggregation: String,
    /// Who may become a member: `open` (anyone, a few newcomers a round), `allowlist` (only
    /// the peers in `allowlist`) or `invite` (those, and anyone whose JOIN carries an
    /// invitation a member signed with `diloco-node invite`). Left out of the run id when
    /// `open`.
    #[serde(skip_serializing_if = "is_open")]
    pub admission: String,
    /// Peer ids (libp2p `12D3Koo…` or 64 hex digits of the ed25519 key) for `allowlist` and
    /// `invite`: the only peers that may found the run and, under `allowlist`, join it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allowlist: Vec<String>,
    /// The run's operator (a peer id or 64 hex digits of an ed25519 key): the one key that may
    /// restart a round that lost its quorum with the members that survive
    /// (`diloco-node reconfig`). Empty: nobody can. Left out of the run id when empty.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub operator: String,
    /// Closer waits this long after the first READY for the others (ms).
    pub straggler_timeout_ms: u64,
    /// Aggregation deadline after CLOSE (ms).
    pub agg_timeout_ms: u64,
    /// Per-ballot failover timeout (ms).
    pub attempt_timeout_ms: u64,
    /// Retry period for fetches, sync and JOIN (ms).
    pub retry_ms: u64,
    /// Benchmarks only: when > 0, no model is trained; every round each peer contributes a
    /// random outer gradient of this many values, so a run measures averaging alone.
    pub synthetic_params: u64,
    /// Benchmarks only: how long a synthetic "training" phase lasts (ms), standing in for the
    /// H inner steps so joiners can follow the group.
    pub synthetic_train_ms: u64,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            model: "tiny".into(),
            inner_steps: 50,
            rounds: 1000,
            batch: 16,
            seq: 128,
            lr: 3e-3,
            warmup: 40,
            weight_decay: 0.1,
            outer_lr: 0.7,
            outer_momentum: 0.9,
            quantize: "int8".into(),
            seed: 0,
            init: InitScheme::default(),
            mlp_bias: true,
            quorum: "majority".into(),
            aggregation: "norm-screen".into(),
            admission: "open".into(),
            allowlist: Vec::new(),
            operator: String::new(),
            straggler_timeout_ms: 10_000,
            agg_timeout_ms: 10_000,
            attempt_timeout_ms: 30_000,
            retry_ms: 1_000,
            synthetic_params: 0,
            synthetic_train_ms: 0,
        }
    }
}

/// A validated run config with its derived settings.
#[derive(Debug, Clone)]
pub struct Run {
    /// As given.
    pub config: RunConfig,
    /// Parsed model.
    pub model: ModelConfig,
    /// Inner optimizer.
    pub inner: InnerConfig,
    /// Outer optimizer.
    pub outer: OuterConfig,
    /// Codec.
    pub quantize: Quantization,
    /// Quorum.
    pub quorum: Quorum,
    /// Aggregation rule.
    pub rule: Rule,
    /// Admission policy.
    pub admission: Admission,
    /// The operator key, if the run has one.
    pub operator: Option<PeerKey>,
    /// Run id.
    pub id: Hash,
    /// blake3 of the data.
    pub data_hash: String,
}

impl RunConfig {
    /// Reads a JSON run config.
    pub fn load(path: &Path) -> Result<Self, RunConfigError> {
        let p = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|source| RunConfigError::Io {
            path: p.clone(),
            source,
        })?;
        if meta.len() > 1 << 20 {
            return Err(RunConfigError::Parse {
                path: p,
                reason: "larger than 1 MiB".into(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(|source| RunConfigError::Io {
            path: p.clone(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|e| RunConfigError::Parse {
            path: p,
            reason: e.to_string(),
        })
    }

    /// Checks every value and derives the run (id included) for `corpus`.
    pub fn validate(&self, corpus: &Corpus) -> Result<Run, RunConfigError> {
        let bad = |m: String| Err(RunConfigError::Invalid(m));
        let mut model =
            ModelConfig::parse(&self.model).map_err(|e| RunConfigError::Invalid(e.to_string()))?;
        model.init = self.init;
        model.mlp_bias = self.mlp_bias;
        if self.inner_steps == 0 {
            return bad("inner_steps (H) must be at least 1".into());
        }
        if self.rounds == 0 {
            return bad("rounds must be at least 1".into());
        }
        if self.batch == 0 {
            return bad("batch must be at least 1".into());
        }
        if self.seq == 0 || self.seq > model.context {
            return bad(format!(
                "seq {} must be between 1 and the model's context ({})",
                self.seq, model.context
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr must be a positive number".into());
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("weight_decay must be zero or positive".into());
        }
        if !(self.outer_lr.is_finite() && self.outer_lr > 0.0) {
            return bad("outer_lr must be a positive number".into());
        }
        if !(0.0..1.0).contains(&self.outer_momentum) {
            return bad("outer_momentum must be in [0, 1)".into());
        }
        let quantize: Quantization = self
            .quantize
            .parse()
            .map_err(|e| RunConfigError::Invalid(format!("quantize: {e}")))?;
        let quorum = match self.quorum.as_str() {
            "majority" => Quorum::Majority,
            "two-thirds" => Quorum::TwoThirds,
            q => return bad(format!("quorum '{q}' is not one of: majority, two-thirds")),
        };
        let rule = parse_rule(&self.aggregation).map_err(RunConfigError::Invalid)?;
        let admission =
            parse_admission(&self.admission, &self.allowlist).map_err(RunConfigError::Invalid)?;
        let operator = match self.operator.trim() {
            "" => None,
            o => {
                Some(parse_peer(o).map_err(|e| RunConfigError::Invalid(format!("operator: {e}")))?)
            }
        };
        for (name, v) in [
            ("straggler_timeout_ms", self.straggler_timeout_ms),
            ("agg_timeout_ms", self.agg_timeout_ms),
            ("attempt_timeout_ms", self.attempt_timeout_ms),
            ("retry_ms", self.retry_ms),
        ] {
            if !(10..=3_600_000).contains(&v) {
                return bad(format!("{name} {v} must be between 10 and 3600000"));
            }
        }
        if self.synthetic_params > (1 << 30) {
            return bad("synthetic_params must be at most 2^30".into());
        }
        let data_hash = corpus.hash.clone();
        let canonical =
            serde_json::to_string(self).map_err(|e| RunConfigError::Invalid(e.to_string()))?;
        let id = Hash::of_parts(&[b"diloco-run/1", canonical.as_bytes(), data_hash.as_bytes()]);
        let total = self.rounds.saturating_mul(self.inner_steps);
        Ok(Run {
            config: self.clone(),
            inner: InnerConfig::new(self.lr, self.warmup, total, self.weight_decay),
            outer: OuterConfig {
                lr: self.outer_lr,
                momentum: self.outer_momentum,
            },
            model,
            quantize,
            quorum,
            rule,
            admission,
            operator,
            id,
            data_hash,
        })
    }
}

fn is_open(s: &str) -> bool {
    s == "open"
}

/// A peer id as users see it: libp2p's `12D3Koo…` text or 64 hex digits of the ed25519 key.
pub fn parse_peer(s: &str) -> Result<PeerKey, String> {
    let t = s.trim();
    if t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
        let mut k = [0u8; 32];
        hex::decode_to_slice(t, &mut k).map_err(|e| e.to_string())?;
        return Ok(PeerKey(k));
    }
    let id: libp2p::PeerId = t
        .parse()
        .map_err(|e| format!("'{t}' is not a peer id (12D3Koo… or 64 hex digits): {e}"))?;
    crate::net::peer::proto_peer(&id)
        .ok_or_else(|| format!("peer id '{t}' is not an ed25519 key, as every node's is"))
}

/// The admission policy named by `name` with the peers `list` (the run config's `admission`
/// and `allowlist`).
pub fn parse_admission(name: &str, list: &[String]) -> Result<Admission, String> {
    let mut keys = list
        .iter()
        .map(|s| parse_peer(s).map_err(|e| format!("allowlist: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    keys.sort();
    keys.dedup();
    match name {
        "open" if keys.is_empty() => Ok(Admission::Open),
        "open" => Err("an allowlist is only used with admission allowlist or invite".into()),
        "allowlist" | "invite" if keys.is_empty() => Err(format!(
            "admission {name} needs an allowlist: the peer ids that may found the run"
        )),
        "allowlist" => Ok(Admission::Allowlist(keys)),
        "invite" => Ok(Admission::Invite(keys)),
        a => Err(format!(
            "admission '{a}' is not one of: open, allowlist, invite"
        )),
    }
}

/// Reads an allowlist file: one peer id per line; blank lines and `#` comments ignored.
pub fn read_allowlist(path: &Path) -> Result<Vec<String>, RunConfigError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| RunConfigError::Io {
        path: p.clone(),
        source,
    })?;
    let ids: Vec<String> = text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    for id in &ids {
        parse_peer(id).map_err(|reason| RunConfigError::Parse {
            path: p.clone(),
            reason,
        })?;
    }
    Ok(ids)
}

/// The aggregation rule named by `s` (the run config's `aggregation`).
pub fn parse_rule(s: &str) -> Result<Rule, String> {
    let (name, arg) = match s.split_once(':') {
        Some((n, a)) => (n, Some(a)),
        None => (s, None),
    };
    let num = |a: Option<&str>, default: f32| -> Result<f32, String> {
        match a {
            None => Ok(default),
            Some(a) => a
                .parse::<f32>()
                .map_err(|_| format!("aggregation '{s}': '{a}' is not a number")),
        }
    };
    match name {
        "mean" if arg.is_none() => Ok(Rule::Mean),
        "norm-screen" => {
            let factor = num(arg, 4.0)?;
            if !(factor.is_finite() && factor >= 1.0) {
                return Err(format!("aggregation '{s}': the factor must be at least 1"));
            }
            Ok(Rule::NormScreen { factor })
        }
        "trimmed-mean" => {
            let trim = num(arg, 0.2)?;
            if !(trim > 0.0 && trim < 0.5) {
                return Err(format!(
                    "aggregation '{s}': the trimmed fraction must be above 0 and below 0.5"
                ));
            }
            Ok(Rule::TrimmedMean { trim })
        }
        _ => Err(format!(
            "aggregation '{s}' is not one of: norm-screen[:factor], trimmed-mean[:fraction], mean"
        )),
    }
}

/// The longest outer gradient an honest member can produce, which READYs may claim
/// (`diloco_protocol::averaging::Config::norm_cap`). An AdamW step (β2 ≥ β1², as here) moves a
/// coordinate by about `lr` at most for the gradient part, plus `lr · wd · |θ|` for the decay:
/// over H steps and N coordinates at most `H · lr · √N` for the first; four times that, and
/// room for the decay of weights up to 10 in size. A claim beyond it can only be a lie (or a
/// broken trainer) that would widen the owners' and leader's norm bounds.
pub fn norm_cap(inner_steps: u64, lr: f64, weight_decay: f64, len: usize) -> f32 {
    let gradient_part = inner_steps as f64 * lr * (len as f64).sqrt();
    (gradient_part * 4.0 * (1.0 + 10.0 * weight_decay)) as f32
}

impl Run {
    /// The run id as the hex string peers show and compare.
    pub fn id_hex(&self) -> String {
        hex::encode(&self.id.0[..16])
    }

    /// The averaging protocol's configuration for this run.
    pub fn protocol(&self, len: usize) -> ProtoConfig {
        let c = &self.config;
        let mut p = ProtoConfig::new(self.id, len);
        p.codec = self.quantize;
        p.outer = self.outer;
        p.quorum = self.quorum;
        p.rule = self.rule;
        p.admission = self.admission.clone();
        p.operator = self.operator;
        // A peer's weight is capped at what one honest round can process.
        p.token_cap = c.inner_steps * (c.batch * c.seq) as u64;
        p.norm_cap = norm_cap(c.inner_steps, c.lr, c.weight_decay, len);
        p.straggler_timeout = c.straggler_timeout_ms;
        p.agg_timeout = c.agg_timeout_ms;
        p.attempt_timeout = c.attempt_timeout_ms;
        p.retry = c.retry_ms;
        p
    }

    /// The settings stored in checkpoints and compared on restart.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "run_id": self.id_hex(),
            "config": self.config,
            "data": self.data_hash,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_norm_cap_is_above_what_adamw_can_move() {
        // Tiny model, the default H and lr: every coordinate moving by lr in every step, the
        // longest honest outer gradient, fits four times over.
        let (h, lr, wd, n) = (50, 1e-3, 0.1, 873_728);
        let cap = norm_cap(h, lr, wd, n);
        let longest = h as f64 * lr * (n as f64).sqrt();
        assert!(
            cap.is_finite() && f64::from(cap) >= 4.0 * longest,
            "{cap} vs {longest}"
        );
        assert_eq!(norm_cap(0, lr, wd, n), 0.0);
    }

    #[test]
    fn admission_policies_parse_and_say_what_is_wrong() {
        let a = "11".repeat(32);
        let b = "22".repeat(32);
        assert_eq!(parse_admission("open", &[]), Ok(Admission::Open));
        assert!(parse_admission("open", std::slice::from_ref(&a)).is_err());
        assert!(parse_admission("allowlist", &[])
            .unwrap_err()
            .contains("needs an allowlist"));
        assert_eq!(
            parse_admission("invite", &[b.clone(), a.clone(), a.clone()]),
            Ok(Admission::Invite(vec![
                PeerKey([0x11; 32]),
                PeerKey([0x22; 32])
            ]))
        );
        assert!(parse_admission("closed", &[])
            .unwrap_err()
            .contains("not one of"));
        assert!(parse_admission("allowlist", &["nope".into()])
            .unwrap_err()
            .contains("not a peer id"));
        let id = diloco_p2p::keys::Identity::from_secret([7; 32]);
        let key = parse_peer(&id.peer_id().to_string()).unwrap();
        assert_eq!(crate::net::peer::libp2p_peer(&key), Some(id.peer_id()));
    }

    #[test]
    fn an_open_run_keeps_its_run_id_and_a_policy_changes_it() {
        let open = serde_json::to_string(&RunConfig::default()).unwrap();
        assert!(!open.contains("admission") && !open.contains("allowlist"));
        let listed = RunConfig {
            admission: "allowlist".into(),
            allowlist: vec!["11".repeat(32)],
            ..RunConfig::default()
        };
        let text = serde_json::to_string(&listed).unwrap();
        assert!(text.contains("\"admission\":\"allowlist\"") && text.contains(&"11".repeat(32)));
    }

    #[test]
    fn aggregation_rules_parse_with_their_parameters() {
        assert_eq!(parse_rule("mean"), Ok(Rule::Mean));
        assert_eq!(
            parse_rule("norm-screen"),
            Ok(Rule::NormScreen { factor: 4.0 })
        );
        assert_eq!(
            parse_rule("norm-screen:2.5"),
            Ok(Rule::NormScreen { factor: 2.5 })
        );
        assert_eq!(
            parse_rule("trimmed-mean"),
            Ok(Rule::TrimmedMean { trim: 0.2 })
        );
        assert_eq!(
            parse_rule("trimmed-mean:0.1"),
            Ok(Rule::TrimmedMean { trim: 0.1 })
        );
        for bad in [
            "median",
            "mean:1",
            "norm-screen:0.5",
            "norm-screen:x",
            "trimmed-mean:0.5",
            "trimmed-mean:NaN",
            "",
        ] {
            let e = parse_rule(bad).unwrap_err();
            assert!(e.contains("aggregation"), "{bad}: {e}");
        }
        // The default is the screened mean, and it reaches the protocol.
        assert_eq!(RunConfig::default().aggregation, "norm-screen");
    }

    fn corpus(text: &[u8]) -> Corpus {
        Corpus {
            train: text.to_vec(),
            eval: text.to_vec(),
            source: "test".into(),
            hash: blake3::hash(text).to_hex().to_string(),
        }
    }

    #[test]
    fn run_id_depends_on_config_and_data() {
        let c = corpus(&[b'a'; 1000]);
        let a = RunConfig::default().validate(&c).unwrap();
        let b = RunConfig::default().validate(&c).unwrap();
        assert_eq!(a.id, b.id);
        let other = RunConfig {
            inner_steps: 20,
            ..RunConfig::default()
        };
        assert_ne!(other.validate(&c).unwrap().id, a.id);
        let d = corpus(&[b'b'; 1000]);
        assert_ne!(RunConfig::default().validate(&d).unwrap().id, a.id);
    }

    #[test]
    fn bad_values_are_named() {
        let c = corpus(&[b'a'; 1000]);
        let e = |rc: RunConfig| rc.validate(&c).unwrap_err().to_string();
        assert!(e(RunConfig {
            inner_steps: 0,
            ..Default::default()
        })
        .contains("inner_steps"));
        assert!(e(RunConfig {
            model: "huge".into(),
            ..Default::default()
        })
        .contains("unknown model"));
        assert!(e(RunConfig {
            quantize: "int3".into(),
            ..Default::default()
        })
        .contains("quantize"));
        assert!(e(RunConfig {
            quorum: "all".into(),
            ..Default::default()
        })
        .contains("quorum"));
        assert!(e(RunConfig {
            seq: 4096,
            ..Default::default()
        })
        .contains("context"));
    }

    #[test]
    fn files_refuse_unknown_fields() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("run.json");
        std::fs::write(&p, r#"{"model":"tiny","inner_step":5}"#).unwrap();
        let e = RunConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("inner_step"), "{e}");
        std::fs::write(&p, r#"{"model":"tiny","inner_steps":5}"#).unwrap();
        let rc = RunConfig::load(&p).unwrap();
        assert_eq!(rc.inner_steps, 5);
        assert_eq!(rc.batch, RunConfig::default().batch);
    }
}
