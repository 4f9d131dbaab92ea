//! The usage outbox: group commit of usage events.
//!
//! A request hands its event to [`Outbox::commit`] and waits. One writer task takes
//! everything queued (at most [`MAX_BATCH`]), stores it in one transaction
//! (`Store::insert_usage_events`) and answers every waiter with that one outcome — a
//! failed write fails them all. There is no timer: an idle writer writes the first event
//! at once, and the events that arrive while a write is in flight form the next batch,
//! so batching costs nothing when the gateway is quiet and grows with load
//! (`tests::events_that_arrive_during_a_write_form_the_next_batch`).
//! [`OutboxWriter::shutdown`] waits for every commit task started through the outbox,
//! stores whatever is queued and stops the writer: nothing handed over is lost.
//!
//! Started with a [`Spool`] ([`Outbox::start_spooled`]), a batch the database cannot take
//! because it is unavailable goes to the spool file instead, and its waiters are answered
//! once it is fsynced there; see `spool.rs` for the drain that brings it back.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tollgate_store::{Store, StoreError, UsageEvent};

use crate::spool::Spool;

/// Most events stored in one transaction.
pub const MAX_BATCH: usize = 256;
/// Events waiting for the writer before [`Outbox::commit`] waits for room. Every queued
/// event belongs to a request that is waiting for it, so this only bounds a burst.
const QUEUE_CAPACITY: usize = 4 * 1024;

/// Why an event was not stored.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommitError {
    /// The transaction holding the event failed; every event of it failed with it.
    #[error("storing usage events failed: {0}")]
    Store(Arc<StoreError>),
    /// The database was unavailable or events were already spooled, and appending to the
    /// spool file failed.
    #[error("spooling usage events to local disk failed: {0}")]
    Spool(Arc<std::io::Error>),
    /// The outbox was shut down before the event reached it.
    #[error("the usage outbox is stopped")]
    Stopped,
}

/// One event and the request waiting for its outcome.
struct Pending {
    event: UsageEvent,
    committed: oneshot::Sender<Result<(), CommitError>>,
}

/// The request side: cheap to clone, one per request.
#[derive(Clone)]
pub struct Outbox {
    queue: mpsc::Sender<Pending>,
    tasks: TaskTracker,
    counters: Arc<Counters>,
}

/// The writer's side, held by whoever shuts the server down. Dropping it without
/// [`OutboxWriter::shutdown`] leaves the writer running until every [`Outbox`] is gone.
pub struct OutboxWriter {
    tasks: TaskTracker,
    stop: CancellationToken,
    writer: JoinHandle<()>,
    counters: Arc<Counters>,
    /// The spool's drain task and what stops it, when there is a spool.
    drain: Option<(CancellationToken, JoinHandle<()>)>,
}

impl Outbox {
    /// Starts the writer task on the current runtime. A failed write fails its waiters.
    pub fn start(store: Arc<dyn Store>) -> (Outbox, OutboxWriter) {
        Self::start_with(store, None)
    }

    /// Starts the writer task and the spool's drain task on the current runtime. A batch
    /// the database cannot take because it is unavailable is spooled, and so is every
    /// batch after it until the drain has emptied the spool.
    pub fn start_spooled(store: Arc<dyn Store>, spool: Arc<Spool>) -> (Outbox, OutboxWriter) {
        Self::start_with(store, Some(spool))
    }

    fn start_with(store: Arc<dyn Store>, spool: Option<Arc<Spool>>) -> (Outbox, OutboxWriter) {
        let (queue, receiver) = mpsc::channel(QUEUE_CAPACITY);
        let counters = Arc::new(Counters::default());
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let drain = spool.as_ref().map(|spool| {
            let stop = CancellationToken::new();
            (stop.clone(), spool.spawn_drain(Arc::clone(&store), stop))
        });
        let writer = tokio::spawn(write_batches(
            store,
            spool,
            receiver,
            stop.clone(),
            Arc::clone(&counters),
        ));
        let outbox = Outbox {
            queue,
            tasks: tasks.clone(),
            counters: Arc::clone(&counters),
        };
        let writer = OutboxWriter {
            tasks,
            stop,
            writer,
            counters,
            drain,
        };
        (outbox, writer)
    }

