//! permd: an in-memory permission cache.
//!
//! Postgres holds the precomputed permission set (`permd.tuples`, `permd.limits`), filled
//! by triggers at write time. permd loads it into memory, follows a trigger-fed changelog
//! (LISTEN/NOTIFY is the doorbell) and answers checks from memory over HTTP.
//!
//! Data flows one way: Postgres → [`sync`] → [`store`] → [`http`].
//!
//! - [`config`]: the command line, validated into [`config::Settings`].
//! - [`store`]: the mirror; no I/O, never fails.
//! - [`sync`]: loader (snapshot COPY), applier (changelog cursor), doorbell.
//! - [`http`]: the API; reads the store only.
//! - [`db`]: migrations and one-off queries for the CLI.
//! - [`embedded`]: a throwaway Postgres for the demo and the tests.
//! - [`demo`]: `permd demo`.
//! - [`verify`]: `permd verify`.
//! - [`shard`]: which subjects a daemon of `--shard INDEX/COUNT` mirrors.
//! - [`route`]: `permd route`, one address in front of a sharded set's daemons.

pub mod config;
pub mod db;
pub mod demo;
pub mod embedded;
pub mod http;
pub mod route;
pub mod shard;
pub mod store;
pub mod sync;
pub mod verify;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Settings;
use crate::http::App;
use crate::store::Store;
use crate::sync::{Applier, Status};

/// The async runtime permd runs on: tokio's multi-thread runtime, whose workers let go of
/// their view of the store whenever they go idle (`store::release_thread_view`), so that a
/// reload's old generation is freed even when no request follows it.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(store::release_thread_view)
        .build()
}

/// A running daemon: the applier and the HTTP server, stopped by the shutdown token, or by
/// either of them panicking ([`Daemon::wait`] then says which).
pub struct Daemon {
    store: Store,
    status: Status,
    local_addr: Option<SocketAddr>,
    /// `https` with a certificate, else `http`.
    scheme: &'static str,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    failure: Failure,
    shutdown_timeout: Duration,
    ready_max_lag: Duration,
}

impl Daemon {
    /// Binds the listeners (failing fast if an address is taken), then
    /// [`start_on`](Self::start_on) them.
    pub async fn start(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<Self> {
        let listeners = Listeners::bind(&settings)?;
        Self::start_on(listeners, settings, shutdown).await
    }

    /// Refuses a database URL the sync connection could never connect with (one that asks
    /// for TLS, or that does not parse), then starts the applier and the server on
    /// `listeners` (from [`Listeners::bind`]: a caller with slow work before the start
    /// binds first, so that an address in use fails at once). Answers `/readyz` 503 until
    /// loaded and caught up.
    pub async fn start_on(
        listeners: Listeners,
        settings: Settings,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        sync::check_database_url(&settings.sync.database_url)?;
        let Listeners {
            tcp: listener,
            unix,
        } = listeners;
        let unix_path = unix.as_ref().map(|unix| unix.path().display().to_string());
        let local_addr = listener
            .as_ref()
            .map(tokio::net::TcpListener::local_addr)
            .transpose()
            .context("read the bound address")?;
        let mut limits = settings.server;
        limits.max_connections = open_file_budget(limits.max_connections);
        let store = Store::new();
        let status = Status::default();
        let tasks = TaskTracker::new();
        let failure = Failure::default();
        let shard = settings.sync.shard;

        let applier = Applier::new(store.clone(), status.clone(), settings.sync.clone());
        supervise(
            &tasks,
            "applier",
            applier.run(shutdown.clone()),
            &shutdown,
            &failure,
        );

        let ready_max_lag = settings.http.ready_max_lag;
        let https = settings.tls.clone();
        let scheme = if https.is_some() { "https" } else { "http" };
        let app = App::new(store.clone(), status.clone(), settings.http);
        supervise(
            &tasks,
            "http server",
            http::serve_on(
                listener,
                unix,
                http::Api::new(app),
                limits,
                https,
                shutdown.clone(),
            ),
            &shutdown,
            &failure,
        );
        tasks.close();
        tracing::info!(
            addr = local_addr.map(tracing::field::display),
            scheme,
            unix_socket = unix_path,
            version = env!("CARGO_PKG_VERSION"),
            %shard,
            "serving"
        );
        Ok(Self {
            store,
            status,
            local_addr,
            scheme,
            tasks,
            shutdown,
            failure,
            shutdown_timeout: settings.shutdown_timeout,
            ready_max_lag,
        })
    }

    /// The TCP address the server is bound to (`None` with `--listen none`).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// `https` when serving with a certificate, else `http`.
    pub fn scheme(&self) -> &'static str {
        self.scheme
    }

    /// The mirror.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The sync status.
    pub fn status(&self) -> &Status {
        &self.status
    }

