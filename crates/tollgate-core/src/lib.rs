//! Tollgate's domain: the types and rules that need no I/O.
//!
//! Everything here is deterministic and unit-tested exhaustively: limit declarations and
//! their resolution over a group tree (INDEPENDENT / CASCADING), the write-time checks,
//! the API key format, slugs and timestamps. Stores and handlers call these rules; they
//! never re-implement them.

pub mod clock;
pub mod endpoint;
pub mod group;
pub mod hierarchy;
pub mod ids;
pub mod keys;
pub mod limits;
pub mod secretbox;
pub mod slug;
pub mod window;

pub use clock::{Clock, SystemClock, Timestamp};
pub use group::{Group, ModelAccess};
pub use limits::{LimitMode, LimitType, LimitUnit, RateLimit, UsageLimit};
