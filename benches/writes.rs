//! The price of cheap reads: what each write path of the reference model costs at write
//! time, at demo scale. Starts a throwaway Postgres, seeds the demo enterprise
//! (`PERMD_DEMO_USERS`, default 10,000, at least 7,500), then times every write path in its own
//! transaction, sent as one round trip on one warm connection (`BEGIN`, the write, `COMMIT`,
//! whose flush recomputes the precomputed set), and counts the permd.tuples / permd.limits
//! keys it touched. Prints a Markdown table, then what a write costs as a new
//! connection's first (its flush planned then) against its second, how fast
//! model writes from 1, 4 and 16 connections at once go (the flushes take turns on one
//! lock), and how long `app.verify_permissions()` and an `app.rebuild_permissions()` with
//! nothing to change take.
//!
//! `cargo bench --bench writes` (release build; about two minutes, most of it seeding).

#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{cluster, env_or, runtime};
use sqlx::{PgPool, Row as _};

/// The SQL of a write's run `i`.
type Sql = fn(u64) -> String;

/// One write path: a name, how many times to run it, and the SQL of run `i`.
struct Path {
    name: &'static str,
    runs: u64,
    sql: Sql,
}

/// Team `t`'s ids, as the demo lays them out (see `permd::demo`).
/// The smallest demo enterprise whose teams include every team the paths write to.
const MIN_USERS: u32 = 7_500;

fn team_folder(t: u64) -> u64 {
    10_000 + t
}
fn project(t: u64, p: u64) -> u64 {
    100_000 + 4 * t + p
}
fn file(t: u64, p: u64, f: u64) -> u64 {
    1_000_000 + 12 * (4 * t + p) + f
}
fn lead(t: u64) -> u64 {
    1 + 8 * t
}

