//! Single checks to one shard sent to its daemons together.
//!
//! A single check through the router costs the router a request to a daemon (its hyper
//! client's write and read, the pool) and the daemon a request of its own, where a batch
//! of a hundred costs either about what one check does. So while a shard has
//! [`SENDING_PER_DAEMON`] requests of single checks in flight for each of its daemons,
//! the checks that come meanwhile wait, and go together, as one batch, when one of those
//! requests is answered: under load the checks of many clients share a request to the
//! daemon, and below that a check goes at once, alone and as it came, so no check waits
//! for a timer.
//!
//! Each check's answer is what the daemon would have answered it alone: a batch's result
//! and revision become `{"allowed":…,"revision":…}`, the body a daemon writes; a batch the
//! daemon refuses (a check it finds invalid, or of another shard) has each of its checks
//! sent again alone, so that each gets its own answer and error; a 503 (not loaded,
//! behind, overloaded) is every check's answer, as it would have been each one's; and
//! when no daemon of the shard answers a request, its checks and every check waiting
//! meanwhile get the router's 502 or 504 (not sent again to wait out the same daemons: a
//! check waits for at most a request in flight and then its own). Only a check of
//! `subject`, `permission`, `object` (or none) and `at_least` (or none) is coalesced:
//! anything else in its query, and it goes alone as it came.
//!
//! A check with `at_least` waits only when the shard's answers have already passed its
//! token (carried a revision above it: a revision is a watermark, every transaction
//! below it applied; the highest seen is [`Waiting::seen`]). Its batch carries the
//! highest token of its checks, one a daemon of the shard has passed, so no check in it
//! waits on a write not applied yet. A check whose token the shard's answers have not
//! passed goes at once, alone, not counted among the requests in flight. A batch with
//! tokens answered 503 (a daemon of the shard behind the others) has each check sent
//! again alone, for its own answer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use axum::body::{Body, HttpBody};
use axum::http::{HeaderValue, Method, Request, Response, StatusCode};
use serde::Serialize;
use tokio::sync::oneshot;

use super::{failed, json_body, Answer, Failure, Forward, Group, PartAnswer, Router, Set};

/// Requests of single checks in flight for each daemon of a shard before the next checks
/// wait to go together. Two measured as fast as no coalescing with 4 clients and 1.8x
/// with 32, where one gave 0.8x with 4 (a check waited for another's round trip more
/// often than it saved one) and three 1.7x with 32 (benches/README.md, "The router's
/// hop").
const SENDING_PER_DAEMON: usize = 2;

/// Most checks sent in one batch.
const MAX_BATCH: usize = 256;

/// Most bytes of checks' JSON in one batch, so that it stays under the 64 KiB (head and
/// body) a daemon's keep-alive loop answers in place (a larger one leaves that connection
/// with hyper). Names are up to 1,024 bytes: 256 checks of short names fit many times
/// over; checks of long ones go fewer at a time.
const MAX_BATCH_BYTES: usize = 60 * 1024;

/// How many checks of the given JSON sizes, in order, go in the next batch: at most
/// [`MAX_BATCH`] and [`MAX_BATCH_BYTES`], and at least one.
fn batch_len(sizes: impl Iterator<Item = usize>) -> usize {
    let mut bytes = 0;
    sizes
        .take(MAX_BATCH)
        .take_while(|size| {
            bytes += size;
            bytes <= MAX_BATCH_BYTES
        })
        .count()
        .max(1)
}

/// The single checks waiting to go to a shard, and how many requests of them are in
/// flight (at most [`SENDING_PER_DAEMON`] a daemon of the shard).
#[derive(Default)]
pub(super) struct Waiting {
    queue: Mutex<Queue>,
    /// The highest revision the shard's answers to checks have carried: a check whose
    /// `at_least` is below it may wait with the others. An atomic beside the queue's
    /// lock, since answers raise it without the queue.
    seen: AtomicU64,
}

