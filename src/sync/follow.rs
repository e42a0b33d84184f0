//! Changes carried by the notifications (migration 0005): a commit applied as soon as its
//! notification arrives, without the poll's round trip.
//!
//! Each statement that writes `permd.tuples` or `permd.limits` notifies with its rows (or,
//! for a statement too large for a notification, with its xid alone). Postgres delivers
//! the notifications of different transactions in the order they committed, those of one
//! transaction in the order they were sent, and serializes notifying commits so that a
//! snapshot sees a prefix of that order. Applying the rows in that order moves every row
//! of the mirror forward, one commit at a time. The changelog stays the source of truth:
//! the poll still reads every change, moves the cursor and the watermark, and re-reads
//! the current rows of each changed key, and a notification is only ever a shortcut.
//!
//! Two things must never happen: a notification applied over a newer state (a row going
//! back in time), and a commit applied while an earlier commit's change is missing
//! (someone removed from a group before a document was shared with the group: the share
//! must not be seen without the removal). So the [`Follower`] decides, for each
//! notification, in the order they arrive:
//! - a notification arrives while no poll is in flight (the applier reads them between
//!   polls), so every change applied from one is seen by the next poll's snapshot, and a
//!   poll's re-read rows never move a key back;
//! - a notification whose transaction a recent poll's snapshot saw is applied only to the
//!   keys that poll did not re-read (those already hold it, or something newer);
//! - a notification without rows, one the recent polls cannot place, or a lost one
//!   (connection or channel) suspends following: notifications are then dropped, and
//!   polls alone update the mirror as before, until a caught-up poll has read every
//!   dropped commit from the changelog.

use std::collections::{HashMap, HashSet, VecDeque};

use serde::Deserialize;

use super::{parse_xid, Error, Status};
use crate::store::{Store, TupleRow};

/// How many polls' snapshots and re-read keys are kept to place a late notification.
const HISTORY: usize = 16;

/// A Postgres snapshot, from `pg_current_snapshot()::text`: which transactions it sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Snapshot {
    xmin: u64,
    xmax: u64,
    /// Transactions in progress when it was taken, between `xmin` and `xmax`.
    xip: Vec<u64>,
}

impl Snapshot {
    /// Parses `xmin:xmax:xip,xip,...`.
    pub(crate) fn parse(text: &str) -> Result<Self, Error> {
        let bad = || Error::Protocol(format!("not a snapshot: {text:?}"));
        let mut parts = text.split(':');
        let (Some(xmin), Some(xmax), Some(xip), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        Ok(Self {
            xmin: parse_xid(xmin)?,
            xmax: parse_xid(xmax)?,
            xip: xip
                .split(',')
                .filter(|x| !x.is_empty())
                .map(parse_xid)
                .collect::<Result<_, _>>()?,
        })
    }

    /// Every transaction below it has ended.
    pub(crate) fn xmin(&self) -> u64 {
        self.xmin
    }

    /// Whether a transaction that committed is visible in this snapshot.
    pub(crate) fn sees(&self, xid: u64) -> bool {
        xid < self.xmin || (xid < self.xmax && !self.xip.contains(&xid))
    }
}

/// What the applier replaces as a whole: one (subject, object) pair's tuples, or one
/// subject's limits.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Key {
    Grant(String, String),
    Limits(String),
}

/// One statement's notification.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Heard {
    xid: u64,
    /// `None`: too large to carry, a TRUNCATE or a reload request: read it from the
    /// changelog.
    change: Option<Change>,
}

/// A statement's rows: those gone, then those there after it (an UPDATE has both).
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct Change {
    /// (subject, object, permission).
    tuples_gone: Vec<(String, String, String)>,
    /// (subject, object, permission, expires_at in µs since the epoch).
    tuples_came: Vec<(String, String, String, Option<i64>)>,
    /// (subject, name).
    limits_gone: Vec<(String, String)>,
    /// (subject, name, value).
    limits_came: Vec<(String, String, i64)>,
}

#[derive(Deserialize)]
struct Payload {
    x: String,
    k: Option<String>,
    d: Option<serde_json::Value>,
    u: Option<serde_json::Value>,
}

impl Heard {
    /// Reads a notification's payload; `None` when it is not one of ours (an empty
    /// payload from an older trigger, anyone's NOTIFY on the channel).
    pub(crate) fn parse(payload: &str) -> Option<Self> {
        let p: Payload = serde_json::from_str(payload).ok()?;
        let xid = parse_xid(&p.x).ok()?;
        let rows = |v: Option<serde_json::Value>| v.filter(|v| !v.is_null());
        let (gone, came) = (rows(p.d), rows(p.u));
        let change = match p.k.as_deref() {
            None => None,
            Some("t") => Some(Change {
                tuples_gone: list(gone)?,
                tuples_came: list(came)?,
                ..Change::default()
            }),
            Some("l") => Some(Change {
                limits_gone: list(gone)?,
                limits_came: list(came)?,
                ..Change::default()
            }),
            Some(_) => return None,
        };
        Some(Self { xid, change })
    }
}

