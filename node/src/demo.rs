//! `diloco-node demo`: a whole run on one machine, to see the product work. It starts a
//! `diloco-bootstrap` process and N `diloco-node join` processes on loopback, prints every
//! dashboard address, follows the run with one progress line (round, loss, whether the nodes
//! agree on the global parameters) and, on Ctrl+C, stops every process the way an operator
//! would: an interrupt to each node (which writes its final checkpoint), then the bootstrap
//! peer, waiting for each, killing only what does not stop in time.
//!
//! The children run in their own process groups, so a terminal's Ctrl+C reaches only the demo
//! (a second interrupt would make a node quit without saving), and each is told by the kernel
//! to die if the demo itself is killed: nothing is left behind either way.

use crate::cli::DemoArgs;
use crate::driver::status::{fetch, Status};
use clap::ValueEnum;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use thiserror::Error;

/// How long a child may take to print its address.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a node may take to stop (its final checkpoint included).
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// Why the demo could not run.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DemoError {
    /// No `diloco-bootstrap` binary.
    #[error("no diloco-bootstrap binary beside {beside} or on PATH: build it with `cargo build --release --workspace` (or pass --bootstrap-bin)")]
    NoBootstrap {
        /// Where it was looked for.
        beside: PathBuf,
    },
    /// The demo folder could not be made.
    #[error("cannot create the demo folder {path}: {source}")]
    Dir {
        /// The folder.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A process could not be started.
    #[error("cannot start {what}: {source}")]
    Spawn {
        /// Which.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// A process exited or stayed silent before it was up.
    #[error("{what} did not start ({why}); the end of its log ({log}):\n{tail}")]
    Start {
        /// Which.
        what: String,
        /// What happened.
        why: String,
        /// Its log file.
        log: PathBuf,
        /// The last lines of it.
        tail: String,
    },
    /// The interrupt handler could not be installed.
    #[error("installing the Ctrl+C handler: {0}")]
    Signal(String),
}

/// One child process and its log.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Result<Self, DemoError> {
        let spawn_err = |source| DemoError::Spawn {
            what: name.to_string(),
            source,
        };
        let out = std::fs::File::create(&log).map_err(spawn_err)?;
        let err = out.try_clone().map_err(spawn_err)?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        detach(&mut cmd);
        let child = cmd.spawn().map_err(spawn_err)?;
        Ok(Proc {
            name: name.to_string(),
            child,
            log,
        })
    }

    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Waits until the log has a line starting with `prefix`; returns the rest of the line.
    fn wait_line(&mut self, prefix: &str, stop: &AtomicBool) -> Result<String, DemoError> {
        let start = Instant::now();
        let fail = |p: &Proc, why: String| DemoError::Start {
            what: p.name.clone(),
            why,
            log: p.log.clone(),
            tail: p.tail(),
        };
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if let Some(rest) = text.lines().find_map(|l| l.strip_prefix(prefix)) {
                return Ok(rest.trim().to_string());
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(fail(self, format!("it exited with {st}")));
            }
            if stop.load(Ordering::Relaxed) {
                return Err(fail(self, "interrupted".into()));
            }
            if start.elapsed() > START_TIMEOUT {
                return Err(fail(
                    self,
                    format!("no '{prefix}' line within {}s", START_TIMEOUT.as_secs()),
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Interrupts the process (as Ctrl+C would) and waits up to `timeout` for it to exit;
    /// kills it if it does not. Returns how it ended.
    fn stop(&mut self, timeout: Duration) -> String {
        if let Ok(Some(st)) = self.child.try_wait() {
            return format!("had exited ({st})");
        }
        interrupt(&self.child);
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(st)) = self.child.try_wait() {
                return format!("stopped ({st})");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        format!("killed: it did not stop within {}s", timeout.as_secs())
    }
}

/// Puts the child in its own process group and asks the kernel to kill it when the demo dies.
#[cfg(target_os = "linux")]
fn detach(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0);
    // SAFETY: prctl is async-signal-safe and touches only the new process.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(all(unix, not(target_os = "linux")))]
fn detach(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0);
}

#[cfg(not(unix))]
fn detach(_cmd: &mut Command) {}

#[cfg(unix)]
fn interrupt(child: &Child) {
    // SAFETY: kill(2) on the pid of a child this process has not reaped yet.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGINT);
    }
}

#[cfg(not(unix))]
fn interrupt(_child: &Child) {}

/// Finds the `diloco-bootstrap` binary: `given`, else beside this binary, else on PATH.
fn bootstrap_bin(given: Option<&Path>) -> Result<PathBuf, DemoError> {
    if let Some(p) = given {
        return Ok(p.to_path_buf());
    }
    let me = std::env::current_exe().unwrap_or_default();
    let beside = me.with_file_name(format!("diloco-bootstrap{}", std::env::consts::EXE_SUFFIX));
    if beside.is_file() {
        return Ok(beside);
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("diloco-bootstrap"))
            .find(|p| p.is_file())
    });
    on_path.ok_or(DemoError::NoBootstrap { beside })
}

