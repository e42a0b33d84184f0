//! The command line: clap derive with a `PERMD_*` environment variable for every flag,
//! validated once into typed settings.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};

use crate::http::{HttpConfig, ServerCerts, ServerLimits, Token};
use crate::shard::Shard;
use crate::sync::SyncConfig;

/// permd: an in-memory permission cache that mirrors a precomputed permission table
/// from Postgres and answers checks from memory over HTTP.
#[derive(Debug, Parser)]
#[command(name = "permd", version, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Log filter (tracing's EnvFilter syntax, e.g. `info` or `permd=debug,info`).
    #[arg(long, env = "PERMD_LOG", default_value = "info", global = true)]
    pub log: String,
    /// Log format.
    #[arg(
        long,
        env = "PERMD_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,
}

/// How log lines are written (to stderr).
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// Human-readable lines without colour.
    Plain,
    /// One JSON object a line (`timestamp`, `level`, `target`, `message` and the event's
    /// fields), for log collectors.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply permd's migrations (schema `permd`: tuples, limits, changelog, triggers,
    /// write_token(), digest(), prune_changelog()) to a database. Idempotent.
    Migrate(MigrateArgs),
    /// Mirror the database's permd.tuples/permd.limits into memory and serve the HTTP API.
    Serve(ServeArgs),
    /// Start a throwaway Postgres from this machine's own binaries, seed it with demo
    /// data, serve, and print curl commands to try. Ctrl-C stops and removes everything.
    Demo(DemoArgs),
    /// Prove a running daemon (or every daemon behind a router) equals the database
    /// (digests), or print which subjects and rows differ. Exits 0 when equal, 1 when not.
    Verify(VerifyArgs),
    /// Serve one address in front of the daemons of a sharded set (`serve --shard i/n`):
    /// each request goes to the daemon of its subject's shard, a batch split by shard.
    Route(RouteArgs),
}

/// `permd route`
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("daemons").required(true).args(["shards", "shards_file"])))]
pub struct RouteArgs {
    /// The daemons' URLs, http://HOST:PORT or https://HOST:PORT, or unix:PATH for a daemon
    /// on this host serving on that Unix socket (`--unix-socket`), comma-separated in shard
    /// order: the first serves `--shard 0/N`, the second `1/N`, and so on (N = how many
    /// are given). Several daemons of one shard are separated by `|`
    /// (`http://a1:7700|http://a2:7700,http://b1:7700`): requests go to each in turn, and
    /// to the next when one does not answer.
    #[arg(long, env = "PERMD_SHARDS", value_delimiter = ',')]
    pub shards: Vec<String>,
    /// A file of the daemons' URLs instead of `--shards`: one line a shard, in shard order
    /// (several daemons of one shard separated by `|`; blank lines and `#` comments
    /// skipped). Read again on SIGHUP: the router switches to the set it lists once every
    /// shard of it has a ready daemon that mirrors it, and keeps the set before until then.
    #[arg(long, env = "PERMD_SHARDS_FILE")]
    pub shards_file: Option<PathBuf>,
    /// Address to serve HTTP on: an IP address and a port (`localhost:PORT` is
    /// 127.0.0.1). Anything but loopback requires a token.
    #[arg(long, env = "PERMD_LISTEN", default_value = "127.0.0.1:7700", value_parser = listen_address)]
    pub listen: SocketAddr,
    /// A Unix socket to serve on too.
    #[command(flatten)]
    pub unix: UnixSocketArgs,
    /// Bearer token required from clients on every route but /livez and /readyz, and
    /// presented to the daemons: give them the same one.
    #[command(flatten)]
    pub token: TokenArgs,
    /// For https:// daemons: the CA certificate(s) to trust (PEM), instead of the
    /// system's.
    #[arg(long, env = "PERMD_SHARDS_CA")]
    pub shards_ca: Option<PathBuf>,
    /// Serve HTTPS with this certificate and key.
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Longest wait for a daemon's answer (milliseconds); then 504.
    #[arg(long, env = "PERMD_REQUEST_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub request_timeout_ms: u64,
    /// Largest request body (bytes).
    #[arg(long, env = "PERMD_BODY_LIMIT", default_value_t = 2 * 1024 * 1024)]
    pub body_limit: usize,
    /// Most checks in one batch request, counted before it is split by shard (as the
    /// daemons' `--max-batch`: give them the same).
    #[arg(long, env = "PERMD_MAX_BATCH", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_batch: u64,
    /// Most open client connections; further clients wait to be accepted.
    #[arg(long, env = "PERMD_MAX_CONNECTIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: u64,
    /// A client must send a request's headers within this time or is disconnected
    /// (milliseconds).
    #[arg(long, env = "PERMD_HEADER_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub header_timeout_ms: u64,
    /// On SIGTERM/SIGINT, wait at most this long for in-flight requests (milliseconds).
    #[arg(long, env = "PERMD_SHUTDOWN_TIMEOUT_MS", default_value_t = 10_000)]
    pub shutdown_timeout_ms: u64,
}