/// A JSON array of rows (absent: none).
fn list<T: serde::de::DeserializeOwned>(value: Option<serde_json::Value>) -> Option<Vec<T>> {
    value.map_or(Some(Vec::new()), |v| serde_json::from_value(v).ok())
}

impl Change {
    /// Drops the rows of the keys `skip` says are already newer in the mirror.
    fn without(mut self, skip: impl Fn(&Key) -> bool) -> Self {
        let grant = |s: &String, o: &String| !skip(&Key::Grant(s.clone(), o.clone()));
        let limits = |s: &String| !skip(&Key::Limits(s.clone()));
        self.tuples_gone.retain(|(s, o, _)| grant(s, o));
        self.tuples_came.retain(|(s, o, _, _)| grant(s, o));
        self.limits_gone.retain(|(s, _)| limits(s));
        self.limits_came.retain(|(s, _, _)| limits(s));
        self
    }

    /// Applies the statement to the mirror: each key it touches is rewritten once, from
    /// its stored rows, so a check sees the key before or after, never in between.
    pub(crate) fn apply(self, store: &Store) {
        let mut grants: HashMap<(String, String), Vec<TupleRow>> = HashMap::new();
        for (s, o, permission) in self.tuples_gone {
            stored(&mut grants, (s, o), |(s, o)| store.grant_rows(s, o))
                .retain(|r| r.permission != permission);
        }
        for (s, o, permission, expires_at) in self.tuples_came {
            let rows = stored(&mut grants, (s, o), |(s, o)| store.grant_rows(s, o));
            rows.retain(|r| r.permission != permission);
            rows.push(TupleRow {
                permission,
                expires_at,
            });
        }
        for ((s, o), rows) in grants {
            store.set_grant(&s, &o, &rows);
        }
        let mut limits: HashMap<String, Vec<(String, i64)>> = HashMap::new();
        for (s, name) in self.limits_gone {
            stored(&mut limits, s, |s| store.limit_rows(s)).retain(|(n, _)| *n != name);
        }
        for (s, name, value) in self.limits_came {
            let rows = stored(&mut limits, s, |s| store.limit_rows(s));
            rows.retain(|(n, _)| *n != name);
            rows.push((name, value));
        }
        for (s, rows) in limits {
            store.set_limits(&s, &rows);
        }
    }
}

/// The rows of `key` being rewritten, read from the mirror the first time.
fn stored<K: Eq + std::hash::Hash, R>(
    keys: &mut HashMap<K, Vec<R>>,
    key: K,
    read: impl FnOnce(&K) -> Vec<R>,
) -> &mut Vec<R> {
    keys.entry(key).or_insert_with_key(read)
}

/// What a poll or a load re-read at its snapshot.
#[derive(Debug)]
enum Reread {
    /// A full load: every key.
    All,
    Keys(HashSet<Key>),
}

/// Whether notifications are being applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Following,
    /// Dropping notifications until the polls have caught up with every dropped commit.
    Suspended {
        /// The newest dropped transaction (`None`: none known).
        dropped: Option<u64>,
        /// Notifications were lost without being seen (a new connection, a full
        /// channel): only a poll with no committed change left above its horizon covers
        /// them.
        unknown: bool,
    },
}

/// What to do with one notification.
#[derive(Debug, PartialEq)]
pub(crate) enum Verdict {
    /// Apply these rows now.
    Apply(Change),
    /// Everything in it is already in the mirror.
    Skip,
    /// Following is suspended: poll, as for a plain doorbell.
    Poll,
}

/// Decides which notifications may be applied, from the recent polls (module docs).
pub(crate) struct Follower {
    /// The recent polls' and loads' snapshots and what each re-read, oldest first.
    history: VecDeque<(Snapshot, Reread)>,
    /// Polls before `history` were applied and forgotten.
    forgotten: bool,
    mode: Mode,
    /// Where `following` is reported.
    status: Status,
}

impl Follower {
    /// A new connection: notifications sent before its LISTEN are lost, so following
    /// waits for a full load or a caught-up poll. Reports into `status`.
    pub(crate) fn new(status: Status) -> Self {
        status.set_following(false);
        Self {
            history: VecDeque::new(),
            forgotten: true,
            mode: Mode::Suspended {
                dropped: None,
                unknown: true,
            },
            status,
        }
    }

    fn set_mode(&mut self, mode: Mode) {
        self.mode = mode;
        self.status.set_following(mode == Mode::Following);
    }

