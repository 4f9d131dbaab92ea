//! The usage spool: where usage events wait on local disk while the database is down.
//!
//! When the outbox cannot store a batch because the database is unavailable
//! ([`StoreError::is_unavailable`]), it appends the batch here as JSON lines and fsyncs
//! before answering the batch's requests: the events are durable, the responses can end.
//! While anything is spooled every later batch is appended too, so events reach the
//! database in the order they were committed. A drain task retries about every second: it
//! stores the oldest file's events in transactions of at most [`DRAIN_CHUNK`] (idempotent
//! on `idempotency_key`, so a file replayed after a crash halfway through is stored once)
//! and deletes a file only after its last transaction committed
//! (`tests::a_failed_chunk_is_retried_and_every_event_is_stored_once`).
//!
//! On disk: `<dir>/<owner>.lock`, held with an exclusive lock by the live process, and
//! `<dir>/<owner>/<number>.jsonl`, its files (at most [`SEGMENT_BYTES`] each). Several
//! instances may share a directory; on start an instance takes over the files of every
//! owner whose lock is free — a process that stopped — so nothing spooled is left behind
//! (`tests::files_of_a_stopped_process_are_replayed_in_order`). A last line cut short by
//! a crash is skipped with a warning (`tests::a_torn_last_line_is_skipped`).

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt as _;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tollgate_core::Timestamp;
use tollgate_store::{Store, StoreError, StoreResult, UsageEvent, UsageStatus};

/// Most events the drain stores in one transaction.
pub const DRAIN_CHUNK: usize = 256;
/// A file takes appends until it holds this many bytes; the next batch starts a new one,
/// so the drain never reads more than about this much at once.
pub const SEGMENT_BYTES: u64 = 4 * 1024 * 1024;
/// Wait between two drain attempts while the database is still away.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// Where drained events are stored: the [`Store`] (tests put a wrapper in between).
pub trait UsageSink: Send + Sync {
    /// Stores `events` in one transaction, idempotent on `idempotency_key`.
    fn store_events<'a>(&'a self, events: &'a [UsageEvent]) -> BoxFuture<'a, StoreResult<()>>;
}

impl UsageSink for dyn Store {
    fn store_events<'a>(&'a self, events: &'a [UsageEvent]) -> BoxFuture<'a, StoreResult<()>> {
        self.insert_usage_events(events)
    }
}

/// An open spool directory, owned by this process while it lives.
pub struct Spool {
    root: PathBuf,
    dir: PathBuf,
    state: tokio::sync::Mutex<State>,
    /// Woken when spooling starts.
    activated: Notify,
    /// Held (locked) for as long as the spool lives: tells other processes the owner of
    /// `dir` is alive.
    _lock: std::fs::File,
    lock_path: PathBuf,
}

#[derive(Default)]
struct State {
    /// Files closed for appends, oldest first; the drain stores the front one.
    sealed: VecDeque<PathBuf>,
    /// The file appends go to.
    current: Option<Segment>,
    /// Number of the next file.
    next_number: u64,
    /// Events of `sealed.front()` already committed: a retry starts after them.
    front_committed: usize,
    /// Events stored by the drain since the spool was last empty.
    drained: u64,
    /// Files the drain deleted since the spool was last empty.
    drained_files: u64,
    /// The drain's failure is logged once per outage.
    is_failure_logged: bool,
}

impl State {
    fn is_spooling(&self) -> bool {
        !self.sealed.is_empty() || self.current.is_some()
    }

    fn seal_current(&mut self) {
        if let Some(segment) = self.current.take() {
            self.sealed.push_back(segment.path);
        }
    }
}

struct Segment {
    path: PathBuf,
    file: tokio::fs::File,
    bytes: u64,
}

/// One event as a line of a spool file. The fields are spelled out here, not derived from
/// [`UsageEvent`], so the file format only changes on purpose.
#[derive(Serialize, Deserialize)]
struct SpooledEvent {
    idempotency_key: String,
    timestamp_ms: i64,
    request_id: String,
    request_metadata: Option<String>,
    model_slug: String,
    external_entity_id: String,
    api_key_prefix: String,
    group_id: String,
    workspace_id: String,
    status: UsageStatus,
    input_tokens: u64,
    output_tokens: u64,
    cached_input_tokens: u64,
    is_estimated: bool,
}