fn paths() -> Vec<Path> {
    vec![
        Path {
            name: "create a file in a team project (team of 8 shares it)",
            runs: 30,
            sql: |i| {
                format!(
                    "INSERT INTO app.resources VALUES ({}, 'file', 'new', {}, {})",
                    5_000_000 + i,
                    project(i, 0),
                    lead(i)
                )
            },
        },
        Path {
            name: "share a file with a user",
            runs: 30,
            sql: |i| {
                format!(
                    "INSERT INTO app.shares (id, resource_id, user_id, access) VALUES ({}, {}, {}, 'read')",
                    9_000_000 + i,
                    file(100 + i, 1, 0),
                    lead(200 + i)
                )
            },
        },
        Path {
            name: "change that share's access to write",
            runs: 30,
            sql: |i| {
                format!(
                    "UPDATE app.shares SET access = 'write' WHERE id = {}",
                    9_000_000 + i
                )
            },
        },
        Path {
            name: "unshare it",
            runs: 30,
            sql: |i| format!("DELETE FROM app.shares WHERE id = {}", 9_000_000 + i),
        },
        Path {
            name: "share a team folder (53 resources) with another team",
            runs: 20,
            sql: |i| {
                format!(
                    "INSERT INTO app.shares (id, resource_id, group_id, access) VALUES ({}, {}, {}, 'read')",
                    9_100_000 + i,
                    team_folder(300 + i),
                    400 + i + 1
                )
            },
        },
        Path {
            name: "unshare that team folder from the team",
            runs: 20,
            sql: |i| format!("DELETE FROM app.shares WHERE id = {}", 9_100_000 + i),
        },
        Path {
            name: "join a team (8 members, 53 resources)",
            runs: 30,
            sql: |i| {
                format!(
                    "INSERT INTO app.group_members VALUES ({}, {})",
                    500 + i + 1,
                    lead(600 + i)
                )
            },
        },
        Path {
            name: "leave it",
            runs: 30,
            sql: |i| {
                format!(
                    "DELETE FROM app.group_members WHERE group_id = {} AND user_id = {}",
                    500 + i + 1,
                    lead(600 + i)
                )
            },
        },
        Path {
            name: "move a project (13 resources) to another team",
            runs: 20,
            sql: |i| {
                format!(
                    "UPDATE app.resources SET parent_id = {} WHERE id = {}",
                    team_folder(700 + i),
                    project(750 + i, 2)
                )
            },
        },
        Path {
            name: "move a project into its own subtree (refused)",
            runs: 20,
            sql: |i| {
                format!(
                    "UPDATE app.resources SET parent_id = {} WHERE id = {}",
                    file(760 + i, 1, 3),
                    project(760 + i, 1)
                )
            },
        },
        Path {
            name: "delete a project (13 resources)",
            runs: 20,
            sql: |i| {
                format!(
                    "DELETE FROM app.resources WHERE id = {}",
                    project(800 + i, 3)
                )
            },
        },
        Path {
            name: "delete a team's group (8 members, shares a team folder)",
            runs: 10,
            sql: |i| format!("DELETE FROM app.groups WHERE id = {}", 850 + i + 1),
        },
        Path {
            name: "suspend a user",
            runs: 30,
            sql: |i| {
                format!(
                    "UPDATE app.users SET status = 'SUSPENDED' WHERE id = {}",
                    2 + 8 * (900 + i)
                )
            },
        },
        Path {
            name: "reactivate them",
            runs: 30,
            sql: |i| {
                format!(
                    "UPDATE app.users SET status = 'ACTIVE' WHERE id = {}",
                    2 + 8 * (900 + i)
                )
            },
        },
        Path {
            name: "subscribe a user to PRO",
            runs: 30,
            sql: |i| {
                format!(
                    "INSERT INTO app.user_subscriptions (id, user_id, plan_id) VALUES ({}, {}, 3)",
                    8_000_000 + i,
                    3 + 8 * i
                )
            },
        },
        Path {
            name: "change that subscription to ENTERPRISE",
            runs: 30,
            sql: |i| {
                format!(
                    "UPDATE app.user_subscriptions SET plan_id = 4 WHERE id = {}",
                    8_000_000 + i
                )
            },
        },
        Path {
            name: "cancel it",
            runs: 30,
            sql: |i| {
                format!(
                    "UPDATE app.user_subscriptions SET status = 'CANCELED' WHERE id = {}",
                    8_000_000 + i
                )
            },
        },
        Path {
            name: "grant a permission directly",
            runs: 30,
            sql: |i| {
                format!(
                    "INSERT INTO app.user_permission_grants VALUES ({}, 5)",
                    4 + 8 * i
                )
            },
        },
        Path {
            name: "revoke it",
            runs: 30,
            sql: |i| {
                format!("DELETE FROM app.user_permission_grants WHERE user_id = {} AND permission_id = 5", 4 + 8 * i)
            },
        },
        Path {
            name: "add a permission to the PRO plan (about 1,600 subscribers)",
            runs: 3,
            sql: |i| {
                format!(
                    "INSERT INTO app.plan_permissions VALUES (3, {})",
                    [7, 5, 4][i as usize]
                )
            },
        },
        Path {
            name: "remove it from the plan",
            runs: 3,
            sql: |i| {
                format!(
                    "DELETE FROM app.plan_permissions WHERE plan_id = 3 AND permission_id = {}",
                    [7, 5, 4][i as usize]
                )
            },
        },
        Path {
            name: "change a PRO plan limit",
            runs: 3,
            sql: |i| {
                format!(
                    "UPDATE app.plan_limits SET value = {} WHERE plan_id = 3 AND name = 'projects'",
                    60 + i
                )
            },
        },
    ]
}

/// Shares a file with a user from `writers` connections at once for `seconds`, each share
/// a transaction of its own (one round trip: BEGIN, the INSERT, COMMIT, whose flush
/// recomputes the pair) and each connection as fast as it can: how many model writes a
/// second the flushes, which take turns on one lock, let through. Returns the commits
/// a second and every commit's time.
async fn concurrent_shares(
    pool: &PgPool,
    url: &str,
    writers: u64,
    seconds: f64,
) -> (f64, Vec<Duration>) {
    // The team projects' files and the users still there after the paths above.
    let files: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM app.resources WHERE kind = 'file' AND id BETWEEN 1000000 AND 1999999 \
         ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let users: Vec<i64> = sqlx::query_scalar("SELECT id FROM app.users ORDER BY id")
        .fetch_all(pool)
        .await
        .unwrap();
    let (files, users) = (std::sync::Arc::new(files), std::sync::Arc::new(users));
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (url, files, users) = (url.to_owned(), files.clone(), users.clone());
        tasks.push(tokio::spawn(async move {
            use sqlx::Connection as _;
            let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
            // A connection's first flush plans its statements (~10 ms): done once here, in
            // a share rolled back, and not measured. (A flush with nothing pending returns
            // before planning anything.)
            let warm = format!(
                "BEGIN; INSERT INTO app.shares (resource_id, user_id, access) \
                 VALUES ({}, {}, 'read'); SELECT app.flush(); ROLLBACK",
                files[0], users[0]
            );
            sqlx::raw_sql(sqlx::AssertSqlSafe(warm))
                .execute(&mut conn)
                .await
                .unwrap();
            let mut times = Vec::new();
            let mut k = 0;
            while Instant::now() < deadline {
                // Writer w's shares, on files and users spread over the enterprise.
                let file = files[((w * 7_919 + k * 13) % files.len() as u64) as usize];
                let user = users[((w * 131 + k * 7) % users.len() as u64) as usize];
                let sql = format!(
                    "BEGIN; INSERT INTO app.shares (resource_id, user_id, access) \
                     VALUES ({file}, {user}, 'read'); COMMIT"
                );
                let one = Instant::now();
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                    .execute(&mut conn)
                    .await
                    .unwrap();
                times.push(one.elapsed());
                k += 1;
            }
            times
        }));
    }
    let mut times = Vec::new();
    for task in tasks {
        times.extend(task.await.unwrap());
    }
    let rate = times.len() as f64 / started.elapsed().as_secs_f64();
    times.sort();
    (rate, times)
}

