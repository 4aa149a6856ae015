//! A study's report: result lines grouped by configuration (seeds pooled), mean ± standard
//! deviation of the final eval loss, the change against data-parallel at equal settings, and a
//! markdown table; the plots are [`crate::study::plot`]'s.
//!
//! A DiLoCo row is compared with the data-parallel row that shares its model, steps, global
//! batch, sequence length, inner learning rate, warmup, weight decay, shards and backend (a DP
//! run's replica count does not change what it computes, so it is not part of the match).

use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write;

/// Fields that make two runs' settings "equal" for the comparison with DP.
const BASELINE_FIELDS: &[&str] = &[
    "model",
    "steps",
    "batch",
    "seq",
    "lr",
    "warmup",
    "weight_decay",
    "shards",
    "backend",
];

/// One row of the report: every seed of one configuration.
#[derive(Debug, Clone)]
pub struct Row {
    /// The configuration without the seed.
    pub config_key: String,
    /// `dp` or `diloco`.
    pub mode: String,
    /// M.
    pub replicas: u64,
    /// H (1 for DP).
    pub inner_steps: u64,
    /// Outer learning rate (none for DP).
    pub outer_lr: Option<f64>,
    /// Global batch (sequences).
    pub batch: u64,
    /// Steps.
    pub steps: u64,
    /// Codec of the synced vectors.
    pub codec: String,
    /// Probability a replica's outer gradient is lost.
    pub drop_prob: f64,
    /// Seeds present, sorted.
    pub seeds: Vec<u64>,
    /// Final eval losses, in seed order.
    pub losses: Vec<f64>,
    /// Mean bytes one replica sent.
    pub bytes: f64,
    /// Mean wall-clock seconds of a run.
    pub wall_s: f64,
    /// Settings shared with its DP baseline (see [`BASELINE_FIELDS`]).
    pub baseline_key: String,
    /// Mean eval history over seeds: (tokens, loss) at the points every seed has.
    pub history: Vec<(f64, f64)>,
    /// Change of the mean eval loss against the matching DP row, in percent.
    pub vs_dp: Option<f64>,
}

impl Row {
    /// Mean of the final eval losses.
    pub fn mean(&self) -> f64 {
        mean(&self.losses)
    }
    /// Sample standard deviation (n − 1) of the final eval losses; 0 for one seed.
    pub fn std(&self) -> f64 {
        std(&self.losses)
    }
    /// A short label for legends: `DP` or `M=2 H=20 lr=0.6 int8`, with drops when non-zero.
    pub fn label(&self) -> String {
        if self.mode == "dp" {
            return format!("DP b={}", self.batch);
        }
        let mut s = format!(
            "M={} H={} lr={} {}",
            self.replicas,
            self.inner_steps,
            self.outer_lr.map_or("?".into(), |x| format!("{x}")),
            self.codec
        );
        if self.batch != 16 {
            let _ = write!(s, " b={}", self.batch);
        }
        if self.drop_prob > 0.0 {
            let _ = write!(s, " drop={}", self.drop_prob);
        }
        s
    }
}

