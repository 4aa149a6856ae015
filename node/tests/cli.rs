//! End-to-end tests of the `diloco-node` binary: bit-exact resume after SIGKILL, the DP/DiLoCo
//! traffic identity, and clear errors for bad input.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_diloco-node");
const SMALL: &[&str] = &["--model", "d32-l2-h2-c32", "--batch", "4", "--seq", "32"];

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("DILOCO_LOG", "warn")
        .output()
        .expect("spawn diloco-node")
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim().lines().last().expect("no output"))
        .expect("last line is JSON")
}

fn fails_with(args: &[&str], needle: &str) {
    let out = run(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // 2: clap rejected the flags; 1: our own validation or a runtime error.
    assert!(
        matches!(out.status.code(), Some(1 | 2)),
        "{:?}: {stderr}",
        out.status
    );
    assert!(stderr.contains(needle), "expected '{needle}' in: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

fn train_args<'a>(dir: &'a str, steps: &'a str, backend: &'a str) -> Vec<&'a str> {
    let mut v = vec![
        "train",
        "--steps",
        steps,
        "--checkpoint-dir",
        dir,
        "--checkpoint-every",
        "4",
        "--json",
        "--backend",
        backend,
    ];
    v.extend_from_slice(SMALL);
    v
}

fn latest_step(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join("LATEST"))
        .ok()
        .and_then(|s| s.trim().strip_prefix("step-").and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

#[test]
fn killed_train_resumes_to_the_same_hash() {
    killed_train_resumes_to_the_same_hash_on("cpu");
}

#[test]
fn killed_train_resumes_to_the_same_hash_on_the_native_engine() {
    killed_train_resumes_to_the_same_hash_on("native");
}

fn killed_train_resumes_to_the_same_hash_on(backend: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    let (a_s, b_s) = (a.to_str().unwrap(), b.to_str().unwrap());
    let full = json(&run(&train_args(a_s, "300", backend)));
    assert_eq!(full["steps"], 300);

    let mut child = Command::new(BIN)
        .args(train_args(b_s, "300", backend))
        .env("DILOCO_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill it as soon as it has written a mid-run checkpoint (it may be writing the next one).
    let deadline = Instant::now() + Duration::from_secs(300);
    while latest_step(&b) < 8 {
        assert!(Instant::now() < deadline, "no checkpoint within 5 minutes");
        if let Some(status) = child.try_wait().unwrap() {
            panic!("train exited early: {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let killed_at = latest_step(&b);
    assert!(killed_at < 300, "run finished before it could be killed");

    let mut args = train_args(b_s, "300", backend);
    args.push("--resume");
    let resumed = json(&run(&args));
    assert!(resumed["resumed_from"].as_u64().unwrap() >= 8);
    assert_eq!(
        resumed["global_hash"], full["global_hash"],
        "resume diverged from the uninterrupted run"
    );
}

#[test]
fn dp_and_diloco_traffic_ratio_is_h_times_32_over_8() {
    let common = [
        "--replicas",
        "2",
        "--steps",
        "100",
        "--model",
        "d16-l1-h2-c16",
        "--batch",
        "2",
        "--seq",
        "16",
        "--backend",
        "cpu",
        "--eval-windows",
        "4",
        "--json",
    ];
    let mut dp = vec!["simulate", "--mode", "dp"];
    dp.extend_from_slice(&common);
    let mut dl = vec![
        "simulate",
        "--mode",
        "diloco",
        "--inner-steps",
        "50",
        "--quantize",
        "int8",
    ];
    dl.extend_from_slice(&common);
    let dp = json(&run(&dp));
    let dl = json(&run(&dl));
    let (a, b) = (
        dp["bytes_sent_per_replica"].as_u64().unwrap(),
        dl["bytes_sent_per_replica"].as_u64().unwrap(),
    );
    assert!(b > 0);
    assert_eq!(a, 200 * b, "dp {a} bytes vs diloco {b} bytes");
    for key in [
        "mode",
        "replicas",
        "inner_steps",
        "steps",
        "params",
        "eval_loss",
        "tokens_per_s",
        "global_hash",
    ] {
        assert!(!dl[key].is_null(), "missing {key}");
    }
}

/// The native engine repeats a DiLoCo simulation bit for bit, whatever the thread count (what
/// `study run --check` relies on).
#[test]
fn native_simulate_repeats_bit_for_bit_on_any_thread_count() {
    let sim = |threads: &str| {
        json(&run(&[
            "--threads",
            threads,
            "simulate",
            "--backend",
            "native",
            "--mode",
            "diloco",
            "--replicas",
            "2",
            "--inner-steps",
            "5",
            "--steps",
            "20",
            "--model",
            "d32-l2-h2-c32",
            "--batch",
            "4",
            "--seq",
            "32",
            "--eval-windows",
            "8",
            "--json",
        ]))
    };
    let (a, b) = (sim("1"), sim("2"));
    assert!(a["eval_loss"].as_f64().unwrap() < 5.4);
    assert_eq!(a["global_hash"], b["global_hash"]);
    assert_eq!(a["eval_loss"], b["eval_loss"]);
}

#[test]
fn bad_input_gets_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing.txt");
    fails_with(
        &["simulate", "--data", missing.to_str().unwrap()],
        "does not exist",
    );
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    fails_with(&["simulate", "--data", empty.to_str().unwrap()], "is empty");
    let short = tmp.path().join("short.txt");
    std::fs::write(&short, "too short for a sequence").unwrap();
    fails_with(
        &[
            "train",
            "--data",
            short.to_str().unwrap(),
            "--backend",
            "cpu",
        ],
        "needs at least",
    );
    fails_with(
        &["simulate", "--replicas", "8", "--batch", "4"],
        "more than --batch",
    );
    fails_with(&["simulate", "--inner-steps", "0"], "at least 1");
    fails_with(
        &["simulate", "--steps", "10", "--inner-steps", "50"],
        "less than --inner-steps",
    );
    fails_with(&["simulate", "--model", "enormous"], "unknown model");
    fails_with(&["simulate", "--backend", "tpu"], "invalid value");
    fails_with(&["train", "--resume"], "--checkpoint-dir");

    // A checkpoint from another model, and a corrupted one.
    let dir = tmp.path().join("ck");
    let d = dir.to_str().unwrap();
    json(&run(&train_args(d, "2", "cpu")));
    let other = vec![
        "train",
        "--steps",
        "4",
        "--checkpoint-dir",
        d,
        "--resume",
        "--model",
        "d16-l1-h2-c16",
        "--batch",
        "4",
        "--seq",
        "16",
        "--backend",
        "cpu",
    ];
    fails_with(&other, "different run");
    let latest = std::fs::read_to_string(dir.join("LATEST")).unwrap();
    let model = dir.join(latest.trim()).join("model.safetensors");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() - 100]).unwrap();
    let mut args = train_args(d, "4", "cpu");
    args.push("--resume");
    fails_with(&args, "corrupt or truncated");
}

#[test]
fn join_bad_input_gets_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    fails_with(
        &["join", "--bootstrap", "127.0.0.1:4001"],
        "is not a multiaddr",
    );
    fails_with(
        &["join", "--bootstrap", "/ip4/127.0.0.1/tcp/4001"],
        "has no /p2p/<peer id>",
    );
    fails_with(&["join", "--listen", "/dns4/x/tcp/1"], "listen address");
    let bad = tmp.path().join("run.json");
    std::fs::write(&bad, r#"{"model":"tiny","inner_step":5}"#).unwrap();
    fails_with(
        &["join", "--run-config", bad.to_str().unwrap()],
        "unknown field `inner_step`",
    );
    fails_with(
        &["join", "--inner-steps", "0"],
        "inner_steps (H) must be at least 1",
    );
    fails_with(&["join", "--quantize", "int3"], "quantize");
    let key = tmp.path().join("bad.key");
    std::fs::write(&key, "not a key").unwrap();
    fails_with(
        &["join", "--key", key.to_str().unwrap(), "--backend", "cpu"],
        "is not a diloco key",
    );
    // Ports in use: the swarm's listen address and the status address.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    fails_with(
        &[
            "join",
            "--backend",
            "cpu",
            "--listen",
            &format!("/ip4/127.0.0.1/tcp/{port}"),
        ],
        "cannot listen",
    );
    fails_with(
        &[
            "join",
            "--backend",
            "cpu",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--status-addr",
            &format!("127.0.0.1:{port}"),
        ],
        "cannot serve status",
    );
    // A checkpoint directory written by `train` is not a node checkpoint.
    let dir = tmp.path().join("ck");
    let d = dir.to_str().unwrap();
    json(&run(&train_args(d, "2", "cpu")));
    fails_with(
        &["join", "--backend", "cpu", "--checkpoint-dir", d],
        "different run",
    );
}

#[test]
fn demo_bad_input_gets_a_clear_error_and_leaves_nothing_running() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let d = dir.to_str().unwrap();
    fails_with(&["demo", "--nodes", "0"], "--nodes");
    fails_with(&["demo", "--nodes", "17"], "--nodes");
    fails_with(
        &[
            "demo",
            "--dir",
            d,
            "--bootstrap-bin",
            "/nonexistent/diloco-bootstrap",
        ],
        "cannot start bootstrap",
    );
    // The bootstrap peer's dashboard port is taken: its own error is shown.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    fails_with(
        &["demo", "--dir", d, "--port", &port],
        "cannot serve status",
    );
    // A wrong flag for the nodes: the node's own error, and the bootstrap peer is stopped.
    fails_with(
        &[
            "demo",
            "--dir",
            d,
            "--port",
            "0",
            "--",
            "--inner-stepz",
            "3",
        ],
        "--inner-stepz",
    );
    let left = Command::new("pgrep").args(["-f", d]).output().unwrap();
    assert!(
        left.stdout.is_empty(),
        "processes left behind: {}",
        String::from_utf8_lossy(&left.stdout)
    );
}

