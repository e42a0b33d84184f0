//! Listing a subject's objects: the plan a listing takes (a pass over the subject's
//! grants, a walk of the object names in order, a look-up of each name), and its pages.
//! ARCHITECTURE.md, "Listing a subject's objects".

use std::collections::BinaryHeap;
use std::sync::Arc;

use super::super::grants::Grants;
use super::super::interner::Names;
use super::{Now, State, SubjectEntry, GLOBAL_ID, WILDCARD};

impl State {
    /// The objects on which `subject` holds `permission` (never the global object; `*`
    /// when it is held on every object), wildcards and expiry applied, sorted by name: of
    /// those named after `after` (all of them when it is empty), the first `limit`.
    ///
    /// A page is found one of three ways (`Plan`). A subject that holds a good share of
    /// all objects is listed by walking every object's name in order from `after`
    /// (`object_order`) and keeping those it or `*` holds, until the page is full: the
    /// page costs its length over that share, whatever the subject's size. Whether it
    /// holds each is looked up in its grants and `*`'s (`page_by_look_up`), or, when the
    /// walk is long (the whole listing), in a bitset of them made first
    /// (`page_by_bits`). Others are listed by a pass over their grants and `*`'s
    /// (`page_by_pass`), which picks the page among the names after `after` (only those
    /// are cloned, and only the page's sorted). The cheapest is taken, as `Plan::of`
    /// expects them to cost; a walk that looks up more than the pass would cost is given
    /// up for the pass.
    pub(crate) fn objects_of(
        &self,
        subject: &str,
        permission: &str,
        after: &str,
        limit: usize,
        now: &mut Now,
    ) -> Listing {
        self.objects_within(subject, permission, after, limit, now, None)
            .unwrap_or_default()
    }

    /// `objects_of`, within `bound` if there is one (in `Plan::of`'s tenths of a step);
    /// `None`, found at once or after about that much work, when it is not. With
    /// `QUICK_LISTING`, a quick listing: one that takes some tens of microseconds at most;
    /// what is not quick is better done off a thread that answers checks. Within a bound
    /// is a plan expected to cost no more for the subject's grant count, `*`'s and the
    /// names' (a step a name listed included, for its copy and its JSON), and that needs
    /// no sort of the names first; a walk that looks up more is given up, not sent to the
    /// pass.
    pub(crate) fn objects_within(
        &self,
        subject: &str,
        permission: &str,
        after: &str,
        limit: usize,
        now: &mut Now,
        bound: Option<usize>,
    ) -> Option<Listing> {
        let Some(permission) = self.permissions.get(permission) else {
            return Some(Listing::default());
        };
        // `*`'s grants that hold the permission, which the plans expect to list.
        let public = match subject {
            WILDCARD => 0,
            _ => self.public_holding(permission) as usize,
        };
        let held = self.subjects.get(subject).map_or(0, |e| e.grants.len()) + public;
        let lists = if public == 0 { 1 } else { 2 };
        let built = self.objects.built() as usize;
        let (mut plan, cost) = Plan::of(held, lists, built, limit);
        if let Some(bound) = bound {
            let cost = cost.saturating_add(10 * limit.min(held));
            let sorted = plan == Plan::Pass || self.object_order.get().is_some();
            if cost > bound || !sorted {
                return None;
            }
            if let Plan::LookUp { budget } = &mut plan {
                *budget = (*budget).min(bound / (20 * lists));
            }
        }
        let listed = Listed {
            subject,
            public: public > 0,
            permission,
            after,
            limit,
        };
        let walked = match plan {
            Plan::Pass => return Some(self.page_by_pass(listed, now)),
            Plan::LookUp { budget } => self.page_by_look_up(listed, budget, now),
            Plan::Bits => Some(self.page_by_bits(listed, now)),
        };
        #[cfg(test)]
        tests::LISTED.with(|listed| listed.borrow_mut().push((plan, walked.is_some())));
        match walked {
            None if bound.is_none() => Some(self.page_by_pass(listed, now)),
            walked => walked,
        }
    }