fn port(base: u16, i: u16) -> u16 {
    if base == 0 {
        0
    } else {
        base.saturating_add(i)
    }
}

/// One line about the run: the newest round, losses, and whether the nodes agree.
pub fn progress_line(statuses: &[Option<Status>]) -> String {
    let up: Vec<&Status> = statuses.iter().flatten().collect();
    let n = statuses.len();
    let Some(top) = up.iter().map(|s| s.round).max() else {
        return format!("0/{n} nodes answering");
    };
    let at_top: Vec<&&Status> = up.iter().filter(|s| s.round == top).collect();
    let mut hashes: Vec<&str> = at_top
        .iter()
        .map(|s| s.global_hash.as_str())
        .filter(|h| !h.is_empty())
        .collect();
    hashes.sort_unstable();
    hashes.dedup();
    let loss = |f: fn(&Status) -> Option<f32>| {
        let v: Vec<f32> = up.iter().filter_map(|s| f(s)).collect();
        if v.is_empty() {
            "-".to_string()
        } else {
            format!("{:.4}", v.iter().sum::<f32>() / v.len() as f32)
        }
    };
    let agree = match hashes.as_slice() {
        [] => "no global parameters yet".to_string(),
        [h] => format!(
            "{}/{n} at round {top} agree on {}",
            at_top.len(),
            &h[..12.min(h.len())]
        ),
        _ => format!("{} different global hashes at round {top}", hashes.len()),
    };
    let phases: Vec<String> = up.iter().map(|s| s.phase.to_string()).collect();
    format!(
        "round {top} | train loss {} | eval loss {} | {agree} | {}",
        loss(|s| s.last_loss),
        loss(|s| s.eval_loss),
        phases.join(",")
    )
}

/// Runs the demo until every node stops on its own (`--rounds`) or `stop` is set.
pub fn run(args: &DemoArgs, stop: &AtomicBool) -> Result<(), DemoError> {
    let bootstrap = bootstrap_bin(args.bootstrap_bin.as_deref())?;
    let me = std::env::current_exe().map_err(|source| DemoError::Spawn {
        what: "the nodes (cannot find this binary)".into(),
        source,
    })?;
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("diloco-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).map_err(|source| DemoError::Dir {
        path: dir.clone(),
        source,
    })?;
    println!("demo folder {}", dir.display());
    let mut procs: Vec<Proc> = Vec::new();
    let result = start_and_follow(args, stop, &bootstrap, &me, &dir, &mut procs);
    if result.is_err() {
        // Whatever was started goes down with the failure.
        stop.store(true, Ordering::SeqCst);
    }
    println!("stopping {} processes…", procs.len());
    // Nodes first (each writes its final checkpoint), then the bootstrap peer.
    for p in procs.iter_mut().skip(1) {
        let how = p.stop(STOP_TIMEOUT);
        println!("{}: {how}", p.name);
    }
    if let Some(p) = procs.first_mut() {
        let how = p.stop(Duration::from_secs(10));
        println!("{}: {how}", p.name);
    }
    for i in 1..=args.nodes {
        let ck = dir.join(format!("node-{i}"));
        println!("node {i}: logs and checkpoints in {}", ck.display());
    }
    result
}

