//! permd against Redis and one SQL query per check, side by side, in one run.
//!
//! `cargo bench --bench compare` starts everything it needs (a throwaway Postgres, a Redis
//! server, permd itself as a separate process), seeds one workload into all of them, drives
//! each in turn with the same client code, prints Markdown tables, and stops everything.
//!
//! Workload: 100,000 subjects on 100 plans of 10 of 40 permission names each (~1,000,000
//! tuples, 10 per subject), kept in the reference model's source tables and precomputed into
//! permd.tuples by `app.rebuild_permissions()`; Redis holds the same tuples as sets.
//! Subjects uniform at random, half the checks allowed. Every answer is compared with the
//! expected one and wrong answers are counted (and must be zero). The closed-loop tables
//! also give the CPU time (user + system, from `/proc/PID/stat`) the server's process and
//! the client's used per request during the run, for the servers that are a process of their
//! own (Redis, permd). Loopback TCP does much of the receiver's work in the sender's system
//! call, so each side's system time includes some of the other's. Under each round, the
//! single check's ratio to Redis those figures predict: Redis is held by its one thread
//! and permd by the two cores it shares with the client, so about 2 S_r / (S_p + C)
//! (server CPU a request of Redis and permd, and the client's), and the same with none of
//! permd's user time, the most any change to permd's own code could reach. The last two
//! columns are the share of the machine's time the hypervisor stole during the run
//! (`common::HostCpu`), and the share busy with neither the server nor the client (another
//! program on the machine: 0 to 2 % when it is quiet). Neither takes from every system
//! alike: Redis's one thread loses its turns to another program where permd's two
//! workers share them out, and the tails move most (a loop on one core beside the run:
//! single 1.44x and 1.22x Redis in two runs, p99 1.40x and 3.10x, where quiet runs gave
//! ~1.1x and 0.7x to 1.0x), so the closing table says "not conclusive" past 5 % stolen
//! or 10 % busy elsewhere.
//!
//! Environment: `BENCH_SECONDS` (per closed-loop run, default 8), `BENCH_RATE` (open-loop
//! requests/s, default 5000; 0 leaves the open loop out), `BENCH_SUBJECTS` (default 100000). For quick iterations:
//! `BENCH_SYSTEMS` (comma-separated keys, e.g. `redis,permd`: only those run, and the
//! ratios to a system left out are NaN), `BENCH_CONCURRENCY` (default `32,128`),
//! `BENCH_OVERLOAD=0` (skip the overload part). `BENCH_PERMD` (comma-separated paths of
//! permd binaries, default the one this build made): permd's rows run once per binary, one
//! binary right after the other, to compare two builds side by side in one run (say one
//! built in a `git worktree` of an earlier commit); the overload part runs the last one.
//! `BENCH_ROUNDS` (default 3): the closed loop at each concurrency runs that many rounds,
//! every selected system once a round, so that each system's runs alternate with the
//! others' and a slow or fast stretch of the machine falls on all of them; even rounds run
//! the systems in the reverse order (the tables keep theirs), so that no system always
//! runs early or late in a round, and a drift of the machine's speed within a round
//! favours none. A table gives permd's ratios to Redis and to SQL round by round and their
//! median (the figures the targets name). The open loop runs in as many rounds, alternated
//! the same way, with permd's p99 over Redis's each round and their median. Last, a table
//! of the medians at c=32 against the targets, met or missed, with the open loop's median
//! beside them. `BENCH_ROUNDS=1` for a quick run.
//!
//! Redis and permd also serve on a Unix socket each, with a single-check row each over it
//! (`redis-unix`, `permd-unix`): what a client on the same host (a sidecar) gets without
//! TCP. Each round prints permd's ratio to Redis over Unix sockets, and each side's gain
//! over its TCP row; the ratios table has a column for the first, and the targets' table a
//! line beside the targets (the issue's ratio is over TCP).
//!
//! permd also has a row of single checks that each carry a read-your-writes token
//! (`permd-token`, `at_least=` a token whose write it has applied, as a client's token
//! usually is by the time it asks): what read-your-writes costs when nothing needs to
//! wait, which Redis as a cache cannot offer.
//!
//! Besides the single check and the batch, permd has a row for a client that pools its
//! connections and sends both kinds on each (9 single checks, then a batch of 100), with
//! the rate it would reach if each request cost what it costs on a connection of its own
//! kind (from the single and batch rows of the same run).

#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{cluster, env_list, env_or, find, free_port, read_response, runtime, HostCpu};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufStream};
use tokio::net::{TcpStream, UnixStream};
use tokio_util::either::Either;

const PERMISSIONS: u32 = 40;
const PLANS: u32 = 100;
const PER_SUBJECT: u32 = 10;

/// One check of the workload, with the answer it must get.
#[derive(Clone, Copy)]
struct Check {
    subject: u32,
    permission: u32,
    allowed: bool,
}

/// Subject `u` is on plan `u % 100`, which holds permissions `(plan + 4j) % 40`, j < 10;
/// `(plan + 4j + 1) % 40` is never among them.
fn check(rng: &mut u64, subjects: u32) -> Check {
    let r = next(rng);
    let subject = 1 + (r % u64::from(subjects)) as u32;
    let j = ((r >> 32) % u64::from(PER_SUBJECT)) as u32;
    let allowed = (r >> 40) & 1 == 1;
    let plan = subject % PLANS;
    let permission = (plan + 4 * j + u32::from(!allowed)) % PERMISSIONS;
    Check {
        subject,
        permission,
        allowed,
    }
}

fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum System {
    SqlSource,
    SqlPrecomputed,
    Redis,
    RedisPipelined,
    RedisUnix,
    Permd,
    PermdToken,
    PermdUnix,
    PermdBatch,
    PermdMixed,
    BareAxum,
}

impl System {
    const ALL: [System; 11] = [
        System::SqlSource,
        System::SqlPrecomputed,
        System::Redis,
        System::RedisPipelined,
        System::RedisUnix,
        System::Permd,
        System::PermdToken,
        System::PermdUnix,
        System::PermdBatch,
        System::PermdMixed,
        System::BareAxum,
    ];

    fn name(self) -> &'static str {
        match self {
            System::SqlSource => "Postgres, query over the source tables",
            System::SqlPrecomputed => "Postgres, primary-key lookup on permd.tuples",
            System::Redis => "Redis SISMEMBER",
            System::RedisPipelined => "Redis SISMEMBER, pipelined 16",
            System::RedisUnix => "Redis SISMEMBER over a Unix socket",
            System::Permd => "permd, single check (HTTP keep-alive)",
            System::PermdToken => {
                "permd, single check with a read-your-writes token (`at_least`, its write applied)"
            }
            System::PermdUnix => "permd, single check over a Unix socket (HTTP keep-alive)",
            System::PermdBatch => "permd, batch of 100",
            System::PermdMixed => {
                "permd, mixed: 9 single checks, then a batch of 100, on one connection"
            }
            System::BareAxum => "bare axum + HashMap (the HTTP floor; not a product)",
        }
    }

    /// Whether permd serves it (its rows run once per `BENCH_PERMD` binary).
    fn is_permd(self) -> bool {
        matches!(
            self,
            System::Permd
                | System::PermdToken
                | System::PermdUnix
                | System::PermdBatch
                | System::PermdMixed
        )
    }

    /// The name `BENCH_SYSTEMS` selects it by.
    fn key(self) -> &'static str {
        match self {
            System::SqlSource => "sql-source",
            System::SqlPrecomputed => "sql-precomputed",
            System::Redis => "redis",
            System::RedisPipelined => "redis-pipelined",
            System::RedisUnix => "redis-unix",
            System::Permd => "permd",
            System::PermdToken => "permd-token",
            System::PermdUnix => "permd-unix",
            System::PermdBatch => "permd-batch",
            System::PermdMixed => "permd-mixed",
            System::BareAxum => "bare-axum",
        }
    }

    /// The number of checks in a connection's request number `i` (from 0).
    fn checks_in_request(self, i: u64) -> usize {
        match self {
            System::RedisPipelined => 16,
            System::PermdBatch => 100,
            // A client that pools its connections and sends both kinds on each.
            System::PermdMixed if i % 10 == 9 => 100,
            _ => 1,
        }
    }
}

