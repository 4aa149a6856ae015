//! Grid files: which `simulate` runs a study is made of.
//!
//! A grid is a JSON object:
//!
//! ```json
//! {
//!   "name": "chinchilla-tiny",
//!   "base": { "model": "tiny", "steps": 8000, "warmup": 200, "inner_steps": 20 },
//!   "seeds": [0, 1],
//!   "runs": [
//!     { "mode": "dp" },
//!     { "mode": "diloco", "replicas": 1, "outer_lr": 0.4 },
//!     { "mode": "diloco", "replicas": [2, 4], "outer_lr": 0.6 }
//!   ]
//! }
//! ```
//!
//! Every key is a `simulate` flag (underscores for dashes); `backend` (e.g. `"native"`) overrides
//! the study's `--backend` for those runs and, being in the key, keeps them apart from runs of
//! the same settings on another backend. Each entry of `runs` is laid over
//! `base`; a list value is an axis, and an entry expands into the cartesian product of its axes,
//! each run once per seed. `tokens` may stand for `steps` (steps = tokens / (batch × seq)).
//! A run is identified by its [`RunSpec::key`], the canonical flag list, so results of a grid
//! that grows (more seeds, more rows) are kept and only the missing runs are made.

use serde_json::{Map, Value};
use std::collections::BTreeMap;
use thiserror::Error;

/// Keys a grid may set: `simulate`'s flags, and `tokens`.
pub const KEYS: &[&str] = &[
    "model",
    "mode",
    "replicas",
    "inner_steps",
    "outer_lr",
    "outer_momentum",
    "quantize",
    "drop_prob",
    "top_k",
    "eval_every",
    "eval_windows",
    "shards",
    "steps",
    "tokens",
    "batch",
    "seq",
    "lr",
    "warmup",
    "weight_decay",
    "init",
    "mlp_bias",
    "backend",
];

/// Defaults of `simulate` the expansion needs to turn `tokens` into `steps`.
const DEFAULT_BATCH: u64 = 16;
const DEFAULT_SEQ: u64 = 128;

/// Most runs one grid may expand to (a typo such as a long list should fail, not run for days).
pub const MAX_RUNS: usize = 10_000;

/// A grid file that cannot be used.
#[derive(Debug, Error, PartialEq)]
#[non_exhaustive]
pub enum GridError {
    /// Not JSON, or not the shape described in the module docs.
    #[error("grid file: {0}")]
    Shape(String),
    /// A key that is not a `simulate` flag.
    #[error("grid file: unknown key '{key}' in {place}; known keys: {known}")]
    UnknownKey {
        /// The key.
        key: String,
        /// `base` or `runs[i]`.
        place: String,
        /// The keys allowed.
        known: String,
    },
    /// A value of the wrong type.
    #[error("grid file: '{key}' in {place} must be a number, a string or true/false (or a list of them), not {got}")]
    BadValue {
        /// The key.
        key: String,
        /// `base` or `runs[i]`.
        place: String,
        /// What was there.
        got: String,
    },
    /// Too many runs, or none.
    #[error("grid file: {0}")]
    Size(String),
}

/// One run of a grid: a flag set and a seed.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSpec {
    /// Flag → value (without the seed), sorted by flag.
    pub flags: BTreeMap<String, Value>,
    /// Seed.
    pub seed: u64,
}