impl From<&UsageEvent> for SpooledEvent {
    fn from(e: &UsageEvent) -> Self {
        SpooledEvent {
            idempotency_key: e.idempotency_key.clone(),
            timestamp_ms: e.timestamp.0,
            request_id: e.request_id.clone(),
            request_metadata: e.request_metadata.clone(),
            model_slug: e.model_slug.clone(),
            external_entity_id: e.external_entity_id.clone(),
            api_key_prefix: e.api_key_prefix.clone(),
            group_id: e.group_id.clone(),
            workspace_id: e.workspace_id.clone(),
            status: e.status,
            input_tokens: e.input_tokens,
            output_tokens: e.output_tokens,
            cached_input_tokens: e.cached_input_tokens,
            is_estimated: e.is_estimated,
        }
    }
}

impl From<SpooledEvent> for UsageEvent {
    fn from(e: SpooledEvent) -> Self {
        UsageEvent {
            idempotency_key: e.idempotency_key,
            timestamp: Timestamp(e.timestamp_ms),
            request_id: e.request_id,
            request_metadata: e.request_metadata,
            model_slug: e.model_slug,
            external_entity_id: e.external_entity_id,
            api_key_prefix: e.api_key_prefix,
            group_id: e.group_id,
            workspace_id: e.workspace_id,
            status: e.status,
            input_tokens: e.input_tokens,
            output_tokens: e.output_tokens,
            cached_input_tokens: e.cached_input_tokens,
            is_estimated: e.is_estimated,
        }
    }
}

impl Spool {
    /// Opens (creating it with mode 0700 when missing) the spool directory `root`, takes
    /// over the files of stopped processes and returns the spool; when it holds events,
    /// it is spooling and the drain replays them.
    pub async fn open(root: impl Into<PathBuf>) -> io::Result<Spool> {
        let root = root.into();
        let opened = tokio::task::spawn_blocking({
            let root = root.clone();
            move || open_blocking(&root)
        })
        .await
        .map_err(io::Error::other)??;
        if !opened.sealed.is_empty() {
            tracing::warn!(
                dir = %root.display(),
                files = opened.sealed.len(),
                "usage spool: replaying usage events spooled before the last stop"
            );
        }
        let state = State {
            next_number: u64::try_from(opened.sealed.len()).unwrap_or(u64::MAX) + 1,
            sealed: opened.sealed,
            ..State::default()
        };
        Ok(Spool {
            root,
            dir: opened.dir,
            state: tokio::sync::Mutex::new(state),
            activated: Notify::new(),
            _lock: opened.lock,
            lock_path: opened.lock_path,
        })
    }

    /// The spool directory given to [`Spool::open`].
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// True while some event is spooled and not yet stored.
    pub async fn is_spooling(&self) -> bool {
        self.state.lock().await.is_spooling()
    }

    /// Appends `events` when the spool is already spooling (so they stay behind the
    /// events spooled before them); `None` when it is empty and the caller should store
    /// them itself.
    pub async fn append_if_spooling(&self, events: &[UsageEvent]) -> Option<io::Result<()>> {
        let mut state = self.state.lock().await;
        if !state.is_spooling() {
            return None;
        }
        Some(self.append_locked(&mut state, events).await)
    }

    /// Appends `events`, which the database refused with `reason`, and starts spooling.
    /// Resolves once they are on disk (fsynced).
    pub async fn append(&self, events: &[UsageEvent], reason: &StoreError) -> io::Result<()> {
        let mut state = self.state.lock().await;
        let was_spooling = state.is_spooling();
        self.append_locked(&mut state, events).await?;
        if !was_spooling {
            tracing::warn!(
                events = events.len(),
                dir = %self.root.display(),
                error = %reason,
                "usage spool: the database is unavailable; spooling usage events to local disk until it returns"
            );
            self.activated.notify_one();
        }
        Ok(())
    }

