//! The journal of the writes made while another generation is built beside the current
//! one (a compaction's or a reload's), and the edits a notification makes to a key.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

use super::{State, TupleRow};

/// A stored row of a key, named within it: a tuple by its permission, a limit by its name.
pub(crate) trait Named {
    fn name(&self) -> &str;
}

impl Named for TupleRow {
    fn name(&self) -> &str {
        &self.permission
    }
}

impl Named for (String, i64) {
    fn name(&self) -> &str {
        &self.0
    }
}

/// One statement's change to one key, as a notification carries it: the rows gone (by
/// name), then those there after it (an UPDATE has both).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Edit<R> {
    pub(crate) gone: Vec<String>,
    pub(crate) came: Vec<R>,
}

impl<R> Default for Edit<R> {
    fn default() -> Self {
        Self {
            gone: Vec::new(),
            came: Vec::new(),
        }
    }
}

impl<R: Named + Clone> Edit<R> {
    /// Makes the change to `rows`: those gone removed, those there in place of any of the
    /// same name.
    pub(crate) fn apply(&self, rows: &mut Vec<R>) {
        rows.retain(|row| !self.gone.iter().any(|name| name == row.name()));
        for row in &self.came {
            rows.retain(|r| r.name() != row.name());
            rows.push(row.clone());
        }
    }
}

/// What the journal knows of a key's last write.
#[derive(Debug, Clone, PartialEq)]
enum Written<R> {
    /// A change the generation being built holds (a reload's load saw it): it keeps its
    /// own rows.
    Held,
    /// Rows past what the generation built holds, read whole (a poll's), or written over
    /// rows that were (a compaction's every write): copied into it.
    Whole,
    /// Edits past a reload's snapshot (notifications') made over rows that may lack what
    /// the load brings, which called for it (a bulk write with the triggers off, rows
    /// pruned unread): the edits are made again over the loaded rows.
    Edited(Vec<Edit<R>>),
}

impl<R: Named + Clone + Ord> Written<R> {
    /// The rows a key written so is to hold in the generation built, where they differ
    /// from `built`, those it holds there: read whole from the current generation
    /// (`current`), or its own edited again; `None` where it keeps them.
    fn brought(
        &self,
        current: impl FnOnce() -> Vec<R>,
        built: impl FnOnce() -> Vec<R>,
    ) -> Option<Vec<R>> {
        let (mut rows, mut built) = match self {
            Self::Held => return None,
            Self::Whole => (current(), built()),
            Self::Edited(edits) => {
                let built = built();
                let mut rows = built.clone();
                for edit in edits {
                    edit.apply(&mut rows);
                }
                (rows, built)
            }
        };
        // Ids differ between generations: rows are compared by name, sorted.
        rows.sort_unstable();
        built.sort_unstable();
        (rows != built).then_some(rows)
    }
}

/// Notes a write of `key` in `keys`: `edit`, a notification's, or rows read whole;
/// `newer`, past what the generation being built holds; `over_stale`, whether an edit may
/// be made over rows that lack what that generation holds (a reload's, not a
/// compaction's).
fn note<K: Eq + Hash, R: Clone>(
    keys: &mut HashMap<K, Written<R>>,
    key: K,
    newer: bool,
    edit: Option<&Edit<R>>,
    over_stale: bool,
) {
    let Some(edit) = edit.filter(|_| newer && over_stale) else {
        keys.insert(key, if newer { Written::Whole } else { Written::Held });
        return;
    };
    let written = keys.entry(key).or_insert(Written::Held);
    match written {
        // Rows read whole past the snapshot, then edited: as new as the edit.
        Written::Whole => {}
        Written::Edited(edits) => edits.push(edit.clone()),
        Written::Held => *written = Written::Edited(vec![edit.clone()]),
    }
}

/// The keys the writer changed while another generation was built beside the current one
/// (`Store::begin_compaction`, `Store::begin_reload`), each with what its last write was:
/// the newer ones are copied into the generation built before it is swapped in.
pub(super) struct Journal {
    /// Whether the writes made now are newer than the generation being built holds
    /// (`Store::writes_newer`): always for a compaction, whose rebuild may or may not
    /// have read a key yet (a copy compares the rows); for a reload, whether the
    /// changes being applied are past the load's snapshot.
    pub(super) newer: bool,
    /// A reload's: the current generation may lack what the load brings, so an edit
    /// made over its rows is kept, to be made again over the loaded ones.
    reload: bool,
    grants: HashMap<(Box<str>, Box<str>), Written<TupleRow>>,
    limits: HashMap<Box<str>, Written<(String, i64)>>,
}