#[derive(Default)]
struct Queue {
    checks: Vec<Queued>,
    sending: usize,
}

struct Queued {
    check: Check,
    answer: oneshot::Sender<Answer>,
}

/// A plain single check: its target (path and query) as it came, and its fields decoded.
pub(super) struct Check {
    target: String,
    subject: String,
    permission: String,
    object: String,
    /// Its `at_least` token, written as digits.
    at_least: Option<u64>,
}

impl Check {
    /// The check `request` asks, when it is a `GET /v1/check` without a body whose query
    /// has `subject`, `permission` and maybe `object` and an `at_least` of digits, each
    /// once, and nothing else, all valid UTF-8; else `None` (the request goes alone, as
    /// it came).
    pub(super) fn of(request: &Request<Body>) -> Option<Self> {
        if request.method() != Method::GET
            || request.uri().path() != "/v1/check"
            || !HttpBody::is_end_stream(request.body())
        {
            return None;
        }
        let target = request.uri().path_and_query()?.as_str();
        let (_, query) = target.split_once('?')?;
        let (mut subject, mut permission, mut object, mut at_least) = (None, None, None, None);
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            let slot = match &*key {
                "subject" => &mut subject,
                "permission" => &mut permission,
                "object" => &mut object,
                "at_least" => &mut at_least,
                _ => return None,
            };
            if slot.is_some() || value.contains(char::REPLACEMENT_CHARACTER) {
                return None;
            }
            *slot = Some(value.into_owned());
        }
        // Digits only: any other token (empty, spaced, signed) is the daemon's to read.
        let at_least = match at_least {
            None => None,
            Some(token) if token.bytes().all(|b| b.is_ascii_digit()) => Some(token.parse().ok()?),
            Some(_) => return None,
        };
        Some(Self {
            target: target.to_owned(),
            subject: subject?,
            permission: permission?,
            object: object.unwrap_or_default(),
            at_least,
        })
    }

    /// The subject it is about.
    pub(super) fn subject(&self) -> &str {
        &self.subject
    }

    /// About the bytes it takes in a batch's JSON (`{"subject":…,"permission":…,"object":…},`;
    /// names that need escapes take more).
    fn json_len(&self) -> usize {
        43 + self.subject.len() + self.permission.len() + self.object.len()
    }
}

impl Waiting {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An answer of the shard's carried `revision`.
    fn saw(&self, revision: u64) {
        self.seen.fetch_max(revision, Ordering::Relaxed);
    }
}

/// When a check goes to its shard.
enum Go {
    /// At once, alone, counted in flight.
    Now(Check),
    /// At once, alone, not counted: the shard's answers have not passed its token.
    Past(Check),
    /// With the checks waiting with it: its answer to come.
    Later(oneshot::Receiver<Answer>),
}

/// One check of a batch, as a daemon reads it.
#[derive(Serialize)]
struct BatchCheck<'a> {
    subject: &'a str,
    permission: &'a str,
    object: &'a str,
}

#[derive(Serialize)]
struct BatchBody<'a> {
    checks: Vec<BatchCheck<'a>>,
    /// The highest of the checks' tokens, as a token's text.
    #[serde(skip_serializing_if = "Option::is_none")]
    at_least: Option<String>,
}

/// A request in flight to a shard, for its checks: when it ends (answered, or dropped
/// with a client gone), the checks that waited meanwhile are sent, or the shard has one
/// request fewer in flight.
struct Turn {
    router: Router,
    set: Arc<Set>,
    shard: usize,
}

