//! The LibTorch backend (`--backend torch`, a build with `--features torch`): it trains the same
//! model as the pure-Rust CPU backend from the same initial parameters to losses that agree up
//! to float rounding, and a run stopped and resumed from its checkpoint ends bit-identical to an
//! uninterrupted one.
//!
//! Only built with the feature (it needs libtorch: README, "LibTorch backend"):
//! `cargo test --release -p diloco-node --features torch --test torch_backend`.
#![cfg(feature = "torch")]

use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_diloco-node");

fn train(backend: &str, steps: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "--threads",
        "2",
        "train",
        "--model",
        "d32-l2-h2-c32",
        "--batch",
        "4",
        "--seq",
        "32",
        "--eval-windows",
        "4",
        "--steps",
        steps,
        "--backend",
        backend,
        "--json",
    ];
    args.extend_from_slice(extra);
    let out: Output = Command::new(BIN)
        .args(&args)
        .env("DILOCO_LOG", "warn")
        .output()
        .expect("spawn diloco-node");
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim().lines().last().expect("no output")).expect("JSON line")
}

#[test]
fn torch_trains_like_the_cpu_backend() {
    let cpu = train("cpu", "30", &[]);
    let torch = train("torch", "30", &[]);
    let loss = |v: &serde_json::Value| v["eval_loss"].as_f64().unwrap();
    let (a, b) = (loss(&cpu), loss(&torch));
    assert!(
        a < 5.3 && b < 5.3,
        "30 steps should leave the uniform loss ln 256 = 5.55: {a} {b}"
    );
    assert!(
        (a - b).abs() < 2e-3,
        "the two backends diverged: cpu {a}, torch {b}"
    );
}

#[test]
fn torch_resumes_bit_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    let ckpt = |d| ["--checkpoint-dir", d, "--checkpoint-every", "4"];
    let full = train("torch", "12", &ckpt(a));
    train("torch", "8", &ckpt(b));
    let mut resume = ckpt(b).to_vec();
    resume.push("--resume");
    let resumed = train("torch", "12", &resume);
    assert_eq!(resumed["resumed_from"], 8);
    assert_eq!(
        resumed["global_hash"], full["global_hash"],
        "resume diverged from the uninterrupted run"
    );
}
