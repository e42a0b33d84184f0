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
//!
//! Anyone who can connect to the database can NOTIFY on the channel and LISTEN to it, so
//! rows are taken only from a notification signed with the key in `permd.notify_key`
//! (migration 0006), and a signed notification sent again (a replay: a grant's
//! notification after the grant was revoked) is refused. Both are treated as a
//! notification that cannot be placed: they suspend following, and the poll reads what
//! really committed.

use std::collections::{HashMap, HashSet, VecDeque};

use hmac::{Hmac, KeyInit, Mac};
use serde::Deserialize;
use serde_json::value::RawValue;
use sha2::Sha256;

use super::{parse_xid, Status};
use crate::shard::Shard;
use crate::store::{Edit, Snapshot, Store, TupleRow};

/// How many polls' snapshots and re-read keys are kept to place a late notification.
const HISTORY: usize = 16;
/// How many ended transactions are remembered, to refuse a replay of one, until a
/// caught-up poll reads them. Only commits faster than the polls can read them make this
/// many; past it following is suspended until a poll has caught up.
const ENDED_MAX: usize = 100_000;
/// A signature: 64 hex digits of HMAC-SHA256, before the JSON.
const TAG_LEN: usize = 64;

/// The key that signs the notifications that carry rows (migration 0006), read from
/// `permd.notify_key`. Never printed.
#[derive(Clone)]
pub(crate) struct NotifyKey(Hmac<Sha256>);

impl NotifyKey {
    /// From the stored inner pad (the key XOR 0x36 in every byte, as HMAC pads it);
    /// `None` unless it is the 64 bytes of a SHA-256 block.
    pub(crate) fn from_inner_pad(pad: &[u8]) -> Option<Self> {
        if pad.len() != 64 {
            return None;
        }
        let key: Vec<u8> = pad.iter().map(|b| b ^ 0x36).collect();
        Hmac::new_from_slice(&key).ok().map(Self)
    }

    /// Whether `tag` (hex) is the signature of `body`, compared in constant time.
    fn signed(&self, body: &str, tag: &str) -> bool {
        let Ok(tag) = hex::decode(tag) else {
            return false;
        };
        let mut mac = self.0.clone();
        mac.update(body.as_bytes());
        mac.verify_slice(&tag).is_ok()
    }
}

impl std::fmt::Debug for NotifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NotifyKey(..)")
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
    /// The statement's number in its transaction (0 when absent).
    statement: u64,
    /// Sent by a writer with `permd.notify = 'auto'` (migration 0010), which rings only
    /// while a daemon listens.
    auto: bool,
    /// `None`: too large to carry, a TRUNCATE or a reload request: read it from the
    /// changelog.
    change: Option<Change>,
}

/// Why a notification is not taken as one of ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Not what permd's triggers send: an empty payload from an older trigger, anyone's
    /// NOTIFY on the channel.
    Unreadable,
    /// Rows without a signature that verifies under the key permd read: forged, sent by
    /// triggers older than migration 0006, or signed under a key rotated since.
    Unsigned,
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
struct Payload<'a> {
    x: &'a str,
    n: Option<u64>,
    a: Option<bool>,
    k: Option<&'a str>,
    #[serde(borrow)]
    d: Option<&'a RawValue>,
    #[serde(borrow)]
    u: Option<&'a RawValue>,
}

impl Heard {
    /// Reads a notification's payload: the JSON alone, or (with rows) a signature under
    /// `key` and then the JSON.
    pub(crate) fn parse(payload: &str, key: Option<&NotifyKey>) -> Result<Self, Refused> {
        let (tag, body) = if payload.starts_with('{') {
            (None, payload)
        } else {
            match (payload.get(..TAG_LEN), payload.get(TAG_LEN..)) {
                (Some(tag), Some(body)) => (Some(tag), body),
                _ => return Err(Refused::Unreadable),
            }
        };
        let p: Payload = serde_json::from_str(body).map_err(|_| Refused::Unreadable)?;
        let xid = parse_xid(p.x).map_err(|_| Refused::Unreadable)?;
        let statement = p.n.unwrap_or(0);
        let auto = p.a.unwrap_or(false);
        let Some(kind) = p.k else {
            return Ok(Self {
                xid,
                statement,
                auto,
                change: None,
            });
        };
        if !tag.zip(key).is_some_and(|(tag, key)| key.signed(body, tag)) {
            return Err(Refused::Unsigned);
        }
        let change = match kind {
            "t" => Change {
                tuples_gone: rows(p.d)?,
                tuples_came: rows(p.u)?,
                ..Change::default()
            },
            "l" => Change {
                limits_gone: rows(p.d)?,
                limits_came: rows(p.u)?,
                ..Change::default()
            },
            _ => return Err(Refused::Unreadable),
        };
        Ok(Self {
            xid,
            statement,
            auto,
            change: Some(change),
        })
    }

