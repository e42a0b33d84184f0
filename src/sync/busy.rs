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
//! A daemon that wants a slot when none is free (a silent transaction is open, or eight
//! daemons listen already) queues for one on a connection of its own ([`SlotWaiter`]),
//! and keeps polling. Postgres grants a lock in the order it was asked for: from the
//! moment the daemon waits, a writer's try for that slot fails as if it were held, and
//! writers ring; once the silent transactions before it end, the slot is the daemon's
//! (held on that connection), and the poll made right after reads their commits. Until
//! session 79 such a daemon tried again at each poll, polling every `--busy-poll-ms` for
//! [`LINGER`] after the last change it found and then at the poll interval, so that while
//! a silent transaction stayed open every `auto` write was seen only at the next poll.
//!
//! Nothing here can lose a commit: a silent commit is in the changelog, and a poll reads
//! it. What a wrong decision costs is time.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;

use super::applier::{second_connection, timed, Second};
use super::server::Server;
use super::{error_chain, Error, SyncConfig};

/// Takes the first free slot of the eight, exclusively, for the session: its number, or
/// no row. The advisory locks' first key is 'prmd'; eight daemons can listen at once.
pub(crate) const TAKE_SLOT: &str = "SELECT s FROM generate_series(0, 7) s \
     WHERE pg_try_advisory_lock(1886547300, s) LIMIT 1";
/// Lets the slot go (`$1`).
pub(crate) const LEAVE_SLOT: &str = "SELECT pg_advisory_unlock(1886547300, $1)";
/// The slot a daemon that found none free waits for: the first that no daemon of this
/// database holds or waits for, else the first (eight daemons listen: it waits for one
/// to let its slot go).
const SLOT_TO_WAIT_FOR: &str = "SELECT coalesce(min(s), 0) FROM generate_series(0, 7) s \
     WHERE NOT EXISTS (SELECT FROM pg_locks l WHERE l.locktype = 'advisory' \
         AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
         AND l.classid = 1886547300 AND l.objid = s::oid AND l.objsubid = 2 \
         AND l.mode = 'ExclusiveLock')";
/// Waits for slot `$1`, for the session, for as long as it takes. Two daemons that looked
/// at once may wait for the same slot: the one that did not get it waits on while the
/// other listens (writers ring for that one, and it hears them too), and takes the slot
/// when the other lets it go. A wait the operator's `statement_timeout` cancels is begun
/// again.
const WAIT_FOR_SLOT: &str = "SELECT pg_advisory_lock(1886547300, $1)";
/// The waiting connection's settings: no `lock_timeout` (the sync connection's, half the
/// query timeout, would end the wait, and writers would go silent until it began again),
/// and a wait let go (the daemon leaves, or its session ends) must leave the lock's queue
/// at once, or writers would ring on for it: Postgres, waiting for a lock, notices a
/// client gone only at `client_connection_check_interval`'s checks (14 and later; an
/// older server keeps the wait until the lock is granted, and lets it go then).
const WAITER_SETTINGS: &str = "SET lock_timeout = 0; \
     SELECT set_config(name, '50', false) FROM pg_settings \
         WHERE name = 'client_connection_check_interval'";
/// Cancels the wait of the server process `$1` (the waiting connection's), let go: a
/// pooler between (PgBouncer) keeps a server connection whose client left mid-query,
/// and the wait with it, until the lock is granted. A role may cancel its own sessions'
/// statements.
pub(crate) const CANCEL_WAIT: &str = "SELECT pg_cancel_backend($1)";
/// How long after a connection that waited for a slot failed another may be opened.
pub(crate) const WAITER_RETRY: Duration = Duration::from_secs(10);
/// A failure of that connection within this long of the last is logged at debug, not
/// info: where permd's role may open no more connections, it would be said every
/// [`WAITER_RETRY`].
pub(crate) const WAITER_QUIET: Duration = Duration::from_secs(600);

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
/// How long a daemon whose polls fell behind listens, however fast writers ring: a poll
/// that reads a full batch (`--batch-rows`, 10,000) read less than was committed
/// meanwhile, and notifications, applied as they arrive with their rows, follow faster
/// (the writers then pace themselves on NOTIFY's lock, too). Large transactions (a
/// hundred tuples each, at 500 a second) are written faster than a poll reads them.
pub(crate) const BEHIND_HOLD: Duration = Duration::from_secs(10);

/// Whether the daemon listens for 'auto' writers' notifications, and when to stop.
#[derive(Debug)]
pub(crate) struct Busy {
    /// `--busy-poll-ms`; `None`: always listen (0).
    interval: Option<Duration>,
    /// The slot held: listening.
    slot: Option<i32>,
    /// Waiting for a slot, none held ([`SlotWaiter`]): writers ring meanwhile.
    waiting: bool,
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
    /// Until when it listens however fast writers ring: its polls fell behind
    /// ([`BEHIND_HOLD`]).
    hold_until: Option<Instant>,
}

