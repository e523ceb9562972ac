//! Reading a node's change log, point-in-time reads and backups, and a log
//! consumer that keeps its checkpoint in Lattice itself.
//!
//! A log belongs to one node (positions are that node's), so every call
//! here names the node by its index in the client's endpoint list, like
//! [`Client::watch`].

use crate::{Client, Error};
use lattice_core::crdt::{Op, ValueView};
use lattice_core::log::{LogCursor, Logged};
use lattice_core::proto::client::{BackupSummary, ReencryptSummary, RequestBody, Response, LOG_MAX_CHANGES};
use lattice_core::Key;
use std::collections::VecDeque;
use std::time::Duration;

/// How long [`Client::backup`] waits for the node's answer.
pub const BACKUP_WAIT: Duration = Duration::from_secs(3_600);

/// A page of a node's change log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogPage {
    /// The changes, each partition's in order.
    pub changes: Vec<Logged>,
    /// Where to go on from.
    pub next: LogCursor,
    /// How many partitions the node's log has.
    pub partitions: u16,
}

impl Client {
    /// One page of node `i`'s change log: the changes after `from` (`None`:
    /// the oldest retained) of keys starting with `prefix`, in `partitions`
    /// (empty: all), at most `limit`; an empty page waits up to `wait` for a
    /// change (keep `wait` below the client's timeout). A position the log
    /// no longer retains fails with [`Error::Trimmed`].
    pub async fn log_read(
        &self,
        i: usize,
        partitions: &[u16],
        from: Option<LogCursor>,
        prefix: &str,
        limit: u32,
        wait: Duration,
    ) -> Result<LogPage, Error> {
        let body = RequestBody::LogRead {
            partitions: partitions.to_vec(),
            from,
            prefix: prefix.to_string(),
            limit,
            wait_ms: wait.as_millis().min(u128::from(u64::MAX)) as u64,
        };
        match self.request_to(i, body).await? {
            Response::Log {
                changes,
                next,
                partitions,
            } => Ok(LogPage {
                changes,
                next,
                partitions,
            }),
            r => Err(Error::Protocol(format!("unexpected answer {r:?}"))),
        }
    }

    /// `key`'s value on node `i` as of `at_ms` (milliseconds since the
    /// Unix epoch, on the node's hybrid logical clock). Fails with
    /// [`Error::Trimmed`] when the node no longer holds the key's whole
    /// history.
    pub async fn get_at(&self, i: usize, key: &Key, at_ms: u64) -> Result<Option<ValueView>, Error> {
        let body = RequestBody::ReadAt {
            key: key.clone(),
            at_ms,
        };
        match self.request_to(i, body).await? {
            Response::Value { value, .. } => Ok(value),
            r => Err(Error::Protocol(format!("unexpected answer {r:?}"))),
        }
    }

    /// Has node `i` write a consistent backup into `dir` on its host (a
    /// directory that must not exist yet). Needs the admin token. Waits for
    /// the answer up to [`BACKUP_WAIT`], not the client's timeout: the node
    /// answers once the whole store is copied.
    pub async fn backup(&self, i: usize, dir: &str) -> Result<BackupSummary, Error> {
        let body = RequestBody::Backup { dir: dir.to_string() };
        match self.request_within(i, body, BACKUP_WAIT.max(self.timeout)).await? {
            Response::BackedUp(s) => Ok(s),
            r => Err(Error::Protocol(format!("unexpected answer {r:?}"))),
        }
    }

    /// Has node `i` re-encrypt every value it stores under its newest data
    /// key, making a new one first with `rotate` (encryption at rest must
    /// be on). Needs the admin token; waits up to [`BACKUP_WAIT`], as the
    /// node answers once its whole store was walked.
    pub async fn reencrypt(&self, i: usize, rotate: bool) -> Result<ReencryptSummary, Error> {
        let body = RequestBody::Reencrypt { rotate };
        match self.request_within(i, body, BACKUP_WAIT.max(self.timeout)).await? {
            Response::Reencrypted(s) => Ok(s),
            r => Err(Error::Protocol(format!("unexpected answer {r:?}"))),
        }
    }
}