    async fn append_locked(&self, state: &mut State, events: &[UsageEvent]) -> io::Result<()> {
        let mut lines = Vec::with_capacity(events.len() * 512);
        for event in events {
            serde_json::to_writer(&mut lines, &SpooledEvent::from(event))?;
            lines.push(b'\n');
        }
        let segment = match &mut state.current {
            Some(segment) => segment,
            current @ None => {
                let path = self.dir.join(format!("{:016}.jsonl", state.next_number));
                state.next_number += 1;
                current.insert(Segment {
                    file: create_segment(&self.dir, &path).await?,
                    path,
                    bytes: 0,
                })
            }
        };
        let written = async {
            segment.file.write_all(&lines).await?;
            segment.file.flush().await?;
            segment.file.sync_data().await
        }
        .await;
        match written {
            Ok(()) => {
                segment.bytes += lines.len() as u64;
                if segment.bytes >= SEGMENT_BYTES {
                    state.seal_current();
                }
                Ok(())
            }
            Err(e) => {
                // The file may end in a torn line: nothing more goes after it.
                state.seal_current();
                Err(e)
            }
        }
    }

    /// Stores every spooled event into `sink`, oldest file first, deleting each file
    /// once its events are committed. Returns true when the spool is empty, false when a
    /// transaction failed (the next call resumes where this one stopped).
    pub async fn drain<S: UsageSink + ?Sized>(&self, sink: &S) -> bool {
        loop {
            let (path, committed) = {
                let mut state = self.state.lock().await;
                if state.sealed.is_empty() {
                    // Appends move on to a new file; this one is complete.
                    state.seal_current();
                }
                match state.sealed.front() {
                    Some(path) => (path.clone(), state.front_committed),
                    None => {
                        if state.drained_files > 0 {
                            tracing::info!(
                                events = state.drained,
                                files = state.drained_files,
                                "usage spool: drained; every spooled usage event is in the database"
                            );
                        }
                        state.drained = 0;
                        state.drained_files = 0;
                        state.is_failure_logged = false;
                        return true;
                    }
                }
            };
            let events = match read_segment(&path).await {
                Ok(events) => events,
                Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "usage spool: cannot read a spool file");
                    return false;
                }
            };
            for chunk in events
                .get(committed..)
                .unwrap_or_default()
                .chunks(DRAIN_CHUNK)
            {
                if let Err(e) = sink.store_events(chunk).await {
                    let mut state = self.state.lock().await;
                    if !state.is_failure_logged {
                        state.is_failure_logged = true;
                        tracing::warn!(
                            error = %e,
                            retry_in_ms = RETRY_INTERVAL.as_millis(),
                            "usage spool: the database does not take spooled usage events yet; retrying"
                        );
                    }
                    return false;
                }
                let mut state = self.state.lock().await;
                state.front_committed += chunk.len();
                state.drained += chunk.len() as u64;
            }
            match tokio::fs::remove_file(&path).await {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "usage spool: cannot delete a drained spool file");
                    return false;
                }
            }
            let mut state = self.state.lock().await;
            state.sealed.pop_front();
            state.front_committed = 0;
            state.drained_files += 1;
        }
    }

    /// Starts the drain task: it drains whenever the spool is spooling, about every
    /// [`RETRY_INTERVAL`] until it succeeds; when `stop` is cancelled it makes one last
    /// attempt and ends.
    pub fn spawn_drain(
        self: &Arc<Self>,
        store: Arc<dyn Store>,
        stop: CancellationToken,
    ) -> JoinHandle<()> {
        let spool = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                if !spool.is_spooling().await {
                    tokio::select! {
                        biased;
                        () = spool.activated.notified() => continue,
                        () = stop.cancelled() => break,
                    }
                }
                if spool.drain(store.as_ref()).await {
                    continue;
                }
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(RETRY_INTERVAL) => {}
                }
            }
            // Whatever the outbox's last flush spooled gets one more try; what stays is
            // replayed on the next start.
            if spool.is_spooling().await {
                spool.drain(store.as_ref()).await;
            }
        })
    }
}

