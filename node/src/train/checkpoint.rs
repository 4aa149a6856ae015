//! Checkpoints: global parameters as safetensors plus a small JSON state file, written
//! atomically.
//!
//! Layout of `--checkpoint-dir DIR`:
//!
//! ```text
//! DIR/LATEST                       name of the newest complete checkpoint ("step-00000400")
//! DIR/step-00000400/model.safetensors      global parameters, tensor names = module paths
//! DIR/step-00000400/optimizer.safetensors  AdamW moments `<path>.exp_avg` / `.exp_avg_sq`
//!                                          and/or outer momentum `<path>.outer_momentum`
//! DIR/step-00000400/state.json             step, round, run config, blake3 of the files
//! ```
//!
//! A checkpoint is written into `step-N.tmp/`, every file fsynced, the directory renamed to
//! `step-N/`, and only then is `LATEST` replaced (temp file, fsync, rename, fsync of `DIR`). A
//! crash at any moment leaves `LATEST` naming a complete checkpoint. Loading re-hashes every
//! file against `state.json`, so a truncated or altered checkpoint is refused with a message
//! instead of being trained on. The two newest checkpoints are kept.

use crate::train::flat::ParamInfo;
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Format version written into `state.json`.
pub const FORMAT_VERSION: u32 = 1;
const KEEP: usize = 2;

/// Errors writing or reading checkpoints.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// File system error (disk full, permissions, ...).
    #[error("checkpoint I/O on {path}: {source} (nothing was overwritten; free space or fix permissions and retry)")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// No checkpoint was found where one was required.
    #[error("no checkpoint in {0}: run without --resume to start fresh")]
    NotFound(PathBuf),
    /// The checkpoint is damaged.
    #[error("checkpoint {path} is corrupt or truncated: {reason}; delete it (the previous one, if any, is kept beside it) or start without --resume")]
    Corrupt {
        /// The checkpoint directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The checkpoint belongs to another model or run configuration.
    #[error("checkpoint {path} was written by a different run: {reason}; use the same flags as that run, or another --checkpoint-dir")]
    Mismatch {
        /// The checkpoint directory.
        path: PathBuf,
        /// Which settings differ.
        reason: String,
    },
}

/// Small state saved beside the tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// [`FORMAT_VERSION`].
    pub version: u32,
    /// Global inner step reached.
    pub step: u64,
    /// DiLoCo round reached (0 for plain training).
    pub round: u64,
    /// AdamW step counter.
    pub adam_t: u64,
    /// The run configuration (model, hyperparameters, data), compared on resume.
    pub run: serde_json::Value,
    /// blake3 of the global parameters as f32 LE (the `global_hash`).
    pub global_hash: String,
    /// blake3 of each file in the checkpoint, by file name.
    pub files: BTreeMap<String, String>,
    /// Agreed network state (`join` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<NetCheckpoint>,
}

/// The parts of a node's agreed state that are not tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetCheckpoint {
    /// Chain hash at the start of the saved round, hex.
    pub chain: String,
    /// Members of the saved round (ed25519 public keys, hex), sorted.
    pub members: Vec<String>,
    /// The peer that founded this history of the run (hex), to tell forks apart.
    #[serde(default)]
    pub founder: String,
}

/// A checkpoint read back from disk.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// Its state file.
    pub state: State,
    /// Global parameters in flat order.
    pub params: Vec<f32>,
    /// Optimizer tensors by suffix (`exp_avg`, `exp_avg_sq`, `outer_momentum`), each flat.
    pub optimizer: BTreeMap<String, Vec<f32>>,
    /// Directory it came from.
    pub path: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Serialises named flat vectors, split per parameter, to safetensors bytes.
