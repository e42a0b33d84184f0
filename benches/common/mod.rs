//! What the suites that talk to Postgres share: a throwaway cluster and their settings from
//! the environment. Each suite uses a part of it.

#![allow(dead_code)]

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use permd::embedded::{Cluster, ClusterOptions};
use permd::store::Store;
use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncWrite, BufStream};

/// A throwaway Postgres from the machine's binaries, with `fsync=off` (a benchmark's data
/// is disposable); stopped when dropped.
pub fn cluster() -> Cluster {
    Cluster::start(&ClusterOptions {
        unsafe_fast: true,
        ..ClusterOptions::default()
    })
    .expect("start a throwaway Postgres")
}

/// As [`cluster`], serving TLS too (`ssl=on`) with a self-signed certificate for
/// `localhost`.
pub fn cluster_with_tls() -> Cluster {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
        .expect("a self-signed certificate");
    Cluster::start(&ClusterOptions {
        unsafe_fast: true,
        tls: Some(permd::embedded::ServerTls {
            cert_pem: certified.cert.pem(),
            key_pem: certified.signing_key.serialize_pem(),
            client_ca_pem: None,
        }),
        ..ClusterOptions::default()
    })
    .expect("start a throwaway Postgres with TLS")
}

/// The environment variable `name`, or `default` when it is unset. A value that does not
/// parse stops the suite with its name rather than quietly running another workload.
pub fn env_or<T: FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(value) => value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} does not parse")),
        Err(_) => default,
    }
}

/// The comma-separated list in the environment variable `name`, or `default`'s.
pub fn env_list<T: FromStr>(name: &str, default: &str) -> Vec<T> {
    let list = std::env::var(name).unwrap_or_else(|_| default.to_owned());
    list.split(',')
        .map(|item| {
            item.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{name}: {item:?} does not parse"))
        })
        .collect()
}

/// The suite's own runtime (its client, its writers): two worker threads, fixed so that a
/// run on a bigger machine does not give the client more threads than the servers have.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("start a tokio runtime")
}

/// Reads one response (status line, headers, a `Content-Length` body) and leaves its body
/// in `body`. The head is scanned once, as bytes, where it arrived (as an HTTP client
/// library does it: hyper parses a head in one pass), not line by line into strings: the
/// client shares the machine with the server, so its framing should cost about what its
/// RESP framing costs. Requests are never pipelined, so nothing may follow the body.
pub async fn read_response<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut BufStream<S>,
    body: &mut Vec<u8>,
) -> u16 {
    body.clear();
    let head_end = loop {
        let chunk = stream.fill_buf().await.unwrap();
        assert!(!chunk.is_empty(), "the server closed the connection");
        let n = chunk.len();
        body.extend_from_slice(chunk);
        stream.consume(n);
        if let Some(end) = find(body, b"\r\n\r\n") {
            break end + 4;
        }
    };
    let head = &body[..head_end];
    let status = head
        .get(9..12)
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let length: usize = head
        .split(|b| *b == b'\n')
        .find_map(|line| {
            let (name, value) = line.split_at(line.iter().position(|b| *b == b':')?);
            name.eq_ignore_ascii_case(b"content-length")
                .then(|| std::str::from_utf8(&value[1..]).ok()?.trim().parse().ok())?
        })
        .unwrap_or(0);
    let end = head_end + length;
    while body.len() < end {
        let chunk = stream.fill_buf().await.unwrap();
        assert!(
            !chunk.is_empty(),
            "the server closed the connection mid-body"
        );
        let n = chunk.len();
        body.extend_from_slice(chunk);
        stream.consume(n);
    }
    assert_eq!(body.len(), end, "bytes after the response");
    body.drain(..head_end);
    status
}

/// A port on 127.0.0.1 that was free a moment ago, for a server the suite starts (below the
/// kernel's ephemeral range, as a throwaway cluster's: `permd::embedded::free_port`).
pub fn free_port() -> u16 {
    permd::embedded::free_port().expect("a free port on 127.0.0.1")
}

/// Where `needle` first starts in `haystack`.
pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The machine's CPU time over all its CPUs, from the first line of `/proc/stat`, in clock
/// ticks: all of it, the part idle, and the part stolen (time a virtual CPU wanted to run
/// while the hypervisor ran something else). Stolen time is the host's, not the guest's: a
/// wake-up that falls in it waits, and no program in the guest can win it back. The suites
/// print it beside their figures so that a slow run on a busy host reads as such.
#[derive(Clone, Copy)]
pub struct HostCpu {
    total: u64,
    idle: u64,
    steal: u64,
}

/// What the machine did between two readings of [`HostCpu`].
pub struct HostSince {
    /// The share of the machine's time stolen, in percent.
    pub steal_percent: f64,
    /// CPU seconds the machine ran anything (neither idle nor stolen), over all its CPUs.
    pub busy_seconds: f64,
    /// CPU seconds in all: the interval times the number of CPUs.
    pub seconds: f64,
}

