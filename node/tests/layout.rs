//! The import rules of docs/ARCHITECTURE.md, checked on the sources: `train/` knows no
//! network, `net/` knows no model, the protocol crate depends on no tokio, libp2p or burn, and
//! no source file grows past 1,200 lines.

use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every line of the sources under `dir` that mentions one of `forbidden` outside a comment.
fn offenders(dir: &str, forbidden: &[&str]) -> Vec<String> {
    let mut files = Vec::new();
    sources(&root().join(dir), &mut files);
    assert!(!files.is_empty(), "no sources under {dir}");
    let mut bad = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for (i, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            if forbidden.iter().any(|w| code.contains(w)) {
                bad.push(format!("{}:{}: {}", f.display(), i + 1, line.trim()));
            }
        }
    }
    bad
}

#[test]
fn train_knows_no_network() {
    let bad = offenders("node/src/train", &["crate::net", "crate::driver", "libp2p"]);
    assert!(bad.is_empty(), "{bad:#?}");
}

#[test]
fn net_knows_no_model() {
    let bad = offenders("node/src/net", &["crate::train", "crate::driver", "burn"]);
    assert!(bad.is_empty(), "{bad:#?}");
}

#[test]
fn the_protocol_does_no_io() {
    let bad = offenders(
        "protocol/src",
        &["tokio", "libp2p", "burn", "std::net", "std::fs"],
    );
    assert!(bad.is_empty(), "{bad:#?}");
    let manifest = std::fs::read_to_string(root().join("protocol/Cargo.toml")).unwrap();
    for dep in ["tokio", "libp2p", "burn"] {
        assert!(!manifest.contains(dep), "protocol/Cargo.toml names {dep}");
    }
}

#[test]
fn no_source_file_is_over_1200_lines() {
    let mut files = Vec::new();
    for dir in ["node", "protocol", "p2p", "bootstrap"] {
        sources(&root().join(dir), &mut files);
    }
    let long: Vec<String> = files
        .iter()
        .filter(|f| !f.components().any(|c| c.as_os_str() == "target"))
        .filter_map(|f| {
            let n = std::fs::read_to_string(f).unwrap().lines().count();
            (n > 1200).then(|| format!("{}: {n} lines", f.display()))
        })
        .collect();
    assert!(long.is_empty(), "{long:#?}");
}