fn to_safetensors(layout: &[ParamInfo], groups: &[(&str, &[f32])]) -> Result<Vec<u8>, String> {
    let total: usize = layout.iter().map(ParamInfo::len).sum();
    let mut buffers: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (suffix, values) in groups {
        if values.len() != total {
            return Err(format!(
                "{suffix}: {} values for {total} parameters",
                values.len()
            ));
        }
        let mut off = 0;
        for p in layout {
            let name = if suffix.is_empty() {
                p.name.clone()
            } else {
                format!("{}.{suffix}", p.name)
            };
            buffers.push((
                name,
                p.shape.clone(),
                f32_bytes(&values[off..off + p.len()]),
            ));
            off += p.len();
        }
    }
    let views: Vec<(String, TensorView<'_>)> = buffers
        .iter()
        .map(|(n, s, b)| TensorView::new(Dtype::F32, s.clone(), b).map(|v| (n.clone(), v)))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    safetensors::serialize(views, None).map_err(|e| e.to_string())
}

/// Parses safetensors bytes back into flat vectors per suffix, checking names and shapes.
fn from_safetensors(
    bytes: &[u8],
    layout: &[ParamInfo],
    suffixes: &[&str],
) -> Result<BTreeMap<String, Vec<f32>>, String> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    for suffix in suffixes {
        let mut values = Vec::new();
        for p in layout {
            let name = if suffix.is_empty() {
                p.name.clone()
            } else {
                format!("{}.{suffix}", p.name)
            };
            let t = st
                .tensor(&name)
                .map_err(|_| format!("tensor {name} is missing"))?;
            if t.dtype() != Dtype::F32 || t.shape() != p.shape.as_slice() {
                return Err(format!(
                    "tensor {name} is {:?} {:?}, this model needs F32 {:?}",
                    t.dtype(),
                    t.shape(),
                    p.shape
                ));
            }
            values.extend(
                t.data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
        }
        out.insert(suffix.to_string(), values);
    }
    Ok(out)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let mut f = fs::File::create(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

fn sync_dir(path: &Path) -> Result<(), CheckpointError> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io(path))
}

/// Writes `params` (in `layout` order) as one safetensors file, tensor names as in
/// `model.safetensors` of a checkpoint. Not atomic: for exports, not for checkpoints.
pub fn write_params(path: &Path, layout: &[ParamInfo], params: &[f32]) -> std::io::Result<()> {
    let bytes = to_safetensors(layout, &[("", params)]).map_err(std::io::Error::other)?;
    fs::write(path, bytes)
}

/// Writes a checkpoint for `state.step` into `dir`; returns its directory.
///
/// `optimizer` holds named flat vectors (`exp_avg`, `exp_avg_sq`, `outer_momentum`).
pub fn save(
    dir: &Path,
    layout: &[ParamInfo],
    params: &[f32],
    optimizer: &[(&str, &[f32])],
    mut state: State,
) -> Result<PathBuf, CheckpointError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    let name = format!("step-{:08}", state.step);
    let tmp = dir.join(format!("{name}.tmp"));
    let fin = dir.join(&name);
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    fs::create_dir(&tmp).map_err(io(&tmp))?;
    let corrupt = |reason: String| CheckpointError::Corrupt {
        path: tmp.clone(),
        reason,
    };
    let model = to_safetensors(layout, &[("", params)]).map_err(corrupt)?;
    let optim = to_safetensors(layout, optimizer).map_err(corrupt)?;
    state.version = FORMAT_VERSION;
    state.files.clear();
    for (file, bytes) in [
        ("model.safetensors", &model),
        ("optimizer.safetensors", &optim),
    ] {
        write_synced(&tmp.join(file), bytes)?;
        state
            .files
            .insert(file.to_string(), blake3::hash(bytes).to_hex().to_string());
    }
    let json = serde_json::to_vec_pretty(&state).map_err(|e| corrupt(e.to_string()))?;
    write_synced(&tmp.join("state.json"), &json)?;
    sync_dir(&tmp)?;
    if fin.exists() {
        fs::remove_dir_all(&fin).map_err(io(&fin))?;
    }
    fs::rename(&tmp, &fin).map_err(io(&fin))?;
    let latest_tmp = dir.join("LATEST.tmp");
    write_synced(&latest_tmp, name.as_bytes())?;
    fs::rename(&latest_tmp, dir.join("LATEST")).map_err(io(dir))?;
    sync_dir(dir)?;
    prune(dir, &name);
    Ok(fin)
}