/// Where the servers are.
#[derive(Clone)]
struct Endpoints {
    postgres: String,
    redis: u16,
    permd: u16,
    bare: u16,
    /// The Unix sockets Redis and permd also listen on.
    redis_socket: PathBuf,
    permd_socket: PathBuf,
    /// Process ids of the servers that run as their own process, for their CPU time.
    redis_pid: u32,
    permd_pid: u32,
    /// A read-your-writes token whose write permd has applied (`permd-token`'s checks).
    permd_token: u64,
}

impl Endpoints {
    /// The process serving `system`, when it is one process of its own (not Postgres's
    /// many, not the bare server's threads in this process).
    fn server_pid(&self, system: System) -> Option<u32> {
        match system {
            System::Redis | System::RedisPipelined | System::RedisUnix => Some(self.redis_pid),
            s if s.is_permd() => Some(self.permd_pid),
            _ => None,
        }
    }
}

/// CPU time a process has used, user and system, in seconds: `/proc/PID/stat`'s `utime`
/// and `stime`. `None` for `pid` gives this process's (the client's).
fn cpu_seconds(pid: Option<u32>) -> Cpu {
    let ticks = common::clock_ticks();
    let path = pid.map_or("/proc/self/stat".to_owned(), |pid| {
        format!("/proc/{pid}/stat")
    });
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is the first, utime
    // the 12th, stime the 13th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    Cpu {
        user: field(11) / ticks,
        system: field(12) / ticks,
    }
}

/// User and system CPU seconds.
#[derive(Clone, Copy)]
struct Cpu {
    user: f64,
    system: f64,
}

impl std::ops::Sub for Cpu {
    type Output = Cpu;

    fn sub(self, earlier: Cpu) -> Cpu {
        Cpu {
            user: self.user - earlier.user,
            system: self.system - earlier.system,
        }
    }
}

/// One client connection to one system.
enum Conn {
    Pg(tokio_postgres::Client, tokio_postgres::Statement, bool),
    Resp(BufStream<Stream>),
    /// With the `at_least` token every single check carries, if any.
    Http(BufStream<Stream>, Option<u64>),
}

/// A connection to Redis or permd: over TCP, or a Unix socket.
type Stream = Either<TcpStream, UnixStream>;

/// A TCP connection to `port` on loopback, set up as every client here sets it.
async fn tcp(port: u16) -> Stream {
    let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stream.set_nodelay(true).unwrap();
    Either::Left(stream)
}

/// A connection to the Unix socket at `path`.
async fn unix(path: &Path) -> Stream {
    Either::Right(UnixStream::connect(path).await.unwrap())
}

const SOURCE_QUERY: &str = "SELECT EXISTS (
    SELECT 1 FROM app.users u
    JOIN app.user_subscriptions s ON s.user_id = u.id
    JOIN app.plan_permissions pp ON pp.plan_id = s.plan_id
    JOIN app.permissions p ON p.id = pp.permission_id
    WHERE u.id = $1 AND u.status = 'ACTIVE' AND s.status = 'ACTIVE'
      AND (s.expires_at IS NULL OR s.expires_at > now()) AND p.name = $2)";
const PRECOMPUTED_QUERY: &str = "SELECT EXISTS (
    SELECT 1 FROM permd.tuples
    WHERE subject = $1 AND object = '' AND permission = $2
      AND (expires_at IS NULL OR expires_at > now()))";

impl Conn {
    async fn open(system: System, at: &Endpoints) -> Self {
        match system {
            System::SqlSource | System::SqlPrecomputed => {
                let (client, connection) =
                    tokio_postgres::connect(&at.postgres, tokio_postgres::NoTls)
                        .await
                        .unwrap();
                tokio::spawn(connection);
                let source = system == System::SqlSource;
                let statement = client
                    .prepare(if source {
                        SOURCE_QUERY
                    } else {
                        PRECOMPUTED_QUERY
                    })
                    .await
                    .unwrap();
                Conn::Pg(client, statement, source)
            }
            System::Redis | System::RedisPipelined => {
                Conn::Resp(BufStream::new(tcp(at.redis).await))
            }
            System::RedisUnix => Conn::Resp(BufStream::new(unix(&at.redis_socket).await)),
            System::PermdUnix => Conn::Http(BufStream::new(unix(&at.permd_socket).await), None),
            System::Permd | System::PermdBatch | System::PermdMixed => {
                Conn::Http(BufStream::new(tcp(at.permd).await), None)
            }
            System::PermdToken => {
                Conn::Http(BufStream::new(tcp(at.permd).await), Some(at.permd_token))
            }
            System::BareAxum => Conn::Http(BufStream::new(tcp(at.bare).await), None),
        }
    }

