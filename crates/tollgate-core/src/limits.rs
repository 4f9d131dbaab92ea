//! Limit declarations as they appear on the wire and in the store.
//!
//! A rate limit is `{type, unit: SECOND|MINUTE, threshold}`, a usage limit `{type, unit:
//! DAY, threshold}`. `threshold` is an integer in `0..=MAX_THRESHOLD`; 0 means blocked,
//! never unlimited (unlimited is the absence of an entry).

use serde::{Deserialize, Serialize};

/// Largest accepted threshold (10^15).
pub const MAX_THRESHOLD: u64 = 1_000_000_000_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LimitType {
    Token,
    Request,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LimitUnit {
    Second,
    Minute,
    Day,
}

impl LimitUnit {
    /// Length of the window in milliseconds (a DAY is a UTC calendar day, not a rolling
    /// 24 h; callers handle that difference).
    pub fn millis(self) -> i64 {
        match self {
            LimitUnit::Second => 1_000,
            LimitUnit::Minute => 60_000,
            LimitUnit::Day => crate::clock::DAY_MS,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LimitUnit::Second => "SECOND",
            LimitUnit::Minute => "MINUTE",
            LimitUnit::Day => "DAY",
        }
    }
}

impl LimitType {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitType::Token => "TOKEN",
            LimitType::Request => "REQUEST",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LimitMode {
    Independent,
    Cascading,
}

impl LimitMode {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitMode::Independent => "INDEPENDENT",
            LimitMode::Cascading => "CASCADING",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "INDEPENDENT" => Some(LimitMode::Independent),
            "CASCADING" => Some(LimitMode::Cascading),
            _ => None,
        }
    }
}

/// A per-second or per-minute limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    #[serde(rename = "type")]
    pub kind: LimitType,
    pub unit: LimitUnit,
    pub threshold: u64,
}

/// A per-UTC-day limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageLimit {
    #[serde(rename = "type")]
    pub kind: LimitType,
    pub unit: LimitUnit,
    pub threshold: u64,
}

/// The identity of a limit within one slug: what it counts and over which window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LimitKey {
    pub kind: LimitType,
    pub unit: LimitUnit,
}

impl RateLimit {
    pub fn key(&self) -> LimitKey {
        LimitKey {
            kind: self.kind,
            unit: self.unit,
        }
    }
}

impl UsageLimit {
    pub fn key(&self) -> LimitKey {
        LimitKey {
            kind: self.kind,
            unit: self.unit,
        }
    }
}
