//! Time as the rest of the system sees it: UTC milliseconds behind an injectable clock,
//! so window and day logic can be tested without sleeping.

use std::sync::atomic::{AtomicI64, Ordering};

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Milliseconds since the Unix epoch, UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub fn millis(self) -> i64 {
        self.0
    }

    /// RFC 3339 with millisecond precision and a `Z` suffix, e.g. `2026-12-03T17:53:24.123Z`.
    pub fn to_rfc3339(self) -> String {
        let nanos = i128::from(self.0) * 1_000_000;
        let Ok(dt) = OffsetDateTime::from_unix_timestamp_nanos(nanos) else {
            return "1970-01-01T00:00:00.000Z".to_owned();
        };
        format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            dt.year(),
            u8::from(dt.month()),
            dt.day(),
            dt.hour(),
            dt.minute(),
            dt.second(),
            dt.millisecond()
        )
    }

    /// Parses any RFC 3339 timestamp (any offset) into UTC milliseconds.
    pub fn parse_rfc3339(text: &str) -> Option<Self> {
        let dt = OffsetDateTime::parse(text, &Rfc3339).ok()?;
        i64::try_from(dt.unix_timestamp_nanos() / 1_000_000)
            .ok()
            .map(Timestamp)
    }

    /// Start of the UTC calendar day holding this instant.
    pub fn utc_day_start(self) -> Timestamp {
        Timestamp(self.0.div_euclid(DAY_MS) * DAY_MS)
    }

    /// Start of the next UTC calendar day.
    pub fn next_utc_midnight(self) -> Timestamp {
        Timestamp(self.utc_day_start().0 + DAY_MS)
    }
}

pub const DAY_MS: i64 = 86_400_000;

/// Source of the current time. Production uses [`SystemClock`]; tests use [`ManualClock`].
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Timestamp;
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let nanos = OffsetDateTime::now_utc().unix_timestamp_nanos();
        Timestamp(i64::try_from(nanos / 1_000_000).unwrap_or(i64::MAX))
    }
}

/// A clock that only moves when told to.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn new(start: Timestamp) -> Self {
        Self(AtomicI64::new(start.0))
    }

    pub fn set(&self, at: Timestamp) {
        self.0.store(at.0, Ordering::SeqCst);
    }

    pub fn advance_millis(&self, millis: i64) {
        self.0.fetch_add(millis, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.0.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339_with_z_and_millis() {
        assert_eq!(Timestamp(0).to_rfc3339(), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            Timestamp(1_796_320_404_123).to_rfc3339(),
            "2026-12-03T17:53:24.123Z"
        );
    }

    #[test]
    fn parses_offsets_to_utc() {
        assert_eq!(
            Timestamp::parse_rfc3339("2026-12-04T02:53:24.123+09:00"),
            Some(Timestamp(1_796_320_404_123))
        );
        assert_eq!(Timestamp::parse_rfc3339("yesterday"), None);
    }

    #[test]
    fn utc_day_boundaries() {
        let t = Timestamp::parse_rfc3339("2026-12-03T23:50:00Z").unwrap();
        assert_eq!(
            t.next_utc_midnight(),
            Timestamp::parse_rfc3339("2026-12-04T00:00:00Z").unwrap()
        );
        assert_eq!((t.next_utc_midnight().0 - t.0) / 1000, 600);
    }
}