impl Drop for Spool {
    /// An empty spool leaves nothing behind: its directory, then its lock (in that order,
    /// so a directory is never left without the lock that lets a later start adopt it).
    /// A spool still holding events keeps both for the next start to replay.
    fn drop(&mut self) {
        let is_empty = self
            .state
            .try_lock()
            .is_ok_and(|state| !state.is_spooling());
        if is_empty && std::fs::remove_dir(&self.dir).is_ok() {
            let _ = std::fs::remove_file(&self.lock_path);
        }
    }
}

/// What [`open_blocking`] found.
struct Opened {
    dir: PathBuf,
    lock: std::fs::File,
    lock_path: PathBuf,
    sealed: VecDeque<PathBuf>,
}

/// Creates `root` and this process's own directory and lock in it, then moves the files of
/// every owner whose lock is free into the own directory, numbered in order.
fn open_blocking(root: &Path) -> io::Result<Opened> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(root)?;

    let owner = format!(
        "{}-{}",
        std::process::id(),
        tollgate_core::ids::random_base62(8)
    );
    // Locked before it gets its visible name, so no other process ever finds this lock
    // free and takes the directory over.
    let hidden = root.join(format!(".{owner}.lock.new"));
    let lock = private_file_options().open(&hidden)?;
    lock.try_lock().map_err(io::Error::from)?;
    let lock_path = root.join(format!("{owner}.lock"));
    std::fs::rename(&hidden, &lock_path)?;
    let dir = root.join(&owner);
    builder.recursive(false).create(&dir)?;

    let mut sealed = VecDeque::new();
    let mut number = 1_u64;
    let mut others: Vec<String> = Vec::new();
    for entry in std::fs::read_dir(root)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Some(other) = name.strip_suffix(".lock") {
            if other != owner && !other.starts_with('.') {
                others.push(other.to_owned());
            }
        }
    }
    others.sort();
    for other in others {
        let lock_path = root.join(format!("{other}.lock"));
        let other_lock = match std::fs::OpenOptions::new().write(true).open(&lock_path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        match other_lock.try_lock() {
            Ok(()) => {}
            // Its owner is alive and drains its own files.
            Err(std::fs::TryLockError::WouldBlock) => continue,
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
        let other_dir = root.join(&other);
        for file in segment_files(&other_dir)? {
            let to = dir.join(format!("{number:016}.jsonl"));
            std::fs::rename(&file, &to)?;
            sealed.push_back(to);
            number += 1;
        }
        match std::fs::remove_dir(&other_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(dir = %other_dir.display(), error = %e, "usage spool: cannot remove a stopped process's spool directory");
            }
        }
        // Another process starting at the same moment may have taken this owner over
        // first, or the owner itself may have removed its lock as it stopped: either way
        // the lock is gone and there is nothing left to adopt.
        remove_if_present(&lock_path)?;
    }
    sync_dir(&dir)?;
    sync_dir(root)?;
    Ok(Opened {
        dir,
        lock,
        lock_path,
        sealed,
    })
}

/// The `.jsonl` files of `dir` in name (= append) order; none when `dir` is gone.
/// Removes the file at `path`; one that is already gone is not an error.
fn remove_if_present(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

fn segment_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "jsonl") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn private_file_options() -> std::fs::OpenOptions {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
}

/// Makes a file created (or renamed) in `dir` survive a power loss.
fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

async fn create_segment(dir: &Path, path: &Path) -> io::Result<tokio::fs::File> {
    let (dir, path) = (dir.to_owned(), path.to_owned());
    tokio::task::spawn_blocking(move || {
        let file = private_file_options().open(&path)?;
        sync_dir(&dir)?;
        Ok(tokio::fs::File::from_std(file))
    })
    .await
    .map_err(io::Error::other)?
}

