//! `permd demo`: a throwaway Postgres, demo data, a running daemon and curl commands.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::config::DemoArgs;
use crate::embedded::{Cluster, ClusterOptions};
use crate::Daemon;

/// Plans by user id: 60% FREE, 25% BASIC, 12% PRO, 3% ENTERPRISE.
const PLAN: &str = "CASE WHEN u % 100 < 60 THEN 'FREE' WHEN u % 100 < 85 THEN 'BASIC' \
                    WHEN u % 100 < 97 THEN 'PRO' ELSE 'ENTERPRISE' END";

/// Each seeding step: a label for the progress line and one statement ($1 = users).
fn steps() -> Vec<(&'static str, String)> {
    vec![
        (
            "plan permissions",
            format!(
                "INSERT INTO permd.tuples (subject, object, permission)
                 SELECT 'user:' || u, '', p FROM generate_series(1, $1) u,
                 LATERAL unnest(CASE {PLAN}
                     WHEN 'FREE' THEN ARRAY['VIEW']
                     WHEN 'BASIC' THEN ARRAY['VIEW', 'EXPORT_DATA']
                     WHEN 'PRO' THEN ARRAY['VIEW', 'EXPORT_DATA', 'API_ACCESS']
                     ELSE ARRAY['VIEW', 'EXPORT_DATA', 'API_ACCESS', 'SSO'] END) p"
            ),
        ),
        (
            "admins",
            "INSERT INTO permd.tuples (subject, object, permission)
             SELECT 'user:' || u, o, p FROM generate_series(1, least($1, 3)) u,
             (VALUES ('', 'ADMIN_ACCESS'), ('*', 'read'), ('*', 'write'), ('*', 'share'),
                     ('*', 'delete'), ('*', 'list')) v(o, p)"
                .into(),
        ),
        (
            "trials (expiring in an hour) and lapsed trials",
            "INSERT INTO permd.tuples (subject, object, permission, expires_at)
             SELECT 'user:' || u, '', 'BETA_FEATURES',
                    CASE WHEN u % 2 = 0 THEN now() + interval '1 hour' ELSE now() - interval '1 day' END
             FROM generate_series(1, $1) u WHERE u % 25 = 0"
                .into(),
        ),
        (
            "owned files (5 per user)",
            "INSERT INTO permd.tuples (subject, object, permission)
             SELECT 'user:' || u, 'resource:file-' || u || '-' || f, p
             FROM generate_series(1, $1) u, generate_series(1, 5) f,
             unnest(ARRAY['read', 'write', 'share', 'delete', 'list']) p"
                .into(),
        ),
        (
            "team folders (20 users a team)",
            "INSERT INTO permd.tuples (subject, object, permission)
             SELECT 'user:' || u, 'resource:team-' || (u / 20), p
             FROM generate_series(1, $1) u, unnest(ARRAY['read', 'write', 'list']) p"
                .into(),
        ),
        (
            "public handbook",
            "INSERT INTO permd.tuples (subject, object, permission)
             VALUES ('*', 'resource:handbook', 'read'), ('*', 'resource:handbook', 'list')"
                .into(),
        ),
        (
            "plan limits",
            format!(
                "INSERT INTO permd.limits (subject, name, value)
                 SELECT 'user:' || u, n, v FROM generate_series(1, $1) u,
                 LATERAL (VALUES
                    ('projects', CASE {PLAN} WHEN 'FREE' THEN 3 WHEN 'BASIC' THEN 10 WHEN 'PRO' THEN 50 ELSE 1000 END),
                    ('seats', CASE {PLAN} WHEN 'FREE' THEN 1 WHEN 'BASIC' THEN 5 WHEN 'PRO' THEN 25 ELSE 500 END)
                 ) l(n, v)"
            ),
        ),
    ]
}

