//! Multiaddr parsing for command-line flags, with errors that say what to type instead.

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use thiserror::Error;

/// A multiaddr flag that cannot be used.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum AddrError {
    /// Not a multiaddr at all.
    #[error("'{addr}' is not a multiaddr ({reason}); expected e.g. /ip4/127.0.0.1/tcp/4001/p2p/12D3KooW...")]
    Malformed {
        /// What was given.
        addr: String,
        /// The parser's complaint.
        reason: String,
    },
    /// A bootstrap address without its peer id.
    #[error("bootstrap address '{0}' has no /p2p/<peer id> at the end; copy the full address the bootstrap node printed")]
    NoPeerId(String),
    /// A listen address that cannot be listened on.
    #[error("listen address '{0}' must be /ip4|ip6/<addr>/tcp/<port> or .../udp/<port>/quic-v1")]
    BadListen(String),
}

/// Parses any multiaddr.
fn parse(s: &str) -> Result<Multiaddr, AddrError> {
    s.trim()
        .parse()
        .map_err(|e: libp2p::multiaddr::Error| AddrError::Malformed {
            addr: s.to_string(),
            reason: e.to_string(),
        })
}

/// Parses a bootstrap address: any dialable multiaddr ending in `/p2p/<peer id>`.
pub fn parse_bootstrap(s: &str) -> Result<(PeerId, Multiaddr), AddrError> {
    let addr = parse(s)?;
    match addr.iter().last() {
        Some(Protocol::P2p(peer)) => Ok((peer, addr)),
        _ => Err(AddrError::NoPeerId(s.to_string())),
    }
}

/// Parses a listen address (TCP or QUIC over IPv4/IPv6).
pub fn parse_listen(s: &str) -> Result<Multiaddr, AddrError> {
    let addr = parse(s)?;
    let mut it = addr.iter();
    let ip = matches!(it.next(), Some(Protocol::Ip4(_) | Protocol::Ip6(_)));
    let ok = ip
        && matches!(
            (it.next(), it.next(), it.next()),
            (Some(Protocol::Tcp(_)), None, None)
                | (Some(Protocol::Udp(_)), Some(Protocol::QuicV1), None)
        );
    if ok {
        Ok(addr)
    } else {
        Err(AddrError::BadListen(s.to_string()))
    }
}

/// `addr` ending in `/p2p/<peer>` (unchanged if it already ends in a `/p2p` part).
pub fn with_peer(addr: Multiaddr, peer: PeerId) -> Multiaddr {
    match addr.iter().last() {
        Some(Protocol::P2p(_)) => addr,
        _ => addr.with(Protocol::P2p(peer)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_needs_a_peer_id() {
        let id = PeerId::random();
        let good = format!("/ip4/127.0.0.1/tcp/4001/p2p/{id}");
        assert_eq!(parse_bootstrap(&good).unwrap().0, id);
        assert_eq!(
            parse_bootstrap("/ip4/127.0.0.1/tcp/4001"),
            Err(AddrError::NoPeerId("/ip4/127.0.0.1/tcp/4001".into()))
        );
        let err = parse_bootstrap("127.0.0.1:4001").unwrap_err().to_string();
        assert!(err.contains("is not a multiaddr"), "{err}");
        let dns = format!("/dns4/bootstrap/tcp/4001/p2p/{id}");
        assert!(parse_bootstrap(&dns).is_ok());
    }

    #[test]
    fn listen_addresses() {
        assert!(parse_listen("/ip4/0.0.0.0/tcp/0").is_ok());
        assert!(parse_listen("/ip6/::1/udp/9000/quic-v1").is_ok());
        assert!(parse_listen("/ip4/1.2.3.4/udp/9000").is_err());
        assert!(parse_listen("/dns4/x/tcp/1").is_err());
        assert!(parse_listen("nonsense").is_err());
    }
}