    /// Resolves once `event` is committed (or its batch failed).
    pub async fn commit(&self, event: UsageEvent) -> Result<(), CommitError> {
        let queued_at = Instant::now();
        let (committed, outcome) = oneshot::channel();
        self.queue
            .send(Pending { event, committed })
            .await
            .map_err(|_| CommitError::Stopped)?;
        // The writer ending without an answer (it cannot, short of a panic) is a failure.
        let outcome = outcome.await.unwrap_or(Err(CommitError::Stopped));
        self.counters.waits.record(queued_at.elapsed());
        outcome
    }

    /// Runs `work` (a request's commit and settlement) on `runtime` as a task that
    /// [`OutboxWriter::shutdown`] waits for.
    pub fn spawn_on<F>(&self, work: F, runtime: &tokio::runtime::Handle) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tasks.spawn_on(work, runtime)
    }

    /// Events waiting for the writer right now.
    pub fn queued(&self) -> usize {
        self.queue.max_capacity() - self.queue.capacity()
    }

    pub fn stats(&self) -> OutboxStats {
        self.counters.stats()
    }
}

impl OutboxWriter {
    /// Waits for every commit task started through the outbox, stores every event still
    /// queued, then stops the writer. Events handed over afterwards fail with
    /// [`CommitError::Stopped`]. Call it after the server stopped taking requests.
    /// With a spool, the drain makes one last attempt and stops; what it could not store
    /// stays in the spool file for the next start.
    pub async fn shutdown(self) -> OutboxStats {
        self.tasks.close();
        self.tasks.wait().await;
        self.stop.cancel();
        if let Err(e) = self.writer.await {
            tracing::error!(error = %e, "the usage event writer ended abnormally");
        }
        if let Some((stop, drain)) = self.drain {
            stop.cancel();
            if let Err(e) = drain.await {
                tracing::error!(error = %e, "the usage spool's drain ended abnormally");
            }
        }
        self.counters.stats()
    }

    pub fn stats(&self) -> OutboxStats {
        self.counters.stats()
    }
}

/// The writer: one batch at a time, until stopped and drained (or every sender is gone).
async fn write_batches(
    store: Arc<dyn Store>,
    spool: Option<Arc<Spool>>,
    mut queue: mpsc::Receiver<Pending>,
    stop: CancellationToken,
    counters: Arc<Counters>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut is_stopping = false;
    loop {
        let received = if is_stopping {
            queue.recv_many(&mut batch, MAX_BATCH).await
        } else {
            tokio::select! {
                biased;
                () = stop.cancelled() => {
                    // No new events; the ones already queued are still received.
                    queue.close();
                    is_stopping = true;
                    continue;
                }
                received = queue.recv_many(&mut batch, MAX_BATCH) => received,
            }
        };
        if received == 0 {
            break;
        }
        store_batch(store.as_ref(), spool.as_deref(), &mut batch, &counters).await;
    }
}

/// Stores `batch` in one transaction (or spools it) and answers each of its waiters;
/// leaves it empty.
async fn store_batch(
    store: &dyn Store,
    spool: Option<&Spool>,
    batch: &mut Vec<Pending>,
    counters: &Counters,
) {
    let (events, waiters): (Vec<UsageEvent>, Vec<_>) = batch
        .drain(..)
        .map(|pending| (pending.event, pending.committed))
        .unzip();
    let outcome = commit_events(store, spool, &events, counters).await;
    if let Err(e) = &outcome {
        tracing::error!(events = events.len(), error = %e, "storing a batch of usage events failed");
    }
    for waiter in waiters {
        // A waiter that is gone belonged to a task that was cancelled; nothing to tell.
        let _ = waiter.send(outcome.clone());
    }
}

/// Makes `events` durable: in the store, or in the spool while it is spooling or when the
/// store is unavailable.
async fn commit_events(
    store: &dyn Store,
    spool: Option<&Spool>,
    events: &[UsageEvent],
    counters: &Counters,
) -> Result<(), CommitError> {
    if let Some(spool) = spool {
        // Behind events already spooled, never ahead of them.
        if let Some(appended) = spool.append_if_spooling(events).await {
            counters.note_spooled(events.len(), appended.is_ok());
            return appended.map_err(|e| CommitError::Spool(Arc::new(e)));
        }
    }
    let stored = store.insert_usage_events(events).await;
    counters.note_batch(events.len(), stored.is_ok());
    match (stored, spool) {
        (Ok(()), _) => Ok(()),
        (Err(e), Some(spool)) if e.is_unavailable() => {
            let appended = spool.append(events, &e).await;
            counters.note_spooled(events.len(), appended.is_ok());
            appended.map_err(|spooling| {
                tracing::error!(error = %spooling, "spooling usage events to local disk failed");
                CommitError::Store(Arc::new(e))
            })
        }
        (Err(e), _) => Err(CommitError::Store(Arc::new(e))),
    }
}

