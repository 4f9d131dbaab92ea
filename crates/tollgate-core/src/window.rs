//! Window arithmetic of SECOND / MINUTE / DAY limits: pure, driven by the caller's clock.
//!
//! **Rolling windows (SECOND, MINUTE).** A window of unit U is cut into 10 slots of U/10
//! (SECOND: 100 ms, MINUTE: 6 s). Each slot keeps its total and the time of its latest
//! debit; a slot counts "in the window" at time t while that latest debit is less than U
//! old (`t < latest + U`). At most 11 slots (the current one and the 10 before it) can
//! be live, so a counter is a ring of 11.
//!
//! *Never more than the threshold in any interval of length U* (C10): take an interval
//! `[a, a + U)` and the last admission in it, at time t. Every admission x of the
//! interval has `x >= a > t - U`, so the slot holding x had, at t, a latest debit `>= x >
//! t - U`: it was counted by t's check, which admitted only if `used < threshold`. Hence
//! at most `threshold` requests (REQUEST), or fewer than `threshold` tokens before t's
//! own debit (TOKEN). *Conservative by at most U/10*: a debit is counted for at most U
//! plus the length of its slot (`rolling_windows_hold_at_most_the_threshold_in_any_interval`).
//!
//! *Retry-After never exceeds U*: every counted slot leaves the window at most U after its
//! latest debit, which is no later than the refusal. Letting a slot leave at a slot
//! boundary instead (11 whole slots) would make a MINUTE limit answer up to 66 s, and C13
//! wants `1..=60` (`c13_minute_retry_after_is_within_a_minute_and_exact`).
//!
//! **DAY** is a UTC calendar day (`Timestamp::utc_day_start`): one slot per day and only
//! the current day counts, whatever the server's time zone. A DAY counter starts the day
//! from a baseline (usage already stored) through [`WindowCounter::start_day`].

use crate::clock::{Timestamp, DAY_MS};
use crate::limits::LimitUnit;

/// Slots per unit of a rolling window.
pub const SLOTS_PER_UNIT: i64 = 10;

/// Slots a rolling counter keeps: the current one and the 10 before it.
pub const LIVE_SLOTS: usize = 11;

/// Length of one slot in milliseconds: U/10 for SECOND and MINUTE, a whole day for DAY.
pub fn slot_millis(unit: LimitUnit) -> i64 {
    match unit {
        LimitUnit::Second | LimitUnit::Minute => unit.millis() / SLOTS_PER_UNIT,
        LimitUnit::Day => DAY_MS,
    }
}

/// Index of the slot holding `at` (for DAY: days since the epoch, UTC).
pub fn slot_at(unit: LimitUnit, at: Timestamp) -> i64 {
    // Constant divisors: this runs for every counter of every admission.
    match unit {
        LimitUnit::Second => at.0.div_euclid(100),
        LimitUnit::Minute => at.0.div_euclid(6_000),
        LimitUnit::Day => at.0.div_euclid(DAY_MS),
    }
}

/// When slot `slot` begins.
pub fn slot_start(unit: LimitUnit, slot: i64) -> Timestamp {
    Timestamp(slot.saturating_mul(slot_millis(unit)))
}

/// The oldest slot that can still hold live debits when `current` is the current slot.
pub fn oldest_live_slot(unit: LimitUnit, current: i64) -> i64 {
    match unit {
        LimitUnit::Second | LimitUnit::Minute => current - SLOTS_PER_UNIT,
        LimitUnit::Day => current,
    }
}

/// Whether a counter holding `used` may admit one more request: `used + 1 <= threshold`
/// for REQUEST, `used < threshold` for TOKEN — the same comparison on integers. A
/// threshold of 0 therefore never admits.
pub fn has_room(used: u64, threshold: u64) -> bool {
    used < threshold
}

/// Whole seconds from `now` until `at`, rounded up, at least 1: the `Retry-After` value.
/// A retry after exactly that many seconds arrives at or after `at`.
pub fn retry_after_secs(now: Timestamp, at: Timestamp) -> u64 {
    let millis = at.0.saturating_sub(now.0).max(0);
    let secs = millis.saturating_add(999) / 1_000;
    u64::try_from(secs).unwrap_or(u64::MAX).max(1)
}

