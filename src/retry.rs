//! Pure retry policy: when to try a lead again, from its attempt number, its age and a jitter
//! value the caller draws (so tests are exact and never sleep).

use std::time::Duration;

/// Exponential back-off from `base`, capped at `max_delay`, with full jitter; a lead older than
/// `max_age` is given up on (dead-lettered).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    pub base: Duration,
    pub max_delay: Duration,
    pub max_age: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    RetryAfter(Duration),
    GiveUp,
}

impl RetryPolicy {
    /// The ceiling of the delay after `failed_attempts` failures: `base · 2^(n-1)`, capped.
    pub fn ceiling(&self, failed_attempts: u32) -> Duration {
        let exponent = failed_attempts.saturating_sub(1).min(32);
        self.base
            .checked_mul(1u32 << exponent.min(31))
            .unwrap_or(self.max_delay)
            .min(self.max_delay)
    }

    /// What to do after attempt number `failed_attempts` failed, for a lead received `age` ago.
    /// `jitter` is uniform in `[0, 1)`: full jitter picks the delay in `[0, ceiling]`.
    /// A `Retry-After` from the server is a floor.
    pub fn after_failure(
        &self,
        failed_attempts: u32,
        age: Duration,
        jitter: f64,
        retry_after: Option<Duration>,
    ) -> Decision {
        let jitter = jitter.clamp(0.0, 1.0);
        let mut delay = self.ceiling(failed_attempts).mul_f64(jitter);
        if let Some(floor) = retry_after {
            delay = delay.max(floor);
        }
        if age.saturating_add(delay) > self.max_age {
            Decision::GiveUp
        } else {
            Decision::RetryAfter(delay)
        }
    }
}

/// Parses a `Retry-After` value: delay-seconds or an HTTP date (relative to `now`).
pub fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RetryPolicy = RetryPolicy {
        base: Duration::from_secs(10),
        max_delay: Duration::from_secs(3600),
        max_age: Duration::from_secs(72 * 3600),
    };

    #[test]
    fn ceilings_double_from_the_base_and_stop_at_the_cap() {
        let table = [
            (1, 10),
            (2, 20),
            (3, 40),
            (4, 80),
            (9, 2560),
            (10, 3600),
            (50, 3600),
        ];
        for (attempt, seconds) in table {
            assert_eq!(
                POLICY.ceiling(attempt),
                Duration::from_secs(seconds),
                "attempt {attempt}"
            );
        }
    }

    #[test]
    fn full_jitter_scales_the_ceiling() {
        let cases = [
            (1, 0.0, 0),
            (1, 0.5, 5_000),
            (3, 0.25, 10_000),
            (12, 0.5, 1_800_000),
        ];
        for (attempt, jitter, millis) in cases {
            assert_eq!(
                POLICY.after_failure(attempt, Duration::ZERO, jitter, None),
                Decision::RetryAfter(Duration::from_millis(millis)),
                "attempt {attempt} jitter {jitter}"
            );
        }
    }

    #[test]
    fn retry_after_is_a_floor_not_a_ceiling() {
        let d = POLICY.after_failure(1, Duration::ZERO, 0.1, Some(Duration::from_secs(30)));
        assert_eq!(d, Decision::RetryAfter(Duration::from_secs(30)));
        let d = POLICY.after_failure(5, Duration::ZERO, 1.0, Some(Duration::from_secs(3)));
        assert_eq!(d, Decision::RetryAfter(Duration::from_secs(160)));
    }

    #[test]
    fn a_lead_past_its_max_age_is_given_up() {
        let age = Duration::from_secs(72 * 3600 - 5);
        assert_eq!(POLICY.after_failure(30, age, 0.9, None), Decision::GiveUp);
        assert_eq!(
            POLICY.after_failure(30, age, 0.001, None),
            Decision::RetryAfter(Duration::from_secs(3600).mul_f64(0.001))
        );
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(90))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