impl Drop for Turn {
    fn drop(&mut self) {
        let runtime = tokio::runtime::Handle::try_current().ok();
        let mut queue = self.set.groups[self.shard].waiting.lock();
        // Outside a runtime (the router is going) nothing more is sent: the waiting
        // checks' answers are dropped with them.
        let Some(runtime) = runtime.filter(|_| !queue.checks.is_empty()) else {
            queue.checks.clear();
            queue.sending -= 1;
            return;
        };
        let take = batch_len(queue.checks.iter().map(|queued| queued.check.json_len()));
        let batch: Vec<Queued> = queue.checks.drain(..take).collect();
        drop(queue);
        // The turn passes, with the checks that waited, to a task of their own, so that
        // this request's answer does not wait for theirs; that task's turn passes on when
        // it ends (or panics) as this one did.
        let next = Self {
            router: self.router.clone(),
            set: Arc::clone(&self.set),
            shard: self.shard,
        };
        runtime.spawn(async move {
            let turn = next;
            turn.router
                .answer_together(&turn.set, turn.shard, batch)
                .await;
        });
    }
}

impl Router {
    /// Answers `check`, of shard `shard` of `set`: at once and alone when the shard has
    /// fewer than [`SENDING_PER_DAEMON`] requests of checks in flight a daemon, else with
    /// the checks that wait with it, once one of those is answered.
    pub(super) async fn check(&self, set: &Arc<Set>, shard: usize, check: Check) -> Answer {
        let group = &set.groups[shard];
        let go = {
            let mut queue = group.waiting.lock();
            if queue.sending < SENDING_PER_DAEMON * group.daemons.len() {
                queue.sending += 1;
                Go::Now(check)
            } else if check
                .at_least
                .is_some_and(|token| token >= group.waiting.seen.load(Ordering::Relaxed))
            {
                Go::Past(check)
            } else {
                let (answer, waiting) = oneshot::channel();
                queue.checks.push(Queued { check, answer });
                Go::Later(waiting)
            }
        };
        match go {
            Go::Now(check) => {
                let _turn = Turn {
                    router: self.clone(),
                    set: Arc::clone(set),
                    shard,
                };
                self.alone(group, check.target).await
            }
            Go::Past(check) => self.alone(group, check.target).await,
            Go::Later(waiting) => waiting.await.unwrap_or_else(|_| {
                failed(
                    group,
                    &Failure::broken("the check's batch was dropped".into()),
                )
            }),
        }
    }

    /// Sends the check of `target` alone to `group`'s daemons: their answer, or when none
    /// answered, the router's 502 or 504, which is also the answer of every check waiting
    /// for the shard meanwhile (else each would wait out the same daemons again). The
    /// revision of an answer raises what the shard is known to have reached.
    async fn alone(&self, group: &Group, target: String) -> Answer {
        let answer = match self.send(group, &Forward::get(target)).await {
            Ok(answer) => answer,
            Err(failure) => {
                self.fail_waiting(group, &failure);
                return failed(group, &failure);
            }
        };
        if answer.status() != StatusCode::OK {
            return answer.map(Body::new);
        }
        let (head, body) = answer.into_parts();
        match axum::body::to_bytes(Body::new(body), usize::MAX).await {
            Ok(bytes) => {
                if let Some(revision) = revision_of(&bytes) {
                    group.waiting.saw(revision);
                }
                Response::from_parts(head, Body::from(bytes))
            }
            Err(error) => failed(group, &Failure::broken(error.to_string())),
        }
    }

    /// Answers every check waiting for `group` with `failure`: no daemon of the shard
    /// answered a request sent while they waited.
    fn fail_waiting(&self, group: &Group, failure: &Failure) {
        let waiting = std::mem::take(&mut group.waiting.lock().checks);
        for queued in waiting {
            let _ = queued.answer.send(failed(group, failure));
        }
    }