    /// Whether notifications are being applied.
    pub(crate) fn following(&self) -> bool {
        self.mode == Mode::Following
    }

    /// A notification, in the order they arrived.
    pub(crate) fn heard(&mut self, heard: Option<Heard>) -> Verdict {
        let Some(heard) = heard else {
            self.suspend(None);
            return Verdict::Poll;
        };
        if !self.following() {
            self.suspend(Some(heard.xid));
            return Verdict::Poll;
        }
        let Some(change) = heard.change else {
            self.suspend(Some(heard.xid));
            return Verdict::Poll;
        };
        let seen: Vec<&Reread> = self
            .history
            .iter()
            .filter(|(snapshot, _)| snapshot.sees(heard.xid))
            .map(|(_, reread)| reread)
            .collect();
        if seen.iter().any(|r| matches!(r, Reread::All)) {
            return Verdict::Skip;
        }
        let oldest_saw = self
            .history
            .front()
            .is_some_and(|(snapshot, _)| snapshot.sees(heard.xid));
        if self.forgotten && oldest_saw {
            // A poll we no longer remember may have re-read its keys.
            self.suspend(Some(heard.xid));
            return Verdict::Poll;
        }
        if seen.is_empty() {
            // The common case: no poll has seen it yet, every row applies.
            return Verdict::Apply(change);
        }
        let change = change.without(|key| {
            seen.iter()
                .any(|r| matches!(r, Reread::Keys(keys) if keys.contains(key)))
        });
        Verdict::Apply(change)
    }

    /// Notifications were lost (the channel to the applier was full).
    pub(crate) fn lost(&mut self) {
        self.suspend(None);
    }

    fn suspend(&mut self, xid: Option<u64>) {
        let (dropped, unknown) = match self.mode {
            Mode::Following => (None, false),
            Mode::Suspended { dropped, unknown } => (dropped, unknown),
        };
        self.set_mode(Mode::Suspended {
            dropped: dropped.max(xid),
            unknown: unknown || xid.is_none(),
        });
    }

    /// A full load was swapped in: the mirror is the database at `snapshot`.
    pub(crate) fn loaded(&mut self, snapshot: Snapshot) {
        self.history.clear();
        self.history.push_back((snapshot, Reread::All));
        self.forgotten = false;
        self.set_mode(Mode::Following);
    }

