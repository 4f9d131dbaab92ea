//! The data plane's configuration in memory: [`MirroredStore`] wraps a [`Store`] and
//! answers the reads of every request (API key, endpoint, secret) without a database
//! round trip, so the data plane keeps serving while the database is down (SPEC §4).
//!
//! Workspaces, live groups, endpoints and secrets are loaded in full; API keys are cached
//! on first use (positive and negative, both bounded) because a deployment may hold
//! millions. The mirror follows the configuration change log (`Store::config_changes_after`):
//! each change names an object, which is read again (or, for a key, evicted). A key's
//! group chain and workspace are assembled from the mirrored groups and workspaces at
//! every lookup, so a group patch, a group delete or a disabled workspace applies to
//! every cached key as soon as the change is applied. Writes through the mirror catch it
//! up before they return (read-your-writes); the [`Refresher`] catches up on PostgreSQL
//! notifications, on a short poll, and reloads everything now and then. Pinned by the
//! tests below and `c12_propagation_*` in `crates/tollgate/tests/it/multi_instance.rs`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::{Mutex, RwLock};
use tokio::sync::{oneshot, Notify, OnceCell};
use tokio::task::JoinHandle;
use tollgate_core::endpoint::Target;
use tollgate_core::group::MAX_DEPTH;
use tollgate_core::{Group, Timestamp};

use crate::{
    ApiKey, ConfigChange, ConfigChanges, ConfigKind, DayUsage, Endpoint, GroupFilter, GroupPatch,
    GroupWriteError, KeyGrant, ManagementKey, NewApiKey, NewEndpoint, NewGroup, NewManagementKey,
    NewSecret, NewWebhookDelivery, NewWebhookEndpoint, Page, PageRequest, PostgresStore, Secret,
    SequencedUsageEvent, Store, StoreError, StoreResult, UsageEvent, UsageFilter, WebhookAttempt,
    WebhookDelivery, WebhookEndpoint, WebhookSecret, Workspace,
};

/// Changes read per call while catching up, and rows per page of a full load.
const PAGE_ROWS: u32 = 1000;

/// How long the listener waits before connecting again after losing its connection.
const LISTEN_RETRY: Duration = Duration::from_secs(1);

/// Sizes and periods of a mirror; [`MirrorOptions::default`] is what `tollgate serve` runs.
#[derive(Debug, Clone)]
pub struct MirrorOptions {
    /// Live API keys kept in memory at most (least recently used go first).
    pub key_capacity: usize,
    /// Unknown or revoked prefixes remembered at most.
    pub absent_key_capacity: usize,
    /// A cached key older than this is read again on its next use (served as it is while
    /// the database is unreachable): the safety net for keys, which a full reload does not
    /// touch.
    pub key_max_age: Duration,
    /// How often the refresher reads the change log without being woken.
    pub poll_interval: Duration,
    /// How often the refresher loads everything again.
    pub reload_interval: Duration,
    /// Changes older than this are pruned from the log (by every instance, now and then).
    pub keep_changes: Duration,
}

impl Default for MirrorOptions {
    fn default() -> Self {
        MirrorOptions {
            key_capacity: 200_000,
            absent_key_capacity: 100_000,
            key_max_age: Duration::from_secs(600),
            poll_interval: Duration::from_secs(1),
            reload_interval: Duration::from_secs(600),
            keep_changes: Duration::from_secs(3600),
        }
    }
}

/// What the mirror holds, for metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MirrorStats {
    /// The last change applied.
    pub cursor: i64,
    pub workspaces: usize,
    pub groups: usize,
    pub endpoints: usize,
    pub secrets: usize,
    /// Live keys in memory.
    pub cached_keys: usize,
    /// Prefixes remembered as unknown or revoked.
    pub absent_keys: usize,
    /// Full loads since the mirror was created, the first one included.
    pub reloads: u64,
}

/// A [`Store`] whose data-plane reads are answered from memory.
pub struct MirroredStore {
    inner: Arc<dyn Store>,
    options: MirrorOptions,
    config: RwLock<Config>,
    keys: Mutex<Keys>,
    /// One catch-up at a time: changes are applied in log order and the cursor only moves
    /// forward.
    catching_up: tokio::sync::Mutex<()>,
    /// False from a failed database read until the refresher catches up again; logged
    /// once on each change.
    database_up: AtomicBool,
    reloads: AtomicU64,
}

/// The mirrored configuration.
#[derive(Default)]
struct Config {
    /// The sequence number of the last change applied.
    cursor: i64,
    workspaces: HashMap<String, Workspace>,
    groups: HashMap<String, Group>,
    /// Live child ids of each group, for dropping a deleted subtree.
    children: HashMap<String, HashSet<String>>,
    endpoints: HashMap<String, Endpoint>,
    /// Live endpoint id by slug.
    slugs: HashMap<String, String>,
    secrets: HashMap<String, Secret>,
}

impl Config {
    fn put_group(&mut self, group: Group) {
        if let Some(parent) = &group.parent_id {
            self.children
                .entry(parent.clone())
                .or_default()
                .insert(group.id.clone());
        }
        self.groups.insert(group.id.clone(), group);
    }

    /// Removes the group and every descendant; returns their ids.
    fn remove_subtree(&mut self, id: &str) -> HashSet<String> {
        let mut removed = HashSet::new();
        if let Some(parent) = self.groups.get(id).and_then(|g| g.parent_id.clone()) {
            if let Some(siblings) = self.children.get_mut(&parent) {
                siblings.remove(id);
            }
        }
        let mut pending = vec![id.to_owned()];
        while let Some(next) = pending.pop() {
            if let Some(children) = self.children.remove(&next) {
                pending.extend(children);
            }
            self.groups.remove(&next);
            removed.insert(next);
        }
        removed
    }

    fn put_endpoint(&mut self, endpoint: Endpoint) {
        self.remove_endpoint(&endpoint.id);
        self.slugs
            .insert(endpoint.slug.clone(), endpoint.id.clone());
        self.endpoints.insert(endpoint.id.clone(), endpoint);
    }

    fn remove_endpoint(&mut self, id: &str) {
        if let Some(old) = self.endpoints.remove(id) {
            if self.slugs.get(&old.slug).is_some_and(|owner| owner == id) {
                self.slugs.remove(&old.slug);
            }
        }
    }

    fn endpoint_by_slug(&self, slug: &str) -> Option<&Endpoint> {
        self.slugs.get(slug).and_then(|id| self.endpoints.get(id))
    }

    /// `[group, parent, ..., root]` from memory; `None` when a link is missing.
    fn chain(&self, group_id: &str) -> Option<Vec<Group>> {
        let mut chain = Vec::new();
        let mut next = Some(group_id);
        while let Some(id) = next {
            if chain.len() >= MAX_DEPTH as usize {
                return None;
            }
            let group = self.groups.get(id)?;
            chain.push(group.clone());
            next = group.parent_id.as_deref();
        }
        Some(chain)
    }

    /// A cached key's grant, as the data plane reads it.
    fn grant(&self, key: ApiKey) -> Assembled {
        let Some(chain) = self.chain(&key.group_id) else {
            // Keys are cached only while their whole chain is in memory, and groups leave
            // memory only when deleted: the key's group is gone.
            return Assembled::GroupGone;
        };
        let workspace_id = chain.last().map(|root| root.workspace_id.clone());
        match workspace_id.and_then(|id| self.workspaces.get(&id)) {
            Some(workspace) => Assembled::Grant(Box::new(KeyGrant {
                key,
                chain,
                workspace: workspace.clone(),
            })),
            None => Assembled::Behind,
        }
    }

