//! Outer-gradient codec: quantize an f32 vector, optionally keep only its top-k entries (with
//! error feedback), then compress with zstd behind a small self-describing header.
//!
//! # Formats and error bounds
//!
//! Let `x` be an input value, `x'` what [`decode`] returns, and `s` the largest magnitude in
//! `x`'s block of [`BLOCK`] consecutive values (the block scale). Non-finite inputs are
//! sanitized before quantizing: NaN becomes 0 and ±inf becomes the largest finite value of the
//! target format, so a decoded vector is always finite.
//!
//! | codec  | bits/value on the wire (before zstd)  | bound on `|x - x'|` |
//! |--------|---------------------------------------|-------------------------------------------|
//! | `F32`  | 32                                    | 0 (bit-exact for finite inputs) |
//! | `F16`  | 16                                    | `max(|x| * 2^-11, 2^-25)` for `|x| <= 65504`; larger values saturate to ±65504 |
//! | `Bf16` | 16                                    | `|x| * 2^-8 + 2^-133` |
//! | `Int8` | 8 + 32/64 (one f32 scale per block)   | `s / 254` (+ f32 rounding, `s * 2^-22`) |
//! | `Fp4`  | 4 + 32/64 (one f32 scale per block)   | `max(|x| / 3, s / 128)` (+ f32 rounding) |
//!
//! `Int8` is symmetric absmax quantization: `q = round(x / (s / 127))`, `q` in `-127..=127`.
//! `Fp4` is E3M0 (sign bit + 3-bit exponent, no mantissa, as in Streaming DiLoCo): the levels are
//! `0` and `s * 2^-k` for `k = 0..=6`; each value rounds to the nearest level (linear distance).
//! Everything below `s/128` flushes to zero, so the bound is relative (1/3) for values within
//! 2^6 of the block maximum and absolute (`s/128`) below.
//!
//! # Container
//!
//! ```text
//! byte 0      format version (1)
//! byte 1      codec id: 0 = f32, 1 = f16, 2 = bf16, 3 = int8, 4 = fp4
//! byte 2      flags: bit 0 = sparse (top-k); other bits must be 0
//! byte 3      reserved, 0
//! bytes 4..12 number of values n, u64 little-endian
//! bytes 12..20  (sparse only) number of stored entries k, u64 little-endian
//! rest        one zstd frame holding the raw payload
//! ```
//!
//! The dense raw payload is the quantized vector: for the block codecs, all block scales (f32 LE)
//! first, then the codes (int8: one byte each; fp4: two per byte, low nibble first). The sparse
//! payload is `k` index gaps (u32 LE; index `i_j = i_{j-1} + 1 + gap_j`, `i_{-1} = -1`) followed by
//! the `k` selected values quantized as a dense vector of length `k`.
//!
//! [`decode`] checks the header against the caller's `max_len` and computes the exact raw size
//! before it allocates or decompresses anything; every malformed input is an `Err`, never a panic.

use std::ops::Range;
use std::str::FromStr;

use thiserror::Error;

/// Number of consecutive values that share one scale in `Int8` and `Fp4`.
pub const BLOCK: usize = 64;
/// Version byte written at the start of every encoded vector.
pub const FORMAT_VERSION: u8 = 1;
/// zstd level used by [`encode`]: level 1 keeps encode speed in the GB/s range; the quantized
/// payloads gain little from higher levels.
pub const ZSTD_LEVEL: i32 = 1;

const DENSE_HEADER: usize = 12;
const SPARSE_HEADER: usize = 20;
const FLAG_SPARSE: u8 = 1;

/// How an outer gradient is quantized before compression.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    serde::Serialize,
    serde::Deserialize,
    bincode::Encode,
    bincode::Decode,
)]
pub enum Quantization {
    /// Plain f32, lossless.
    F32,
    /// IEEE half precision (lossless in practice for outer gradients, per OpenDiLoCo).
    F16,
    /// bfloat16: f32's range, 8 bits of mantissa.
    Bf16,
    /// int8 with one f32 absmax scale per [`BLOCK`] values (INTELLECT-1's production setting).
    Int8,
    /// 4-bit E3M0 with one f32 absmax scale per [`BLOCK`] values (Streaming DiLoCo).
    Fp4,
}

impl Quantization {
    /// All codecs, in codec-id order.
    pub const ALL: [Quantization; 5] = [
        Quantization::F32,
        Quantization::F16,
        Quantization::Bf16,
        Quantization::Int8,
        Quantization::Fp4,
    ];

    /// Nominal bits per value (32/16/16/8/4), not counting block scales or compression.
    pub fn bits(&self) -> u32 {
        match self {
            Quantization::F32 => 32,
            Quantization::F16 | Quantization::Bf16 => 16,
            Quantization::Int8 => 8,
            Quantization::Fp4 => 4,
        }
    }

    /// The codec id written in the container header.
    pub fn id(&self) -> u8 {
        match self {
            Quantization::F32 => 0,
            Quantization::F16 => 1,
            Quantization::Bf16 => 2,
            Quantization::Int8 => 3,
            Quantization::Fp4 => 4,
        }
    }

    /// The codec with this header id, if any.
    pub fn from_id(id: u8) -> Option<Quantization> {
        Quantization::ALL.get(usize::from(id)).copied()
    }