    /// The transaction that sent it.
    pub(crate) fn xid(&self) -> u64 {
        self.xid
    }

    /// Whether an 'auto' writer sent it (a forged one only makes permd poll sooner).
    pub(crate) fn auto(&self) -> bool {
        self.auto
    }

    /// Whether it carries rows (and so was signed, and verified).
    pub(crate) fn has_rows(&self) -> bool {
        self.change.is_some()
    }
}

/// A JSON array of rows (absent or null: none).
fn rows<T: serde::de::DeserializeOwned>(raw: Option<&RawValue>) -> Result<Vec<T>, Refused> {
    raw.map_or(Ok(Vec::new()), |raw| {
        serde_json::from_str(raw.get()).map_err(|_| Refused::Unreadable)
    })
}

impl Change {
    /// Drops the rows of the keys `skip` says are already newer in the mirror.
    fn without(self, skip: impl Fn(&Key) -> bool) -> Self {
        self.retain(
            |s, o| !skip(&Key::Grant(s.to_owned(), o.to_owned())),
            |s| !skip(&Key::Limits(s.to_owned())),
        )
    }

    /// Keeps only the rows of `shard`'s subjects: other shards' daemons mirror the rest.
    pub(crate) fn of_shard(self, shard: Shard) -> Self {
        if shard.is_whole() {
            return self;
        }
        self.retain(|s, _| shard.owns(s), |s| shard.owns(s))
    }

    /// Keeps the tuples of the (subject, object) pairs `grant` keeps and the limits of the
    /// subjects `limits` keeps.
    fn retain(mut self, grant: impl Fn(&str, &str) -> bool, limits: impl Fn(&str) -> bool) -> Self {
        self.tuples_gone.retain(|(s, o, _)| grant(s, o));
        self.tuples_came.retain(|(s, o, _, _)| grant(s, o));
        self.limits_gone.retain(|(s, _)| limits(s));
        self.limits_came.retain(|(s, _, _)| limits(s));
        self
    }

    /// Applies the statement to the mirror: each key it touches is rewritten once, from
    /// its stored rows, so a check sees the key before or after, never in between.
    pub(crate) fn apply(self, store: &Store) {
        let grants = edits(
            self.tuples_gone.into_iter().map(|(s, o, p)| ((s, o), p)),
            self.tuples_came
                .into_iter()
                .map(|(s, o, permission, expires_at)| {
                    let row = TupleRow {
                        permission,
                        expires_at,
                    };
                    ((s, o), row)
                }),
        );
        for ((subject, object), edit) in &grants {
            store.edit_grant(subject, object, edit);
        }
        let limits = edits(
            self.limits_gone.into_iter(),
            self.limits_came
                .into_iter()
                .map(|(s, name, value)| (s, (name, value))),
        );
        for (subject, edit) in &limits {
            store.edit_limits(subject, edit);
        }
    }
}

/// The edit of each key that rows `gone` (by name) and `came` touch.
fn edits<K: Eq + std::hash::Hash, R>(
    gone: impl Iterator<Item = (K, String)>,
    came: impl Iterator<Item = (K, R)>,
) -> HashMap<K, Edit<R>> {
    let mut keys: HashMap<K, Edit<R>> = HashMap::new();
    for (key, name) in gone {
        keys.entry(key).or_default().gone.push(name);
    }
    for (key, row) in came {
        keys.entry(key).or_default().came.push(row);
    }
    keys
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
    /// Dropping notifications until a poll has caught up (and so read every dropped
    /// commit).
    Suspended,
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
    /// A transaction's signed notification again, after its own ended: a replay, refused.
    /// Following is suspended, as for `Poll`.
    Replayed,
}

