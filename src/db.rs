//! One-off database work for the CLI and the tests: migrations (sqlx's embedded,
//! checksummed migrator) and small helpers. The daemon's sync path does not use this.

use anyhow::Context as _;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions as _, Connection as _, PgPool};

/// A small pool for one-off work.
pub async fn pool(database_url: &str) -> anyhow::Result<PgPool> {
    let options: PgConnectOptions = database_url.parse().context("parse the database URL")?;
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
