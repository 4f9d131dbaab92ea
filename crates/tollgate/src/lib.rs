//! Tollgate's wiring: configuration, bootstrap, and the HTTP server that merges the
//! management API and the data plane. `main.rs` is a thin shell over [`server::start`],
//! which integration tests call directly to run a real server on `127.0.0.1:0`.

pub mod bootstrap;
pub mod cli;
pub mod config;
pub mod database;
pub mod demo;
pub mod server;

pub use config::Config;
pub use server::{start, start_with_clock, RunningServer};