/// The token clients must present, if any; refuses to listen beyond loopback with
/// neither a token nor client certificates (which authenticate as a token does).
fn clients_token(
    token: &TokenArgs,
    tls: &TlsArgs,
    listen: Option<SocketAddr>,
) -> anyhow::Result<Option<Token>> {
    let token = token.read()?.and_then(Token::new);
    let beyond_loopback = listen.filter(|listen| !listen.ip().is_loopback());
    if let (None, Some(listen), None) = (&token, beyond_loopback, &tls.tls_client_ca) {
        bail!(
            "refusing to listen on {listen} without a token: set PERMD_TOKEN or --token-file, \
             require client certificates (--tls-client-ca), or listen on a loopback address"
        );
    }
    Ok(token)
}

impl RouteArgs {
    /// Validates the flags into the router's settings.
    pub fn settings(&self) -> anyhow::Result<crate::route::RouteSettings> {
        let token = clients_token(&self.token, &self.tls, Some(self.listen))?;
        Ok(crate::route::RouteSettings {
            listen: self.listen,
            unix_socket: self.unix.settings()?,
            config: crate::route::RouteConfig {
                shards: match &self.shards_file {
                    Some(path) => crate::route::read_shards_file(path)?,
                    None => self.shards.clone(),
                },
                shards_file: self.shards_file.clone(),
                token,
                request_timeout: Duration::from_millis(self.request_timeout_ms),
                body_limit: self.body_limit,
                max_batch: usize::try_from(self.max_batch).unwrap_or(usize::MAX),
                ca: self.shards_ca.clone(),
            },
            limits: ServerLimits {
                max_connections: usize::try_from(self.max_connections).unwrap_or(usize::MAX),
                header_timeout: Duration::from_millis(self.header_timeout_ms),
            },
            tls: self.tls.load()?,
            shutdown_timeout: Duration::from_millis(self.shutdown_timeout_ms),
        })
    }
}

/// `permd verify`
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Postgres connection URL of the database the daemon mirrors.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// The daemon's base URL, http:// or https://, or unix: and the path of its Unix
    /// socket (`unix:/run/permd/permd.sock`); a router's (`permd route`) to verify every
    /// daemon behind it.
    #[arg(long, env = "PERMD_URL", default_value = "http://127.0.0.1:7700")]
    pub permd: String,
    /// For an https:// daemon: the CA certificate(s) to trust (PEM), instead of the
    /// system's.
    #[arg(long, env = "PERMD_CA")]
    pub permd_ca: Option<PathBuf>,
    /// The daemon's bearer token, if it requires one.
    #[command(flatten)]
    pub token: TokenArgs,
    /// Describe at most this many differing subjects.
    #[arg(long, default_value_t = 20)]
    pub max_subjects: usize,
}

impl VerifyArgs {
    /// The daemon to verify.
    pub fn target(&self) -> anyhow::Result<crate::verify::Target> {
        let token = self.token.read()?;
        Ok(crate::verify::Target {
            permd: self.permd.clone(),
            ca: self.permd_ca.clone(),
            token,
            max_subjects: self.max_subjects,
        })
    }
}