/// Decides which notifications may be applied, from the recent polls (module docs).
pub(crate) struct Follower {
    /// The recent polls' and loads' snapshots and what each re-read, oldest first.
    history: VecDeque<(Snapshot, Reread)>,
    /// Polls before `history` were applied and forgotten.
    forgotten: bool,
    mode: Mode,
    /// The transaction whose signed notifications are arriving, and its last statement's
    /// number. Postgres delivers one transaction's notifications together, in order.
    current: Option<(u64, u64)>,
    /// Transactions whose signed notifications all arrived (another's came after them),
    /// until a caught-up poll or a load has read them: one of them again is a replay.
    /// (Once read, a replay is harmless: the poll that read it re-read all its keys.)
    ended: HashSet<u64>,
    /// Where `following` is reported.
    status: Status,
    /// The connection listens: on one that does not (a standby's) nothing is ever
    /// followed, whatever the polls make of the mode.
    listening: bool,
}

impl Follower {
    /// A new connection: notifications sent before its LISTEN are lost, so following
    /// waits for a full load or a caught-up poll. Reports into `status`; `listening`: the
    /// connection LISTENs (a standby's cannot).
    pub(crate) fn new(status: Status, listening: bool) -> Self {
        status.set_following(false);
        Self {
            history: VecDeque::new(),
            forgotten: true,
            mode: Mode::Suspended,
            current: None,
            ended: HashSet::new(),
            status,
            listening,
        }
    }

    fn set_mode(&mut self, mode: Mode) {
        self.mode = mode;
        self.status
            .set_following(self.listening && mode == Mode::Following);
    }

    /// Whether notifications are being applied.
    pub(crate) fn following(&self) -> bool {
        self.mode == Mode::Following
    }

