//! Busy polling for `permd.notify = 'auto'` writers (migration 0010).
//!
//! A notifying commit holds a cluster-wide lock until its commit record is flushed, so
//! notifying commits go one at a time. Writers with `permd.notify = 'auto'` ring only
//! while a daemon listens: one holds an advisory lock `(1886547300, slot)` of eight
//! exclusively. When such writers' transactions ring faster than [`BUSY_RINGS`] in
//! [`BUSY_WINDOW`], the daemon lets its slot go and polls every `--busy-poll-ms`
//! instead; the writers then send nothing, and their commits share WAL flushes. Once its
//! polls read fewer than [`CALM`] transactions in [`BUSY_WINDOW`] (half the rate it left
//! at, so that it does not flap), it takes a slot again: it can only when no silent
//! transaction is open (each holds every slot in share mode until it ends), so the poll
//! made right after reads every silent commit, and writers ring again.
//!
//! Nothing here can lose a commit: a silent commit is in the changelog, and a poll reads
//! it. What a wrong decision costs is time: a daemon that cannot take a slot back (a
//! silent transaction left open, or eight daemons listening already) polls every
//! `--busy-poll-ms` for [`LINGER`] after the last change it found, then at the poll
//! interval, trying again at each poll.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Takes the first free slot of the eight, exclusively, for the session: its number, or
/// no row. The advisory locks' first key is 'prmd'; eight daemons can listen at once.
pub(crate) const TAKE_SLOT: &str = "SELECT s FROM generate_series(0, 7) s \
     WHERE pg_try_advisory_lock(1886547300, s) LIMIT 1";
/// Lets the slot go (`$1`).
pub(crate) const LEAVE_SLOT: &str = "SELECT pg_advisory_unlock(1886547300, $1)";

/// Transactions of 'auto' writers heard in [`BUSY_WINDOW`] that make the daemon poll
/// instead.
pub(crate) const BUSY_RINGS: usize = 50;
/// 100 ms: [`BUSY_RINGS`] in it is 500 transactions a second.
pub(crate) const BUSY_WINDOW: Duration = Duration::from_millis(100);
/// Transactions the polls of the last [`BUSY_WINDOW`] may read for the daemon to listen
/// again: 250 a second.
pub(crate) const CALM: usize = 25;
/// How long after the last change found the daemon goes on polling every
/// `--busy-poll-ms` while it cannot take a slot.
pub(crate) const LINGER: Duration = Duration::from_secs(1);

/// Whether the daemon listens for 'auto' writers' notifications, and when to stop.
#[derive(Debug)]
pub(crate) struct Busy {
    /// `--busy-poll-ms`; `None`: always listen (0).
    interval: Option<Duration>,
    /// The slot held: listening.
    slot: Option<i32>,
    /// When the recent 'auto' transactions were heard (at most [`BUSY_RINGS`]).
    rings: VecDeque<Instant>,
    /// The transaction last heard: its other statements' notifications follow it.
    last_xid: u64,
    /// When a poll last found a change since the slot was let go (`None`: at a session's
    /// start, or listening since).
    last_change: Option<Instant>,
    /// When the slot was let go.
    left_at: Option<Instant>,
    /// The transactions each poll of the last [`BUSY_WINDOW`] read, while polling.
    found: VecDeque<(Instant, usize)>,
}

impl Busy {
    /// A session's start: no slot yet, one tried for before its first poll.
    pub(crate) fn new(interval: Option<Duration>) -> Self {
        Self {
            interval,
            slot: None,
            rings: VecDeque::with_capacity(BUSY_RINGS),
            last_xid: 0,
            last_change: None,
            left_at: None,
            found: VecDeque::new(),
        }
    }

    /// A notification of transaction `xid`, an 'auto' writer's, arrived at `now`; true
    /// when it is time to poll instead of listening ([`Self::leave`]).
    pub(crate) fn heard(&mut self, xid: u64, now: Instant) -> bool {
        if self.interval.is_none() || self.slot.is_none() || xid == self.last_xid {
            return false;
        }
        self.last_xid = xid;
        if self.rings.len() == BUSY_RINGS {
            self.rings.pop_front();
        }
        self.rings.push_back(now);
        self.rings.len() == BUSY_RINGS
            && self
                .rings
                .front()
                .is_some_and(|first| now.duration_since(*first) <= BUSY_WINDOW)
    }

    /// Stops listening at `now`: the slot to let go, if one is held.
    pub(crate) fn leave(&mut self, now: Instant) -> Option<i32> {
        self.rings.clear();
        let slot = self.slot.take()?;
        self.last_change = Some(now);
        self.left_at = Some(now);
        self.found.clear();
        Some(slot)
    }