    /// A page by a walk of the names in order from `after`, each looked up in the
    /// subject's grants and `*`'s; `None` when the walk is given up (`walk`: at `budget`
    /// names, or sooner at a pace that would pass it).
    fn page_by_look_up(&self, listed: Listed<'_>, budget: usize, now: &mut Now) -> Option<Listing> {
        // Sorted once a generation, by the first listing that walks it.
        let order = self.object_order();
        let holds = |grants: Option<&Grants>, o: u32, now: &mut Now| {
            grants
                .and_then(|g| g.get(o, &self.packed))
                .is_some_and(|g| g.allows(listed.permission, now))
        };
        let all = self.objects.names();
        let mut walk = Walk::new(listed.limit.saturating_add(1), budget);
        // The locks are let go and taken again every `WALK_CHUNK` names, so that the
        // writer waits at most that long; the walk goes on where it stopped.
        for chunk in from_after(order, all, listed.after).chunks(WALK_CHUNK) {
            let full = self.with_grants(listed, |own, public| {
                walk.go(chunk, |o| holds(own, o, now) || holds(public, o, now))
            })?;
            if full {
                break;
            }
        }
        let since = self.allowed_since(listed, now);
        Some(page_of_walk(
            all,
            walk.found,
            since,
            listed.after,
            listed.limit,
        ))
    }

    /// Calls `f` with the subject's grants and, when `*` may hold the permission, `*`'s:
    /// under the subject's shard lock, or with `*`'s under every shard's, as a batch
    /// reads them (a second read lock on a shard this thread holds could wait behind a
    /// queued writer for ever). A write under way goes first (`Subjects::give_way`): a
    /// walk takes the locks again every chunk.
    fn with_grants<R>(
        &self,
        listed: Listed<'_>,
        f: impl FnOnce(Option<&Grants>, Option<&Grants>) -> R,
    ) -> R {
        let subject = std::iter::once(listed.subject);
        if listed.public {
            return self.subjects.read_all(subject, |entries, entry_of| {
                let public = entry_of(WILDCARD).map(SubjectEntry::grants);
                f(entries[0].map(SubjectEntry::grants), public)
            });
        }
        self.subjects.give_way();
        let entry = self.subjects.get(listed.subject);
        f(entry.as_deref().map(SubjectEntry::grants), None)
    }

    /// The objects `subject` holds `permission` on from id `from` on, the global object
    /// left out, sorted by id (`grants_in_runs`).
    fn allowed_from(&self, subject: &str, from: u32, permission: u32, now: &mut Now) -> Vec<u32> {
        let mut ids = Vec::new();
        self.grants_in_runs(subject, from, |o, held| {
            if o != GLOBAL_ID && held.allows(permission, now) {
                ids.push(o);
            }
        });
        ids
    }

    /// The objects named since the generation was built that the subject or `*` holds the
    /// permission on, which the order of names does not have.
    fn allowed_since(&self, listed: Listed<'_>, now: &mut Now) -> Vec<u32> {
        let built = self.objects.built();
        let own = self.allowed_from(listed.subject, built, listed.permission, now);
        match listed.public {
            true => merge_sorted(
                own,
                &self.allowed_from(WILDCARD, built, listed.permission, now),
            ),
            false => own,
        }
    }

    /// A page by a walk of the names in order from `after`, each looked up in a bitset of
    /// the subject's grants and `*`'s made first.
    pub(super) fn page_by_bits(&self, listed: Listed<'_>, now: &mut Now) -> Listing {
        let order = self.object_order();
        let built = self.objects.built();
        let mut bits = vec![0_u64; (built as usize).div_ceil(64)];
        let subjects = if listed.public {
            &[listed.subject, WILDCARD][..]
        } else {
            &[listed.subject][..]
        };
        for s in subjects {
            self.grants_in_runs(s, 0, |o, held| {
                if o < built && o != GLOBAL_ID && held.allows(listed.permission, now) {
                    bits[o as usize / 64] |= 1 << (o % 64);
                }
            });
        }
        let since = self.allowed_since(listed, now);
        let all = self.objects.names();
        let holds = |o: u32| bits[o as usize / 64] & (1 << (o % 64)) != 0;
        let walked = walk(
            from_after(order, all, listed.after),
            listed.limit.saturating_add(1),
            usize::MAX,
            holds,
        );
        page_of_walk(
            all,
            walked.unwrap_or_default(),
            since,
            listed.after,
            listed.limit,
        )
    }