    /// A notification, in the order they arrived (`None`: refused, see [`Refused`]).
    pub(crate) fn heard(&mut self, heard: Option<Heard>) -> Verdict {
        let Some(heard) = heard else {
            self.suspend();
            return Verdict::Poll;
        };
        if heard.change.is_some() && self.replayed(heard.xid, heard.statement) {
            self.suspend();
            return Verdict::Replayed;
        }
        if !self.following() {
            self.suspend();
            return Verdict::Poll;
        }
        let Some(change) = heard.change else {
            self.suspend();
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
            self.suspend();
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

    /// Whether a signed notification repeats one already heard: its transaction's
    /// notifications ended before, or it is not past its transaction's last statement.
    fn replayed(&mut self, xid: u64, statement: u64) -> bool {
        match self.current {
            Some((current, last)) if current == xid => {
                if statement <= last {
                    return true;
                }
            }
            current => {
                if self.ended.contains(&xid) {
                    return true;
                }
                if let Some((ended, _)) = current {
                    if self.ended.len() >= ENDED_MAX {
                        // Suspended until a poll has read every commit: none of the
                        // forgotten transactions can then be replayed to any effect.
                        self.ended.clear();
                        self.suspend();
                    }
                    self.ended.insert(ended);
                }
            }
        }
        self.current = Some((xid, statement));
        false
    }

    /// Notifications were lost (the channel to the applier was full).
    pub(crate) fn lost(&mut self) {
        self.suspend();
    }

    fn suspend(&mut self) {
        self.set_mode(Mode::Suspended);
    }

    /// A full load was swapped in: the mirror is the database at `snapshot`.
    pub(crate) fn loaded(&mut self, snapshot: Snapshot) {
        self.ended.retain(|&xid| !snapshot.sees(xid));
        self.history.clear();
        self.history.push_back((snapshot, Reread::All));
        self.forgotten = false;
        self.set_mode(Mode::Following);
    }

    /// A poll at `snapshot` re-read `keys`. `caught_up`: it read every transaction its
    /// snapshot sees (the mirror is the database at `snapshot`); otherwise it stopped
    /// at its batch's end.
    pub(crate) fn polled(&mut self, snapshot: Snapshot, keys: HashSet<Key>, caught_up: bool) {
        if caught_up {
            // Every dropped notification, and every one lost before the connection's
            // LISTEN, arrived (or would have) before this poll was sent: its transaction
            // had committed, so the snapshot sees it, and the poll read it.
            self.set_mode(Mode::Following);
            self.ended.retain(|&xid| !snapshot.sees(xid));
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
            statement: 1,
            auto: false,
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

    /// A key whose bytes are all 7.
    fn key() -> NotifyKey {
        NotifyKey::from_inner_pad(&[7 ^ 0x36; 64]).unwrap()
    }

    /// `body` signed as migration 0006 signs it.
    fn signed(body: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&[7; 64]).unwrap();
        mac.update(body.as_bytes());
        format!("{}{body}", hex::encode(mac.finalize().into_bytes()))
    }

    #[test]
    fn payloads_parse_as_the_triggers_write_them() {
        let key = key();
        let parse = |payload: &str| Heard::parse(payload, Some(&key));
        let heard = parse(&signed(
            r#"{"x" : "812", "n" : 4, "k" : "t", "d" : [["u", "doc", "read"]], "u" : [["u", "doc", "write", 17], ["u", "", "admin", null]]}"#,
        ))
        .unwrap();
        assert_eq!((heard.xid, heard.statement), (812, 4));
        let change = heard.change.unwrap();
        assert_eq!(
            change.tuples_gone,
            vec![("u".into(), "doc".into(), "read".into())]
        );
        assert_eq!(change.tuples_came.len(), 2);
        assert_eq!(change.tuples_came[0].3, Some(17));
        let limits = parse(&signed(
            r#"{"x" : "9", "n" : 1, "k" : "l", "d" : null, "u" : [["u", "projects", 10]]}"#,
        ))
        .unwrap();
        let limits_auto = limits.auto();
        assert_eq!(
            limits.change.unwrap().limits_came,
            vec![("u".into(), "projects".into(), 10)]
        );
        // An 'auto' writer's says so (migration 0010).
        assert!(parse(&signed(
            r#"{"x" : "9", "n" : 1, "a" : true, "k" : "t", "d" : null, "u" : [["u", "doc", "read", null]]}"#,
        ))
        .unwrap()
        .auto());
        assert!(parse(r#"{"x" : "9", "n" : 2, "a" : true}"#).unwrap().auto());
        assert!(!limits_auto);
        // Too large to carry, or a TRUNCATE: the xid alone, unsigned.
        assert_eq!(
            parse(r#"{"x" : "9", "n" : 1}"#),
            Ok(Heard {
                xid: 9,
                statement: 1,
                auto: false,
                change: None
            })
        );
        // Not ours.
        assert_eq!(parse(""), Err(Refused::Unreadable));
        assert_eq!(parse("not json"), Err(Refused::Unreadable));
        assert_eq!(
            parse(&signed(r#"{"x" : "9", "k" : "t", "u" : [[1]]}"#)),
            Err(Refused::Unreadable)
        );
    }

    #[test]
    fn rows_are_taken_only_under_a_signature_that_verifies() {
        let key = key();
        let body =
            r#"{"x" : "9", "n" : 1, "k" : "t", "d" : null, "u" : [["u", "doc", "admin", null]]}"#;
        assert!(Heard::parse(&signed(body), Some(&key)).is_ok());
        // Unsigned, or permd without the key.
        assert_eq!(Heard::parse(body, Some(&key)), Err(Refused::Unsigned));
        assert_eq!(Heard::parse(&signed(body), None), Err(Refused::Unsigned));
        // Signed under another key, a wrong tag, a body changed after signing.
        let other = NotifyKey::from_inner_pad(&[8 ^ 0x36; 64]).unwrap();
        assert_eq!(
            Heard::parse(&signed(body), Some(&other)),
            Err(Refused::Unsigned)
        );
        let zeros = format!("{}{body}", "0".repeat(64));
        assert_eq!(Heard::parse(&zeros, Some(&key)), Err(Refused::Unsigned));
        let tampered = signed(body).replace("\"u\", \"doc\"", "\"mallory\", \"doc\"");
        assert_ne!(tampered, signed(body));
        assert_eq!(Heard::parse(&tampered, Some(&key)), Err(Refused::Unsigned));
        // Not a key.
        assert!(NotifyKey::from_inner_pad(&[0; 32]).is_none());
        assert_eq!(format!("{key:?}"), "NotifyKey(..)");
    }

    #[test]
    fn a_transactions_notification_heard_again_is_a_replay() {
        let mut f = Follower::new(Status::default(), true);
        f.loaded(snapshot("10:10:"));
        let heard = |xid, statement| Heard {
            statement,
            ..tuple("u", "doc", xid)
        };
        for (xid, statement) in [(20, 1), (20, 2), (21, 1)] {
            assert!(matches!(
                f.heard(Some(heard(xid, statement))),
                Verdict::Apply(_)
            ));
        }
        // 20 ended when 21 began; 21's first statement again is no later than its last.
        assert_eq!(f.heard(Some(heard(20, 3))), Verdict::Replayed);
        assert!(!f.following());
        f.polled(snapshot("11:11:"), HashSet::new(), true);
        assert!(f.following());
        assert_eq!(f.heard(Some(heard(21, 1))), Verdict::Replayed);
        f.polled(snapshot("12:12:"), HashSet::new(), true);
        // A caught-up poll that sees them read them: forgotten, and harmless (that poll
        // re-read their keys).
        f.polled(snapshot("22:22:"), keys(&[("u", "doc")]), true);
        assert!(f.ended.is_empty());
        assert_eq!(
            f.heard(Some(heard(20, 1))),
            Verdict::Apply(Change::default())
        );
        // Past `ENDED_MAX` ended transactions, following is suspended.
        for xid in 30..30 + ENDED_MAX as u64 + 1 {
            f.heard(Some(heard(xid, 1)));
        }
        assert!(!f.following());
        assert!(f.ended.len() < ENDED_MAX);
    }

    #[test]
    fn a_new_connection_follows_after_a_load_or_a_caught_up_poll() {
        let mut f = Follower::new(Status::default(), true);
        assert_eq!(f.heard(Some(tuple("u", "doc", 10))), Verdict::Poll);
        // A batch that stopped short may not have read what was lost before LISTEN.
        f.polled(snapshot("9:12:9"), HashSet::new(), false);
        assert!(!f.following());
        // A caught-up one read every commit it sees, an older transaction open or not.
        f.polled(snapshot("9:12:9"), HashSet::new(), true);
        assert!(f.following());

        let mut f = Follower::new(Status::default(), true);
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
        let mut f = Follower::new(Status::default(), true);
        f.loaded(snapshot("10:10:"));
        f.polled(snapshot("12:15:12"), keys(&[("a", "doc")]), true);
        let change = Change {
            tuples_came: vec![
                ("a".into(), "doc".into(), "read".into(), None),
                ("b".into(), "doc".into(), "read".into(), None),
            ],
            ..Change::default()
        };
        let verdict = f.heard(Some(Heard {
            xid: 13,
            statement: 1,
            auto: false,
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
        let mut f = Follower::new(Status::default(), true);
        f.loaded(snapshot("10:10:"));
        assert_eq!(
            f.heard(Some(Heard {
                xid: 11,
                statement: 1,
                auto: false,
                change: None
            })),
            Verdict::Poll
        );
        // Later commits are dropped, not applied before 11's rows.
        assert_eq!(f.heard(Some(tuple("u", "doc", 12))), Verdict::Poll);
        // A batch that stopped short does not resume.
        f.polled(snapshot("13:14:"), HashSet::new(), false);
        assert!(!f.following());
        // A caught-up poll read 11 and 12, an older transaction open or not.
        f.polled(snapshot("9:14:9"), HashSet::new(), true);
        assert!(f.following());
    }

    #[test]
    fn a_notification_older_than_the_remembered_polls_suspends_following() {
        let mut f = Follower::new(Status::default(), true);
        f.loaded(snapshot("10:10:"));
        for x in 0..=HISTORY as u64 {
            f.polled(
                snapshot(&format!("{}:{}:", 11 + x, 11 + x)),
                HashSet::new(),
                true,
            );
        }
        assert_eq!(f.heard(Some(tuple("u", "doc", 10))), Verdict::Poll);
        assert!(!f.following());
        let mut f = Follower::new(Status::default(), true);
        f.loaded(snapshot("10:10:"));
        f.lost();
        assert!(!f.following());
        assert_eq!(f.heard(None), Verdict::Poll);
    }
}