    /// Sends one request for `checks`; returns the number of wrong answers, or `None` when
    /// the server shed the request (HTTP 503).
    async fn request(&mut self, checks: &[Check], buf: &mut Vec<u8>) -> Option<usize> {
        match self {
            Conn::Pg(client, statement, source) => {
                let c = checks[0];
                let permission = format!("perm{:02}", c.permission);
                let row = if *source {
                    client
                        .query_one(&*statement, &[&i64::from(c.subject), &permission])
                        .await
                } else {
                    let subject = format!("user:{}", c.subject);
                    client
                        .query_one(&*statement, &[&subject, &permission])
                        .await
                };
                let allowed: bool = row.unwrap().get(0);
                Some(usize::from(allowed != c.allowed))
            }
            Conn::Resp(stream) => {
                buf.clear();
                for c in checks {
                    let subject = format!("user:{}", c.subject);
                    let permission = format!("perm{:02}", c.permission);
                    buf.extend_from_slice(
                        format!(
                            "*3\r\n$9\r\nSISMEMBER\r\n${}\r\n{subject}\r\n${}\r\n{permission}\r\n",
                            subject.len(),
                            permission.len()
                        )
                        .as_bytes(),
                    );
                }
                stream.write_all(buf).await.unwrap();
                stream.flush().await.unwrap();
                let mut wrong = 0;
                let mut line = String::new();
                for c in checks {
                    line.clear();
                    stream.read_line(&mut line).await.unwrap();
                    let allowed = match line.as_str() {
                        ":1\r\n" => true,
                        ":0\r\n" => false,
                        other => panic!("redis said {other:?}"),
                    };
                    wrong += usize::from(allowed != c.allowed);
                }
                Some(wrong)
            }
            Conn::Http(stream, token) => {
                buf.clear();
                if checks.len() == 1 {
                    let c = checks[0];
                    let at_least = token.map(|t| format!("&at_least={t}")).unwrap_or_default();
                    buf.extend_from_slice(
                        format!(
                            "GET /v1/check?subject=user:{}&permission=perm{:02}{at_least} HTTP/1.1\r\nhost: permd\r\n\r\n",
                            c.subject, c.permission
                        )
                        .as_bytes(),
                    );
                } else {
                    let mut body = String::from("{\"checks\":[");
                    for (i, c) in checks.iter().enumerate() {
                        if i > 0 {
                            body.push(',');
                        }
                        body += &format!(
                            "{{\"subject\":\"user:{}\",\"permission\":\"perm{:02}\"}}",
                            c.subject, c.permission
                        );
                    }
                    body.push_str("]}");
                    buf.extend_from_slice(
                        format!(
                            "POST /v1/check HTTP/1.1\r\nhost: permd\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    );
                }
                stream.write_all(buf).await.unwrap();
                stream.flush().await.unwrap();
                // The request is sent: `buf` now receives the answer.
                let status = read_response(stream, buf).await;
                if status == 503 {
                    return None;
                }
                assert_eq!(status, 200, "{}", String::from_utf8_lossy(buf));
                Some(count_wrong(buf, checks))
            }
        }
    }
}

/// The number of wrong answers in `body` to `checks`: the `"allowed":true|false` of a single
/// check, or the `"results":[...]` of a batch, in order (panics if the count differs).
fn count_wrong(body: &[u8], checks: &[Check]) -> usize {
    let shown = || String::from_utf8_lossy(body).into_owned();
    if let Some(at) = find(body, b"\"results\":[") {
        let list = &body[at + 11..];
        let list = &list[..find(list, b"]").unwrap_or_else(|| panic!("{}", shown()))];
        let answers: Vec<bool> = list.split(|b| *b == b',').map(|v| v == b"true").collect();
        assert_eq!(answers.len(), checks.len(), "{}", shown());
        return answers
            .iter()
            .zip(checks)
            .filter(|(a, c)| **a != c.allowed)
            .count();
    }
    assert_eq!(checks.len(), 1, "{}", shown());
    let allowed = if find(body, b"\"allowed\":true").is_some() {
        true
    } else {
        assert!(find(body, b"\"allowed\":false").is_some(), "{}", shown());
        false
    };
    usize::from(allowed != checks[0].allowed)
}

/// What a run measured.
struct Outcome {
    requests: u64,
    checks: u64,
    wrong: u64,
    shed: u64,
    seconds: f64,
    /// Request latencies, sorted, in nanoseconds (open loop: from when it was due).
    latencies: Vec<u64>,
    /// Open loop only: from when it was sent to its answer, sorted, in nanoseconds.
    service: Vec<u64>,
    /// Closed loop only: CPU seconds the server's process (when it has one of its own) and
    /// this process (the client) used during the run.
    server_cpu: Option<Cpu>,
    client_cpu: Option<Cpu>,
    /// Closed loop only: the share of the machine's time the hypervisor stole during the
    /// run, in percent, as a table cell.
    steal: String,
    /// Closed loop only, for a server with a process of its own: the share of the
    /// machine's time busy with neither the server nor the client during the run (another
    /// program, or the kernel's time charged to no process), in percent, as a table cell.
    others: String,
}

impl Outcome {
    fn checks_per_second(&self) -> f64 {
        self.checks as f64 / self.seconds
    }

    fn requests_per_second(&self) -> f64 {
        self.requests as f64 / self.seconds
    }

    fn quantile_ms(&self, q: f64) -> f64 {
        quantile_ms(&self.latencies, q)
    }

    /// `seconds` of CPU time per request, in microseconds.
    fn per_request_us(&self, seconds: f64) -> f64 {
        seconds * 1e6 / self.requests as f64
    }

    /// The server's CPU time per request in microseconds, user + system (NaN when the
    /// server is not a process of its own).
    fn server_us(&self) -> f64 {
        self.server_cpu
            .map_or(f64::NAN, |cpu| self.per_request_us(cpu.user + cpu.system))
    }

    /// The server's user CPU time per request in microseconds.
    fn server_user_us(&self) -> f64 {
        self.server_cpu
            .map_or(f64::NAN, |cpu| self.per_request_us(cpu.user))
    }

    /// The client's CPU time per request in microseconds, user + system.
    fn client_us(&self) -> f64 {
        self.client_cpu
            .map_or(f64::NAN, |cpu| self.per_request_us(cpu.user + cpu.system))
    }

    /// The server's and the client's CPU time per request, in microseconds, user + system,
    /// as table cells.
    fn cpu_cells(&self, system: System) -> (String, String) {
        let per_request = |cpu: Cpu| {
            format!(
                "{:.1} + {:.1}",
                self.per_request_us(cpu.user),
                self.per_request_us(cpu.system)
            )
        };
        let server = self.server_cpu.map_or("-".to_owned(), per_request);
        // The bare server runs in the client's process: its time is not the client's alone.
        let client = match self.client_cpu {
            Some(cpu) if system != System::BareAxum => per_request(cpu),
            _ => "-".to_owned(),
        };
        (server, client)
    }
}

fn quantile_ms(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i] as f64 / 1e6
}

/// Closed loop: `concurrency` connections, each sending its next request as soon as the
/// previous one is answered, for `seconds`. The clock starts once every connection is open.
async fn closed_loop(
    system: System,
    at: &Endpoints,
    concurrency: usize,
    seconds: f64,
    subjects: u32,
) -> Outcome {
    let stop = Arc::new(AtomicBool::new(false));
    let go = Arc::new(tokio::sync::Notify::new());
    let ready = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for w in 0..concurrency {
        let at = at.clone();
        let stop = Arc::clone(&stop);
        let go = Arc::clone(&go);
        let ready = Arc::clone(&ready);
        workers.push(tokio::spawn(async move {
            let mut conn = Conn::open(system, &at).await;
            let started = go.notified();
            ready.fetch_add(1, Ordering::Release);
            started.await;
            let mut rng = 0x5eed_0000 + w as u64;
            let mut buf = Vec::new();
            let mut tally = Tally::default();
            let mut checks = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                checks.clear();
                let n = system.checks_in_request(tally.latencies.len() as u64);
                checks.extend((0..n).map(|_| check(&mut rng, subjects)));
                let started = Instant::now();
                let answer = conn.request(&checks, &mut buf).await;
                tally.count(answer, n, started.elapsed());
            }
            tally
        }));
    }
    while ready.load(Ordering::Acquire) < concurrency as u64 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let server_pid = at.server_pid(system);
    let cpu_before = (
        server_pid.map(|pid| cpu_seconds(Some(pid))),
        cpu_seconds(None),
    );
    let host = HostCpu::now();
    let started = Instant::now();
    go.notify_waiters();
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let server_cpu = server_pid
        .map(|pid| cpu_seconds(Some(pid)))
        .zip(cpu_before.0)
        .map(|(after, before)| after - before);
    let client_cpu = cpu_seconds(None) - cpu_before.1;
    let since = HostCpu::since(host);
    let mut outcome = collect(workers, elapsed).await;
    if let Some(since) = &since {
        outcome.steal = format!("{:.0}", since.steal_percent);
        if let Some(server) = server_cpu {
            let ours = server.user + server.system + client_cpu.user + client_cpu.system;
            let others = (since.busy_seconds - ours).max(0.0) * 100.0 / since.seconds;
            outcome.others = format!("{others:.0}");
        }
    }
    outcome.server_cpu = server_cpu;
    outcome.client_cpu = Some(client_cpu);
    outcome
}

/// What one connection of a run saw.
#[derive(Default)]
struct Tally {
    /// Each request's latency in nanoseconds (open loop: from when it was due).
    latencies: Vec<u64>,
    /// Open loop only: from when each request was sent to its answer, in nanoseconds.
    service: Vec<u64>,
    /// Checks answered (in requests not shed).
    checks: u64,
    wrong: u64,
    shed: u64,
}

