//! Helpers shared by the multi-process tests (`network.rs`, `adversary.rs`): spawning the
//! real `diloco-bootstrap` and `diloco-node` binaries on loopback, reading their stdout, logs
//! and `/status`, and waiting for agreement with deadlines that print every log on failure.
#![allow(dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Proc, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub fn node_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_diloco-node"))
}

pub fn bootstrap_bin() -> PathBuf {
    let p = node_bin().with_file_name("diloco-bootstrap");
    assert!(
        p.exists(),
        "{} is missing: run the tests with `cargo test --workspace` so the bootstrap binary is built",
        p.display()
    );
    p
}

pub struct Running {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
    pub lines: mpsc::Receiver<String>,
}

impl Running {
    pub fn spawn(name: &str, mut cmd: Proc, dir: &Path) -> Running {
        // A restarted node keeps its earlier lives' logs (name.log, name-2.log, ...).
        let mut log = dir.join(format!("{name}.log"));
        let mut life = 2;
        while log.exists() {
            log = dir.join(format!("{name}-{life}.log"));
            life += 1;
        }
        let err = std::fs::File::create(&log).unwrap();
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::from(err))
            .env("DILOCO_LOG", "info,libp2p_gossipsub=error,libp2p_kad=error")
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running {
            name: name.into(),
            child,
            log,
            lines: rx,
        }
    }

    /// The first stdout line containing `needle`.
    pub fn wait_line(&self, needle: &str, timeout: Duration) -> String {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(l) = self.lines.recv_timeout(Duration::from_millis(200)) {
                if l.contains(needle) {
                    return l;
                }
            }
        }
        panic!(
            "{} printed no line with '{needle}'\n{}",
            self.name,
            self.tail()
        );
    }

    /// Waits until the log (stderr) has a line containing `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if text.contains(needle) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "{} logged no line with '{needle}'\n{}",
            self.name,
            self.tail()
        );
    }

    pub fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(60);
        format!("---- {} ----\n{}", self.name, lines[start..].join("\n"))
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

pub fn status(addr: SocketAddr) -> Option<Value> {
    serde_json::from_str(&http_get(addr, "/status")?).ok()
}

pub struct Net {
    pub dir: tempfile::TempDir,
    pub bootstrap: String,
    pub procs: Vec<Running>,
    pub nodes: Vec<(usize, SocketAddr)>,
}

impl Net {
    /// A temporary folder with `run_config` as run.json, and a bootstrap peer in it.
    pub fn start(run_config: &str) -> Net {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("run.json"), run_config).unwrap();
        let mut cmd = Proc::new(bootstrap_bin());
        cmd.args(["--listen", "/ip4/127.0.0.1/tcp/0", "--key"])
            .arg(dir.path().join("boot.key"));
        let boot = Running::spawn("bootstrap", cmd, dir.path());
        let bootstrap = boot.wait_line("/p2p/", Duration::from_secs(30));
        Net {
            dir,
            bootstrap,
            procs: vec![boot],
            nodes: Vec::new(),
        }
    }

    pub fn logs(&self) -> String {
        self.procs
            .iter()
            .map(Running::tail)
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn start_node(&mut self, name: &str) -> SocketAddr {
        self.start_node_with(name, &[])
    }

    /// Writes `secret` (hex) as the identity key of node `name` (its checkpoint folder's
    /// node.key) and returns its libp2p peer id.
    pub fn key_for(&self, name: &str, secret: u8) -> String {
        let dir = self.dir.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("node.key"), hex::encode([secret; 32])).unwrap();
        diloco_p2p::keys::Identity::from_secret([secret; 32])
            .peer_id()
            .to_string()
    }

    /// `diloco-node <sub> --run-config run.json --checkpoint-dir <name> <args>`, run to the end.
    pub fn run_cli(&self, sub: &str, name: &str, args: &[&str]) -> std::process::Output {
        Proc::new(node_bin())
            .arg(sub)
            .arg("--run-config")
            .arg(self.dir.path().join("run.json"))
            .arg("--checkpoint-dir")
            .arg(self.dir.path().join(name))
            .args(args)
            .env("DILOCO_LOG", "warn")
            .output()
            .unwrap()
    }

    pub fn start_node_with(&mut self, name: &str, extra: &[&str]) -> SocketAddr {
        let dir = self.dir.path().join(name);
        let mut cmd = Proc::new(node_bin());
        cmd.args(["join", "--bootstrap", &self.bootstrap])
            .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
            .args(["--status-addr", "127.0.0.1:0"])
            .arg("--run-config")
            .arg(self.dir.path().join("run.json"))
            .args([
                "--backend",
                "cpu",
                "--genesis-wait",
                "2",
                "--eval-windows",
                "4",
            ])
            .args(["--checkpoint-every", "1"])
            .arg("--checkpoint-dir")
            .arg(&dir)
            .args(extra);
        let p = Running::spawn(name, cmd, self.dir.path());
        let line = p.wait_line("status on http://", Duration::from_secs(60));
        let addr: SocketAddr = line
            .trim_start_matches("status on http://")
            .trim_end_matches("/status")
            .parse()
            .unwrap();
        self.procs.push(p);
        self.nodes.push((self.procs.len() - 1, addr));
        addr
    }

    pub fn statuses(&self, which: &[SocketAddr]) -> Vec<Option<Value>> {
        which.iter().map(|a| status(*a)).collect()
    }

    /// Waits until every node in `which` is a member of a group of `which.len()`, at the same
    /// round ≥ `min_round` with one global_hash; returns that round and hash.
    pub fn wait_agree(
        &self,
        which: &[SocketAddr],
        min_round: u64,
        timeout: Duration,
    ) -> (u64, String) {
        let n = which.len() as u64;
        let end = Instant::now() + timeout;
        let mut last = Vec::new();
        while Instant::now() < end {
            let st = self.statuses(which);
            let rounds: Vec<Option<u64>> = st
                .iter()
                .map(|s| s.as_ref().and_then(|v| v["round"].as_u64()))
                .collect();
            let hashes: Vec<Option<String>> = st
                .iter()
                .map(|s| {
                    s.as_ref()
                        .and_then(|v| v["global_hash"].as_str().map(String::from))
                })
                .collect();
            if let (Some(Some(r)), Some(Some(h))) = (rounds.first(), hashes.first()) {
                if *r >= min_round
                    && !h.is_empty()
                    && rounds.iter().all(|x| *x == Some(*r))
                    && st.iter().all(|s| {
                        s.as_ref().is_some_and(|v| {
                            v["member"].as_bool() == Some(true)
                                && v["group_size"].as_u64() == Some(n)
                        })
                    })
                    && hashes.iter().all(|x| x.as_deref() == Some(h.as_str()))
                {
                    return (*r, h.clone());
                }
            }
            last = st
                .iter()
                .map(|s| {
                    s.as_ref().map(|v| {
                        format!(
                            "round {} group {} member {} hash {:.12}",
                            v["round"], v["group_size"], v["member"], v["global_hash"]
                        )
                    })
                })
                .collect();
            std::thread::sleep(Duration::from_millis(150));
        }
        panic!(
            "nodes did not agree on a round >= {min_round} within {timeout:?}; last seen {last:?}\n{}",
            self.logs()
        );
    }
}
