//! The accept loop: HTTP/1.1 connections (plain checks by our own loop, the rest by hyper:
//! `conn`) served with the protections that `axum::serve` does not offer (a header-read timeout against slow clients, a cap on open
//! connections), and graceful shutdown that lets in-flight requests finish.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{conn, Api};

/// Connection-level limits.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// Most open client connections; further clients wait in the kernel's accept queue.
    pub max_connections: usize,
    /// A client must send a request's headers within this time, or is disconnected.
    pub header_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// Serves `api` on `listener` until `shutdown`, then waits for open connections to
/// finish their in-flight requests (the caller bounds that wait).
pub async fn serve(
    listener: TcpListener,
    api: Api,
    limits: ServerLimits,
    shutdown: CancellationToken,
) {
    let connections = TaskTracker::new();
    // Bounds memory under a flood of connections: one permit per open connection.
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&slots).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = shutdown.cancelled() => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(error) => {
                    // Out of file descriptors and the like: wait a moment instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        // Checks are small request/response pairs: never wait to coalesce them.
        let _ = stream.set_nodelay(true);
        connections.spawn({
            let api = api.clone();
            let shutdown = shutdown.clone();
            async move {
                conn::serve_connection(stream, api, limits.header_timeout, shutdown).await;
                drop(permit);
            }
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}