/// Removes all but the newest [`KEEP`] complete checkpoints (best effort).
fn prune(dir: &Path, newest: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("step-") && !n.ends_with(".tmp") && n.as_str() <= newest)
        .collect();
    names.sort();
    let excess = names.len().saturating_sub(KEEP);
    for n in &names[..excess] {
        if let Err(e) = fs::remove_dir_all(dir.join(n)) {
            tracing::warn!(checkpoint = %n, error = %e, "could not prune old checkpoint");
        }
    }
}

/// Loads the checkpoint `LATEST` names in `dir`, verifying file hashes and tensor shapes
/// against `layout`. Returns `Ok(None)` when `dir` has no checkpoint yet.
pub fn load_latest(
    dir: &Path,
    layout: &[ParamInfo],
    optimizer_suffixes: &[&str],
) -> Result<Option<Loaded>, CheckpointError> {
    let latest = dir.join("LATEST");
    let name = match fs::read_to_string(&latest) {
        Ok(n) => n.trim().to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(&latest)(e)),
    };
    if !name.starts_with("step-") || name.contains(['/', '\\']) || name.contains("..") {
        return Err(CheckpointError::Corrupt {
            path: latest,
            reason: format!("LATEST names '{name}'"),
        });
    }
    load(&dir.join(name), layout, optimizer_suffixes).map(Some)
}

/// Loads one checkpoint directory.
pub fn load(
    path: &Path,
    layout: &[ParamInfo],
    optimizer_suffixes: &[&str],
) -> Result<Loaded, CheckpointError> {
    let corrupt = |reason: String| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let read = |file: &str| {
        let p = path.join(file);
        fs::read(&p).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => corrupt(format!("{file} is missing")),
            _ => io(&p)(e),
        })
    };
    let state: State = serde_json::from_slice(&read("state.json")?)
        .map_err(|e| corrupt(format!("state.json does not parse: {e}")))?;
    if state.version != FORMAT_VERSION {
        return Err(corrupt(format!(
            "format version {} (this build reads {FORMAT_VERSION})",
            state.version
        )));
    }
    let mut blobs = BTreeMap::new();
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let bytes = read(file)?;
        let want = state
            .files
            .get(file)
            .ok_or_else(|| corrupt(format!("state.json lists no hash for {file}")))?;
        if blake3::hash(&bytes).to_hex().as_str() != want {
            return Err(corrupt(format!(
                "{file} does not match its hash in state.json"
            )));
        }
        blobs.insert(file, bytes);
    }
    let mismatch = |reason: String| CheckpointError::Mismatch {
        path: path.to_path_buf(),
        reason,
    };
    let params = from_safetensors(&blobs["model.safetensors"], layout, &[""])
        .map_err(mismatch)?
        .remove("")
        .unwrap_or_default();
    let optimizer = from_safetensors(&blobs["optimizer.safetensors"], layout, optimizer_suffixes)
        .map_err(mismatch)?;
    if diloco_protocol::outer::hash_f32(&params) != state.global_hash {
        return Err(corrupt(
            "parameters do not match global_hash in state.json".into(),
        ));
    }
    Ok(Loaded {
        state,
        params,
        optimizer,
        path: path.to_path_buf(),
    })
}