    /// Waits until ready (loaded and caught up), at most `timeout`. False on timeout.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        tokio::select! {
            () = self.status.ready(self.ready_max_lag.as_secs_f64()) => true,
            () = self.shutdown.cancelled() => false,
            () = tokio::time::sleep(timeout) => false,
        }
    }

    /// Waits for the shutdown token, then for in-flight requests and the applier, at
    /// most the configured shutdown timeout. An error when the daemon stopped because the
    /// applier or the server panicked, so that the process exits with a failure and its
    /// supervisor starts it again.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.shutdown.cancelled().await;
        tracing::info!(
            timeout_ms = self.shutdown_timeout.as_millis() as u64,
            "shutting down"
        );
        if tokio::time::timeout(self.shutdown_timeout, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("shutdown timeout reached with work in flight; exiting anyway");
        } else {
            tracing::info!("stopped");
        }
        match self.failure.get() {
            Some(reason) => Err(anyhow::anyhow!("{reason}")),
            None => Ok(()),
        }
    }
}

/// Why the daemon stopped on its own, if it did: the first of its parts that panicked.
type Failure = Arc<OnceLock<String>>;

/// Runs `task`, one of the daemon's parts, on the runtime under `tasks`. A part that
/// panics must not leave the rest running: a dead applier would leave the server answering
/// from a mirror that no longer follows Postgres (only `/readyz` would tell, once the lag
/// passed its bound), a dead server would leave a process that answers nothing. So a panic
/// is logged as an error, recorded in `failure` and stops the daemon through `shutdown`
/// (in-flight requests still finish), and [`Daemon::wait`] returns it.
fn supervise(
    tasks: &TaskTracker,
    name: &'static str,
    task: impl Future<Output = ()> + Send + 'static,
    shutdown: &CancellationToken,
    failure: &Failure,
) {
    let part = tokio::spawn(task);
    let shutdown = shutdown.clone();
    let failure = Arc::clone(failure);
    tasks.spawn(async move {
        let Err(error) = part.await else { return };
        let reason = match error.try_into_panic() {
            Ok(payload) => format!("the {name} panicked: {}", panic_message(&*payload)),
            Err(error) => format!("the {name} stopped: {error}"),
        };
        tracing::error!(part = name, "{reason}; shutting down");
        let _ = failure.set(reason);
        shutdown.cancel();
    });
}

/// The text a panic was raised with (`panic!("…")` carries a `&str` or a `String`).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Cancels `token` on SIGINT (Ctrl-C) or SIGTERM.
pub fn cancel_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot listen for SIGTERM");
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
            () = terminate => tracing::info!("SIGTERM received"),
        }
        token.cancel();
    });
}

/// On SIGHUP, reads the HTTPS certificate and key again (`certs`), as a certificate is
/// renewed, and for a router with `--shards-file`, its shards (`route::Router::reshard`);
/// with neither there is nothing to reload, and SIGHUP is logged. Either way SIGHUP no
/// longer ends the process, as it does by default.
pub fn reload_on_sighup(certs: Option<Arc<http::ServerCerts>>, router: Option<route::Router>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(hangups) => hangups,
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGHUP");
            return;
        }
    };
    let router = router.filter(route::Router::reshards);
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            if let Some(certs) = &certs {
                match certs.reload() {
                    Ok(()) => {
                        tracing::info!("SIGHUP: the HTTPS certificate and client CAs read again");
                    }
                    Err(error) => tracing::error!(
                        error = %format!("{error:#}"),
                        "SIGHUP: the HTTPS certificate and client CAs in use are kept"
                    ),
                }
            }
            if let Some(router) = &router {
                match router.reshard().await {
                    Ok(what) => tracing::info!("SIGHUP: {what}"),
                    Err(error) => tracing::error!(
                        error = %format!("{error:#}"),
                        "SIGHUP: the shards in use are kept"
                    ),
                }
            }
            if certs.is_none() && router.is_none() {
                tracing::info!("SIGHUP received: nothing to reload");
            }
        }
    });
}

/// File descriptors kept for everything but client connections: the listener, the
/// connections to Postgres, the runtime's, standard streams, files read while serving.
const RESERVED_FILES: u64 = 64;

/// How many client connections the process's open-file limit allows, at most
/// `max_connections`: the soft limit is first raised toward what `max_connections` needs
/// (up to the hard limit, as Go and nginx do: systemd gives services a soft limit of 1,024
/// and a hard one of 524,288). Where the hard limit allows fewer, permd serves fewer at once
/// and says so; the others wait to be accepted, where past the limit every accept would
/// fail (`EMFILE`) and be retried.
fn open_file_budget(max_connections: usize) -> usize {
    use rlimit::Resource;
    let wanted = (max_connections as u64).saturating_add(RESERVED_FILES);
    let (soft, hard) = match Resource::NOFILE.get() {
        Ok(limits) => limits,
        Err(error) => {
            tracing::warn!(%error, "cannot read the open-file limit");
            return max_connections;
        }
    };
    let limit = if soft < wanted {
        let raised = wanted.min(hard);
        match Resource::NOFILE.set(raised, hard) {
            Ok(()) => {
                tracing::info!(from = soft, to = raised, "raised the open-file limit");
                raised
            }
            Err(error) => {
                tracing::warn!(%error, "cannot raise the open-file limit");
                soft
            }
        }
    } else {
        soft
    };
    let budget = usize::try_from(limit.saturating_sub(RESERVED_FILES))
        .unwrap_or(usize::MAX)
        .max(1);
    if budget < max_connections {
        tracing::warn!(
            max_connections,
            open_file_limit = limit,
            serving = budget,
            "the open-file limit allows fewer connections than --max-connections: at most \
             {budget} clients are served at once and the others wait to be accepted; raise \
             the hard limit (systemd LimitNOFILE=, ulimit -Hn) or lower --max-connections"
        );
    }
    budget.min(max_connections)
}

