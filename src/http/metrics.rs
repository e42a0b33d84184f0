//! Prometheus metrics, kept as plain atomics and rendered as text on demand.

use std::cell::Cell;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use crate::shard::Shard;
use crate::store::Store;
use crate::sync::Status;

/// Upper bounds of the check latency buckets, in seconds: sub-millisecond resolution
/// where permd lives, coarse above.
const BUCKETS: [f64; 14] = [
    0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005,
    0.01, 0.05, 0.25, 1.0,
];

/// Stripes of the counters every check request bumps. A thread keeps to one stripe (the
/// first one free when it first counts, round robin past the last), so on the check path
/// each counter's cache line stays with the core that bumps it: one set of counters shared
/// by every thread moved its line between the cores on every request.
const STRIPES: usize = 16;

/// The counters a check request bumps, one stripe's worth, on cache lines of its own.
#[derive(Default)]
#[repr(align(128))]
struct Stripe {
    allowed: AtomicU64,
    denied: AtomicU64,
    latency: Histogram,
}

/// A latency histogram in [`BUCKETS`], of plain atomics: a stripe's checks, or the
/// answers one daemon gave a router.
#[derive(Default)]
pub(crate) struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    /// Counts one duration.
    pub(crate) fn record(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| seconds <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(
            u64::try_from(took.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Writes its series as histogram `name`'s, with `labels` (`key="value",…` or empty).
    pub(crate) fn render(&self, out: &mut String, name: &str, labels: &str) {
        render_histogram(out, name, labels, &[self]);
    }
}

/// Writes the bucket, sum and count series of histogram `name` with `labels`
/// (`key="value",…` or empty): the sums of `histograms` (the stripes' for the checks).
fn render_histogram(out: &mut String, name: &str, labels: &str, histograms: &[&Histogram]) {
    let sum = |counter: &dyn Fn(&Histogram) -> &AtomicU64| -> u64 {
        histograms
            .iter()
            .map(|histogram| counter(histogram).load(Ordering::Relaxed))
            .sum()
    };
    let separator = if labels.is_empty() { "" } else { "," };
    let mut cumulative = 0;
    for (i, bound) in BUCKETS.iter().enumerate() {
        cumulative += sum(&|h| &h.buckets[i]);
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{separator}le=\"{bound}\"}} {cumulative}"
        );
    }
    let count = sum(&|h| &h.count);
    let _ = writeln!(
        out,
        "{name}_bucket{{{labels}{separator}le=\"+Inf\"}} {count}"
    );
    let labels = if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    };
    let seconds = sum(&|h| &h.sum_nanos) as f64 / 1e9;
    let _ = writeln!(out, "{name}_sum{labels} {seconds}");
    let _ = writeln!(out, "{name}_count{labels} {count}");
}

/// Request-side counters. Atomics, not locks: the check path only increments.
#[derive(Default)]
pub(crate) struct Metrics {
    stripes: [Stripe; STRIPES],
    stale: AtomicU64,
    /// Requests answered 503 `loading` and 503 `behind`.
    unanswerable: [AtomicU64; 2],
    shed: AtomicU64,
    misdirected: AtomicU64,
    client_errors: AtomicU64,
    hyper_requests: AtomicU64,
}

/// The next stripe a thread that has not counted yet takes.
static NEXT_STRIPE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's stripe, `usize::MAX` until it first counts.
    static STRIPE: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// The calling thread's stripe.
fn stripe_index() -> usize {
    STRIPE.with(|stripe| {
        if stripe.get() == usize::MAX {
            stripe.set(NEXT_STRIPE.fetch_add(1, Ordering::Relaxed) % STRIPES);
        }
        stripe.get()
    })
}