impl RunSpec {
    /// The configuration without the seed, canonical: `k=v` pairs sorted by key. Runs that
    /// differ only in their seed share it; it names a row of the report.
    pub fn config_key(&self) -> String {
        self.flags
            .iter()
            .map(|(k, v)| format!("{k}={}", scalar(v)))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Identity of this run in a results file: the config key and the seed.
    pub fn key(&self) -> String {
        format!("{} seed={}", self.config_key(), self.seed)
    }

    /// Whether every `k=v` term of `terms` (whitespace-separated, as in [`RunSpec::key`], e.g.
    /// `replicas=2 seed=0`) is a pair of this run's key.
    pub fn matches(&self, terms: &str) -> bool {
        let key = self.key();
        let pairs: Vec<&str> = key.split(' ').collect();
        terms.split_whitespace().all(|t| pairs.contains(&t))
    }

    /// The `simulate` arguments of this run (without `--data`, `--json` and `--threads`).
    pub fn args(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (k, v) in &self.flags {
            out.push(format!("--{}", k.replace('_', "-")));
            out.push(scalar(v));
        }
        out.push("--seed".into());
        out.push(self.seed.to_string());
        out
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A parsed grid.
#[derive(Debug, Clone, PartialEq)]
pub struct Grid {
    /// Name of the study (goes into every result line).
    pub name: String,
    /// Every run, in file order (runs of one entry, then seeds innermost).
    pub runs: Vec<RunSpec>,
}

fn check_object(obj: &Map<String, Value>, place: &str) -> Result<(), GridError> {
    for (k, v) in obj {
        if !KEYS.contains(&k.as_str()) {
            return Err(GridError::UnknownKey {
                key: k.clone(),
                place: place.into(),
                known: KEYS.join(", "),
            });
        }
        let ok = |x: &Value| matches!(x, Value::Number(_) | Value::String(_) | Value::Bool(_));
        let good = match v {
            Value::Array(xs) => !xs.is_empty() && xs.iter().all(ok),
            x => ok(x),
        };
        if !good {
            return Err(GridError::BadValue {
                key: k.clone(),
                place: place.into(),
                got: v.to_string(),
            });
        }
    }
    Ok(())
}

/// Parses a grid from JSON text.
pub fn parse(text: &str) -> Result<Grid, GridError> {
    let root: Value =
        serde_json::from_str(text).map_err(|e| GridError::Shape(format!("not JSON: {e}")))?;
    let root = root
        .as_object()
        .ok_or_else(|| GridError::Shape("the top level must be an object".into()))?;
    for k in root.keys() {
        if !["name", "base", "seeds", "runs"].contains(&k.as_str()) {
            return Err(GridError::Shape(format!(
                "unknown top-level key '{k}' (use name, base, seeds, runs)"
            )));
        }
    }
    let name = match root.get("name") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        None => "study".into(),
        Some(_) => return Err(GridError::Shape("'name' must be a non-empty string".into())),
    };
    let empty = Map::new();
    let base = match root.get("base") {
        Some(Value::Object(o)) => o,
        None => &empty,
        Some(_) => return Err(GridError::Shape("'base' must be an object".into())),
    };
    check_object(base, "base")?;
    let seeds: Vec<u64> = match root.get("seeds") {
        None => vec![0],
        Some(Value::Array(xs)) if !xs.is_empty() => xs
            .iter()
            .map(|x| {
                x.as_u64().ok_or_else(|| {
                    GridError::Shape(format!("seeds must be non-negative integers, not {x}"))
                })
            })
            .collect::<Result<_, _>>()?,
        Some(Value::Number(n)) if n.is_u64() => vec![n.as_u64().unwrap_or(0)],
        Some(x) => {
            return Err(GridError::Shape(format!(
                "'seeds' must be a non-empty list of integers, not {x}"
            )))
        }
    };
    let entries: Vec<&Map<String, Value>> = match root.get("runs") {
        None => vec![&empty],
        Some(Value::Array(xs)) if !xs.is_empty() => xs
            .iter()
            .enumerate()
            .map(|(i, x)| {
                x.as_object()
                    .ok_or_else(|| GridError::Shape(format!("runs[{i}] must be an object")))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(GridError::Shape(
                "'runs' must be a non-empty list of objects".into(),
            ))
        }
    };
    let mut runs = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        check_object(entry, &format!("runs[{i}]"))?;
        let mut merged = base.clone();
        for (k, v) in entry.iter() {
            merged.insert(k.clone(), v.clone());
        }
        for flags in expand(&merged) {
            let flags = resolve_tokens(flags, i)?;
            for &seed in &seeds {
                runs.push(RunSpec {
                    flags: flags.clone(),
                    seed,
                });
                if runs.len() > MAX_RUNS {
                    return Err(GridError::Size(format!(
                        "more than {MAX_RUNS} runs; split the grid"
                    )));
                }
            }
        }
    }
    // The same run listed twice (e.g. by two overlapping entries) is made once.
    let mut seen = std::collections::HashSet::new();
    runs.retain(|r| seen.insert(r.key()));
    Ok(Grid { name, runs })
}

/// Cartesian product of the list-valued keys of `obj`.
fn expand(obj: &Map<String, Value>) -> Vec<BTreeMap<String, Value>> {
    let mut out = vec![BTreeMap::new()];
    for (k, v) in obj {
        let values: Vec<Value> = match v {
            Value::Array(xs) => xs.clone(),
            x => vec![x.clone()],
        };
        out = out
            .into_iter()
            .flat_map(|partial| {
                values.iter().map(move |x| {
                    let mut p = partial.clone();
                    p.insert(k.clone(), x.clone());
                    p
                })
            })
            .collect();
    }
    out
}

/// Turns `tokens` into `steps` for one expanded run.
fn resolve_tokens(
    mut flags: BTreeMap<String, Value>,
    entry: usize,
) -> Result<BTreeMap<String, Value>, GridError> {
    let Some(tokens) = flags.remove("tokens") else {
        return Ok(flags);
    };
    if flags.contains_key("steps") {
        return Err(GridError::Shape(format!(
            "runs[{entry}]: give 'steps' or 'tokens', not both"
        )));
    }
    let num = |k: &str, default: u64| -> Result<u64, GridError> {
        match flags.get(k) {
            None => Ok(default),
            Some(v) => v.as_u64().filter(|&x| x > 0).ok_or_else(|| {
                GridError::Shape(format!("runs[{entry}]: '{k}' must be a positive integer"))
            }),
        }
    };
    let per_step = num("batch", DEFAULT_BATCH)? * num("seq", DEFAULT_SEQ)?;
    let tokens = tokens.as_u64().filter(|&t| t >= per_step).ok_or_else(|| {
        GridError::Shape(format!(
            "runs[{entry}]: 'tokens' must be an integer of at least batch × seq = {per_step}"
        ))
    })?;
    flags.insert("steps".into(), Value::from(tokens / per_step));
    Ok(flags)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EXAMPLE: &str = r#"{
        "name": "t",
        "base": {"model": "tiny", "steps": 100, "inner_steps": 20},
        "seeds": [0, 1],
        "runs": [
            {"mode": "dp"},
            {"mode": "diloco", "replicas": 1, "outer_lr": 0.4},
            {"mode": "diloco", "replicas": [2, 4], "outer_lr": 0.6}
        ]
    }"#;

    #[test]
    fn only_terms_select_the_runs_whose_key_has_every_pair() {
        let g = parse(EXAMPLE).unwrap();
        let picked = |t: &str| g.runs.iter().filter(|r| r.matches(t)).count();
        assert_eq!(picked(""), 8);
        assert_eq!(picked("seed=0"), 4);
        assert_eq!(picked("replicas=2 seed=1"), 1);
        assert_eq!(picked("  mode=dp   seed=1 "), 1);
        // Whole pairs only: `replicas=4` is not `replicas=40`, `seed=1` not `seed=10`.
        assert_eq!(picked("replicas=40"), 0);
        assert_eq!(picked("replicas"), 0);
        assert_eq!(picked("mode=dp mode=diloco"), 0);
    }

    #[test]
    fn entries_expand_over_axes_and_seeds() {
        let g = parse(EXAMPLE).unwrap();
        assert_eq!(g.name, "t");
        assert_eq!(g.runs.len(), 8);
        let keys: Vec<String> = g.runs.iter().map(RunSpec::key).collect();
        assert_eq!(
            keys[0],
            "inner_steps=20 mode=dp model=tiny steps=100 seed=0"
        );
        assert!(keys.contains(
            &"inner_steps=20 mode=diloco model=tiny outer_lr=0.6 replicas=4 steps=100 seed=1"
                .to_string()
        ));
        assert_eq!(
            g.runs[2].args(),
            [
                "--inner-steps",
                "20",
                "--mode",
                "diloco",
                "--model",
                "tiny",
                "--outer-lr",
                "0.4",
                "--replicas",
                "1",
                "--steps",
                "100",
                "--seed",
                "0"
            ]
        );
    }

    #[test]
    fn tokens_become_steps() {
        let g = parse(r#"{"base": {"tokens": 16384000, "batch": 16, "seq": 128}}"#).unwrap();
        assert_eq!(g.runs[0].flags["steps"], Value::from(8000));
        assert!(!g.runs[0].flags.contains_key("tokens"));
        assert!(parse(r#"{"base": {"tokens": 100, "steps": 5}}"#).is_err());
        assert!(parse(r#"{"base": {"tokens": 10}}"#).is_err());
    }

    #[test]
    fn bad_grids_say_what_is_wrong() {
        let e = parse(r#"{"base": {"outer-lr": 1}}"#).unwrap_err();
        assert!(
            e.to_string().contains("unknown key 'outer-lr' in base"),
            "{e}"
        );
        let e = parse(r#"{"runs": [{"mode": {"x": 1}}]}"#).unwrap_err();
        assert!(e.to_string().contains("'mode' in runs[0]"), "{e}");
        assert!(parse("[1]").is_err());
        assert!(parse("{").unwrap_err().to_string().contains("not JSON"));
        assert!(parse(r#"{"seeds": [-1]}"#).is_err());
        assert!(parse(r#"{"runs": []}"#).is_err());
        assert!(parse(r#"{"base": {"replicas": []}}"#).is_err());
        assert!(parse(r#"{"extra": 1}"#).is_err());
        let big = format!(
            r#"{{"base": {{"seq": {:?}}}}}"#,
            (0..20_000).collect::<Vec<_>>()
        );
        assert!(matches!(parse(&big), Err(GridError::Size(_))));
    }

    #[test]
    fn a_backend_key_is_part_of_the_run_and_its_flags() {
        let g = parse(
            r#"{"base": {"mode": "dp"}, "runs": [{"backend": "native"}, {"backend": "cpu"}, {}]}"#,
        )
        .unwrap();
        assert_eq!(g.runs.len(), 3, "three distinct runs: {:?}", g.runs);
        assert!(g.runs[0].key().contains("backend=native"));
        let args = g.runs[0].args();
        let at = args.iter().position(|a| a == "--backend").unwrap();
        assert_eq!(args[at + 1], "native");
        assert!(!g.runs[2].args().contains(&"--backend".to_string()));
    }

    #[test]
    fn duplicate_runs_are_made_once() {
        let g = parse(r#"{"runs": [{"mode": "dp"}, {"mode": ["dp", "diloco"]}]}"#).unwrap();
        assert_eq!(g.runs.len(), 2);
    }

    proptest! {
        // The number of runs is the product of the axis lengths times the seeds, and every run's
        // key is distinct and parses back into its own flags.
        #[test]
        fn expansion_is_the_cartesian_product(
            a in prop::collection::btree_set(1u64..50, 1..4),
            b in prop::collection::btree_set(0u64..9, 1..4),
            seeds in prop::collection::btree_set(0u64..100, 1..4),
        ) {
            let text = format!(
                r#"{{"base": {{"replicas": {:?}, "inner_steps": {:?}}}, "seeds": {:?}}}"#,
                a.iter().collect::<Vec<_>>(), b.iter().collect::<Vec<_>>(),
                seeds.iter().collect::<Vec<_>>(),
            );
            let g = parse(&text).unwrap();
            prop_assert_eq!(g.runs.len(), a.len() * b.len() * seeds.len());
            let keys: std::collections::HashSet<String> = g.runs.iter().map(RunSpec::key).collect();
            prop_assert_eq!(keys.len(), g.runs.len());
            for r in &g.runs {
                let args = r.args();
                prop_assert_eq!(args.len(), 2 * (r.flags.len() + 1));
            }
        }
    }
}