    fn is_complete_for(&self, grant: &KeyGrant) -> bool {
        self.chain(&grant.key.group_id).is_some()
            && self.workspaces.contains_key(&grant.workspace.id)
    }
}

enum Assembled {
    Grant(Box<KeyGrant>),
    GroupGone,
    /// Memory lacks the workspace: it has not caught up with its creation yet.
    Behind,
}

/// A bounded map that forgets what was least recently used, a generation at a time:
/// new entries go into `hot`; when `hot` is full it becomes `cold` and the old `cold` is
/// dropped; a hit in `cold` moves the entry back into `hot`.
struct Generations<V> {
    hot: HashMap<String, V>,
    cold: HashMap<String, V>,
    half: usize,
}

impl<V> Generations<V> {
    fn new(capacity: usize) -> Self {
        Generations {
            hot: HashMap::new(),
            cold: HashMap::new(),
            half: (capacity / 2).max(1),
        }
    }

    fn get(&mut self, name: &str) -> Option<&V> {
        if !self.hot.contains_key(name) {
            let (name, value) = self.cold.remove_entry(name)?;
            self.insert(name, value);
        }
        self.hot.get(name)
    }

    fn insert(&mut self, name: String, value: V) {
        self.cold.remove(&name);
        if self.hot.len() >= self.half && !self.hot.contains_key(&name) {
            self.cold = std::mem::take(&mut self.hot);
        }
        self.hot.insert(name, value);
    }

    fn remove(&mut self, name: &str) {
        self.hot.remove(name);
        self.cold.remove(name);
    }

    fn retain(&mut self, mut keep: impl FnMut(&V) -> bool) {
        self.hot.retain(|_, v| keep(v));
        self.cold.retain(|_, v| keep(v));
    }

    fn clear(&mut self) {
        self.hot.clear();
        self.cold.clear();
    }

    fn len(&self) -> usize {
        self.hot.len() + self.cold.len()
    }
}

struct CachedKey {
    key: ApiKey,
    cached_at: Instant,
}

struct Keys {
    live: Generations<CachedKey>,
    absent: Generations<()>,
    /// Raised whenever every key is dropped (a reload after missed changes): a lookup
    /// that started before keeps its answer to itself.
    epoch: u64,
    /// One database lookup per prefix at a time.
    flights: HashMap<String, Arc<Flight>>,
}

/// One database lookup of a key prefix, shared by every request waiting for it.
struct Flight {
    epoch: u64,
    /// Set when a change to this prefix is applied while the lookup runs: its answer may
    /// predate the change, so it is not cached.
    is_stale: AtomicBool,
    outcome: OnceCell<Result<Option<KeyGrant>, SharedError>>,
}

/// A lookup's error, handed to every request that waited for it.
#[derive(Debug, Clone)]
struct SharedError {
    is_unavailable: bool,
    message: String,
}

impl SharedError {
    fn from_store(error: &StoreError) -> SharedError {
        SharedError {
            is_unavailable: error.is_unavailable(),
            message: error.to_string(),
        }
    }

    /// An error that says what the original said, `is_unavailable` included.
    fn into_store(self) -> StoreError {
        if self.is_unavailable {
            StoreError::Database(sqlx::Error::Io(std::io::Error::other(self.message)))
        } else {
            StoreError::Corrupt(self.message)
        }
    }
}

/// The error of a lookup not tried because the database is known to be unreachable.
fn unreachable() -> StoreError {
    StoreError::Database(sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::NotConnected,
        "the database is unreachable",
    )))
}

/// What the cache says about a prefix.
enum Cached {
    Absent,
    Fresh(ApiKey),
    /// Older than `key_max_age`: read again when the database answers.
    Aged(ApiKey),
    Unknown,
}

/// One changed object, read again.
enum Fresh {
    Workspace(String, Option<Workspace>),
    Secret(String, Option<Secret>),
    Endpoint(String, Option<Endpoint>),
    Group(String, Option<Group>),
    ApiKey(String),
}

/// What a full load does with the cached keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CachedKeys {
    /// Changes may have been missed (the log was pruned past the cursor), or there are
    /// none yet: drop them all and move the cursor to the newest change.
    Drop,
    /// Keep them; the cursor stays, so the catch-up after the load evicts the keys that
    /// changed since.
    Keep,
}

impl MirroredStore {
    /// Loads the configuration from `inner` (every page of it) and answers from memory
    /// from then on. Call [`MirroredStore::start_refresher`] to follow other writers.
    pub async fn load(
        inner: Arc<dyn Store>,
        options: MirrorOptions,
    ) -> StoreResult<Arc<MirroredStore>> {
        let mirror = Arc::new(MirroredStore {
            inner,
            keys: Mutex::new(Keys {
                live: Generations::new(options.key_capacity),
                absent: Generations::new(options.absent_key_capacity),
                epoch: 0,
                flights: HashMap::new(),
            }),
            options,
            config: RwLock::new(Config::default()),
            catching_up: tokio::sync::Mutex::new(()),
            database_up: AtomicBool::new(true),
            reloads: AtomicU64::new(0),
        });
        {
            let _one = mirror.catching_up.lock().await;
            mirror.reload_locked(CachedKeys::Drop).await?;
            mirror.catch_up_locked().await?;
        }
        tracing::info!(
            workspaces = mirror.stats().workspaces,
            groups = mirror.stats().groups,
            endpoints = mirror.stats().endpoints,
            "configuration loaded into memory"
        );
        Ok(mirror)
    }

    /// The store this mirror reads from and writes to.
    pub fn inner(&self) -> &Arc<dyn Store> {
        &self.inner
    }

    pub fn stats(&self) -> MirrorStats {
        let (cached_keys, absent_keys) = {
            let keys = self.keys.lock();
            (keys.live.len(), keys.absent.len())
        };
        let config = self.config.read();
        MirrorStats {
            cursor: config.cursor,
            workspaces: config.workspaces.len(),
            groups: config.groups.len(),
            endpoints: config.endpoints.len(),
            secrets: config.secrets.len(),
            cached_keys,
            absent_keys,
            reloads: self.reloads.load(Ordering::Relaxed),
        }
    }

    /// Applies every change logged since the last one applied; loads everything again
    /// when the log was pruned past that point.
    pub async fn refresh(&self) -> StoreResult<()> {
        let _one = self.catching_up.lock().await;
        self.catch_up_locked().await
    }

    /// Loads workspaces, groups, endpoints and secrets again, then catches up. Cached keys
    /// stay unless a change since names them; unknown prefixes are forgotten.
    pub async fn reload(&self) -> StoreResult<()> {
        let _one = self.catching_up.lock().await;
        self.reload_locked(CachedKeys::Keep).await?;
        self.catch_up_locked().await
    }

    /// Starts following the change log: on every PostgreSQL notification (when `listen`
    /// is the store behind this mirror), every `poll_interval`, with a full reload and a
    /// prune every `reload_interval`.
    pub fn start_refresher(self: &Arc<Self>, listen: Option<PostgresStore>) -> Refresher {
        let (stop, stopped) = oneshot::channel();
        let mirror = self.clone();
        let task = tokio::spawn(async move { mirror.follow(listen, stopped).await });
        Refresher {
            stop: Some(stop),
            task,
        }
    }

