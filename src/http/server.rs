//! The accept loop: HTTP/1.1 connections (plain checks by our own loop, the rest by hyper:
//! `conn`) served with the protections that `axum::serve` does not offer (a header-read timeout against slow clients, a cap on open
//! connections), and graceful shutdown that lets in-flight requests finish.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::conn::{self, Served};
use super::unix::SocketFile;
use super::{Api, ServerCerts};

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
/// finish their in-flight requests (the caller bounds that wait). With `tls`, HTTPS: each
/// connection's handshake must end within the header timeout, as a request head must.
pub async fn serve(
    listener: TcpListener,
    api: Api,
    limits: ServerLimits,
    tls: Option<Arc<ServerCerts>>,
    shutdown: CancellationToken,
) {
    serve_on(Some(listener), None, api, limits, tls, shutdown).await;
}

/// [`serve`] on `tcp` and on `unix`, each when given: plain HTTP on `unix` whatever
/// `tls` says (its clients are on this host, and the socket file's permissions say who
/// they may be). Both share the connection cap and the graceful stop; `unix`'s file is
/// removed when the server is done with it.
pub async fn serve_on(
    tcp: Option<TcpListener>,
    unix: Option<SocketFile>,
    api: Api,
    limits: ServerLimits,
    tls: Option<Arc<ServerCerts>>,
    shutdown: CancellationToken,
) {
    serve_all(tcp, unix, api, limits, tls, shutdown).await;
}

/// Accepts clients on `tcp` (TLS first with `tls`) and on `unix` until `shutdown`, at
/// most `limits.max_connections` open at once over both, each served by `served` (permd's
/// API, or the router) on a task of its own through the keep-alive loop and hyper
/// (`conn`); then waits for the open connections to end (the caller bounds that wait).
pub(crate) async fn serve_all<F: Served>(
    tcp: Option<TcpListener>,
    unix: Option<SocketFile>,
    served: F,
    limits: ServerLimits,
    tls: Option<Arc<ServerCerts>>,
    shutdown: CancellationToken,
) {
    let accepting = Accepting {
        served,
        stop: Arc::new(Stop::default()),
        header_timeout: limits.header_timeout,
        // Bounds memory under a flood of connections: one permit per open connection.
        slots: Arc::new(Semaphore::new(limits.max_connections.max(1))),
        connections: TaskTracker::new(),
        shutdown,
    };
    let on_tcp = async {
        if let Some(tcp) = tcp {
            accepting.accept_all(&tcp, tls).await;
        }
    };
    let on_unix = async {
        if let Some(unix) = unix {
            accepting.accept_all(unix.listener(), None).await;
        }
    };
    tokio::join!(on_tcp, on_unix);
    // No more clients: the open connections end once their requests in flight do.
    accepting.stop.trigger();
    accepting.connections.close();
    accepting.connections.wait().await;
}

/// What the accept loops of one server share.
struct Accepting<F> {
    served: F,
    stop: Arc<Stop>,
    header_timeout: Duration,
    slots: Arc<Semaphore>,
    connections: TaskTracker,
    shutdown: CancellationToken,
}

impl<F: Served> Accepting<F> {
    /// Accepts clients on `listener` and serves each on a task of its own, until shutdown.
    async fn accept_all<L: Accept>(&self, listener: &L, tls: Option<Arc<ServerCerts>>)
    where
        L::Stream: conn::Io,
    {
        while let Some((stream, permit)) = next_client(listener, &self.slots, &self.shutdown).await
        {
            let (served, stop) = (self.served.clone(), Arc::clone(&self.stop));
            let (tls, timeout) = (tls.clone(), self.header_timeout);
            self.connections.spawn(async move {
                match tls {
                    None => conn::serve_connection(stream, served, timeout, &stop).await,
                    Some(tls) => {
                        if let Some(stream) = handshake(&tls, stream, timeout).await {
                            conn::serve_connection(stream, served, timeout, &stop).await;
                        }
                    }
                }
                drop(permit);
            });
        }
    }
}

/// A listening socket's side of accepting a client.
trait Accept {
    /// A client's connection.
    type Stream: Send + 'static;

