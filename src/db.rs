//! One-off database work for the CLI and the tests: a pool (sqlx's, through the sync
//! connection's TLS over TCP: `sync::Relay`) and migrations (sqlx's embedded, checksummed
//! migrator). The daemon's sync path does not use this.

use anyhow::Context as _;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::{ConnectOptions as _, Connection as _, PgConnection, PgPool, Row as _};
use tokio_postgres::config::Host;

/// A small pool for one-off work. The database URL is read as the daemon reads it: libpq's
/// URL or key=value form, with its TLS options. sqlx has no TLS of its own here: over TCP it
/// connects through a relay (`sync::Relay`) that speaks TLS as the daemon does.
pub async fn pool(database_url: &str) -> anyhow::Result<PgPool> {
    // Read as the daemon reads it, libpq's environment filled in; sqlx is handed the server
    // options alone (`server_options`) and told the rest (`identity`).
    let (config, settings) = crate::sync::read_url(database_url)?;
    if config.get_hosts().len().max(config.get_hostaddrs().len()) > 1 {
        anyhow::bail!(
            "the database URL names several servers: migrate, verify and demo connect to one, \
             so name the primary alone"
        );
    }
    let options = identity(server_options(database_url)?, &config, &settings)?;
    let relay = crate::sync::Relay::start(config.clone(), settings, options.get_port())?;
    let options = match &relay {
        Some(relay) => options.socket(relay.dir()),
        None => options,
    };
    // No NOTICEs: the second migrator's `CREATE TABLE IF NOT EXISTS` of sqlx's
    // bookkeeping table printed "relation \"_sqlx_migrations\" already exists,
    // skipping" on every fresh `permd demo` and `migrate --reference-model`. No
    // statement logging either: sqlx warns of every statement over a second, and the
    // demo's seeding runs several (it reports its own progress).
    // And the daemon's overrides (`sync::connect::first_statements`): no
    // `statement_timeout` (nor the other timeouts it lifts) of the database's or the role's (a
    // migration, `verify`'s digest of a large set or the demo's seeding may take longer
    // than one sized for the application's queries), and READ COMMITTED over a
    // SERIALIZABLE default (which a standby refuses for every statement). One the URL or
    // `PGOPTIONS` sets is kept.
    // All as statements on each new connection, none as a startup parameter: PgBouncer
    // refuses `options` and sqlx's `extra_float_digits` (no query here reads a float)
    // unless told to ignore them, so `migrate` and `verify` could not go through it.
    let settings = crate::sync::first_statements(&config, "SET client_min_messages = warning");
    let options = options
        .ssl_mode(PgSslMode::Disable)
        .application_name(config.get_application_name().unwrap_or("permd-cli"))
        .extra_float_digits(None)
        .disable_statement_logging();
    // The pool retries a connection that fails until its acquire timeout (30 s) and then
    // says only that it timed out: one connection first says why (refused, unknown host,
    // authentication, TLS), at once. sqlx's message already holds its cause's; where the
    // relay failed, sqlx saw only its socket close, and the relay says why.
    let first = options.connect().await.map_err(|error| {
        match relay.as_ref().and_then(crate::sync::Relay::failure) {
            // "connect to postgres: …" or "TLS with postgres: …"
            Some(why) => anyhow::anyhow!(why),
            None => anyhow::anyhow!("connect to the database: {error}"),
        }
    })?;
    // Before any setting, which a pooler in transaction mode would leave behind in a
    // server session the application then gets, as it would sqlx's prepared statements
    // (the next command through it then failed with "prepared statement \"sqlx_s_1\"
    // already exists").
    alone_in_its_session(first, &options).await?;
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .after_connect(move |connection, _| {
            let settings = settings.clone();
            Box::pin(async move {
                for statements in settings {
                    sqlx::raw_sql(sqlx::AssertSqlSafe(statements))
                        .execute(&mut *connection)
                        .await?;
                }
                Ok(())
            })
        })
        .connect_with(options)
        .await
        .context("connect to the database")?;
    if let Some(relay) = relay {
        relay.until(pool.close_event());
    }
    Ok(pool)
}