/// One slot of a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub index: i64,
    pub value: u64,
    /// Time of the slot's latest debit (ms); rolling windows count the slot until one
    /// unit after it.
    pub latest: i64,
}

const EMPTY: Slot = Slot {
    index: i64::MIN,
    value: 0,
    latest: i64::MIN,
};

/// The count of one limit over its window: a ring of 11 slots (rolling) or 1 (DAY).
///
/// Time never runs backwards for a counter: a `now` earlier than its latest debit is read
/// as that latest debit, so a clock stepping back cannot free room early.
#[derive(Debug, Clone)]
pub struct WindowCounter {
    unit: LimitUnit,
    ring: [Slot; LIVE_SLOTS],
    latest: i64,
}

impl WindowCounter {
    pub fn new(unit: LimitUnit) -> Self {
        Self {
            unit,
            ring: [EMPTY; LIVE_SLOTS],
            latest: i64::MIN,
        }
    }

    pub fn unit(&self) -> LimitUnit {
        self.unit
    }

    fn ring_len(&self) -> usize {
        match self.unit {
            LimitUnit::Second | LimitUnit::Minute => LIVE_SLOTS,
            LimitUnit::Day => 1,
        }
    }

    fn position(&self, slot: i64) -> usize {
        let len = self.ring_len() as i64;
        usize::try_from(slot.rem_euclid(len)).unwrap_or(0)
    }

    fn effective(&self, now: Timestamp) -> Timestamp {
        Timestamp(now.0.max(self.latest))
    }

