//! The database behind the `Store` trait, chosen by the URL's scheme: a SQLite file
//! (`sqlite://PATH`, or a plain path) or PostgreSQL (`postgres://...`), migrated on open.

use std::sync::Arc;

use anyhow::Context;
use tollgate_store::{PostgresStore, SqliteStore, Store};

use crate::config::{check_database_url, is_postgres_url};

/// An open store and what closing it takes.
#[derive(Clone)]
pub enum Database {
    /// Closing checkpoints the WAL into the file.
    Sqlite(Arc<SqliteStore>),
    /// Closing returns the pool's connections.
    Postgres(Arc<PostgresStore>),
}

impl Database {
    /// Opens (and migrates) the database at `url`. Errors never echo the URL: it may hold
    /// a password.
    pub async fn open(url: &str) -> anyhow::Result<Self> {
        check_database_url(url)?;
        if is_postgres_url(url) {
            let store = PostgresStore::connect(url)
                .await
                .context("database: cannot connect to PostgreSQL")?;
            return Ok(Self::Postgres(Arc::new(store)));
        }
        let store = SqliteStore::open(url)
            .await
            .with_context(|| format!("opening database {url}"))?;
        Ok(Self::Sqlite(Arc::new(store)))
    }

    pub fn store(&self) -> Arc<dyn Store> {
        match self {
            Self::Sqlite(store) => store.clone(),
            Self::Postgres(store) => store.clone(),
        }
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, Self::Postgres(_))
    }

    pub async fn close(&self) {
        match self {
            Self::Sqlite(store) => store.close().await,
            Self::Postgres(store) => store.close().await,
        }
    }
}