/// Refuses a pooler in transaction or statement mode (`sync::one_session`,
/// `sync::two_sessions`): `first`'s server session; then, once a second connection is up,
/// `first`'s again, and the second's right after it (so that a transaction pooler hands
/// the second the session `first` has just freed, as `sync::alone_in_its_session` does);
/// then closes both. A second connection that fails or waits too long (a session pooler
/// with one server session for permd) leaves the question open.
async fn alone_in_its_session(
    mut first: PgConnection,
    options: &PgConnectOptions,
) -> anyhow::Result<()> {
    async fn which_session(connection: &mut PgConnection) -> sqlx::Result<(String, String)> {
        // The simple protocol: nothing prepared stays behind.
        let row = sqlx::raw_sql(crate::sync::WHICH_SESSION)
            .fetch_one(&mut *connection)
            .await?;
        Ok((row.try_get::<i32, _>(0)?.to_string(), row.try_get(1)?))
    }
    let ours = which_session(&mut first)
        .await
        .context("connect to the database")?;
    let options = options
        .clone()
        .application_name(&crate::sync::second_name(options.get_application_name()));
    let mut again = None;
    let second = async {
        let mut second = options.connect().await?;
        again = Some(which_session(&mut first).await);
        let theirs = which_session(&mut second).await;
        second.close().await?;
        theirs
    };
    let theirs = crate::sync::second_session(second, crate::sync::SECOND_SESSION_WAIT).await;
    // Asked here where the second connection never came up.
    let again = match again {
        Some(again) => again,
        None => which_session(&mut first).await,
    }
    .context("connect to the database")?;
    crate::sync::one_session((&ours.0, &ours.1), (&again.0, &again.1))?;
    if let Some(theirs) = theirs {
        crate::sync::two_sessions((&again.0, &again.1), (&theirs.0, &theirs.1))?;
    }
    first.close().await.context("connect to the database")?;
    Ok(())
}

/// sqlx's options with the server options the URL gives (`options=`, in the URL or the
/// key=value form), else `PGOPTIONS`'s, which sqlx reads itself; the rest is told by
/// [`identity`]. sqlx takes a server options string as written only from a URL, so it is
/// handed one with that alone: given the whole URL, it warned of every parameter it does
/// not know (`connect_timeout`, `target_session_attrs`, …), which permd reads, and it could
/// not read the key=value form at all.
fn server_options(database_url: &str) -> anyhow::Result<PgConnectOptions> {
    let Some(given) = crate::sync::own_options(database_url) else {
        return Ok(PgConnectOptions::new_without_pgpass());
    };
    let encoded = percent_encoding::utf8_percent_encode(&given, percent_encoding::NON_ALPHANUMERIC);
    let options: PgConnectOptions = format!("postgres:///?options={encoded}")
        .parse()
        .context("the database URL's options")?;
    // That URL names no server; where the database URL names none either, sqlx's default.
    Ok(if options.get_host().is_empty() {
        let host = PgConnectOptions::new_without_pgpass().get_host().to_owned();
        options.host(&host)
    } else {
        options
    })
}

/// `options` told `config`'s server, user, password and database (sqlx's own defaults and
/// password file are not libpq's in every case: these are).
fn identity(
    mut options: PgConnectOptions,
    config: &tokio_postgres::Config,
    settings: &crate::sync::Settings,
) -> anyhow::Result<PgConnectOptions> {
    match (config.get_hostaddrs().first(), config.get_hosts().first()) {
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
    if let Some(password) = crate::sync::password(config, settings) {
        let password = String::from_utf8(password).context("the database password is not UTF-8")?;
        options = options.password(&password);
    }
    if let Some(database) = config.get_dbname() {
        options = options.database(database);
    }
    Ok(options)
}

/// Applies every pending migration. Idempotent: applied ones are skipped (and their
/// checksums verified); concurrent runs are serialised by sqlx's advisory lock.
/// `db` is a pool or one connection of it (`&mut *connection`): the caller that runs
/// several steps on one keeps to one server session (sqlx's pool gives back a connection
/// by a task of its own, so that a step right after another may open a second).
pub async fn migrate<'a, A: sqlx::Acquire<'a, Database = sqlx::Postgres>>(
    db: A,
) -> anyhow::Result<()> {
    // Every migration in `migrations/`, embedded at build time.
    let mut migrator = sqlx::migrate!("./migrations");
    // Migrations of the optional reference model may be recorded by a newer permd;
    // they are not ours to undo.
    migrator.set_ignore_missing(true);
    migrator.run(db).await.context("apply migrations")?;
    Ok(())
}

/// Applies the optional reference model (`migrations/reference/`, schema `app`) on top of
/// the core, which must be applied first. Its versions (1001 and up) never overlap the
/// core's, so both sets share sqlx's bookkeeping table.
/// `db` as for [`migrate`].
pub async fn migrate_reference_model<'a, A: sqlx::Acquire<'a, Database = sqlx::Postgres>>(
    db: A,
) -> anyhow::Result<()> {
    let mut migrator = sqlx::migrate!("./migrations/reference");
    // The core's versions are not in this set.
    migrator.set_ignore_missing(true);
    migrator
        .run(db)
        .await
        .context("apply the reference model migrations")?;
    Ok(())
}