    async fn follow(
        self: Arc<Self>,
        listen: Option<PostgresStore>,
        mut stopped: oneshot::Receiver<()>,
    ) {
        let wake = Arc::new(Notify::new());
        let listener = listen.map(|store| tokio::spawn(listen_for_changes(store, wake.clone())));
        let mut poll = tokio::time::interval(self.options.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_reload = Instant::now() + self.options.reload_interval;
        loop {
            tokio::select! {
                _ = &mut stopped => break,
                () = wake.notified() => {}
                _ = poll.tick() => {}
            }
            let due = Instant::now() >= next_reload;
            let round = async {
                if due {
                    self.reload().await?;
                    let pruned = self
                        .inner
                        .prune_config_changes(self.options.keep_changes)
                        .await?;
                    tracing::debug!(pruned, "configuration change log pruned");
                    Ok(())
                } else {
                    self.refresh().await
                }
            };
            tokio::select! {
                _ = &mut stopped => break,
                outcome = round => match outcome {
                    Ok(()) => {
                        if due {
                            next_reload = Instant::now() + self.options.reload_interval;
                        }
                        self.note_caught_up();
                    }
                    Err(e) => self.note_refresh_failure(&e),
                },
            }
        }
        if let Some(listener) = listener {
            listener.abort();
            let _ = listener.await;
        }
    }

    fn note_failure(&self, error: &StoreError) {
        if self.database_up.swap(false, Ordering::AcqRel) {
            tracing::warn!(
                error = %error,
                "database unreachable: the data plane serves from its in-memory configuration"
            );
        }
    }

    /// A catch-up that failed: the database's loss is logged once; anything else (a row
    /// that cannot be read) every time, since it will not go away by itself.
    fn note_refresh_failure(&self, error: &StoreError) {
        if error.is_unavailable() {
            self.note_failure(error);
        } else {
            tracing::warn!(error = %error, "the configuration change log cannot be applied");
        }
    }

    fn note_caught_up(&self) {
        if !self.database_up.swap(true, Ordering::AcqRel) {
            tracing::info!("database reachable again: the in-memory configuration is caught up");
        }
    }

    /// Whether the database answered the last read or change-log catch-up: `false` from
    /// the first failure that says it is unreachable until a catch-up succeeds again.
    pub fn is_database_up(&self) -> bool {
        self.database_up.load(Ordering::Acquire)
    }

    /// After a successful configuration write: its change is in the log, so catching up
    /// shows it to the next read on this instance.
    async fn caught_up_after_write(&self) {
        if let Err(e) = self.refresh().await {
            tracing::debug!(error = %e, "catching up after a write failed; the refresher retries");
            self.note_refresh_failure(&e);
        }
    }

    async fn catch_up_locked(&self) -> StoreResult<()> {
        loop {
            let cursor = self.config.read().cursor;
            let ConfigChanges {
                changes,
                pruned_through,
            } = self.inner.config_changes_after(cursor, PAGE_ROWS).await?;
            if pruned_through > cursor {
                tracing::warn!(
                    cursor,
                    pruned_through,
                    "configuration changes were pruned before this instance read them; loading everything again"
                );
                self.reload_locked(CachedKeys::Drop).await?;
                continue;
            }
            let Some(last) = changes.last().map(|change| change.seq) else {
                return Ok(());
            };
            let fresh = self.read_changed(&changes).await?;
            self.apply(fresh, last);
            if changes.len() < PAGE_ROWS as usize {
                return Ok(());
            }
        }
    }

    /// Reads every object the changes name, once each.
    async fn read_changed(&self, changes: &[ConfigChange]) -> StoreResult<Vec<Fresh>> {
        let mut seen = HashSet::new();
        let mut fresh = Vec::new();
        for change in changes {
            if !seen.insert((change.kind, change.object_id.as_str())) {
                continue;
            }
            let id = change.object_id.clone();
            fresh.push(match change.kind {
                ConfigKind::Workspace => {
                    let found = self.inner.workspace(&id).await?;
                    Fresh::Workspace(id, found)
                }
                ConfigKind::Secret => {
                    let found = self.inner.secret(&id).await?;
                    Fresh::Secret(id, found)
                }
                ConfigKind::Endpoint => {
                    let found = self.inner.endpoint(&id).await?;
                    Fresh::Endpoint(id, found)
                }
                ConfigKind::Group => {
                    let found = self.inner.group(&id).await?;
                    Fresh::Group(id, found)
                }
                ConfigKind::ApiKey => Fresh::ApiKey(id),
            });
        }
        Ok(fresh)
    }

    fn apply(&self, fresh: Vec<Fresh>, through: i64) {
        let mut prefixes = Vec::new();
        let mut deleted_groups = HashSet::new();
        {
            let mut config = self.config.write();
            for object in fresh {
                match object {
                    Fresh::Workspace(_, Some(workspace)) => {
                        config.workspaces.insert(workspace.id.clone(), workspace);
                    }
                    Fresh::Workspace(id, None) => {
                        config.workspaces.remove(&id);
                    }
                    Fresh::Secret(_, Some(secret)) => {
                        config.secrets.insert(secret.id.clone(), secret);
                    }
                    Fresh::Secret(id, None) => {
                        config.secrets.remove(&id);
                    }
                    Fresh::Endpoint(_, Some(endpoint)) => config.put_endpoint(endpoint),
                    Fresh::Endpoint(id, None) => config.remove_endpoint(&id),
                    Fresh::Group(_, Some(group)) => config.put_group(group),
                    Fresh::Group(id, None) => deleted_groups.extend(config.remove_subtree(&id)),
                    Fresh::ApiKey(prefix) => prefixes.push(prefix),
                }
            }
            config.cursor = config.cursor.max(through);
        }
        let mut keys = self.keys.lock();
        for prefix in prefixes {
            keys.live.remove(&prefix);
            keys.absent.remove(&prefix);
            if let Some(flight) = keys.flights.remove(&prefix) {
                flight.is_stale.store(true, Ordering::Release);
            }
        }
        if !deleted_groups.is_empty() {
            keys.live
                .retain(|cached| !deleted_groups.contains(&cached.key.group_id));
        }
    }

    /// Loads workspaces, groups, endpoints and secrets again. A load says nothing about
    /// cached keys: with [`CachedKeys::Drop`] they go (a missed revocation would otherwise
    /// stay cached) and the cursor moves to the newest change, which the load reflects;
    /// with [`CachedKeys::Keep`] the cursor stays, so the catch-up that follows applies
    /// the changes since once more — re-reading their objects (no harm) and evicting the
    /// keys they name.
    async fn reload_locked(&self, keys: CachedKeys) -> StoreResult<()> {
        let drop_keys = keys == CachedKeys::Drop;
        // Everything read below is at least as new as the newest change read here.
        let cursor = if drop_keys {
            self.inner.newest_config_change().await?
        } else {
            self.config.read().cursor
        };
        let mut config = Config {
            cursor,
            ..Config::default()
        };
        let inner = &self.inner;
        for workspace in all_pages(|page| inner.workspaces_page(page)).await? {
            config.workspaces.insert(workspace.id.clone(), workspace);
        }
        for group in all_pages(|page| inner.live_groups_page(page)).await? {
            config.put_group(group);
        }
        for endpoint in all_pages(|page| inner.live_endpoints_page(page)).await? {
            config.put_endpoint(endpoint);
        }
        for secret in all_pages(|page| inner.live_secrets_page(page)).await? {
            config.secrets.insert(secret.id.clone(), secret);
        }
        *self.config.write() = config;
        let mut keys = self.keys.lock();
        keys.absent.clear();
        if drop_keys {
            keys.live.clear();
            keys.epoch += 1;
            for (_, flight) in keys.flights.drain() {
                flight.is_stale.store(true, Ordering::Release);
            }
        }
        self.reloads.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn cached_key(&self, prefix: &str) -> Cached {
        let mut keys = self.keys.lock();
        if keys.absent.get(prefix).is_some() {
            return Cached::Absent;
        }
        match keys.live.get(prefix) {
            Some(cached) if cached.cached_at.elapsed() < self.options.key_max_age => {
                Cached::Fresh(cached.key.clone())
            }
            Some(cached) => Cached::Aged(cached.key.clone()),
            None => Cached::Unknown,
        }
    }

    /// Reads the key from the database, one lookup per prefix at a time, and caches the
    /// answer unless a change to the prefix was applied meanwhile.
    async fn fetch_key(&self, prefix: &str) -> StoreResult<Option<KeyGrant>> {
        let flight = {
            let mut keys = self.keys.lock();
            let epoch = keys.epoch;
            keys.flights
                .entry(prefix.to_owned())
                .or_insert_with(|| {
                    Arc::new(Flight {
                        epoch,
                        is_stale: AtomicBool::new(false),
                        outcome: OnceCell::new(),
                    })
                })
                .clone()
        };
        let outcome = flight
            .outcome
            .get_or_init(|| async {
                match self.inner.resolve_api_key(prefix).await {
                    Ok(found) => {
                        self.remember(prefix, found.as_ref(), &flight);
                        Ok(found)
                    }
                    Err(e) => {
                        if e.is_unavailable() {
                            self.note_failure(&e);
                        }
                        Err(SharedError::from_store(&e))
                    }
                }
            })
            .await
            .clone();
        {
            let mut keys = self.keys.lock();
            if keys
                .flights
                .get(prefix)
                .is_some_and(|current| Arc::ptr_eq(current, &flight))
            {
                keys.flights.remove(prefix);
            }
        }
        outcome.map_err(SharedError::into_store)
    }

    fn remember(&self, prefix: &str, found: Option<&KeyGrant>, flight: &Flight) {
        // A key whose chain or workspace memory lacks yet is answered from the database
        // until the mirror catches up, never cached half-known.
        let is_complete = found.is_none_or(|grant| self.config.read().is_complete_for(grant));
        let mut keys = self.keys.lock();
        if keys.epoch != flight.epoch || flight.is_stale.load(Ordering::Acquire) || !is_complete {
            return;
        }
        match found {
            Some(grant) => {
                keys.absent.remove(prefix);
                keys.live.insert(
                    prefix.to_owned(),
                    CachedKey {
                        key: grant.key.clone(),
                        cached_at: Instant::now(),
                    },
                );
            }
            None => {
                keys.live.remove(prefix);
                keys.absent.insert(prefix.to_owned(), ());
            }
        }
    }

    /// A read answered from memory when the object is there; otherwise from the database
    /// (memory may not have caught up with an object just created elsewhere), or `None`
    /// while the database is known to be unreachable.
    async fn or_from_database<T, F>(&self, found: Option<T>, read: F) -> StoreResult<Option<T>>
    where
        F: std::future::Future<Output = StoreResult<Option<T>>>,
    {
        if found.is_some() {
            return Ok(found);
        }
        if !self.is_database_up() {
            return Ok(None);
        }
        read.await
    }
}

/// Every row of a paged bulk load.
async fn all_pages<T, F, Fut>(mut load: F) -> StoreResult<Vec<T>>
where
    F: FnMut(PageRequest) -> Fut,
    Fut: std::future::Future<Output = StoreResult<Page<T>>>,
{
    let mut rows = Vec::new();
    let mut after = None;
    loop {
        let page = load(PageRequest {
            limit: PAGE_ROWS,
            after,
        })
        .await?;
        rows.extend(page.items);
        match page.next_after {
            Some(next) => after = Some(next),
            None => return Ok(rows),
        }
    }
}

/// Wakes the refresher on every `tollgate_config` notification, and once after each
/// (re)connection since notifications sent while disconnected are lost.
async fn listen_for_changes(store: PostgresStore, wake: Arc<Notify>) {
    loop {
        match store.listen_for_config_changes().await {
            Ok(mut listener) => {
                wake.notify_one();
                loop {
                    match listener.try_recv().await {
                        Ok(_) => wake.notify_one(),
                        Err(e) => {
                            tracing::debug!(error = %e, "configuration listener lost its connection");
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "configuration listener cannot connect");
            }
        }
        tokio::time::sleep(LISTEN_RETRY).await;
    }
}

/// The task that keeps a [`MirroredStore`] caught up; stops when told or when dropped.
pub struct Refresher {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Refresher {
    /// Stops following and waits for the task (and its listener connection) to end.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

#[async_trait]
impl Store for MirroredStore {
    // --- workspaces -------------------------------------------------------------------
    async fn create_workspace(&self, name: &str, now: Timestamp) -> StoreResult<Workspace> {
        let created = self.inner.create_workspace(name, now).await?;
        self.caught_up_after_write().await;
        Ok(created)
    }

    async fn workspace_by_name(&self, name: &str) -> StoreResult<Option<Workspace>> {
        self.inner.workspace_by_name(name).await
    }

    async fn workspace(&self, id: &str) -> StoreResult<Option<Workspace>> {
        self.inner.workspace(id).await
    }

    async fn set_workspace_enabled(&self, name: &str, enabled: bool) -> StoreResult<bool> {
        let found = self.inner.set_workspace_enabled(name, enabled).await?;
        self.caught_up_after_write().await;
        Ok(found)
    }

    async fn set_signing_key(&self, workspace_id: &str, public_key: &[u8]) -> StoreResult<()> {
        self.inner.set_signing_key(workspace_id, public_key).await?;
        self.caught_up_after_write().await;
        Ok(())
    }

    // --- management keys (not mirrored) -----------------------------------------------
    async fn insert_management_key(&self, key: NewManagementKey) -> StoreResult<ManagementKey> {
        self.inner.insert_management_key(key).await
    }

    async fn ensure_management_key(&self, key: NewManagementKey) -> StoreResult<()> {
        self.inner.ensure_management_key(key).await
    }

    async fn management_key_by_prefix(
        &self,
        prefix: &str,
    ) -> StoreResult<Option<(ManagementKey, Workspace)>> {
        self.inner.management_key_by_prefix(prefix).await
    }

    async fn list_management_keys(
        &self,
        workspace_id: &str,
        page: PageRequest,
    ) -> StoreResult<Page<ManagementKey>> {
        self.inner.list_management_keys(workspace_id, page).await
    }

    async fn revoke_management_key(
        &self,
        workspace_id: &str,
        prefix: &str,
        now: Timestamp,
    ) -> StoreResult<Option<ManagementKey>> {
        self.inner
            .revoke_management_key(workspace_id, prefix, now)
            .await
    }

    // --- secrets ----------------------------------------------------------------------
    async fn insert_secret(&self, secret: NewSecret) -> StoreResult<Secret> {
        let inserted = self.inner.insert_secret(secret).await?;
        self.caught_up_after_write().await;
        Ok(inserted)
    }

    async fn secret(&self, id: &str) -> StoreResult<Option<Secret>> {
        let found = self.config.read().secrets.get(id).cloned();
        self.or_from_database(found, self.inner.secret(id)).await
    }

    async fn list_secrets(
        &self,
        workspace_id: &str,
        page: PageRequest,
    ) -> StoreResult<Page<Secret>> {
        self.inner.list_secrets(workspace_id, page).await
    }

    async fn delete_secret(&self, id: &str, now: Timestamp) -> StoreResult<Option<Secret>> {
        let deleted = self.inner.delete_secret(id, now).await?;
        self.caught_up_after_write().await;
        Ok(deleted)
    }

    // --- endpoints --------------------------------------------------------------------
    async fn insert_endpoint(&self, endpoint: NewEndpoint) -> StoreResult<Endpoint> {
        let inserted = self.inner.insert_endpoint(endpoint).await?;
        self.caught_up_after_write().await;
        Ok(inserted)
    }

    async fn endpoint(&self, id: &str) -> StoreResult<Option<Endpoint>> {
        let found = self.config.read().endpoints.get(id).cloned();
        self.or_from_database(found, self.inner.endpoint(id)).await
    }

    async fn endpoint_by_slug(&self, slug: &str) -> StoreResult<Option<Endpoint>> {
        let found = self.config.read().endpoint_by_slug(slug).cloned();
        self.or_from_database(found, self.inner.endpoint_by_slug(slug))
            .await
    }

    async fn list_endpoints(
        &self,
        workspace_id: &str,
        page: PageRequest,
    ) -> StoreResult<Page<Endpoint>> {
        self.inner.list_endpoints(workspace_id, page).await
    }

    async fn update_endpoint_targets(
        &self,
        id: &str,
        targets: &[Target],
        now: Timestamp,
    ) -> StoreResult<Option<Endpoint>> {
        let updated = self.inner.update_endpoint_targets(id, targets, now).await?;
        self.caught_up_after_write().await;
        Ok(updated)
    }

    async fn delete_endpoint(&self, id: &str, now: Timestamp) -> StoreResult<Option<Endpoint>> {
        let deleted = self.inner.delete_endpoint(id, now).await?;
        self.caught_up_after_write().await;
        Ok(deleted)
    }

    // --- groups -----------------------------------------------------------------------
    async fn create_group(&self, group: NewGroup) -> Result<Group, GroupWriteError> {
        let created = self.inner.create_group(group).await?;
        self.caught_up_after_write().await;
        Ok(created)
    }

    async fn group(&self, id: &str) -> StoreResult<Option<Group>> {
        self.inner.group(id).await
    }

    async fn group_chain(&self, id: &str) -> StoreResult<Vec<Group>> {
        self.inner.group_chain(id).await
    }

    async fn list_groups(
        &self,
        workspace_id: &str,
        filter: &GroupFilter,
        page: PageRequest,
    ) -> StoreResult<Page<Group>> {
        self.inner.list_groups(workspace_id, filter, page).await
    }

    async fn update_group(&self, id: &str, patch: GroupPatch) -> Result<Group, GroupWriteError> {
        let updated = self.inner.update_group(id, patch).await?;
        self.caught_up_after_write().await;
        Ok(updated)
    }

    async fn delete_group(
        &self,
        id: &str,
        now: Timestamp,
    ) -> StoreResult<Option<(Group, Timestamp)>> {
        let deleted = self.inner.delete_group(id, now).await?;
        self.caught_up_after_write().await;
        Ok(deleted)
    }

    // --- API keys ---------------------------------------------------------------------
    async fn insert_api_key(&self, key: NewApiKey) -> StoreResult<ApiKey> {
        let inserted = self.inner.insert_api_key(key).await?;
        self.caught_up_after_write().await;
        Ok(inserted)
    }

    async fn api_key(&self, group_id: &str, prefix: &str) -> StoreResult<Option<ApiKey>> {
        self.inner.api_key(group_id, prefix).await
    }

    async fn list_api_keys(&self, group_id: &str, page: PageRequest) -> StoreResult<Page<ApiKey>> {
        self.inner.list_api_keys(group_id, page).await
    }

    async fn revoke_api_key(
        &self,
        group_id: &str,
        prefix: &str,
        now: Timestamp,
    ) -> StoreResult<Option<ApiKey>> {
        let revoked = self.inner.revoke_api_key(group_id, prefix, now).await?;
        self.caught_up_after_write().await;
        Ok(revoked)
    }

    async fn api_key_prefix_exists(&self, prefix: &str) -> StoreResult<bool> {
        self.inner.api_key_prefix_exists(prefix).await
    }

    /// From memory for a cached key (its chain and workspace as mirrored now); otherwise
    /// one database lookup, whose answer is cached. While the database is unreachable an
    /// aged key is served as cached and an uncached one is an error at once.
    async fn resolve_api_key(&self, prefix: &str) -> StoreResult<Option<KeyGrant>> {
        let aged = match self.cached_key(prefix) {
            Cached::Absent => return Ok(None),
            Cached::Fresh(key) => match self.config.read().grant(key) {
                Assembled::Grant(grant) => return Ok(Some(*grant)),
                Assembled::GroupGone => return Ok(None),
                Assembled::Behind => None,
            },
            Cached::Aged(key) => Some(key),
            Cached::Unknown => None,
        };
        let from_memory = |key: ApiKey| match self.config.read().grant(key) {
            Assembled::Grant(grant) => Some(*grant),
            Assembled::GroupGone | Assembled::Behind => None,
        };
        if !self.is_database_up() {
            return match aged {
                Some(key) => Ok(from_memory(key)),
                None => Err(unreachable()),
            };
        }
        match self.fetch_key(prefix).await {
            Ok(found) => Ok(found),
            Err(e) => match aged {
                Some(key) => Ok(from_memory(key)),
                None => Err(e),
            },
        }
    }

    // --- configuration change log -----------------------------------------------------
    async fn config_changes_after(&self, after: i64, limit: u32) -> StoreResult<ConfigChanges> {
        self.inner.config_changes_after(after, limit).await
    }

    async fn newest_config_change(&self) -> StoreResult<i64> {
        self.inner.newest_config_change().await
    }

    async fn prune_config_changes(&self, keep: Duration) -> StoreResult<u64> {
        self.inner.prune_config_changes(keep).await
    }

    async fn workspaces_page(&self, page: PageRequest) -> StoreResult<Page<Workspace>> {
        self.inner.workspaces_page(page).await
    }

    async fn live_groups_page(&self, page: PageRequest) -> StoreResult<Page<Group>> {
        self.inner.live_groups_page(page).await
    }

    async fn live_api_keys_page(&self, page: PageRequest) -> StoreResult<Page<ApiKey>> {
        self.inner.live_api_keys_page(page).await
    }

    async fn live_endpoints_page(&self, page: PageRequest) -> StoreResult<Page<Endpoint>> {
        self.inner.live_endpoints_page(page).await
    }

    async fn live_secrets_page(&self, page: PageRequest) -> StoreResult<Page<Secret>> {
        self.inner.live_secrets_page(page).await
    }

    // --- usage ------------------------------------------------------------------------
    async fn insert_usage_event(&self, event: &UsageEvent) -> StoreResult<()> {
        self.inner.insert_usage_event(event).await
    }

    async fn insert_usage_events(&self, events: &[UsageEvent]) -> StoreResult<()> {
        self.inner.insert_usage_events(events).await
    }

    async fn list_usage_events(
        &self,
        filter: &UsageFilter,
        page: PageRequest,
    ) -> StoreResult<Page<UsageEvent>> {
        self.inner.list_usage_events(filter, page).await
    }

    async fn day_usage(
        &self,
        group_ids: &[String],
        slug: &str,
        day_start: Timestamp,
    ) -> StoreResult<Option<DayUsage>> {
        self.inner.day_usage(group_ids, slug, day_start).await
    }

    async fn pool_descendant_ids(&self, id: &str) -> StoreResult<Vec<String>> {
        self.inner.pool_descendant_ids(id).await
    }

    // --- billing webhooks (not mirrored) ----------------------------------------------
    async fn insert_webhook_endpoint(
        &self,
        endpoint: NewWebhookEndpoint,
    ) -> StoreResult<WebhookEndpoint> {
        self.inner.insert_webhook_endpoint(endpoint).await
    }

    async fn webhook_endpoint(&self, id: &str) -> StoreResult<Option<WebhookEndpoint>> {
        self.inner.webhook_endpoint(id).await
    }

    async fn list_webhook_endpoints(
        &self,
        workspace_id: &str,
        page: PageRequest,
    ) -> StoreResult<Page<WebhookEndpoint>> {
        self.inner.list_webhook_endpoints(workspace_id, page).await
    }

    async fn all_webhook_endpoints(&self) -> StoreResult<Vec<WebhookEndpoint>> {
        self.inner.all_webhook_endpoints().await
    }

    async fn delete_webhook_endpoint(
        &self,
        id: &str,
        now: Timestamp,
    ) -> StoreResult<Option<WebhookEndpoint>> {
        self.inner.delete_webhook_endpoint(id, now).await
    }

    async fn rotate_webhook_secret(
        &self,
        webhook_id: &str,
        ciphertext: Vec<u8>,
        now: Timestamp,
        retire_at: Timestamp,
    ) -> StoreResult<Option<WebhookSecret>> {
        self.inner
            .rotate_webhook_secret(webhook_id, ciphertext, now, retire_at)
            .await
    }

    async fn webhook_secrets(
        &self,
        webhook_id: &str,
        now: Timestamp,
    ) -> StoreResult<Vec<WebhookSecret>> {
        self.inner.webhook_secrets(webhook_id, now).await
    }

    async fn usage_events_after(
        &self,
        workspace_id: &str,
        after: i64,
        limit: u32,
    ) -> StoreResult<Vec<SequencedUsageEvent>> {
        self.inner
            .usage_events_after(workspace_id, after, limit)
            .await
    }

    async fn cut_webhook_batch(
        &self,
        delivery: NewWebhookDelivery,
        expected_cursor: i64,
    ) -> StoreResult<bool> {
        self.inner
            .cut_webhook_batch(delivery, expected_cursor)
            .await
    }

    async fn claim_due_webhook_deliveries(
        &self,
        now: Timestamp,
        lease_until: Timestamp,
        limit: u32,
    ) -> StoreResult<Vec<WebhookDelivery>> {
        self.inner
            .claim_due_webhook_deliveries(now, lease_until, limit)
            .await
    }

    async fn release_webhook_delivery(&self, id: &str) -> StoreResult<()> {
        self.inner.release_webhook_delivery(id).await
    }

    async fn record_webhook_attempt(
        &self,
        id: &str,
        attempt: WebhookAttempt,
    ) -> StoreResult<Option<WebhookDelivery>> {
        self.inner.record_webhook_attempt(id, attempt).await
    }

    async fn webhook_delivery(&self, id: &str) -> StoreResult<Option<WebhookDelivery>> {
        self.inner.webhook_delivery(id).await
    }

    async fn list_webhook_deliveries(
        &self,
        webhook_id: &str,
        page: PageRequest,
    ) -> StoreResult<Page<WebhookDelivery>> {
        self.inner.list_webhook_deliveries(webhook_id, page).await
    }

    async fn retry_webhook_delivery(
        &self,
        id: &str,
        now: Timestamp,
    ) -> StoreResult<Option<WebhookDelivery>> {
        self.inner.retry_webhook_delivery(id, now).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SqliteStore;
    use tollgate_core::endpoint::{Provider, Region};
    use tollgate_core::{LimitMode, ModelAccess};

    const T0: Timestamp = Timestamp(1_796_320_404_123);

    /// A SQLite file another "instance" (`db`) writes to directly, and a mirror of it.
    struct Fixture {
        _dir: tempfile::TempDir,
        db: Arc<SqliteStore>,
        mirror: Arc<MirroredStore>,
        workspace: String,
    }

    async fn fixture(options: MirrorOptions) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let db = Arc::new(SqliteStore::open(&url).await.unwrap());
        let workspace = db.create_workspace("acme", T0).await.unwrap().id;
        let mirror = MirroredStore::load(db.clone(), options).await.unwrap();
        Fixture {
            _dir: dir,
            db,
            mirror,
            workspace,
        }
    }

    impl Fixture {
        /// Whether the mirror resolves the key `prefix` (a database failure fails the test).
        async fn knows(&self, prefix: &str) -> bool {
            self.mirror.resolve_api_key(prefix).await.unwrap().is_some()
        }
    }

    fn prefix(n: u32) -> String {
        format!("tg_test{n:09}")
    }

    fn new_group(workspace: &str, id: &str, parent: Option<&str>) -> NewGroup {
        NewGroup {
            id: id.into(),
            workspace_id: workspace.into(),
            name: None,
            external_entity_id: format!("ext-{id}"),
            models: vec![access("acme/m")],
            mode: LimitMode::Independent,
            parent_id: parent.map(str::to_owned),
            created_at: T0,
        }
    }

    fn access(slug: &str) -> ModelAccess {
        ModelAccess {
            slug: slug.into(),
            rate_limits: vec![],
            usage_limits: vec![],
        }
    }

    fn new_key(group: &str, n: u32) -> NewApiKey {
        NewApiKey {
            group_id: group.into(),
            prefix: prefix(n),
            hash: vec![n as u8; 32],
            name: None,
            created_at: T0,
        }
    }

    fn new_endpoint(workspace: &str, id: &str, slug: &str) -> NewEndpoint {
        NewEndpoint {
            id: id.into(),
            workspace_id: workspace.into(),
            slug: slug.into(),
            region: Region::Unrestricted,
            targets: vec![Target {
                provider: Provider::OpenaiCompatible,
                base_url: "http://127.0.0.1:9".into(),
                target_model: "m".into(),
                secret_id: None,
            }],
            created_at: T0,
        }
    }

    fn chain_ids(grant: &KeyGrant) -> Vec<&str> {
        grant.chain.iter().map(|g| g.id.as_str()).collect()
    }

    #[tokio::test]
    async fn a_key_revoked_elsewhere_is_refused_after_a_refresh() {
        let f = fixture(MirrorOptions::default()).await;
        f.db.create_group(new_group(&f.workspace, "g1", None))
            .await
            .unwrap();
        f.db.insert_api_key(new_key("g1", 1)).await.unwrap();
        f.mirror.refresh().await.unwrap();
        let grant = f.mirror.resolve_api_key(&prefix(1)).await.unwrap().unwrap();
        assert_eq!(chain_ids(&grant), ["g1"]);
        assert_eq!(f.mirror.stats().cached_keys, 1);

        f.db.revoke_api_key("g1", &prefix(1), T0)
            .await
            .unwrap()
            .unwrap();
        // Memory answers until the change is applied...
        assert!(f.knows(&prefix(1)).await);
        f.mirror.refresh().await.unwrap();
        // ...and refuses from then on, remembering the prefix as absent.
        assert!(!f.knows(&prefix(1)).await);
        let stats = f.mirror.stats();
        assert_eq!((stats.cached_keys, stats.absent_keys), (0, 1));
    }

    #[tokio::test]
    async fn a_deleted_groups_keys_are_refused_and_dropped() {
        let f = fixture(MirrorOptions::default()).await;
        f.db.create_group(new_group(&f.workspace, "root", None))
            .await
            .unwrap();
        f.db.create_group(new_group(&f.workspace, "child", Some("root")))
            .await
            .unwrap();
        f.db.create_group(new_group(&f.workspace, "other", None))
            .await
            .unwrap();
        f.db.insert_api_key(new_key("child", 1)).await.unwrap();
        f.db.insert_api_key(new_key("other", 2)).await.unwrap();
        f.mirror.refresh().await.unwrap();
        let grant = f.mirror.resolve_api_key(&prefix(1)).await.unwrap().unwrap();
        assert_eq!(chain_ids(&grant), ["child", "root"]);
        assert!(f.knows(&prefix(2)).await);
        assert_eq!(f.mirror.stats().groups, 3);

        f.db.delete_group("root", T0).await.unwrap().unwrap();
        f.mirror.refresh().await.unwrap();
        let stats = f.mirror.stats();
        assert_eq!((stats.groups, stats.cached_keys), (1, 1));
        assert!(!f.knows(&prefix(1)).await);
        assert!(f.knows(&prefix(2)).await);
    }

    #[tokio::test]
    async fn a_group_patch_and_a_disabled_workspace_apply_to_cached_keys() {
        let f = fixture(MirrorOptions::default()).await;
        f.db.create_group(new_group(&f.workspace, "root", None))
            .await
            .unwrap();
        f.db.create_group(new_group(&f.workspace, "child", Some("root")))
            .await
            .unwrap();
        f.db.insert_api_key(new_key("child", 1)).await.unwrap();
        f.mirror.refresh().await.unwrap();
        let grant = f.mirror.resolve_api_key(&prefix(1)).await.unwrap().unwrap();
        assert_eq!(grant.chain[1].models, [access("acme/m")]);
        assert!(grant.workspace.is_enabled);

        let patch = GroupPatch {
            name: None,
            models: Some(vec![access("acme/other")]),
        };
        f.db.update_group("root", patch).await.unwrap();
        f.db.set_workspace_enabled("acme", false).await.unwrap();
        f.mirror.refresh().await.unwrap();
        let grant = f.mirror.resolve_api_key(&prefix(1)).await.unwrap().unwrap();
        assert_eq!(grant.chain[1].models, [access("acme/other")]);
        assert!(!grant.workspace.is_enabled);
    }

    #[tokio::test]
    async fn endpoints_follow_the_log() {
        let f = fixture(MirrorOptions::default()).await;
        f.db.insert_endpoint(new_endpoint(&f.workspace, "ep_1", "acme/one"))
            .await
            .unwrap();
        f.mirror.refresh().await.unwrap();
        assert_eq!(f.mirror.stats().endpoints, 1);

        f.db.delete_endpoint("ep_1", T0).await.unwrap().unwrap();
        f.db.insert_endpoint(new_endpoint(&f.workspace, "ep_2", "acme/two"))
            .await
            .unwrap();
        // The same slug again, on a new endpoint.
        f.db.insert_endpoint(new_endpoint(&f.workspace, "ep_3", "acme/one"))
            .await
            .unwrap();
        f.mirror.refresh().await.unwrap();
        assert_eq!(f.mirror.stats().endpoints, 2);
        // From memory: the database is closed.
        f.db.close().await;
        let by_slug = |slug: &'static str| {
            let mirror = f.mirror.clone();
            async move { mirror.endpoint_by_slug(slug).await.unwrap().map(|e| e.id) }
        };
        assert_eq!(by_slug("acme/one").await.as_deref(), Some("ep_3"));
        assert_eq!(by_slug("acme/two").await.as_deref(), Some("ep_2"));
        assert_eq!(f.mirror.endpoint("ep_2").await.unwrap().unwrap().id, "ep_2");
    }

    #[tokio::test]
    async fn a_deleted_endpoint_is_gone() {
        let f = fixture(MirrorOptions::default()).await;
        f.db.insert_endpoint(new_endpoint(&f.workspace, "ep_1", "acme/one"))
            .await
            .unwrap();
        f.mirror.refresh().await.unwrap();
        assert!(f
            .mirror
            .endpoint_by_slug("acme/one")
            .await
            .unwrap()
            .is_some());
        f.db.delete_endpoint("ep_1", T0).await.unwrap().unwrap();
        f.mirror.refresh().await.unwrap();
        assert!(f
            .mirror
            .endpoint_by_slug("acme/one")
            .await
            .unwrap()
            .is_none());
        assert!(f.mirror.endpoint("ep_1").await.unwrap().is_none());
        assert_eq!(f.mirror.stats().endpoints, 0);
    }

    #[tokio::test]
    async fn writes_through_the_mirror_are_read_back_at_once() {
        let f = fixture(MirrorOptions::default()).await;
        f.mirror
            .create_group(new_group(&f.workspace, "g1", None))
            .await
            .unwrap();
        // Looked up before it exists: remembered as absent...
        assert!(!f.knows(&prefix(1)).await);
        assert_eq!(f.mirror.stats().absent_keys, 1);
        // ...until its creation is applied.
        f.mirror.insert_api_key(new_key("g1", 1)).await.unwrap();
        assert!(f.knows(&prefix(1)).await);
        f.mirror
            .insert_endpoint(new_endpoint(&f.workspace, "ep_1", "acme/one"))
            .await
            .unwrap();
        assert_eq!(f.mirror.stats().endpoints, 1);
        f.mirror.revoke_api_key("g1", &prefix(1), T0).await.unwrap();
        assert!(!f.knows(&prefix(1)).await);
    }

    #[tokio::test]
    async fn a_key_created_elsewhere_after_a_miss_is_found_after_a_refresh() {
        let f = fixture(MirrorOptions::default()).await;
        f.db.create_group(new_group(&f.workspace, "g1", None))
            .await
            .unwrap();
        f.mirror.refresh().await.unwrap();
        assert!(!f.knows(&prefix(1)).await);
        f.db.insert_api_key(new_key("g1", 1)).await.unwrap();
        f.mirror.refresh().await.unwrap();
        assert!(f.knows(&prefix(1)).await);
    }

    #[tokio::test]
    async fn a_log_pruned_past_the_cursor_forces_a_full_reload() {
        let f = fixture(MirrorOptions::default()).await;
        f.db.create_group(new_group(&f.workspace, "g1", None))
            .await
            .unwrap();
        f.db.insert_api_key(new_key("g1", 1)).await.unwrap();
        f.db.insert_endpoint(new_endpoint(&f.workspace, "ep_1", "acme/one"))
            .await
            .unwrap();
        f.mirror.refresh().await.unwrap();
        assert!(f.knows(&prefix(1)).await);
        assert_eq!(f.mirror.stats().reloads, 1);

        f.db.revoke_api_key("g1", &prefix(1), T0)
            .await
            .unwrap()
            .unwrap();
        f.db.delete_endpoint("ep_1", T0).await.unwrap().unwrap();
        f.db.insert_endpoint(new_endpoint(&f.workspace, "ep_2", "acme/two"))
            .await
            .unwrap();
        // Pruning compares the database's clock in milliseconds: let one pass.
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(f.db.prune_config_changes(Duration::ZERO).await.unwrap() >= 2);

        f.mirror.refresh().await.unwrap();
        let stats = f.mirror.stats();
        assert_eq!(stats.reloads, 2);
        assert_eq!(stats.cursor, f.db.newest_config_change().await.unwrap());
        // The revocation itself was pruned: the reload dropped every cached key.
        assert!(!f.knows(&prefix(1)).await);
        assert!(f
            .mirror
            .endpoint_by_slug("acme/one")
            .await
            .unwrap()
            .is_none());
        assert!(f
            .mirror
            .endpoint_by_slug("acme/two")
            .await
            .unwrap()
            .is_some());
    }

    #[tokio::test]
    async fn a_reload_keeps_cached_keys_but_applies_a_revocation_it_loaded_past() {
        let f = fixture(MirrorOptions::default()).await;
        f.db.create_group(new_group(&f.workspace, "g1", None))
            .await
            .unwrap();
        f.db.insert_api_key(new_key("g1", 1)).await.unwrap();
        f.db.insert_api_key(new_key("g1", 2)).await.unwrap();
        f.mirror.refresh().await.unwrap();
        for n in [1, 2] {
            assert!(f.knows(&prefix(n)).await);
        }
        f.db.revoke_api_key("g1", &prefix(1), T0)
            .await
            .unwrap()
            .unwrap();
        f.mirror.reload().await.unwrap();
        let stats = f.mirror.stats();
        assert_eq!((stats.reloads, stats.cached_keys), (2, 1));
        assert_eq!(stats.cursor, f.db.newest_config_change().await.unwrap());
        assert!(!f.knows(&prefix(1)).await);
        assert!(f.knows(&prefix(2)).await);
    }

    #[tokio::test]
    async fn the_negative_cache_is_bounded() {
        let options = MirrorOptions {
            absent_key_capacity: 4,
            ..MirrorOptions::default()
        };
        let f = fixture(options).await;
        for n in 0..10 {
            assert!(!f.knows(&prefix(n)).await);
        }
        assert_eq!(f.mirror.stats().absent_keys, 4);
    }

    #[tokio::test]
    async fn the_positive_cache_is_bounded() {
        let options = MirrorOptions {
            key_capacity: 4,
            ..MirrorOptions::default()
        };
        let f = fixture(options).await;
        f.db.create_group(new_group(&f.workspace, "g1", None))
            .await
            .unwrap();
        for n in 0..10 {
            f.db.insert_api_key(new_key("g1", n)).await.unwrap();
        }
        f.mirror.refresh().await.unwrap();
        for n in 0..10 {
            assert!(f.knows(&prefix(n)).await);
        }
        assert_eq!(f.mirror.stats().cached_keys, 4);
    }

    #[tokio::test]
    async fn data_plane_reads_answer_from_memory_when_the_database_is_down() {
        let f = fixture(MirrorOptions::default()).await;
        f.db.create_group(new_group(&f.workspace, "g1", None))
            .await
            .unwrap();
        f.db.insert_api_key(new_key("g1", 1)).await.unwrap();
        f.db.insert_api_key(new_key("g1", 2)).await.unwrap();
        f.db.insert_endpoint(new_endpoint(&f.workspace, "ep_1", "acme/one"))
            .await
            .unwrap();
        f.db.insert_secret(NewSecret {
            id: "sec_1".into(),
            workspace_id: f.workspace.clone(),
            name: "upstream".into(),
            ciphertext: vec![7; 40],
            created_at: T0,
        })
        .await
        .unwrap();
        f.mirror.refresh().await.unwrap();
        assert!(f.knows(&prefix(1)).await);

        f.db.close().await;
        let grant = f.mirror.resolve_api_key(&prefix(1)).await.unwrap().unwrap();
        assert_eq!(chain_ids(&grant), ["g1"]);
        assert_eq!(
            f.mirror.secret("sec_1").await.unwrap().unwrap().ciphertext,
            [7; 40]
        );
        assert_eq!(
            f.mirror
                .endpoint_by_slug("acme/one")
                .await
                .unwrap()
                .unwrap()
                .id,
            "ep_1"
        );
        // An uncached key needs the database.
        let uncached = f.mirror.resolve_api_key(&prefix(2)).await;
        assert!(
            matches!(uncached, Err(StoreError::Database(_))),
            "{uncached:?}"
        );
        assert!(f.mirror.refresh().await.is_err());
        // Known down: answered at once, from memory, the same way.
        assert!(f.knows(&prefix(1)).await);
        let uncached = f.mirror.resolve_api_key(&prefix(2)).await;
        assert!(
            matches!(uncached, Err(StoreError::Database(_))),
            "{uncached:?}"
        );
        assert!(f
            .mirror
            .endpoint_by_slug("acme/none")
            .await
            .unwrap()
            .is_none());
    }

    #[tokio::test]
    async fn concurrent_misses_of_one_prefix_all_get_the_key_and_leave_no_flight() {
        let f = fixture(MirrorOptions::default()).await;
        f.db.create_group(new_group(&f.workspace, "g1", None))
            .await
            .unwrap();
        f.db.insert_api_key(new_key("g1", 1)).await.unwrap();
        f.mirror.refresh().await.unwrap();
        let p = prefix(1);
        let lookups: Vec<_> = (0..8).map(|_| f.mirror.resolve_api_key(&p)).collect();
        for found in futures_join_all(lookups).await {
            assert_eq!(found.unwrap().unwrap().key.prefix, p);
        }
        assert!(f.mirror.keys.lock().flights.is_empty());
        assert_eq!(f.mirror.stats().cached_keys, 1);
    }

    /// Polls every future on this task until all are done.
    async fn futures_join_all<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
        let mut pinned: Vec<_> = futures.into_iter().map(Box::pin).collect();
        let mut outputs: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
        std::future::poll_fn(|cx| {
            let mut pending = false;
            for (future, output) in pinned.iter_mut().zip(outputs.iter_mut()) {
                if output.is_none() {
                    match future.as_mut().poll(cx) {
                        std::task::Poll::Ready(value) => *output = Some(value),
                        std::task::Poll::Pending => pending = true,
                    }
                }
            }
            if pending {
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(())
            }
        })
        .await;
        outputs.into_iter().map(|o| o.unwrap()).collect()
    }
}
