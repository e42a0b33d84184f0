//! One-off database work for the CLI and the tests: migrations (sqlx's embedded,
//! checksummed migrator) and small helpers. The daemon's sync path does not use this.

use anyhow::Context as _;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::{ConnectOptions as _, Connection as _, PgPool};
use tokio_postgres::config::{ChannelBinding, Host};

use crate::sync::TlsOptions;

/// A small pool for one-off work. The database URL is read as the daemon reads it: libpq's
/// URL or key=value form, its TLS options (`sync::TlsOptions`) given to sqlx.
pub async fn pool(database_url: &str) -> anyhow::Result<PgPool> {
    let (rest, tls) = crate::sync::split_tls_options(database_url)?;
    tls.check()?;
    // Read as the daemon reads it; sqlx reads the URL form itself.
    let parsed = rest.parse::<tokio_postgres::Config>();
    // sqlx authenticates without channel binding: refused rather than quietly ignored.
    if parsed
        .as_ref()
        .is_ok_and(|config| config.get_channel_binding() == ChannelBinding::Require)
    {
        anyhow::bail!(
            "channel_binding=require: migrate, verify and demo (sqlx) do not bind SCRAM to the \
             TLS session; give them the URL without it (serve binds it)"
        );
    }
    let options = if rest.starts_with("postgres://") || rest.starts_with("postgresql://") {
        rest.parse().context("parse the database URL")?
    } else {
        let config = parsed
            .map_err(|e| anyhow::anyhow!("parse the database URL: {}", crate::error_chain(&e)))?;
        from_pairs(&config)?
    };
    let options = with_tls(options, &tls)?;
    // No NOTICEs: the second migrator's `CREATE TABLE IF NOT EXISTS` of sqlx's
    // bookkeeping table printed "relation \"_sqlx_migrations\" already exists,
    // skipping" on every fresh `permd demo` and `migrate --reference-model`. No
    // statement logging either: sqlx warns of every statement over a second, and the
    // demo's seeding runs several (it reports its own progress).
    let options = options
        .application_name("permd-cli")
        .options([("client_min_messages", "warning")])
        .disable_statement_logging();
    // The pool retries a connection that fails until its acquire timeout (30 s) and then
    // says only that it timed out: one connection first says why (refused, unknown host,
    // authentication, TLS), at once. sqlx's message already holds its cause's.
    let first = options
        .connect()
        .await
        .map_err(|error| anyhow::anyhow!("connect to the database: {error}"))?;
    first.close().await.context("connect to the database")?;
    PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .context("connect to the database")
}

/// sqlx's options from a key=value string as tokio-postgres read it (sqlx reads URLs only).
/// One server only: the one-off commands do not try hosts in turn.
fn from_pairs(config: &tokio_postgres::Config) -> anyhow::Result<PgConnectOptions> {
    let (hosts, addrs) = (config.get_hosts(), config.get_hostaddrs());
    if hosts.len().max(addrs.len()) > 1 {
        anyhow::bail!(
            "the database URL names several servers: migrate, verify and demo connect to one, \
             so name the primary alone"
        );
    }
    if config.get_options().is_some() {
        anyhow::bail!(
            "the database URL's options=… is read by serve only: for the one-off commands, set \
             those settings on the role (ALTER ROLE … SET …)"
        );
    }
    let mut options = PgConnectOptions::new();
    match (addrs.first(), hosts.first()) {
        (Some(addr), _) => options = options.host(&addr.to_string()),
        (None, Some(Host::Tcp(host))) => options = options.host(host),
        (None, Some(Host::Unix(dir))) => options = options.socket(dir),
        (None, None) => {}
    }
    if let Some(port) = config.get_ports().first() {
        options = options.port(*port);
    }
    if let Some(user) = config.get_user() {
        options = options.username(user);
    }
    if let Some(password) = config.get_password() {
        let password =
            std::str::from_utf8(password).context("the database URL's password is not UTF-8")?;
        options = options.password(password);
    }
    if let Some(database) = config.get_dbname() {
        options = options.database(database);
    }
    Ok(options)
}

/// sqlx's TLS settings from `tls`, as libpq reads them: `require` with `sslrootcert` checks
/// the CA (libpq's rule, not sqlx's), and `sslrootcert=system` is the system's store (sqlx's
/// default). sqlx trusts the system's CAs beside an `sslrootcert` file; the daemon trusts
/// the file's alone.
fn with_tls(mut options: PgConnectOptions, tls: &TlsOptions) -> anyhow::Result<PgConnectOptions> {
    let file = tls.root_cert.as_deref().filter(|path| *path != "system");
    if let Some(mode) = &tls.mode {
        let mode = match (mode.as_str(), &tls.root_cert) {
            ("require", Some(_)) => PgSslMode::VerifyCa,
            (mode, _) => mode
                .parse()
                .with_context(|| format!("the database URL: sslmode={mode}"))?,
        };
        options = options.ssl_mode(mode);
    }
    if let Some(path) = file {
        options = options.ssl_root_cert(path);
    }
    if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
        options = options.ssl_client_cert(cert).ssl_client_key(key);
    }
    Ok(options)
}

/// Applies every pending migration. Idempotent: applied ones are skipped (and their
/// checksums verified); concurrent runs are serialised by sqlx's advisory lock.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    // Every migration in `migrations/`, embedded at build time.
    let mut migrator = sqlx::migrate!("./migrations");
    // Migrations of the optional reference model may be recorded by a newer permd;
    // they are not ours to undo.
    migrator.set_ignore_missing(true);
    migrator.run(pool).await.context("apply migrations")?;
    Ok(())
}

/// Applies the optional reference model (`migrations/reference/`, schema `app`) on top of
/// the core, which must be applied first. Its versions (1001 and up) never overlap the
/// core's, so both sets share sqlx's bookkeeping table.
pub async fn migrate_reference_model(pool: &PgPool) -> anyhow::Result<()> {
    let mut migrator = sqlx::migrate!("./migrations/reference");
    // The core's versions are not in this set.
    migrator.set_ignore_missing(true);
    migrator
        .run(pool)
        .await
        .context("apply the reference model migrations")?;
    Ok(())
}
