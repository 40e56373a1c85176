//! When to poll next: a jittered interval, so replicas that start together
//! do not poll together (no thundering herd on the control plane).

use std::time::Duration;

use rand::Rng;

/// The first poll comes at a uniformly random point of the first interval,
/// spreading replicas restarted at the same moment across it.
pub fn first_delay(rng: &mut impl Rng, interval: Duration) -> Duration {
    interval.mul_f64(rng.random_range(0.0..1.0))
}

/// Later polls come every `interval` ± 10 %, so the spread is kept and
/// no two replicas lock into step.
pub fn next_delay(rng: &mut impl Rng, interval: Duration) -> Duration {
    interval.mul_f64(rng.random_range(0.9..1.1))
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn delays_stay_in_their_windows() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let i = Duration::from_secs(10);
        for _ in 0..1000 {
            assert!(first_delay(&mut rng, i) < i);
            let d = next_delay(&mut rng, i);
            assert!(d >= Duration::from_secs(9) && d <= Duration::from_secs(11));
        }
    }
}
