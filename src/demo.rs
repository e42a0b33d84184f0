//! `permd demo`: a throwaway Postgres, demo data, a running daemon and curl commands.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tokio_util::sync::CancellationToken;

use crate::config::{DemoArgs, Settings};
use crate::embedded::{Cluster, ClusterOptions};
use crate::shard::Shard;
use crate::Daemon;

/// `println!` (`say!(out, ..)`) and `eprintln!` (`say!(err, ..)`) that give up on a stream
/// that is gone (`permd demo | head`, a closed log pipe) instead of panicking: the demo
/// goes on serving.
macro_rules! say {
    (out, $($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
    (err, $($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// Plans by user id: 60% FREE, 25% BASIC, 12% PRO, 3% ENTERPRISE (plan ids 1 to 4).
const PLAN: &str = "CASE WHEN u % 100 < 60 THEN 1 WHEN u % 100 < 85 THEN 2 \
                    WHEN u % 100 < 97 THEN 3 ELSE 4 END";

/// Users per team; teams are grouped into ten departments.
const TEAM: i64 = 8;

/// Each seeding step of the enterprise: a label for the progress line and one statement
/// ($1 = users, $2 = teams). Written to the source tables of the reference model with its
/// triggers off; `app.rebuild_permissions()` then computes the set in one pass.
///
/// Ids, so that the printed examples can name them:
/// users 1..=N, user u in team (u-1)/8 and department team % 10; users 1 to 3 are admins,
/// every hundredth (u % 100 = 99) is suspended. Groups: team t is group t+1, department d
/// is group teams+1+d. Resources: 1 the company folder; 2+d department folders; 100+d a
/// handbook per department (shared read with the department) with files 1000+20d+f;
/// 10000+t team folders (shared write with the team) holding 4 project folders
/// 100000+4t+p of 12 files each, 1000000+12(4t+p)+f; every user's home folder 2000000+u
/// with 3 files 3000000+3u+f; one project file in ten shared read with someone outside.
fn steps() -> Vec<(&'static str, String)> {
    let team = TEAM;
    vec![
        (
            "permissions, plans and limits",
            "INSERT INTO app.permissions (id, name) VALUES (1, 'ADMIN_ACCESS'), (2, 'EXPORT_DATA'),
                 (3, 'API_ACCESS'), (4, 'SSO'), (5, 'AUDIT_LOG'), (6, 'VIEW_REPORTS'), (7, 'BETA_FEATURES');
             INSERT INTO app.subscription_plans (id, name) VALUES
                 (1, 'FREE'), (2, 'BASIC'), (3, 'PRO'), (4, 'ENTERPRISE');
             INSERT INTO app.plan_permissions VALUES (1, 6), (2, 6), (2, 2), (3, 6), (3, 2), (3, 3),
                 (4, 6), (4, 2), (4, 3), (4, 4), (4, 5);
             INSERT INTO app.plan_limits VALUES (1, 'projects', 3), (1, 'seats', 1),
                 (2, 'projects', 10), (2, 'seats', 5), (3, 'projects', 50), (3, 'seats', 25),
                 (4, 'projects', 1000), (4, 'seats', 500)"
                .into(),
        ),
        (
            "users",
            "INSERT INTO app.users (id, email, status)
             SELECT u, 'user' || u || '@example.com', CASE WHEN u % 100 = 99 THEN 'SUSPENDED' ELSE 'ACTIVE' END
             FROM generate_series(1, $1) u"
                .into(),
        ),
        (
            "subscriptions (and PRO trials ending within three days)",
            format!(
                "INSERT INTO app.user_subscriptions (user_id, plan_id)
                 SELECT u, {PLAN} FROM generate_series(1, $1) u;
                 INSERT INTO app.user_subscriptions (user_id, plan_id, expires_at)
                 SELECT u, 3, now() + make_interval(hours => 1 + (u % 72)::int)
                 FROM generate_series(1, $1) u WHERE u % 25 = 0"
            ),
        ),
        (
            "direct grants",
            "INSERT INTO app.user_permission_grants
             SELECT u, 1 FROM generate_series(1, least($1, 3)) u
             UNION ALL
             SELECT u, 7 FROM generate_series(1, $1) u WHERE u % 200 = 7"
                .into(),
        ),
        (
            "teams and departments",
            format!(
                "INSERT INTO app.groups (id, name)
                 SELECT t + 1, 'team ' || t FROM generate_series(0, $2 - 1) t
                 UNION ALL
                 SELECT $2 + 1 + d, 'department ' || d FROM generate_series(0, 9) d;
                 INSERT INTO app.group_members (group_id, user_id)
                 SELECT (u - 1) / {team} + 1, u FROM generate_series(1, $1) u
                 UNION ALL
                 SELECT $2 + 1 + ((u - 1) / {team}) % 10, u FROM generate_series(1, $1) u"
            ),
        ),
        (
            "company, department and handbook folders",
            format!(
                "INSERT INTO app.resources (id, kind, name, parent_id, owner_id) VALUES (1, 'folder', 'Company', NULL, 1);
                 INSERT INTO app.resources (id, kind, name, parent_id, owner_id)
                 SELECT 2 + d, 'folder', 'Department ' || d, 1, least($1, 1 + {team} * d) FROM generate_series(0, 9) d;
                 INSERT INTO app.resources (id, kind, name, parent_id, owner_id)
                 SELECT 100 + d, 'folder', 'Handbook', 2 + d, least($1, 1 + {team} * d) FROM generate_series(0, 9) d;
                 INSERT INTO app.resources (id, kind, name, parent_id, owner_id)
                 SELECT 1000 + 20 * d + f, 'file', 'Chapter ' || f, 100 + d, least($1, 1 + {team} * d)
                 FROM generate_series(0, 9) d, generate_series(0, 19) f;
                 INSERT INTO app.shares (resource_id, group_id, access)
                 SELECT 100 + d, $2 + 1 + d, 'read' FROM generate_series(0, 9) d"
            ),
        ),
        (
            "team folders, projects and files",
            format!(
                "INSERT INTO app.resources (id, kind, name, parent_id, owner_id)
                 SELECT 10000 + t, 'folder', 'Team ' || t, 2 + t % 10, least($1, 1 + {team} * t)
                 FROM generate_series(0, $2 - 1) t;
                 INSERT INTO app.shares (resource_id, group_id, access)
                 SELECT 10000 + t, t + 1, 'write' FROM generate_series(0, $2 - 1) t;
                 INSERT INTO app.resources (id, kind, name, parent_id, owner_id)
                 SELECT 100000 + 4 * t + p, 'folder', 'Project ' || p, 10000 + t, least($1, 1 + {team} * t + 2 * p)
                 FROM generate_series(0, $2 - 1) t, generate_series(0, 3) p;
                 INSERT INTO app.resources (id, kind, name, parent_id, owner_id)
                 SELECT 1000000 + 12 * (4 * t + p) + f, 'file', 'File ' || f, 100000 + 4 * t + p,
                        least($1, 1 + {team} * t + (12 * p + f) % {team})
                 FROM generate_series(0, $2 - 1) t, generate_series(0, 3) p, generate_series(0, 11) f"
            ),
        ),
        (
            "home folders",
            "INSERT INTO app.resources (id, kind, name, parent_id, owner_id)
             SELECT 2000000 + u, 'folder', 'Home', NULL, u FROM generate_series(1, $1) u;
             INSERT INTO app.resources (id, kind, name, parent_id, owner_id)
             SELECT 3000000 + 3 * u + f, 'file', 'Notes ' || f, 2000000 + u, u
             FROM generate_series(1, $1) u, generate_series(0, 2) f"
                .into(),
        ),
        (
            "shares with people outside the team",
            "INSERT INTO app.shares (resource_id, user_id, access)
             SELECT 1000000 + i, 1 + (i * 7919) % $1, 'read'
             FROM generate_series(0, 48 * $2 - 1) i WHERE i % 10 = 3"
                .into(),
        ),
    ]
}

/// Runs the demo until `shutdown`.
pub async fn run(args: DemoArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    // The flags, a given URL and the address first: a mistake in any of them fails in a
    // moment, not after a minute of seeding.
    let mut settings = args
        .server
        .settings(args.database_url.as_deref().unwrap_or_default())?;
    if let Some(url) = &args.database_url {
        crate::sync::check_database_url(url)?;
    }
    if settings.listen.is_none() {
        bail!("the demo prints its checks over TCP: give --listen an address (--unix-socket serves beside it)");
    }
    if args.shards > 1 && settings.unix_socket.is_some() {
        bail!("--unix-socket serves one daemon: the sharded demo (--shards) serves over TCP only");
    }
    let listeners = crate::Listeners::bind(&settings)?;
    let (cluster, database_url) = match &args.database_url {
        Some(url) => (None, url.clone()),
        None => {
            let options = ClusterOptions {
                data_dir: args.data_dir.clone(),
                unsafe_fast: true,
                ..ClusterOptions::default()
            };
            say!(
                err,
                "starting a throwaway Postgres from this machine's binaries…"
            );
            let cluster = tokio::task::spawn_blocking(move || Cluster::start(&options))
                .await
                .context("start the throwaway Postgres")??;
            say!(
                err,
                "Postgres is up on 127.0.0.1:{} ({})",
                cluster.port(),
                cluster.dir().display()
            );
            // It has no TLS: said in the URL, so that a `PGSSLMODE` of the shell's (set for
            // a managed database) neither stops the demo nor the `psql` it prints.
            let url = format!("{}?sslmode=disable", cluster.url("postgres"));
            (Some(cluster), url)
        }
    };
    let pool = crate::db::pool(&database_url).await?;
    // One server session for every step (`db::migrate`).
    let mut connection = pool.acquire().await.context("connect to the database")?;
    crate::db::migrate(&mut *connection).await?;
    crate::db::migrate_reference_model(&mut *connection).await?;
    let existing: i64 = sqlx::query_scalar("SELECT count(*) FROM app.users")
        .fetch_one(&mut *connection)
        .await
        .context("count existing users")?;
    if existing == 0 {
        seed(&mut *connection, args.users).await?;
    } else {
        say!(
            err,
            "the database already holds {existing} users in app.users: not seeding"
        );
    }
    drop(connection);
    pool.close().await;

    settings.sync.database_url.clone_from(&database_url);
    // A URL given by the user may hold a password: name the variable instead.
    let psql_url = match &cluster {
        Some(_) => database_url.clone(),
        None => "$DATABASE_URL".to_owned(),
    };
    let with_token = args.server.token.is_set();
    let stopped = if args.shards <= 1 {
        let unix = settings.unix_socket.as_ref().map(|unix| unix.path.clone());
        let daemon = Daemon::start_on(listeners, settings, shutdown.clone()).await?;
        if daemon.wait_ready(Duration::from_secs(120)).await {
            let address = daemon.local_addr().context("the demo's TCP address")?;
            let base = format!("{}://{address}", daemon.scheme());
            let counts = daemon.store().counts();
            let ready = format!(
                "permd is ready: {} tuples, {} subjects, {} limits.",
                counts.tuples, counts.subjects, counts.limits
            );
            print_examples(&base, &ready, with_token, args.users, &psql_url);
            if let Some(path) = unix {
                let auth = auth_header(with_token);
                say!(out, "Every route over its Unix socket too:");
                say!(
                    out,
                    "  curl -s --unix-socket {}{auth} 'http://permd/v1/check?subject=user:2&permission=write&object=resource:10000'",
                    path.display()
                );
            }
            say!(out, "Press Ctrl-C to stop.");
        }
        // The cluster is stopped whether or not the daemon stopped on its own (a panicked
        // part).
        daemon.wait().await
    } else {
        let print = |base: &str, ready: &str| {
            print_examples(base, ready, with_token, args.users, &psql_url);
            say!(out, "Press Ctrl-C to stop.");
        };
        let tcp = listeners.tcp.context("the demo's TCP address")?;
        sharded(tcp, settings, args.shards, &shutdown, print).await
    };
    if let Some(cluster) = cluster {
        say!(
            err,
            "stopping Postgres{}",
            if args.data_dir.is_some() {
                ""
            } else {
                " and removing its data"
            }
        );
        tokio::task::spawn_blocking(move || cluster.stop())
            .await
            .ok();
    }
    stopped
}

/// The demo as a sharded set: `shards` daemons of `--shard i/N` on ports of the kernel's
/// choosing, and `permd route` in front of them on `listener`, until `shutdown`.
async fn sharded(
    listener: tokio::net::TcpListener,
    settings: Settings,
    shards: u32,
    shutdown: &CancellationToken,
    print: impl FnOnce(&str, &str),
) -> anyhow::Result<()> {
    let mut daemons = Vec::new();
    let mut urls = Vec::new();
    for index in 0..shards {
        let mut own = settings.clone();
        let shard = Shard::new(index, shards).context("a shard")?;
        (own.sync.shard, own.http.shard, own.tls) = (shard, shard, None);
        let address = SocketAddr::from(([127, 0, 0, 1], 0));
        own.listen = Some(address);
        let tcp = crate::bind(address)?;
        urls.push(format!("http://{}", tcp.local_addr()?));
        let listeners = crate::Listeners {
            tcp: Some(tcp),
            unix: None,
        };
        daemons.push(Daemon::start_on(listeners, own, shutdown.clone()).await?);
    }
    let config = crate::route::RouteConfig {
        shards: urls.clone(),
        shards_file: None,
        token: settings.http.token.clone(),
        request_timeout: settings.http.request_timeout,
        body_limit: settings.http.body_limit,
        max_batch: settings.http.max_batch,
        ca: None,
    };
    let scheme = if settings.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let base = format!("{scheme}://{}", listener.local_addr()?);
    let router = tokio::spawn(crate::route::serve(
        listener,
        None,
        crate::route::Router::new(config)?,
        settings.server,
        settings.tls.clone(),
        shutdown.clone(),
    ));
    let mut ready = true;
    for daemon in &daemons {
        ready &= daemon.wait_ready(Duration::from_secs(120)).await;
    }
    if ready {
        let mut tuples = 0;
        for daemon in &daemons {
            tuples += daemon.store().counts().tuples;
        }
        print(
            &base,
            &format!(
                "permd is ready: {tuples} tuples in {shards} shards (daemons at {}), behind \
                 `permd route` at {base}.",
                urls.join(", ")
            ),
        );
    }
    let mut stopped = Ok(());
    for daemon in daemons {
        let result = daemon.wait().await;
        if stopped.is_ok() {
            stopped = result;
        }
    }
    let _ = tokio::time::timeout(settings.shutdown_timeout, router).await;
    stopped
}

/// Seeds the demo enterprise of `users` users into the reference model (already migrated),
/// printing progress to stderr. Also used by the write-cost benchmark.
pub async fn seed<'a, A: sqlx::Acquire<'a, Database = sqlx::Postgres>>(
    db: A,
    users: u32,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let users = i64::from(users);
    let teams = (users + TEAM - 1) / TEAM;
    let mut tx = db.begin().await?;
    // Bulk load: the triggers only record, and nothing is recorded; one rebuild follows.
    sqlx::raw_sql("SET LOCAL permd_app.maintain = off")
        .execute(&mut *tx)
        .await?;
    let steps = steps();
    for (i, (label, sql)) in steps.iter().enumerate() {
        // Plain numbers, not user input: safe to splice, and several statements a step.
        let sql = sql
            .replace("$1", &users.to_string())
            .replace("$2", &teams.to_string());
        let done = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut *tx)
            .await
            .with_context(|| format!("seed {label}"))?;
        say!(
            err,
            "seeding [{}/{}] {label}: {} rows",
            i + 1,
            steps.len() + 1,
            done.rows_affected()
        );
    }
    sqlx::raw_sql(
        "ANALYZE app.users, app.resources, app.shares, app.group_members, app.user_subscriptions",
    )
    .execute(&mut *tx)
    .await?;
    say!(
        err,
        "seeding [{}/{}] computing every user's effective permissions (app.rebuild_permissions())…",
        steps.len() + 1,
        steps.len() + 1
    );
    let computing = Instant::now();
    let (added, _, limits): (i64, i64, i64) = {
        let rebuild = sqlx::query_as("SELECT * FROM app.rebuild_permissions()").fetch_one(&mut *tx);
        tokio::pin!(rebuild);
        // One statement with no progress of its own: say that it is still working.
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + Duration::from_secs(10),
            Duration::from_secs(10),
        );
        loop {
            tokio::select! {
                done = &mut rebuild => break done.context("compute the permissions")?,
                _ = tick.tick() => say!(
                    err,
                    "  still computing ({:.0}s; about 30s for 10,000 users here)",
                    computing.elapsed().as_secs_f64()
                ),
            }
        }
    };
    say!(
        err,
        "  {added} tuples and {limits} limits in {:.1}s",
        computing.elapsed().as_secs_f64()
    );
    tx.commit().await?;
    say!(
        err,
        "seeded {users} users, {teams} teams and their files in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// curl's option that presents the token, when the demo asks for one.
fn auth_header(with_token: bool) -> &'static str {
    if with_token {
        " -H \"Authorization: Bearer $PERMD_TOKEN\""
    } else {
        ""
    }
}

/// Prints what to try against `base` (the daemon, or the router), after `ready` (what it
/// holds).
fn print_examples(base: &str, ready: &str, with_token: bool, users: u32, database_url: &str) {
    let auth = auth_header(with_token);
    let check = |subject: &str, permission: &str, object: &str| {
        let object = if object.is_empty() {
            String::new()
        } else {
            format!("&object={object}")
        };
        format!("curl -s{auth} '{base}/v1/check?subject={subject}&permission={permission}{object}'")
    };
    let outsider = 1 + (3 * 7919) % users;
    say!(out, "");
    say!(out, "{ready}");
    say!(out, "Try:");
    let examples = [
        ("user:2 writes in their team's folder (shared write with team 0)", check("user:2", "write", "resource:10000")),
        ("... and in every file below it", check("user:2", "write", "resource:1000005")),
        ("user:9 is in team 1: no access to team 0's folder", check("user:9", "read", "resource:10000")),
        ("user:9 sees the company folder as a path only", check("user:9", "list", "resource:1")),
        ("... but cannot read it", check("user:9", "read", "resource:1")),
        ("user:81 reads the handbook of department 0 (shared read)", check("user:81", "read", "resource:1003")),
        ("a project file shared with someone outside the team", check(&format!("user:{outsider}"), "read", "resource:1000003")),
        ("user:1 holds ADMIN_ACCESS: delete anything", check("user:1", "delete", "resource:3000300")),
        ("user:99 is suspended: not even their own home", check("user:99", "read", "resource:2000099")),
        ("user:60 is on BASIC: may export", check("user:60", "EXPORT_DATA", "")),
        ("user:5 is on FREE: may not", check("user:5", "EXPORT_DATA", "")),
        ("user:25 has a PRO trial ending within three days", format!("curl -s{auth} '{base}/v1/subjects/user:25/permissions'")),
        ("where user:2 may write", format!("curl -s{auth} '{base}/v1/subjects/user:2/objects?permission=write'")),
        ("limits of user:97 (ENTERPRISE)", format!("curl -s{auth} '{base}/v1/subjects/user:97/limits'")),
        ("may user:5 create a 4th project?", format!("curl -s{auth} '{base}/v1/check-limit?subject=user:5&limit=projects&usage=3'")),
        (
            "a batch",
            format!(
                "curl -s{auth} -X POST '{base}/v1/check' -H 'content-type: application/json' -d '{{\"checks\":[{{\"subject\":\"user:2\",\"permission\":\"read\",\"object\":\"resource:10000\"}},{{\"subject\":\"user:9\",\"permission\":\"read\",\"object\":\"resource:10000\"}}]}}'"
            ),
        ),
        ("status", format!("curl -s{auth} '{base}/v1/status'")),
    ];
    for (what, command) in examples {
        say!(out, "  # {what}\n  {command}");
    }
    say!(
        out,
        "Write through the model, and read your own write (user:9 joins team 0; the token makes \
         permd answer only once that commit is applied):"
    );
    say!(
        out,
        "  TOKEN=$(psql -qAt \"{database_url}\" -c 'INSERT INTO app.group_members VALUES (1, 9) RETURNING permd.write_token()')"
    );
    say!(
        out,
        "  {}",
        check("user:9", "read", "resource:10000").replace("10000'", "10000&at_least='$TOKEN")
    );
    let permd = std::env::current_exe()
        .map_or_else(|_| "permd".to_owned(), |path| path.display().to_string());
    let ca = if base.starts_with("https://") {
        " --permd-ca CA_OF_YOUR_CERTIFICATE.pem"
    } else {
        ""
    };
    say!(
        out,
        "Prove that permd equals the database (digests; through a router, every daemon behind it):"
    );
    say!(
        out,
        "  {permd} verify --database-url \"{database_url}\" --permd {base}{ca}"
    );
}
