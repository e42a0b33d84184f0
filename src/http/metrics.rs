//! Prometheus metrics, kept as plain atomics and rendered as text on demand.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::store::Store;
use crate::sync::Status;

/// Upper bounds of the check latency buckets, in seconds: sub-millisecond resolution
/// where permd lives, coarse above.
const BUCKETS: [f64; 14] = [
    0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005,
    0.01, 0.05, 0.25, 1.0,
];

/// Request-side counters. Atomics, not locks: the check path only increments.
#[derive(Default)]
pub(crate) struct Metrics {
    allowed: AtomicU64,
    denied: AtomicU64,
    stale: AtomicU64,
    shed: AtomicU64,
    client_errors: AtomicU64,
    hyper_requests: AtomicU64,
    buckets: [AtomicU64; BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_nanos: AtomicU64,
}

impl Metrics {
    /// Counts check results.
    pub(crate) fn checks(&self, allowed: u64, denied: u64) {
        if allowed > 0 {
            self.allowed.fetch_add(allowed, Ordering::Relaxed);
        }
        if denied > 0 {
            self.denied.fetch_add(denied, Ordering::Relaxed);
        }
    }

    /// Records the latency of one check request (single or batch).
    pub(crate) fn latency(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| seconds <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_nanos.fetch_add(
            u64::try_from(took.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Counts a request answered 503 stale.
    pub(crate) fn stale(&self) {
        self.stale.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request shed for overload.
    pub(crate) fn shed(&self) {
        self.shed.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request answered with a 4xx.
    pub(crate) fn client_error(&self) {
        self.client_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request served by hyper rather than the keep-alive loop.
    pub(crate) fn hyper_request(&self) {
        self.hyper_requests.fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of every metric; `in_flight` is the number of API
    /// requests being served (this scrape included).
    pub(crate) fn render(&self, store: &Store, status: &Status, in_flight: usize) -> String {
        let mut out = String::with_capacity(4096);
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP permd_checks_total Permission checks answered, by result."
        );
        let _ = writeln!(out, "# TYPE permd_checks_total counter");
        let _ = writeln!(
            out,
            "permd_checks_total{{result=\"allowed\"}} {}",
            get(&self.allowed)
        );
        let _ = writeln!(
            out,
            "permd_checks_total{{result=\"denied\"}} {}",
            get(&self.denied)
        );

        let _ = writeln!(
            out,
            "# HELP permd_check_duration_seconds Time to answer a check request (single or batch)."
        );
        let _ = writeln!(out, "# TYPE permd_check_duration_seconds histogram");
        let mut cumulative = 0;
        for (bound, count) in BUCKETS.iter().zip(&self.buckets) {
            cumulative += get(count);
            let _ = writeln!(
                out,
                "permd_check_duration_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
            );
        }
        let count = get(&self.latency_count);
        let _ = writeln!(
            out,
            "permd_check_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "permd_check_duration_seconds_sum {}",
            get(&self.latency_sum_nanos) as f64 / 1e9
        );
        let _ = writeln!(out, "permd_check_duration_seconds_count {count}");

        let counts = store.counts();
        let report = status.report();
        let gauges: [(&str, &str, &str, f64); 13] = [
            ("permd_tuples", "gauge", "Stored tuple rows, expired ones included.", counts.tuples as f64),
            ("permd_subjects", "gauge", "Subjects with at least one tuple or limit.", counts.subjects as f64),
            ("permd_limits", "gauge", "Stored limit rows.", counts.limits as f64),
            (
                "permd_packed_grant_bytes",
                "gauge",
                "Bytes mapped for the grant lists the last full load packed (in huge pages where the kernel grants them).",
                counts.packed_bytes as f64,
            ),
            ("permd_watermark", "gauge", "Every transaction with an xid below this is applied.", store.watermark().0 as f64),
            (
                "permd_lag_seconds",
                "gauge",
                "Seconds since the mirror was last caught up with Postgres (-1 before the first catch-up).",
                report.lag_seconds.unwrap_or(-1.0),
            ),
            ("permd_connected", "gauge", "1 while the sync connection to Postgres is up.", f64::from(u8::from(report.connected))),
            ("permd_reloads_total", "counter", "Full loads, the first included.", report.reloads as f64),
            ("permd_reconnects_total", "counter", "Sync connections lost and re-established.", report.reconnects as f64),
            ("permd_stale_total", "counter", "Requests answered 503 stale (at_least not reached in time).", get(&self.stale) as f64),
            ("permd_shed_total", "counter", "Requests shed with 503 overloaded (too many in flight).", get(&self.shed) as f64),
            (
                "permd_http_hyper_requests_total",
                "counter",
                "Requests served by hyper, the full HTTP server, rather than permd's keep-alive loop: all but the plain single checks and batches the loop answers (this scrape included).",
                get(&self.hyper_requests) as f64,
            ),
            ("permd_in_flight", "gauge", "API requests being served, this scrape included (bounded by --max-in-flight).", in_flight as f64),
        ];
        for (name, kind, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {value}");
        }
        let _ = writeln!(
            out,
            "# HELP permd_client_errors_total Requests answered with a 4xx."
        );
        let _ = writeln!(out, "# TYPE permd_client_errors_total counter");
        let _ = writeln!(
            out,
            "permd_client_errors_total {}",
            get(&self.client_errors)
        );
        out
    }
}