/// Runs the demo until `shutdown`.
pub async fn run(args: DemoArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let (cluster, database_url) = match &args.database_url {
        Some(url) => (None, url.clone()),
        None => {
            let options = ClusterOptions {
                data_dir: args.data_dir.clone(),
                unsafe_fast: true,
                ..ClusterOptions::default()
            };
            eprintln!("starting a throwaway Postgres from this machine's binaries…");
            let cluster = tokio::task::spawn_blocking(move || Cluster::start(&options))
                .await
                .context("start the throwaway Postgres")??;
            eprintln!(
                "Postgres is up on 127.0.0.1:{} ({})",
                cluster.port(),
                cluster.dir().display()
            );
            let url = cluster.url("postgres");
            (Some(cluster), url)
        }
    };
    let pool = crate::db::pool(&database_url).await?;
    crate::db::migrate(&pool).await?;
    let existing: i64 = sqlx::query_scalar("SELECT count(*) FROM permd.tuples")
        .fetch_one(&pool)
        .await
        .context("count existing tuples")?;
    if existing == 0 {
        seed(&pool, args.users).await?;
    } else {
        eprintln!("the database already holds {existing} tuples: not seeding");
    }
    pool.close().await;

    let settings = args.server.settings(&database_url)?;
    let daemon = Daemon::start(settings, shutdown.clone()).await?;
    if daemon.wait_ready(Duration::from_secs(120)).await {
        print_examples(&daemon, args.server.token.is_set());
    }
    daemon.wait().await;
    if let Some(cluster) = cluster {
        eprintln!(
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
    Ok(())
}

async fn seed(pool: &sqlx::PgPool, users: u32) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut tx = pool.begin().await?;
    let steps = steps();
    for (i, (label, sql)) in steps.iter().enumerate() {
        let done = sqlx::query(sql)
            .bind(i64::from(users))
            .execute(&mut *tx)
            .await
            .with_context(|| format!("seed {label}"))?;
        eprintln!(
            "seeding [{}/{}] {label}: {} rows",
            i + 1,
            steps.len(),
            done.rows_affected()
        );
    }
    tx.commit().await?;
    eprintln!(
        "seeded {users} users in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn print_examples(daemon: &Daemon, with_token: bool) {
    let base = format!("http://{}", daemon.local_addr());
    let counts = daemon.store().counts();
    let auth = if with_token {
        " -H \"Authorization: Bearer $PERMD_TOKEN\""
    } else {
        ""
    };
    println!();
    println!(
        "permd is ready: {} tuples, {} subjects, {} limits.",
        counts.tuples, counts.subjects, counts.limits
    );
    println!("Try:");
    let examples = [
        ("a BASIC user may export", format!("curl -s{auth} '{base}/v1/check?subject=user:60&permission=EXPORT_DATA'")),
        ("a FREE user may not", format!("curl -s{auth} '{base}/v1/check?subject=user:5&permission=EXPORT_DATA'")),
        ("an admin reads any file", format!("curl -s{auth} '{base}/v1/check?subject=user:1&permission=read&object=resource:file-42-1'")),
        ("a team member writes the team folder", format!("curl -s{auth} '{base}/v1/check?subject=user:42&permission=write&object=resource:team-2'")),
        ("everyone reads the handbook", format!("curl -s{auth} '{base}/v1/check?subject=user:777&permission=read&object=resource:handbook'")),
        ("a trial that lapsed yesterday", format!("curl -s{auth} '{base}/v1/check?subject=user:25&permission=BETA_FEATURES'")),
        (
            "a batch",
            format!(
                "curl -s{auth} -X POST '{base}/v1/check' -H 'content-type: application/json' -d '{{\"checks\":[{{\"subject\":\"user:50\",\"permission\":\"BETA_FEATURES\"}},{{\"subject\":\"user:5\",\"permission\":\"read\",\"object\":\"resource:file-5-1\"}}]}}'"
            ),
        ),
        ("what user:42 may do globally", format!("curl -s{auth} '{base}/v1/subjects/user:42/permissions'")),
        ("where user:42 may write", format!("curl -s{auth} '{base}/v1/subjects/user:42/objects?permission=write'")),
        ("limits of user:99", format!("curl -s{auth} '{base}/v1/subjects/user:99/limits'")),
        ("may user:5 create a 4th project?", format!("curl -s{auth} '{base}/v1/check-limit?subject=user:5&limit=projects&usage=3'")),
        ("status", format!("curl -s{auth} '{base}/v1/status'")),
    ];
    for (what, command) in examples {
        println!("  # {what}\n  {command}");
    }
    println!("Press Ctrl-C to stop.");
}