    /// The canonical name accepted by [`FromStr`].
    pub fn name(&self) -> &'static str {
        match self {
            Quantization::F32 => "f32",
            Quantization::F16 => "f16",
            Quantization::Bf16 => "bf16",
            Quantization::Int8 => "int8",
            Quantization::Fp4 => "fp4",
        }
    }

    /// Exact size in bytes of the raw (pre-zstd) quantized payload of `n` values, or `None` on
    /// overflow.
    pub fn raw_len(&self, n: usize) -> Option<usize> {
        let blocks = n.div_ceil(BLOCK);
        match self {
            Quantization::F32 => n.checked_mul(4),
            Quantization::F16 | Quantization::Bf16 => n.checked_mul(2),
            Quantization::Int8 => blocks.checked_mul(4)?.checked_add(n),
            Quantization::Fp4 => blocks.checked_mul(4)?.checked_add(n.div_ceil(2)),
        }
    }
}

impl std::fmt::Display for Quantization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A codec name that [`Quantization::from_str`] does not know.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unknown quantization {0:?}: expected one of none, f32, f16, bf16, int8, fp4")]
pub struct ParseQuantizationError(pub String);

impl FromStr for Quantization {
    type Err = ParseQuantizationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" | "f32" => Ok(Quantization::F32),
            "f16" | "fp16" => Ok(Quantization::F16),
            "bf16" => Ok(Quantization::Bf16),
            "int8" => Ok(Quantization::Int8),
            "fp4" => Ok(Quantization::Fp4),
            _ => Err(ParseQuantizationError(s.to_string())),
        }
    }
}

/// Why an encoded vector was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum CodecError {
    /// Fewer bytes than the header needs.
    #[error("truncated header: {0} bytes")]
    Truncated(usize),
    /// The format version byte is not one this build reads.
    #[error("unsupported format version {0}")]
    Version(u8),
    /// The codec id is unknown.
    #[error("unknown codec id {0}")]
    UnknownCodec(u8),
    /// Reserved flag bits or the reserved byte were set.
    #[error("bad flags {0:#04x}")]
    BadFlags(u8),
    /// The vector is longer than the caller allows.
    #[error("vector of {got} values exceeds the limit of {max}")]
    TooLong {
        /// Length announced by the header.
        got: u64,
        /// The caller's limit.
        max: usize,
    },
    /// A sparse vector claims more entries than values.
    #[error("sparse vector stores {nnz} entries of {len}")]
    BadSparseCount {
        /// Stored entries.
        nnz: u64,
        /// Vector length.
        len: u64,
    },
    /// zstd failed or the payload size is not the one the header implies.
    #[error("payload: {0}")]
    Payload(String),
    /// A decoded value or block scale is NaN or infinite (or a scale is negative).
    #[error("non-finite value or invalid scale at index {0}")]
    NonFinite(usize),
    /// Sparse indices are out of range.
    #[error("sparse index out of range")]
    BadIndex,
    /// Two vectors that must have the same length did not.
    #[error("length mismatch: expected {expected}, got {got}")]
    LengthMismatch {
        /// The length required.
        expected: usize,
        /// The length given.
        got: usize,
    },
}

// ---------------------------------------------------------------------------------------------
// Quantize / dequantize (raw payloads, no zstd).

fn sanitize(x: f32, max: f32) -> f32 {
    if x.is_nan() {
        0.0
    } else {
        x.clamp(-max, max)
    }
}

/// E3M0 decision thresholds on `|x| / s`: the code is the number of thresholds `<= |x|/s`.
/// Levels: code 0 -> 0, code e >= 1 -> 2^(e-7).
const FP4_THRESHOLDS: [f32; 7] = [
    1.0 / 128.0,
    1.5 / 64.0,
    1.5 / 32.0,
    1.5 / 16.0,
    1.5 / 8.0,
    1.5 / 4.0,
    1.5 / 2.0,
];
const FP4_LEVELS: [f32; 16] = [
    0.0,
    1.0 / 64.0,
    1.0 / 32.0,
    1.0 / 16.0,
    1.0 / 8.0,
    1.0 / 4.0,
    1.0 / 2.0,
    1.0,
    -0.0,
    -1.0 / 64.0,
    -1.0 / 32.0,
    -1.0 / 16.0,
    -1.0 / 8.0,
    -1.0 / 4.0,
    -1.0 / 2.0,
    -1.0,
];

fn block_scale(block: &[f32]) -> f32 {
    block
        .iter()
        .fold(0f32, |m, &x| m.max(sanitize(x, f32::MAX).abs()))
}

fn fp4_code(x: f32, scale: f32) -> u8 {
    let x = sanitize(x, f32::MAX);
    let a = if scale > 0.0 { x.abs() / scale } else { 0.0 };
    let mut e = 0u8;
    for t in FP4_THRESHOLDS {
        e += u8::from(a >= t);
    }
    e | (u8::from(x.is_sign_negative() && e > 0) << 3)
}

