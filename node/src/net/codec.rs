//! The request-response codec of the data plane: every request is one length-prefixed frame
//! of the protocol's framing (`diloco_protocol::wire::FrameDecoder`, the code the fuzzers
//! exercise), its length checked against the cap before anything is allocated; a response is
//! a bare acknowledgement.

use super::NetStats;
use diloco_protocol::wire::{frame_header, FrameDecoder, FRAME_HEADER};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::request_response;
use libp2p::StreamProtocol;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Length-prefixed request-response codec: a u32 LE length checked against the cap before
/// anything is allocated, then the bytes. Responses are a bare acknowledgement.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max: usize,
    stats: Arc<NetStats>,
}

impl FrameCodec {
    /// A codec accepting requests of at most `max` bytes; refused requests are counted in
    /// `stats.frames_refused`.
    pub fn new(max: usize, stats: Arc<NetStats>) -> Self {
        FrameCodec { max, stats }
    }
}

/// Largest read from the stream at once.
const READ_CHUNK: usize = 64 * 1024;

/// Reads one frame of at most `max` bytes with the protocol's decoder.
async fn read_frame<T: AsyncRead + Unpin + Send>(io: &mut T, max: usize) -> io::Result<Vec<u8>> {
    let mut decoder = FrameDecoder::new(max);
    let mut buf = vec![0u8; READ_CHUNK.min(max.saturating_add(FRAME_HEADER))];
    loop {
        let want = decoder.wanted().min(buf.len());
        let n = io.read(&mut buf[..want]).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "truncated message",
            ));
        }
        match decoder.feed(&buf[..n]) {
            Ok((_, Some(frame))) => return Ok(frame),
            Ok((_, None)) => {}
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
    }
}

/// Writes one frame: the protocol's prefix, then the bytes.
async fn write_frame<T: AsyncWrite + Unpin + Send>(io: &mut T, data: &[u8]) -> io::Result<()> {
    let header =
        frame_header(data.len()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    io.write_all(&header).await?;
    io.write_all(data).await?;
    io.close().await
}

impl request_response::Codec for FrameCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        let r = read_frame(io, self.max).await;
        if matches!(&r, Err(e) if e.kind() == io::ErrorKind::InvalidData) {
            self.stats.frames_refused.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, 64).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &req).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &res).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_size_checked_before_allocation() {
        futures::executor::block_on(async {
            let mut buf = Vec::new();
            write_frame(&mut futures::io::Cursor::new(&mut buf), b"hello")
                .await
                .unwrap();
            let got = read_frame(&mut futures::io::Cursor::new(&buf), 16)
                .await
                .unwrap();
            assert_eq!(got, b"hello");
            // Over the cap: refused from the prefix alone.
            let err = read_frame(&mut futures::io::Cursor::new(&buf), 4)
                .await
                .unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            // A huge announced length with no body: error, no 4 GiB allocation.
            let lie = u32::MAX.to_le_bytes().to_vec();
            let err = read_frame(&mut futures::io::Cursor::new(&lie), usize::MAX)
                .await
                .unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
            // Truncated body.
            let mut t = buf.clone();
            t.truncate(6);
            assert!(read_frame(&mut futures::io::Cursor::new(&t), 16)
                .await
                .is_err());
        });
    }

    #[test]
    fn refused_requests_are_counted() {
        use request_response::Codec;
        futures::executor::block_on(async {
            let stats = Arc::new(NetStats::default());
            let proto = StreamProtocol::new("/test");
            let mut buf = Vec::new();
            write_frame(&mut futures::io::Cursor::new(&mut buf), b"hello")
                .await
                .unwrap();
            let mut small = FrameCodec::new(4, stats.clone());
            let r = small
                .read_request(&proto, &mut futures::io::Cursor::new(&buf))
                .await;
            assert!(r.is_err());
            assert_eq!(stats.frames_refused.load(Ordering::Relaxed), 1);
            let mut big = FrameCodec::new(16, stats.clone());
            let r = big
                .read_request(&proto, &mut futures::io::Cursor::new(&buf))
                .await;
            assert_eq!(r.unwrap(), b"hello");
            assert_eq!(stats.frames_refused.load(Ordering::Relaxed), 1);
        });
    }
}
