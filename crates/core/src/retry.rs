//! The one retry policy for talking to another process: exponential backoff with full
//! jitter, so that many workers or members that failed together do not retry together.

use std::time::Duration;

use backon::ExponentialBuilder;

/// From 100 ms, doubling, to at most 5 s between tries, jittered, for as long as the
/// caller's condition holds. A caller with a deadline adds
/// `.with_total_delay(Some(deadline))`.
pub fn backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
}

#[cfg(test)]
mod tests {
    use super::*;
    use backon::BackoffBuilder;

    #[test]
    fn delays_grow_to_the_cap_and_a_deadline_ends_them() {
        let delays: Vec<Duration> = backoff().build().take(12).collect();
        assert_eq!(delays.len(), 12, "the policy gives up on its own");
        // Jitter adds up to one more delay to each.
        assert!(delays[0] >= Duration::from_millis(100) && delays[0] <= Duration::from_millis(200));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(10)));
        let bounded: Duration = backoff()
            .with_total_delay(Some(Duration::from_secs(10)))
            .build()
            .sum();
        assert!(bounded <= Duration::from_secs(10), "{bounded:?}");
    }
}
