//! Shards: which subjects one daemon mirrors when the set outgrows one machine
//! (`--shard INDEX/COUNT`).
//!
//! A subject belongs to shard `u32::from_be_bytes(md5(subject)[0..4]) % COUNT`: the first
//! four bytes of the MD5 of its UTF-8 bytes, read as a big-endian unsigned integer, modulo
//! the number of shards. MD5 because every language a router is written in has it, and
//! so does Postgres, which picks a shard's changed keys out of the changelog by the same
//! rule (`Shard::sql_condition`). The load's rows are picked out here (`Shard::runs`),
//! which costs far less than Postgres's `md5()` of every row. The public subject `*`
//! belongs to every shard: its grants apply to every subject.
//!
//! A plain modulo, not a consistent-hash ring: a daemon holds no state of its own (it
//! loads its shard from Postgres), so a resize moves no data between daemons. Run the new
//! set of daemons beside the old one, switch the router once they are ready, stop the old.

use std::fmt;

use md5::{Digest as _, Md5};

/// The shard of `subject` in Postgres, as [`Shard::of`] computes it: `column` is where
/// the subject is. Needs a UTF-8 database (the MD5 is of the stored bytes), as the
/// digest already does.
fn sql_hash(column: &str) -> String {
    format!("('x' || left(md5({column}), 8))::bit(32)::int8")
}

/// Most shards a set may be split into.
pub const MAX_SHARDS: u32 = 65_536;

/// One shard of the subjects: `index` of `count`. `0/1` is the whole set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    index: u32,
    count: u32,
}

impl Default for Shard {
    fn default() -> Self {
        Self::WHOLE
    }
}

impl Shard {
    /// Every subject: one shard of one.
    pub const WHOLE: Self = Self { index: 0, count: 1 };

    /// Shard `index` of `count`, if `index < count <= MAX_SHARDS`.
    pub fn new(index: u32, count: u32) -> Option<Self> {
        (index < count && count <= MAX_SHARDS).then_some(Self { index, count })
    }

    /// Reads `INDEX/COUNT`, e.g. `0/4` (the first of four).
    pub fn parse(text: &str) -> Result<Self, String> {
        let numbers = text
            .split_once('/')
            .and_then(|(i, n)| Some((i.trim().parse().ok()?, n.trim().parse().ok()?)));
        let Some((index, count)) = numbers else {
            return Err(format!(
                "give INDEX/COUNT, e.g. 0/4 for the first of four shards, not {text:?}"
            ));
        };
        Self::new(index, count).ok_or_else(|| {
            format!(
                "{text:?}: the index counts from 0 and must be below the count, which is at \
                 most {MAX_SHARDS} (e.g. 0/4 to 3/4)"
            )
        })
    }

    /// Which of `count` shards `subject` belongs to (`*` belongs to all; this is where
    /// every other subject lives).
    pub fn of(subject: &str, count: u32) -> u32 {
        let hash = Md5::digest(subject.as_bytes());
        u32::from_be_bytes([hash[0], hash[1], hash[2], hash[3]]) % count.max(1)
    }

    /// Whether this shard mirrors `subject`.
    #[inline]
    pub fn owns(&self, subject: &str) -> bool {
        self.count == 1 || subject == "*" || Self::of(subject, self.count) == self.index
    }

    /// The shard `subject` belongs to, among as many as this one's.
    pub fn owner_of(&self, subject: &str) -> Self {
        Self {
            index: Self::of(subject, self.count),
            count: self.count,
        }
    }

    /// Whether this is the whole set.
    pub fn is_whole(&self) -> bool {
        self.count == 1
    }

    /// The condition, in SQL, that a row's `subject` column belongs to this shard; `None`
    /// for the whole set.
    pub(crate) fn sql_condition(&self, column: &str) -> Option<String> {
        (!self.is_whole()).then(|| {
            format!(
                "({column} = '*' OR {} % {} = {})",
                sql_hash(column),
                self.count,
                self.index
            )
        })
    }

