//! Reading a generation's rows back: one key's, one subject's, and every subject's
//! digest (`GET /v1/digest`, equal to `permd.digest()` in Postgres).

use md5::{Digest as _, Md5};

use super::{State, TupleRow, GRANTS_RUN, NEVER};

impl State {
    /// Every row `subject` holds on `object`, expired ones included: what `set_grant`
    /// was last given for the key, in permission order.
    pub(crate) fn grant_rows(&self, subject: &str, object: &str) -> Vec<TupleRow> {
        let Some(object) = self.objects.get(object) else {
            return Vec::new();
        };
        let Some(entry) = self.subjects.get(subject) else {
            return Vec::new();
        };
        let Some(held) = entry.grants.get(object, &self.packed) else {
            return Vec::new();
        };
        held.rows()
            .map(|(p, expires_at)| TupleRow {
                permission: self.permissions.name(p).to_string(),
                expires_at: (expires_at != NEVER).then_some(expires_at),
            })
            .collect()
    }

    /// `subject`'s own limits (not those of `*`), as `set_limits` was last given them.
    pub(crate) fn limit_rows(&self, subject: &str) -> Vec<(String, i64)> {
        self.subjects.get(subject).map_or_else(Vec::new, |entry| {
            entry
                .limits
                .iter()
                .map(|&(n, value)| (self.limit_names.name(n).to_string(), value))
                .collect()
        })
    }

    /// Every stored row of `subject`, expired ones included: (object, permission,
    /// expires_at) sorted, and limits. For `permd verify`.
    pub(crate) fn rows_of(&self, subject: &str) -> StoredRows {
        let mut rows = StoredRows::default();
        let (objects, permissions) = (self.objects.names(), self.permissions.names());
        self.rows_in_runs(subject, |run| {
            for &(o, p, expires_at) in run {
                let expires_at = (expires_at != NEVER).then_some(expires_at);
                let (object, permission) = (objects.name(o), permissions.name(p));
                rows.tuples
                    .push((object.to_owned(), permission.to_owned(), expires_at));
            }
        });
        if let Some(entry) = self.subjects.get(subject) {
            for (n, value) in entry.limits.iter() {
                rows.limits
                    .push((self.limit_names.name(*n).to_string(), *value));
            }
        }
        rows.tuples.sort();
        rows.limits.sort();
        rows
    }

    /// The order-independent digest of every stored row, the same value as the SQL
    /// function `permd.digest()`: `<tuples>:<limits>:<sum of row hashes, 16 hex digits>`.
    pub(crate) fn digest(&self) -> String {
        let mut total = Digest::default();
        self.for_each_subject_digest(|_, digest| total.add(digest));
        total.to_string()
    }

    /// The digest of each subject's rows, as `permd.subject_digests()` computes them.
    pub(crate) fn subject_digests(&self) -> Vec<(String, String)> {
        let mut digests = Vec::with_capacity(self.subjects.len());
        self.for_each_subject_digest(|subject, digest| {
            digests.push((subject.to_owned(), digest.to_string()));
        });
        digests
    }

