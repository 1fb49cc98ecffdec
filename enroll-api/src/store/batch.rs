//! Group commit of a token's exchanges (PostgreSQL; ADR-0027).
//!
//! A fleet's agents share one enrollment token, so every exchange consumes
//! a use of the same row. Written one by one, each exchange took that row's
//! lock until its own commit, and the others queued behind it in the
//! database (wake-ups, re-checks, one WAL flush each). Here a token's
//! exchanges queue in the service instead: while one write of the token is
//! in flight, later ones wait, and the next write takes all of them (up to
//! [`MAX_GROUP`]) as one statement in one transaction
//! (`DialectSql::enroll_many`): one lock, one update, one commit. There is
//! no timer: a lone exchange is written at once, and groups only form
//! while the database is busy with the previous one.
//!
//! The writer is a task of its own, so a caller that goes away (a client
//! that hangs up) cannot strand the others. If a group's write fails, each
//! of its exchanges is written again alone, so one bad row (or a transient
//! error) answers for itself and not for its neighbours.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::oneshot;

use oneprotect_identity::TokenId;

use super::sql::enroll_group;
use super::{AnyStore, Enrollment, StoreError};

/// Most exchanges written by one statement.
pub(crate) const MAX_GROUP: usize = 32;

/// One exchange waiting for its token's writer, and where its answer goes:
/// whether it took a use (and its rows were written).
struct Waiting {
    enrollment: Enrollment,
    answer: oneshot::Sender<Result<bool, StoreError>>,
}

/// The exchanges waiting per token; a token is in the map exactly while a
/// writer task for it runs.
#[derive(Default)]
pub(crate) struct EnrollGroups(Mutex<HashMap<TokenId, Vec<Waiting>>>);

// The queued enrollments (token hashes, certificates) stay out of debug
// output.
impl std::fmt::Debug for EnrollGroups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tokens = self.0.lock().map_or(0, |m| m.len());
        f.debug_struct("EnrollGroups")
            .field("tokens_writing", &tokens)
            .finish()
    }
}

impl EnrollGroups {
    /// Queues `e` behind its token's writer (starting one when none runs)
    /// and waits for its outcome: `Ok(true)` when it took a use.
    pub(crate) async fn submit(
        self: &Arc<Self>,
        store: &AnyStore,
        e: Enrollment,
    ) -> Result<bool, StoreError> {
        let (tx, rx) = oneshot::channel();
        let token = e.token_id;
        let start = {
            let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            let start = !map.contains_key(&token);
            map.entry(token).or_default().push(Waiting {
                enrollment: e,
                answer: tx,
            });
            start
        };
        if start {
            let writer = Writer {
                groups: Arc::clone(self),
                token,
                done: false,
            };
            tokio::spawn(writer.run(store.clone()));
        }
        // A writer that stopped without answering (a panic) dropped the
        // sender: nothing is known about this exchange's write.
        rx.await
            .map_err(|_| StoreError::Unavailable(sqlx::Error::WorkerCrashed))?
    }
}

/// The one writer of a token's queue. It removes the token's entry when it
/// finds the queue empty; dropped before that (a panic), it removes the
/// entry anyway, so the next exchange starts a new writer and none waits
/// for a writer that is gone (their senders drop with the entry: they get
/// an error, not a hang).
struct Writer {
    groups: Arc<EnrollGroups>,
    token: TokenId,
    /// The queue was found empty and the entry removed (under the lock):
    /// the entry in the map now, if any, is a newer writer's.
    done: bool,
}

impl Writer {
    /// The next group of the token's queue, or `None` (and the entry gone)
    /// when it is empty.
    fn next_group(&mut self) -> Option<Vec<Waiting>> {
        let mut map = self.groups.0.lock().unwrap_or_else(PoisonError::into_inner);
        let queue = map.get_mut(&self.token)?;
        if queue.is_empty() {
            map.remove(&self.token);
            self.done = true;
            return None;
        }
        let n = queue.len().min(MAX_GROUP);
        Some(queue.drain(..n).collect())
    }

    async fn run(mut self, store: AnyStore) {
        while let Some(group) = self.next_group() {
            let enrollments: Vec<&Enrollment> = group.iter().map(|w| &w.enrollment).collect();
            match enroll_group(&store, &enrollments).await {
                Ok(granted) => {
                    for (i, w) in group.into_iter().enumerate() {
                        let _ = w.answer.send(Ok(i < granted));
                    }
                }
                Err(e) if group.len() == 1 => {
                    if let Some(w) = group.into_iter().next() {
                        let _ = w.answer.send(Err(e));
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, exchanges = group.len(),
                        "a group of enrollments failed; writing each alone");
                    for w in group {
                        let r = enroll_group(&store, &[&w.enrollment]).await;
                        let _ = w.answer.send(r.map(|granted| granted == 1));
                    }
                }
            }
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // After a normal end the entry is gone (or a newer writer's); after
        // a panic this drops the waiting senders.
        if self.done {
            return;
        }
        self.groups
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.token);
    }
}