/// The bearer token: `--token`/`PERMD_TOKEN`, or `--token-file`/`PERMD_TOKEN_FILE`. Serve
/// requires it from clients; verify presents it to the daemon. Prefer the variable or the
/// file: a flag is visible in `ps`.
#[derive(Debug, Args)]
pub struct TokenArgs {
    /// Bearer token (required by serve on every route but /livez and /readyz when set;
    /// presented by verify). Prefer the environment variable or --token-file: a flag is
    /// visible in `ps`.
    #[arg(long, env = "PERMD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Read the bearer token from this file (surrounding whitespace is ignored).
    #[arg(long, env = "PERMD_TOKEN_FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
}

/// HTTPS for `serve`: a certificate and its key, PEM files, read at start and on SIGHUP.
#[derive(Debug, Args)]
pub struct TlsArgs {
    /// Serve HTTPS with this certificate (PEM: the server's certificate, then any
    /// intermediates); with --tls-key.
    #[arg(long, env = "PERMD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1; or encrypted PKCS#8,
    /// with --tls-key-password-file); with --tls-cert.
    #[arg(long, env = "PERMD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The file holding the password of an encrypted --tls-key (its first line; read
    /// again on SIGHUP, with the key).
    #[arg(long, env = "PERMD_TLS_KEY_PASSWORD_FILE", requires = "tls_key")]
    pub tls_key_password_file: Option<PathBuf>,
    /// Require every HTTPS client to present a certificate signed by one of these CAs
    /// (PEM), and refuse the others in the handshake; with --tls-cert.
    #[arg(long, env = "PERMD_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// The certificate and key HTTPS serves, if given (read now; again on SIGHUP).
    pub fn load(&self) -> anyhow::Result<Option<Arc<ServerCerts>>> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => ServerCerts::load(
                cert,
                key,
                self.tls_key_password_file.as_deref(),
                self.tls_client_ca.as_deref(),
            )
            .map(Some),
            _ => Ok(None),
        }
    }
}

impl TokenArgs {
    /// The token, trimmed, if one was given. An empty file is an error (a forgotten
    /// secret must not silently mean "no token").
    pub fn read(&self) -> anyhow::Result<Option<String>> {
        match (&self.token, &self.token_file) {
            (Some(token), _) => Ok(Some(token.trim().to_owned()).filter(|t| !t.is_empty())),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("read the token file {}", path.display()))?;
                let text = text.trim();
                if text.is_empty() {
                    bail!("the token file {} is empty", path.display());
                }
                Ok(Some(text.to_owned()))
            }
            (None, None) => Ok(None),
        }
    }

    /// Whether a token was given at all.
    pub fn is_set(&self) -> bool {
        self.token.is_some() || self.token_file.is_some()
    }
}

/// `permd migrate`
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Postgres connection URL, e.g. postgres://user:pass@host:5432/db; what it leaves out
    /// comes from libpq's PG* variables and the password file (~/.pgpass, PGPASSFILE).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// Also apply the reference model (schema `app`: users, plans, groups, a folder tree
    /// and shares, kept in permd.tuples/permd.limits by triggers). See README.
    #[arg(long, env = "PERMD_REFERENCE_MODEL")]
    pub reference_model: bool,
}

/// `permd serve`
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Postgres connection URL of the database holding schema `permd`; what it leaves out
    /// comes from libpq's PG* variables and the password file (~/.pgpass, PGPASSFILE).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// Everything about the server.
    #[command(flatten)]
    pub server: ServerArgs,
}

/// `permd demo`
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Seed this existing database instead of starting a throwaway Postgres.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Keep the throwaway cluster in this directory (reused on the next run) instead of
    /// a temporary one removed at exit.
    #[arg(long, env = "PERMD_DEMO_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Number of demo users to seed (teams of 8, about 10 resources per user).
    #[arg(long, env = "PERMD_DEMO_USERS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(100..=10_000_000))]
    pub users: u32,
    /// Serve the demo as a sharded set: this many daemons of `--shard i/N` (on ports of
    /// the kernel's choosing) behind `permd route` on `--listen`.
    #[arg(long, env = "PERMD_DEMO_SHARDS", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=16))]
    pub shards: u32,
    /// Everything about the server.
    #[command(flatten)]
    pub server: ServerArgs,
}