fn start_and_follow(
    args: &DemoArgs,
    stop: &AtomicBool,
    bootstrap: &Path,
    me: &Path,
    dir: &Path,
    procs: &mut Vec<Proc>,
) -> Result<(), DemoError> {
    let mkdir = |p: &Path| {
        std::fs::create_dir_all(p).map_err(|source| DemoError::Dir {
            path: p.to_path_buf(),
            source,
        })
    };
    let bdir = dir.join("bootstrap");
    mkdir(&bdir)?;
    let mut cmd = Command::new(bootstrap);
    cmd.args(["--listen", "/ip4/127.0.0.1/tcp/0", "--private-network"])
        .arg("--key")
        .arg(bdir.join("bootstrap.key"))
        .arg("--status-addr")
        .arg(format!("127.0.0.1:{}", port(args.port, 0)));
    procs.push(Proc::spawn("bootstrap", cmd, bdir.join("log.txt"))?);
    let baddr = procs[0].wait_line("/ip4/127.0.0.1/", stop)?;
    let baddr = format!("/ip4/127.0.0.1/{baddr}");
    let bdash = procs[0].wait_line("dashboard on ", stop)?;
    println!("bootstrap peer {baddr}");
    println!("  dashboard {bdash}");

    let backend = args
        .backend
        .to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_else(|| "cpu".into());
    for i in 1..=args.nodes {
        let ndir = dir.join(format!("node-{i}"));
        mkdir(&ndir)?;
        let mut cmd = Command::new(me);
        cmd.arg("join")
            .args(["--bootstrap", &baddr])
            .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
            .arg("--status-addr")
            .arg(format!("127.0.0.1:{}", port(args.port, i)))
            .arg("--checkpoint-dir")
            .arg(ndir.join("ckpt"))
            .args(["--model", &args.model])
            .args(["--inner-steps", &args.inner_steps.to_string()])
            .args(["--batch", &args.batch.to_string()])
            .args(["--backend", &backend])
            .args(["--founders", &args.nodes.to_string()])
            .arg("--private-network");
        if args.rounds > 0 {
            cmd.args(["--rounds", &args.rounds.to_string()]);
        }
        if let Some(d) = &args.data {
            cmd.arg("--data").arg(d);
        }
        cmd.args(&args.join_args);
        procs.push(Proc::spawn(
            &format!("node {i}"),
            cmd,
            ndir.join("log.txt"),
        )?);
    }
    let mut addrs: Vec<SocketAddr> = Vec::new();
    for i in 1..=args.nodes as usize {
        let url = procs[i].wait_line("dashboard on ", stop)?;
        println!("node {i} dashboard {url}");
        let hostport = url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        match hostport.parse() {
            Ok(a) => addrs.push(a),
            Err(_) => {
                return Err(DemoError::Start {
                    what: procs[i].name.clone(),
                    why: format!("unreadable dashboard address '{url}'"),
                    log: procs[i].log.clone(),
                    tail: procs[i].tail(),
                })
            }
        }
    }
    println!("following the run (Ctrl+C stops every process cleanly)");
    follow(&addrs, procs, stop);
    Ok(())
}

/// Prints a progress line whenever it changes, until `stop` or every node has exited.
fn follow(addrs: &[SocketAddr], procs: &mut [Proc], stop: &AtomicBool) {
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let bar = if tty {
        let b = indicatif::ProgressBar::new_spinner();
        b.enable_steady_tick(Duration::from_millis(200));
        Some(b)
    } else {
        None
    };
    let mut last = String::new();
    while !stop.load(Ordering::Relaxed) {
        let statuses: Vec<Option<Status>> = addrs
            .iter()
            .map(|a| {
                fetch(*a, Duration::from_secs(2))
                    .ok()
                    .and_then(|b| serde_json::from_str(&b).ok())
            })
            .collect();
        let line = progress_line(&statuses);
        match &bar {
            Some(b) => b.set_message(line),
            None => {
                // In a log, a line when the round, losses or agreement change (not the phases,
                // which change every few seconds).
                let key = line.rsplit_once(" | ").map_or(line.as_str(), |(k, _)| k);
                if key != last {
                    last = key.to_string();
                    println!("{line}");
                }
            }
        }
        let all_exited = procs
            .iter_mut()
            .skip(1)
            .all(|p| matches!(p.child.try_wait(), Ok(Some(_))));
        if all_exited {
            println!("every node has stopped");
            break;
        }
        for _ in 0..10 {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    if let Some(b) = bar {
        b.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(round: u64, hash: &str, loss: Option<f32>) -> Option<Status> {
        Some(Status {
            round,
            global_hash: hash.into(),
            last_loss: loss,
            ..Status::default()
        })
    }

    #[test]
    fn the_progress_line_says_whether_the_nodes_agree() {
        let l = progress_line(&[st(4, "aaaa", Some(3.0)), st(4, "aaaa", Some(2.0)), None]);
        assert!(l.contains("round 4"), "{l}");
        assert!(l.contains("2/3 at round 4 agree on aaaa"), "{l}");
        assert!(l.contains("train loss 2.5000"), "{l}");
        let l = progress_line(&[st(4, "aaaa", None), st(4, "bbbb", None)]);
        assert!(l.contains("2 different global hashes at round 4"), "{l}");
        // A node behind does not count as disagreeing.
        let l = progress_line(&[st(5, "cccc", None), st(4, "bbbb", None)]);
        assert!(l.contains("1/2 at round 5 agree"), "{l}");
        assert_eq!(progress_line(&[None, None]), "0/2 nodes answering");
    }

    #[test]
    fn ports_follow_the_base_or_are_all_picked_by_the_system() {
        assert_eq!(port(8480, 2), 8482);
        assert_eq!(port(0, 2), 0);
        assert_eq!(port(u16::MAX, 2), u16::MAX);
    }
}
