//! The `diloco-node` binary: parses flags, sets up logging and Ctrl+C, runs a subcommand and
//! prints its result. All logic lives in the library.

use anyhow::Context;
use clap::Parser;
use diloco_node::cli::{Cli, Command, CommonArgs};
use diloco_node::{backend, data, simulate, train};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

fn main() {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn stop_flag() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    ctrlc::set_handler(move || {
        if s.swap(true, Ordering::SeqCst) {
            eprintln!("second interrupt: exiting now without saving");
            std::process::exit(130);
        }
        eprintln!("interrupt: stopping at the next safe point (press Ctrl+C again to abort)");
    })
    .context("installing the Ctrl+C handler")?;
    Ok(stop)
}

fn prepare(
    common: &CommonArgs,
    seq: usize,
    shards: usize,
) -> anyhow::Result<(data::Corpus, backend::Selected)> {
    let corpus = data::Corpus::load(&common.data_spec())?;
    corpus.check(seq, shards)?;
    tracing::info!(source = %corpus.source, train_bytes = corpus.train.len(), eval_bytes = corpus.eval.len(), "data loaded");
    let selected = backend::select(common.backend)?;
    tracing::info!(backend = selected.kind, device = %selected.description, "compute device");
    Ok((corpus, selected))
}

fn emit<T: serde::Serialize>(json: bool, report: &T) -> anyhow::Result<()> {
    let line = serde_json::to_string(report)?;
    if json {
        println!("{line}");
    } else {
        println!("{}", serde_json::to_string_pretty(report)?);
    }
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Train(args) => {
            let cfg = args.to_config()?;
            let (corpus, dev) = prepare(&args.common, cfg.seq, 1)?;
            let stop = stop_flag()?;
            let span = tracing::info_span!("train", model = %cfg.model.describe());
            let _g = span.enter();
            let report = train::run(&cfg, &corpus, &dev.device, &stop)?;
            emit(args.common.json, &report)
        }
        Command::Simulate(args) => {
            let cfg = args.to_config()?;
            let (corpus, dev) = prepare(&args.common, cfg.seq, cfg.replicas)?;
            let stop = stop_flag()?;
            let span = tracing::info_span!("simulate", mode = ?cfg.mode, replicas = cfg.replicas);
            let _g = span.enter();
            tracing::info!(params = cfg.model.num_params(), model = %cfg.model.describe(), "starting");
            let mut progress = diloco_node::progress::Progress::new(cfg.steps, 0);
            let report = simulate::run(&cfg, &corpus, &dev.device, &mut progress, &stop)?;
            progress.finish();
            emit(args.common.json, &report)
        }
    }
}