/// What the outbox has done since it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxStats {
    /// Transactions attempted (committed or failed).
    pub transactions: u64,
    pub failed_transactions: u64,
    /// Events in those transactions.
    pub events: u64,
    pub largest_batch: u64,
    /// Events written to the spool file instead of the database.
    pub spooled_events: u64,
    /// Time from [`Outbox::commit`] to its answer — what the durable commit adds to a
    /// response — at the 50th and 99th percentile and the longest (0 before any).
    pub wait_p50: Duration,
    pub wait_p99: Duration,
    pub wait_max: Duration,
}

#[derive(Default)]
struct Counters {
    transactions: AtomicU64,
    failed_transactions: AtomicU64,
    events: AtomicU64,
    largest_batch: AtomicU64,
    spooled_events: AtomicU64,
    waits: WaitHistogram,
}

impl Counters {
    fn note_batch(&self, events: usize, is_committed: bool) {
        let events = u64::try_from(events).unwrap_or(u64::MAX);
        self.transactions.fetch_add(1, Ordering::Relaxed);
        if !is_committed {
            self.failed_transactions.fetch_add(1, Ordering::Relaxed);
        }
        self.events.fetch_add(events, Ordering::Relaxed);
        self.largest_batch.fetch_max(events, Ordering::Relaxed);
    }

    fn note_spooled(&self, events: usize, is_spooled: bool) {
        if is_spooled {
            let events = u64::try_from(events).unwrap_or(u64::MAX);
            self.spooled_events.fetch_add(events, Ordering::Relaxed);
        }
    }

    fn stats(&self) -> OutboxStats {
        OutboxStats {
            transactions: self.transactions.load(Ordering::Relaxed),
            failed_transactions: self.failed_transactions.load(Ordering::Relaxed),
            events: self.events.load(Ordering::Relaxed),
            largest_batch: self.largest_batch.load(Ordering::Relaxed),
            spooled_events: self.spooled_events.load(Ordering::Relaxed),
            wait_p50: self.waits.quantile(0.50),
            wait_p99: self.waits.quantile(0.99),
            wait_max: Duration::from_micros(self.waits.max.load(Ordering::Relaxed)),
        }
    }
}

/// Sub-buckets per power of two: quantiles are exact to 1/16 (6 %).
const SUB_BUCKETS: usize = 16;
/// Powers of two of microseconds covered (up to about 9 hours; longer waits count as 9).
const OCTAVES: usize = 32;

/// Commit waits in log-linear microsecond buckets: lock-free, fixed size, and precise
/// enough to report p50 / p99 (`tests::wait_quantiles_are_within_a_sixteenth`).
struct WaitHistogram {
    buckets: Vec<AtomicU64>,
    max: AtomicU64,
}

impl Default for WaitHistogram {
    fn default() -> Self {
        Self {
            buckets: (0..OCTAVES * SUB_BUCKETS)
                .map(|_| AtomicU64::new(0))
                .collect(),
            max: AtomicU64::new(0),
        }
    }
}

impl WaitHistogram {
    /// Values below 16 µs have a bucket each; above, the bucket is the power of two and
    /// the next four bits.
    fn bucket_of(micros: u64) -> usize {
        let sub = SUB_BUCKETS as u64;
        if micros < sub {
            return usize::try_from(micros).unwrap_or(0);
        }
        let octave = u64::from(63 - micros.leading_zeros()) - 3;
        let mantissa = (micros >> (octave - 1)) - sub;
        usize::try_from(octave * sub + mantissa)
            .unwrap_or(usize::MAX)
            .min(OCTAVES * SUB_BUCKETS - 1)
    }

    /// The largest value a bucket holds.
    fn upper_bound(bucket: usize) -> u64 {
        let (sub, bucket) = (SUB_BUCKETS as u64, bucket as u64);
        if bucket < sub {
            return bucket;
        }
        let (octave, mantissa) = (bucket / sub, bucket % sub);
        ((sub + mantissa + 1) << (octave - 1)) - 1
    }