impl HostCpu {
    /// Now; `None` where `/proc/stat` cannot be read (not Linux).
    pub fn now() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        // cpu user nice system idle iowait irq softirq steal guest guest_nice; guest time
        // is also counted in user, so the first eight are the whole.
        let ticks: Vec<u64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|field| field.parse().ok())
            .collect::<Option<_>>()?;
        (ticks.len() == 8).then(|| Self {
            total: ticks.iter().sum(),
            idle: ticks[3] + ticks[4],
            steal: ticks[7],
        })
    }

    /// What the machine did since `earlier`; `None` when unknown.
    pub fn since(earlier: Option<Self>) -> Option<HostSince> {
        let (before, after) = earlier.zip(Self::now())?;
        let total = after.total.checked_sub(before.total).filter(|t| *t > 0)? as f64;
        let steal = (after.steal - before.steal) as f64;
        let idle = (after.idle - before.idle) as f64;
        let ticks = clock_ticks();
        Some(HostSince {
            steal_percent: steal * 100.0 / total,
            busy_seconds: (total - idle - steal) / ticks,
            seconds: total / ticks,
        })
    }

    /// The share of the machine's time stolen since `earlier`, in percent, as a table cell
    /// (`-` when unknown).
    pub fn steal_since(earlier: Option<Self>) -> String {
        Self::since(earlier).map_or("-".to_owned(), |since| {
            format!("{:.0}", since.steal_percent)
        })
    }
}

/// Clock ticks a second, as `/proc`'s CPU times count them (`getconf CLK_TCK`; 100 when
/// it cannot be asked).
pub fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Writes not yet seen in permd's store: each one's subject, granted `fresh` globally, and
/// when its COMMIT returned.
#[derive(Default)]
pub struct Pending {
    list: Mutex<Vec<(String, Instant)>>,
    /// Wakes the watcher, which sleeps while the list is empty.
    added: Condvar,
}

impl Pending {
    /// Adds a write whose COMMIT returned at `committed`.
    pub fn push(&self, subject: String, committed: Instant) {
        self.list
            .lock()
            .expect("the pending list")
            .push((subject, committed));
        self.added.notify_one();
    }
}

/// A thread that checks permd's store every 20 µs for the writes in its [`Pending`] list
/// while it holds any (and sleeps while it is empty, so that a suite whose writers fill
/// the cores shares them with no idle spinning), and takes each one's time from its
/// COMMIT returning to its being answered.
pub struct Watcher {
    pending: Arc<Pending>,
    done: Arc<AtomicBool>,
    thread: JoinHandle<(Vec<Duration>, Instant)>,
}

impl Watcher {
    pub fn start(store: &Store) -> Self {
        let pending = Arc::new(Pending::default());
        let done = Arc::new(AtomicBool::new(false));
        let thread = {
            let (pending, done, store) = (Arc::clone(&pending), Arc::clone(&done), store.clone());
            std::thread::spawn(move || {
                let mut latencies = Vec::new();
                let mut last_seen = Instant::now();
                loop {
                    let finished = done.load(Ordering::Acquire);
                    let mut list = pending.list.lock().expect("the pending list");
                    list.retain(|(subject, committed)| {
                        if store.check(subject, "fresh", "") {
                            last_seen = Instant::now();
                            latencies.push(last_seen - *committed);
                            false
                        } else {
                            true
                        }
                    });
                    if list.is_empty() {
                        if finished {
                            return (latencies, last_seen);
                        }
                        // Woken by the next write, or by `finish` (the timeout covers a
                        // wake-up sent just before this wait).
                        drop(
                            pending
                                .added
                                .wait_timeout(list, Duration::from_millis(10))
                                .expect("the pending list"),
                        );
                        continue;
                    }
                    drop(list);
                    std::thread::sleep(Duration::from_micros(20));
                }
            })
        };
        Self {
            pending,
            done,
            thread,
        }
    }

    /// The list the writers add their committed writes to.
    pub fn pending(&self) -> Arc<Pending> {
        Arc::clone(&self.pending)
    }

    /// Waits until every write added has been seen, and returns the times from COMMIT to
    /// visible, sorted, and when the last write was seen (the watcher's start if none was
    /// added).
    pub fn finish(self) -> (Vec<Duration>, Instant) {
        self.done.store(true, Ordering::Release);
        self.pending.added.notify_one();
        let (mut latencies, last_seen) = self.thread.join().expect("the watcher");
        latencies.sort_unstable();
        (latencies, last_seen)
    }
}

/// permd in this process, serving `url`'s database on a free loopback port and polling
/// every `poll_ms`, once it is ready; stopped by cancelling the token returned.
pub async fn daemon_in_process(
    url: &str,
    poll_ms: u64,
) -> (permd::Daemon, tokio_util::sync::CancellationToken) {
    use clap::Parser as _;
    let cli = permd::config::Cli::parse_from([
        "permd",
        "serve",
        "--database-url",
        url,
        "--listen",
        "127.0.0.1:0",
        "--poll-interval-ms",
        &poll_ms.to_string(),
    ]);
    let permd::config::Command::Serve(args) = cli.command else {
        unreachable!("parsed as serve")
    };
    let settings = args
        .server
        .settings(&args.database_url)
        .expect("the daemon's settings");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let daemon = permd::Daemon::start(settings, shutdown.clone())
        .await
        .expect("start permd");
    assert!(
        daemon.wait_ready(Duration::from_secs(60)).await,
        "permd ready"
    );
    (daemon, shutdown)
}
