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

pub mod config;
pub mod db;
pub mod demo;
pub mod embedded;
pub mod http;
pub mod store;
pub mod sync;
pub mod verify;

use std::net::SocketAddr;
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

/// A running daemon: the applier and the HTTP server, stopped by the shutdown token.
pub struct Daemon {
    store: Store,
    status: Status,
    local_addr: SocketAddr,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    shutdown_timeout: Duration,
    ready_max_lag: Duration,
}

impl Daemon {
    /// Binds the listener (failing fast if the address is taken), then starts the
    /// applier and the server. Answers `/readyz` 503 until loaded and caught up.
    pub async fn start(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("listen on {}", settings.listen))?;
        let local_addr = listener.local_addr().context("read the bound address")?;
        let store = Store::new();
        let status = Status::default();
        let tasks = TaskTracker::new();

        let applier = Applier::new(store.clone(), status.clone(), settings.sync.clone());
        tasks.spawn(applier.run(shutdown.clone()));

        let ready_max_lag = settings.http.ready_max_lag;
        let app = App::new(store.clone(), status.clone(), settings.http);
        tasks.spawn(http::serve(
            listener,
            http::Api::new(app),
            settings.server,
            shutdown.clone(),
        ));
        tasks.close();
        tracing::info!(addr = %local_addr, "serving http");
        Ok(Self {
            store,
            status,
            local_addr,
            tasks,
            shutdown,
            shutdown_timeout: settings.shutdown_timeout,
            ready_max_lag,
        })
    }

    /// The address the server is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
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
    /// most the configured shutdown timeout.
    pub async fn wait(self) {
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
    }
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
