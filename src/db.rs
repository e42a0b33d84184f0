//! One-off database work for the CLI and the tests: migrations (sqlx's embedded,
//! checksummed migrator) and small helpers. The daemon's sync path does not use this.

use anyhow::Context as _;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::{ConnectOptions as _, Connection as _, PgPool};

use crate::sync::TlsOptions;

/// A small pool for one-off work. The URL's TLS options are read as the daemon reads them
/// (`sync::TlsOptions`), and given to sqlx.
pub async fn pool(database_url: &str) -> anyhow::Result<PgPool> {
    if !(database_url.starts_with("postgres://") || database_url.starts_with("postgresql://")) {
        anyhow::bail!(
            "migrate, verify and demo take the database as a URL \
             (postgres://user:password@host:port/database?option=value); the key=value form is \
             for serve only"
        );
    }
    let (rest, tls) = crate::sync::split_tls_options(database_url)?;
    tls.check()?;
    let options: PgConnectOptions = rest.parse().context("parse the database URL")?;
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