    /// A page by a pass over the subject's grants and `*`'s.
    pub(super) fn page_by_pass(&self, listed: Listed<'_>, now: &mut Now) -> Listing {
        let public = match listed.public {
            true => self.allowed_from(WILDCARD, 0, listed.permission, now),
            false => Vec::new(),
        };
        let own = self.allowed_from(listed.subject, 0, listed.permission, now);
        let all = self.objects.names();
        let ids = merge_sorted(own, &public);
        let named = ids
            .into_iter()
            .map(|o| (all.name(o), o))
            .filter(|&(name, _)| name > listed.after);
        if listed.limit < PAGE_BY_HEAP {
            let (mut names, more) = page_by_heap(named, listed.limit);
            names.sort_unstable();
            return listing(all, names, more);
        }
        let mut names: Vec<(&str, u32)> = named.collect();
        let more = names.len() > listed.limit;
        if more {
            // The `limit` first names, in no order, then sorted: a page of a long
            // listing sorts only itself.
            names.select_nth_unstable(listed.limit);
            names.truncate(listed.limit);
        }
        names.sort_unstable();
        listing(all, names, more)
    }

    /// The ids of the objects named when the generation was built, the global object's
    /// excepted, sorted by name: sorted at the first call, which every other waits for.
    fn object_order(&self) -> &[u32] {
        self.object_order
            .get_or_init(|| self.objects.built_by_name(GLOBAL_ID + 1))
    }
}

/// A listing's page of fewer objects than this is picked with a heap as the names go by
/// (`State::objects_of`); a longer one from all of them at once.
const PAGE_BY_HEAP: usize = 1_024;

/// The first `limit` of `named` (in no order), and whether there were more: the first
/// `limit` kept in a heap as the others go by, most of them turned away by one comparison
/// with its largest, where a selection among all of them compared each several times (a
/// page of 100 of 100,000 objects: 0.80 against 1.19 ms, benches/README.md).
fn page_by_heap<'n>(
    named: impl Iterator<Item = (&'n str, u32)>,
    limit: usize,
) -> (Vec<(&'n str, u32)>, bool) {
    let mut page: BinaryHeap<(&str, u32)> = BinaryHeap::with_capacity(limit);
    let mut more = false;
    for named in named {
        if page.len() < limit {
            page.push(named);
        } else {
            more = true;
            if let Some(mut largest) = page.peek_mut() {
                if named < *largest {
                    *largest = named;
                }
            }
        }
    }
    (page.into_vec(), more)
}

/// What a listing asks (`State::objects_of`), for the way it is found.
#[derive(Clone, Copy)]
pub(super) struct Listed<'a> {
    pub(super) subject: &'a str,
    /// Whether `*`'s grants may hold the permission (`State::public_held`); never for `*`.
    pub(super) public: bool,
    pub(super) permission: u32,
    pub(super) after: &'a str,
    pub(super) limit: usize,
}

/// How a listing finds its page (`State::objects_of`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// A pass over the subject's grants.
    Pass,
    /// A walk of the names in order, each looked up among the subject's grants; given up
    /// for the pass after `budget` look-ups.
    LookUp { budget: usize },
    /// A walk of the names in order, each looked up in a bitset of the subject's grants.
    Bits,
}