impl Busy {
    /// A session's start: no slot yet, one tried for before its first poll.
    pub(crate) fn new(interval: Option<Duration>) -> Self {
        Self {
            interval,
            slot: None,
            waiting: false,
            rings: VecDeque::with_capacity(BUSY_RINGS),
            last_xid: 0,
            last_change: None,
            left_at: None,
            found: VecDeque::new(),
            hold_until: None,
        }
    }

    /// A notification of transaction `xid`, an 'auto' writer's, arrived at `now`; true
    /// when it is time to poll instead of listening, or of waiting to
    /// ([`Self::leave`]).
    pub(crate) fn heard(&mut self, xid: u64, now: Instant) -> bool {
        let rung = self.slot.is_some() || self.waiting;
        let held = self.hold_until.is_some_and(|until| now < until);
        if self.interval.is_none() || !rung || held || xid == self.last_xid {
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

    /// Stops listening, or waiting to, at `now`: the slot to let go, if one is held.
    pub(crate) fn leave(&mut self, now: Instant) -> Option<i32> {
        self.rings.clear();
        let waited = std::mem::take(&mut self.waiting);
        let slot = self.slot.take();
        if slot.is_some() || waited {
            self.last_change = Some(now);
            self.left_at = Some(now);
            self.found.clear();
        }
        slot
    }

    /// A poll at `now` read a full batch: the daemon is behind by that much at least,
    /// and listens for [`BEHIND_HOLD`] from now, however fast writers ring. True when it
    /// holds no slot and waits for none: time to try for one.
    pub(crate) fn behind(&mut self, now: Instant) -> bool {
        if self.interval.is_none() {
            return false;
        }
        self.hold_until = Some(now + BEHIND_HOLD);
        self.rings.clear();
        self.slot.is_none() && !self.waiting
    }

    /// Waits for a slot from now on ([`SlotWaiter`]): writers ring, and are counted as
    /// if it listened.
    pub(crate) fn queued(&mut self) {
        self.waiting = self.slot.is_none();
    }

    /// Whether it waits for a slot.
    pub(crate) fn waiting(&self) -> bool {
        self.waiting
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

    /// The try for a slot at `now` gave `slot` (or the wait for one did, or the slot
    /// was lost with its connection: `None`). None at a session's start: polling, as if
    /// the slot had just been let go (silent transactions are open).
    pub(crate) fn took(&mut self, slot: Option<i32>, now: Instant) {
        self.slot = slot;
        self.waiting = false;
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

/// A connection of its own that waits for a slot, and holds it once taken, for a daemon
/// that found none free: writers ring while it waits (Postgres grants the lock in turn,
/// so their tries fail), and the slot is the daemon's once every silent transaction
/// before it has ended. Dropped, it lets the slot or the wait go with its connection.
#[derive(Debug)]
pub(crate) struct SlotWaiter {
    /// The slot, once taken.
    taken: oneshot::Receiver<i32>,
    /// The slot received.
    slot: Option<i32>,
    /// The slot received was given to the daemon ([`Self::took`]).
    held: bool,
    /// The task ended without sending a slot (`taken` is not to be awaited again).
    closed: bool,
    /// Its connection's task: ends with the connection, or with an error.
    task: JoinHandle<()>,
    /// Its server process (`pg_backend_pid()`; 0 until known).
    process: Arc<AtomicI32>,
}

impl Drop for SlotWaiter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SlotWaiter {
    /// Opens the connection (to `server`, the sync connection's, with permd's settings
    /// `own`) and waits. Its failure is logged at info if `say`, else at debug.
    pub(crate) fn spawn(
        config: SyncConfig,
        own: String,
        server: Option<Server>,
        say: bool,
    ) -> Self {
        let (taken, slot) = oneshot::channel();
        let process = Arc::new(AtomicI32::new(0));
        let its = Arc::clone(&process);
        let task = tokio::spawn(async move {
            let waited = wait_for_a_slot(&config, &own, server.as_ref(), taken, &its);
            if let Err(error) = waited.await {
                const FAILED: &str = "the connection that waits for a busy slot, or holds it, \
                     failed: polling for writers with permd.notify = auto until a slot is free";
                let error = error_chain(&error);
                if say {
                    tracing::info!(error, "{FAILED}");
                } else {
                    tracing::debug!(error, "{FAILED}");
                }
            }
        });
        Self {
            taken: slot,
            slot: None,
            held: false,
            closed: false,
            task,
            process,
        }
    }

    /// The server process that waits for the slot (not once taken), for
    /// [`CANCEL_WAIT`] when the wait is let go.
    pub(crate) fn waiting_process(&self) -> Option<i32> {
        let process = self.process.load(Ordering::Relaxed);
        (!self.held && self.slot.is_none() && !self.closed && process != 0).then_some(process)
    }

    /// The slot, if it was taken since the last call.
    pub(crate) fn took(&mut self) -> Option<i32> {
        if self.held || self.closed {
            return None;
        }
        if self.slot.is_none() {
            match self.taken.try_recv() {
                Ok(slot) => self.slot = Some(slot),
                Err(oneshot::error::TryRecvError::Closed) => self.closed = true,
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
        }
        self.held = self.slot.is_some();
        self.slot
    }

    /// Until the slot is taken, for [`Self::took`] to give; never once it was given
    /// (cancel-safe).
    pub(crate) async fn taking(&mut self) {
        if self.held || self.closed {
            return std::future::pending().await;
        }
        if self.slot.is_none() {
            match (&mut self.taken).await {
                Ok(slot) => self.slot = Some(slot),
                // Its task ended without one: the next poll finds it ended.
                Err(_) => {
                    self.closed = true;
                    std::future::pending::<()>().await;
                }
            }
        }
    }

    /// Whether its connection ended: the slot, held or waited for, is gone.
    pub(crate) fn ended(&self) -> bool {
        self.closed || self.task.is_finished()
    }

    /// Whether it holds the slot.
    pub(crate) fn held(&self) -> bool {
        self.held
    }
}

/// [`SlotWaiter`]'s connection: waits for a slot, sends it through `taken`, and holds it
/// until the connection ends (an error) or the task is dropped.
async fn wait_for_a_slot(
    config: &SyncConfig,
    own: &str,
    server: Option<&Server>,
    taken: oneshot::Sender<i32>,
    process: &AtomicI32,
) -> Result<(), Error> {
    let (client, _tap, driver) = second_connection(config, own, server, Second::Slot).await?;
    let limit = config.query_timeout;
    timed(
        limit,
        "the busy slot's settings",
        client.batch_execute(WAITER_SETTINGS),
    )
    .await?;
    let its: i32 = timed(
        limit,
        "the busy slot's process",
        client.query_one("SELECT pg_backend_pid()", &[]),
    )
    .await?
    .try_get(0)?;
    process.store(its, Ordering::Relaxed);
    let slot = loop {
        let slot: i32 = timed(
            limit,
            "the slot to wait for",
            client.query_one(SLOT_TO_WAIT_FOR, &[]),
        )
        .await?
        .try_get(0)?;
        tracing::debug!(slot, "waiting for a busy slot");
        match client.query_one(WAIT_FOR_SLOT, &[&slot]).await {
            Ok(_) => break slot,
            Err(error) if error.code() == Some(&SqlState::QUERY_CANCELED) => {}
            Err(error) => return Err(error.into()),
        }
    };
    if taken.send(slot).is_err() {
        return Ok(());
    }
    // Held for as long as the connection is open: `client` lives as long.
    let _ = driver.await;
    drop(client);
    Err(Error::Closed)
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
    fn a_daemon_waiting_for_a_slot_counts_rings_as_if_it_listened() {
        let at = Instant::now();
        let mut busy = Busy::new(Some(2 * MS));
        busy.took(None, at);
        // Neither listening nor waiting: not counted.
        assert!(!(0..BUSY_RINGS as u32).any(|i| busy.heard(u64::from(i) + 10, at + i * MS)));
        busy.queued();
        assert!(busy.waiting() && busy.polling());
        let heard: Vec<bool> = (0..BUSY_RINGS as u32)
            .map(|i| busy.heard(u64::from(i) + 100, at + i * MS))
            .collect();
        assert!(heard[..BUSY_RINGS - 1].iter().all(|busy| !busy));
        assert!(heard[BUSY_RINGS - 1]);
        // The wait let go: no slot to let go, and a whole window of polls before calm.
        assert_eq!(busy.leave(at + 50 * MS), None);
        assert!(!busy.waiting() && busy.polling());
        assert!(!busy.after_poll(0, at + 100 * MS));
        assert!(busy.after_poll(0, at + 150 * MS));
        // The slot waited for, taken.
        busy.queued();
        busy.took(Some(2), at + 151 * MS);
        assert!(!busy.waiting() && !busy.polling());
        // Lost with its connection: polling, as if just let go.
        busy.took(None, at + 160 * MS);
        assert!(busy.polling());
        assert!(!busy.after_poll(0, at + 200 * MS));
        assert!(busy.after_poll(0, at + 260 * MS));
    }

    #[test]
    fn polls_that_fall_behind_make_the_daemon_listen_however_fast_writers_ring() {
        let (mut busy, at) = listening(Some(2 * MS));
        assert_eq!(busy.leave(at), Some(3));
        // A full batch while polling: time to try for a slot.
        assert!(busy.behind(at + 10 * MS));
        busy.queued();
        // Already waiting: nothing more to do.
        assert!(!busy.behind(at + 11 * MS));
        busy.took(Some(4), at + 12 * MS);
        // Rings as fast as they come do not make it leave for BEHIND_HOLD.
        let fast = |busy: &mut Busy, from: Instant| {
            (0..BUSY_RINGS as u32 * 2).any(|i| busy.heard(u64::from(i) + 10_000, from + i * MS / 4))
        };
        assert!(!fast(&mut busy, at + 20 * MS));
        assert!(!fast(&mut busy, at + 9900 * MS));
        // A later full batch holds it longer.
        assert!(!busy.behind(at + 5000 * MS));
        assert!(!fast(&mut busy, at + 14 * 1000 * MS));
        assert!(fast(&mut busy, at + 15 * 1000 * MS + 10 * MS));
        // Always listening: nothing to hold.
        let (mut always, at) = listening(None);
        assert!(!always.behind(at));
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