/// Ctrl+C (SIGINT) stops `train` at the next step, writes a checkpoint there and reports it;
/// `--resume` then continues from that step.
#[test]
fn ctrl_c_stops_train_at_a_safe_point_with_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ck");
    let d = dir.to_str().unwrap();
    let args = train_args(d, "100000", "cpu");
    let child = Command::new(BIN)
        .args(&args)
        .env("DILOCO_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Let it train a little (any moment is a valid one to interrupt).
    std::thread::sleep(std::time::Duration::from_secs(3));
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let report = json(&out);
    assert_eq!(report["interrupted"], true, "{report}");
    let steps = report["steps"].as_u64().unwrap();
    assert!(steps > 0 && steps < 100_000, "{report}");
    assert_eq!(
        latest_step(&dir),
        steps,
        "the checkpoint is at the interrupted step"
    );
    let more = (steps + 2).to_string();
    let mut resume_args = train_args(d, &more, "cpu");
    resume_args.push("--resume");
    let resumed = json(&run(&resume_args));
    assert_eq!(resumed["resumed_from"].as_u64(), Some(steps), "{resumed}");
    assert_eq!(resumed["steps"].as_u64(), Some(steps + 2), "{resumed}");
}

/// `--log-format json`: every log line is one JSON object with level, message and fields; the
/// default stays plain text.
#[test]
fn json_logs_are_one_object_a_line() {
    let mut args = vec![
        "--log-format",
        "json",
        "simulate",
        "--steps",
        "2",
        "--inner-steps",
        "1",
    ];
    args.extend_from_slice(SMALL);
    let out = Command::new(BIN)
        .args(&args)
        .env("DILOCO_LOG", "info")
        .output()
        .expect("spawn diloco-node");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(!lines.is_empty(), "no JSON log lines in: {stderr}");
    for l in &lines {
        assert!(
            l["level"].is_string() && l["fields"]["message"].is_string(),
            "{l}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "data loaded"),
        "{stderr}"
    );
    // Plain text by default.
    let mut args = vec!["simulate", "--steps", "2", "--inner-steps", "1"];
    args.extend_from_slice(SMALL);
    let out = Command::new(BIN)
        .args(&args)
        .env("DILOCO_LOG", "info")
        .output()
        .expect("spawn diloco-node");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("data loaded") && !stderr.contains("{\"timestamp\""),
        "{stderr}"
    );
}

