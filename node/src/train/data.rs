//! Training data: loading a corpus, the held-out split, and per-replica batch streams.
//!
//! Input is bytes (the model's vocabulary is the 256 byte values). Accepted sources:
//! a plain text file, a directory of `.txt` / `.jsonl` files (sorted by name), a JSONL file
//! whose lines are objects with a `"text"` field, or nothing at all — then a built-in
//! deterministic generated corpus is used so the node runs anywhere.
//!
//! The last `eval_fraction` of the corpus (5% by default) is held out for evaluation unless an
//! explicit eval file is given. The training part is cut into equal contiguous shards, one per
//! replica; replica `r` samples windows only from its own shard, from a ChaCha stream seeded by
//! (seed, replica, step). Two replicas therefore never see the same batch, and a stream can be
//! resumed at any step without replaying earlier ones.

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Largest corpus we load into memory (4 GiB).
pub const MAX_CORPUS_BYTES: u64 = 4 << 30;

/// Errors loading or sampling data.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DataError {
    /// The path does not exist.
    #[error("data path {0} does not exist: pass --data with a text file, a directory of .txt files or a .jsonl file (or omit --data for the built-in corpus)")]
    Missing(PathBuf),
    /// Reading failed.
    #[error("cannot read {path}: {source}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Nothing usable was found.
    #[error("data at {0} is empty: it must contain some text")]
    Empty(PathBuf),
    /// A directory held no `.txt` or `.jsonl` file.
    #[error("directory {0} contains no .txt or .jsonl files")]
    NoFiles(PathBuf),
    /// A JSONL line was not an object with a string `text` field.
    #[error("{path}:{line}: {reason}; every line of a .jsonl file must be a JSON object with a string \"text\" field")]
    BadJsonl {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What was wrong.
        reason: String,
    },
    /// The corpus is larger than we are willing to hold in memory.
    #[error(
        "data at {path} is {bytes} bytes, more than the {max} byte limit; split it or use a subset"
    )]
    TooLarge {
        /// The path.
        path: PathBuf,
        /// Its size.
        bytes: u64,
        /// The limit.
        max: u64,
    },
    /// A split is too short to cut even one training window from.
    #[error("{what} has {have} bytes but needs at least {need} (one sequence of {seq} plus one byte per shard of {shards}); use more data, a shorter --seq or fewer replicas")]
    TooShort {
        /// Which split.
        what: &'static str,
        /// Bytes available (per shard for training).
        have: usize,
        /// Bytes needed.
        need: usize,
        /// Sequence length.
        seq: usize,
        /// Number of shards.
        shards: usize,
    },
}

/// A loaded corpus split into training and evaluation bytes.
#[derive(Debug, Clone)]
pub struct Corpus {
    /// Training bytes.
    pub train: Vec<u8>,
    /// Held-out bytes.
    pub eval: Vec<u8>,
    /// Human-readable description of the source (also hashed into the run config).
    pub source: String,
    /// blake3 of the training and eval bytes, hex.
    pub hash: String,
}

/// Where data comes from.
#[derive(Debug, Clone, Default)]
pub struct DataSpec {
    /// `None` for the built-in corpus.
    pub path: Option<PathBuf>,
    /// Explicit eval data; `None` holds out the tail of the training data.
    pub eval_path: Option<PathBuf>,
    /// Fraction of the data held out when `eval_path` is `None`.
    pub eval_fraction: f64,
}

impl Corpus {
    /// Loads a corpus as described by `spec`.
    pub fn load(spec: &DataSpec) -> Result<Self, DataError> {
        let (all, source) = match &spec.path {
            Some(p) => (read_source(p)?, p.display().to_string()),
            None => (builtin_corpus(), "builtin".to_string()),
        };
        let (train, eval) = match &spec.eval_path {
            Some(p) => (all, read_source(p)?),
            None => {
                let frac = spec.eval_fraction.clamp(0.0, 0.5);
                let cut = all.len() - ((all.len() as f64 * frac) as usize);
                let mut train = all;
                let eval = train.split_off(cut);
                (train, eval)
            }
        };
        let mut h = blake3::Hasher::new();
        h.update(&(train.len() as u64).to_le_bytes());
        h.update(&train);
        h.update(&eval);
        Ok(Self {
            train,
            eval,
            source,
            hash: h.finalize().to_hex().to_string(),
        })
    }