/// Compares the run configuration stored in a checkpoint with the current one; fields listed in
/// `may_differ` (e.g. `steps`) are ignored.
pub fn check_run(
    loaded: &Loaded,
    current: &serde_json::Value,
    may_differ: &[&str],
) -> Result<(), CheckpointError> {
    let (Some(old), Some(new)) = (loaded.state.run.as_object(), current.as_object()) else {
        return Err(CheckpointError::Corrupt {
            path: loaded.path.clone(),
            reason: "run config is not an object".into(),
        });
    };
    let mut diffs = Vec::new();
    for (k, v) in new {
        if may_differ.contains(&k.as_str()) {
            continue;
        }
        match old.get(k) {
            Some(o) if o == v => {}
            Some(o) => diffs.push(format!("{k} was {o}, now {v}")),
            None => diffs.push(format!("{k} is new ({v})")),
        }
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(CheckpointError::Mismatch {
            path: loaded.path.clone(),
            reason: diffs.join("; "),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Vec<ParamInfo> {
        vec![
            ParamInfo {
                name: "a.weight".into(),
                shape: vec![2, 3],
            },
            ParamInfo {
                name: "b".into(),
                shape: vec![4],
            },
        ]
    }

    fn state(step: u64, params: &[f32]) -> State {
        State {
            version: FORMAT_VERSION,
            step,
            round: 0,
            adam_t: step,
            run: serde_json::json!({"model": "x", "steps": 10}),
            global_hash: diloco_protocol::outer::hash_f32(params),
            files: BTreeMap::new(),
            net: None,
        }
    }

    #[test]
    fn save_load_roundtrip_and_pruning() {
        let dir = tempfile::tempdir().unwrap();
        let lay = layout();
        let p: Vec<f32> = (0..10).map(|i| i as f32).collect();
        let m: Vec<f32> = (0..10).map(|i| -(i as f32)).collect();
        for step in [1, 2, 3] {
            save(
                dir.path(),
                &lay,
                &p,
                &[("outer_momentum", &m)],
                state(step, &p),
            )
            .unwrap();
        }
        let l = load_latest(dir.path(), &lay, &["outer_momentum"])
            .unwrap()
            .unwrap();
        assert_eq!(l.state.step, 3);
        assert_eq!(l.params, p);
        assert_eq!(l.optimizer["outer_momentum"], m);
        assert!(!dir.path().join("step-00000001").exists());
        assert!(dir.path().join("step-00000002").exists());
        let ok = serde_json::json!({"model": "x", "steps": 20});
        check_run(&l, &ok, &["steps"]).unwrap();
        let bad = serde_json::json!({"model": "y", "steps": 10});
        assert!(matches!(
            check_run(&l, &bad, &["steps"]),
            Err(CheckpointError::Mismatch { .. })
        ));
    }

    #[test]
    fn truncated_or_foreign_checkpoints_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let lay = layout();
        let p = vec![0.5f32; 10];
        let path = save(dir.path(), &lay, &p, &[("exp_avg", &p)], state(5, &p)).unwrap();
        // Another model shape.
        let other = vec![
            ParamInfo {
                name: "a.weight".into(),
                shape: vec![3, 2],
            },
            lay[1].clone(),
        ];
        assert!(matches!(
            load_latest(dir.path(), &other, &["exp_avg"]),
            Err(CheckpointError::Mismatch { .. })
        ));
        // Truncated tensor file.
        let f = path.join("model.safetensors");
        let bytes = fs::read(&f).unwrap();
        fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
        let e = load_latest(dir.path(), &lay, &["exp_avg"]).unwrap_err();
        assert!(matches!(e, CheckpointError::Corrupt { .. }), "{e}");
        // Garbage state file.
        fs::write(path.join("state.json"), b"{not json").unwrap();
        assert!(matches!(
            load_latest(dir.path(), &lay, &["exp_avg"]),
            Err(CheckpointError::Corrupt { .. })
        ));
        // Nothing there at all.
        let empty = tempfile::tempdir().unwrap();
        assert!(load_latest(empty.path(), &lay, &[]).unwrap().is_none());
    }
}
