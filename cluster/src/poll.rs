//! How often a waiter asks whether a job has changed.
//!
//! A job's outcome and state live in Redis; the CLI's `run --cluster` and the job API's
//! `WatchJob` read them again until they change. A fixed 200 ms made every short job wait
//! 100 ms on average after it had ended (a fifth of a small pipeline's wall time on a
//! cluster). The wait now grows with the time already waited: a waiter sees a job end at
//! most a tenth of its age late, and a long job still costs one read per [`MAX_POLL_DELAY`].

use std::time::Duration;

/// The shortest wait between two reads.
pub const MIN_POLL_DELAY: Duration = Duration::from_millis(10);
/// The longest wait between two reads.
pub const MAX_POLL_DELAY: Duration = Duration::from_millis(200);

/// The wait before the next read, `waited` after the first: a tenth of it, within
/// [`MIN_POLL_DELAY`, `MAX_POLL_DELAY`].
pub fn poll_delay(waited: Duration) -> Duration {
    (waited / 10).clamp(MIN_POLL_DELAY, MAX_POLL_DELAY)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_wait_is_a_tenth_of_the_time_waited_within_bounds() {
        assert_eq!(poll_delay(Duration::ZERO), MIN_POLL_DELAY);
        assert_eq!(poll_delay(ms(50)), MIN_POLL_DELAY);
        assert_eq!(poll_delay(ms(400)), ms(40));
        assert_eq!(poll_delay(ms(1_990)), ms(199));
        assert_eq!(poll_delay(ms(60_000)), MAX_POLL_DELAY);
        assert_eq!(poll_delay(Duration::MAX), MAX_POLL_DELAY);
    }

    #[test]
    fn a_waiter_reads_often_early_and_five_times_a_second_late() {
        let reads_until = |end: Duration| {
            let (mut waited, mut reads) = (Duration::ZERO, 0);
            while waited < end {
                waited += poll_delay(waited);
                reads += 1;
            }
            reads
        };
        // A job that ends within half a second is seen within 10 % of its age.
        assert!(reads_until(ms(500)) <= 30, "{}", reads_until(ms(500)));
        // Past two seconds, 5 reads a second.
        let late = reads_until(ms(12_000)) - reads_until(ms(2_000));
        assert!((49..=51).contains(&late), "{late}");
    }
}