/// Reads `--listen`: an IP address and a port, or `localhost:PORT` (127.0.0.1; no other
/// host name is resolved).
fn listen_address(text: &str) -> Result<SocketAddr, String> {
    if let Ok(address) = text.parse() {
        return Ok(address);
    }
    match text.strip_prefix("localhost:").map(str::parse::<u16>) {
        Some(Ok(port)) => Ok(SocketAddr::from(([127, 0, 0, 1], port))),
        _ => Err(
            "give an IP address and a port, e.g. 127.0.0.1:7700, 0.0.0.0:7700 or \
                  [::1]:7700 (host names other than localhost are not resolved)"
                .to_owned(),
        ),
    }
}

/// `serve`'s `--listen`: a TCP address, or none (`none`, with `--unix-socket`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpListen(pub Option<SocketAddr>);

/// Reads `serve`'s `--listen`: [`listen_address`]'s forms, or `none`.
fn tcp_listen(text: &str) -> Result<TcpListen, String> {
    if text == "none" {
        return Ok(TcpListen(None));
    }
    listen_address(text)
        .map(|address| TcpListen(Some(address)))
        .map_err(|error| format!("{error}; or none, to serve on --unix-socket only"))
}

/// Reads `--unix-socket-mode`: permission bits in octal (`660`, `0660`, `0o660`).
fn socket_mode(text: &str) -> Result<u32, String> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    u32::from_str_radix(digits, 8)
        .ok()
        .filter(|mode| *mode <= 0o777)
        .ok_or_else(|| {
            "give permission bits in octal, e.g. 660 (its owner and group may connect) or \
             600 (its owner only)"
                .to_owned()
        })
}

/// `--unix-socket` and its mode, for `serve`, `demo` and `route`.
#[derive(Debug, Args)]
pub struct UnixSocketArgs {
    /// Also serve HTTP on a Unix socket at this path, for clients on the same host: plain
    /// HTTP (even with --tls-cert), the same token. A socket file left by a process that
    /// is gone is replaced; the file is removed at exit. Who may connect is the file's
    /// permissions (the umask's, or --unix-socket-mode).
    #[arg(long, env = "PERMD_UNIX_SOCKET")]
    pub unix_socket: Option<PathBuf>,
    /// The Unix socket's permissions, in octal (660: its owner and group may connect),
    /// instead of the umask's.
    #[arg(long, env = "PERMD_UNIX_SOCKET_MODE", value_parser = socket_mode)]
    pub unix_socket_mode: Option<u32>,
}

impl UnixSocketArgs {
    /// The socket to serve on, if any; a mode without a path is refused.
    fn settings(&self) -> anyhow::Result<Option<UnixSocket>> {
        match (&self.unix_socket, self.unix_socket_mode) {
            (None, Some(_)) => {
                bail!("--unix-socket-mode is the mode of --unix-socket's file: give it a path")
            }
            (path, mode) => Ok(path.clone().map(|path| UnixSocket { path, mode })),
        }
    }
}

/// A Unix socket to serve HTTP on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixSocket {
    /// Its file.
    pub path: PathBuf,
    /// Its permission bits, when not the umask's.
    pub mode: Option<u32>,
}