/// `study run` makes a grid's runs as child processes, records them, makes only what is missing
/// when run again (a new seed), repeats a run bit for bit, and `study report` writes the table
/// and plots; a bad grid gets an error naming the key.
#[test]
fn study_runs_a_grid_resumes_it_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.txt");
    std::fs::write(
        &data,
        "the quick brown fox jumps over the lazy dog. ".repeat(400),
    )
    .unwrap();
    let grid = dir.path().join("g.json");
    let body = |seeds: &str| {
        format!(
            r#"{{"name": "t", "base": {{"model": "d16-l1-h2-c16", "steps": 8, "batch": 4,
            "seq": 16, "warmup": 2, "inner_steps": 4, "eval_every": 4, "eval_windows": 4}},
            "seeds": {seeds}, "runs": [{{"mode": "dp"}},
            {{"mode": "diloco", "replicas": 2, "outer_lr": 0.6, "quantize": "int8"}}]}}"#
        )
    };
    std::fs::write(&grid, body("[0]")).unwrap();
    let (g, d) = (grid.to_str().unwrap(), data.to_str().unwrap());
    let out = run(&["study", "run", g, "--data", d, "--jobs", "2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results = dir.path().join("g.jsonl");
    let lines = |p: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let first = lines(&results);
    assert_eq!(first.len(), 2);
    for l in &first {
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
            assert!(l.get(f).is_some(), "{f} missing in {l}");
        }
    }
    // A second seed: only the two new runs are made.
    std::fs::write(&grid, body("[0, 1]")).unwrap();
    let out = run(&["study", "run", g, "--data", d, "--report"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("2 made now, 2 already there"), "{err}");
    let all = lines(&results);
    assert_eq!(all.len(), 4);
    // The same row and seed, made again into another file, give the same numbers.
    let again = dir.path().join("again.jsonl");
    std::fs::write(&grid, body("[1]")).unwrap();
    let out = run(&[
        "study",
        "run",
        g,
        "--data",
        d,
        "--out",
        again.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    for l in lines(&again) {
        let twin = all.iter().find(|a| a["key"] == l["key"]).expect("same key");
        assert_eq!(twin["eval_loss"], l["eval_loss"]);
        assert_eq!(twin["global_hash"], l["global_hash"]);
    }
    // `--check --only` re-makes one recorded row and finds the same numbers; a recorded line
    // that was altered is reported as different, and an --only that matches nothing is an error.
    let only = "mode=diloco seed=1";
    let out = run(&["study", "run", g, "--data", d, "--check", "--only", only]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("1 re-made runs repeat their recorded numbers, 0 differ"),
        "{err}"
    );
    assert_eq!(lines(&results).len(), 4, "--check appends nothing");
    let altered: String = all
        .iter()
        .map(|l| {
            let mut l = l.clone();
            if l["mode"] == "diloco" && l["seed"] == 1 {
                l["eval_loss"] = serde_json::json!(1.0);
            }
            format!("{l}\n")
        })
        .collect();
    std::fs::write(&results, altered).unwrap();
    fails_with(
        &["study", "run", g, "--data", d, "--check", "--only", only],
        "1 run(s) differ from their recorded lines",
    );
    fails_with(
        &["study", "run", g, "--data", d, "--only", "seed=7"],
        "no run of",
    );
    let report = std::fs::read_to_string(dir.path().join("g/report.md")).unwrap();
    assert!(report.contains("| diloco | 2 | 4 | 0.6 |"), "{report}");
    assert!(report.contains(" ± "), "{report}");
    assert!(dir.path().join("g/loss_vs_tokens.svg").exists());
    assert!(dir.path().join("g/vs_dp.svg").exists());
    std::fs::write(&grid, r#"{"base": {"inner-steps": 4}}"#).unwrap();
    fails_with(
        &["study", "run", g, "--data", d],
        "unknown key 'inner-steps' in base",
    );
    fails_with(
        &[
            "study",
            "report",
            dir.path().join("none.jsonl").to_str().unwrap(),
        ],
        "no results",
    );
    fails_with(&["plan", "--params", "lots"], "--params 'lots'");
}
