//! The `diloco-node` binary: parses flags, sets up logging and Ctrl+C, runs a subcommand and
//! prints its result. All logic lives in the library.

use anyhow::Context;
use clap::Parser;
use diloco_node::cli::{Cli, Command, CommonArgs, LogFormat};
use diloco_node::train::{backend, data, plain as train, simulate};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

fn main() {
    diloco_node::train::backend::tune_allocator();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => logs
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
        // Colours only on a terminal: log files and `docker logs` get plain text.
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    if let Err(e) = diloco_node::train::backend::set_threads(cli.threads) {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
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
        Command::Join(args) => join(args),
        Command::Invite(args) => invite(args),
        Command::Health(args) => health(args),
        Command::Reconfig(args) => reconfig(args),
        Command::Keygen(args) => keygen(args),
        Command::Status(args) => status(args),
        Command::Demo(args) => {
            let stop = stop_flag()?;
            diloco_node::demo::run(&args, &stop)?;
            Ok(())
        }
        Command::Study(cmd) => study(cmd),
        Command::Plan(args) => {
            print!("{}", args.to_plan()?.report());
            Ok(())
        }
        Command::Simulate(args) => {
            let cfg = args.to_config()?;
            let (corpus, dev) = prepare(&args.common, cfg.seq, cfg.replicas)?;
            let stop = stop_flag()?;
            let span = tracing::info_span!("simulate", mode = ?cfg.mode, replicas = cfg.replicas);
            let _g = span.enter();
            tracing::info!(params = cfg.model.num_params(), model = %cfg.model.describe(), "starting");
            if let Some(dir) = &args.dump_batches {
                simulate::dump_inputs(&cfg, &corpus, dir)
                    .with_context(|| format!("writing --dump-batches to {}", dir.display()))?;
                tracing::info!(dir = %dir.display(), "wrote init.safetensors and batches.bin");
            }
            let mut progress = diloco_node::train::progress::Progress::new(cfg.steps, 0);
            let report = simulate::run(&cfg, &corpus, &dev.device, &mut progress, &stop)?;
            progress.finish();
            emit(args.common.json, &report)
        }
    }
}

fn study(cmd: diloco_node::cli::StudyCommand) -> anyhow::Result<()> {
    use diloco_node::cli::StudyCommand;
    use diloco_node::study::{grid, runner};
    match cmd {
        StudyCommand::Run(args) => {
            let text = std::fs::read_to_string(&args.grid)
                .with_context(|| format!("reading the grid file {}", args.grid.display()))?;
            let mut g =
                grid::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", args.grid.display()))?;
            if !args.only.is_empty() {
                let example = g.runs.first().map(|r| r.key()).unwrap_or_default();
                g.runs.retain(|r| args.only.iter().all(|t| r.matches(t)));
                if g.runs.is_empty() {
                    anyhow::bail!(
                        "--only {:?}: no run of {} has all those pairs; a run's key looks like \"{example}\"",
                        args.only,
                        args.grid.display()
                    );
                }
            }
            if !args.data.is_file() {
                anyhow::bail!(
                    "--data {}: no such file (give the training text every run uses)",
                    args.data.display()
                );
            }
            if args.threads_per_run == 0 {
                anyhow::bail!("--threads-per-run must be at least 1");
            }
            let out = args
                .out
                .clone()
                .unwrap_or_else(|| args.grid.with_extension("jsonl"));
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            let jobs = args.jobs.unwrap_or((cores / args.threads_per_run).max(1));
            if jobs == 0 {
                anyhow::bail!("--jobs must be at least 1");
            }
            let opts = runner::RunOptions {
                bin: std::env::current_exe().context("finding this binary for the child runs")?,
                data: args.data.canonicalize().unwrap_or(args.data.clone()),
                jobs,
                threads: args.threads_per_run,
                backend: clap::ValueEnum::to_possible_value(&args.backend)
                    .map(|v| v.get_name().to_string())
                    .unwrap_or_else(|| "cpu".into()),
                // A check keeps its logs apart from the recorded runs' logs.
                logs: out.with_extension(if args.check { "check.logs" } else { "logs" }),
                out: out.clone(),
                check: args.check,
            };
            let stop = stop_flag()?;
            let summary = runner::run(&g, &opts, &stop)?;
            if args.check {
                eprintln!(
                    "study {} --check: {} re-made runs repeat their recorded numbers, {} differ, {} not recorded (left out), {} failed, {} interrupted",
                    g.name,
                    summary.same,
                    summary.different,
                    summary.skipped,
                    summary.failed,
                    summary.interrupted
                );
                if summary.skipped == g.runs.len() {
                    anyhow::bail!(
                        "--check: none of the selected runs is recorded in {}; run them first",
                        out.display()
                    );
                }
                if summary.different > 0 || summary.failed > 0 {
                    anyhow::bail!(
                        "--check: {} run(s) differ from their recorded lines, {} failed (logs in {})",
                        summary.different,
                        summary.failed,
                        opts.logs.display()
                    );
                }
                return Ok(());
            }
            eprintln!(
                "study {}: {} made now, {} already there, {} failed, {} interrupted; results in {}",
                g.name,
                summary.done,
                summary.skipped,
                summary.failed,
                summary.interrupted,
                out.display()
            );
            if args.report && summary.failed == 0 && summary.interrupted == 0 {
                // Results in a/b.jsonl: the report in a/b/.
                report_done(diloco_node::study::write_report(
                    &[out.clone()],
                    &out.with_extension(""),
                    &g.name,
                )?);
            }
            if summary.failed > 0 {
                anyhow::bail!(
                    "{} run(s) failed; their logs are in {}",
                    summary.failed,
                    opts.logs.display()
                );
            }
            Ok(())
        }
        StudyCommand::Report(args) => {
            let dir = match &args.out {
                Some(d) => d.clone(),
                None => args.results[0]
                    .parent()
                    .map(std::path::Path::to_path_buf)
                    .unwrap_or_default(),
            };
            report_done(diloco_node::study::write_report(
                &args.results,
                &dir,
                &args.title,
            )?);
            Ok(())
        }
    }
}