impl Plan {
    /// The plan expected to cost least for a subject that holds grants on `held` of the
    /// `objects` names, for a page of `limit`. Costs in tenths of a step of the pass (a
    /// grant read and its name compared with the cursor): the pass takes `held` steps and
    /// sorts its page; a walk is expected to look at `objects / held` names for each one
    /// it keeps, and stops at `limit` and one more; a name's look-up costs two steps in
    /// each of `lists` lists of grants (the subject's, and `*`'s when it holds any), a
    /// bit set or read a tenth of one. A look-up walk's budget is the pass's cost: a
    /// subject that holds many objects but few with the permission asked sends it back
    /// to the pass, at most doubling the pass's time. With the plan, its expected cost.
    fn of(held: usize, lists: usize, objects: usize, limit: usize) -> (Self, usize) {
        if held == 0 {
            return (Self::Pass, 0);
        }
        let page = limit.min(held);
        let pass = 10 * held.saturating_add(page.saturating_mul(page.max(1).ilog2() as usize));
        let walked = (limit.saturating_add(1).saturating_mul(objects) / held).min(objects);
        let look_up = walked.saturating_mul(20 * lists);
        let bits = held.saturating_add(walked);
        if look_up <= bits && look_up < pass {
            (
                Self::LookUp {
                    budget: pass / (20 * lists),
                },
                look_up,
            )
        } else if bits < pass {
            (Self::Bits, bits)
        } else {
            (Self::Pass, pass)
        }
    }
}

/// The bound of a quick listing (`Store::quick_objects_of`), in `Plan::of`'s
/// tenths of a step: 2,000 steps of the pass, some tens of microseconds.
pub(crate) const QUICK_LISTING: usize = 20_000;

/// Names a walk probes before it judges its pace (`walk`).
const WALK_PATIENCE: usize = 1_024;

/// The first `want` of `order` (ids in name order) that `holds` keeps, or all of them if
/// fewer; `None` once `budget` have been probed without either, or sooner: past
/// `WALK_PATIENCE` probes, once at the pace so far the page would take more than
/// `budget`. The plan's estimate takes every grant of the subject to hold the permission
/// asked: a subject of many grants, few of them with it, walks in vain. Where `*` held a
/// million grants of another permission (before they were counted by permission), a
/// walk for a subject of ten went through its whole budget (250,000 names, 16 ms) before
/// the pass, against 2.7 ms with this rule (benches/README.md, "Listing a subject's
/// objects").
fn walk(
    order: &[u32],
    want: usize,
    budget: usize,
    holds: impl FnMut(u32) -> bool,
) -> Option<Vec<u32>> {
    let mut walk = Walk::new(want, budget);
    walk.go(order, holds)?;
    Some(walk.found)
}

/// Names a look-up walk probes under one taking of every shard's lock
/// (`State::page_by_look_up`): some hundreds of microseconds.
const WALK_CHUNK: usize = 4_096;

/// A walk under way (`walk`), which may go on over the order a slice at a time.
struct Walk {
    want: usize,
    budget: usize,
    /// The ids kept so far.
    found: Vec<u32>,
    /// The names probed so far.
    probed: usize,
}

impl Walk {
    fn new(want: usize, budget: usize) -> Self {
        Self {
            want,
            budget,
            found: Vec::new(),
            probed: 0,
        }
    }

    /// Goes on over `order`, the names after those probed so far: whether it has found
    /// `want` (else `order` ended first); `None` once given up (`walk`).
    fn go(&mut self, order: &[u32], mut holds: impl FnMut(u32) -> bool) -> Option<bool> {
        for &o in order {
            if self.found.len() == self.want {
                return Some(true);
            }
            let slow = self.probed >= WALK_PATIENCE
                && self.probed.saturating_mul(self.want)
                    > self.budget.saturating_mul(self.found.len() + 1);
            if self.probed == self.budget || slow {
                return None;
            }
            self.probed += 1;
            if holds(o) {
                self.found.push(o);
            }
        }
        Some(self.found.len() == self.want)
    }
}

/// The ids of `order` (ids in name order) named after `after`.
fn from_after<'o>(order: &'o [u32], all: Names<'_>, after: &str) -> &'o [u32] {
    &order[order.partition_point(|&o| all.name(o) <= after)..]
}