    /// Live slots in ring order. A rolling slot is live while its latest debit is less
    /// than a unit old (such a slot is always one of the last 11: its latest debit lies
    /// inside it); a DAY slot while it is today. One pass, at most one division: this
    /// runs for every counter of every admission.
    fn live_unordered(&self, now: Timestamp) -> impl Iterator<Item = Slot> + '_ {
        let now = self.effective(now);
        let is_day = self.unit == LimitUnit::Day;
        let today = if is_day {
            slot_at(LimitUnit::Day, now)
        } else {
            0
        };
        let horizon = now.0.saturating_sub(self.unit.millis());
        self.ring[..self.ring_len()]
            .iter()
            .copied()
            .filter(move |slot| {
                if is_day {
                    slot.index == today
                } else {
                    slot.index != i64::MIN && slot.latest > horizon
                }
            })
    }

    /// Live slots, oldest first.
    fn live(&self, now: Timestamp) -> impl Iterator<Item = Slot> {
        let mut live: Vec<Slot> = self.live_unordered(now).collect();
        live.sort_unstable_by_key(|slot| slot.index);
        live.into_iter()
    }

    /// What the window holds at `now`.
    pub fn used(&self, now: Timestamp) -> u64 {
        self.live_unordered(now)
            .fold(0u64, |sum, slot| sum.saturating_add(slot.value))
    }

    /// Adds `amount` to the slot of `now` and returns that slot's index (for
    /// [`WindowCounter::adjust`]). A DAY counter must have started the day first.
    pub fn debit(&mut self, now: Timestamp, amount: u64) -> i64 {
        let now = self.effective(now);
        let index = slot_at(self.unit, now);
        let position = self.position(index);
        let slot = &mut self.ring[position];
        if slot.index != index {
            *slot = Slot {
                index,
                value: 0,
                latest: now.0,
            };
        }
        slot.value = slot.value.saturating_add(amount);
        slot.latest = slot.latest.max(now.0);
        self.latest = self.latest.max(now.0);
        index
    }

    /// Replaces `reserved` by `actual` in slot `index` if it is still in the ring (else
    /// does nothing), never going below 0. The slot's latest debit time is unchanged:
    /// tokens count from the admission that reserved them.
    pub fn adjust(&mut self, index: i64, reserved: u64, actual: u64) {
        let position = self.position(index);
        let slot = &mut self.ring[position];
        if slot.index != index {
            return;
        }
        slot.value = if actual >= reserved {
            slot.value.saturating_add(actual - reserved)
        } else {
            slot.value.saturating_sub(reserved - actual)
        };
    }

    /// The UTC day (days since the epoch) a DAY counter currently counts, if any.
    pub fn day(&self) -> Option<i64> {
        let slot = self.ring[0];
        (self.unit == LimitUnit::Day && slot.index != i64::MIN).then_some(slot.index)
    }

    /// Starts UTC day `day` of a DAY counter at `baseline` (the usage already stored), if
    /// the counter is on an earlier day or none. Returns whether it did: a day already
    /// started is never reloaded, so concurrent first requests count the baseline once.
    pub fn start_day(&mut self, day: i64, baseline: u64) -> bool {
        if self.unit != LimitUnit::Day || self.day().is_some_and(|d| d >= day) {
            return false;
        }
        let begins = slot_start(LimitUnit::Day, day).0;
        self.ring[0] = Slot {
            index: day,
            value: baseline,
            latest: begins,
        };
        self.latest = self.latest.max(begins);
        true
    }

    /// The earliest time at or after `now` at which the counter has room under
    /// `threshold`, assuming nothing else is debited: once enough old slots have left
    /// the window; for DAY, the next 00:00 UTC. For a threshold of 0 (never any room):
    /// one unit from now, or the next 00:00 UTC for DAY.
    pub fn retry_at(&self, now: Timestamp, threshold: u64) -> Timestamp {
        let now = self.effective(now);
        if self.unit == LimitUnit::Day {
            if threshold > 0 && has_room(self.used(now), threshold) {
                return now;
            }
            return now.next_utc_midnight();
        }
        if threshold == 0 {
            return Timestamp(now.0.saturating_add(self.unit.millis()));
        }
        let mut remaining = self.used(now);
        if has_room(remaining, threshold) {
            return now;
        }
        let mut at = now;
        for slot in self.live(now) {
            remaining = remaining.saturating_sub(slot.value);
            at = Timestamp(slot.latest.saturating_add(self.unit.millis()));
            if has_room(remaining, threshold) {
                break;
            }
        }
        at
    }

    /// When everything the window holds now has left it (`now` when it holds nothing):
    /// the moment the limit is back to its full threshold, for `x-ratelimit-reset-*`.
    pub fn reset_at(&self, now: Timestamp) -> Timestamp {
        let now = self.effective(now);
        let newest = self
            .live_unordered(now)
            .filter(|slot| slot.value > 0)
            .max_by_key(|slot| slot.latest);
        match (newest, self.unit) {
            (None, _) => now,
            (Some(_), LimitUnit::Day) => now.next_utc_midnight(),
            (Some(slot), _) => Timestamp(slot.latest.saturating_add(self.unit.millis())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-12-03T00:00:00Z, a minute (and day) boundary.
    const DAY0: i64 = 1_796_256_000_000;

    fn at(ms: i64) -> Timestamp {
        Timestamp(DAY0 + ms)
    }

    fn utc(text: &str) -> Timestamp {
        Timestamp::parse_rfc3339(text).unwrap()
    }

    /// Admits (debiting `amount`) when every counter has room; debits nothing otherwise.
    fn try_admit(counters: &mut [(&mut WindowCounter, u64)], now: Timestamp, amount: u64) -> bool {
        if !counters
            .iter()
            .all(|(c, threshold)| has_room(c.used(now), *threshold))
        {
            return false;
        }
        for (c, _) in counters.iter_mut() {
            c.debit(now, amount);
        }
        true
    }

    #[test]
    fn slot_lengths_and_indices() {
        assert_eq!(slot_millis(LimitUnit::Second), 100);
        assert_eq!(slot_millis(LimitUnit::Minute), 6_000);
        assert_eq!(slot_millis(LimitUnit::Day), 86_400_000);
        assert_eq!(slot_at(LimitUnit::Second, Timestamp(1_250)), 12);
        assert_eq!(slot_at(LimitUnit::Minute, Timestamp(59_999)), 9);
        assert_eq!(slot_at(LimitUnit::Minute, Timestamp(60_000)), 10);
        assert_eq!(slot_at(LimitUnit::Second, Timestamp(-1)), -1);
        assert_eq!(
            slot_at(LimitUnit::Day, utc("2026-12-03T23:59:59.999Z")),
            20_790
        );
        assert_eq!(slot_at(LimitUnit::Day, utc("2026-12-04T00:00:00Z")), 20_791);
        assert_eq!(slot_start(LimitUnit::Minute, 10), Timestamp(60_000));
        assert_eq!(
            slot_start(LimitUnit::Day, 20_791),
            utc("2026-12-04T00:00:00Z")
        );
        assert_eq!(oldest_live_slot(LimitUnit::Minute, 25), 15);
        assert_eq!(oldest_live_slot(LimitUnit::Second, 25), 15);
        assert_eq!(oldest_live_slot(LimitUnit::Day, 25), 25);
    }

    #[test]
    fn room_is_strictly_below_the_threshold() {
        assert!(has_room(0, 1));
        assert!(!has_room(1, 1));
        assert!(has_room(99, 100));
        assert!(!has_room(100, 100));
        assert!(!has_room(0, 0));
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds_at_least_one() {
        assert_eq!(retry_after_secs(Timestamp(0), Timestamp(0)), 1);
        assert_eq!(retry_after_secs(Timestamp(0), Timestamp(-5)), 1);
        assert_eq!(retry_after_secs(Timestamp(0), Timestamp(1)), 1);
        assert_eq!(retry_after_secs(Timestamp(0), Timestamp(1_000)), 1);
        assert_eq!(retry_after_secs(Timestamp(0), Timestamp(1_001)), 2);
        assert_eq!(retry_after_secs(Timestamp(100), Timestamp(60_000)), 60);
    }

    #[test]
    fn a_slot_counts_until_one_unit_after_its_latest_debit() {
        let mut c = WindowCounter::new(LimitUnit::Minute);
        let first = slot_at(LimitUnit::Minute, at(0));
        assert_eq!(c.debit(at(1_000), 1), first);
        assert_eq!(c.debit(at(5_000), 2), first);
        assert_eq!(c.debit(at(7_000), 4), first + 1);
        assert_eq!(c.used(at(7_000)), 7);
        // Slot 0's latest debit is at 5 s: it counts until 65 s, covering the debit at 1 s
        // for 64 s (at most U + U/10).
        assert_eq!(c.used(at(64_999)), 7);
        assert_eq!(c.used(at(65_000)), 4);
        assert_eq!(c.used(at(66_999)), 4);
        assert_eq!(c.used(at(67_000)), 0);
    }

    #[test]
    fn second_window_is_one_second_after_latest_debit() {
        let mut c = WindowCounter::new(LimitUnit::Second);
        c.debit(at(50), 1);
        assert_eq!(c.used(at(1_049)), 1);
        assert_eq!(c.used(at(1_050)), 0);
    }

    #[test]
    fn debits_eleven_slots_apart_reuse_the_ring_position() {
        let mut c = WindowCounter::new(LimitUnit::Second);
        for i in 0..30 {
            c.debit(at(i * 100), 1);
        }
        // At 2.95 s the debits at 1.96 s .. 2.9 s are live: slots 20 .. 29, 10 of them.
        assert_eq!(c.used(at(2_950)), 10);
        assert_eq!(c.used(at(2_900)), 10);
        assert_eq!(c.used(at(3_900)), 0);
    }

    #[test]
    fn a_clock_stepping_back_frees_nothing() {
        let mut c = WindowCounter::new(LimitUnit::Second);
        c.debit(at(5_000), 1);
        assert_eq!(c.used(at(0)), 1);
        assert_eq!(c.debit(at(0), 1), slot_at(LimitUnit::Second, at(5_000)));
        assert_eq!(c.used(at(5_999)), 2);
        assert_eq!(c.used(at(6_000)), 0);
    }

    #[test]
    fn adjust_replaces_the_reservation_in_its_slot_saturating_at_zero() {
        let mut c = WindowCounter::new(LimitUnit::Minute);
        let slot = c.debit(at(0), 10);
        c.debit(at(100), 5);
        c.adjust(slot, 5, 60);
        assert_eq!(c.used(at(100)), 70);
        c.adjust(slot, 60, 0);
        assert_eq!(c.used(at(100)), 10);
        c.adjust(slot, 500, 0);
        assert_eq!(c.used(at(100)), 0);
        // A slot that has left the ring is not touched.
        let mut c = WindowCounter::new(LimitUnit::Minute);
        let old = c.debit(at(0), 10);
        c.debit(at(66_000), 3);
        c.adjust(old, 10, 100);
        assert_eq!(c.used(at(66_000)), 3);
    }

    #[test]
    fn values_saturate_instead_of_wrapping() {
        let mut c = WindowCounter::new(LimitUnit::Minute);
        c.debit(at(0), u64::MAX);
        c.debit(at(6_000), u64::MAX);
        assert_eq!(c.used(at(6_000)), u64::MAX);
        assert!(!has_room(c.used(at(6_000)), u64::MAX));
    }

    /// C10: REQUEST/MINUTE 60, one request every 500 ms for 60 s starting 30 s into a
    /// minute.
    #[test]
    fn c10_rolling_minute_never_holds_more_than_60_and_admits_at_least_54() {
        let mut c = WindowCounter::new(LimitUnit::Minute);
        let mut log = Vec::new();
        for i in 0..120 {
            let now = at(30_000 + i * 500);
            if try_admit(&mut [(&mut c, 60)], now, 1) {
                log.push(now.0);
            }
        }
        assert_eq!(log.len(), 60);
        assert!(log.len() >= 54);
        assert_eq!(max_in_any_interval(&log, 60_000), 60);
    }

    /// The greatest number of admissions in any half-open interval `[a, a + len)`.
    fn max_in_any_interval(log: &[i64], len: i64) -> usize {
        log.iter()
            .enumerate()
            .map(|(i, start)| log[i..].iter().take_while(|t| **t < start + len).count())
            .max()
            .unwrap_or(0)
    }

    #[test]
    fn rolling_windows_hold_at_most_the_threshold_in_any_interval() {
        // Several arrival patterns over 5 minutes, 100 ms apart, bursts and gaps; every
        // 60-s interval of the admitted log holds at most the threshold, and steady
        // traffic gets at least 9/10 of it per minute.
        for (threshold, every_ms) in [(60, 500), (60, 100), (7, 1_300), (100, 200), (1, 100)] {
            let mut c = WindowCounter::new(LimitUnit::Minute);
            let mut log = Vec::new();
            let mut t = 30_000;
            while t < 330_000 {
                if try_admit(&mut [(&mut c, threshold)], at(t), 1) {
                    log.push(t);
                }
                t += every_ms;
            }
            assert!(
                max_in_any_interval(&log, 60_000) <= threshold as usize,
                "{threshold}/{every_ms}"
            );
            let per_minute = log.len() as f64 / 5.0;
            let offered = 60_000.0 / every_ms as f64;
            assert!(
                per_minute >= (threshold as f64).min(offered) * 0.9 - 1.0,
                "{threshold}/{every_ms}: {per_minute}"
            );
        }
        // The burst a fixed window lets through twice: 60 at 59.9 s, 60 more at 60.0 s.
        let mut c = WindowCounter::new(LimitUnit::Minute);
        let mut log = Vec::new();
        for t in (0..200).map(|i| 59_900 + i * 2) {
            if try_admit(&mut [(&mut c, 60)], at(t), 1) {
                log.push(t);
            }
        }
        assert_eq!(log.len(), 60);
        // The 50 admitted in slot [54 s, 60 s) all leave one minute after the last of them.
        assert_eq!(c.retry_at(at(60_300), 60), at(59_998 + 60_000));
    }

    /// Exact schedule of a steady 500 ms arrival over three minutes against 60/minute.
    #[test]
    fn steady_traffic_admits_exactly_this_schedule() {
        let mut c = WindowCounter::new(LimitUnit::Minute);
        let mut log = Vec::new();
        for i in 0..360 {
            let t = 30_000 + i * 500;
            if try_admit(&mut [(&mut c, 60)], at(t), 1) {
                log.push(t);
            }
        }
        // 60 in [30 s, 60 s). Nothing more until the slot [30 s, 36 s) leaves, one minute
        // after its latest debit (95.5 s); from then on slots leave as fast as requests
        // arrive until the window is full again at 125 s; and so on.
        assert_eq!(log.len(), 180);
        assert_eq!(log[59], 59_500);
        assert_eq!(log[60], 95_500);
        assert_eq!(log[119], 125_000);
        assert_eq!(log[120], 155_500);
        assert_eq!(log[121], 161_500);
        assert_eq!(log[179], 190_500);
        assert_eq!(max_in_any_interval(&log, 60_000), 60);
    }

    /// C14: REQUEST/SECOND 1 and REQUEST/MINUTE 3 on the same request.
    #[test]
    fn c14_a_refusal_consumes_nothing() {
        let mut second = WindowCounter::new(LimitUnit::Second);
        let mut minute = WindowCounter::new(LimitUnit::Minute);
        let mut admit = |ms| try_admit(&mut [(&mut second, 1), (&mut minute, 3)], at(ms), 1);
        assert!(admit(0));
        assert!(!admit(100));
        assert!(admit(1_200));
        assert!(admit(2_400));
        assert_eq!(minute.used(at(2_400)), 3);
        assert_eq!(second.used(at(2_400)), 1);
        assert_eq!(second.retry_at(at(2_500), 1), at(3_400));
        // A, C and D share the slot [0 s, 6 s), which counts until 60 s after D.
        assert_eq!(minute.retry_at(at(2_500), 3), at(62_400));
    }

    /// C11: TOKEN/DAY 100, 30-token requests at 23:50 UTC.
    #[test]
    fn c11_day_is_a_utc_calendar_day() {
        let mut c = WindowCounter::new(LimitUnit::Day);
        let evening = utc("2026-12-03T23:50:00Z");
        assert!(c.start_day(slot_at(LimitUnit::Day, evening), 0));
        let mut admitted = 0;
        for _ in 0..4 {
            assert!(try_admit(&mut [(&mut c, 100)], evening, 30));
            admitted += 1;
        }
        assert_eq!(admitted, 4);
        assert_eq!(c.used(evening), 120);
        assert!(!try_admit(&mut [(&mut c, 100)], evening, 30));
        let retry = c.retry_at(evening, 100);
        assert_eq!(retry, utc("2026-12-04T00:00:00Z"));
        assert_eq!(retry_after_secs(evening, retry), 600);
        assert_eq!(c.reset_at(evening), utc("2026-12-04T00:00:00Z"));

        let morning = utc("2026-12-04T00:00:05Z");
        assert_eq!(c.used(morning), 0);
        assert!(c.start_day(slot_at(LimitUnit::Day, morning), 0));
        assert!(try_admit(&mut [(&mut c, 100)], morning, 30));
        assert_eq!(c.used(morning), 30);
        assert_eq!(c.day(), Some(20_791));
    }

    #[test]
    fn a_day_starts_from_its_baseline_once() {
        let mut c = WindowCounter::new(LimitUnit::Day);
        assert_eq!(c.day(), None);
        assert!(c.start_day(20_790, 70));
        assert!(!c.start_day(20_790, 70));
        assert!(!c.start_day(20_789, 5));
        let noon = utc("2026-12-03T12:00:00Z");
        assert_eq!(c.used(noon), 70);
        c.debit(noon, 1);
        assert_eq!(c.used(noon), 71);
        assert!(c.start_day(20_791, 2));
        assert_eq!(c.used(utc("2026-12-04T12:00:00Z")), 2);
        // A rolling counter has no day.
        assert!(!WindowCounter::new(LimitUnit::Minute).start_day(20_790, 1));
    }

    /// C13: REQUEST/MINUTE 2, third request refused; DAY hit at 22:00 UTC.
    #[test]
    fn c13_minute_retry_after_is_within_a_minute_and_exact() {
        // Whatever the offset into the slot, Retry-After is in 1..=60 and a retry after
        // exactly that many seconds is admitted.
        for offset in [0, 1, 123, 2_999, 5_999, 6_000, 24_123, 59_999] {
            let mut c = WindowCounter::new(LimitUnit::Minute);
            let start = at(offset);
            assert!(try_admit(&mut [(&mut c, 2)], start, 1));
            assert!(try_admit(&mut [(&mut c, 2)], Timestamp(start.0 + 100), 1));
            let refused = Timestamp(start.0 + 200);
            assert!(!try_admit(&mut [(&mut c, 2)], refused, 1));
            let secs = retry_after_secs(refused, c.retry_at(refused, 2));
            assert_eq!(secs, 60, "offset {offset}");
            let too_early = Timestamp(refused.0 + (secs as i64 - 1) * 1_000);
            assert!(!has_room(c.used(too_early), 2));
            let retry = Timestamp(refused.0 + secs as i64 * 1_000);
            assert!(try_admit(&mut [(&mut c, 2)], retry, 1), "offset {offset}");
        }
        // The first debit leaving is enough when only one is needed.
        let mut c = WindowCounter::new(LimitUnit::Minute);
        c.debit(at(0), 1);
        c.debit(at(40_000), 1);
        assert_eq!(c.retry_at(at(50_000), 2), at(60_000));
        assert_eq!(retry_after_secs(at(50_000), at(60_000)), 10);
        assert_eq!(c.reset_at(at(50_000)), at(100_000));

        let mut day = WindowCounter::new(LimitUnit::Day);
        let ten_pm = utc("2026-12-03T22:00:00Z");
        day.start_day(slot_at(LimitUnit::Day, ten_pm), 5);
        assert!(!has_room(day.used(ten_pm), 5));
        assert_eq!(retry_after_secs(ten_pm, day.retry_at(ten_pm, 5)), 7_200);
    }

    #[test]
    fn retry_at_frees_only_as_many_slots_as_needed() {
        let mut c = WindowCounter::new(LimitUnit::Second);
        c.debit(at(0), 3);
        c.debit(at(250), 2);
        c.debit(at(420), 4);
        assert_eq!(c.used(at(500)), 9);
        // Under 9: the debit at 0 ms must leave (at 1 s); under 5: the one at 250 ms too.
        assert_eq!(c.retry_at(at(500), 9), at(1_000));
        assert_eq!(c.retry_at(at(500), 5), at(1_250));
        assert_eq!(c.retry_at(at(500), 1), at(1_420));
        assert_eq!(c.retry_at(at(500), 10), at(500));
        assert_eq!(c.reset_at(at(500)), at(1_420));
    }

    #[test]
    fn threshold_zero_retries_after_a_unit_or_at_midnight() {
        let c = WindowCounter::new(LimitUnit::Second);
        assert_eq!(c.retry_at(at(10), 0), at(1_010));
        let c = WindowCounter::new(LimitUnit::Minute);
        assert_eq!(retry_after_secs(at(10), c.retry_at(at(10), 0)), 60);
        let c = WindowCounter::new(LimitUnit::Day);
        let t = utc("2026-12-03T22:00:00Z");
        assert_eq!(retry_after_secs(t, c.retry_at(t, 0)), 7_200);
    }

    #[test]
    fn reset_is_now_for_an_empty_window() {
        let c = WindowCounter::new(LimitUnit::Minute);
        assert_eq!(c.reset_at(at(5)), at(5));
        let mut c = WindowCounter::new(LimitUnit::Minute);
        let slot = c.debit(at(0), 10);
        c.adjust(slot, 10, 0);
        assert_eq!(c.reset_at(at(5)), at(5));
        let c = WindowCounter::new(LimitUnit::Day);
        assert_eq!(c.reset_at(at(5)), at(5));
    }
}