/// Appends the raw quantized payload of `values` to `out`.
fn quantize_into(q: Quantization, values: &[f32], out: &mut Vec<u8>) {
    match q {
        Quantization::F32 => {
            for &x in values {
                out.extend_from_slice(&sanitize(x, f32::MAX).to_le_bytes());
            }
        }
        Quantization::F16 => {
            for &x in values {
                let h = half::f16::from_f32(sanitize(x, half::f16::MAX.to_f32()));
                out.extend_from_slice(&h.to_le_bytes());
            }
        }
        Quantization::Bf16 => {
            for &x in values {
                let mut h = half::bf16::from_f32(sanitize(x, f32::MAX));
                if h.is_infinite() {
                    h = if h.is_sign_negative() {
                        half::bf16::MIN
                    } else {
                        half::bf16::MAX
                    };
                }
                out.extend_from_slice(&h.to_le_bytes());
            }
        }
        Quantization::Int8 => {
            let scales: Vec<f32> = values
                .chunks(BLOCK)
                .map(|b| block_scale(b) / 127.0)
                .collect();
            for s in &scales {
                out.extend_from_slice(&s.to_le_bytes());
            }
            for (block, &s) in values.chunks(BLOCK).zip(&scales) {
                for &x in block {
                    let code = if s > 0.0 {
                        (sanitize(x, f32::MAX) / s).round().clamp(-127.0, 127.0) as i8
                    } else {
                        0
                    };
                    out.push(code as u8);
                }
            }
        }
        Quantization::Fp4 => {
            let scales: Vec<f32> = values.chunks(BLOCK).map(block_scale).collect();
            for s in &scales {
                out.extend_from_slice(&s.to_le_bytes());
            }
            // Blocks have an even size, so nibble pairs never straddle two blocks.
            for (block, &s) in values.chunks(BLOCK).zip(&scales) {
                for pair in block.chunks(2) {
                    let lo = fp4_code(pair[0], s);
                    let hi = pair.get(1).map_or(0, |&x| fp4_code(x, s));
                    out.push(lo | (hi << 4));
                }
            }
        }
    }
}

fn check_finite(values: &[f32]) -> Result<(), CodecError> {
    match values.iter().position(|x| !x.is_finite()) {
        Some(i) => Err(CodecError::NonFinite(i)),
        None => Ok(()),
    }
}

fn read_scales(raw: &[u8], n: usize) -> Result<Vec<f32>, CodecError> {
    let blocks = n.div_ceil(BLOCK);
    let mut scales = Vec::with_capacity(blocks);
    for (i, c) in raw[..blocks * 4].chunks_exact(4).enumerate() {
        let s = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        if !s.is_finite() || s < 0.0 {
            return Err(CodecError::NonFinite(i * BLOCK));
        }
        scales.push(s);
    }
    Ok(scales)
}