/// Server flags shared by `serve` and `demo`.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Address to serve HTTP on: an IP address and a port (`localhost:PORT` is
    /// 127.0.0.1), or `none` to serve on --unix-socket only. Anything but loopback
    /// requires a token.
    #[arg(long, env = "PERMD_LISTEN", default_value = "127.0.0.1:7700", value_parser = tcp_listen)]
    pub listen: TcpListen,
    /// A Unix socket to serve on too.
    #[command(flatten)]
    pub unix: UnixSocketArgs,
    /// Bearer token required on every route but /livez and /readyz.
    #[command(flatten)]
    pub token: TokenArgs,
    /// Serve HTTPS with this certificate and key.
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Poll the changelog this often when no NOTIFY arrives (milliseconds).
    #[arg(long, env = "PERMD_POLL_INTERVAL_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub poll_interval_ms: u64,
    /// While writers with `permd.notify = auto` commit more than 500 transactions a
    /// second, stop listening for theirs and poll the changelog this often instead, so
    /// that their commits share WAL flushes (milliseconds; 0: always listen).
    #[arg(long, env = "PERMD_BUSY_POLL_MS", default_value_t = 2)]
    pub busy_poll_ms: u64,
    /// Longest wait for an `at_least` token before answering 503 stale (milliseconds).
    #[arg(long, env = "PERMD_MAX_WAIT_MS", default_value_t = 1000)]
    pub max_wait_ms: u64,
    /// Most checks in one batch request.
    #[arg(long, env = "PERMD_MAX_BATCH", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_batch: u64,
    /// Largest request body (bytes).
    #[arg(long, env = "PERMD_BODY_LIMIT", default_value_t = 2 * 1024 * 1024)]
    pub body_limit: usize,
    /// Longest time to answer one request (milliseconds).
    #[arg(long, env = "PERMD_REQUEST_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub request_timeout_ms: u64,
    /// /readyz answers 503 once the mirror has not caught up with Postgres for this
    /// long (milliseconds).
    #[arg(long, env = "PERMD_READY_MAX_LAG_MS", default_value_t = 10_000)]
    pub ready_max_lag_ms: u64,
    /// Fail closed: the read routes answer 503 `behind` once the mirror has not caught up
    /// with Postgres for this long (milliseconds), rather than answer from a mirror that
    /// may miss committed writes (a revocation among them). 0, the default: answer from
    /// memory however long Postgres is out of reach.
    #[arg(long, env = "PERMD_ANSWER_MAX_LAG_MS", default_value_t = 0)]
    pub answer_max_lag_ms: u64,
    /// On SIGTERM/SIGINT, wait at most this long for in-flight requests (milliseconds).
    #[arg(long, env = "PERMD_SHUTDOWN_TIMEOUT_MS", default_value_t = 10_000)]
    pub shutdown_timeout_ms: u64,
    /// A statement to Postgres that takes longer than this marks the connection dead
    /// (milliseconds). A full load is exempt, but must receive rows at least this often;
    /// no statement waits more than half of it for a lock (Postgres's `lock_timeout`).
    #[arg(long, env = "PERMD_QUERY_TIMEOUT_MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub query_timeout_ms: u64,
    /// Rebuild the mirror from memory, to reclaim what incremental changes leave behind
    /// (names no row uses, packed grant lists no longer used, subjects moved out of the
    /// lock-free map), once that reaches this share of what the last full load or
    /// compaction made (percent; 0: never).
    #[arg(long, env = "PERMD_COMPACTION_PCT", default_value_t = 50)]
    pub compaction_pct: u32,
    /// Load the set in full rather than read the changelog when so many rows wait there
    /// (a bulk write, or a long outage's writes) that a full load is estimated at least
    /// twice as fast, by the last full load's rate and the polls' (`true` or `false`). A
    /// full load holds two copies of the set while it runs.
    #[arg(long, env = "PERMD_BACKLOG_RELOAD", default_value_t = true, action = clap::ArgAction::Set)]
    pub backlog_reload: bool,
    /// Mirror only the subjects of shard INDEX of COUNT (e.g. `0/4`), for a set larger
    /// than one machine's memory; requests about other subjects are answered 421 with
    /// their shard. A subject's shard is the first 4 bytes of the MD5 of its UTF-8,
    /// big-endian, modulo COUNT; the public subject `*` is in every shard.
    #[arg(long, env = "PERMD_SHARD", default_value = "0/1", value_parser = Shard::parse)]
    pub shard: Shard,
    /// Most API requests in flight; beyond it requests are shed at once with 503
    /// `overloaded` (probes are never shed).
    #[arg(long, env = "PERMD_MAX_IN_FLIGHT", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_in_flight: u64,
    /// Most answers made on blocking threads at once (listings that are not quick,
    /// digests, subjects' rows), each of which may hold tens of megabytes while it is
    /// made; more wait their turn up to the request timeout, then 503 `overloaded`.
    /// Default: the number of CPUs.
    #[arg(long, env = "PERMD_MAX_BLOCKING_ANSWERS", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_blocking_answers: Option<u64>,
    /// Most open client connections; further clients wait to be accepted.
    #[arg(long, env = "PERMD_MAX_CONNECTIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: u64,
    /// A client must send a request's headers within this time or is disconnected
    /// (protects against slow clients; milliseconds). Counted from when the server starts
    /// waiting for the request, so a keep-alive connection idle this long is closed too.
    #[arg(long, env = "PERMD_HEADER_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub header_timeout_ms: u64,
}