impl Tally {
    /// Counts one request of `n` checks: `answer` is what `Conn::request` returned.
    fn count(&mut self, answer: Option<usize>, n: usize, latency: Duration) {
        match answer {
            Some(wrong) => {
                self.wrong += wrong as u64;
                self.checks += n as u64;
            }
            None => self.shed += 1,
        }
        self.latencies.push(latency.as_nanos() as u64);
    }
}

async fn collect(workers: Vec<tokio::task::JoinHandle<Tally>>, seconds: f64) -> Outcome {
    let mut latencies = Vec::new();
    let mut service = Vec::new();
    let (mut checks, mut wrong, mut shed) = (0, 0, 0);
    for w in workers {
        let tally = w.await.unwrap();
        latencies.extend(tally.latencies);
        service.extend(tally.service);
        checks += tally.checks;
        wrong += tally.wrong;
        shed += tally.shed;
    }
    latencies.sort_unstable();
    service.sort_unstable();
    Outcome {
        requests: latencies.len() as u64,
        checks,
        wrong,
        shed,
        seconds,
        latencies,
        service,
        server_cpu: None,
        client_cpu: None,
        steal: "-".to_owned(),
        others: "-".to_owned(),
    }
}

/// Open loop: requests are due at a fixed rate whatever the answers do; latency is measured
/// from when a request was due, not from when a free connection got to send it, so a
/// stalled server is charged for every request that queued behind it (no coordinated
/// omission). A pacer thread releases due times; `concurrency` connections take them.
async fn open_loop(
    system: System,
    at: &Endpoints,
    concurrency: usize,
    rate: f64,
    seconds: f64,
    subjects: u32,
) -> Outcome {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let mut workers = Vec::new();
    let ready = Arc::new(AtomicU64::new(0));
    for w in 0..concurrency {
        let at = at.clone();
        let rx = Arc::clone(&rx);
        let ready = Arc::clone(&ready);
        workers.push(tokio::spawn(async move {
            let mut conn = Conn::open(system, &at).await;
            ready.fetch_add(1, Ordering::Relaxed);
            let mut rng = 0x0be1_0000 + w as u64;
            let mut buf = Vec::new();
            let mut tally = Tally::default();
            loop {
                let due = { rx.lock().await.recv().await };
                let Some(due) = due else { break };
                let n = system.checks_in_request(tally.latencies.len() as u64);
                let checks: Vec<Check> = (0..n).map(|_| check(&mut rng, subjects)).collect();
                let sent = Instant::now();
                let answer = conn.request(&checks, &mut buf).await;
                tally.count(answer, n, due.elapsed());
                tally.service.push(sent.elapsed().as_nanos() as u64);
            }
            tally
        }));
    }
    while ready.load(Ordering::Relaxed) < concurrency as u64 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let pacer = std::thread::spawn(move || {
        let started = Instant::now();
        let total = (rate * seconds) as u64;
        let mut sent = 0;
        while sent < total {
            let due = started + Duration::from_secs_f64(sent as f64 / rate);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            // Release everything due by now (a late wake-up releases a burst).
            let now = Instant::now();
            while sent < total && started + Duration::from_secs_f64(sent as f64 / rate) <= now {
                tx.send(started + Duration::from_secs_f64(sent as f64 / rate))
                    .unwrap();
                sent += 1;
            }
        }
        started.elapsed().as_secs_f64()
    });
    let started = Instant::now();
    let outcome = collect(workers, 0.0).await;
    let _ = pacer.join();
    Outcome {
        seconds: started.elapsed().as_secs_f64(),
        ..outcome
    }
}

/// A directory of this run's own for the servers' Unix sockets, removed at the end.
struct SocketDir(PathBuf);

impl SocketDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("permd-compare-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        SocketDir(dir)
    }
}

impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A Redis server of this machine's (Debian's redis-server), on a free port and on a Unix
/// socket at `socket`, no persistence.
struct Redis {
    child: std::process::Child,
    port: u16,
    socket: PathBuf,
}

impl Redis {
    fn start(socket: &Path) -> Self {
        let binary = which("redis-server")
            .or_else(|| {
                eprintln!("redis-server not found: installing Debian's package (apt-get install redis-server)…");
                let installed = std::process::Command::new("apt-get")
                    .args(["install", "-y", "-q", "redis-server"])
                    .env("DEBIAN_FRONTEND", "noninteractive")
                    .status();
                installed.ok().filter(|s| s.success())?;
                which("redis-server")
            })
            .unwrap_or_else(|| panic!("redis-server not found and could not be installed (Debian: apt-get install redis-server)"));
        let port = free_port();
        let child = std::process::Command::new(binary)
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--unixsocket",
                socket.to_str().unwrap(),
                "--unixsocketperm",
                "700",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Redis {
            child,
            port,
            socket: socket.to_owned(),
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The floor of HTTP with this client: axum as its README would have it (`axum::serve`, a
/// `Query` extractor, a `Json` answer), answering from a `HashMap` of the same tuples, in
/// threads of its own with a runtime like permd's (one worker per core). Not a product: no
/// limits, no sync, no metrics. Returns its port.
fn bare_axum(rows: &[(String, String)]) -> u16 {
    use std::collections::{HashMap, HashSet};

    #[derive(serde::Deserialize)]
    struct Query {
        subject: String,
        permission: String,
    }

    let mut sets: HashMap<String, HashSet<String>> = HashMap::new();
    for (s, p) in rows {
        sets.entry(s.clone()).or_default().insert(p.clone());
    }
    let sets = Arc::new(sets);
    // permd's own bind: the same accept queue (4,096) as the permd it is the floor of.
    let (bound, port) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = permd::bind(([127, 0, 0, 1], 0).into()).unwrap();
            bound.send(listener.local_addr().unwrap().port()).unwrap();
            let app = axum::Router::new().route(
                "/v1/check",
                axum::routing::get(
                    |axum::extract::State(sets): axum::extract::State<
                        Arc<HashMap<String, HashSet<String>>>,
                    >,
                     axum::extract::Query(q): axum::extract::Query<Query>| async move {
                        let allowed = sets
                            .get(&q.subject)
                            .is_some_and(|s| s.contains(&q.permission));
                        axum::Json(serde_json::json!({ "allowed": allowed, "revision": "0" }))
                    },
                ),
            );
            axum::serve(listener, app.with_state(sets)).await.unwrap();
        });
    });
    port.recv().unwrap()
}

/// permd serving the database, as its own process (so its memory is its own).
struct Permd {
    child: std::process::Child,
    port: u16,
}

