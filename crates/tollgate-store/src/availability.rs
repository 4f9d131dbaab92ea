//! Which store errors mean "the database cannot be reached right now" rather than "this
//! call was wrong": the first kind is worth waiting out (the usage spool keeps events on
//! local disk, the management API answers 503 with `Retry-After`), the second is not.

use sqlx::error::DatabaseError as _;
use sqlx::postgres::PgDatabaseError;
use sqlx::sqlite::SqliteError;

use crate::StoreError;

/// SQLite primary result codes of a database that is there but cannot be used now:
/// BUSY (locked past the busy timeout), LOCKED, IOERR, FULL, CANTOPEN.
const SQLITE_UNAVAILABLE: [i32; 5] = [5, 6, 10, 13, 14];

impl StoreError {
    /// True when the database is unreachable or refuses work for a while: no connection
    /// within the pool's acquire timeout, a connection refused or cut, the server
    /// shutting down or out of connection slots, a read-only standby (PostgreSQL); a
    /// file that is locked, unreadable or full (SQLite). A query the database rejected,
    /// a duplicate or a corrupt row is not.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Database(e) => is_unavailable(e),
            StoreError::Duplicate(_) | StoreError::Migration(_) | StoreError::Corrupt(_) => false,
        }
    }
}

fn is_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            if let Some(pg) = db.try_downcast_ref::<PgDatabaseError>() {
                is_unavailable_sqlstate(pg.code())
            } else if let Some(sqlite) = db.try_downcast_ref::<SqliteError>() {
                sqlite
                    .code()
                    .and_then(|code| code.parse::<i32>().ok())
                    .is_some_and(|code| SQLITE_UNAVAILABLE.contains(&(code & 0xff)))
            } else {
                false
            }
        }
        _ => false,
    }
}

/// PostgreSQL SQLSTATEs of an unavailable server: class 08 (connection exception),
/// 57P01-57P03 (admin / crash shutdown, cannot connect now), 53300 (too many
/// connections), 25006 (read-only transaction: a standby during a failover).
fn is_unavailable_sqlstate(code: &str) -> bool {
    code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300" | "25006")
}

#[cfg(test)]
mod tests {
    use super::*;

    use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
    use sqlx::Connection as _;
    use std::time::Duration;

    #[test]
    fn connection_failures_are_unavailable_and_mistakes_are_not() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        for error in [
            sqlx::Error::PoolTimedOut,
            sqlx::Error::PoolClosed,
            sqlx::Error::Io(refused),
            sqlx::Error::WorkerCrashed,
        ] {
            assert!(StoreError::Database(error).is_unavailable());
        }
        for error in [
            StoreError::Database(sqlx::Error::RowNotFound),
            StoreError::Database(sqlx::Error::Protocol("bad message".into())),
            StoreError::Duplicate("slug"),
            StoreError::Corrupt("status".into()),
        ] {
            assert!(!error.is_unavailable(), "{error}");
        }
    }

    #[test]
    fn postgres_sqlstates() {
        for code in [
            "08000", "08006", "08001", "57P01", "57P02", "57P03", "53300", "25006",
        ] {
            assert!(is_unavailable_sqlstate(code), "{code}");
        }
        for code in ["23505", "42P01", "40001", "57014", "53100"] {
            assert!(!is_unavailable_sqlstate(code), "{code}");
        }
    }

    #[tokio::test]
    async fn a_locked_sqlite_file_is_unavailable_and_a_refused_row_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let options = SqliteConnectOptions::new()
            .filename(dir.path().join("t.db"))
            .create_if_missing(true)
            .busy_timeout(Duration::ZERO);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await
            .unwrap();
        sqlx::query("CREATE TABLE t (id INTEGER PRIMARY KEY)")
            .execute(&pool)
            .await
            .unwrap();
        let mut other = sqlx::SqliteConnection::connect_with(&options)
            .await
            .unwrap();
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut other)
            .await
            .unwrap();
        let busy = sqlx::query("INSERT INTO t (id) VALUES (1)")
            .execute(&pool)
            .await
            .unwrap_err();
        assert!(StoreError::Database(busy).is_unavailable());
        sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();

        sqlx::query("INSERT INTO t (id) VALUES (1)")
            .execute(&pool)
            .await
            .unwrap();
        let duplicate = sqlx::query("INSERT INTO t (id) VALUES (1)")
            .execute(&pool)
            .await
            .unwrap_err();
        assert!(!StoreError::Database(duplicate).is_unavailable());
    }

    #[tokio::test]
    async fn a_postgres_server_that_is_gone_is_unavailable() {
        // Nothing listens on a port just released.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("postgres://postgres@127.0.0.1:{port}/x");
        let refused = sqlx::PgConnection::connect(&url).await.unwrap_err();
        assert!(StoreError::Database(refused).is_unavailable());
        let timed_out = sqlx::postgres::PgPoolOptions::new()
            .acquire_timeout(Duration::from_millis(200))
            .connect(&url)
            .await
            .unwrap_err();
        assert!(StoreError::Database(timed_out).is_unavailable());

        let Ok(url) = std::env::var("TOLLGATE_TEST_POSTGRES_URL") else {
            return;
        };
        // A server ending the session (what a shutdown does to every connection).
        let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
        let terminated = sqlx::query("SELECT pg_terminate_backend(pg_backend_pid())")
            .execute(&mut conn)
            .await
            .unwrap_err();
        assert!(
            StoreError::Database(terminated).is_unavailable(),
            "not unavailable"
        );
    }
}