    /// [`Shard::owns`] for rows that come a subject at a time.
    pub(crate) fn runs(self) -> Runs {
        Runs {
            shard: self,
            subject: String::new(),
            owned: self.owns(""),
        }
    }

    /// The index, from 0.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// How many shards the set is split into.
    pub fn count(&self) -> u32 {
        self.count
    }
}

/// [`Shard::owns`] over rows that come a subject at a time (a table in its physical
/// order, where a subject's rows were mostly written together): the last answer is
/// remembered, so a subject is hashed once per run of its rows rather than once a row.
pub(crate) struct Runs {
    shard: Shard,
    subject: String,
    owned: bool,
}

impl Runs {
    /// Whether the shard mirrors `subject`.
    pub(crate) fn owns(&mut self, subject: &str) -> bool {
        if self.shard.is_whole() {
            return true;
        }
        if subject != self.subject {
            self.subject.clear();
            self.subject.push_str(subject);
            self.owned = self.shard.owns(subject);
        }
        self.owned
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_over_count_is_read_and_checked() {
        assert_eq!(Shard::parse("2/4"), Ok(Shard { index: 2, count: 4 }));
        assert_eq!(Shard::parse(" 0 / 1 "), Ok(Shard::WHOLE));
        for wrong in ["4/4", "1/0", "0/65537"] {
            let error = Shard::parse(wrong).expect_err(wrong);
            assert!(
                error.contains("must be below the count"),
                "{wrong}: {error}"
            );
        }
        for wrong in ["", "2", "2/", "/4", "-1/4", "a/b", "1/2/3"] {
            let error = Shard::parse(wrong).expect_err(wrong);
            assert!(error.contains("give INDEX/COUNT"), "{wrong}: {error}");
        }
        assert_eq!(Shard::parse("3/8").expect("valid").to_string(), "3/8");
    }

    #[test]
    fn the_hash_is_the_documented_one() {
        // md5("alice") = 6384e2b2..., md5("d") = 8277e091... (a high first bit: unsigned).
        assert_eq!(Shard::of("alice", u32::MAX), 0x6384_e2b2);
        assert_eq!(Shard::of("d", 3), 0x8277_e091 % 3);
        assert_eq!(Shard::of("alice", 4), 0x6384_e2b2 % 4);
        assert_eq!(Shard::of("anything", 1), 0);
    }

    #[test]
    fn runs_answer_as_owns_in_any_order() {
        let shard = Shard::new(1, 3).expect("valid");
        let mut runs = shard.runs();
        for subject in ["a", "a", "b", "*", "*", "a", "c", "c", "b", "", "d"] {
            assert_eq!(runs.owns(subject), shard.owns(subject), "{subject}");
        }
        let mut whole = Shard::WHOLE.runs();
        assert!(whole.owns("a") && whole.owns("b"));
    }

    #[test]
    fn every_subject_has_one_owner_and_the_public_subject_all() {
        let shards: Vec<Shard> = (0..5).map(|i| Shard::new(i, 5).expect("valid")).collect();
        let mut sizes = [0u32; 5];
        for n in 0..10_000 {
            let subject = format!("user:{n}");
            let owners: Vec<&Shard> = shards.iter().filter(|s| s.owns(&subject)).collect();
            assert_eq!(owners.len(), 1, "{subject}");
            assert_eq!(*owners[0], shards[0].owner_of(&subject));
            sizes[owners[0].index as usize] += 1;
        }
        // Spread evenly: each of five shards holds 2,000 +- 10 %.
        assert!(
            sizes.iter().all(|&n| (1_800..=2_200).contains(&n)),
            "{sizes:?}"
        );
        assert!(shards.iter().all(|s| s.owns("*")));
        assert!(Shard::WHOLE.owns("anyone") && Shard::WHOLE.sql_condition("s").is_none());
        assert_eq!(
            shards[2].sql_condition("c.subject").as_deref(),
            Some("(c.subject = '*' OR ('x' || left(md5(c.subject), 8))::bit(32)::int8 % 5 = 2)")
        );
    }
}