impl Permd {
    fn start(binary: &str, database_url: &str, flags: &[&str], socket: Option<&Path>) -> Self {
        let port = free_port();
        let child = std::process::Command::new(binary)
            .args([
                "serve",
                "--database-url",
                database_url,
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .args(flags)
            .args(socket.map(|socket| format!("--unix-socket={}", socket.display())))
            .env("PERMD_LOG", "warn")
            .spawn()
            .unwrap();
        Permd { child, port }
    }

    fn rss_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    }
}

impl Drop for Permd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain(["/usr/bin".into(), "/usr/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

async fn redis_command(port: u16, command: &[&str]) -> String {
    let mut stream = BufStream::new(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    let mut out = format!("*{}\r\n", command.len());
    for part in command {
        out += &format!("${}\r\n{part}\r\n", part.len());
    }
    stream.write_all(out.as_bytes()).await.unwrap();
    stream.flush().await.unwrap();
    let mut line = String::new();
    stream.read_line(&mut line).await.unwrap();
    if let Some(len) = line.strip_prefix('$') {
        let len: usize = len.trim().parse().unwrap();
        let mut body = vec![0; len + 2];
        stream.read_exact(&mut body).await.unwrap();
        return String::from_utf8_lossy(&body).into_owned();
    }
    line
}

/// The median of `values` (the mean of the middle two for an even count); NaN when one is
/// NaN (a system of the ratio did not run).
fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() || values.iter().any(|v| v.is_nan()) {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// `a / b` as "1.23x", or "-" when a system of the two did not run (`BENCH_SYSTEMS`).
fn ratio(a: f64, b: f64) -> String {
    if a.is_nan() || b.is_nan() {
        "-".to_owned()
    } else {
        format!("{:.2}x", a / b)
    }
}

/// The heading's words for round `round` of `rounds` ("" when there is one round); even
/// rounds run the systems in the reverse order, which their heading says.
fn round_of(round: usize, rounds: usize) -> String {
    if rounds == 1 {
        String::new()
    } else if round.is_multiple_of(2) {
        format!(", round {round} of {rounds} (run bottom row first)")
    } else {
        format!(", round {round} of {rounds}")
    }
}

/// One round: `run` on each of `runs` in turn, in reverse order on even rounds, so that no
/// system always runs early or late; the outcomes in `runs`' order.
async fn run_round<F, R>(
    runs: &[(System, usize)],
    round: usize,
    mut run: F,
) -> Vec<(System, usize, Outcome)>
where
    F: FnMut(System, usize) -> R,
    R: std::future::Future<Output = Outcome>,
{
    let reversed = round.is_multiple_of(2);
    let mut results = Vec::new();
    for i in 0..runs.len() {
        let (system, k) = runs[if reversed { runs.len() - 1 - i } else { i }];
        results.push((system, k, run(system, k).await));
    }
    if reversed {
        results.reverse();
    }
    results
}

/// A figure of `system`'s run against permd binary `k` in a round's `results` (the other
/// systems run once a round, whatever `k`); NaN when it did not run.
fn figure(
    results: &[(System, usize, Outcome)],
    system: System,
    k: usize,
    f: fn(&Outcome) -> f64,
) -> f64 {
    results
        .iter()
        .find(|(s, j, _)| *s == system && (*j == k || !system.is_permd()))
        .map_or(f64::NAN, |(_, _, o)| f(o))
}

/// Host steal (percent of the machine, during a round's Redis or permd row) from which a
/// ratio against Redis is printed as not conclusive.
const STEAL_INCONCLUSIVE: f64 = 5.0;

/// The share of the machine (percent) busy with neither the server nor the client during a
/// round's Redis or permd row from which a ratio against Redis is printed as not
/// conclusive: a quiet machine shows a few percent (the kernel's work charged to no
/// process, the suite's Postgres idling; benches/README.md).
const OTHERS_INCONCLUSIVE: f64 = 10.0;

/// Says so when the machine is busy before the suite starts anything (another program
/// takes its turns from Redis's one thread more than from permd's two workers: the
/// `other CPU %` column, and OTHERS_INCONCLUSIVE).
fn warn_if_busy() {
    let before = HostCpu::now();
    std::thread::sleep(Duration::from_secs(1));
    if let Some(since) = HostCpu::since(before) {
        let busy = since.busy_seconds * 100.0 / since.seconds;
        if busy >= OTHERS_INCONCLUSIVE {
            eprintln!(
                "warning: {busy:.0} % of the machine was busy in the second before the suite \
                 started anything: ratios against Redis from this run may say more about \
                 that than about the servers (see the `other CPU %` column)"
            );
        }
    }
}

fn main() {
    let seconds: f64 = env_or("BENCH_SECONDS", 8.0);
    let rate: f64 = env_or("BENCH_RATE", 5000.0);
    let subjects: u32 = env_or("BENCH_SUBJECTS", 100_000);
    let selected: Vec<System> = match std::env::var("BENCH_SYSTEMS") {
        Ok(keys) => System::ALL
            .into_iter()
            .filter(|s| keys.split(',').any(|k| k.trim() == s.key()))
            .collect(),
        Err(_) => System::ALL.to_vec(),
    };
    let concurrencies: Vec<usize> = env_list("BENCH_CONCURRENCY", "32,128");
    let overload_part = env_or("BENCH_OVERLOAD", 1) != 0;
    let rounds: usize = env_or("BENCH_ROUNDS", 3);
    assert!(rounds >= 1, "BENCH_ROUNDS must be at least 1");
    warn_if_busy();
    let cluster = cluster();
    let url = cluster.url("postgres");
    let sockets = SocketDir::new();
    let socket_of = |k: usize| sockets.0.join(format!("permd-{k}.sock"));
    let redis = Redis::start(&sockets.0.join("redis.sock"));
    let runtime = runtime();
    runtime.block_on(async {
        eprintln!("seeding {subjects} subjects into the source tables, permd.tuples and Redis…");
        let pool = permd::db::pool(&url).await.unwrap();
        permd::db::migrate(&pool).await.unwrap();
        permd::db::migrate_reference_model(&pool).await.unwrap();
        let seed = format!(
            "SET permd_app.maintain = off;
             INSERT INTO app.permissions SELECT k + 1, 'perm' || lpad(k::text, 2, '0') FROM generate_series(0, {p} - 1) k;
             INSERT INTO app.subscription_plans SELECT k + 1, 'plan ' || k FROM generate_series(0, {plans} - 1) k;
             INSERT INTO app.plan_permissions SELECT k + 1, (k + 4 * j) % {p} + 1
                 FROM generate_series(0, {plans} - 1) k, generate_series(0, {per} - 1) j;
             INSERT INTO app.users (id, email) SELECT u, 'user' || u || '@example.com' FROM generate_series(1, {subjects}) u;
             INSERT INTO app.user_subscriptions (user_id, plan_id) SELECT u, u % {plans} + 1 FROM generate_series(1, {subjects}) u;
             SELECT * FROM app.rebuild_permissions();
             RESET permd_app.maintain;",
            p = PERMISSIONS,
            plans = PLANS,
            per = PER_SUBJECT,
        );
        sqlx::raw_sql(sqlx::AssertSqlSafe(seed.clone())).execute(&pool).await.unwrap();
        sqlx::raw_sql("VACUUM ANALYZE").execute(&pool).await.unwrap();
        let tuples: i64 = sqlx::query_scalar("SELECT count(*) FROM permd.tuples").fetch_one(&pool).await.unwrap();

        // Redis: the very rows of permd.tuples, as one set per subject.
        let rows: Vec<(String, String)> = sqlx::query_as("SELECT subject, permission FROM permd.tuples")
            .fetch_all(&pool)
            .await
            .unwrap();
        let mut stream = BufStream::new(TcpStream::connect(("127.0.0.1", redis.port)).await.unwrap());
        for chunk in rows.chunks(10_000) {
            let mut out = String::new();
            for (s, p) in chunk {
                out += &format!("*3\r\n$4\r\nSADD\r\n${}\r\n{s}\r\n${}\r\n{p}\r\n", s.len(), p.len());
            }
            stream.write_all(out.as_bytes()).await.unwrap();
            stream.flush().await.unwrap();
            let mut line = String::new();
            for _ in chunk {
                line.clear();
                stream.read_line(&mut line).await.unwrap();
            }
        }
        let bare = bare_axum(&rows);
        drop(rows);
        let info = redis_command(redis.port, &["INFO", "memory"]).await;
        let used_memory: u64 = info
            .lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap();
        let redis_keys = redis_command(redis.port, &["DBSIZE"]).await;

        // Every permd binary to measure (`BENCH_PERMD`), each its own process serving the
        // same database, started and loaded one after the other before any run.
        let binaries = env_list::<String>("BENCH_PERMD", env!("CARGO_BIN_EXE_permd"));
        let several = binaries.len() > 1;
        let mut servers = Vec::new();
        // A token each server has passed, for `permd-token`.
        let mut tokens = Vec::new();
        // Each binary's resident size after its load over Redis's `used_memory`.
        let mut memory = Vec::new();
        for (k, binary) in binaries.iter().enumerate() {
            let loading = Instant::now();
            // An older build may not take `--unix-socket`: leave `permd-unix` out of
            // `BENCH_SYSTEMS` to alternate with one.
            let socket = selected.contains(&System::PermdUnix).then(|| socket_of(k));
            let permd = Permd::start(binary, &url, &[], socket.as_deref());
            let http = wait_ready(permd.port).await;
            let load_seconds = loading.elapsed().as_secs_f64();
            assert!(http, "permd {binary} did not become ready");
            tokens.push(passed_token(permd.port).await);
            let rss = permd.rss_kib("VmRSS:") * 1024;
            let hwm = permd.rss_kib("VmHWM:") * 1024;
            let which = if several { format!(" [{}] ({binary})", k + 1) } else { String::new() };
            println!();
            println!(
                "permd{which}: ready {load_seconds:.1} s after start (process start, connect, snapshot COPY of {tuples} tuples); \
                 resident {:.0} MiB (peak {:.0} MiB). Redis used_memory {:.0} MiB. Ratio permd RSS / Redis used_memory: {:.2}.",
                rss as f64 / 1048576.0,
                hwm as f64 / 1048576.0,
                used_memory as f64 / 1048576.0,
                rss as f64 / used_memory as f64
            );
            servers.push(permd);
            memory.push(rss as f64 / used_memory as f64);
        }
        pool.close().await;

        // The endpoints with permd binary `k`'s server.
        let at = |k: usize| Endpoints {
            postgres: url.clone(),
            redis: redis.port,
            permd: servers[k].port,
            bare,
            redis_socket: redis.socket.clone(),
            permd_socket: socket_of(k),
            redis_pid: redis.child.id(),
            permd_pid: servers[k].child.id(),
            permd_token: tokens[k],
        };
        // Each selected system with the permd binaries it runs against (only permd's rows
        // run once per binary, one binary right after the other).
        let runs: Vec<(System, usize)> = selected
            .iter()
            .flat_map(|&s| {
                let count = if s.is_permd() { servers.len() } else { 1 };
                (0..count).map(move |k| (s, k))
            })
            .collect();
        let label = |system: System, k: usize| {
            if several && system.is_permd() {
                format!("{} [{}]", system.name(), k + 1)
            } else {
                system.name().to_owned()
            }
        };
        println!();
        println!(
            "Workload: {subjects} subjects, {PERMISSIONS} permission names, {tuples} tuples; Redis keys {}; {seconds} s per closed-loop run.",
            redis_keys.trim().trim_start_matches(':')
        );

        let newest = servers.len() - 1;
        let mut capacity = 0.0;
        // Per concurrency and permd binary, one a round: the single check against Redis and
        // the two SQL ways, the batch against Redis pipelined, and the single check's p99
        // over Redis's: every ratio the targets name; and the single check's over Redis's,
        // both over a Unix socket.
        let mut by_round = std::collections::BTreeMap::<(usize, usize), Vec<[f64; 6]>>::new();
        // Per concurrency and permd binary, one a round: the most of the machine the
        // hypervisor stole during Redis's row or that permd's single check (percent).
        let mut stolen = std::collections::BTreeMap::<(usize, usize), Vec<f64>>::new();
        // For each (concurrency, permd build), per round: the most of the machine busy with
        // neither server nor client during a row that a target against Redis reads
        // (percent).
        let mut elsewhere = std::collections::BTreeMap::<(usize, usize), Vec<f64>>::new();
        for (&concurrency, round) in concurrencies
            .iter()
            .flat_map(|c| (1..=rounds).map(move |r| (c, r)))
        {
            println!();
            println!("Closed loop, {concurrency} connections{}:", round_of(round, rounds));
            println!();
            println!("| system | checks/s | requests/s | p50 ms | p99 ms | p99.9 ms | wrong | vs Redis | vs Redis pipelined | server CPU us/req (user + sys) | client CPU us/req (user + sys) | host steal % | other CPU % |");
            println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
            let results = run_round(&runs, round, |system, k| {
                let at = at(k);
                async move { closed_loop(system, &at, concurrency, seconds, subjects).await }
            })
            .await;
            let figure = |s: System, k: usize, f: fn(&Outcome) -> f64| figure(&results, s, k, f);
            let base = |s: System, k: usize| figure(s, k, Outcome::checks_per_second);
            let (redis, pipelined) = (base(System::Redis, 0), base(System::RedisPipelined, 0));
            for (system, k, o) in &results {
                let (server_cpu, client_cpu) = o.cpu_cells(*system);
                // The mixed row's checks per request are its own: its ratio is below.
                let ratio = |a, b| {
                    if *system == System::PermdMixed {
                        "-".to_owned()
                    } else {
                        ratio(a, b)
                    }
                };
                println!(
                    "| {} | {:.0} | {:.0} | {:.3} | {:.3} | {:.3} | {} | {} | {} | {server_cpu} | {client_cpu} | {} | {} |",
                    label(*system, *k),
                    o.checks_per_second(),
                    o.requests_per_second(),
                    o.quantile_ms(0.5),
                    o.quantile_ms(0.99),
                    o.quantile_ms(0.999),
                    o.wrong,
                    ratio(o.checks_per_second(), redis),
                    ratio(o.checks_per_second(), pipelined),
                    o.steal,
                    o.others,
                );
                assert_eq!(o.wrong, 0, "{} gave wrong answers", label(*system, *k));
            }
            if concurrency == 32 {
                capacity = base(System::Permd, newest);
            }
            for k in 0..servers.len() {
                let permd = base(System::Permd, k);
                let p99 = |s: System| figure(s, k, |o| o.quantile_ms(0.99));
                // The most of the machine stolen, and busy elsewhere, during the rows the
                // targets against Redis read (percent; a row not run reads 0).
                let most = |rows: &[System], cell: fn(&Outcome) -> f64| {
                    rows.iter().map(|s| figure(*s, k, cell)).fold(0.0, f64::max)
                };
                stolen
                    .entry((concurrency, k))
                    .or_default()
                    .push(most(&[System::Redis, System::Permd], |o| {
                        o.steal.parse().unwrap_or(0.0)
                    }));
                let read = [System::Redis, System::RedisPipelined, System::Permd, System::PermdBatch];
                elsewhere
                    .entry((concurrency, k))
                    .or_default()
                    .push(most(&read, |o| o.others.parse().unwrap_or(0.0)));
                by_round.entry((concurrency, k)).or_default().push([
                    permd / redis,
                    base(System::PermdBatch, k) / pipelined,
                    permd / base(System::SqlSource, k),
                    permd / base(System::SqlPrecomputed, k),
                    p99(System::Permd) / p99(System::Redis),
                    base(System::PermdUnix, k) / base(System::RedisUnix, 0),
                ]);
                let which = if several { format!(" [{}]", k + 1) } else { String::new() };
                println!();
                println!(
                    "permd{which} single vs: source-table SQL {}, precomputed SQL {}, Redis {}, bare axum {} (bare axum vs Redis {}); permd batch vs Redis pipelined {}",
                    ratio(permd, base(System::SqlSource, k)),
                    ratio(permd, base(System::SqlPrecomputed, k)),
                    ratio(permd, redis),
                    ratio(permd, base(System::BareAxum, k)),
                    ratio(base(System::BareAxum, k), redis),
                    ratio(base(System::PermdBatch, k), pipelined)
                );
                let (permd_unix, redis_unix) =
                    (base(System::PermdUnix, k), base(System::RedisUnix, 0));
                if !permd_unix.is_nan() || !redis_unix.is_nan() {
                    println!(
                        "Over Unix sockets: permd{which} single vs Redis {}; permd over its Unix socket vs over TCP {}, Redis {}",
                        ratio(permd_unix, redis_unix),
                        ratio(permd_unix, permd),
                        ratio(redis_unix, redis)
                    );
                }
                let token = base(System::PermdToken, k);
                if !token.is_nan() {
                    println!(
                        "Read-your-writes: permd{which} single with a token its write applied vs without {}, vs Redis {}",
                        ratio(token, permd),
                        ratio(token, redis)
                    );
                }
                // Redis is held by its one thread (~1 / S_r checks/s), permd and the client
                // by the two cores they share (~2 / (S_p + C)): the single check's ratio
                // this round's CPU columns predict, and what it would be with none of
                // permd's own user time (benches/README.md, `compare`).
                let (s_r, s_p, c) = (
                    figure(System::Redis, k, Outcome::server_us),
                    figure(System::Permd, k, Outcome::server_us),
                    figure(System::Permd, k, Outcome::client_us),
                );
                let user = figure(System::Permd, k, Outcome::server_user_us);
                if !(s_r + s_p + c).is_nan() {
                    println!(
                        "permd{which} single vs Redis from the CPU columns, 2 x {s_r:.1} / ({s_p:.1} + {c:.1}) us: {}; with no user time of permd's: {}",
                        ratio(2.0 * s_r, s_p + c),
                        ratio(2.0 * s_r, s_p - user + c)
                    );
                }
                // Were each request as costly on a mixed connection as on a connection of
                // its own kind, a mixed connection's request would take 0.9 of a single
                // check's time plus 0.1 of a batch's.
                let requests = |s: System| figure(s, k, Outcome::requests_per_second);
                let unmixed =
                    1.0 / (0.9 / requests(System::Permd) + 0.1 / requests(System::PermdBatch));
                let mixed = requests(System::PermdMixed);
                if mixed.is_nan() {
                    // No mixed row in this run.
                } else if unmixed.is_nan() {
                    println!("permd{which} mixed: {mixed:.0} requests/s (no single and batch rows to expect a rate from)");
                } else {
                    println!(
                        "permd{which} mixed: {mixed:.0} requests/s against {unmixed:.0} expected from the single and batch rows ({})",
                        ratio(mixed, unmixed)
                    );
                }
            }
        }

        if rounds > 1 {
            println!();
            println!("Ratios round by round ({rounds} rounds, each system once a round):");
            println!();
            println!("| connections | permd | single vs Redis, each round | median | batch vs Redis pipelined, each round | median | single vs source-table SQL, each round | median | single vs precomputed SQL, each round | median | single p99 / Redis p99, each round | median | single vs Redis, both over a Unix socket, each round | median |");
            println!("|---:|---|---|---:|---|---:|---|---:|---|---:|---|---:|---|---:|");
            for ((concurrency, k), rows) in &by_round {
                let cells: Vec<String> = (0..rows[0].len())
                    .flat_map(|i| {
                        let values: Vec<f64> = rows.iter().map(|r| r[i]).collect();
                        let each: Vec<String> = values.iter().map(|v| ratio(*v, 1.0)).collect();
                        [each.join(", "), ratio(median(values), 1.0)]
                    })
                    .collect();
                println!(
                    "| {concurrency} | {} | {} |",
                    label(System::Permd, *k).replace(System::Permd.name(), "permd"),
                    cells.join(" | ")
                );
            }
        }

        // The open loop, in rounds as the closed loop (even rounds in the reverse order): one
        // open-loop run's p99 is a few hundred of its requests, and a stall of the machine's
        // falls on whichever system runs then.
        let open = [System::SqlSource, System::SqlPrecomputed, System::Redis, System::Permd];
        // `BENCH_RATE=0` leaves the open loop out.
        let open_runs: Vec<(System, usize)> = runs
            .iter()
            .copied()
            .filter(|(s, _)| rate > 0.0 && open.contains(s))
            .collect();
        // Per permd binary, one a round: permd's open-loop p99 over Redis's.
        let mut open_p99 = vec![Vec::new(); servers.len()];
        for round in (1..=rounds).filter(|_| !open_runs.is_empty()) {
            println!();
            println!(
                "Open loop, {rate:.0} requests/s for {seconds} s, 64 connections (latency from when each request was due){}:",
                round_of(round, rounds)
            );
            println!();
            println!("| system | checks/s | p50 ms | p99 ms | p99.9 ms | wrong |");
            println!("|---|---:|---:|---:|---:|---:|");
            let results = run_round(&open_runs, round, |system, k| {
                let at = at(k);
                async move { open_loop(system, &at, 64, rate, seconds, subjects).await }
            })
            .await;
            for (system, k, o) in &results {
                println!(
                    "| {} | {:.0} | {:.3} | {:.3} | {:.3} | {} |",
                    label(*system, *k),
                    o.checks_per_second(),
                    o.quantile_ms(0.5),
                    o.quantile_ms(0.99),
                    o.quantile_ms(0.999),
                    o.wrong
                );
                assert_eq!(o.wrong, 0, "{} gave wrong answers", label(*system, *k));
            }
            let p99 = |s: System, k: usize| figure(&results, s, k, |o| o.quantile_ms(0.99));
            for (k, ratios) in open_p99.iter_mut().enumerate() {
                ratios.push(p99(System::Permd, k) / p99(System::Redis, k));
            }
        }
        if rounds > 1 && !open_runs.is_empty() {
            println!();
            for (k, ratios) in open_p99.iter().enumerate() {
                let each: Vec<String> = ratios.iter().map(|v| ratio(*v, 1.0)).collect();
                let which = if several { format!(" [{}]", k + 1) } else { String::new() };
                println!(
                    "Open loop, permd{which} p99 / Redis p99, each round: {}; median {}",
                    each.join(", "),
                    ratio(median(ratios.clone()), 1.0)
                );
            }
        }

        // The targets the closed loop measures, for the newest binary at c=32: the medians of
        // its rounds against the bars the issue sets, and beside them the open loop's p99.
        // (The in-process check, the full load and freshness have suites of their own.)
        if let Some(rows) = by_round.get(&(32, newest)) {
            let medians: Vec<f64> = (0..rows[0].len())
                .map(|i| median(rows.iter().map(|r| r[i]).collect()))
                .collect();
            let verdict = |value: f64, met: bool| {
                if value.is_nan() {
                    "not run"
                } else if met {
                    "met"
                } else {
                    "missed"
                }
            };
            // Stolen time that lands on one system's row and not the other's moves their
            // ratio by as much (benches/README.md): such a run decides nothing.
            let steal = stolen
                .get(&(32, newest))
                .map_or(0.0, |rounds| rounds.iter().copied().fold(0.0, f64::max));
            // So does another program's work (a build beside the run, say).
            let busy = elsewhere
                .get(&(32, newest))
                .map_or(0.0, |rounds| rounds.iter().copied().fold(0.0, f64::max));
            let against_redis = |value: f64, met: bool| {
                if steal >= STEAL_INCONCLUSIVE && !value.is_nan() {
                    format!("{}, not conclusive: {steal:.0} % stolen", verdict(value, met))
                } else if busy >= OTHERS_INCONCLUSIVE && !value.is_nan() {
                    format!(
                        "{}, not conclusive: {busy:.0} % of the machine busy elsewhere",
                        verdict(value, met)
                    )
                } else {
                    verdict(value, met).to_owned()
                }
            };
            let targets = [
                ("single check >= 1.25x Redis SISMEMBER", medians[0], medians[0] >= 1.25, true),
                ("batch >= 2x Redis pipelined", medians[1], medians[1] >= 2.0, true),
                ("single check >= 3x source-table SQL", medians[2], medians[2] >= 3.0, false),
                ("single check >= 2x precomputed SQL", medians[3], medians[3] >= 2.0, false),
                ("single check p99 <= Redis's", medians[4], medians[4] <= 1.0, true),
            ];
            println!();
            println!("Against the targets (permd{}, 32 connections, medians of {rounds} round(s)):", if several { format!(" [{}]", newest + 1) } else { String::new() });
            println!();
            println!("| target | result | verdict |");
            println!("|---|---:|---|");
            for (target, value, met, redis) in targets {
                let said = if redis {
                    against_redis(value, met)
                } else {
                    verdict(value, met).to_owned()
                };
                println!("| {target} | {} | {said} |", ratio(value, 1.0));
            }
            let resident = memory[newest];
            println!(
                "| resident <= 1/3 of Redis used_memory | {resident:.2}x | {} |",
                verdict(resident, resident <= 1.0 / 3.0)
            );
            let open = median(open_p99[newest].clone());
            println!(
                "| (beside the targets) open-loop p99 <= Redis's, {rate:.0}/s over 64 connections | {} | {} |",
                ratio(open, 1.0),
                verdict(open, open <= 1.0)
            );
            println!(
                "| (beside the targets) single check >= 1.25x Redis, both over a Unix socket | {} | {} |",
                ratio(medians[5], 1.0),
                verdict(medians[5], medians[5] >= 1.25)
            );
            if steal >= STEAL_INCONCLUSIVE {
                println!();
                println!(
                    "The hypervisor stole up to {steal:.0} % of the machine during a round's Redis or permd row \
                     (the host steal column): the ratios against Redis then measure the steal as much as the \
                     servers. Run again for a verdict."
                );
            }
            if busy >= OTHERS_INCONCLUSIVE {
                println!();
                println!(
                    "Up to {busy:.0} % of the machine ran neither the server nor the client during a round's \
                     Redis or permd row (the other CPU column): another program shared the cores, and the \
                     ratios against Redis measure it as much as the servers. Run again on a quiet machine \
                     for a verdict."
                );
            }
        }

        drop(servers);

        if overload_part {
            overload(&binaries[newest], &url, capacity, seconds, subjects).await;
        }
    });
    drop(redis);
    cluster.stop();
}

/// More clients than capacity: an open loop at 2.5 times the single-check capacity just
/// measured, over 256 connections, against a permd admitting 16 requests at a time. The
/// excess must be shed fast (503), the admitted ones answered with bounded latency, memory
/// must stay flat, /livez must answer throughout, and all must be well afterwards.
async fn overload(binary: &str, url: &str, capacity: f64, seconds: f64, subjects: u32) {
    let permd = Permd::start(binary, url, &["--max-in-flight", "16"], None);
    assert!(wait_ready(permd.port).await);
    let at = Endpoints {
        postgres: url.to_owned(),
        redis: 0,
        permd: permd.port,
        bare: 0,
        redis_socket: PathBuf::new(),
        permd_socket: PathBuf::new(),
        redis_pid: 0,
        permd_pid: permd.child.id(),
        permd_token: 0,
    };
    let before = permd.rss_kib("VmRSS:");
    let stop = Arc::new(AtomicBool::new(false));
    let prober = {
        let stop = Arc::clone(&stop);
        let port = permd.port;
        tokio::spawn(async move {
            let mut worst = Duration::ZERO;
            let (mut ok, mut failed) = (0, 0);
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let mut stream =
                    BufStream::new(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
                stream
                    .write_all(b"GET /livez HTTP/1.1\r\nhost: permd\r\n\r\n")
                    .await
                    .unwrap();
                stream.flush().await.unwrap();
                let status = read_response(&mut stream, &mut Vec::new()).await;
                if status == 200 {
                    ok += 1;
                } else {
                    failed += 1;
                }
                worst = worst.max(started.elapsed());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (ok, failed, worst)
        })
    };
    let rate = 2.5 * capacity;
    let o = open_loop(System::Permd, &at, 256, rate, seconds, subjects).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed, worst) = prober.await.unwrap();
    let after = permd.rss_kib("VmRSS:");
    let peak = permd.rss_kib("VmHWM:");
    let recovery = closed_loop(System::Permd, &at, 8, 1.0, subjects).await;
    println!();
    println!(
        "Overload: open loop at {rate:.0} requests/s (2.5x the c=32 capacity of {capacity:.0}/s), 256 connections, \
         permd --max-in-flight 16, {seconds} s:"
    );
    println!(
        "- offered {} requests in {:.1} s: {} answered ({:.0}/s), {} shed with 503 ({:.1} %), {} wrong",
        o.requests,
        o.seconds,
        o.requests - o.shed,
        (o.requests - o.shed) as f64 / o.seconds,
        o.shed,
        100.0 * o.shed as f64 / o.requests.max(1) as f64,
        o.wrong
    );
    println!(
        "- latency from due time, all requests: p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms",
        o.quantile_ms(0.5),
        o.quantile_ms(0.99),
        o.quantile_ms(0.999)
    );
    println!(
        "- latency from send to answer (the part a server controls): p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms",
        quantile_ms(&o.service, 0.5),
        quantile_ms(&o.service, 0.99),
        quantile_ms(&o.service, 0.999),
        quantile_ms(&o.service, 1.0)
    );
    println!(
        "- permd resident memory: {:.0} MiB before, {:.0} MiB after, peak {:.0} MiB",
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    println!(
        "- /livez every 100 ms during the run: {ok} answered 200, {failed} not; slowest {:.1} ms",
        worst.as_secs_f64() * 1e3
    );
    println!(
        "- afterwards, 8 connections for 1 s: {:.0} checks/s, {} shed, p99 {:.3} ms",
        recovery.checks_per_second(),
        recovery.shed,
        recovery.quantile_ms(0.99)
    );
    assert_eq!(o.wrong, 0);
    assert_eq!(failed, 0);
    assert_eq!(recovery.shed, 0);
}

/// Waits (up to five minutes) for permd's /readyz.
/// A read-your-writes token the permd on `port` has passed: one below the revision it
/// answers a check at (the watermark: every transaction below it applied).
async fn passed_token(port: u16) -> u64 {
    let mut stream = BufStream::new(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    stream
        .write_all(
            b"GET /v1/check?subject=user:0&permission=perm00 HTTP/1.1\r\nhost: permd\r\n\r\n",
        )
        .await
        .unwrap();
    stream.flush().await.unwrap();
    let mut body = Vec::new();
    assert_eq!(read_response(&mut stream, &mut body).await, 200);
    let at = find(&body, b"\"revision\":\"").unwrap() + 12;
    let digits: String = body[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .map(|&b| char::from(b))
        .collect();
    let revision: u64 = digits.parse().unwrap();
    assert!(revision > 0, "{}", String::from_utf8_lossy(&body));
    revision - 1
}

async fn wait_ready(port: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        if let Ok(stream) = TcpStream::connect(("127.0.0.1", port)).await {
            let mut stream = BufStream::new(stream);
            if stream
                .write_all(b"GET /readyz HTTP/1.1\r\nhost: permd\r\n\r\n")
                .await
                .is_ok()
                && stream.flush().await.is_ok()
            {
                let status = read_response(&mut stream, &mut Vec::new()).await;
                if status == 200 {
                    return true;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}