/// Validated settings of a daemon.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where to serve HTTP over TCP, if anywhere (`--listen none`).
    pub listen: Option<SocketAddr>,
    /// Where to serve HTTP on a Unix socket too, if anywhere.
    pub unix_socket: Option<UnixSocket>,
    /// The sync side.
    pub sync: SyncConfig,
    /// The HTTP side.
    pub http: HttpConfig,
    /// Connection limits.
    pub server: ServerLimits,
    /// HTTPS: the certificate and key to serve with (`--tls-cert`, `--tls-key`).
    pub tls: Option<Arc<ServerCerts>>,
    /// Bound on graceful shutdown.
    pub shutdown_timeout: Duration,
}

impl ServerArgs {
    /// Validates the flags into settings for `database_url`.
    pub fn settings(&self, database_url: &str) -> anyhow::Result<Settings> {
        let unix_socket = self.unix.settings()?;
        if self.listen.0.is_none() && unix_socket.is_none() {
            bail!("--listen none serves on --unix-socket only: give it a path");
        }
        let token = clients_token(&self.token, &self.tls, self.listen.0)?;
        let mut sync = SyncConfig::new(database_url);
        sync.poll_interval = Duration::from_millis(self.poll_interval_ms);
        sync.busy_poll = (self.busy_poll_ms > 0).then(|| Duration::from_millis(self.busy_poll_ms));
        sync.query_timeout = Duration::from_millis(self.query_timeout_ms);
        sync.compaction_pct = self.compaction_pct;
        sync.backlog_reload = self.backlog_reload;
        sync.shard = self.shard;
        let mut http = HttpConfig {
            token,
            max_batch: usize::try_from(self.max_batch).unwrap_or(usize::MAX),
            max_wait: Duration::from_millis(self.max_wait_ms),
            body_limit: self.body_limit,
            request_timeout: Duration::from_millis(self.request_timeout_ms),
            ready_max_lag: Duration::from_millis(self.ready_max_lag_ms),
            answer_max_lag: (self.answer_max_lag_ms > 0)
                .then(|| Duration::from_millis(self.answer_max_lag_ms)),
            max_in_flight: usize::try_from(self.max_in_flight).unwrap_or(usize::MAX),
            shard: self.shard,
            ..HttpConfig::default()
        };
        if let Some(most) = self.max_blocking_answers {
            http.max_blocking_answers = usize::try_from(most).unwrap_or(usize::MAX);
        }
        let server = ServerLimits {
            max_connections: usize::try_from(self.max_connections).unwrap_or(usize::MAX),
            header_timeout: Duration::from_millis(self.header_timeout_ms),
        };
        Ok(Settings {
            listen: self.listen.0,
            unix_socket,
            sync,
            http,
            server,
            tls: self.tls.load()?,
            shutdown_timeout: Duration::from_millis(self.shutdown_timeout_ms),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> ServeArgs {
        let cli = Cli::try_parse_from(args).expect("valid arguments");
        match cli.command {
            Command::Serve(serve) => serve,
            other => panic!("expected serve, got {other:?}"),
        }
    }

    /// What `settings` refuses `permd serve --database-url u ARGS` with (the whole chain).
    fn refused(args: &[&str]) -> String {
        let mut argv = vec!["permd", "serve", "--database-url", "u"];
        argv.extend_from_slice(args);
        let serve = parse(&argv);
        format!("{:#}", serve.server.settings("u").expect_err("refused"))
    }

    /// `--max-blocking-answers` sets the turns of answers made on blocking threads, the
    /// number of CPUs without it; none is refused.
    #[test]
    fn blocking_answers_default_to_the_cpus() {
        let turns = |args: &[&str]| {
            let mut argv = vec!["permd", "serve", "--database-url", "u"];
            argv.extend_from_slice(args);
            let settings = parse(&argv).server.settings("u").expect("settings");
            settings.http.max_blocking_answers
        };
        assert_eq!(turns(&["--max-blocking-answers", "3"]), 3);
        // More than a semaphore counts: served with as many as it does.
        let many = turns(&["--max-blocking-answers", "18446744073709551615"]);
        let status = crate::sync::Status::default();
        let config = HttpConfig {
            max_blocking_answers: many,
            ..HttpConfig::default()
        };
        drop(crate::http::App::new(
            crate::store::Store::new(),
            status,
            config,
        ));
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        assert_eq!(turns(&[]), cpus);
        let none = [
            "permd",
            "serve",
            "--database-url",
            "u",
            "--max-blocking-answers",
            "0",
        ];
        assert!(Cli::try_parse_from(none).is_err());
    }

    #[test]
    fn listen_takes_an_ip_address_and_port_or_localhost() {
        let listen = |address: &str| {
            let serve = parse(&["permd", "serve", "--database-url", "u", "--listen", address]);
            serve.server.listen.0.expect("an address").to_string()
        };
        assert_eq!(listen("localhost:7701"), "127.0.0.1:7701");
        assert_eq!(listen("[::1]:7702"), "[::1]:7702");
        assert_eq!(listen("0.0.0.0:7703"), "0.0.0.0:7703");
        for wrong in ["7700", ":7700", "example.com:7700", "localhost:http"] {
            let error =
                Cli::try_parse_from(["permd", "serve", "--database-url", "u", "--listen", wrong])
                    .expect_err(wrong)
                    .to_string();
            assert!(error.contains("e.g. 127.0.0.1:7700"), "{wrong}: {error}");
        }
    }

    #[test]
    fn listen_none_serves_on_the_unix_socket_only() {
        let error = refused(&["--listen", "none"]);
        assert!(
            error.contains("--unix-socket only: give it a path"),
            "{error}"
        );
        let serve = parse(&[
            "permd",
            "serve",
            "--database-url",
            "u",
            "--listen",
            "none",
            "--unix-socket",
            "/run/permd.sock",
        ]);
        let settings = serve.server.settings("u").expect("a socket to serve on");
        assert_eq!(settings.listen, None);
        assert!(settings.http.token.is_none(), "no token asked for");
    }

    #[test]
    fn the_unix_sockets_mode_is_octal_and_needs_the_socket() {
        let mode = |text: &str| {
            Cli::try_parse_from([
                "permd",
                "serve",
                "--database-url",
                "u",
                "--unix-socket",
                "/run/permd.sock",
                "--unix-socket-mode",
                text,
            ])
            .map(|cli| match cli.command {
                Command::Serve(serve) => serve.server.unix.unix_socket_mode,
                _ => None,
            })
            .map_err(|error| error.to_string())
        };
        assert_eq!(mode("660"), Ok(Some(0o660)));
        assert_eq!(mode("0600"), Ok(Some(0o600)));
        assert_eq!(mode("0o666"), Ok(Some(0o666)));
        for wrong in ["888", "1777", "rw-rw----", ""] {
            let error = mode(wrong).expect_err(wrong);
            assert!(error.contains("in octal, e.g. 660"), "{wrong}: {error}");
        }
        let error = refused(&["--unix-socket-mode", "660"]);
        assert!(error.contains("give it a path"), "{error}");
    }

    #[test]
    fn https_needs_a_certificate_and_its_key_that_can_be_read() {
        let error = Cli::try_parse_from([
            "permd",
            "serve",
            "--database-url",
            "u",
            "--tls-cert",
            "cert.pem",
        ])
        .expect_err("a certificate without its key")
        .to_string();
        assert!(error.contains("--tls-key"), "{error}");
        let error = refused(&[
            "--tls-cert",
            "/nonexistent/cert.pem",
            "--tls-key",
            "/nonexistent/key.pem",
        ]);
        assert!(
            error.contains("read the certificate /nonexistent/cert.pem"),
            "{error}"
        );
        let serve = parse(&["permd", "serve", "--database-url", "u"]);
        assert!(serve
            .server
            .settings("u")
            .expect("plain HTTP")
            .tls
            .is_none());
        // The key's password file goes with the key, and is read with it.
        let error = Cli::try_parse_from([
            "permd",
            "serve",
            "--database-url",
            "u",
            "--tls-key-password-file",
            "pw",
        ])
        .expect_err("a password without its key")
        .to_string();
        assert!(error.contains("--tls-key"), "{error}");
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
            .expect("a self-signed certificate");
        let dir = crate::Scratch::new("config-key");
        let cert = dir.join("cert.pem");
        std::fs::write(&cert, certified.cert.pem()).expect("write the certificate");
        let key = dir.join("key.pem");
        std::fs::write(&key, certified.signing_key.serialize_pem()).expect("write the key");
        let error = refused(&[
            "--tls-cert",
            &cert.display().to_string(),
            "--tls-key",
            &key.display().to_string(),
            "--tls-key-password-file",
            "/nonexistent/password",
        ]);
        assert!(
            error.contains("read the key's password file /nonexistent/password"),
            "{error}"
        );
    }

    #[test]
    fn a_shard_is_index_over_count() {
        let serve = parse(&["permd", "serve", "--database-url", "u", "--shard", "1/4"]);
        let settings = serve.server.settings("u").expect("valid");
        assert_eq!(settings.sync.shard.to_string(), "1/4");
        assert_eq!(settings.http.shard, settings.sync.shard);
        let serve = parse(&["permd", "serve", "--database-url", "u"]);
        assert!(serve.server.shard.is_whole());
        let error =
            Cli::try_parse_from(["permd", "serve", "--database-url", "u", "--shard", "4/4"])
                .expect_err("an index past the count")
                .to_string();
        assert!(error.contains("must be below the count"), "{error}");
    }

    #[test]
    fn loopback_needs_no_token() {
        let serve = parse(&["permd", "serve", "--database-url", "postgres://x/y"]);
        let settings = serve.server.settings(&serve.database_url).expect("valid");
        assert_eq!(
            settings.listen,
            Some(SocketAddr::from(([127, 0, 0, 1], 7700)))
        );
        assert!(settings.http.token.is_none());
    }

    #[test]
    fn other_addresses_refuse_to_start_without_a_token() {
        let error = refused(&["--listen", "0.0.0.0:7700"]);
        assert!(error.contains("without a token"), "{error}");
        let serve = parse(&[
            "permd",
            "serve",
            "--database-url",
            "u",
            "--listen",
            "0.0.0.0:7700",
            "--token",
            "s3cret",
        ]);
        let settings = serve.server.settings("u").expect("token given");
        assert!(!format!("{settings:?}").contains("s3cret"));
        // Client certificates authenticate as a token does: with --tls-client-ca no token
        // is asked for (the files that are not there are the error here).
        let error = refused(&[
            "--listen",
            "0.0.0.0:7700",
            "--tls-cert",
            "/nonexistent/cert.pem",
            "--tls-key",
            "/nonexistent/key.pem",
            "--tls-client-ca",
            "/nonexistent/clients.pem",
        ]);
        assert!(error.contains("read the certificate"), "{error}");
    }
}
