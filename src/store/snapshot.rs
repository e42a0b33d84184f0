//! Which transactions the mirror holds: a Postgres snapshot.

/// A Postgres snapshot, from `pg_current_snapshot()::text`: which transactions it sees.
/// The mirror holds exactly the committed transactions its snapshot sees (every one below
/// `xmin`, and those between `xmin` and `xmax` not in progress when it was taken), so a
/// read-your-writes token is past once the snapshot sees its transaction.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Snapshot {
    xmin: u64,
    xmax: u64,
    /// Transactions in progress when it was taken, between `xmin` and `xmax`, ascending.
    xip: Vec<u64>,
}

impl Snapshot {
    /// Parses `xmin:xmax:xip,xip,...`; `None` unless it is one (`xmin <= xip < xmax`).
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split(':');
        let (Some(xmin), Some(xmax), Some(xip), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        let mut xip: Vec<u64> = xip
            .split(',')
            .filter(|x| !x.is_empty())
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        xip.sort_unstable();
        xip.dedup();
        Self::new(xmin.parse().ok()?, xmax.parse().ok()?, xip)
    }

    /// From its parts: `None` unless `xmin <= xip < xmax` (`xip` ascending).
    fn new(xmin: u64, xmax: u64, xip: Vec<u64>) -> Option<Self> {
        let fits = xmin <= xmax && xip.iter().all(|&x| xmin <= x && x < xmax);
        fits.then_some(Self { xmin, xmax, xip })
    }

    /// Every transaction below it has ended.
    pub fn xmin(&self) -> u64 {
        self.xmin
    }

    /// No transaction at or above it had begun.
    pub fn xmax(&self) -> u64 {
        self.xmax
    }

    /// The transactions in progress when it was taken, ascending.
    pub fn xip(&self) -> &[u64] {
        &self.xip
    }

    /// Whether a transaction that committed is visible in this snapshot.
    pub fn sees(&self, xid: u64) -> bool {
        xid < self.xmin || (xid < self.xmax && self.xip.binary_search(&xid).is_err())
    }

    /// Only what it sees below its xmin: all a standby's snapshot can be taken at its word
    /// for (`pg_current_snapshot()` there lists no transaction in progress).
    pub fn horizon(&self) -> Self {
        Self {
            xmin: self.xmin,
            xmax: self.xmin,
            xip: Vec::new(),
        }
    }

    /// Whether it sees every transaction `other` sees (it was taken at or after `other`).
    pub fn covers(&self, other: &Self) -> bool {
        // A transaction `self` does not see is in its `xip` or at or above its `xmax`;
        // `other` must not see it either.
        let beyond = other.xmax.saturating_sub(self.xmax);
        self.xip.iter().all(|&x| !other.sees(x))
            // Every transaction from `self.xmax` up to `other.xmax` was in progress for
            // `other` too.
            && other.xip.iter().filter(|&&x| x >= self.xmax).count() as u64 == beyond
    }

    /// This snapshot and the transactions below `upto` that `later` sees: what the mirror
    /// holds after a poll at `later` applied, in order, the changelog's rows of the
    /// transactions this one does not see, up to `upto`'s (which is left out: its rows
    /// may be only in part). `later` covers this one, and sees `upto`.
    pub fn extended(&self, later: &Self, upto: u64) -> Self {
        let xmax = self.xmax.max(upto);
        let mut xip: Vec<u64> = self
            .xip
            .iter()
            .copied()
            .filter(|&x| x >= upto || !later.sees(x))
            .chain(
                later
                    .xip
                    .iter()
                    .copied()
                    .filter(|&x| self.xmax <= x && x < upto),
            )
            .collect();
        xip.sort_unstable();
        xip.dedup();
        let xmin = xip.first().copied().unwrap_or(xmax);
        Self { xmin, xmax, xip }
    }
}

impl std::fmt::Display for Snapshot {
    /// As Postgres writes it: `xmin:xmax:xip,xip,...`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:", self.xmin, self.xmax)?;
        for (i, x) in self.xip.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{x}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn snapshot(text: &str) -> Snapshot {
        Snapshot::parse(text).unwrap()
    }

    #[test]
    fn a_snapshot_sees_what_ended_before_it() {
        let s = snapshot("100:105:103,100");
        assert!(s.sees(99));
        assert!(!s.sees(100));
        assert!(s.sees(101));
        assert!(!s.sees(103));
        assert!(s.sees(104));
        assert!(!s.sees(105));
        assert_eq!(s.to_string(), "100:105:100,103");
        assert_eq!(s.horizon(), snapshot("100:100:"));
        assert!(s.horizon().sees(99) && !s.horizon().sees(101));
        assert_eq!(
            snapshot("7:7:"),
            Snapshot {
                xmin: 7,
                xmax: 7,
                xip: vec![]
            }
        );
        for bad in ["7:7", "a:7:", "7:6:", "7:9:6", "7:9:9", "7:9:x"] {
            assert_eq!(Snapshot::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_later_snapshot_covers_an_earlier_one() {
        let earlier = snapshot("100:105:100,103");
        assert!(snapshot("100:105:100,103").covers(&earlier));
        assert!(snapshot("100:108:100,106").covers(&earlier));
        assert!(snapshot("106:108:106").covers(&earlier));
        // 101 ended before `earlier` and is in progress here: taken before it.
        assert!(!snapshot("100:105:100,101,103").covers(&earlier));
        // 104 ended before `earlier`, which this one does not reach.
        assert!(!snapshot("100:104:100").covers(&earlier));
        // Unless 104 was in progress for `earlier` too.
        assert!(snapshot("100:104:100").covers(&snapshot("100:105:100,104")));
    }

    #[test]
    fn a_snapshot_extended_by_a_part_of_a_later_one_sees_what_was_applied() {
        // 100 is still open, 103 ended since, 106 and 108 began and ended, 107 is open.
        let last = snapshot("100:105:100,103");
        let later = snapshot("100:110:100,107");
        // A batch that stopped in 108's rows: everything below 108 the later one sees.
        let part = last.extended(&later, 108);
        assert_eq!(part, snapshot("100:108:100,107"));
        assert!(part.sees(103) && part.sees(106) && !part.sees(108));
        // One that stopped in 103's rows: 103 and what is above it stay unseen.
        let part = last.extended(&later, 103);
        assert_eq!(part, snapshot("100:105:100,103"));
        // Once the open transaction is passed, the xmin moves.
        let later = snapshot("107:110:107");
        assert_eq!(last.extended(&later, 106), snapshot("106:106:"));
        assert_eq!(snapshot("5:5:").extended(&later, 6), snapshot("6:6:"));
    }
}
