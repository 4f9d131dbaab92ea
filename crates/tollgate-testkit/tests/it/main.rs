//! The mock upstream driven over real TCP: scripts, recording, disconnects, and the usage
//! tap run over the bytes the mock actually sends.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly"
)]

mod http;
mod sink;
mod support;
mod tap;