/// Mean of `xs` (NaN when empty).
pub fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// Sample standard deviation of `xs`; 0 for fewer than two values.
pub fn std(xs: &[f64]) -> f64 {
    if xs.len() < 2 {
        return 0.0;
    }
    let m = mean(xs);
    (xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (xs.len() - 1) as f64).sqrt()
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// Groups result lines into rows and fills in `vs_dp`. Rows come in reading order, whatever
/// order parallel runs finished in: settings groups (one DP baseline each) in the order they
/// first appear in the file, and within a group DP first, then by M, H, outer lr, batch,
/// codec and drop probability. A configuration run twice with one seed keeps the later line.
pub fn rows(lines: &[Value]) -> Vec<Row> {
    let mut order: Vec<String> = Vec::new();
    let mut by_key: BTreeMap<String, BTreeMap<u64, &Value>> = BTreeMap::new();
    for line in lines {
        let key = text(&line["config_key"]);
        let seed = line["seed"].as_u64().unwrap_or(0);
        if !by_key.contains_key(&key) {
            order.push(key.clone());
        }
        by_key.entry(key).or_default().insert(seed, line);
    }
    let mut out: Vec<Row> = order
        .iter()
        .map(|key| {
            let runs = &by_key[key];
            let first = runs.values().next().copied().unwrap_or(&Value::Null);
            let num = |f: &str| first[f].as_f64().unwrap_or(0.0);
            let vals = |f: &str| -> Vec<f64> {
                runs.values()
                    .map(|l| l[f].as_f64().unwrap_or(f64::NAN))
                    .collect()
            };
            Row {
                config_key: key.clone(),
                mode: text(&first["mode"]),
                replicas: first["replicas"].as_u64().unwrap_or(1),
                inner_steps: first["inner_steps"].as_u64().unwrap_or(1),
                outer_lr: first["outer_lr"].as_f64(),
                batch: first["batch"].as_u64().unwrap_or(0),
                steps: first["steps"].as_u64().unwrap_or(0),
                codec: text(&first["codec"]),
                drop_prob: num("drop_prob"),
                seeds: runs.keys().copied().collect(),
                losses: vals("eval_loss"),
                bytes: mean(&vals("bytes")),
                wall_s: mean(&vals("wall_s")),
                baseline_key: BASELINE_FIELDS
                    .iter()
                    .map(|f| match (*f, &first[*f]) {
                        // Lines from before the backend was recorded were all made on `cpu`.
                        ("backend", Value::Null) => "backend=cpu".to_string(),
                        (f, v) => format!("{f}={}", text(v)),
                    })
                    .collect::<Vec<_>>()
                    .join(" "),
                history: mean_history(runs.values().copied()),
                vs_dp: None,
            }
        })
        .collect();
    let dp: BTreeMap<String, f64> = out
        .iter()
        .filter(|r| r.mode == "dp")
        .map(|r| (r.baseline_key.clone(), r.mean()))
        .rev() // the first DP row of a baseline wins
        .collect();
    for r in &mut out {
        r.vs_dp = dp
            .get(&r.baseline_key)
            .map(|base| (r.mean() - base) / base * 100.0);
    }
    // Settings groups numbered in order of first appearance.
    let mut group: BTreeMap<String, usize> = BTreeMap::new();
    for r in &out {
        let next = group.len();
        group.entry(r.baseline_key.clone()).or_insert(next);
    }
    out.sort_by(|a, b| {
        let lr = |r: &Row| r.outer_lr.unwrap_or(f64::NEG_INFINITY);
        group[&a.baseline_key]
            .cmp(&group[&b.baseline_key])
            .then((a.mode != "dp").cmp(&(b.mode != "dp")))
            .then(a.replicas.cmp(&b.replicas))
            .then(a.inner_steps.cmp(&b.inner_steps))
            .then(lr(a).total_cmp(&lr(b)))
            .then(a.batch.cmp(&b.batch))
            .then(a.codec.cmp(&b.codec))
            .then(a.drop_prob.total_cmp(&b.drop_prob))
    });
    out
}

/// Mean (tokens, eval loss) over runs, at the steps every run evaluated.
fn mean_history<'a>(runs: impl Iterator<Item = &'a Value>) -> Vec<(f64, f64)> {
    let mut points: BTreeMap<u64, (f64, Vec<f64>)> = BTreeMap::new();
    let mut n = 0;
    for run in runs {
        n += 1;
        for p in run["eval_history"].as_array().into_iter().flatten() {
            if let (Some(step), Some(tokens), Some(loss)) = (
                p["step"].as_u64(),
                p["tokens"].as_f64(),
                p["eval_loss"].as_f64(),
            ) {
                points
                    .entry(step)
                    .or_insert((tokens, Vec::new()))
                    .1
                    .push(loss);
            }
        }
    }
    points
        .into_values()
        .filter(|(_, ls)| ls.len() == n)
        .map(|(t, ls)| (t, mean(&ls)))
        .collect()
}