    /// Checks that `shards` training shards and the eval split each hold a window of `seq`.
    pub fn check(&self, seq: usize, shards: usize) -> Result<(), DataError> {
        let need = seq + 1;
        let per_shard = self.train.len() / shards.max(1);
        if per_shard < need {
            return Err(DataError::TooShort {
                what: "training data (per replica shard)",
                have: per_shard,
                need,
                seq,
                shards,
            });
        }
        if self.eval.len() < need {
            return Err(DataError::TooShort {
                what: "eval data",
                have: self.eval.len(),
                need,
                seq,
                shards: 1,
            });
        }
        Ok(())
    }
}

fn read_source(path: &Path) -> Result<Vec<u8>, DataError> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => DataError::Missing(path.to_path_buf()),
        _ => DataError::Unreadable {
            path: path.to_path_buf(),
            source: e,
        },
    })?;
    let out = if meta.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| DataError::Unreadable {
                path: path.to_path_buf(),
                source: e,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && matches!(
                        p.extension().and_then(|e| e.to_str()),
                        Some("txt" | "jsonl")
                    )
            })
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(DataError::NoFiles(path.to_path_buf()));
        }
        let mut out = Vec::new();
        for f in files {
            let bytes = read_file(&f)?;
            if !out.is_empty() && !bytes.is_empty() {
                out.push(b'\n');
            }
            out.extend(bytes);
            if out.len() as u64 > MAX_CORPUS_BYTES {
                return Err(DataError::TooLarge {
                    path: path.to_path_buf(),
                    bytes: out.len() as u64,
                    max: MAX_CORPUS_BYTES,
                });
            }
        }
        out
    } else {
        read_file(path)?
    };
    if out.is_empty() {
        return Err(DataError::Empty(path.to_path_buf()));
    }
    Ok(out)
}

fn read_file(path: &Path) -> Result<Vec<u8>, DataError> {
    let unreadable = |e| DataError::Unreadable {
        path: path.to_path_buf(),
        source: e,
    };
    let len = std::fs::metadata(path).map_err(unreadable)?.len();
    if len > MAX_CORPUS_BYTES {
        return Err(DataError::TooLarge {
            path: path.to_path_buf(),
            bytes: len,
            max: MAX_CORPUS_BYTES,
        });
    }
    let bytes = std::fs::read(path).map_err(unreadable)?;
    if path.extension().and_then(|e| e.to_str()) == Some("jsonl") {
        parse_jsonl(path, &bytes)
    } else {
        Ok(bytes)
    }
}

fn parse_jsonl(path: &Path, bytes: &[u8]) -> Result<Vec<u8>, DataError> {
    let mut out = Vec::new();
    for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let bad = |reason: String| DataError::BadJsonl {
            path: path.to_path_buf(),
            line: i + 1,
            reason,
        };
        let v: serde_json::Value =
            serde_json::from_slice(line).map_err(|e| bad(format!("not valid JSON ({e})")))?;
        let text = v
            .get("text")
            .ok_or_else(|| bad("no \"text\" field".into()))?
            .as_str()
            .ok_or_else(|| bad("\"text\" is not a string".into()))?;
        if !out.is_empty() {
            out.push(b'\n');
        }
        out.extend_from_slice(text.as_bytes());
    }
    Ok(out)
}

/// The built-in corpus: ~1 MB of deterministic generated English-like text with structure a
/// small model can learn (templated sentences, counting and addition facts).
pub fn builtin_corpus() -> Vec<u8> {
    const SUBJECTS: &[&str] = &[
        "the cat",
        "a dog",
        "the old king",
        "my sister",
        "the farmer",
        "a small bird",
        "the ship",
        "our teacher",
        "the queen",
        "a young fox",
        "the river",
        "his friend",
    ];
    const VERBS: &[&str] = &[
        "sees",
        "likes",
        "follows",
        "finds",
        "helps",
        "watches",
        "carries",
        "remembers",
    ];
    const OBJECTS: &[&str] = &[
        "the moon",
        "a red apple",
        "the long road",
        "an old book",
        "the green hill",
        "a bright star",
        "the quiet house",
        "a warm fire",
        "the open sea",
        "a silver key",
    ];
    const PLACES: &[&str] = &[
        "in the morning",
        "at night",
        "by the water",
        "near the town",
        "after the rain",
        "under the bridge",
    ];
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed_c0de);
    let mut pick = |n: usize| (rng.next_u32() as usize) % n;
    let mut out = String::with_capacity(1 << 20);
    let mut line = 0usize;
    while out.len() < 1 << 20 {
        match line % 4 {
            0 | 1 => {
                let s = SUBJECTS[pick(SUBJECTS.len())];
                let v = VERBS[pick(VERBS.len())];
                let o = OBJECTS[pick(OBJECTS.len())];
                let p = PLACES[pick(PLACES.len())];
                let mut sentence = format!("{s} {v} {o} {p}.\n");
                sentence[..1].make_ascii_uppercase();
                out.push_str(&sentence);
            }
            2 => {
                let a = pick(50);
                let b = pick(50);
                out.push_str(&format!("{a} plus {b} is {}.\n", a + b));
            }
            _ => {
                let start = pick(90);
                let nums: Vec<String> = (start..start + 5).map(|n| n.to_string()).collect();
                out.push_str(&format!("count: {}.\n", nums.join(", ")));
            }
        }
        line += 1;
    }
    out.into_bytes()
}

