//! Integration tests: one binary, real servers on 127.0.0.1:0.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "tests fail loudly"
)]

mod support;

mod admin_endpoints;
mod admin_groups;
mod admin_keys;
mod admin_misc;
mod admin_webhooks;
mod bad_input;
mod chat;
mod chat_edges;
mod durability;
mod events_api;
mod faults;
mod limits;
mod limits_restart;
mod metrics;
mod models;
mod multi_instance;
mod multi_instance_webhooks;
mod sdk;
mod server;
mod stream_ends;
mod webhook_receivers;
mod webhooks_delivery;