/// Dequantizes a raw payload of exactly `q.raw_len(n)` bytes into `n` finite f32 values.
fn dequantize(q: Quantization, raw: &[u8], n: usize) -> Result<Vec<f32>, CodecError> {
    if q.raw_len(n) != Some(raw.len()) {
        return Err(CodecError::Payload(format!(
            "raw payload of {} bytes for {n} {q} values",
            raw.len()
        )));
    }
    let mut out = Vec::with_capacity(n);
    match q {
        Quantization::F32 => {
            out.extend(
                raw.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
            check_finite(&out)?;
        }
        Quantization::F16 => {
            out.extend(
                raw.chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
            );
            check_finite(&out)?;
        }
        Quantization::Bf16 => {
            out.extend(
                raw.chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
            );
            check_finite(&out)?;
        }
        Quantization::Int8 => {
            let scales = read_scales(raw, n)?;
            let codes = &raw[scales.len() * 4..];
            for (block, &s) in codes.chunks(BLOCK).zip(&scales) {
                out.extend(
                    block
                        .iter()
                        .map(|&c| (f32::from(c as i8) * s).clamp(-f32::MAX, f32::MAX)),
                );
            }
        }
        Quantization::Fp4 => {
            let scales = read_scales(raw, n)?;
            let codes = &raw[scales.len() * 4..];
            for (i, &byte) in codes.iter().enumerate() {
                let s = scales[(2 * i) / BLOCK];
                out.push(FP4_LEVELS[usize::from(byte & 0xf)] * s);
                if out.len() < n {
                    out.push(FP4_LEVELS[usize::from(byte >> 4)] * s);
                }
            }
        }
    }
    Ok(out)
}

/// [`quantize_roundtrip`] of a vector the caller no longer needs: for f32 it is clamped in
/// place (no allocation, the same bits).
pub fn quantize_roundtrip_owned(q: Quantization, mut values: Vec<f32>) -> Vec<f32> {
    if q == Quantization::F32 {
        for x in &mut values {
            *x = sanitize(*x, f32::MAX);
        }
        values
    } else {
        quantize_roundtrip(q, &values)
    }
}

/// What `decode(&encode(q, values), ..)` returns, computed without compression: use it to
/// simulate the codec in-process. Bit-identical to the decoded vector.
pub fn quantize_roundtrip(q: Quantization, values: &[f32]) -> Vec<f32> {
    if q == Quantization::F32 {
        // One pass instead of bytes out and back: the encoding only clamps what is not finite.
        return quantize_roundtrip_owned(q, values.to_vec());
    }
    let mut raw = Vec::with_capacity(q.raw_len(values.len()).unwrap_or(0));
    quantize_into(q, values, &mut raw);
    // The payload was produced by `quantize_into` for exactly this length and is finite by
    // construction, so dequantizing cannot fail; fall back to zeros rather than panic.
    dequantize(q, &raw, values.len()).unwrap_or_else(|_| vec![0.0; values.len()])
}

// ---------------------------------------------------------------------------------------------
// Container.

thread_local! {
    // zstd contexts are costly to create (a large share of the simulator's time at n = 256 was
    // spent in ZSTD_createCCtx/DCtx); one per thread is reused. Same bytes as the one-shot API.
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

fn compress(raw: &[u8]) -> Vec<u8> {
    let reused = COMPRESSOR.with(|c| {
        let mut c = c.try_borrow_mut().ok()?;
        if c.is_none() {
            *c = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok();
        }
        c.as_mut()?.compress(raw).ok()
    });
    // Compressing an in-memory buffer only fails on allocation failure inside zstd; keep the
    // payload uncompressed-in-a-frame semantics impossible to get wrong by retrying at level 0.
    reused
        .map(Ok)
        .unwrap_or_else(|| zstd::bulk::compress(raw, ZSTD_LEVEL))
        .or_else(|_| zstd::bulk::compress(raw, 0))
        .unwrap_or_default()
}

fn decompress(frame: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    let reused = DECOMPRESSOR.with(|d| {
        let mut d = d.try_borrow_mut().ok()?;
        if d.is_none() {
            *d = zstd::bulk::Decompressor::new().ok();
        }
        Some(d.as_mut()?.decompress(frame, capacity))
    });
    reused.unwrap_or_else(|| zstd::bulk::decompress(frame, capacity))
}

/// Quantizes `values` with `q` and compresses them: header + one zstd frame.
pub fn encode(q: Quantization, values: &[f32]) -> Vec<u8> {
    let mut raw = Vec::with_capacity(q.raw_len(values.len()).unwrap_or(0));
    quantize_into(q, values, &mut raw);
    let mut out = Vec::with_capacity(DENSE_HEADER + raw.len() / 2);
    out.extend_from_slice(&[FORMAT_VERSION, q.id(), 0, 0]);
    out.extend_from_slice(&(values.len() as u64).to_le_bytes());
    out.extend_from_slice(&compress(&raw));
    out
}

/// Upper bound on `encode(q, values).len()` (and on sparse encodings) for `n` values: size a
/// receive buffer or a request-size cap with it.
pub fn max_encoded_len(q: Quantization, n: usize) -> usize {
    let raw = q
        .raw_len(n)
        .unwrap_or(usize::MAX / 2)
        .saturating_add(n.saturating_mul(4));
    zstd::zstd_safe::compress_bound(raw).saturating_add(SPARSE_HEADER)
}

/// Keeps the `k` entries of largest magnitude (ties: lower index first) and zeroes the rest.
/// Returns the sorted indices kept.
pub fn top_k_indices(values: &[f32], k: usize) -> Vec<u32> {
    let n = values.len().min(u32::MAX as usize);
    let k = k.min(n);
    if k == 0 {
        return Vec::new();
    }
    let mut idx: Vec<u32> = (0..n as u32).collect();
    let key = |i: &u32| -> (f32, u32) {
        let v = sanitize(values[*i as usize], f32::MAX).abs();
        (v, *i)
    };
    let cmp = |a: &u32, b: &u32| {
        let (va, ia) = key(a);
        let (vb, ib) = key(b);
        vb.total_cmp(&va).then(ia.cmp(&ib))
    };
    if k < n {
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
    }
    idx.sort_unstable();
    idx
}

/// Encodes only the entries at `indices` (strictly increasing, each `< values.len()`), quantized
/// with `q`; the others decode as 0. Returns `None` if the indices are not valid.
pub fn encode_sparse(q: Quantization, values: &[f32], indices: &[u32]) -> Option<Vec<u8>> {
    if values.len() > u32::MAX as usize {
        return None;
    }
    let mut selected = Vec::with_capacity(indices.len());
    let mut raw = Vec::with_capacity(indices.len() * 4 + q.raw_len(indices.len())?);
    let mut prev: Option<u32> = None;
    for &i in indices {
        let gap = match prev {
            None => i,
            Some(p) if i > p => i - p - 1,
            Some(_) => return None,
        };
        selected.push(*values.get(i as usize)?);
        raw.extend_from_slice(&gap.to_le_bytes());
        prev = Some(i);
    }
    quantize_into(q, &selected, &mut raw);
    let mut out = Vec::with_capacity(SPARSE_HEADER + raw.len() / 2);
    out.extend_from_slice(&[FORMAT_VERSION, q.id(), FLAG_SPARSE, 0]);
    out.extend_from_slice(&(values.len() as u64).to_le_bytes());
    out.extend_from_slice(&(indices.len() as u64).to_le_bytes());
    out.extend_from_slice(&compress(&raw));
    Some(out)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(b)
}

fn decompress_exact(frame: &[u8], expected: usize) -> Result<Vec<u8>, CodecError> {
    // The payload must be exactly one whole frame: a truncated frame of an empty payload can
    // otherwise "decompress" to the expected 0 bytes.
    match zstd::zstd_safe::find_frame_compressed_size(frame) {
        Ok(n) if n == frame.len() => {}
        _ => {
            return Err(CodecError::Payload(
                "zstd frame truncated or followed by extra bytes".into(),
            ))
        }
    }
    // `expected` is already bounded by the caller's max_len; zstd writes at most `expected`
    // bytes and fails if the frame holds more.
    let raw = decompress(frame, expected).map_err(|e| CodecError::Payload(format!("zstd: {e}")))?;
    if raw.len() != expected {
        return Err(CodecError::Payload(format!(
            "decompressed {} bytes, expected {expected}",
            raw.len()
        )));
    }
    Ok(raw)
}

/// Header of an encoded vector, readable without decompressing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The codec.
    pub quantization: Quantization,
    /// Number of values in the decoded vector.
    pub len: u64,
    /// Number of stored entries when sparse (top-k), `None` when dense.
    pub sparse_entries: Option<u64>,
}

/// Parses and validates the header of an encoded vector against `max_len`.
pub fn header(bytes: &[u8], max_len: usize) -> Result<Header, CodecError> {
    if bytes.len() < DENSE_HEADER {
        return Err(CodecError::Truncated(bytes.len()));
    }
    if bytes[0] != FORMAT_VERSION {
        return Err(CodecError::Version(bytes[0]));
    }
    let q = Quantization::from_id(bytes[1]).ok_or(CodecError::UnknownCodec(bytes[1]))?;
    if bytes[2] & !FLAG_SPARSE != 0 || bytes[3] != 0 {
        return Err(CodecError::BadFlags(bytes[2] | bytes[3]));
    }
    let len = u64_at(bytes, 4);
    if len > max_len as u64 {
        return Err(CodecError::TooLong {
            got: len,
            max: max_len,
        });
    }
    let sparse_entries = if bytes[2] & FLAG_SPARSE != 0 {
        if bytes.len() < SPARSE_HEADER {
            return Err(CodecError::Truncated(bytes.len()));
        }
        let nnz = u64_at(bytes, 12);
        if nnz > len || len > u64::from(u32::MAX) {
            return Err(CodecError::BadSparseCount { nnz, len });
        }
        Some(nnz)
    } else {
        None
    };
    Ok(Header {
        quantization: q,
        len,
        sparse_entries,
    })
}

/// Decodes a vector produced by [`encode`] or [`encode_sparse`]. Rejects vectors longer than
/// `max_len` before allocating anything, and every malformed input with an error; all returned
/// values are finite.
pub fn decode(bytes: &[u8], max_len: usize) -> Result<Vec<f32>, CodecError> {
    let h = header(bytes, max_len)?;
    let q = h.quantization;
    // `len <= max_len` so it fits in usize.
    let len = h.len as usize;
    let overflow = || CodecError::TooLong {
        got: h.len,
        max: max_len,
    };
    match h.sparse_entries {
        None => {
            let raw_len = q.raw_len(len).ok_or_else(overflow)?;
            let raw = decompress_exact(&bytes[DENSE_HEADER..], raw_len)?;
            dequantize(q, &raw, len)
        }
        Some(nnz) => {
            let nnz = nnz as usize; // nnz <= len <= max_len
            let idx_len = nnz.checked_mul(4).ok_or_else(overflow)?;
            let raw_len = idx_len
                .checked_add(q.raw_len(nnz).ok_or_else(overflow)?)
                .ok_or_else(overflow)?;
            let raw = decompress_exact(&bytes[SPARSE_HEADER..], raw_len)?;
            let vals = dequantize(q, &raw[idx_len..], nnz)?;
            let mut out = vec![0f32; len];
            let mut next: u64 = 0;
            for (c, v) in raw[..idx_len].chunks_exact(4).zip(vals) {
                let gap = u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
                let i = next + gap;
                let slot = usize::try_from(i).ok().and_then(|i| out.get_mut(i));
                *slot.ok_or(CodecError::BadIndex)? = v;
                next = i + 1;
            }
            Ok(out)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Top-k with error feedback.

/// Error feedback for lossy or sparse encodings: whatever a round's encoding drops (the entries
/// outside the top k, and the quantization error of those kept) is added to the next round's
/// outer gradient, so nothing is lost, only delayed.
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorFeedback {
    residual: Vec<f32>,
}

impl ErrorFeedback {
    /// Zero residual for vectors of `len` values.
    pub fn new(len: usize) -> Self {
        Self {
            residual: vec![0.0; len],
        }
    }

    /// The error carried into the next encoding.
    pub fn residual(&self) -> &[f32] {
        &self.residual
    }

    /// Adds the residual to `values`, keeps the `top_k` largest entries (all when `None`),
    /// encodes them with `q`, and stores what the receiver will not see as the new residual.
    /// Returns the encoded bytes and the vector the receiver decodes from them.
    pub fn encode(
        &mut self,
        q: Quantization,
        top_k: Option<usize>,
        values: &[f32],
    ) -> Result<(Vec<u8>, Vec<f32>), CodecError> {
        if values.len() != self.residual.len() {
            return Err(CodecError::LengthMismatch {
                expected: self.residual.len(),
                got: values.len(),
            });
        }
        let acc: Vec<f32> = values
            .iter()
            .zip(&self.residual)
            .map(|(v, r)| sanitize(v + r, f32::MAX))
            .collect();
        let (bytes, sent) = match top_k {
            Some(k) if k < acc.len() && acc.len() <= u32::MAX as usize => {
                let idx = top_k_indices(&acc, k);
                let bytes = encode_sparse(q, &acc, &idx).ok_or(CodecError::BadIndex)?;
                let picked: Vec<f32> = idx.iter().map(|&i| acc[i as usize]).collect();
                let mut sent = vec![0f32; acc.len()];
                for (&i, v) in idx.iter().zip(quantize_roundtrip(q, &picked)) {
                    sent[i as usize] = v;
                }
                (bytes, sent)
            }
            _ => (encode(q, &acc), quantize_roundtrip(q, &acc)),
        };
        for ((r, a), s) in self.residual.iter_mut().zip(&acc).zip(&sent) {
            *r = a - s;
        }
        Ok((bytes, sent))
    }
}

// ---------------------------------------------------------------------------------------------
// Shards.

/// Cuts a vector of `len` values into `n_shards` contiguous ranges (`n_shards` is clamped to at
/// least 1). Boundaries fall on multiples of [`BLOCK`], so quantizing shard by shard gives the same
/// values as quantizing the whole vector; shards differ in size by at most one block, and some are
/// empty when there are fewer blocks than shards.
pub fn shards(len: usize, n_shards: usize) -> Vec<Range<usize>> {
    let n = n_shards.max(1);
    let blocks = len.div_ceil(BLOCK);
    (0..n)
        .map(|i| {
            // i * blocks fits: blocks <= usize::MAX / 64 and i < n; use u128 to be safe.
            let b0 = (i as u128 * blocks as u128 / n as u128) as usize;
            let b1 = ((i as u128 + 1) * blocks as u128 / n as u128) as usize;
            (b0 * BLOCK).min(len)..(b1 * BLOCK).min(len)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bound(q: Quantization, x: f32, s: f32) -> f32 {
        let x = sanitize(x, f32::MAX);
        match q {
            Quantization::F32 => 0.0,
            Quantization::F16 => (x.abs() * 2f32.powi(-11)).max(2f32.powi(-25)),
            Quantization::Bf16 => x.abs() * 2f32.powi(-8) + 1e-38,
            Quantization::Int8 => s / 254.0 + s * 2f32.powi(-22) + 1e-37,
            Quantization::Fp4 => (x.abs() / 3.0).max(s / 128.0) * (1.0 + 1e-6) + 1e-37,
        }
    }

    fn check_bound(q: Quantization, values: &[f32], got: &[f32]) -> Result<(), TestCaseError> {
        prop_assert_eq!(values.len(), got.len());
        for (bi, (block, gblock)) in values.chunks(BLOCK).zip(got.chunks(BLOCK)).enumerate() {
            let s = block_scale(block);
            for (j, (&x, &y)) in block.iter().zip(gblock).enumerate() {
                prop_assert!(y.is_finite());
                let err = (sanitize(x, f32::MAX) - y).abs();
                prop_assert!(
                    err <= bound(q, x, s),
                    "{q}: index {} x={x} decoded={y} err={err} bound={}",
                    bi * BLOCK + j,
                    bound(q, x, s)
                );
            }
        }
        Ok(())
    }

    fn any_q() -> impl Strategy<Value = Quantization> {
        prop::sample::select(Quantization::ALL.to_vec())
    }

    fn grad_values() -> impl Strategy<Value = Vec<f32>> {
        prop_oneof![
            prop::collection::vec(-1.0f32..1.0, 0..600),
            prop::collection::vec(-1e-3f32..1e-3, 0..300),
            prop::collection::vec(-60000.0f32..60000.0, 0..300),
            prop::collection::vec(prop::num::f32::NORMAL | prop::num::f32::ZERO, 0..200),
        ]
    }

    proptest! {
        #[test]
        fn roundtrip_within_bound(q in any_q(), values in grad_values()) {
            let max = if q == Quantization::F16 { 65504.0 } else { f32::MAX };
            let values: Vec<f32> = values.into_iter().map(|x| x.clamp(-max, max)).collect();
            let enc = encode(q, &values);
            let dec = decode(&enc, values.len()).unwrap();
            check_bound(q, &values, &dec)?;
            let sim = quantize_roundtrip(q, &values);
            prop_assert_eq!(
                dec.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                sim.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
        }

        #[test]
        fn encoded_length(q in any_q(), values in grad_values()) {
            let enc = encode(q, &values);
            prop_assert!(enc.len() <= max_encoded_len(q, values.len()));
            let h = header(&enc, values.len()).unwrap();
            prop_assert_eq!(h.len, values.len() as u64);
            prop_assert_eq!(h.quantization, q);
            prop_assert_eq!(h.sparse_entries, None);
            let raw = zstd::bulk::decompress(&enc[DENSE_HEADER..], q.raw_len(values.len()).unwrap()).unwrap();
            prop_assert_eq!(raw.len(), q.raw_len(values.len()).unwrap());
            // A tighter limit than the length is refused before decompressing.
            if !values.is_empty() {
                let too_long = matches!(decode(&enc, values.len() - 1), Err(CodecError::TooLong { .. }));
                prop_assert!(too_long);
            }
        }

        #[test]
        fn garbage_is_an_error_not_a_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes, 1 << 20);
        }

        #[test]
        fn valid_header_garbage_body(q in any_q(), len in 0u64..10_000, sparse in any::<bool>(),
                                     body in prop::collection::vec(any::<u8>(), 0..200)) {
            let mut bytes = vec![FORMAT_VERSION, q.id(), u8::from(sparse), 0];
            bytes.extend_from_slice(&len.to_le_bytes());
            if sparse { bytes.extend_from_slice(&(len / 2).to_le_bytes()); }
            bytes.extend_from_slice(&body);
            let _ = decode(&bytes, 1 << 20);
        }

        #[test]
        fn truncated_or_corrupted_is_an_error(q in any_q(), values in grad_values(),
                                              cut in any::<prop::sample::Index>(),
                                              flip in any::<prop::sample::Index>(), bit in 0u8..8) {
            let enc = encode(q, &values);
            let cut = cut.index(enc.len());
            prop_assert!(decode(&enc[..cut], values.len()).is_err());
            let mut bad = enc.clone();
            let i = flip.index(bad.len());
            bad[i] ^= 1 << bit;
            // A flipped bit may still decode (e.g. in a scale); it must never panic, and any
            // success must be finite and of a length within the limit.
            if let Ok(v) = decode(&bad, values.len()) {
                prop_assert!(v.len() <= values.len());
                prop_assert!(v.iter().all(|x| x.is_finite()));
            }
        }

        #[test]
        fn sparse_roundtrip(q in any_q(), values in prop::collection::vec(-1.0f32..1.0, 0..500), k in 0usize..600) {
            let idx = top_k_indices(&values, k);
            prop_assert_eq!(idx.len(), k.min(values.len()));
            let enc = encode_sparse(q, &values, &idx).unwrap();
            prop_assert!(enc.len() <= max_encoded_len(q, values.len()));
            let dec = decode(&enc, values.len()).unwrap();
            let picked: Vec<f32> = idx.iter().map(|&i| values[i as usize]).collect();
            let rt = quantize_roundtrip(q, &picked);
            let mut expect = vec![0f32; values.len()];
            for (&i, v) in idx.iter().zip(rt) { expect[i as usize] = v; }
            prop_assert_eq!(dec, expect);
            // Every dropped entry is no larger than every kept one.
            let min_kept = idx.iter().map(|&i| values[i as usize].abs()).fold(f32::INFINITY, f32::min);
            for (i, v) in values.iter().enumerate() {
                if idx.binary_search(&(i as u32)).is_err() { prop_assert!(v.abs() <= min_kept); }
            }
        }

        #[test]
        fn error_feedback_conserves_mass(q in any_q(), rounds in prop::collection::vec(
            prop::collection::vec(-1.0f32..1.0, 100), 1..5), k in 1usize..100) {
            // Over several rounds, sum(sent) + residual == sum(inputs) (up to f32 rounding).
            let mut ef = ErrorFeedback::new(100);
            let mut total_in = vec![0f64; 100];
            let mut total_sent = vec![0f64; 100];
            for v in &rounds {
                let (bytes, sent) = ef.encode(q, Some(k), v).unwrap();
                prop_assert_eq!(&decode(&bytes, 100).unwrap(), &sent);
                for i in 0..100 { total_in[i] += f64::from(v[i]); total_sent[i] += f64::from(sent[i]); }
            }
            for i in 0..100 {
                let diff = (total_in[i] - total_sent[i] - f64::from(ef.residual()[i])).abs();
                prop_assert!(diff < 1e-4, "index {i}: diff {diff}");
            }
        }

        #[test]
        fn shards_partition_and_align(len in 0usize..100_000, n in 0usize..300) {
            let s = shards(len, n);
            prop_assert_eq!(s.len(), n.max(1));
            let mut next = 0;
            for r in &s {
                prop_assert_eq!(r.start, next);
                prop_assert!(r.start % BLOCK == 0 || r.start == len);
                next = r.end;
            }
            prop_assert_eq!(next, len);
            let sizes: Vec<usize> = s.iter().map(|r| r.len()).collect();
            let (mn, mx) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
            prop_assert!(mx - mn <= BLOCK);
        }
    }

    #[test]
    fn f32_roundtrip_shortcut_equals_the_byte_path() {
        // quantize_roundtrip skips the bytes for f32; it must still clamp what the encoding
        // clamps (NaN to 0, infinities to the largest finite value) and keep -0.0 and subnormals.
        let values = [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -0.0,
            f32::MIN_POSITIVE / 2.0,
            1.5,
            -f32::MAX,
        ];
        let mut raw = Vec::new();
        quantize_into(Quantization::F32, &values, &mut raw);
        let bytes_path = dequantize(Quantization::F32, &raw, values.len()).unwrap();
        let shortcut = quantize_roundtrip(Quantization::F32, &values);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&shortcut), bits(&bytes_path));
        let owned = quantize_roundtrip_owned(Quantization::F32, values.to_vec());
        assert_eq!(bits(&owned), bits(&bytes_path));
        for q in Quantization::ALL {
            let finite = &values[3..];
            let a = quantize_roundtrip_owned(q, finite.to_vec());
            assert_eq!(bits(&a), bits(&quantize_roundtrip(q, finite)), "{q}");
        }
        assert_eq!(shortcut[0].to_bits(), 0);
        assert_eq!(shortcut[1], f32::MAX);
    }

    #[test]
    fn shardwise_quantization_equals_whole() {
        let values: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        for q in Quantization::ALL {
            let whole = quantize_roundtrip(q, &values);
            let mut parts = Vec::new();
            for r in shards(values.len(), 7) {
                parts.extend(decode(&encode(q, &values[r.clone()]), r.len()).unwrap());
            }
            assert_eq!(whole, parts, "{q}");
        }
    }

    #[test]
    fn non_finite_inputs_are_sanitized() {
        let values = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1.0, 1e30, -1e30];
        for q in Quantization::ALL {
            let dec = decode(&encode(q, &values), values.len()).unwrap();
            assert!(dec.iter().all(|x| x.is_finite()), "{q}: {dec:?}");
            assert_eq!(dec[0], 0.0, "{q}");
            assert!(dec[1] > 0.0 && dec[2] < 0.0, "{q}: {dec:?}");
        }
    }

    #[test]
    fn decode_rejects_non_finite_payloads() {
        for bits in [0x7fc0_0000u32, 0x7f80_0000, 0xff80_0000] {
            let mut raw = Vec::new();
            raw.extend_from_slice(&1f32.to_le_bytes());
            raw.extend_from_slice(&bits.to_le_bytes());
            let mut bytes = vec![FORMAT_VERSION, 0, 0, 0];
            bytes.extend_from_slice(&2u64.to_le_bytes());
            bytes.extend_from_slice(&zstd::bulk::compress(&raw, 1).unwrap());
            assert_eq!(decode(&bytes, 2), Err(CodecError::NonFinite(1)));
        }
        // A negative int8 scale.
        let mut raw = (-1f32).to_le_bytes().to_vec();
        raw.push(5);
        let mut bytes = vec![FORMAT_VERSION, 3, 0, 0];
        bytes.extend_from_slice(&1u64.to_le_bytes());
        bytes.extend_from_slice(&zstd::bulk::compress(&raw, 1).unwrap());
        assert_eq!(decode(&bytes, 1), Err(CodecError::NonFinite(0)));
    }

    #[test]
    fn huge_announced_length_is_refused_before_allocation() {
        let mut bytes = vec![FORMAT_VERSION, 0, 0, 0];
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode(&bytes, usize::MAX),
            Err(CodecError::TooLong { .. } | CodecError::Payload(_))
        ));
        assert!(matches!(
            decode(&bytes, 1000),
            Err(CodecError::TooLong { .. })
        ));
        let mut sparse = vec![FORMAT_VERSION, 0, 1, 0];
        sparse.extend_from_slice(&10u64.to_le_bytes());
        sparse.extend_from_slice(&11u64.to_le_bytes());
        assert!(matches!(
            decode(&sparse, 1000),
            Err(CodecError::BadSparseCount { .. })
        ));
    }

    #[test]
    fn sparse_index_past_the_end_is_refused() {
        let mut raw = Vec::new();
        raw.extend_from_slice(&5u32.to_le_bytes()); // index 5 in a vector of 3
        quantize_into(Quantization::F32, &[1.0], &mut raw);
        let mut bytes = vec![FORMAT_VERSION, 0, 1, 0];
        bytes.extend_from_slice(&3u64.to_le_bytes());
        bytes.extend_from_slice(&1u64.to_le_bytes());
        bytes.extend_from_slice(&zstd::bulk::compress(&raw, 1).unwrap());
        assert_eq!(decode(&bytes, 3), Err(CodecError::BadIndex));
    }

    #[test]
    fn parse_names() {
        assert_eq!("none".parse::<Quantization>().unwrap(), Quantization::F32);
        assert_eq!("F16".parse::<Quantization>().unwrap(), Quantization::F16);
        for q in Quantization::ALL {
            assert_eq!(q.name().parse::<Quantization>().unwrap(), q);
            assert_eq!(Quantization::from_id(q.id()), Some(q));
        }
        let err = "int4".parse::<Quantization>().unwrap_err().to_string();
        assert!(
            err.contains("int4") && err.contains("fp4") && err.contains("bf16"),
            "{err}"
        );
        assert_eq!(Quantization::ALL.map(|q| q.bits()), [32, 16, 16, 8, 4]);
    }

    #[test]
    fn fp4_levels_are_exact_powers_of_two() {
        let mut v = vec![0f32; 64];
        for (i, x) in [
            1.0f32, 0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, -1.0, -0.5,
        ]
        .iter()
        .enumerate()
        {
            v[i] = *x;
        }
        assert_eq!(quantize_roundtrip(Quantization::Fp4, &v), v);
        // Midpoints round away from the lower level; below s/128 flushes to zero.
        let mut w = vec![0f32; 4];
        w[0] = 1.0;
        w[1] = 0.75;
        w[2] = 0.007;
        w[3] = 0.008;
        assert_eq!(
            quantize_roundtrip(Quantization::Fp4, &w),
            vec![1.0, 1.0, 0.0, 0.015625]
        );
    }

    #[test]
    fn compresses_int8_and_fp4() {
        let values: Vec<f32> = (0..1 << 16)
            .map(|i| ((i as f32) * 0.37).sin() * 1e-3)
            .collect();
        let f32_len = encode(Quantization::F32, &values).len();
        let int8_len = encode(Quantization::Int8, &values).len();
        let fp4_len = encode(Quantization::Fp4, &values).len();
        assert!(int8_len * 3 < f32_len, "{int8_len} vs {f32_len}");
        assert!(fp4_len * 6 < f32_len, "{fp4_len} vs {f32_len}");
    }
}