/// One batch of next-byte prediction windows.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Input bytes, `batch * seq`, row-major.
    pub inputs: Vec<i64>,
    /// Target bytes (inputs shifted by one), same shape.
    pub targets: Vec<i64>,
    /// Rows.
    pub batch: usize,
    /// Columns.
    pub seq: usize,
}

impl Batch {
    /// Tokens the batch trains on.
    pub fn tokens(&self) -> usize {
        self.batch * self.seq
    }

    fn from_offsets(data: &[u8], offsets: impl Iterator<Item = usize>, seq: usize) -> Self {
        let mut inputs = Vec::new();
        let mut targets = Vec::new();
        let mut batch = 0;
        for o in offsets {
            let w = &data[o..o + seq + 1];
            inputs.extend(w[..seq].iter().map(|b| *b as i64));
            targets.extend(w[1..].iter().map(|b| *b as i64));
            batch += 1;
        }
        Self {
            inputs,
            targets,
            batch,
            seq,
        }
    }

    /// Concatenates batches row-wise (all must share `seq`).
    pub fn concat(parts: &[Batch]) -> Batch {
        let seq = parts.first().map_or(0, |b| b.seq);
        let mut out = Batch {
            inputs: Vec::new(),
            targets: Vec::new(),
            batch: 0,
            seq,
        };
        for p in parts {
            out.inputs.extend_from_slice(&p.inputs);
            out.targets.extend_from_slice(&p.targets);
            out.batch += p.batch;
        }
        out
    }
}

/// How `simulate` splits the training data over its replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Sharding {
    /// Disjoint shards spread over the whole corpus: window start positions are cut into
    /// blocks, and the blocks are dealt to the replicas in a seeded random order. Every replica
    /// sees the same distribution (the papers' setting, and what `join` peers see).
    Iid,
    /// Replica `r` of `M` samples only from the `r`-th contiguous slice (non-i.i.d. when the
    /// corpus changes along its length, as Shakespeare's plays do).
    Contiguous,
}

/// Largest block of window start positions dealt to one replica by [`Sharding::Iid`].
pub const IID_BLOCK: usize = 4096;

/// Where one stream may start its windows.
#[derive(Debug, Clone)]
enum Region {
    /// Any start in the range.
    Range(std::ops::Range<usize>),
    /// Starts in these blocks of `block` positions (block `b` covers `b*block..(b+1)*block`,
    /// clipped to the `limit` valid starts).
    Blocks {
        blocks: std::sync::Arc<[u32]>,
        block: usize,
        limit: usize,
    },
}

/// A replica's deterministic stream of training batches over its own shard.
#[derive(Debug, Clone)]
pub struct Stream {
    region: Region,
    seed: u64,
    replica: u64,
    batch: usize,
    seq: usize,
}

impl Stream {
    /// Stream for `replica` of `shards` contiguous shards, with `batch` windows of `seq` bytes
    /// per step. `shard_key` identifies the replica in the seed (replica index, or a hash of a
    /// peer id).
    pub fn new(
        corpus: &Corpus,
        shard: usize,
        shards: usize,
        shard_key: u64,
        seed: u64,
        batch: usize,
        seq: usize,
    ) -> Self {
        let per = corpus.train.len() / shards.max(1);
        let start = per * shard;
        Self {
            region: Region::Range(start..start + per.saturating_sub(seq)),
            seed,
            replica: shard_key,
            batch,
            seq,
        }
    }