/// A log consumer with a durable checkpoint: it reads node `node`'s log
/// from where its checkpoint says, and [`LogConsumer::commit`] stores the
/// position of everything handed out so far as a register in Lattice
/// (`_consumers/NAME`), so a consumer started again under the same name
/// resumes there. Delivery is at least once: what was handed out after the
/// last commit is handed out again after a restart. A checkpoint of another
/// log (the node's data was rebuilt) fails with [`Error::Trimmed`].
pub struct LogConsumer<'a> {
    client: &'a Client,
    node: usize,
    name: Key,
    prefix: String,
    partitions: Vec<u16>,
    /// Position after the changes fetched (`None`: nothing fetched yet and
    /// no checkpoint, so from the oldest retained).
    fetched: Option<LogCursor>,
    /// Fetched changes not handed out yet, each partition's in order.
    pending: VecDeque<Logged>,
    /// Changes per page.
    pub page: u32,
    /// How long an empty page waits for a change.
    pub wait: Duration,
}

impl<'a> LogConsumer<'a> {
    /// Opens consumer `name` on node `node` of `client` for keys starting
    /// with `prefix` in `partitions` (empty: all), at its stored checkpoint
    /// (or the oldest retained change, the first time).
    pub async fn open(
        client: &'a Client,
        node: usize,
        name: &str,
        prefix: &str,
        partitions: &[u16],
    ) -> Result<LogConsumer<'a>, Error> {
        let key = Key::new(format!("_consumers/{name}")).map_err(|e| Error::Config(e.to_string()))?;
        let cursor = match client.read(&key).await? {
            Some(ValueView::Register(Some(bytes))) => {
                let text = String::from_utf8(bytes.0)
                    .map_err(|_| Error::Protocol(format!("the checkpoint {key} is not text")))?;
                Some(LogCursor::parse(&text).map_err(|e| Error::Protocol(format!("the checkpoint {key}: {e}")))?)
            }
            None | Some(ValueView::Register(None)) => None,
            Some(other) => {
                return Err(Error::TypeMismatch(format!(
                    "the checkpoint {key} holds {other:?}, not a register"
                )))
            }
        };
        Ok(LogConsumer {
            client,
            node,
            name: key,
            prefix: prefix.to_string(),
            partitions: partitions.to_vec(),
            fetched: cursor,
            pending: VecDeque::new(),
            page: LOG_MAX_CHANGES,
            wait: Duration::from_secs(1),
        })
    }

    /// The next change, waiting for one (up to [`LogConsumer::wait`] per
    /// page asked; `None` when none came meanwhile).
    pub async fn next(&mut self) -> Result<Option<Logged>, Error> {
        if self.pending.is_empty() {
            let page = self
                .client
                .log_read(
                    self.node,
                    &self.partitions,
                    self.fetched.clone(),
                    &self.prefix,
                    self.page,
                    self.wait,
                )
                .await?;
            self.pending.extend(page.changes);
            self.fetched = Some(page.next);
        }
        Ok(self.pending.pop_front())
    }

    /// How many fetched changes wait to be handed out: the next
    /// [`LogConsumer::next`] asks the node only when this is 0.
    pub fn buffered(&self) -> usize {
        self.pending.len()
    }

    /// The position after every change handed out so far: the end of the
    /// pages fetched, moved back in each partition to its first change not
    /// handed out yet. (Changes a page skipped, for the prefix or the
    /// policy, are behind it too; and a partition the consumer never read a
    /// change of keeps the page's start, never 0, which retention may have
    /// dropped.)
    pub fn position(&self) -> Option<LogCursor> {
        let mut c = self.fetched.clone()?;
        for l in &self.pending {
            if l.seq < c.get(l.partition) {
                c.set(l.partition, l.seq);
            }
        }
        Some(c)
    }

    /// Stores the position after every change handed out so far as the
    /// consumer's checkpoint.
    pub async fn commit(&self) -> Result<(), Error> {
        let Some(c) = self.position() else { return Ok(()) };
        self.client
            .write(vec![(self.name.clone(), Op::LwwSet(c.to_text().into_bytes().into()))])
            .await
            .map(|_| ())
    }
}
