//! How far a standby is behind its primary, as far as the standby can tell.
//!
//! permd following a standby is as fresh as the standby. The standby knows two things
//! about its own delay that any role may read: whether a WAL receiver is streaming from
//! its primary (`pg_stat_wal_receiver` shows its `pid` to everyone; its `status` and
//! `latest_end_lsn` to `pg_read_all_stats`), and how far it has received and replayed
//! (`pg_last_wal_receive_lsn()`, `pg_last_wal_replay_lsn()`). The applier looks at them
//! once a second; [`Standby::look`] turns the looks into the latest time at which the
//! standby had replayed everything its primary had sent it:
//!
//! - at a look where the receiver streams, what it has received is taken as what the
//!   primary had (a receiver that streams is at most a network's delay behind; with
//!   `pg_read_all_stats`, the WAL end its primary last reported is taken when it is
//!   further);
//! - once replay has passed what was received at a look, the standby was current as of
//!   that look.
//!
//! So a standby whose link to its primary is broken (no receiver), or whose replay is held
//! (paused, a conflict, `recovery_min_apply_delay`) while its primary writes, stops being
//! current, and permd's lag grows with it. An idle primary sends nothing, and its standby
//! stays current: nothing waits to be replayed.
//!
//! Without `pg_read_all_stats` a receiver counts as streaming once the same one is seen at
//! two looks in a row: a receiver that cannot reach its primary lives for milliseconds,
//! one attempt every `wal_retrieve_retry_interval`. What the standby cannot tell, permd
//! cannot either: a receiver whose primary went silent without closing the connection
//! lives until `wal_receiver_timeout` (60 s by default), and a standby fed only from a WAL
//! archive (it never streamed since it started) gives no bound at all.

use std::collections::VecDeque;

use super::status::Upstream;

/// The looks kept while replay has not passed them: an hour's at one a second. When
/// replay stays behind longer, the oldest are dropped, which can only make the standby
/// look older than it is.
const MAX_LOOKS: usize = 3600;

/// What one look at the standby found.
#[derive(Debug, Clone, Copy)]
pub(super) struct Look {
    /// When the look was asked for (µs since the epoch, permd's clock).
    pub at: i64,
    /// The WAL the standby has received by streaming (or that its primary last reported
    /// having, when that is further and the role may see it); `None` when it has not
    /// streamed since it started.
    pub received: Option<i64>,
    /// The WAL the standby has replayed.
    pub replayed: Option<i64>,
    /// The WAL receiver's process id, when there is one.
    pub receiver: Option<i32>,
    /// Whether the receiver is streaming, when the role may see its status.
    pub streaming: Option<bool>,
}

/// The looks at one standby over one connection, and what they prove. One per connection:
/// another server (a reconnect) starts from nothing known.
#[derive(Debug, Default)]
pub(super) struct Standby {
    /// The server refused the look (a role denied its functions, a service without
    /// them): only whether it is a standby is asked, and it gives no bound.
    pub blind: bool,
    /// Whether there has been a look.
    looked: bool,
    /// The receiver seen at the previous look.
    receiver: Option<i32>,
    /// Looks at which the receiver streamed, with what it had received then, oldest first;
    /// a look leaves once replay has passed it.
    streamed: VecDeque<(i64, i64)>,
    /// The latest look whose WAL the standby had replayed by a later look.
    current_at: Option<i64>,
}

impl Standby {
    /// Takes in a look; returns how current the standby is known to be.
    pub(super) fn look(&mut self, look: Look) -> Upstream {
        let Some(received) = look.received else {
            return Upstream::Unbounded;
        };
        let streaming =
            look.receiver.is_some() && look.streaming.unwrap_or(look.receiver == self.receiver);
        self.receiver = look.receiver;
        self.looked = true;
        if streaming {
            if self.streamed.len() == MAX_LOOKS {
                self.streamed.pop_front();
            }
            self.streamed.push_back((look.at, received));
        }
        if let Some(replayed) = look.replayed {
            while let Some(&(at, lsn)) = self.streamed.front() {
                if lsn > replayed {
                    break;
                }
                self.current_at = Some(at);
                self.streamed.pop_front();
            }
        }
        self.current_at
            .map_or(Upstream::Unknown, Upstream::CurrentAt)
    }