impl Metrics {
    /// Counts the results of one check request (single or batch) and records its latency.
    pub(crate) fn checked(&self, allowed: u64, denied: u64, took: Duration) {
        let stripe = &self.stripes[stripe_index()];
        if allowed > 0 {
            stripe.allowed.fetch_add(allowed, Ordering::Relaxed);
        }
        if denied > 0 {
            stripe.denied.fetch_add(denied, Ordering::Relaxed);
        }
        stripe.latency.record(took);
    }

    /// The sum of one counter over the stripes.
    fn sum(&self, counter: impl Fn(&Stripe) -> &AtomicU64) -> u64 {
        self.stripes
            .iter()
            .map(|stripe| counter(stripe).load(Ordering::Relaxed))
            .sum()
    }

    /// Counts a request answered 503 stale.
    pub(crate) fn stale(&self) {
        self.stale.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request answered 503 because the mirror may not answer: not loaded yet
    /// (`behind` false), or behind Postgres past `--answer-max-lag-ms` (`behind` true).
    pub(crate) fn unanswerable(&self, behind: bool) {
        self.unanswerable[usize::from(behind)].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request shed for overload.
    pub(crate) fn shed(&self) {
        self.shed.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request answered 421 misdirected (about another shard's subject).
    pub(crate) fn misdirected(&self) {
        self.misdirected.fetch_add(1, Ordering::Relaxed);
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
    pub(crate) fn render(
        &self,
        store: &Store,
        status: &Status,
        shard: Shard,
        in_flight: usize,
    ) -> String {
        let mut out = String::with_capacity(4096);
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        header(
            &mut out,
            "permd_checks_total",
            "counter",
            "Permission checks answered, by result.",
        );
        let _ = writeln!(
            out,
            "permd_checks_total{{result=\"allowed\"}} {}",
            self.sum(|s| &s.allowed)
        );
        let _ = writeln!(
            out,
            "permd_checks_total{{result=\"denied\"}} {}",
            self.sum(|s| &s.denied)
        );

        header(
            &mut out,
            "permd_check_duration_seconds",
            "histogram",
            "Time to answer a check request (single or batch).",
        );
        let stripes: Vec<&Histogram> = self.stripes.iter().map(|s| &s.latency).collect();
        render_histogram(&mut out, "permd_check_duration_seconds", "", &stripes);

        let counts = store.counts();
        let report = status.report();
        let gauges: [(&str, &str, &str, f64); 34] = [
            ("permd_tuples", "gauge", "Stored tuple rows, expired ones included.", counts.tuples as f64),
            ("permd_subjects", "gauge", "Subjects with at least one tuple or limit.", counts.subjects as f64),
            ("permd_limits", "gauge", "Stored limit rows.", counts.limits as f64),
            (
                "permd_packed_grant_bytes",
                "gauge",
                "Bytes mapped for the grant lists the last full load packed (in huge pages where the kernel grants them).",
                counts.packed_bytes as f64,
            ),
            (
                "permd_clock_skew_seconds",
                "gauge",
                "Postgres's clock minus this host's, as last measured (NaN before): expires_at is compared with this host's clock.",
                report.clock_skew_seconds.unwrap_or(f64::NAN),
            ),
            (
                "permd_changelog_bytes",
                "gauge",
                "permd.changelog's size on disk, indexes included, as last measured (NaN before): it grows until permd.prune_changelog() runs.",
                report.changelog_bytes.map_or(f64::NAN, |bytes| bytes as f64),
            ),
            (
                "permd_names_since_load",
                "gauge",
                "Object, permission and limit names interned since the last full load or compaction, which only the next one reclaims (--compaction-pct).",
                counts.names_since_load as f64,
            ),
            (
                "permd_unused_packed_bytes",
                "gauge",
                "Bytes of the grant lists the last full load or compaction packed that are no longer used, which only the next one reclaims (--compaction-pct).",
                counts.unused_packed_bytes as f64,
            ),
            (
                "permd_unused_heap_list_bytes",
                "gauge",
                "Bytes of the heap that entries of the last full load or compaction held (grant lists that do not pack, expiring grants' slots, limits) and that their subjects, written since, left behind, which only the next one reclaims (--compaction-pct).",
                counts.unused_heap_list_bytes as f64,
            ),
            (
                "permd_subjects_written_since_load",
                "gauge",
                "Subjects the last full load or compaction put in the lock-free map that have been written since, whose checks take a shard lock until the next one (--compaction-pct).",
                counts.subjects_written_since_load as f64,
            ),
            ("permd_watermark", "gauge", "Every transaction with an xid below this is applied.", store.watermark().0 as f64),
            (
                "permd_lag_seconds",
                "gauge",
                "Seconds since the mirror was last caught up with Postgres (-1 before the first catch-up); on a standby, with its primary.",
                report.lag_seconds.unwrap_or(-1.0),
            ),
            (
                "permd_standby_lag_seconds",
                "gauge",
                "Seconds since the standby permd reads last had everything its primary had written, as far as it can tell (-1 on a primary, while not known, and on a standby that cannot tell).",
                report.standby_lag_seconds.unwrap_or(-1.0),
            ),
            ("permd_connected", "gauge", "1 while the sync connection to Postgres is up.", f64::from(u8::from(report.connected))),
            ("permd_reloads_total", "counter", "Full loads, the first included.", report.reloads as f64),
            (
                "permd_full_load_running_seconds",
                "gauge",
                "Seconds the full load under way has run (-1 when none is; counted in permd_reloads_total once it swaps in).",
                report.full_load_running.as_ref().map_or(-1.0, |load| load.seconds),
            ),
            ("permd_compactions_total", "counter", "Generations rebuilt from memory to reclaim what writes left behind (--compaction-pct).", report.compactions as f64),
            ("permd_reconnects_total", "counter", "Sync connections lost and re-established.", report.reconnects as f64),
            ("permd_polls_total", "counter", "Polls of the changelog (on each doorbell not followed, on the timer, and while a read-your-writes check waits).", report.polls as f64),
            ("permd_standby", "gauge", "1 while the sync connection reads a standby, where changes arrive by the poll after replay (no LISTEN).", f64::from(u8::from(report.standby))),
            ("permd_following", "gauge", "1 while committed changes are applied from their notifications, before the poll reads them.", f64::from(u8::from(report.following))),
            ("permd_busy_polling", "gauge", "1 while writers with permd.notify = 'auto' send no notifications, because they came too fast, and permd polls every --busy-poll-ms instead.", f64::from(u8::from(report.busy_polling))),
            ("permd_busy_polling_started_total", "counter", "Times permd stopped listening for writers with permd.notify = 'auto' (or waiting for a slot to) and began polling for them every --busy-poll-ms.", report.busy_polling_started as f64),
            ("permd_notified_changes_total", "counter", "Statements applied from their notifications.", report.notified_changes as f64),
            ("permd_refused_notifications_total", "counter", "Notifications whose rows were not applied: unsigned, not verifying under permd.notify_key, or replayed (forged, or triggers older than migration 0006).", report.refused_notifications as f64),
            ("permd_dropped_notifications_total", "counter", "Notifications dropped because too many waited for the applier; their commits are read from the changelog.", report.dropped_notifications as f64),
            ("permd_stale_total", "counter", "Requests answered 503 stale (at_least not reached in time).", get(&self.stale) as f64),
            ("permd_shed_total", "counter", "Requests shed with 503 overloaded: too many in flight, or a listing, digest or rows whose turn on the blocking threads (--max-blocking-answers) did not come within the request timeout.", get(&self.shed) as f64),
            ("permd_loading_total", "counter", "Requests answered 503 loading: before the first full load.", get(&self.unanswerable[0]) as f64),
            ("permd_behind_total", "counter", "Requests answered 503 behind: the mirror not caught up with Postgres for longer than --answer-max-lag-ms.", get(&self.unanswerable[1]) as f64),
            ("permd_misdirected_total", "counter", "Requests answered 421 misdirected: about a subject of another shard (--shard), sent here by a router that hashes differently or counts other shards.", get(&self.misdirected) as f64),
            (
                "permd_http_hyper_requests_total",
                "counter",
                "Requests served by hyper, the full HTTP server, rather than permd's keep-alive loop: all but the plain single checks and batches the loop answers (this scrape included).",
                get(&self.hyper_requests) as f64,
            ),
            ("permd_in_flight", "gauge", "API requests being served, this scrape included (bounded by --max-in-flight).", in_flight as f64),
            ("permd_client_errors_total", "counter", "Requests answered with a 4xx.", get(&self.client_errors) as f64),
        ];
        for (name, kind, help, value) in gauges {
            header(&mut out, name, kind, help);
            let _ = writeln!(out, "{name} {value}");
        }
        header(
            &mut out,
            "permd_build_info",
            "gauge",
            "The running permd's version (always 1).",
        );
        let _ = writeln!(
            out,
            "permd_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        header(
            &mut out,
            "permd_shard_info",
            "gauge",
            "The subjects this permd mirrors: shard INDEX/COUNT (--shard; 0/1 is every subject; always 1).",
        );
        let _ = writeln!(out, "permd_shard_info{{shard=\"{shard}\"}} 1");
        out
    }
}

/// A metric's `# HELP` and `# TYPE` lines.
fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_with_labels_has_cumulative_buckets_a_sum_and_a_count() {
        let histogram = Histogram::default();
        for took in [
            Duration::from_micros(3),
            Duration::from_millis(3),
            Duration::from_secs(2),
        ] {
            histogram.record(took);
        }
        let mut text = String::new();
        histogram.render(&mut text, "x_seconds", "shard=\"0/1\"");
        for line in [
            "x_seconds_bucket{shard=\"0/1\",le=\"0.000005\"} 1",
            "x_seconds_bucket{shard=\"0/1\",le=\"0.0025\"} 1",
            "x_seconds_bucket{shard=\"0/1\",le=\"0.005\"} 2",
            "x_seconds_bucket{shard=\"0/1\",le=\"1\"} 2",
            "x_seconds_bucket{shard=\"0/1\",le=\"+Inf\"} 3",
            "x_seconds_sum{shard=\"0/1\"} 2.003003",
            "x_seconds_count{shard=\"0/1\"} 3",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
        assert_eq!(text.lines().count(), BUCKETS.len() + 3, "{text}");
    }

    #[test]
    fn counts_from_many_threads_add_up_across_stripes() {
        let metrics = Metrics::default();
        // More threads than stripes, so some share one.
        std::thread::scope(|scope| {
            for _ in 0..STRIPES + 3 {
                scope.spawn(|| {
                    for _ in 0..1_000 {
                        metrics.checked(1, 0, Duration::from_micros(3));
                        metrics.checked(2, 98, Duration::from_millis(3));
                    }
                });
            }
        });
        let threads = (STRIPES + 3) as u64;
        let text = metrics.render(&Store::new(), &Status::default(), Shard::WHOLE, 0);
        for line in [
            format!(
                "permd_checks_total{{result=\"allowed\"}} {}",
                threads * 3_000
            ),
            format!(
                "permd_checks_total{{result=\"denied\"}} {}",
                threads * 98_000
            ),
            format!(
                "permd_check_duration_seconds_bucket{{le=\"0.000005\"}} {}",
                threads * 1_000
            ),
            format!(
                "permd_check_duration_seconds_bucket{{le=\"0.0025\"}} {}",
                threads * 1_000
            ),
            format!(
                "permd_check_duration_seconds_bucket{{le=\"0.005\"}} {}",
                threads * 2_000
            ),
            format!("permd_check_duration_seconds_count {}", threads * 2_000),
            format!(
                "permd_check_duration_seconds_sum {}",
                threads as f64 * 3.003
            ),
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
    }
}