    /// A poll ended at `now`, having read the changes of `transactions`: whether to try
    /// for a slot.
    pub(crate) fn after_poll(&mut self, transactions: usize, now: Instant) -> bool {
        if self.slot.is_some() {
            return false;
        }
        let Some(left_at) = self.left_at.filter(|_| self.interval.is_some()) else {
            // Always listening: try at each poll.
            return true;
        };
        if transactions > 0 {
            self.last_change = Some(now);
        }
        self.found.push_back((now, transactions));
        while self
            .found
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > BUSY_WINDOW)
        {
            self.found.pop_front();
        }
        now.duration_since(left_at) >= BUSY_WINDOW
            && self.found.iter().map(|(_, read)| read).sum::<usize>() < CALM
    }

    /// The try for a slot at `now` gave `slot`. None at a session's start: polling, as
    /// if the slot had just been let go (silent transactions are open).
    pub(crate) fn took(&mut self, slot: Option<i32>, now: Instant) {
        self.slot = slot;
        if slot.is_some() {
            self.last_change = None;
            self.left_at = None;
            self.found.clear();
        } else if self.left_at.is_none() {
            self.left_at = Some(now);
            self.last_change = Some(now);
        }
    }

    /// Whether it polls for 'auto' writers (holds no slot, and may poll every
    /// `--busy-poll-ms`).
    pub(crate) fn polling(&self) -> bool {
        self.slot.is_none() && self.interval.is_some()
    }

    /// How long to wait at `now` for the next poll, which would otherwise be in `wait`:
    /// no more than `--busy-poll-ms` while polling, until [`LINGER`] after the last
    /// change found.
    pub(crate) fn wait(&self, wait: Duration, now: Instant) -> Duration {
        match (self.interval, self.last_change) {
            (Some(interval), Some(last))
                if self.slot.is_none() && now.duration_since(last) < LINGER =>
            {
                wait.min(interval)
            }
            _ => wait,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// A session's start: a slot taken before the first poll.
    fn listening(interval: Option<Duration>) -> (Busy, Instant) {
        let at = Instant::now();
        let mut busy = Busy::new(interval);
        busy.took(Some(3), at);
        assert!(!busy.after_poll(5, at));
        (busy, at)
    }

    #[test]
    fn many_rings_in_the_window_let_the_slot_go_few_do_not() {
        let (mut busy, at) = listening(Some(2 * MS));
        // One every 3 ms: 50 span 147 ms, past the window.
        assert!(!(0..200u32).any(|i| busy.heard(u64::from(i) + 10, at + i * 3 * MS)));
        // One every millisecond: the 50th within 100 ms of the first.
        let start = at + Duration::from_secs(1);
        // Another statement of the same transaction is not counted again.
        assert!(!busy.heard(209, start));
        let heard: Vec<bool> = (0..BUSY_RINGS as u32)
            .map(|i| busy.heard(u64::from(i) + 1000, start + i * MS))
            .collect();
        assert!(heard[..BUSY_RINGS - 1].iter().all(|busy| !busy));
        assert!(heard[BUSY_RINGS - 1]);
        assert_eq!(busy.leave(start + 50 * MS), Some(3));
        assert_eq!(busy.leave(start + 50 * MS), None);
        assert!(!busy.heard(2000, start + 51 * MS));
    }

    #[test]
    fn without_a_busy_interval_the_daemon_always_listens() {
        let (mut busy, at) = listening(None);
        assert!(!(0..1000u32)
            .any(|i| busy.heard(u64::from(i) + 10, at + i * Duration::from_micros(10))));
        assert_eq!(
            busy.wait(Duration::from_secs(1), at),
            Duration::from_secs(1)
        );
        // A slot not had is tried for at every poll.
        let mut busy = Busy::new(None);
        busy.took(None, at);
        assert!(busy.after_poll(5, at + MS));
        busy.took(None, at + MS);
        assert!(busy.after_poll(5, at + 2 * MS));
        assert_eq!(
            busy.wait(Duration::from_secs(1), at),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn polling_goes_on_until_the_polls_are_calm_then_slows_down_while_no_slot_is_free() {
        let (mut busy, at) = listening(Some(2 * MS));
        assert_eq!(busy.leave(at), Some(3));
        let second = Duration::from_secs(1);
        assert_eq!(busy.wait(second, at), 2 * MS);
        // Not before a whole window's polls, however calm.
        assert!(!busy.after_poll(0, at + 50 * MS));
        // A change every 2 ms: 50 in 100 ms.
        let busy_until = (1..=100u32).all(|i| !busy.after_poll(1, at + i * 2 * MS));
        assert!(busy_until);
        // Then one every 10 ms: calm once the window holds fewer than 25, the busy polls'
        // 18 and these 6 at 66 ms (51 - i of the one and i / 5 of the other at 2i ms).
        let calm = (1..=60u32)
            .map(|i| busy.after_poll(usize::from(i % 5 == 0), at + 200 * MS + i * 2 * MS))
            .position(|take| take);
        assert_eq!(calm, Some(32));
        // No slot free: polled every 2 ms for a second after the last change, then at
        // the poll interval, trying at each poll.
        busy.took(None, at + 266 * MS);
        let last_change = at + 260 * MS;
        assert_eq!(busy.wait(second, last_change + 500 * MS), 2 * MS);
        assert_eq!(busy.wait(second, last_change + 1010 * MS), second);
        assert!(busy.after_poll(0, last_change + 1010 * MS));
        busy.took(Some(0), last_change + 1010 * MS);
        assert!(!busy.after_poll(3, last_change + 1020 * MS));
        assert_eq!(busy.wait(second, last_change + 1020 * MS), second);
    }

    #[test]
    fn a_session_that_finds_no_slot_free_polls_as_if_it_had_just_let_one_go() {
        let at = Instant::now();
        let mut busy = Busy::new(Some(2 * MS));
        busy.took(None, at);
        let second = Duration::from_secs(1);
        assert_eq!(busy.wait(second, at + MS), 2 * MS);
        assert!(!busy.after_poll(0, at + 50 * MS));
        assert!(busy.after_poll(0, at + 100 * MS));
        busy.took(None, at + 100 * MS);
        assert_eq!(busy.wait(second, at + 900 * MS), 2 * MS);
        assert_eq!(busy.wait(second, at + 1001 * MS), second);
    }
}
