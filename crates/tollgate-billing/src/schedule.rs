//! The retry schedule: how long a failed delivery waits before each next attempt.

use std::time::Duration;

/// SPEC §3's default: 5 s, 30 s, 2 min, 10 min, 1 h, 3 h, 8 h.
pub const DEFAULT_RETRY_SCHEDULE: &str = "5s,30s,2m,10m,1h,3h,8h";

/// Waits after the 1st, 2nd, ... failed attempt; after the last step fails the delivery
/// is dead-lettered. So a schedule of N steps allows N + 1 attempts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrySchedule {
    steps: Vec<Duration>,
}

impl Default for RetrySchedule {
    fn default() -> Self {
        Self {
            steps: vec![
                Duration::from_secs(5),
                Duration::from_secs(30),
                Duration::from_secs(120),
                Duration::from_secs(600),
                Duration::from_secs(3600),
                Duration::from_secs(3 * 3600),
                Duration::from_secs(8 * 3600),
            ],
        }
    }
}

impl RetrySchedule {
    pub fn new(steps: Vec<Duration>) -> Self {
        Self { steps }
    }

    /// Parses `TOLLGATE_WEBHOOK_RETRY_SCHEDULE`: comma-separated durations such as
    /// `5s,30s,2m` (humantime syntax: `ms`, `s`, `m`, `h`, `d`). An empty list means no
    /// retries (one attempt). Zero durations are refused.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(Self { steps: Vec::new() });
        }
        let steps = text
            .split(',')
            .map(|step| {
                let step = step.trim();
                let duration = humantime::parse_duration(step)
                    .map_err(|e| format!("'{step}' is not a duration ({e})"))?;
                if duration.is_zero() {
                    return Err(format!("'{step}': retry waits must be longer than zero"));
                }
                Ok(duration)
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Self { steps })
    }

    pub fn steps(&self) -> &[Duration] {
        &self.steps
    }

    /// The wait after failure number `failed + 1` (`failed` = earlier failures in this
    /// run of the schedule), or `None` when the schedule is exhausted.
    pub fn step(&self, failed: u32) -> Option<Duration> {
        self.steps.get(usize::try_from(failed).ok()?).copied()
    }

    /// The step stretched by a jitter in `[0, +10 %]`: never earlier than the step, and
    /// spread so that deliveries failing together do not retry together. `unit` is a
    /// uniform sample of `[0, 1)`.
    pub fn jittered(step: Duration, unit: f64) -> Duration {
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.0
        };
        // Saturating: a step near `Duration::MAX` (a schedule of absurd length) must not
        // overflow inside the worker.
        step.saturating_add(step.mul_f64(0.1 * unit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_the_spec_schedule() {
        assert_eq!(
            RetrySchedule::parse(DEFAULT_RETRY_SCHEDULE).unwrap(),
            RetrySchedule::default()
        );
        let secs: Vec<u64> = RetrySchedule::default()
            .steps()
            .iter()
            .map(Duration::as_secs)
            .collect();
        assert_eq!(secs, [5, 30, 120, 600, 3600, 10_800, 28_800]);
    }

    #[test]
    fn parses_short_and_spaced_schedules() {
        let schedule = RetrySchedule::parse(" 100ms, 200ms ,1s").unwrap();
        assert_eq!(
            schedule.steps(),
            [
                Duration::from_millis(100),
                Duration::from_millis(200),
                Duration::from_secs(1)
            ]
        );
        assert_eq!(schedule.step(0), Some(Duration::from_millis(100)));
        assert_eq!(schedule.step(2), Some(Duration::from_secs(1)));
        assert_eq!(schedule.step(3), None);
        assert_eq!(RetrySchedule::parse("").unwrap().step(0), None);
    }

    #[test]
    fn refuses_what_is_not_a_duration() {
        let error = RetrySchedule::parse("5s,soon").unwrap_err();
        assert!(error.starts_with("'soon' is not a duration ("), "{error}");
        assert_eq!(
            RetrySchedule::parse("5s,,30s").unwrap_err(),
            "'' is not a duration (value was empty)"
        );
        assert_eq!(
            RetrySchedule::parse("0s").unwrap_err(),
            "'0s': retry waits must be longer than zero"
        );
    }

    #[test]
    fn jitter_stays_within_ten_percent_above_the_step() {
        let step = Duration::from_secs(30);
        assert_eq!(RetrySchedule::jittered(step, 0.0), step);
        assert_eq!(
            RetrySchedule::jittered(step, 0.5),
            Duration::from_millis(31_500)
        );
        assert_eq!(RetrySchedule::jittered(step, 1.0), Duration::from_secs(33));
        assert_eq!(RetrySchedule::jittered(step, f64::NAN), step);
        assert_eq!(RetrySchedule::jittered(step, 7.0), Duration::from_secs(33));
    }

    #[test]
    fn jitter_on_a_step_near_the_largest_duration_saturates() {
        // 584,000,000,000 years parse (just under u64::MAX seconds); +10 % overflows.
        let schedule = RetrySchedule::parse("584000000000y").unwrap();
        let step = schedule.step(0).unwrap();
        assert_eq!(step, Duration::from_secs(18_429_638_400_000_000_000));
        assert_eq!(RetrySchedule::jittered(step, 1.0), Duration::MAX);
        assert_eq!(RetrySchedule::jittered(Duration::MAX, 0.5), Duration::MAX);
        assert_eq!(RetrySchedule::jittered(step, 0.0), step);
    }
}