impl Journal {
    /// A compaction's journal.
    pub(super) fn compaction() -> Self {
        Self::new(true, false)
    }

    /// A reload's journal: no write is newer than the load until the writer says so.
    pub(super) fn reload() -> Self {
        Self::new(false, true)
    }

    fn new(newer: bool, reload: bool) -> Self {
        Self {
            newer,
            reload,
            grants: HashMap::new(),
            limits: HashMap::new(),
        }
    }

    /// Notes a write of `subject`'s grants on `object`: `edit`, a notification's, or
    /// rows read whole.
    pub(super) fn grant(&mut self, subject: &str, object: &str, edit: Option<&Edit<TupleRow>>) {
        let key = (subject.into(), object.into());
        note(&mut self.grants, key, self.newer, edit, self.reload);
    }

    /// Notes a write of `subject`'s limits (`grant`).
    pub(super) fn limits(&mut self, subject: &str, edit: Option<&Edit<(String, i64)>>) {
        note(
            &mut self.limits,
            subject.into(),
            self.newer,
            edit,
            self.reload,
        );
    }

    /// Brings each key whose last write was newer into `into`, the generation built beside
    /// `from`, the generation written: rows read whole are copied from `from`, edits are
    /// made again over `into`'s rows. A subject's keys are set at once (one pass over its
    /// list, `State::set_grants`: a key at a time, a subject written on thousands of
    /// objects meanwhile moved its list once a key). A key `into` already holds as it is
    /// stays as it was built (and its subject in the lock-free tier).
    pub(super) fn copy(&self, from: &State, into: &State) {
        let mut objects: BTreeMap<&str, Vec<(&str, Vec<TupleRow>)>> = BTreeMap::new();
        for ((subject, object), written) in &self.grants {
            let current = || from.grant_rows(subject, object);
            if let Some(rows) = written.brought(current, || into.grant_rows(subject, object)) {
                objects.entry(subject).or_default().push((object, rows));
            }
        }
        for (subject, changed) in objects {
            let changes: Vec<(&str, &[TupleRow])> = changed
                .iter()
                .map(|(object, rows)| (*object, rows.as_slice()))
                .collect();
            into.set_grants(subject, &changes);
        }
        for (subject, written) in &self.limits {
            let current = || from.limit_rows(subject);
            if let Some(rows) = written.brought(current, || into.limit_rows(subject)) {
                into.set_limits(subject, &rows);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(permission: &str) -> TupleRow {
        TupleRow {
            permission: permission.to_owned(),
            expires_at: None,
        }
    }

    /// An edit removes the rows gone, then puts each row there in place of any of its name.
    #[test]
    fn an_edit_removes_then_replaces_by_name() {
        let mut rows = vec![row("read"), row("write")];
        let edit = Edit {
            gone: vec!["read".to_owned()],
            came: vec![
                TupleRow {
                    permission: "write".to_owned(),
                    expires_at: Some(7),
                },
                row("admin"),
            ],
        };
        edit.apply(&mut rows);
        assert_eq!(
            rows,
            [
                TupleRow {
                    permission: "write".to_owned(),
                    expires_at: Some(7),
                },
                row("admin"),
            ]
        );
    }

    /// Beside a reload, an edit over rows not read whole past its snapshot is kept; rows
    /// read whole past it end the edits (they hold them), and a later edit of such rows is
    /// as new as they are; a write the load holds decides alone.
    #[test]
    fn a_reload_keeps_the_edits_made_over_rows_it_may_hold_newer() {
        let edit = |name: &str| Edit {
            gone: Vec::new(),
            came: vec![row(name)],
        };
        let mut journal = Journal::reload();
        journal.newer = true;
        journal.grant("u", "o", Some(&edit("a")));
        journal.grant("u", "o", Some(&edit("b")));
        assert_eq!(
            journal.grants[&("u".into(), "o".into())],
            Written::Edited(vec![edit("a"), edit("b")])
        );
        journal.grant("u", "o", None);
        journal.grant("u", "o", Some(&edit("c")));
        assert_eq!(journal.grants[&("u".into(), "o".into())], Written::Whole);
        journal.newer = false;
        journal.grant("u", "o", Some(&edit("d")));
        assert_eq!(journal.grants[&("u".into(), "o".into())], Written::Held);

        // A compaction's rebuild holds what the current generation does: an edit is
        // copied as it stands.
        let mut journal = Journal::compaction();
        journal.limits("u", Some(&Edit::default()));
        assert_eq!(journal.limits[&Box::from("u")], Written::Whole);
    }
}