    /// Whether the standby had a WAL receiver at the last look (`None` before any).
    pub(super) fn receiving(&self) -> Option<bool> {
        self.looked.then_some(self.receiver.is_some())
    }

    /// Whether the standby is known to have been current at some look.
    pub(super) fn known(&self) -> bool {
        self.current_at.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn look(at: i64, received: i64, replayed: i64, receiver: Option<i32>) -> Look {
        Look {
            at,
            received: Some(received),
            replayed: Some(replayed),
            receiver,
            streaming: None,
        }
    }

    #[test]
    fn a_standby_that_never_streamed_gives_no_bound() {
        let mut standby = Standby::default();
        let archive_only = Look {
            received: None,
            ..look(1, 0, 100, None)
        };
        assert_eq!(standby.look(archive_only), Upstream::Unbounded);
    }

    #[test]
    fn a_receiver_counts_once_seen_twice_or_once_its_status_says_streaming() {
        let mut standby = Standby::default();
        assert_eq!(standby.look(look(1, 100, 100, Some(7))), Upstream::Unknown);
        assert_eq!(
            standby.look(look(2, 100, 100, Some(7))),
            Upstream::CurrentAt(2)
        );
        // A new receiver (the old one's primary gone) is not taken on its word.
        assert_eq!(
            standby.look(look(3, 100, 100, Some(8))),
            Upstream::CurrentAt(2)
        );
        let mut privileged = Standby::default();
        let streaming = Look {
            streaming: Some(true),
            ..look(1, 100, 100, Some(7))
        };
        assert_eq!(privileged.look(streaming), Upstream::CurrentAt(1));
        let starting = Look {
            streaming: Some(false),
            ..look(2, 100, 100, Some(7))
        };
        assert_eq!(privileged.look(starting), Upstream::CurrentAt(1));
    }

    #[test]
    fn replay_held_back_keeps_the_standby_at_the_last_look_it_passed() {
        let mut standby = Standby::default();
        standby.look(look(1, 100, 100, Some(7)));
        assert_eq!(
            standby.look(look(2, 100, 100, Some(7))),
            Upstream::CurrentAt(2)
        );
        // The primary writes; replay is paused at 100.
        assert_eq!(
            standby.look(look(3, 150, 100, Some(7))),
            Upstream::CurrentAt(2)
        );
        assert_eq!(
            standby.look(look(4, 200, 100, Some(7))),
            Upstream::CurrentAt(2)
        );
        // Replay passes what was received at look 3, not yet what was at look 4.
        assert_eq!(
            standby.look(look(5, 200, 170, Some(7))),
            Upstream::CurrentAt(3)
        );
        assert_eq!(
            standby.look(look(6, 200, 200, Some(7))),
            Upstream::CurrentAt(6)
        );
    }

    #[test]
    fn a_standby_without_its_receiver_stays_at_the_last_look_it_streamed() {
        let mut standby = Standby::default();
        standby.look(look(1, 100, 100, Some(7)));
        standby.look(look(2, 100, 100, Some(7)));
        assert_eq!(standby.receiving(), Some(true));
        for at in 3..10 {
            assert_eq!(
                standby.look(look(at, 100, 100, None)),
                Upstream::CurrentAt(2)
            );
        }
        assert_eq!(standby.receiving(), Some(false));
        // Back: the new receiver counts from its second look.
        assert_eq!(
            standby.look(look(10, 120, 120, Some(9))),
            Upstream::CurrentAt(2)
        );
        assert_eq!(
            standby.look(look(11, 120, 120, Some(9))),
            Upstream::CurrentAt(11)
        );
    }

    #[test]
    fn looks_past_the_limit_drop_the_oldest() {
        let mut standby = Standby::default();
        standby.look(look(0, 1, 0, Some(7)));
        for at in 1..=MAX_LOOKS as i64 + 10 {
            assert_eq!(
                standby.look(look(at, at + 1, 0, Some(7))),
                Upstream::Unknown
            );
        }
        assert_eq!(standby.streamed.len(), MAX_LOOKS);
        // Replay reaches the oldest look kept, not the dropped ones before it.
        let (at, received) = standby.streamed.front().copied().expect("looks kept");
        assert_eq!(at, 11);
        let next = MAX_LOOKS as i64 + 20;
        assert_eq!(
            standby.look(look(next, next, received, None)),
            Upstream::CurrentAt(at)
        );
    }
}