    /// The next client's connection, set up to serve.
    fn accept_one(&self) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

impl Accept for TcpListener {
    type Stream = TcpStream;

    async fn accept_one(&self) -> io::Result<TcpStream> {
        let (stream, _peer) = self.accept().await?;
        // Small request/response pairs: never wait to coalesce them.
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

impl Accept for UnixListener {
    type Stream = UnixStream;

    async fn accept_one(&self) -> io::Result<UnixStream> {
        let (stream, _peer) = self.accept().await?;
        Ok(stream)
    }
}

/// A client's TLS handshake under the settings as they are now (SIGHUP may have read them
/// again), which must end within `timeout`, as a request head must; `None` when it failed.
async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    tls: &ServerCerts,
    stream: S,
    timeout: Duration,
) -> Option<tokio_rustls::server::TlsStream<S>> {
    let accepting = tokio_rustls::TlsAcceptor::from(tls.server_config()).accept(stream);
    match tokio::time::timeout(timeout, accepting).await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(error)) => {
            tracing::debug!(%error, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(?timeout, "TLS handshake timed out");
            None
        }
    }
}

/// The next client, once one of the connection `slots` is free (the permit holds it while
/// the connection lasts); `None` once `shutdown` is cancelled.
async fn next_client<L: Accept>(
    listener: &L,
    slots: &Arc<Semaphore>,
    shutdown: &CancellationToken,
) -> Option<(L::Stream, OwnedSemaphorePermit)> {
    let permit = tokio::select! {
        permit = Arc::clone(slots).acquire_owned() => permit.ok()?,
        () = shutdown.cancelled() => return None,
    };
    loop {
        tokio::select! {
            accepted = listener.accept_one() => match accepted {
                Ok(stream) => return Some((stream, permit)),
                Err(error) => {
                    // Out of file descriptors and the like: wait a moment instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = shutdown.cancelled() => return None,
        }
    }
}

/// The server's stop, as its connections watch it: a flag and a wake-up for the idle ones.
/// A connection's loop asks on every request whether the server is stopping and waits for
/// it whenever it waits for the client; a `CancellationToken` takes a lock for each (the
/// same one for every connection), this a plain load once its waiter is registered.
#[derive(Default)]
pub(super) struct Stop {
    stopped: AtomicBool,
    notify: Notify,
}

impl Stop {
    /// Stops: every connection's [`Stop::wait`] ends, and [`Stop::is_stopped`] says so.
    fn trigger(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    /// Whether the server is stopping.
    pub(super) fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// Ends once the server stops. Polled again by the task it woke last, it only reads the
    /// flag.
    pub(super) async fn wait(&self) {
        // Created before the flag is read, so a stop after that read still reaches it.
        let mut notified = pin!(self.notify.notified());
        let mut registered: Option<Waker> = None;
        poll_fn(|cx| {
            if self.is_stopped() {
                return Poll::Ready(());
            }
            if registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                return Poll::Pending;
            }
            if notified.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
            registered = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use std::task::Context;

    use super::*;

    #[test]
    fn a_stop_ends_every_wait_polled_before_it_and_after() {
        let stop = Stop::default();
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut first = Box::pin(stop.wait());
        let mut second = Box::pin(stop.wait());
        // `second` is created but never polled before the stop.
        for _ in 0..3 {
            assert!(first.as_mut().poll(&mut cx).is_pending());
        }
        assert!(!stop.is_stopped());
        stop.trigger();
        assert!(stop.is_stopped());
        assert!(first.as_mut().poll(&mut cx).is_ready());
        assert!(second.as_mut().poll(&mut cx).is_ready());
        assert!(Box::pin(stop.wait()).as_mut().poll(&mut cx).is_ready());
    }

    #[tokio::test]
    async fn a_stop_wakes_a_task_waiting_on_it() {
        let stop = Arc::new(Stop::default());
        let waiting = tokio::spawn({
            let stop = Arc::clone(&stop);
            async move { stop.wait().await }
        });
        tokio::task::yield_now().await;
        stop.trigger();
        tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the waiter ended")
            .expect("the waiter did not panic");
    }
}