/// A page from a walk of the names in order (`walked`, the ids it kept, the page's and
/// one more if there are) and the objects named since the generation was built
/// (`since`, ids, which the order does not have), merged by name, with whether more
/// follow.
fn page_of_walk(
    all: Names<'_>,
    walked: Vec<u32>,
    since: Vec<u32>,
    after: &str,
    limit: usize,
) -> Listing {
    let named = |o: u32| (all.name(o), o);
    let mut since: Vec<(&str, u32)> = since
        .into_iter()
        .map(named)
        .filter(|&(name, _)| name > after)
        .collect();
    since.sort_unstable();
    let more = walked.len() + since.len() > limit;
    let walked = walked.into_iter().map(named);
    listing(all, merge_by_name(walked, since, limit), more)
}

/// The listing of `names`, (name, id) pairs of `all`: only the page's `Arc`s are cloned.
fn listing(all: Names<'_>, names: Vec<(&str, u32)>, more: bool) -> Listing {
    Listing {
        objects: names
            .into_iter()
            .filter_map(|(_, o)| all.get(o).cloned())
            .collect(),
        more,
    }
}

/// The first `limit` of two lists of (name, id) sorted by name, merged.
fn merge_by_name<'n>(
    a: impl Iterator<Item = (&'n str, u32)>,
    b: Vec<(&'n str, u32)>,
    limit: usize,
) -> Vec<(&'n str, u32)> {
    let (mut a, mut b) = (a.peekable(), b.into_iter().peekable());
    let mut merged = Vec::new();
    while merged.len() < limit {
        let next = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) if y < x => b.next(),
            (Some(_), _) => a.next(),
            (None, _) => b.next(),
        };
        match next {
            Some(named) => merged.push(named),
            None => break,
        }
    }
    merged
}

/// The union of two sorted lists of ids, sorted, each id once.
fn merge_sorted(a: Vec<u32>, b: &[u32]) -> Vec<u32> {
    debug_assert!(a.is_sorted() && b.is_sorted());
    if b.is_empty() {
        return a;
    }
    let mut merged = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => {
                merged.push(a[i]);
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                merged.push(b[j]);
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                merged.push(a[i]);
                i += 1;
                j += 1;
            }
        }
    }
    merged.extend_from_slice(&a[i..]);
    merged.extend_from_slice(&b[j..]);
    merged
}