fn fmt_bytes(b: f64) -> String {
    if b <= 0.0 {
        "0".into()
    } else if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else {
        format!("{:.1} MB", b / 1e6)
    }
}

/// The markdown table of `rows`, grouped by baseline (one table per set of equal settings).
pub fn markdown(title: &str, rows: &[Row], command: &str, plots: &[(String, String)]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# {title}\n");
    let _ = writeln!(s, "Made by `{command}`.\n");
    let _ = writeln!(
        s,
        "Eval loss: final eval loss (nats per byte), mean ± sample standard deviation over the \
         seeds listed. vs DP: change of the mean against the data-parallel row with the same \
         model, steps, global batch, sequence length, learning rate, warmup, weight decay, \
         shards and backend (negative is better). Bytes: what one replica sends over the run in a \
         bandwidth-optimal all-reduce.\n"
    );
    let mut baselines: Vec<&str> = Vec::new();
    for r in rows {
        if !baselines.contains(&r.baseline_key.as_str()) {
            baselines.push(&r.baseline_key);
        }
    }
    for b in baselines {
        let _ = writeln!(s, "## {b}\n");
        let _ = writeln!(
            s,
            "| mode | M | H | outer lr | batch | steps | codec | drop | seeds | eval loss | vs DP | bytes / replica | wall / run |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        for r in rows.iter().filter(|r| r.baseline_key == b) {
            let loss = if r.losses.len() > 1 {
                format!("{:.4} ± {:.4}", r.mean(), r.std())
            } else {
                format!("{:.4}", r.mean())
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} s |",
                r.mode,
                r.replicas,
                if r.mode == "dp" {
                    "-".into()
                } else {
                    r.inner_steps.to_string()
                },
                r.outer_lr.map_or("-".into(), |x| format!("{x}")),
                r.batch,
                r.steps,
                r.codec,
                r.drop_prob,
                r.seeds
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
                loss,
                r.vs_dp.map_or("-".into(), |p| format!("{p:+.2} %")),
                fmt_bytes(r.bytes),
                r.wall_s,
            );
        }
        let _ = writeln!(s);
    }
    for (file, caption) in plots {
        let _ = writeln!(s, "![{caption}]({file})\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn line(mode: &str, m: u64, seed: u64, loss: f64) -> Value {
        json!({
            "config_key": format!("mode={mode} replicas={m}"), "key": "k", "seed": seed,
            "mode": mode, "replicas": m, "inner_steps": if mode == "dp" { 1 } else { 20 },
            "outer_lr": if mode == "dp" { Value::Null } else { json!(0.6) },
            "batch": 16, "seq": 128, "steps": 100, "lr": 0.003, "warmup": 10,
            "weight_decay": 0.1, "shards": "iid", "model": "d8", "codec": "int8",
            "drop_prob": 0.0, "eval_loss": loss, "bytes": 10.0, "wall_s": 1.0,
            "eval_history": [{"step": 50, "tokens": 1000, "eval_loss": loss + 1.0},
                             {"step": 100, "tokens": 2000, "eval_loss": loss}],
        })
    }

    #[test]
    fn rows_pool_seeds_and_compare_with_dp() {
        let lines = vec![
            line("dp", 1, 0, 2.0),
            line("dp", 1, 1, 2.2),
            line("diloco", 2, 0, 2.31),
            line("diloco", 2, 1, 2.31),
        ];
        let rows = rows(&lines);
        assert_eq!(rows.len(), 2);
        assert!((rows[0].mean() - 2.1).abs() < 1e-12);
        assert!((rows[0].std() - 0.1414213562).abs() < 1e-9);
        assert_eq!(rows[0].vs_dp, Some(0.0));
        assert!((rows[1].vs_dp.unwrap() - 10.0).abs() < 1e-9);
        assert_eq!(rows[1].history, vec![(1000.0, 3.31), (2000.0, 2.31)]);
        let md = markdown("t", &rows, "cmd", &[]);
        assert!(md.contains("| diloco | 2 | 20 | 0.6 | 16 | 100 | int8 | 0 | 0,1 | 2.3100 ± 0.0000 | +10.00 % |"), "{md}");
    }

    #[test]
    fn rows_without_a_dp_baseline_say_so() {
        let mut other = line("dp", 1, 0, 2.0);
        other["steps"] = json!(200);
        let rows = rows(&[other, line("diloco", 2, 0, 2.3)]);
        assert_eq!(rows[1].vs_dp, None);
        assert!(markdown("t", &rows, "c", &[]).contains("| - |"));
    }

    #[test]
    fn rows_compare_only_with_dp_on_the_same_backend() {
        // A native DiLoCo row beside a DP row recorded before backends were (all `cpu`).
        let mut native = line("diloco", 2, 0, 2.3);
        native["backend"] = json!("native");
        native["config_key"] = json!("backend=native mode=diloco replicas=2");
        let mixed = rows(&[line("dp", 1, 0, 2.0), native.clone()]);
        assert_eq!(mixed[1].vs_dp, None, "compared across backends");
        let mut dp = line("dp", 1, 0, 2.0);
        dp["backend"] = json!("native");
        dp["config_key"] = json!("backend=native mode=dp replicas=1");
        let same = rows(&[dp, native]);
        assert!((same[1].vs_dp.unwrap() - 15.0).abs() < 1e-9);
        // Lines without a backend field (all `cpu`) still compare among themselves.
        let cpu = rows(&[line("dp", 1, 0, 2.0), line("diloco", 2, 0, 2.3)]);
        assert_eq!(cpu[1].vs_dp.map(|v| v.round()), Some(15.0));
    }

    #[test]
    fn rows_come_dp_first_then_by_m_whatever_the_file_order() {
        // Parallel runs append in the order they finish.
        let mut other_steps = line("dp", 1, 0, 1.0);
        other_steps["steps"] = json!(200);
        other_steps["config_key"] = json!("mode=dp replicas=1 steps=200");
        let rows = rows(&[
            line("diloco", 4, 0, 2.4),
            other_steps,
            line("diloco", 1, 0, 2.1),
            line("dp", 1, 0, 2.0),
            line("diloco", 2, 0, 2.2),
        ]);
        let order: Vec<(u64, &str, u64)> = rows
            .iter()
            .map(|r| (r.steps, r.mode.as_str(), r.replicas))
            .collect();
        assert_eq!(
            order,
            vec![
                (100, "dp", 1),
                (100, "diloco", 1),
                (100, "diloco", 2),
                (100, "diloco", 4),
                (200, "dp", 1),
            ]
        );
        assert!((rows[3].vs_dp.unwrap() - 20.0).abs() < 1e-9);
    }

    #[test]
    fn a_rerun_seed_replaces_the_earlier_line() {
        let rows = rows(&[line("dp", 1, 0, 2.0), line("dp", 1, 0, 3.0)]);
        assert_eq!(rows[0].losses, vec![3.0]);
    }

    proptest! {
        #[test]
        fn std_is_zero_for_constants_and_shift_invariant(
            xs in prop::collection::vec(-100.0f64..100.0, 2..20), c in -50.0f64..50.0,
        ) {
            let shifted: Vec<f64> = xs.iter().map(|x| x + c).collect();
            prop_assert!((std(&xs) - std(&shifted)).abs() < 1e-6);
            prop_assert!((mean(&shifted) - mean(&xs) - c).abs() < 1e-9);
            prop_assert!(std(&vec![xs[0]; xs.len()]) <= 1e-12 * (1.0 + xs[0].abs()));
        }
    }
}