fn report_done(w: diloco_node::study::Written) {
    eprintln!(
        "wrote {} ({} rows) and {} plot(s)",
        w.path.display(),
        w.rows,
        w.plots
    );
}

fn join(args: diloco_node::cli::JoinArgs) -> anyhow::Result<()> {
    use diloco_p2p::{addr, keys};
    args.validate()?;
    let rc = args.run_config()?;
    let bootstrap = args
        .bootstrap
        .iter()
        .map(|s| addr::parse_bootstrap(s))
        .collect::<Result<Vec<_>, _>>()?;
    let listen = args
        .listen
        .iter()
        .map(|s| addr::parse_listen(s))
        .collect::<Result<Vec<_>, _>>()?;
    if args.founders == 2 {
        tracing::warn!(
            "--founders 2: a group of two needs both members to decide a round, so one crash \
             stops the run until that node comes back; three or more tolerate one"
        );
    }
    if bootstrap.is_empty() {
        tracing::warn!(
            "no --bootstrap given: this node can only be found by peers that bootstrap from it"
        );
    }
    let corpus = data::Corpus::load(&args.data_spec())?;
    let run = rc.validate(&corpus)?;
    corpus.check(run.config.seq, 1)?;
    let key_path = args
        .key
        .clone()
        .or_else(|| args.checkpoint_dir.as_ref().map(|d| d.join("node.key")));
    let identity = match &key_path {
        Some(p) => {
            let (id, created) = keys::load_or_create(p)?;
            if created {
                tracing::info!(key = %p.display(), "created a new identity key");
            }
            id
        }
        None => keys::Identity::generate(),
    };
    let dev = backend::select(args.backend)?;
    tracing::info!(backend = dev.kind, device = %dev.description, "compute device");
    tracing::info!(run_id = %run.id_hex(), data = %corpus.source, "run");
    println!("peer id {}", identity.peer_id());
    println!("run id {}", run.id_hex());
    let stop = stop_flag()?;
    let invite = match &args.invite {
        Some(t) => Some(diloco_protocol::wire::Invite::from_token(t).map_err(|e| {
            anyhow::anyhow!("--invite: {e} (use the token `diloco-node invite` printed)")
        })?),
        None => None,
    };
    let cfg = diloco_node::driver::JoinConfig {
        run,
        identity,
        listen,
        bootstrap,
        checkpoint_dir: args.checkpoint_dir.clone(),
        checkpoint_every: args.checkpoint_every,
        status_addr: args.status_addr,
        genesis_wait: std::time::Duration::from_secs_f64(args.genesis_wait),
        eval_windows: args.eval_windows,
        observer: None,
        founders: args.founders,
        relay_listen: args.relay_listen,
        private_network: args.private_network,
        invite,
        tamper: None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report = rt.block_on(diloco_node::driver::run(
        cfg,
        std::sync::Arc::new(corpus),
        dev.device,
        stop,
    ))?;
    emit(args.json, &report)
}

fn invite(args: diloco_node::cli::InviteArgs) -> anyhow::Result<()> {
    let invitee = diloco_node::runconfig::parse_peer(&args.invitee)
        .map_err(|e| anyhow::anyhow!("--peer: {e}"))?;
    let rc = args.join.run_config()?;
    let corpus = data::Corpus::load(&args.join.data_spec())?;
    let run = rc.validate(&corpus)?;
    if !matches!(
        run.admission,
        diloco_protocol::averaging::Admission::Invite(_)
    ) {
        anyhow::bail!(
            "this run's admission is '{}', not 'invite': give the same run flags as the run's \
             `join` (--admission invite --allowlist FILE ...)",
            run.config.admission
        );
    }
    let key_path = args
        .join
        .key
        .clone()
        .or_else(|| {
            args.join
                .checkpoint_dir
                .as_ref()
                .map(|d| d.join("node.key"))
        })
        .context("invite needs this node's identity: --key FILE or --checkpoint-dir DIR")?;
    let text = std::fs::read_to_string(&key_path)
        .with_context(|| format!("reading the identity key {}", key_path.display()))?;
    let secret = diloco_p2p::keys::parse(&text)
        .map_err(|e| anyhow::anyhow!("identity key {}: {e}", key_path.display()))?;
    let key = ed25519_dalek::SigningKey::from_bytes(&secret);
    let inv = diloco_protocol::wire::Invite::sign(&key, run.id, invitee);
    eprintln!(
        "invitation to run {} for {} (valid while this node is a member):",
        run.id_hex(),
        args.invitee.trim()
    );
    println!("{}", inv.to_token());
    Ok(())
}

fn reconfig(args: diloco_node::cli::ReconfigArgs) -> anyhow::Result<()> {
    let t = std::time::Duration::from_secs_f64(args.timeout.clamp(0.1, 600.0));
    let text = std::fs::read_to_string(&args.operator_key)
        .with_context(|| format!("reading the operator key {}", args.operator_key.display()))?;
    let secret = diloco_p2p::keys::parse(&text)
        .map_err(|e| anyhow::anyhow!("operator key {}: {e}", args.operator_key.display()))?;
    let key = ed25519_dalek::SigningKey::from_bytes(&secret);
    let body = diloco_node::driver::status::fetch(args.node, t)
        .with_context(|| format!("asking the node on {} for its /status", args.node))?;
    let status: diloco_node::driver::status::Status = serde_json::from_str(&body)
        .with_context(|| format!("the /status of {} is not a node's status", args.node))?;
    let plan = diloco_node::operator::plan(&status, &args.keep, &args.drop)?;
    println!("{}", plan.describe());
    if !args.yes {
        println!(
            "not sent: run again with --yes to sign it and hand it to {}",
            args.node
        );
        return Ok(());
    }
    let env = plan.sign(&key);
    let bytes = env.to_bytes()?;
    let answer = diloco_node::driver::status::post_path(args.node, "/reconfig", &bytes, t)
        .with_context(|| format!("handing the RECONFIG to {}", args.node))?;
    print!("{answer}");
    Ok(())
}

fn keygen(args: diloco_node::cli::KeygenArgs) -> anyhow::Result<()> {
    let (id, created) = diloco_p2p::keys::load_or_create(&args.path)
        .with_context(|| format!("key file {}", args.path.display()))?;
    if !created {
        eprintln!("{} exists; its peer id:", args.path.display());
    }
    println!("{}", id.peer_id());
    Ok(())
}

fn health(args: diloco_node::cli::HealthArgs) -> anyhow::Result<()> {
    let t = std::time::Duration::from_secs_f64(args.timeout.clamp(0.1, 600.0));
    println!("{}", diloco_node::driver::status::fetch(args.addr, t)?);
    Ok(())
}

fn status(args: diloco_node::cli::StatusArgs) -> anyhow::Result<()> {
    let t = std::time::Duration::from_secs_f64(args.timeout.clamp(0.1, 600.0));
    let survey = diloco_node::driver::status::Survey::take(&args.addr, t);
    if args.json {
        println!("{}", serde_json::to_string(&survey)?);
    } else {
        print!("{}", survey.table());
    }
    if !survey.ok() {
        std::process::exit(1);
    }
    Ok(())
}
