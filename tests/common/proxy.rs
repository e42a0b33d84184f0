//! A TCP proxy in front of a test database: it passes the bytes of each connection on,
//! counts the connections, and can freeze one (the faults tests).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

/// A TCP proxy in front of a test database that freezes the first connection to carry
/// more than a given number of bytes from Postgres: the network that stops carrying a
/// connection's bytes, or the server that stops sending them, as permd sees either, at a
/// point the test chooses rather than one it races to catch. (Stopping the backend itself
/// with SIGSTOP, as this test did before, can stop it holding one of the cluster's shared
/// locks, which every new connection to the shared cluster then waits for.)
pub struct Proxy {
    freeze: Arc<Freeze>,
    /// Connections accepted so far.
    accepted: Arc<AtomicUsize>,
    /// Every connection accepted, open or not.
    links: Arc<std::sync::Mutex<Vec<Arc<Link>>>>,
    accept: tokio::task::JoinHandle<()>,
}

/// Which connection a [`Proxy`] freezes, and the one it froze.
pub struct Freeze {
    /// Bytes from Postgres past which a connection is frozen.
    after: u64,
    /// The connection frozen, once one is.
    frozen: std::sync::Mutex<Option<Arc<Link>>>,
}

/// One connection through a [`Proxy`].
#[derive(Default)]
pub struct Link {
    /// Cancelled to stop forwarding what Postgres sends, until `resumed`.
    pub frozen: CancellationToken,
    /// Cancelled to forward again what Postgres sends (and has sent meanwhile).
    pub resumed: CancellationToken,
    /// Cancelled when the connection has ended, on either side.
    pub closed: CancellationToken,
}

impl Proxy {
    /// Starts a proxy in front of the database at `url` (`postgres://…@127.0.0.1:PORT/…`)
    /// that freezes the first connection to carry more than `freeze_after` bytes from
    /// Postgres; returns it and the same URL through it.
    pub async fn in_front_of(url: &str, freeze_after: u64) -> (Self, String) {
        let (head, tail) = url.rsplit_once(':').expect("a URL with a port");
        let (port, database) = tail.split_once('/').expect("a URL with a database");
        let target = format!("127.0.0.1:{port}");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let proxied = format!(
            "{head}:{}/{database}",
            listener.local_addr().expect("proxy address").port()
        );
        let freeze = Arc::new(Freeze {
            after: freeze_after,
            frozen: std::sync::Mutex::new(None),
        });
        let freezes = Arc::clone(&freeze);
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&accepted);
        let links = Arc::new(std::sync::Mutex::new(Vec::new()));
        let listed = Arc::clone(&links);
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                let Ok(server) = tokio::net::TcpStream::connect(&target).await else {
                    continue;
                };
                let link = Arc::new(Link::default());
                listed.lock().expect("links").push(Arc::clone(&link));
                tokio::spawn(link.forward(client, server, Arc::clone(&freezes)));
            }
        });
        (
            Self {
                freeze,
                accepted,
                links,
                accept,
            },
            proxied,
        )
    }

    /// A proxy that only passes bytes on: it freezes no connection.
    pub async fn passing(url: &str) -> (Self, String) {
        Self::in_front_of(url, u64::MAX).await
    }

    /// The connection frozen, once one is.
    pub fn frozen(&self) -> Option<Arc<Link>> {
        self.freeze.frozen.lock().expect("frozen").clone()
    }

    /// Waits until a connection is frozen (`what` says which, for the deadline's message),
    /// and returns it.
    pub async fn held(&self, what: &str) -> Arc<Link> {
        super::wait_until(what, || std::future::ready(self.frozen().is_some())).await;
        self.frozen().expect("a frozen connection")
    }

    /// Freezes the next connection to carry more than the proxy's bytes too (counted
    /// from its start), the one frozen before staying so until resumed.
    pub fn freeze_next(&self) {
        *self.freeze.frozen.lock().expect("frozen") = None;
    }

    /// The connections still open, in the order they were accepted. One is frozen by
    /// hand with `link.frozen.cancel()`: what Postgres sends it then waits until it is
    /// resumed.
    pub fn open_links(&self) -> Vec<Arc<Link>> {
        let links = self.links.lock().expect("links");
        links
            .iter()
            .filter(|link| !link.closed.is_cancelled())
            .cloned()
            .collect()
    }

    /// How many connections the proxy accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Link {
    /// Carries bytes both ways until either side ends the connection, then closes both
    /// sockets (so that a backend left waiting to send ends too); freezes what Postgres
    /// sends once it is past `freeze.after` bytes, if no connection is frozen yet, until
    /// it is resumed.
    async fn forward(
        self: Arc<Self>,
        client: tokio::net::TcpStream,
        server: tokio::net::TcpStream,
        freeze: Arc<Freeze>,
    ) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (mut from_client, mut to_client) = client.into_split();
        let (mut from_server, mut to_server) = server.into_split();
        let up = tokio::io::copy(&mut from_client, &mut to_server);
        let down = async {
            let mut carried = 0;
            let mut buf = vec![0; 64 * 1024];
            loop {
                let n = match from_server.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                carried += n as u64;
                if carried > freeze.after {
                    let mut frozen = freeze.frozen.lock().expect("frozen");
                    if frozen.is_none() {
                        *frozen = Some(Arc::clone(&self));
                        self.frozen.cancel();
                    }
                }
                if self.frozen.is_cancelled() {
                    self.resumed.cancelled().await;
                }
                if to_client.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        };
        tokio::select! {
            _ = up => {}
            () = down => {}
        }
        self.closed.cancel();
    }
}