/// A model write, then another, on each of `runs` new connections: a connection's first
/// flush plans the flush's statements, which it does holding the model's lock, and an
/// application that connects for each request pays that at every write. Returns the
/// first writes' times and the second writes' (the flush planned), sorted; connecting is
/// not timed.
async fn first_writes(
    url: &str,
    runs: u64,
    first: Sql,
    then: Sql,
) -> (Vec<Duration>, Vec<Duration>) {
    use sqlx::Connection as _;
    let (mut firsts, mut seconds) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
        for (sql, times) in [(first(i), &mut firsts), (then(i), &mut seconds)] {
            let batch = format!("BEGIN; {sql}; COMMIT");
            let started = Instant::now();
            sqlx::raw_sql(sqlx::AssertSqlSafe(batch))
                .execute(&mut conn)
                .await
                .unwrap();
            times.push(started.elapsed());
        }
        conn.close().await.unwrap();
    }
    firsts.sort();
    seconds.sort();
    (firsts, seconds)
}

/// The `q` quantile of `times`, sorted.
fn quantile(times: &[Duration], q: f64) -> Duration {
    times[((times.len() - 1) as f64 * q).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// Keys transaction `xid` changed in permd.tuples and permd.limits: (subject, object)
/// pairs of tuples and subjects of limits, as the changelog records them (nothing prunes
/// it here: no daemon runs).
async fn touched(conn: &mut sqlx::PgConnection, xid: &str) -> i64 {
    sqlx::query(
        "SELECT count(*) FROM (SELECT DISTINCT kind, subject, object FROM permd.changelog \
         WHERE xid = $1::xid8) k",
    )
    .bind(xid)
    .fetch_one(conn)
    .await
    .unwrap()
    .get(0)
}

fn main() {
    let users: u32 = env_or("PERMD_DEMO_USERS", 10_000);
    // The paths below touch fixed teams, up to team 929 (`2 + 8 * (900 + i)`, i < 30).
    assert!(
        users >= MIN_USERS,
        "PERMD_DEMO_USERS={users}: the write paths use teams up to 929, so at least {MIN_USERS} users"
    );
    let cluster = cluster();
    let runtime = runtime();
    runtime.block_on(async {
        // `sslmode=disable` (the cluster has no TLS): sqlx straight to the server, as a
        // writer connects, not through the one-off commands' TLS relay.
        let url = format!("{}?sslmode=disable", cluster.url("postgres"));
        let pool: PgPool = permd::db::pool(&url).await.unwrap();
        permd::db::migrate(&pool).await.unwrap();
        permd::db::migrate_reference_model(&pool).await.unwrap();
        permd::demo::seed(&pool, users).await.unwrap();
        sqlx::raw_sql("VACUUM ANALYZE")
            .execute(&pool)
            .await
            .unwrap();
        let tuples: i64 = sqlx::query_scalar("SELECT count(*) FROM permd.tuples")
            .fetch_one(&pool)
            .await
            .unwrap();
        println!("\nWrite cost at demo scale: {users} users, {tuples} tuples.\n");
        println!("| write path | runs | median | p90 | keys changed (median) |");
        println!("|---|---:|---:|---:|---:|");
        // One connection for every path, as an application's pooled writer: its first
        // flush plans the flush's statements (~10 ms), done here in a share rolled back
        // and not measured; a path's own statements are planned at its first run.
        let mut conn = {
            use sqlx::Connection as _;
            sqlx::PgConnection::connect(&url).await.unwrap()
        };
        sqlx::raw_sql(
            "BEGIN; INSERT INTO app.shares (resource_id, user_id, access) \
             SELECT min(id), 1, 'read' FROM app.resources WHERE kind = 'file'; \
             SELECT app.flush(); ROLLBACK",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        for path in paths() {
            let mut times = Vec::new();
            let mut rows = Vec::new();
            for i in 0..path.runs {
                let sql = (path.sql)(i);
                // One round trip, as a writer sends it: the write, then COMMIT, which runs
                // the flush of the precomputed set. The transaction's id comes back with it,
                // to count its changelog keys after the fact.
                let batch = format!("BEGIN; {sql}; SELECT pg_current_xact_id()::text; COMMIT");
                let started = Instant::now();
                let wrote = sqlx::raw_sql(sqlx::AssertSqlSafe(batch))
                    .fetch_all(&mut conn)
                    .await;
                match wrote {
                    Ok(got) => {
                        times.push(started.elapsed());
                        let xid: String = got[0].get(0);
                        rows.push(touched(&mut conn, &xid).await);
                    }
                    Err(e) => {
                        assert!(path.name.contains("refused"), "{sql}: {e}");
                        sqlx::raw_sql("ROLLBACK").execute(&mut conn).await.unwrap();
                        times.push(started.elapsed());
                        rows.push(0);
                    }
                }
            }
            times.sort();
            rows.sort_unstable();
            println!(
                "| {} | {} | {} | {} | {} |",
                path.name,
                path.runs,
                ms(quantile(&times, 0.5)),
                ms(quantile(&times, 0.9)),
                rows[rows.len() / 2]
            );
        }
        println!(
            "\nA model write on a new connection, then a second on it (connecting not timed):\n"
        );
        println!(
            "| writes | connections | first write (median, p90) | second write (median, p90) |"
        );
        println!("|---|---:|---:|---:|");
        let write_then_undo: [(&str, Sql, Sql); 2] = [
            (
                "share a file with a user, then unshare it",
                |i| {
                    format!(
                        "INSERT INTO app.shares (id, resource_id, user_id, access) \
                         VALUES ({}, {}, {}, 'read')",
                        9_500_000 + i,
                        file(300 + i, 2, 0),
                        lead(400 + i)
                    )
                },
                |i| format!("DELETE FROM app.shares WHERE id = {}", 9_500_000 + i),
            ),
            (
                "grant a permission directly, then revoke it",
                |i| {
                    format!(
                        "INSERT INTO app.user_permission_grants VALUES ({}, 6)",
                        6 + 8 * i
                    )
                },
                |i| {
                    format!(
                        "DELETE FROM app.user_permission_grants \
                         WHERE user_id = {} AND permission_id = 6",
                        6 + 8 * i
                    )
                },
            ),
        ];
        for (name, first, then) in write_then_undo {
            let (firsts, seconds) = first_writes(&url, 20, first, then).await;
            println!(
                "| {name} | 20 | {}, {} | {}, {} |",
                ms(quantile(&firsts, 0.5)),
                ms(quantile(&firsts, 0.9)),
                ms(quantile(&seconds, 0.5)),
                ms(quantile(&seconds, 0.9))
            );
        }

        println!("\nModel writes from several connections at once (a share with a user each):\n");
        println!("| writers | commits/s | median | p99 |");
        println!("|---:|---:|---:|---:|");
        for writers in [1, 4, 16] {
            let (rate, times) = concurrent_shares(&pool, &url, writers, 5.0).await;
            println!(
                "| {writers} | {rate:.0} | {} | {} |",
                ms(quantile(&times, 0.5)),
                ms(quantile(&times, 0.99))
            );
        }

        let started = Instant::now();
        let drift: i64 = sqlx::query_scalar("SELECT count(*) FROM app.verify_permissions()")
            .fetch_one(&pool)
            .await
            .unwrap();
        println!(
            "\napp.verify_permissions() after all of it: {drift} differences ({:.1} s).",
            started.elapsed().as_secs_f64()
        );
        assert_eq!(drift, 0);
        // What a repair costs when there is nothing to repair: every model writer waits
        // for it at COMMIT (it holds the flushes' lock throughout).
        let started = Instant::now();
        let rebuilt: (i64, i64, i64) = sqlx::query_as("SELECT * FROM app.rebuild_permissions()")
            .fetch_one(&pool)
            .await
            .unwrap();
        println!(
            "app.rebuild_permissions() after it: {rebuilt:?} (added, removed, limits) in {:.1} s.",
            started.elapsed().as_secs_f64()
        );
        assert_eq!(rebuilt, (0, 0, 0));
        pool.close().await;
    });
    cluster.stop();
}