    /// A poll at `snapshot` re-read `keys`. `caught_up`: it read everything below its
    /// horizon; `pending`: committed changes wait above it (an older transaction is
    /// still open).
    pub(crate) fn polled(
        &mut self,
        snapshot: Snapshot,
        keys: HashSet<Key>,
        caught_up: bool,
        pending: bool,
    ) {
        if let Mode::Suspended { dropped, unknown } = self.mode {
            // Every dropped notification arrived before this poll was sent, so its
            // transaction is in the snapshot. With nothing committed left above the
            // horizon, the poll has read every such transaction; otherwise every dropped
            // one must be below the horizon.
            let covered = caught_up
                && (!pending || (!unknown && dropped.map_or(true, |x| x < snapshot.xmin)));
            if covered {
                self.set_mode(Mode::Following);
            }
        }
        self.history.push_back((snapshot, Reread::Keys(keys)));
        if self.history.len() > HISTORY {
            self.history.pop_front();
            self.forgotten = true;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn snapshot(text: &str) -> Snapshot {
        Snapshot::parse(text).unwrap()
    }

    fn tuple(subject: &str, object: &str, xid: u64) -> Heard {
        Heard {
            xid,
            change: Some(Change {
                tuples_came: vec![(subject.into(), object.into(), "read".into(), None)],
                ..Change::default()
            }),
        }
    }

    fn keys(list: &[(&str, &str)]) -> HashSet<Key> {
        list.iter()
            .map(|(s, o)| Key::Grant((*s).into(), (*o).into()))
            .collect()
    }

    #[test]
    fn a_snapshot_sees_what_ended_before_it() {
        let s = snapshot("100:105:100,103");
        assert!(s.sees(99));
        assert!(!s.sees(100));
        assert!(s.sees(101));
        assert!(!s.sees(103));
        assert!(s.sees(104));
        assert!(!s.sees(105));
        assert_eq!(
            snapshot("7:7:"),
            Snapshot {
                xmin: 7,
                xmax: 7,
                xip: vec![]
            }
        );
        assert!(Snapshot::parse("7:7").is_err());
        assert!(Snapshot::parse("a:7:").is_err());
    }

    #[test]
    fn payloads_parse_as_the_triggers_write_them() {
        let heard = Heard::parse(
            r#"{"x" : "812", "n" : 4, "k" : "t", "d" : [["u", "doc", "read"]], "u" : [["u", "doc", "write", 17], ["u", "", "admin", null]]}"#,
        )
        .unwrap();
        assert_eq!(heard.xid, 812);
        let change = heard.change.unwrap();
        assert_eq!(
            change.tuples_gone,
            vec![("u".into(), "doc".into(), "read".into())]
        );
        assert_eq!(change.tuples_came.len(), 2);
        assert_eq!(change.tuples_came[0].3, Some(17));
        let limits = Heard::parse(
            r#"{"x" : "9", "n" : 1, "k" : "l", "d" : null, "u" : [["u", "projects", 10]]}"#,
        )
        .unwrap();
        assert_eq!(
            limits.change.unwrap().limits_came,
            vec![("u".into(), "projects".into(), 10)]
        );
        // Too large to carry, or a TRUNCATE: the xid alone.
        assert_eq!(
            Heard::parse(r#"{"x" : "9", "n" : 1}"#),
            Some(Heard {
                xid: 9,
                change: None
            })
        );
        // Not ours.
        assert_eq!(Heard::parse(""), None);
        assert_eq!(Heard::parse(r#"{"x" : "9", "k" : "t", "u" : [[1]]}"#), None);
    }

    #[test]
    fn a_new_connection_follows_after_a_load_or_a_poll_with_nothing_waiting() {
        let mut f = Follower::new(Status::default());
        assert_eq!(f.heard(Some(tuple("u", "doc", 10))), Verdict::Poll);
        // Changes wait above the horizon: what was lost before LISTEN may be among them.
        f.polled(snapshot("9:12:9"), HashSet::new(), true, true);
        assert!(!f.following());
        f.polled(snapshot("12:12:"), HashSet::new(), true, false);
        assert!(f.following());

        let mut f = Follower::new(Status::default());
        f.loaded(snapshot("20:22:20"));
        assert!(f.following());
        // Seen by the load: already in the mirror.
        assert_eq!(f.heard(Some(tuple("u", "doc", 21))), Verdict::Skip);
        assert!(matches!(
            f.heard(Some(tuple("u", "doc", 20))),
            Verdict::Apply(_)
        ));
    }

    #[test]
    fn a_late_notification_skips_the_keys_a_poll_that_saw_it_re_read() {
        let mut f = Follower::new(Status::default());
        f.loaded(snapshot("10:10:"));
        f.polled(snapshot("12:15:12"), keys(&[("a", "doc")]), true, true);
        let change = Change {
            tuples_came: vec![
                ("a".into(), "doc".into(), "read".into(), None),
                ("b".into(), "doc".into(), "read".into(), None),
            ],
            ..Change::default()
        };
        let verdict = f.heard(Some(Heard {
            xid: 13,
            change: Some(change),
        }));
        let Verdict::Apply(change) = verdict else {
            panic!("{verdict:?}")
        };
        assert_eq!(
            change.tuples_came,
            vec![("b".into(), "doc".into(), "read".into(), None)]
        );
        // Not seen by any poll: applied whole.
        let Verdict::Apply(change) = f.heard(Some(tuple("a", "doc", 15))) else {
            panic!()
        };
        assert_eq!(change.tuples_came.len(), 1);
    }

    #[test]
    fn rows_that_must_come_from_the_changelog_suspend_following_until_a_poll_read_them() {
        let mut f = Follower::new(Status::default());
        f.loaded(snapshot("10:10:"));
        assert_eq!(
            f.heard(Some(Heard {
                xid: 11,
                change: None
            })),
            Verdict::Poll
        );
        // Later commits are dropped, not applied before 11's rows.
        assert_eq!(f.heard(Some(tuple("u", "doc", 12))), Verdict::Poll);
        // A poll whose horizon is not past 12 (and with changes waiting) does not resume.
        f.polled(snapshot("12:14:12"), HashSet::new(), true, true);
        assert!(!f.following());
        // Nor does a batch that did not reach its horizon.
        f.polled(snapshot("13:14:"), HashSet::new(), false, true);
        assert!(!f.following());
        f.polled(snapshot("13:14:"), HashSet::new(), true, true);
        assert!(f.following());
    }

    #[test]
    fn a_notification_older_than_the_remembered_polls_suspends_following() {
        let mut f = Follower::new(Status::default());
        f.loaded(snapshot("10:10:"));
        for x in 0..=HISTORY as u64 {
            f.polled(
                snapshot(&format!("{}:{}:", 11 + x, 11 + x)),
                HashSet::new(),
                true,
                false,
            );
        }
        assert_eq!(f.heard(Some(tuple("u", "doc", 10))), Verdict::Poll);
        assert!(!f.following());
        let mut f = Follower::new(Status::default());
        f.loaded(snapshot("10:10:"));
        f.lost();
        assert!(!f.following());
        assert_eq!(f.heard(None), Verdict::Poll);
    }
}
