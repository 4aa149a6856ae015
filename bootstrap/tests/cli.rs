//! The `diloco-bootstrap` binary as a user runs it: it prints a dialable address with its peer
//! id, keeps its identity across restarts, and refuses bad flags with a clear message.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_diloco-bootstrap"))
}

fn first_addr(key: &std::path::Path) -> String {
    let mut child = bin()
        .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--key"])
        .arg(key)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(out).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("no address printed");
    let _ = child.kill();
    let _ = child.wait();
    line.trim().to_string()
}

#[test]
fn prints_its_full_address_and_keeps_its_identity() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("boot.key");
    let a = first_addr(&key);
    assert!(a.starts_with("/ip4/127.0.0.1/tcp/"), "{a}");
    let (peer, _) = diloco_p2p::addr::parse_bootstrap(&a).unwrap();
    let b = first_addr(&key);
    let (peer2, _) = diloco_p2p::addr::parse_bootstrap(&b).unwrap();
    assert_eq!(peer, peer2, "the key file must keep the peer id");
}

#[test]
fn bad_flags_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .args(["--listen", "localhost:4001", "--key"])
        .arg(dir.path().join("k"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not a multiaddr"), "{err}");

    let bad_key = dir.path().join("bad.key");
    std::fs::write(&bad_key, "not a key").unwrap();
    let out = bin()
        .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--key"])
        .arg(&bad_key)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not a diloco key"), "{err}");

    // A port in use.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let out = bin()
        .args(["--listen", &format!("/ip4/127.0.0.1/tcp/{port}"), "--key"])
        .arg(dir.path().join("k2"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "listening on a busy port must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot listen"), "{err}");
}