    /// Answers each of `batch`'s checks, through one request to the shard's daemons when
    /// there are several.
    async fn answer_together(&self, set: &Set, shard: usize, batch: Vec<Queued>) {
        let group = &set.groups[shard];
        if let [_] = &batch[..] {
            let queued = batch.into_iter().next().expect("one check");
            let answer = self.alone(group, queued.check.target).await;
            let _ = queued.answer.send(answer);
            return;
        }
        let at_least = batch.iter().filter_map(|q| q.check.at_least).max();
        let body = BatchBody {
            checks: batch
                .iter()
                .map(|q| BatchCheck {
                    subject: &q.check.subject,
                    permission: &q.check.permission,
                    object: &q.check.object,
                })
                .collect(),
            at_least: at_least.map(|token| token.to_string()),
        };
        let body = serde_json::to_vec(&body).expect("strings serialize");
        let content_type = Some(HeaderValue::from_static("application/json"));
        let answer = match self
            .send(group, &Forward::batch(content_type, body.into()))
            .await
        {
            Ok(answer) => answer,
            Err(failure) => {
                for queued in batch {
                    let _ = queued.answer.send(failed(group, &failure));
                }
                self.fail_waiting(group, &failure);
                return;
            }
        };
        let (head, body) = answer.into_parts();
        let bytes = match axum::body::to_bytes(Body::new(body), usize::MAX).await {
            Ok(bytes) => bytes,
            Err(error) => {
                let failure = Failure::broken(error.to_string());
                for queued in batch {
                    let _ = queued.answer.send(failed(group, &failure));
                }
                return;
            }
        };
        match head.status {
            StatusCode::OK => {
                let part = serde_json::from_slice::<PartAnswer>(&bytes)
                    .ok()
                    .filter(|part| part.results.len() == batch.len());
                let Some(part) = part else {
                    let failure = Failure::broken("an answer that is not the batch's".into());
                    for queued in batch {
                        let _ = queued.answer.send(failed(group, &failure));
                    }
                    return;
                };
                self.0
                    .coalesced
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                if let Ok(revision) = part.revision.parse() {
                    group.waiting.saw(revision);
                }
                for (queued, allowed) in batch.into_iter().zip(part.results) {
                    let body = format!(
                        "{{\"allowed\":{allowed},\"revision\":{}}}",
                        serde_json::Value::String(part.revision.clone())
                    );
                    let _ = queued.answer.send(json_body(StatusCode::OK, body.into()));
                }
            }
            StatusCode::SERVICE_UNAVAILABLE if at_least.is_none() => {
                // Not loaded, behind, overloaded: each check's answer alone too.
                for queued in batch {
                    let mut answer = Response::new(Body::from(bytes.clone()));
                    *answer.status_mut() = head.status;
                    *answer.headers_mut() = head.headers.clone();
                    let _ = queued.answer.send(answer);
                }
            }
            _ => {
                // A check the daemon refused, or a daemon behind the batch's highest
                // token (another check's, maybe): each alone, for its own answer.
                let alone = batch.into_iter().map(|queued| async move {
                    let answer = self.relay(group, &Forward::get(queued.check.target)).await;
                    let _ = queued.answer.send(answer);
                });
                futures_util::future::join_all(alone).await;
            }
        }
    }
}

/// The revision of a daemon's answer to a check, `{"allowed":…,"revision":"N"}`.
fn revision_of(body: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\"revision\":\"";
    let at = body.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let digits = &body[at..];
    let end = digits.iter().position(|b| !b.is_ascii_digit())?;
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_revision_is_read_from_a_check_answer() {
        assert_eq!(
            revision_of(br#"{"allowed":true,"revision":"755"}"#),
            Some(755)
        );
        assert_eq!(revision_of(br#"{"allowed":true,"revision":""}"#), None);
        assert_eq!(revision_of(br#"{"allowed":true}"#), None);
        assert_eq!(revision_of(br#"{"revision":"12"#), None);
    }

    #[test]
    fn a_batch_holds_at_most_256_checks_and_60_kib_and_at_least_one() {
        assert_eq!(batch_len(std::iter::repeat_n(80, 300)), MAX_BATCH);
        assert_eq!(batch_len(std::iter::repeat_n(80, 3)), 3);
        assert_eq!(batch_len(std::iter::repeat_n(3_100, 100)), 19);
        assert_eq!(batch_len([70_000, 80].into_iter()), 1);
        assert_eq!(batch_len([80, 70_000, 80].into_iter()), 1);
    }
}