/// A page of a listing: names in order, and whether more follow the last one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// The page's names, sorted.
    pub objects: Vec<Arc<str>>,
    /// Whether names after the page's last one were left out by its limit.
    pub more: bool,
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::ops::Bound::{Excluded, Unbounded};

    use super::super::tests::row;
    use super::super::StateBuilder;
    use super::*;

    thread_local! {
        /// Each listing's walk on this thread: its plan, and whether it gave a page (else
        /// it was given up for the pass). A listing by the pass alone adds nothing.
        pub(super) static LISTED: std::cell::RefCell<Vec<(Plan, bool)>> = const {
            std::cell::RefCell::new(Vec::new())
        };
    }

    /// A page of a listing is the first `limit` names after `after`, whichever way it is
    /// picked (a heap under `PAGE_BY_HEAP`, a selection from there), with object ids in
    /// an order unrelated to the names'.
    #[test]
    fn a_page_is_the_first_names_after_the_cursor() {
        let mut rng = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |n: u64| {
            rng = rng.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (rng >> 33) % n
        };
        let mut builder = StateBuilder::new();
        let mut names: Vec<String> = (0..3_000)
            .map(|_| format!("doc:{}", next(1 << 40)))
            .collect();
        for name in &names {
            builder.tuple("u", name, "read", None);
        }
        let state = builder.finish();
        names.sort_unstable();
        names.dedup();
        for limit in [1, 2, 7, 100, PAGE_BY_HEAP - 1, PAGE_BY_HEAP, 2_999, 5_000] {
            for after in ["", "doc:", "doc:5", names[1_000].as_str(), "doc:~"] {
                let expected: Vec<&String> = names.iter().filter(|n| n.as_str() > after).collect();
                let page = state.objects_of("u", "read", after, limit, &mut Now::lazy());
                let listed: Vec<&str> = page.objects.iter().map(|o| &**o).collect();
                let want: Vec<&str> = expected.iter().take(limit).map(|n| n.as_str()).collect();
                assert_eq!(listed, want, "limit {limit} after {after:?}");
                assert_eq!(
                    page.more,
                    expected.len() > limit,
                    "limit {limit} after {after:?}"
                );
            }
        }
    }

    /// Listings found by walking the names in order, by a pass over the grants, and by a
    /// walk given up for the pass, all against the rows they come from: subjects that hold
    /// most objects, half, a few, all but with the permission asked on few, thousands (in
    /// chunks), expiring grants and `*`'s, before and after writes that name new objects
    /// (not in the order) and revoke others.
    #[test]
    fn listings_agree_with_the_rows_whichever_way_they_are_found() {
        const OBJECTS: u64 = 6_000;
        const NOW: i64 = 1_000_000;
        let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |n: u64| {
            rng = rng.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (rng >> 33) % n
        };
        // (subject, object) to its rows: (permission, expires_at).
        type Model = BTreeMap<(String, String), Vec<(String, Option<i64>)>>;
        let mut model = Model::new();
        let names: Vec<String> = (0..OBJECTS)
            .map(|_| format!("doc:{}", next(1 << 40)))
            .collect();
        let mut builder = StateBuilder::new();
        for (i, name) in names.iter().enumerate() {
            let mut rows = Vec::new();
            let i = i as u64;
            // Most of them; a few expiring, before and after `NOW`.
            if next(10) != 0 {
                let expires_at = match next(20) {
                    0 => Some(NOW - 1),
                    1 => Some(NOW + 1),
                    _ => None,
                };
                rows.push(("dense", "read", expires_at));
            }
            if i.is_multiple_of(2) {
                rows.push(("half", "read", None));
            }
            if next(300) == 0 {
                rows.push(("sparse", "read", None));
            }
            rows.push(("mixed", if next(50) == 0 { "read" } else { "write" }, None));
            if next(200) == 0 {
                rows.push(("*", "read", None));
            }
            for (subject, permission, expires_at) in rows {
                builder.tuple(subject, name, permission, expires_at);
                model
                    .entry((subject.to_owned(), name.clone()))
                    .or_default()
                    .push((permission.to_owned(), expires_at));
            }
        }
        // `*` as an object: first in the order, as '*' sorts before letters.
        builder.tuple("sparse", "*", "read", None);
        model.insert(("sparse".into(), "*".into()), vec![("read".into(), None)]);
        let state = builder.finish();
        let subjects = ["dense", "half", "sparse", "mixed", "*", "nobody"];
        let check_all = |model: &Model, next: &mut dyn FnMut(u64) -> u64| {
            let mut afters = vec![String::new(), "doc:".into(), "doc:5".into(), "doc:~".into()];
            for _ in 0..4 {
                let name = &names[next(OBJECTS) as usize];
                afters.push(name.clone());
                afters.push(format!("{name}0"));
            }
            for subject in subjects {
                for permission in ["read", "write", "none"] {
                    let holds = |s: &str, o: &str| {
                        model
                            .get(&(s.to_owned(), o.to_owned()))
                            .is_some_and(|rows| {
                                rows.iter()
                                    .any(|(p, e)| p == permission && e.is_none_or(|e| e > NOW))
                            })
                    };
                    let all: BTreeSet<&str> = model
                        .keys()
                        .map(|(_, o)| o.as_str())
                        .filter(|o| holds(subject, o) || holds("*", o))
                        .collect();
                    for after in &afters {
                        for limit in [1, 3, 100, PAGE_BY_HEAP + 1, usize::MAX] {
                            let expected: Vec<&str> = all
                                .range::<str, _>((Excluded(after.as_str()), Unbounded))
                                .copied()
                                .collect();
                            let page = state.objects_of(
                                subject,
                                permission,
                                after,
                                limit,
                                &mut Now::fixed(NOW),
                            );
                            let listed: Vec<&str> = page.objects.iter().map(|o| &**o).collect();
                            let what =
                                format!("{subject} {permission} after {after:?} limit {limit}");
                            assert_eq!(listed, expected[..expected.len().min(limit)], "{what}");
                            assert_eq!(page.more, expected.len() > limit, "{what}");
                            let mut now = Now::fixed(NOW);
                            if let Some(quick) = state.objects_within(
                                subject,
                                permission,
                                after,
                                limit,
                                &mut now,
                                Some(QUICK_LISTING),
                            ) {
                                assert_eq!(quick, page, "{what}, quick");
                            }
                        }
                    }
                }
            }
        };
        // One listing's walks, for `subject` and `read`, `limit` from the start.
        let walks = |subject: &str, limit: usize| {
            LISTED.with(|listed| listed.borrow_mut().clear());
            state.objects_of(subject, "read", "", limit, &mut Now::fixed(NOW));
            LISTED.with(|listed| listed.borrow().clone())
        };
        let look_up = |listed: Vec<(Plan, bool)>| match listed[..] {
            [(Plan::LookUp { .. }, found)] => Some(found),
            _ => None,
        };
        check_all(&model, &mut next);
        assert_eq!(look_up(walks("dense", 100)), Some(true));
        assert_eq!(walks("dense", usize::MAX), [(Plan::Bits, true)]);
        assert_eq!(walks("half", 100), [(Plan::Bits, true)]);
        assert_eq!(walks("sparse", 100), []);
        assert_eq!(
            look_up(walks("mixed", 100)),
            Some(false),
            "few `read`: the walk is given up"
        );

        // New names (after the order), and revokes, through the writer; `*` too.
        for k in 0..300 {
            let (subject, name) = match k % 3 {
                0 => ("dense", format!("doc:{}", next(1 << 40))),
                1 => ("sparse", names[next(OBJECTS) as usize].clone()),
                _ => ("*", format!("new:{k}")),
            };
            let rows = if next(4) == 0 {
                vec![]
            } else {
                vec![row("read", None)]
            };
            state.set_grant(subject, &name, &rows);
            let key = (subject.to_owned(), name);
            if rows.is_empty() {
                model.remove(&key);
            } else {
                model.insert(key, vec![("read".to_owned(), None)]);
            }
        }
        for name in names.iter().take(1_000) {
            state.set_grant("dense", name, &[]);
            model.remove(&("dense".to_owned(), name.clone()));
        }
        check_all(&model, &mut next);
        // Fewer of them, and `*` holds more: a look-up walk pays off for a shorter page.
        assert_eq!(look_up(walks("dense", 10)), Some(true));
        assert_eq!(walks("dense", usize::MAX), [(Plan::Bits, true)]);
    }

    /// A look-up walk that probes more names than `WALK_CHUNK` (here ~5,000: one name in
    /// 50 held with the permission) goes on where it stopped each time it takes the
    /// locks again, with `*` (holding `read` on ten more, every shard locked) and without
    /// (`view`, the subject's shard): the page is the one a pass finds.
    #[test]
    fn a_long_look_up_walk_goes_on_across_chunks() {
        const OBJECTS: usize = 40_000;
        let mut builder = StateBuilder::new();
        for o in 0..OBJECTS {
            let name = format!("doc:{o:05}");
            if o % 50 == 0 {
                builder.tuple("u", &name, "read", None);
                builder.tuple("u", &name, "view", None);
            } else {
                builder.tuple("u", &name, "write", None);
            }
        }
        for o in 1..=10 {
            builder.tuple("*", &format!("doc:{o:05}"), "read", None);
        }
        let state = builder.finish();
        for (permission, public) in [("read", 1..11), ("view", 0..0)] {
            LISTED.with(|listed| listed.borrow_mut().clear());
            let page = state.objects_of("u", permission, "", 100, &mut Now::lazy());
            let listed = LISTED.with(|listed| listed.take());
            assert!(
                matches!(listed[..], [(Plan::LookUp { budget }, true)] if budget > WALK_CHUNK),
                "{permission}: {listed:?}"
            );
            let expected: Vec<String> = (0..OBJECTS)
                .filter(|o| o % 50 == 0 || public.contains(o))
                .map(|o| format!("doc:{o:05}"))
                .take(100)
                .collect();
            let names: Vec<&str> = page.objects.iter().map(|o| &**o).collect();
            assert_eq!(names, expected, "{permission}");
            assert!(page.more, "{permission}");
        }
    }

    /// A walk stops at `want`, gives up at its budget, and past its patience as soon as
    /// its pace says the page would take more than the budget; one without a budget
    /// walks to the end.
    #[test]
    fn a_walk_gives_up_when_its_pace_says_it_would_pass_its_budget() {
        let order: Vec<u32> = (0..100_000).collect();
        assert_eq!(walk(&order, 10, 50, |_| true), Some((0..10).collect()));
        assert_eq!(walk(&order, 10, 50, |o| o >= 60), None, "the budget");
        // One name in 100: 101 of them in 10,001 names, within a budget of 20,000.
        let found = walk(&order, 101, 20_000, |o| o % 100 == 0);
        assert_eq!(found.map(|f| f.len()), Some(101));
        // One in 1,000 would take 100,001: given up once its patience is spent.
        let mut probed = 0;
        let found = walk(&order, 101, 20_000, |o| {
            probed += 1;
            o % 1_000 == 0
        });
        assert_eq!((found, probed), (None, WALK_PATIENCE));
        let found = walk(&order, 101, usize::MAX, |o| o % 1_000 == 0);
        assert_eq!(found.map(|f| f.len()), Some(100));
    }

    /// A listing is quick when it is small for its plan and needs no sort of the names: a
    /// page of a subject of few grants at once, a page of a large subject once the names
    /// are sorted, a whole list of thousands never; and when its walk finds the page
    /// within the bound: a walk that does not is given up, not sent to the pass.
    #[test]
    fn quick_listings_are_small_and_need_no_sort() {
        let mut builder = StateBuilder::new();
        for o in 0..20_000 {
            let name = format!("doc:{o}");
            builder.tuple("large", &name, "read", None);
            if o % 1_000 == 0 {
                builder.tuple("few", &name, "read", None);
            }
            // Reads on one name in 500: a walk finds 100 of them in 50,000 names.
            let mixed = if o % 500 == 0 { "read" } else { "write" };
            builder.tuple("mixed", &name, mixed, None);
        }
        let state = builder.finish();
        let quick = |subject: &str, limit: usize| {
            let quick = state.objects_within(
                subject,
                "read",
                "",
                limit,
                &mut Now::lazy(),
                Some(QUICK_LISTING),
            );
            if let Some(page) = &quick {
                let all = state.objects_of(subject, "read", "", limit, &mut Now::lazy());
                assert_eq!((&page.objects, page.more), (&all.objects, all.more));
            }
            quick.is_some()
        };
        assert!(quick("few", 100));
        assert!(quick("few", usize::MAX));
        assert!(quick("nobody", usize::MAX));
        assert!(!quick("large", 100), "the names are not sorted yet");
        state.objects_of("large", "read", "", 100, &mut Now::lazy());
        assert!(quick("large", 100));
        assert!(!quick("large", 5_000));
        assert!(!quick("large", usize::MAX));
        LISTED.with(|listed| listed.borrow_mut().clear());
        assert!(!quick("mixed", 100), "the walk is given up");
        let listed = LISTED.with(|listed| listed.take());
        assert!(
            matches!(listed[..], [(Plan::LookUp { budget }, false)] if budget == QUICK_LISTING / 20),
            "{listed:?}"
        );
        // Cheap to find, but 1,900 names to copy and write.
        let mut builder = StateBuilder::new();
        for o in 0..2_000 {
            if o < 1_900 {
                builder.tuple("most", &format!("doc:{o}"), "read", None);
            } else {
                builder.tuple("other", &format!("doc:{o}"), "read", None);
            }
        }
        let state = builder.finish();
        state.objects_of("most", "read", "", 1, &mut Now::lazy());
        let quick = |limit| {
            state
                .objects_within(
                    "most",
                    "read",
                    "",
                    limit,
                    &mut Now::lazy(),
                    Some(QUICK_LISTING),
                )
                .is_some()
        };
        assert!(quick(100));
        assert!(!quick(usize::MAX));
    }
}
