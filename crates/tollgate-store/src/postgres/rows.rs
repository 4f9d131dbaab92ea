//! Row decoding for PostgreSQL: the same columns, codecs and decoders as the SQLite
//! schema (`sqlite::rows`), read from `PgRow`. A value the schema should have made
//! impossible is `StoreError::Corrupt`, never a panic.

use sqlx::postgres::PgRow;

crate::sqlite::rows::row_decoders!(PgRow);