    fn record(&self, wait: Duration) {
        let micros = u64::try_from(wait.as_micros()).unwrap_or(u64::MAX);
        if let Some(bucket) = self.buckets.get(Self::bucket_of(micros)) {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        self.max.fetch_max(micros, Ordering::Relaxed);
    }

    /// The smallest bucket bound at or above a `q` share of the recorded waits.
    fn quantile(&self, q: f64) -> Duration {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return Duration::ZERO;
        }
        // The rank of the quantile, 1-based: ceil(q * total), at least 1.
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (bucket, count) in counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                let bound = Self::upper_bound(bucket).min(self.max.load(Ordering::Relaxed));
                return Duration::from_micros(bound);
            }
        }
        Duration::from_micros(self.max.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::path::PathBuf;

    use sqlx::{Connection as _, SqliteConnection};
    use tollgate_core::ids::{new_id, IdKind};
    use tollgate_core::Timestamp;
    use tollgate_store::{PageRequest, PostgresStore, SqliteStore, UsageFilter, UsageStatus};

    /// A SQLite file in a directory of its own, removed on drop.
    struct TempDb {
        dir: PathBuf,
        store: Arc<SqliteStore>,
    }

    impl TempDb {
        async fn new() -> Self {
            let dir = std::env::temp_dir().join(new_id(IdKind::Event));
            let url = format!("sqlite://{}", dir.join("t.db").display());
            let store = Arc::new(SqliteStore::open(&url).await.unwrap());
            Self { dir, store }
        }

        fn store(&self) -> Arc<dyn Store> {
            self.store.clone()
        }

        /// A second connection to the file, as another process would have.
        async fn other_connection(&self) -> SqliteConnection {
            let url = format!("sqlite://{}", self.dir.join("t.db").display());
            SqliteConnection::connect(&url).await.unwrap()
        }

        async fn stored(&self) -> Vec<UsageEvent> {
            let page = PageRequest {
                limit: 10_000,
                after: None,
            };
            self.store
                .list_usage_events(&UsageFilter::default(), page)
                .await
                .unwrap()
                .items
        }
    }

    impl Drop for TempDb {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn event(n: usize) -> UsageEvent {
        UsageEvent {
            idempotency_key: format!("evt_{n}"),
            timestamp: Timestamp(1_796_320_404_123),
            request_id: format!("req_{n}"),
            request_metadata: None,
            model_slug: "acme/m".into(),
            external_entity_id: "cust-1".into(),
            api_key_prefix: "tg_0123456789abc".into(),
            group_id: "grp_1".into(),
            workspace_id: "ws_1".into(),
            status: UsageStatus::Completed,
            input_tokens: 10,
            output_tokens: 2,
            cached_input_tokens: 0,
            is_estimated: false,
        }
    }

    /// Waits (at most 5 s) until `outbox` holds `n` queued events.
    async fn until_queued(outbox: &Outbox, n: usize) {
        for _ in 0..500 {
            if outbox.queued() == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(outbox.queued(), n, "events never queued");
    }

    /// Takes the file's write lock from another connection: the writer's next
    /// transaction waits (busy timeout) until the returned connection rolls back.
    async fn hold_write_lock(db: &TempDb) -> SqliteConnection {
        let mut other = db.other_connection().await;
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut other)
            .await
            .unwrap();
        other
    }

    async fn release_write_lock(mut other: SqliteConnection) {
        sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
    }

    #[tokio::test]
    async fn an_idle_outbox_writes_the_first_event_at_once() {
        let db = TempDb::new().await;
        let (outbox, _writer) = Outbox::start(db.store());
        for n in 0..3 {
            let started = Instant::now();
            outbox.commit(event(n)).await.unwrap();
            // No timer: one event alone is written right away.
            assert!(started.elapsed() < Duration::from_secs(1));
        }
        assert_eq!(db.stored().await, vec![event(0), event(1), event(2)]);
        let stats = outbox.stats();
        assert_eq!(
            (stats.transactions, stats.events, stats.largest_batch),
            (3, 3, 1)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_that_arrive_during_a_write_form_the_next_batch() {
        let db = TempDb::new().await;
        let (outbox, _writer) = Outbox::start(db.store());
        let lock = hold_write_lock(&db).await;
        // The writer takes the first event and waits on the lock with it...
        let first = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.commit(event(0)).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        until_queued(&outbox, 0).await;
        // ... while 50 more arrive.
        let mut later = Vec::new();
        for n in 1..=50 {
            let outbox = outbox.clone();
            later.push(tokio::spawn(async move { outbox.commit(event(n)).await }));
        }
        until_queued(&outbox, 50).await;
        release_write_lock(lock).await;
        first.await.unwrap().unwrap();
        for commit in later {
            commit.await.unwrap().unwrap();
        }
        let stats = outbox.stats();
        assert_eq!(
            (stats.transactions, stats.events, stats.largest_batch),
            (2, 51, 50)
        );
        assert_eq!(db.stored().await.len(), 51);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hundred_concurrent_commits_share_transactions() {
        let db = TempDb::new().await;
        let (outbox, _writer) = Outbox::start(db.store());
        let start = Arc::new(tokio::sync::Barrier::new(100));
        let mut commits = Vec::new();
        for n in 0..100 {
            let (outbox, start) = (outbox.clone(), Arc::clone(&start));
            commits.push(tokio::spawn(async move {
                start.wait().await;
                outbox.commit(event(n)).await
            }));
        }
        for commit in commits {
            commit.await.unwrap().unwrap();
        }
        let stats = outbox.stats();
        assert_eq!(stats.events, 100);
        assert!(
            stats.transactions < 100,
            "100 events took {} transactions",
            stats.transactions
        );
        let mut ids: Vec<String> = db
            .stored()
            .await
            .into_iter()
            .map(|e| e.request_id)
            .collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 100);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_write_fails_every_waiter_and_the_writer_carries_on() {
        let db = TempDb::new().await;
        let (outbox, _writer) = Outbox::start(db.store());
        let mut other = db.other_connection().await;
        sqlx::query(
            "CREATE TRIGGER refuse_all BEFORE INSERT ON usage_events \
             BEGIN SELECT RAISE(ABORT, 'disk full'); END",
        )
        .execute(&mut other)
        .await
        .unwrap();
        let mut commits = Vec::new();
        for n in 0..20 {
            let outbox = outbox.clone();
            commits.push(tokio::spawn(async move { outbox.commit(event(n)).await }));
        }
        for commit in commits {
            let outcome = commit.await.unwrap();
            assert!(
                matches!(&outcome, Err(CommitError::Store(e)) if e.to_string().contains("disk full")),
                "{outcome:?}"
            );
        }
        let stats = outbox.stats();
        assert_eq!(stats.events, 20);
        assert_eq!(stats.failed_transactions, stats.transactions);
        assert!(db.stored().await.is_empty());

        sqlx::query("DROP TRIGGER refuse_all")
            .execute(&mut other)
            .await
            .unwrap();
        outbox.commit(event(20)).await.unwrap();
        assert_eq!(db.stored().await, vec![event(20)]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_waits_for_commit_tasks_and_flushes_the_queue() {
        let db = TempDb::new().await;
        let (outbox, writer) = Outbox::start(db.store());
        let lock = hold_write_lock(&db).await;
        let runtime = tokio::runtime::Handle::current();
        let commit = |n: usize| {
            let outbox = outbox.clone();
            async move { outbox.commit(event(n)).await }
        };
        // The writer takes one event and waits on the lock with it...
        let mut commits = vec![outbox.spawn_on(commit(0), &runtime)];
        tokio::time::sleep(Duration::from_millis(100)).await;
        until_queued(&outbox, 0).await;
        // ... while 49 more queue up.
        for n in 1..50 {
            commits.push(if n % 2 == 0 {
                // A request's commit task, which shutdown waits for...
                outbox.spawn_on(commit(n), &runtime)
            } else {
                // ... and a commit nobody tracks, only queued.
                tokio::spawn(commit(n))
            });
        }
        until_queued(&outbox, 49).await;
        let shutdown = tokio::spawn(writer.shutdown());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!shutdown.is_finished(), "shutdown must wait for the flush");
        release_write_lock(lock).await;
        let stats = shutdown.await.unwrap();
        assert_eq!((stats.events, stats.failed_transactions), (50, 0));
        for commit in commits {
            commit.await.unwrap().unwrap();
        }
        assert_eq!(db.stored().await.len(), 50);
        // Handed over after the shutdown: refused at once, never left waiting.
        let late = tokio::time::timeout(Duration::from_secs(1), outbox.commit(event(99))).await;
        assert!(matches!(late, Ok(Err(CommitError::Stopped))), "{late:?}");
    }

    /// Waits (at most 60 s) until the spool's drain has emptied it.
    async fn until_drained(spool: &Spool) {
        for _ in 0..600 {
            if !spool.is_spooling().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the spool was never drained");
    }

    /// SQLite locked by another process past its busy timeout: the batch is spooled and
    /// its waiters told it is durable; once the lock is gone every event is stored once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_locked_database_spools_and_every_event_arrives_once() {
        let db = TempDb::new().await;
        let spool = Arc::new(Spool::open(db.dir.join("spool")).await.unwrap());
        let (outbox, writer) = Outbox::start_spooled(db.store(), Arc::clone(&spool));
        outbox.commit(event(0)).await.unwrap();
        let lock = hold_write_lock(&db).await;
        // Waits out the busy timeout, then goes to the spool: still a success.
        outbox.commit(event(1)).await.unwrap();
        assert!(spool.is_spooling().await);
        let mut commits = Vec::new();
        for n in 2..=40 {
            let outbox = outbox.clone();
            commits.push(tokio::spawn(async move { outbox.commit(event(n)).await }));
        }
        for commit in commits {
            commit.await.unwrap().unwrap();
        }
        release_write_lock(lock).await;
        until_drained(&spool).await;
        outbox.commit(event(41)).await.unwrap();
        let stored = db.stored().await;
        assert_eq!(stored.len(), 42);
        let mut keys: Vec<&str> = stored.iter().map(|e| e.idempotency_key.as_str()).collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), 42);
        // In commit order: 0 directly, 1 first into the spool, 41 after the drain.
        assert_eq!(stored[0], event(0));
        assert_eq!(stored[1], event(1));
        assert_eq!(stored[41], event(41));
        let stats = writer.shutdown().await;
        assert_eq!((stats.spooled_events, stats.failed_transactions), (40, 1));
    }

    /// A real PostgreSQL stopped as by a crash and started again on the same port.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_committed_while_postgres_is_down_are_all_stored_when_it_returns() {
        let mut server = match tollgate_testkit::PostgresServer::start().await {
            Ok(server) => server,
            Err(e) => {
                println!("skipped: no PostgreSQL server to start: {e}");
                return;
            }
        };
        let store = Arc::new(PostgresStore::connect(&server.url()).await.unwrap());
        let dir = std::env::temp_dir().join(new_id(IdKind::Event));
        let spool = Arc::new(Spool::open(&dir).await.unwrap());
        let (outbox, writer) = Outbox::start_spooled(store.clone(), Arc::clone(&spool));
        for n in 0..10 {
            outbox.commit(event(n)).await.unwrap();
        }
        server.stop().await.unwrap();
        let mut commits = Vec::new();
        for n in 10..310 {
            let outbox = outbox.clone();
            commits.push(tokio::spawn(async move { outbox.commit(event(n)).await }));
        }
        for commit in commits {
            commit.await.unwrap().unwrap();
        }
        assert!(spool.is_spooling().await);
        server.start_again().await.unwrap();
        until_drained(&spool).await;
        let stats = writer.shutdown().await;
        assert_eq!(stats.spooled_events, 300);
        let page = PageRequest {
            limit: 10_000,
            after: None,
        };
        let stored = store
            .list_usage_events(&UsageFilter::default(), page)
            .await
            .unwrap()
            .items;
        let mut keys: Vec<String> = stored.into_iter().map(|e| e.idempotency_key).collect();
        assert_eq!(keys.len(), 310);
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), 310);
        store.close().await;
        drop(spool);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn wait_quantiles_are_within_a_sixteenth() {
        let histogram = WaitHistogram::default();
        assert_eq!(histogram.quantile(0.5), Duration::ZERO);
        for micros in 1..=1000 {
            histogram.record(Duration::from_micros(micros));
        }
        // The 500th value falls in [496, 511], the 990th in [960, 991].
        assert_eq!(histogram.quantile(0.50), Duration::from_micros(511));
        assert_eq!(histogram.quantile(0.99), Duration::from_micros(991));
        assert_eq!(histogram.quantile(1.0), Duration::from_micros(1000));
        for micros in (0..100_000).chain([u64::from(u32::MAX), 1 << 34]) {
            let bucket = WaitHistogram::bucket_of(micros);
            let bound = WaitHistogram::upper_bound(bucket);
            assert!(bound >= micros, "{micros} above its bucket's bound {bound}");
            assert!(
                bound - micros <= bound / 16,
                "{micros}: bound {bound} too coarse"
            );
            assert_eq!(WaitHistogram::bucket_of(bound), bucket);
        }
        // Beyond the last bucket, waits still count.
        assert_eq!(
            WaitHistogram::bucket_of(u64::MAX),
            OCTAVES * SUB_BUCKETS - 1
        );
    }
}