/// The accept queue asked of the kernel (which caps it at `net.core.somaxconn`, 4,096 by
/// default). tokio's own `bind` asks for 128, as the standard library does: a burst of new
/// connections beyond that (app servers restarting together, a load generator opening its
/// connections) had SYNs dropped while the workers were busy, and each such client waited
/// out a retransmission, 1 s and then 3 s, before it could send a request (seen in the
/// `compare` suite's overload part: 108 listen overflows, a `/livez` probe of 1,021 ms).
pub(crate) const LISTEN_BACKLOG: u32 = 4096;

/// Where a daemon serves: a TCP listener, a Unix socket with `--unix-socket`, or both.
pub struct Listeners {
    /// `--listen`'s, unless `none`.
    pub tcp: Option<tokio::net::TcpListener>,
    /// `--unix-socket`'s, if given.
    pub unix: Option<http::SocketFile>,
}

impl Listeners {
    /// Binds `settings`' addresses: `--listen` ([`bind`]), then `--unix-socket`.
    pub fn bind(settings: &Settings) -> anyhow::Result<Self> {
        let tcp = settings.listen.map(bind).transpose()?;
        let unix = settings
            .unix_socket
            .as_ref()
            .map(|unix| http::SocketFile::bind(&unix.path, unix.mode))
            .transpose()?;
        Ok(Self { tcp, unix })
    }
}

/// Binds the daemon's listener on `address`, with a deep accept queue
/// (`LISTEN_BACKLOG`).
pub fn bind(address: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let listen = || format!("listen on {address}");
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .with_context(listen)?;
    // As tokio's `bind`: a restarted daemon may bind while its old connections linger.
    socket.set_reuseaddr(true).with_context(listen)?;
    socket.bind(address).with_context(listen)?;
    socket.listen(LISTEN_BACKLOG).with_context(listen)
}

/// An error with its causes, each once (sqlx's errors repeat their cause in their own
/// message), e.g. "postgres: error connecting to server: Connection refused (os error
/// 111)": tokio-postgres keeps the useful part in the source.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod scratch;
#[cfg(test)]
pub(crate) use scratch::Scratch;

#[cfg(test)]
mod tests {
    use super::*;

    const DEADLINE: Duration = Duration::from_secs(10);

    /// Parts supervised as `Daemon::start` supervises the applier and the server.
    struct Parts {
        tasks: TaskTracker,
        shutdown: CancellationToken,
        failure: Failure,
    }

    impl Parts {
        fn new() -> Self {
            Self {
                tasks: TaskTracker::new(),
                shutdown: CancellationToken::new(),
                failure: Failure::default(),
            }
        }

        fn run(&self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
            supervise(&self.tasks, name, task, &self.shutdown, &self.failure);
        }

        /// A part that waits for the shutdown, as the applier and the server do.
        fn until_shutdown(&self) -> impl Future<Output = ()> + Send + 'static {
            let shutdown = self.shutdown.clone();
            async move { shutdown.cancelled().await }
        }

        /// Waits for every part to end.
        async fn stopped(&self) {
            self.tasks.close();
            tokio::time::timeout(DEADLINE, self.tasks.wait())
                .await
                .expect("every part stops");
        }
    }

    #[tokio::test]
    async fn a_panicking_part_stops_the_others_and_is_reported() {
        let parts = Parts::new();
        parts.run("server", parts.until_shutdown());
        parts.run("applier", async {
            tokio::task::yield_now().await;
            let cursor: Option<u64> = None;
            if cursor.is_none() {
                panic!("cursor lost: {cursor:?}");
            }
        });
        tokio::time::timeout(DEADLINE, parts.shutdown.cancelled())
            .await
            .expect("the panic cancels the shutdown token");
        parts.stopped().await;
        assert_eq!(
            parts.failure.get().map(String::as_str),
            Some("the applier panicked: cursor lost: None")
        );
    }

    #[tokio::test]
    async fn parts_that_stop_on_shutdown_report_nothing() {
        let parts = Parts::new();
        parts.run("applier", parts.until_shutdown());
        parts.run("server", parts.until_shutdown());
        parts.shutdown.cancel();
        parts.stopped().await;
        assert_eq!(parts.failure.get(), None);
    }

    #[test]
    fn panic_messages_of_both_kinds_are_read() {
        assert_eq!(panic_message(&"static"), "static");
        assert_eq!(panic_message(&String::from("formatted")), "formatted");
        assert_eq!(panic_message(&42_u8), "(no message)");
    }
}