    /// Stream for `replica` of `replicas` i.i.d. shards ([`Sharding::Iid`]). With one replica
    /// it is the same stream as [`Stream::new`] with one shard.
    pub fn iid(
        corpus: &Corpus,
        replica: usize,
        replicas: usize,
        seed: u64,
        batch: usize,
        seq: usize,
    ) -> Self {
        if replicas <= 1 {
            return Self::new(corpus, 0, 1, replica as u64, seed, batch, seq);
        }
        let limit = corpus.train.len().saturating_sub(seq); // valid starts: 0..limit
        let block = (limit / (8 * replicas)).clamp(1, IID_BLOCK);
        let n_blocks = limit.div_ceil(block);
        let mut order: Vec<(blake3::Hash, u32)> = (0..n_blocks as u32)
            .map(|b| {
                let mut h = blake3::Hasher::new();
                h.update(b"diloco-iid-shards");
                h.update(&seed.to_le_bytes());
                h.update(&b.to_le_bytes());
                (h.finalize(), b)
            })
            .collect();
        order.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        let mut mine: Vec<u32> = order
            .iter()
            .skip(replica)
            .step_by(replicas)
            .map(|(_, b)| *b)
            .collect();
        mine.sort_unstable();
        Self {
            region: Region::Blocks {
                blocks: mine.into(),
                block,
                limit,
            },
            seed,
            replica: replica as u64,
            batch,
            seq,
        }
    }

    /// Window start offsets of the batch for global step `step` (pure function of the step).
    pub fn offsets(&self, step: u64) -> Vec<usize> {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&self.seed.to_le_bytes());
        key[8..16].copy_from_slice(&self.replica.to_le_bytes());
        key[16..24].copy_from_slice(&step.to_le_bytes());
        key[24..].copy_from_slice(b"batches!");
        let mut rng = ChaCha8Rng::from_seed(key);
        match &self.region {
            Region::Range(r) => {
                let span = r.len().max(1) as u64; // >= 1 after Corpus::check
                (0..self.batch)
                    .map(|_| r.start + (rng.next_u64() % span) as usize)
                    .collect()
            }
            Region::Blocks {
                blocks,
                block,
                limit,
            } => {
                let span = (blocks.len() * block) as u64;
                (0..self.batch)
                    .map(|_| loop {
                        // Only the corpus's last block can be partial: rejection is rare.
                        let u = (rng.next_u64() % span) as usize;
                        let start = blocks[u / block] as usize * block + u % block;
                        if start < *limit {
                            break start;
                        }
                    })
                    .collect()
            }
        }
    }

    /// The batch for global step `step` (pure function of the step).
    pub fn batch(&self, corpus: &Corpus, step: u64) -> Batch {
        Batch::from_offsets(&corpus.train, self.offsets(step).into_iter(), self.seq)
    }
}

