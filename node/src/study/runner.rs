//! Runs a grid: each missing run as a child `diloco-node simulate` process (several at once,
//! each told how many threads it may use), each finished run appended to a results file as one
//! JSON line, with a progress bar over the runs.
//!
//! Child processes keep runs apart (one run's memory or crash cannot touch another) and make a
//! result exactly what `simulate` prints for the same flags, so any row can be re-run by hand.
//! A run counts only when its report has all its steps: Ctrl+C (which reaches the children
//! too) ends the study at the children's next round boundary without recording partial runs,
//! and running the same command again makes only what is missing. With `check` it re-makes
//! runs that are already recorded and compares the numbers instead of appending them.

use crate::study::grid::{Grid, RunSpec};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use thiserror::Error;

/// Longest results line read back (a line with a long eval history is a few kB).
const MAX_LINE: usize = 4 << 20;

/// Errors running a study.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StudyError {
    /// The results file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// A report was asked of results files holding no result.
    #[error("no results in {0}: run `diloco-node study run GRID` first")]
    NoResults(PathBuf),
    /// A plot could not be written.
    #[error(transparent)]
    Plot(#[from] crate::study::plot::PlotError),
    /// A line of the results file is not a result this tool wrote.
    #[error("{path}:{line}: not a result line ({why}); fix or remove that line")]
    BadLine {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What was wrong.
        why: String,
    },
}

/// How to run a study.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The `diloco-node` binary for the child runs.
    pub bin: PathBuf,
    /// Training text given to every run.
    pub data: PathBuf,
    /// Runs at once.
    pub jobs: usize,
    /// Threads each run may use (`--threads` of the child).
    pub threads: usize,
    /// Compute backend of the runs.
    pub backend: String,
    /// Results file (JSON lines, appended).
    pub out: PathBuf,
    /// Folder for each run's log (stderr of the child).
    pub logs: PathBuf,
    /// Re-make the runs already in `out` and compare them with their lines (nothing is
    /// appended); runs not yet recorded are left out.
    pub check: bool,
}

/// What a study run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Runs left out: already in the results file (with `check`: not in it yet).
    pub skipped: usize,
    /// Runs made and recorded now.
    pub done: usize,
    /// Runs that failed (their logs say why).
    pub failed: usize,
    /// Runs stopped by Ctrl+C before they finished (not recorded).
    pub interrupted: usize,
    /// With `check`: re-made runs whose numbers equal their recorded line.
    pub same: usize,
    /// With `check`: re-made runs whose numbers differ from their recorded line.
    pub different: usize,
}

/// The numbers a re-made run must repeat: the final eval loss, the eval history, the final
/// parameters' hash, steps and tokens (not wall time, threads or commit). `Err` says what
/// differs.
pub fn compare(recorded: &Value, now: &Value) -> Result<(), String> {
    let mut diffs = Vec::new();
    for field in [
        "eval_loss",
        "global_hash",
        "eval_history",
        "steps",
        "tokens",
    ] {
        if recorded.get(field) != now.get(field) {
            let show = |v: &Value| match v.get(field) {
                Some(Value::Array(a)) => format!("{} points", a.len()),
                Some(x) => x.to_string(),
                None => "none".into(),
            };
            diffs.push(format!(
                "{field}: recorded {}, now {}",
                show(recorded),
                show(now)
            ));
        }
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(diffs.join("; "))
    }
}

/// Reads every result line of `path` (none when it does not exist yet).
pub fn load(path: &Path) -> Result<Vec<Value>, StudyError> {
    let io = |source| StudyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(e)),
    };
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(io)?;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |why: String| StudyError::BadLine {
            path: path.to_path_buf(),
            line: i + 1,
            why,
        };
        if line.len() > MAX_LINE {
            return Err(bad(format!("longer than {MAX_LINE} bytes")));
        }
        let v: Value = serde_json::from_str(&line).map_err(|e| bad(e.to_string()))?;
        for field in ["key", "config_key", "mode", "eval_loss"] {
            if v.get(field).is_none() {
                return Err(bad(format!("no '{field}'")));
            }
        }
        out.push(v);
    }
    Ok(out)
}

