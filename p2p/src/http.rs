//! The HTTP side node and bootstrap peer share: the dashboard's routes with their headers, and
//! binding a status server in the background. Each crate adds its own JSON endpoints.

use crate::dashboard;
use axum::routing::get;
use axum::Router;
use std::net::SocketAddr;
use thiserror::Error;

/// The status server could not start.
#[derive(Debug, Error)]
#[error(
    "cannot serve status on {addr}: {source} (is the port in use? pick another with --status-addr)"
)]
pub struct StatusError {
    /// The address.
    pub addr: SocketAddr,
    /// Why.
    pub source: std::io::Error,
}

/// `router` with the dashboard's files ([`dashboard::FILES`]), each served with its content
/// type and the page's Content-Security-Policy (nothing may load from anywhere else).
pub fn with_dashboard<S: Clone + Send + Sync + 'static>(router: Router<S>) -> Router<S> {
    let mut r = router;
    for (path, ty, body) in dashboard::FILES {
        let headers = [
            ("content-type", ty),
            (
                "content-security-policy",
                dashboard::CONTENT_SECURITY_POLICY,
            ),
            ("cache-control", "no-cache"),
        ];
        r = r.route(path, get(move || async move { (headers, body) }));
    }
    r
}

/// Binds `addr` and serves `router` in the background; returns the bound address (port 0
/// picks one).
pub async fn serve(addr: SocketAddr, router: Router) -> Result<SocketAddr, StatusError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| StatusError { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| StatusError { addr, source })?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(error = %e, "status server stopped");
        }
    });
    Ok(bound)
}