    /// Calls `f` with each subject and the digest of its rows. A subject of more grants
    /// than `GRANTS_RUN` is put aside, and its rows read later in runs and hashed outside
    /// the lock (`rows_in_runs`): hashing a million rows under its shard lock held the
    /// writer for a quarter of a second.
    fn for_each_subject_digest(&self, mut f: impl FnMut(&str, Digest)) {
        let mut line = Vec::with_capacity(256);
        let objects = self.objects.names();
        let permissions = self.permissions.names();
        let limit_names = self.limit_names.names();
        let add_row = |line: &mut Vec<u8>,
                       digest: &mut Digest,
                       subject: &str,
                       (o, p, expires_at): (u32, u32, i64)| {
            line.clear();
            push_fields(line, &["t", subject, objects.name(o), permissions.name(p)]);
            line.push(0x1f);
            if expires_at != NEVER {
                line.extend_from_slice(expires_at.to_string().as_bytes());
            }
            digest.sum = digest.sum.wrapping_add(row_hash(line));
            digest.tuples += 1;
        };
        let add_limits =
            |line: &mut Vec<u8>, digest: &mut Digest, subject: &str, limits: &[(u32, i64)]| {
                for &(n, value) in limits {
                    line.clear();
                    push_fields(line, &["l", subject, limit_names.name(n)]);
                    line.push(0x1f);
                    line.extend_from_slice(value.to_string().as_bytes());
                    digest.sum = digest.sum.wrapping_add(row_hash(line));
                    digest.limits += 1;
                }
            };
        let mut large = Vec::new();
        self.subjects.for_each(|subject, entry| {
            if entry.grants.len() > GRANTS_RUN {
                large.push(subject.to_owned());
                return;
            }
            let mut digest = Digest::default();
            for (o, held) in entry.grants.iter(&self.packed) {
                for (p, expires_at) in held.rows() {
                    add_row(&mut line, &mut digest, subject, (o, p, expires_at));
                }
            }
            add_limits(&mut line, &mut digest, subject, &entry.limits);
            f(subject, digest);
        });
        for subject in large {
            let mut digest = Digest::default();
            self.rows_in_runs(&subject, |run| {
                for &row in run {
                    add_row(&mut line, &mut digest, &subject, row);
                }
            });
            if let Some(entry) = self.subjects.get(&subject) {
                add_limits(&mut line, &mut digest, &subject, &entry.limits);
            }
            if digest.tuples > 0 || digest.limits > 0 {
                f(&subject, digest);
            }
        }
    }
}

/// The stored rows of one subject.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoredRows {
    /// (object, permission, expires_at in µs since the epoch or `None`), sorted.
    pub tuples: Vec<(String, String, Option<i64>)>,
    /// (name, value), sorted.
    pub limits: Vec<(String, i64)>,
}

/// A digest of rows: their counts and the wrapping sum of their row hashes, written
/// `tuples:limits:sum` (16 hex digits), as `permd.digest()` writes it. The digest of two
/// sets of rows is the [`Digest::add`] of theirs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Digest {
    tuples: u64,
    limits: u64,
    sum: u64,
}

impl Digest {
    /// Adds the rows of `other`.
    pub fn add(&mut self, other: Digest) {
        self.tuples += other.tuples;
        self.limits += other.limits;
        self.sum = self.sum.wrapping_add(other.sum);
    }
}

impl std::str::FromStr for Digest {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("not a digest: {text:?}");
        let parts: Vec<&str> = text.split(':').collect();
        let [tuples, limits, sum] = parts[..] else {
            return Err(bad());
        };
        let bad = |_| bad();
        Ok(Self {
            tuples: tuples.parse().map_err(bad)?,
            limits: limits.parse().map_err(bad)?,
            sum: u64::from_str_radix(sum, 16).map_err(bad)?,
        })
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{:016x}", self.tuples, self.limits, self.sum)
    }
}

fn push_fields(line: &mut Vec<u8>, fields: &[&str]) {
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            line.push(0x1f);
        }
        line.extend_from_slice(f.as_bytes());
    }
}

/// The first 8 bytes of md5, big-endian: `permd.row_hash()` in SQL.
fn row_hash(line: &[u8]) -> u64 {
    let hash = Md5::digest(line);
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash[..8]);
    u64::from_be_bytes(first)
}

#[cfg(test)]
mod tests {
    use super::super::tests::row;
    use super::*;

    #[test]
    fn digests_read_back_and_add_up() {
        let mut total: Digest = "3:1:ffffffffffffffff".parse().expect("a digest");
        assert_eq!(total.to_string(), "3:1:ffffffffffffffff");
        total.add("1:0:0000000000000002".parse().expect("a digest"));
        assert_eq!(total.to_string(), "4:1:0000000000000001", "the sum wraps");
        for wrong in ["", "1:2", "1:2:3:4", "x:0:00", "1:1:zz"] {
            assert!(wrong.parse::<Digest>().is_err(), "{wrong}");
        }
    }

    #[test]
    fn digest_matches_the_sql_definition() {
        // The SQL digest of ('u1','','ADMIN', 1700000000000000) alone, computed by
        // permd.digest() on Postgres: the row hash of its canonical line.
        let line = b"t\x1fu1\x1f\x1fADMIN\x1f1700000000000000";
        let state = State::with_capacity(1, 1);
        state.set_grant("u1", "", &[row("ADMIN", Some(1_700_000_000_000_000))]);
        assert_eq!(state.digest(), format!("1:0:{:016x}", row_hash(line)));
    }
}