/// Fixed evaluation batches: up to `max_windows` evenly spaced windows of the eval split.
pub fn eval_batches(corpus: &Corpus, seq: usize, batch: usize, max_windows: usize) -> Vec<Batch> {
    let span = corpus.eval.len().saturating_sub(seq);
    if span == 0 {
        return Vec::new();
    }
    let n = max_windows.min(span).max(1);
    let offsets: Vec<usize> = (0..n).map(|i| i * span / n).collect();
    offsets
        .chunks(batch.max(1))
        .map(|c| Batch::from_offsets(&corpus.eval, c.iter().copied(), seq))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn corpus_of(text: &str) -> Corpus {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        std::fs::write(&p, text).unwrap();
        Corpus::load(&DataSpec {
            path: Some(p),
            eval_path: None,
            eval_fraction: 0.1,
        })
        .unwrap()
    }

    #[test]
    fn builtin_is_deterministic_and_large_enough() {
        let a = builtin_corpus();
        assert_eq!(a, builtin_corpus());
        assert!(a.len() >= 1 << 20);
        assert!(a.is_ascii());
    }

    #[test]
    fn holds_out_the_tail() {
        let c = corpus_of(&"x".repeat(1000));
        assert_eq!(c.train.len(), 900);
        assert_eq!(c.eval.len(), 100);
    }

    #[test]
    fn replicas_draw_disjoint_deterministic_batches() {
        let text: String = (0..20_000)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let c = corpus_of(&text);
        let s0 = Stream::new(&c, 0, 2, 0, 1, 4, 16);
        let s1 = Stream::new(&c, 1, 2, 1, 1, 4, 16);
        assert_eq!(s0.batch(&c, 5), s0.batch(&c, 5));
        assert_ne!(s0.batch(&c, 5), s0.batch(&c, 6));
        assert_ne!(s0.batch(&c, 5), s1.batch(&c, 5));
        let b = s0.batch(&c, 3);
        assert_eq!(b.inputs.len(), 64);
        assert_eq!(&b.inputs[1..16], &b.targets[..15]);
    }

    #[test]
    fn iid_shards_are_disjoint_spread_and_cover_the_corpus() {
        // 2 MB: ~490 blocks of 4 KiB, ~49 per tenth, so every replica owns some in each.
        let text: String = (0..2_000_000)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let c = corpus_of(&text);
        let seq = 16;
        let streams: Vec<Stream> = (0..3).map(|r| Stream::iid(&c, r, 3, 7, 8, seq)).collect();
        let mut owner = vec![usize::MAX; c.train.len()];
        for (r, s) in streams.iter().enumerate() {
            for step in 0..400 {
                for o in s.offsets(step) {
                    assert!(o + seq < c.train.len());
                    assert!(
                        owner[o] == usize::MAX || owner[o] == r,
                        "start {o} in two shards"
                    );
                    owner[o] = r;
                }
            }
        }
        // Every replica draws from every tenth of the corpus (interleaved, not contiguous).
        for r in 0..3 {
            for tenth in 0..10 {
                let lo = tenth * c.train.len() / 10;
                let hi = (tenth + 1) * c.train.len() / 10;
                assert!(
                    owner[lo..hi].contains(&r),
                    "replica {r} never samples tenth {tenth}"
                );
            }
        }
        // Deterministic, and one replica is the plain whole-corpus stream.
        assert_eq!(
            streams[1].offsets(9),
            Stream::iid(&c, 1, 3, 7, 8, seq).offsets(9)
        );
        assert_eq!(
            Stream::iid(&c, 0, 1, 7, 8, seq).offsets(4),
            Stream::new(&c, 0, 1, 0, 7, 8, seq).offsets(4)
        );
    }

    #[test]
    fn iid_shards_work_on_a_corpus_of_few_blocks() {
        let c = corpus_of(&"abcdefghij".repeat(10));
        c.check(8, 4).unwrap();
        for r in 0..4 {
            let s = Stream::iid(&c, r, 4, 1, 4, 8);
            assert!(s.offsets(0).iter().all(|o| o + 8 < c.train.len()));
        }
    }

    #[test]
    fn jsonl_and_directories() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        let mut f = std::fs::File::create(&p).unwrap();
        writeln!(
            f,
            "{{\"text\": \"hello\"}}\n\n{{\"text\": \"world\", \"id\": 3}}"
        )
        .unwrap();
        let c = Corpus::load(&DataSpec {
            path: Some(p.clone()),
            eval_path: None,
            eval_fraction: 0.0,
        })
        .unwrap();
        assert_eq!(c.train, b"hello\nworld");
        std::fs::write(dir.path().join("b.txt"), "more").unwrap();
        let c = Corpus::load(&DataSpec {
            path: Some(dir.path().to_path_buf()),
            eval_path: None,
            eval_fraction: 0.0,
        })
        .unwrap();
        assert_eq!(c.train, b"more\nhello\nworld");
    }

    #[test]
    fn bad_inputs_get_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let spec = |p: PathBuf| DataSpec {
            path: Some(p),
            eval_path: None,
            eval_fraction: 0.05,
        };
        assert!(matches!(
            Corpus::load(&spec(dir.path().join("nope"))),
            Err(DataError::Missing(_))
        ));
        std::fs::write(dir.path().join("empty.txt"), "").unwrap();
        assert!(matches!(
            Corpus::load(&spec(dir.path().join("empty.txt"))),
            Err(DataError::Empty(_))
        ));
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        assert!(matches!(
            Corpus::load(&spec(sub)),
            Err(DataError::NoFiles(_))
        ));
        std::fs::write(dir.path().join("bad.jsonl"), "{\"text\": 1}\n").unwrap();
        let e = Corpus::load(&spec(dir.path().join("bad.jsonl"))).unwrap_err();
        assert!(e.to_string().contains("bad.jsonl:1"), "{e}");
        std::fs::write(
            dir.path().join("worse.jsonl"),
            "{\"text\": \"a\"}\nnot json\n",
        )
        .unwrap();
        let e = Corpus::load(&spec(dir.path().join("worse.jsonl"))).unwrap_err();
        assert!(e.to_string().contains("worse.jsonl:2"), "{e}");
        let short = corpus_of("short text, not a whole sequence long");
        assert!(matches!(
            short.check(128, 1),
            Err(DataError::TooShort { .. })
        ));
    }
}