/// The commit of the source tree in the current directory (`+dirty` when it has uncommitted
/// changes), or `unknown` outside a git checkout.
pub fn git_commit() -> String {
    let run = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .stderr(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match run(&["rev-parse", "--short=12", "HEAD"]) {
        Some(c) => match run(&["status", "--porcelain", "--untracked-files=no"]) {
            Some(s) if !s.is_empty() => format!("{c}+dirty"),
            _ => c,
        },
        None => "unknown".into(),
    }
}

/// Turns a child's `simulate --json` report into a result line.
pub fn result_line(
    grid: &str,
    spec: &RunSpec,
    report: &Value,
    threads: usize,
    commit: &str,
    data: &Path,
) -> Option<Value> {
    let cfg = report.get("config")?;
    let batch = cfg.get("batch")?.as_u64()?;
    let seq = cfg.get("seq")?.as_u64()?;
    let mode = cfg.get("mode")?.as_str()?;
    let history: Vec<Value> = report
        .get("eval_history")?
        .as_array()?
        .iter()
        .filter_map(|p| {
            let step = p.get("step")?.as_u64()?;
            Some(json!({
                "step": step,
                "tokens": step * batch * seq,
                "eval_loss": p.get("eval_loss")?,
            }))
        })
        .collect();
    let steps = report.get("steps")?.as_u64()?;
    let inner = cfg.get("inner")?;
    let model = cfg.get("model")?;
    Some(json!({
        "grid": grid,
        "key": spec.key(),
        "config_key": spec.config_key(),
        "seed": spec.seed,
        "mode": mode,
        "replicas": cfg.get("replicas")?,
        "inner_steps": if mode == "dp" { json!(1) } else { cfg.get("inner_steps")?.clone() },
        "outer_lr": if mode == "dp" { Value::Null } else { cfg.get("outer")?.get("lr")?.clone() },
        "outer_momentum": if mode == "dp" { Value::Null } else { cfg.get("outer")?.get("momentum")?.clone() },
        "batch": batch,
        "seq": seq,
        "steps": steps,
        "lr": inner.get("lr")?,
        "warmup": inner.get("warmup")?,
        "weight_decay": inner.get("weight_decay")?,
        "codec": report.get("quantize")?,
        "drop_prob": cfg.get("drop_prob")?,
        "shards": cfg.get("shards")?,
        "model": format!(
            "d{}-l{}-h{}-c{}",
            model.get("d_model")?, model.get("n_layers")?, model.get("n_heads")?, model.get("context")?
        ),
        "params": report.get("params")?,
        "eval_loss": report.get("eval_loss")?,
        "train_loss": report.get("train_loss")?,
        "eval_history": history,
        "tokens": steps * batch * seq,
        "bytes": report.get("bytes_sent_per_replica")?,
        "wall_s": report.get("elapsed_s")?,
        "tokens_per_s": report.get("tokens_per_s")?,
        "overhead_s_per_round": report.get("overhead_s_per_round").cloned().unwrap_or(Value::Null),
        "global_hash": report.get("global_hash")?,
        "threads": threads,
        "git_commit": commit,
        "data": data.display().to_string(),
        "finished_unix": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    }))
}

/// A file name for a run's log: its key, with everything but letters, digits, `.`, `-` and
/// `=` turned into `_`, and a short hash so long keys stay distinct when cut.
fn log_name(spec: &RunSpec) -> String {
    let key = spec.key();
    let safe: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-.=".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(150)
        .collect();
    let hash = blake3::hash(key.as_bytes()).to_hex();
    format!("{safe}-{}.log", &hash[..8])
}

enum Outcome {
    Done(Value),
    Interrupted,
    Failed(String),
}

fn run_one(opts: &RunOptions, grid: &str, spec: &RunSpec, commit: &str) -> Outcome {
    let log_path = opts.logs.join(log_name(spec));
    let log = match std::fs::File::create(&log_path) {
        Ok(f) => f,
        Err(e) => return Outcome::Failed(format!("creating {}: {e}", log_path.display())),
    };
    let mut cmd = Command::new(&opts.bin);
    cmd.arg("--threads")
        .arg(opts.threads.to_string())
        .arg("simulate")
        .args(spec.args())
        .arg("--data")
        .arg(&opts.data)
        .arg("--json")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
    if !spec.flags.contains_key("backend") {
        cmd.args(["--backend", &opts.backend]);
    }
    let out = match cmd.output() {
        Ok(o) => o,
        Err(e) => return Outcome::Failed(format!("starting {}: {e}", opts.bin.display())),
    };
    let failed = |why: &str| Outcome::Failed(format!("{why} (log: {})", log_path.display()));
    if !out.status.success() {
        return failed(&format!("simulate exited with {}", out.status));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let Some(report) = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
    else {
        return failed("simulate printed no JSON report");
    };
    let wanted = report.pointer("/config/steps").and_then(Value::as_u64);
    if wanted.is_none() || report.get("steps").and_then(Value::as_u64) != wanted {
        return Outcome::Interrupted;
    }
    match result_line(grid, spec, &report, opts.threads, commit, &opts.data) {
        Some(mut line) => {
            let backend = spec
                .flags
                .get("backend")
                .and_then(Value::as_str)
                .unwrap_or(&opts.backend);
            line["backend"] = json!(backend);
            Outcome::Done(line)
        }
        None => failed("simulate's report lacks fields this harness needs"),
    }
}

/// Runs every run of `grid` not yet in `opts.out` (with `opts.check`: every run that is, and
/// compares); `stop` (Ctrl+C) ends it after the runs in flight.
pub fn run(grid: &Grid, opts: &RunOptions, stop: &AtomicBool) -> Result<Summary, StudyError> {
    let recorded: HashMap<String, Value> = load(&opts.out)?
        .into_iter()
        .filter_map(|v| Some((v.get("key")?.as_str()?.to_string(), v)))
        .collect();
    let pending: VecDeque<RunSpec> = grid
        .runs
        .iter()
        .filter(|r| recorded.contains_key(&r.key()) == opts.check)
        .cloned()
        .collect();
    let summary = Summary {
        skipped: grid.runs.len() - pending.len(),
        ..Summary::default()
    };
    std::fs::create_dir_all(&opts.logs).map_err(|source| StudyError::Io {
        path: opts.logs.clone(),
        source,
    })?;
    if let Some(dir) = opts.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| StudyError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    tracing::info!(
        grid = %grid.name,
        runs = grid.runs.len(),
        left_out = summary.skipped,
        to_run = pending.len(),
        check = opts.check,
        jobs = opts.jobs,
        threads_per_run = opts.threads,
        "study"
    );
    if pending.is_empty() {
        return Ok(summary);
    }
    let commit = git_commit();
    let bar = ProgressBar::new(pending.len() as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "[{elapsed_precise}] {bar:30.cyan/blue} run {pos}/{len} (eta {eta}) {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let queue = Mutex::new(pending);
    let state = Mutex::new((summary.clone(), None::<StudyError>));
    std::thread::scope(|s| {
        for _ in 0..opts.jobs.max(1) {
            s.spawn(|| loop {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let Some(spec) = queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front()
                else {
                    return;
                };
                bar.set_message(spec.config_key());
                let outcome = run_one(opts, &grid.name, &spec, &commit);
                let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
                match outcome {
                    Outcome::Done(line) if opts.check => {
                        let key = spec.key();
                        let verdict = recorded
                            .get(&key)
                            .map_or(Err("not recorded".to_string()), |r| compare(r, &line));
                        match verdict {
                            Ok(()) => {
                                st.0.same += 1;
                                bar.println(format!(
                                    "same: {key} -> eval loss {}, hash {}",
                                    line["eval_loss"], line["global_hash"]
                                ));
                                if bar.is_hidden() {
                                    tracing::info!(run = %key, eval_loss = %line["eval_loss"], "re-made run repeats its recorded line");
                                }
                            }
                            Err(why) => {
                                st.0.different += 1;
                                bar.println(format!("DIFFERENT: {key}: {why}"));
                                tracing::error!(run = %key, "re-made run differs from its recorded line: {why}");
                            }
                        }
                    }
                    Outcome::Done(line) => {
                        let loss = line["eval_loss"].as_f64().unwrap_or(f64::NAN);
                        if let Err(e) = append(&opts.out, &line) {
                            st.1.get_or_insert(e);
                            stop.store(true, Ordering::Relaxed);
                            return;
                        }
                        st.0.done += 1;
                        bar.println(format!("done: {} -> eval loss {loss:.4}", spec.key()));
                        if bar.is_hidden() {
                            tracing::info!(run = %spec.key(), eval_loss = loss, done = st.0.done, "run finished");
                        }
                    }
                    Outcome::Interrupted => st.0.interrupted += 1,
                    Outcome::Failed(why) => {
                        st.0.failed += 1;
                        tracing::error!(run = %spec.key(), "{why}");
                    }
                }
                bar.inc(1);
            });
        }
    });
    bar.finish_and_clear();
    let (summary, err) = state.into_inner().unwrap_or_else(|p| p.into_inner());
    match err {
        Some(e) => Err(e),
        None => Ok(summary),
    }
}

/// Appends one line and syncs it, so a crash loses at most the run in flight.
fn append(path: &Path, line: &Value) -> Result<(), StudyError> {
    let io = |source| StudyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io)?;
    let mut text = serde_json::to_string(line).unwrap_or_default();
    text.push('\n');
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_data().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::study::grid;

    fn report(steps: u64) -> Value {
        json!({
            "steps": steps, "params": 10, "eval_loss": 2.5, "train_loss": 2.4,
            "quantize": "int8", "bytes_sent_per_replica": 100, "elapsed_s": 1.5,
            "tokens_per_s": 1000.0, "global_hash": "ab",
            "eval_history": [{"step": 10, "eval_loss": 3.0}, {"step": steps, "eval_loss": 2.5}],
            "config": {"mode": "diloco", "replicas": 2, "inner_steps": 5, "steps": 20,
                "outer": {"lr": 0.6, "momentum": 0.9}, "batch": 4, "seq": 8,
                "inner": {"lr": 0.003, "warmup": 2, "weight_decay": 0.1}, "drop_prob": 0.0,
                "shards": "iid", "model": {"d_model": 8, "n_layers": 1, "n_heads": 1, "context": 8}}
        })
    }

    #[test]
    fn a_check_compares_loss_history_hash_and_length_and_nothing_else() {
        let g = grid::parse(r#"{"base": {"replicas": 2}}"#).unwrap();
        let line = result_line("g", &g.runs[0], &report(20), 1, "abc", Path::new("d")).unwrap();
        let mut later = line.clone();
        later["wall_s"] = json!(99.0);
        later["git_commit"] = json!("def");
        later["threads"] = json!(4);
        assert_eq!(compare(&line, &later), Ok(()));
        for (field, v) in [
            ("eval_loss", json!(2.6)),
            ("global_hash", json!("cd")),
            ("eval_history", json!([])),
            ("steps", json!(21)),
            ("tokens", json!(1)),
        ] {
            let mut other = line.clone();
            other[field] = v;
            let why = compare(&line, &other).unwrap_err();
            assert!(why.starts_with(field), "{field}: {why}");
        }
    }

    #[test]
    fn a_report_becomes_a_line_with_the_named_fields() {
        let g = grid::parse(r#"{"base": {"replicas": 2}}"#).unwrap();
        let line = result_line("g", &g.runs[0], &report(20), 1, "abc", Path::new("d")).unwrap();
        for f in [
            "mode",
            "replicas",
            "inner_steps",
            "outer_lr",
            "batch",
            "steps",
            "seed",
            "codec",
            "eval_loss",
            "eval_history",
            "tokens",
            "bytes",
            "wall_s",
            "git_commit",
        ] {
            assert!(!line[f].is_null(), "{f} missing in {line}");
        }
        assert_eq!(line["tokens"], json!(20 * 4 * 8));
        assert_eq!(line["eval_history"][0]["tokens"], json!(10 * 4 * 8));
        let mut r = report(20);
        r["config"].as_object_mut().unwrap().remove("batch");
        assert!(result_line("g", &g.runs[0], &r, 1, "abc", Path::new("d")).is_none());
    }

    #[test]
    fn results_round_trip_and_bad_lines_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.jsonl");
        assert!(load(&path).unwrap().is_empty());
        let g = grid::parse(r#"{"base": {"replicas": 2}}"#).unwrap();
        let line = result_line("g", &g.runs[0], &report(20), 1, "abc", Path::new("d")).unwrap();
        append(&path, &line).unwrap();
        append(&path, &line).unwrap();
        assert_eq!(load(&path).unwrap().len(), 2);
        std::fs::write(&path, "{\"key\": 1}\n").unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains(":1: not a result line (no 'config_key')"), "{e}");
    }

    #[test]
    fn log_names_are_safe_and_distinct() {
        let g = grid::parse(r#"{"base": {"quantize": ["a/b", "a_b"]}}"#).unwrap();
        let (a, b) = (log_name(&g.runs[0]), log_name(&g.runs[1]));
        assert_ne!(a, b);
        assert!(!a.contains('/') && !a.contains(' '));
    }
}
