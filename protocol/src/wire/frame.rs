//! The one framing of direct streams: a u32 little-endian length, checked against the cap
//! before anything is allocated, then that many bytes. The node's request-response codec reads
//! every direct message with [`FrameDecoder`] and writes the prefix with [`frame_header`]; the
//! `wire_frame` fuzzer feeds the same decoder arbitrary bytes in arbitrary chunks.

use super::WireError;

/// Bytes of the length prefix.
pub const FRAME_HEADER: usize = 4;

/// Most bytes reserved for a frame's body before they arrive (it grows as they do), so a peer
/// that announces a large frame and stalls costs nothing.
pub const MAX_PREALLOC: usize = 1 << 20;

/// The length prefix of a `len`-byte payload.
pub fn frame_header(len: usize) -> Result<[u8; FRAME_HEADER], WireError> {
    let len = u32::try_from(len).map_err(|_| WireError::TooLarge {
        got: len as u64,
        max: u32::MAX as usize,
    })?;
    Ok(len.to_le_bytes())
}

/// Frames a payload: the prefix, then the bytes.
pub fn frame(payload: &[u8]) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::with_capacity(FRAME_HEADER + payload.len());
    out.extend_from_slice(&frame_header(payload.len())?);
    out.extend_from_slice(payload);
    Ok(out)
}

/// Reads frames from bytes as they arrive, in chunks of any size.
#[derive(Debug)]
pub struct FrameDecoder {
    max: usize,
    header: [u8; FRAME_HEADER],
    have: usize,
    /// The body being read, once the prefix is in.
    body: Option<(usize, Vec<u8>)>,
}

impl FrameDecoder {
    /// A decoder of frames of at most `max` bytes.
    pub fn new(max: usize) -> Self {
        FrameDecoder {
            max,
            header: [0; FRAME_HEADER],
            have: 0,
            body: None,
        }
    }

    /// How many more bytes the frame being read needs (never 0: a frame is returned the moment
    /// it completes).
    pub fn wanted(&self) -> usize {
        match &self.body {
            Some((len, body)) => len - body.len(),
            None => FRAME_HEADER - self.have,
        }
    }

    /// Whether part of a frame has been read.
    pub fn in_progress(&self) -> bool {
        self.have > 0 || self.body.is_some()
    }

    /// Feeds `bytes`: returns how many it took (it stops at the end of a frame) and the frame,
    /// if one completed. A prefix over the cap is an error, before anything is allocated; the
    /// decoder must not be fed again after an error.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(usize, Option<Vec<u8>>), WireError> {
        let start = bytes.len();
        if self.body.is_none() {
            let take = (FRAME_HEADER - self.have).min(bytes.len());
            self.header[self.have..self.have + take].copy_from_slice(&bytes[..take]);
            self.have += take;
            bytes = &bytes[take..];
            if self.have < FRAME_HEADER {
                return Ok((start - bytes.len(), None));
            }
            let len = u32::from_le_bytes(self.header) as usize;
            if len > self.max {
                return Err(WireError::TooLarge {
                    got: len as u64,
                    max: self.max,
                });
            }
            self.body = Some((len, Vec::with_capacity(len.min(MAX_PREALLOC))));
        }
        let Some((len, body)) = &mut self.body else {
            unreachable!("the body is set once the prefix is in")
        };
        let take = (*len - body.len()).min(bytes.len());
        body.extend_from_slice(&bytes[..take]);
        bytes = &bytes[take..];
        let used = start - bytes.len();
        if body.len() < *len {
            return Ok((used, None));
        }
        let frame = std::mem::take(body);
        self.body = None;
        self.have = 0;
        Ok((used, Some(frame)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Feeds `stream` in chunks of `chunk` bytes; the frames and the decoder.
    fn decode(
        stream: &[u8],
        chunk: usize,
        max: usize,
    ) -> Result<(Vec<Vec<u8>>, FrameDecoder), WireError> {
        let mut d = FrameDecoder::new(max);
        let mut out = Vec::new();
        for mut c in stream.chunks(chunk.max(1)) {
            while !c.is_empty() {
                let (used, f) = d.feed(c)?;
                assert!(used > 0);
                c = &c[used..];
                out.extend(f);
            }
        }
        Ok((out, d))
    }

    #[test]
    fn frames_decode_in_chunks_of_any_size() {
        let payloads: Vec<Vec<u8>> = vec![b"hello".to_vec(), Vec::new(), vec![7; 300]];
        let mut stream = Vec::new();
        for p in &payloads {
            stream.extend(frame(p).unwrap());
        }
        for chunk in 1..=stream.len() {
            let (got, d) = decode(&stream, chunk, 1024).unwrap();
            assert_eq!(got, payloads, "chunk {chunk}");
            assert!(!d.in_progress());
        }
    }

    #[test]
    fn frame_prefix_is_checked_before_allocation() {
        let mut d = FrameDecoder::new(1024);
        let mut bytes = u32::MAX.to_le_bytes().to_vec();
        bytes.extend_from_slice(&[0; 8]);
        assert!(matches!(d.feed(&bytes), Err(WireError::TooLarge { .. })));
        // Incomplete prefix, incomplete body: nothing yet, and what is still wanted.
        let mut d = FrameDecoder::new(1024);
        assert_eq!(d.feed(&[1, 0]).unwrap(), (2, None));
        assert_eq!(d.wanted(), 2);
        let mut d = FrameDecoder::new(1024);
        assert_eq!(d.feed(&[3, 0, 0, 0, 1]).unwrap(), (5, None));
        assert_eq!(d.wanted(), 2);
        assert!(d.in_progress());
        // A huge announced body reserves at most MAX_PREALLOC.
        let mut d = FrameDecoder::new(usize::MAX);
        d.feed(&u32::MAX.to_le_bytes()).unwrap();
        assert_eq!(d.wanted(), u32::MAX as usize);
        assert!(d.body.as_ref().unwrap().1.capacity() <= MAX_PREALLOC);
    }

    proptest! {
        #[test]
        fn any_frames_in_any_chunks_roundtrip(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..6),
            chunk in 1usize..64,
        ) {
            let mut stream = Vec::new();
            for p in &payloads {
                stream.extend(frame(p).unwrap());
            }
            let (got, _) = decode(&stream, chunk, 200).unwrap();
            prop_assert_eq!(got, payloads);
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512), chunk in 1usize..32) {
            let _ = decode(&data, chunk, 256);
        }
    }
}