/// The events of a spool file, in order. A line that does not parse is skipped with a
/// warning: the last one is a write a crash cut short, any other is damage.
async fn read_segment(path: &Path) -> io::Result<Vec<UsageEvent>> {
    let bytes = tokio::fs::read(path).await?;
    let lines: Vec<&[u8]> = bytes.split(|b| *b == b'\n').collect();
    let last = lines.len().saturating_sub(1);
    let mut events = Vec::with_capacity(lines.len());
    for (index, line) in lines.into_iter().enumerate() {
        if line.is_empty() {
            continue;
        }
        match serde_json::from_slice::<SpooledEvent>(line) {
            Ok(event) => events.push(event.into()),
            Err(e) if index == last => tracing::warn!(
                file = %path.display(),
                line = index + 1,
                error = %e,
                "usage spool: skipped an incomplete last line (a write cut short by a crash)"
            ),
            Err(e) => tracing::error!(
                file = %path.display(),
                line = index + 1,
                error = %e,
                "usage spool: skipped an unreadable line"
            ),
        }
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::atomic::{AtomicUsize, Ordering};

    use tollgate_core::ids::{new_id, IdKind};
    use tollgate_store::{PageRequest, SqliteStore, UsageFilter};

    /// A directory of its own, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            Self(std::env::temp_dir().join(new_id(IdKind::Event)))
        }

        fn spool(&self) -> PathBuf {
            self.0.join("spool")
        }

        async fn store(&self) -> Arc<SqliteStore> {
            let url = format!("sqlite://{}", self.0.join("t.db").display());
            Arc::new(SqliteStore::open(&url).await.unwrap())
        }

        /// Names in the spool directory and in each directory in it, sorted.
        fn listing(&self) -> Vec<String> {
            let mut names = Vec::new();
            for entry in std::fs::read_dir(self.spool()).unwrap() {
                let entry = entry.unwrap();
                let name = entry.file_name().to_string_lossy().into_owned();
                if entry.path().is_dir() {
                    for inner in std::fs::read_dir(entry.path()).unwrap() {
                        let inner = inner.unwrap().file_name();
                        names.push(format!("{name}/{}", inner.to_string_lossy()));
                    }
                }
                names.push(name);
            }
            names.sort();
            names
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A stopped owner's lock that another starting process removed between this one
    /// opening and locking it: the takeover goes on instead of failing the start.
    #[test]
    fn removing_a_lock_that_is_already_gone_is_not_an_error() {
        let dir = TempDir::new();
        std::fs::create_dir_all(&dir.0).unwrap();
        let lock = dir.0.join("1-gone.lock");
        std::fs::write(&lock, b"").unwrap();
        assert_eq!(remove_if_present(&lock).unwrap(), ());
        assert!(!lock.exists());
        assert_eq!(remove_if_present(&lock).unwrap(), ());
        let not_a_file = dir.0.join("a-directory");
        std::fs::create_dir(&not_a_file).unwrap();
        assert!(remove_if_present(&not_a_file).is_err());
    }

    fn event(n: usize) -> UsageEvent {
        UsageEvent {
            idempotency_key: format!("evt_{n:05}"),
            timestamp: Timestamp(1_796_320_404_000 + n as i64),
            request_id: format!("req_{n}"),
            request_metadata: n.is_multiple_of(2).then(|| format!(r#"{{"n":{n}}}"#)),
            model_slug: "acme/m".into(),
            external_entity_id: "cust-1".into(),
            api_key_prefix: "tg_0123456789abc".into(),
            group_id: "grp_1".into(),
            workspace_id: "ws_1".into(),
            status: if n.is_multiple_of(3) {
                UsageStatus::ClientCancelled
            } else {
                UsageStatus::Completed
            },
            input_tokens: 10 + n as u64,
            output_tokens: 2,
            cached_input_tokens: 1,
            is_estimated: n.is_multiple_of(3),
        }
    }

    fn events(range: std::ops::Range<usize>) -> Vec<UsageEvent> {
        range.map(event).collect()
    }

    fn unavailable() -> StoreError {
        StoreError::Database(sqlx::Error::PoolTimedOut)
    }

    async fn stored(store: &SqliteStore) -> Vec<UsageEvent> {
        let page = PageRequest {
            limit: 10_000,
            after: None,
        };
        store
            .list_usage_events(&UsageFilter::default(), page)
            .await
            .unwrap()
            .items
    }

    /// A line of a spool file for `event`.
    fn line(event: &UsageEvent) -> String {
        serde_json::to_string(&SpooledEvent::from(event)).unwrap()
    }

    /// The files another process left: `<owner>.lock` (not locked) and its directory.
    fn left_behind(root: &Path, owner: &str, files: &[&str]) {
        std::fs::create_dir_all(root.join(owner)).unwrap();
        std::fs::write(root.join(format!("{owner}.lock")), "").unwrap();
        for (n, contents) in files.iter().enumerate() {
            let path = root.join(owner).join(format!("{:016}.jsonl", n + 1));
            std::fs::write(path, contents).unwrap();
        }
    }

    /// Stores into a SQLite store, records the size of every attempt, and fails the
    /// attempts whose numbers (from 1) are listed, as an unreachable database would.
    struct FlakySink {
        store: Arc<SqliteStore>,
        fail: Vec<usize>,
        attempts: AtomicUsize,
        sizes: tokio::sync::Mutex<Vec<usize>>,
    }

    impl UsageSink for FlakySink {
        fn store_events<'a>(&'a self, events: &'a [UsageEvent]) -> BoxFuture<'a, StoreResult<()>> {
            Box::pin(async move {
                let attempt = self.attempts.fetch_add(1, Ordering::SeqCst) + 1;
                self.sizes.lock().await.push(events.len());
                if self.fail.contains(&attempt) {
                    return Err(unavailable());
                }
                self.store.insert_usage_events(events).await
            })
        }
    }

    #[tokio::test]
    async fn appends_are_lines_in_order_and_only_while_spooling() {
        let dir = TempDir::new();
        let spool = Spool::open(dir.spool()).await.unwrap();
        assert!(!spool.is_spooling().await);
        // Empty: the caller stores the events itself.
        assert!(spool.append_if_spooling(&events(0..1)).await.is_none());
        spool.append(&events(0..2), &unavailable()).await.unwrap();
        assert!(spool.is_spooling().await);
        spool
            .append_if_spooling(&events(2..5))
            .await
            .unwrap()
            .unwrap();

        let files: Vec<String> = dir
            .listing()
            .into_iter()
            .filter(|name| name.ends_with(".jsonl"))
            .collect();
        assert_eq!(files.len(), 1, "{files:?}");
        assert!(files[0].ends_with("/0000000000000001.jsonl"));
        let text = String::from_utf8(std::fs::read(dir.spool().join(&files[0])).unwrap()).unwrap();
        let expected: String = events(0..5).iter().map(|e| line(e) + "\n").collect();
        assert_eq!(text, expected);
        assert_eq!(
            read_segment(&dir.spool().join(&files[0])).await.unwrap(),
            events(0..5)
        );
    }

    #[tokio::test]
    async fn an_empty_spool_leaves_nothing_behind_and_a_full_one_stays() {
        let dir = TempDir::new();
        drop(Spool::open(dir.spool()).await.unwrap());
        assert!(dir.listing().is_empty(), "{:?}", dir.listing());
        let spool = Spool::open(dir.spool()).await.unwrap();
        spool.append(&events(0..2), &unavailable()).await.unwrap();
        drop(spool);
        assert_eq!(dir.listing().len(), 3, "{:?}", dir.listing());
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn the_directory_is_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = TempDir::new();
        let spool = Spool::open(dir.spool()).await.unwrap();
        spool.append(&events(0..1), &unavailable()).await.unwrap();
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.spool()), 0o700);
        assert_eq!(mode(&spool.dir), 0o700);
        let file = spool.dir.join("0000000000000001.jsonl");
        assert_eq!(mode(&file), 0o600);
    }

    #[tokio::test]
    async fn files_of_a_stopped_process_are_replayed_in_order() {
        let dir = TempDir::new();
        let store = dir.store().await;
        {
            let first = Spool::open(dir.spool()).await.unwrap();
            first.append(&events(0..3), &unavailable()).await.unwrap();
            first
                .append_if_spooling(&events(3..7))
                .await
                .unwrap()
                .unwrap();
            // A live owner's files are its own: a second process leaves them alone.
            let second = Spool::open(dir.spool()).await.unwrap();
            assert!(!second.is_spooling().await);
        }
        // Two older files of a process that stopped before, with more events.
        left_behind(
            &dir.spool(),
            "0-older",
            &[
                &events(7..9)
                    .iter()
                    .map(|e| line(e) + "\n")
                    .collect::<String>(),
                &(line(&event(9)) + "\n"),
            ],
        );

        let spool = Spool::open(dir.spool()).await.unwrap();
        assert!(spool.is_spooling().await);
        let sink: &dyn Store = store.as_ref();
        assert!(spool.drain(sink).await);
        assert!(!spool.is_spooling().await);
        // Owners in name order ("0-older" first), each one's files in order.
        let mut expected = events(7..10);
        expected.extend(events(0..7));
        assert_eq!(stored(&store).await, expected);
        // Only the live owner's lock and (empty) directory remain.
        let listing = dir.listing();
        assert_eq!(listing.len(), 2, "{listing:?}");
        assert!(listing.iter().all(|name| !name.ends_with(".jsonl")));
    }

    #[tokio::test]
    async fn a_torn_last_line_is_skipped() {
        let dir = TempDir::new();
        let store = dir.store().await;
        let torn = line(&event(2));
        let complete_without_newline = line(&event(3));
        left_behind(
            &dir.spool(),
            "crashed",
            &[
                // A crash mid-append: the third line is cut short.
                &format!("{}\n{}\n{}", line(&event(0)), line(&event(1)), &torn[..40]),
                // Cut just before its newline: the event itself is whole.
                &complete_without_newline,
            ],
        );
        let spool = Spool::open(dir.spool()).await.unwrap();
        assert!(spool.drain(store.as_ref() as &dyn Store).await);
        let keys: Vec<String> = stored(&store)
            .await
            .into_iter()
            .map(|e| e.idempotency_key)
            .collect();
        assert_eq!(keys, ["evt_00000", "evt_00001", "evt_00003"]);
    }

    #[tokio::test]
    async fn a_failed_chunk_is_retried_and_every_event_is_stored_once() {
        let dir = TempDir::new();
        let store = dir.store().await;
        let spool = Spool::open(dir.spool()).await.unwrap();
        spool.append(&events(0..100), &unavailable()).await.unwrap();
        spool
            .append_if_spooling(&events(100..600))
            .await
            .unwrap()
            .unwrap();
        let sink = FlakySink {
            store: Arc::clone(&store),
            fail: vec![2],
            attempts: AtomicUsize::new(0),
            sizes: tokio::sync::Mutex::new(Vec::new()),
        };
        // The second transaction fails: the first 256 are stored, the file stays.
        assert!(!spool.drain(&sink).await);
        assert!(spool.is_spooling().await);
        assert_eq!(stored(&store).await.len(), 256);
        // Appends carry on behind the spooled events meanwhile.
        spool
            .append_if_spooling(&events(600..610))
            .await
            .unwrap()
            .unwrap();
        // The retry resumes at the failed chunk, and takes the later file too.
        assert!(spool.drain(&sink).await);
        assert_eq!(*sink.sizes.lock().await, [256, 256, 256, 88, 10]);
        assert_eq!(stored(&store).await, events(0..610));
        assert!(!spool.is_spooling().await);
        assert!(dir.listing().iter().all(|name| !name.ends_with(".jsonl")));
        // Empty now: new events are the caller's to store.
        assert!(spool.append_if_spooling(&events(610..611)).await.is_none());
    }

    #[tokio::test]
    async fn a_file_replayed_after_a_crash_halfway_is_stored_once() {
        let dir = TempDir::new();
        let store = dir.store().await;
        // The first 300 events of a file were stored before the process died.
        store.insert_usage_events(&events(0..300)).await.unwrap();
        let text: String = events(0..400).iter().map(|e| line(e) + "\n").collect();
        left_behind(&dir.spool(), "died", &[&text]);
        let spool = Spool::open(dir.spool()).await.unwrap();
        assert!(spool.drain(store.as_ref() as &dyn Store).await);
        assert_eq!(stored(&store).await, events(0..400));
    }
}
