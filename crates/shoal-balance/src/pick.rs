//! Power of two choices over peak-EWMA cost.

use rand::Rng;

/// One candidate endpoint.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// Latency estimate, nanoseconds.
    pub latency_ns: f64,
    /// Requests outstanding to it.
    pub outstanding: u32,
    /// Slow-start weight in (0, 1].
    pub weight: f64,
}

impl Candidate {
    /// Lower is better: expected wait, inflated while ramping up.
    pub fn cost(&self) -> f64 {
        self.latency_ns * (f64::from(self.outstanding) + 1.0) / self.weight.max(0.01)
    }
}

/// Picks among `candidates` by power of two choices: two distinct at
/// random, the cheaper wins. Two random choices avoid the herd that "always
/// the cheapest" causes while keeping nearly all of its benefit.
pub fn p2c(candidates: &[Candidate], rng: &mut impl Rng) -> Option<usize> {
    p2c_by(candidates.len(), rng, |i| candidates[i])
}

/// [`p2c`] among `n` candidates whose costs are read only for the two
/// drawn: `candidate(i)` may take locks or read clocks, and the other
/// `n - 2` need not pay for it (nor a list be built to hold them).
pub fn p2c_by(
    n: usize,
    rng: &mut impl Rng,
    mut candidate: impl FnMut(usize) -> Candidate,
) -> Option<usize> {
    match n {
        0 => None,
        1 => Some(0),
        n => {
            let a = rng.random_range(0..n);
            let mut b = rng.random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            Some(if candidate(a).cost() <= candidate(b).cost() {
                a
            } else {
                b
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    fn c(latency_ms: f64, outstanding: u32) -> Candidate {
        Candidate {
            latency_ns: latency_ms * 1e6,
            outstanding,
            weight: 1.0,
        }
    }

    #[test]
    fn a_slow_endpoint_gets_little_traffic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let candidates = [c(1.0, 0), c(1.0, 0), c(10.0, 0)];
        let mut hits = [0; 3];
        for _ in 0..3000 {
            hits[p2c(&candidates, &mut rng).unwrap()] += 1;
        }
        // The slow one wins only when drawn against itself, which p2c never
        // does: it loses every pair.
        assert_eq!(hits[2], 0, "{hits:?}");
        assert!(hits[0] > 1200 && hits[1] > 1200, "{hits:?}");
    }

    #[test]
    fn outstanding_requests_count() {
        let busy = c(1.0, 9);
        let idle = c(5.0, 0);
        assert!(idle.cost() < busy.cost());
        let ramping = Candidate {
            weight: 0.1,
            ..c(1.0, 0)
        };
        assert!(ramping.cost() > c(5.0, 0).cost());
    }

    #[test]
    fn p2c_by_reads_two_costs_and_agrees_with_p2c() {
        let candidates: Vec<Candidate> = (0..8).map(|i| c(f64::from(i) + 1.0, i)).collect();
        let mut a = rand::rngs::StdRng::seed_from_u64(7);
        let mut b = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..200 {
            let mut read = Vec::new();
            let by = p2c_by(candidates.len(), &mut b, |i| {
                read.push(i);
                candidates[i]
            });
            assert_eq!(by, p2c(&candidates, &mut a));
            assert_eq!(read.len(), 2);
            assert_ne!(read[0], read[1], "two distinct candidates");
        }
        assert_eq!(
            p2c_by(1, &mut b, |_| unreachable!("one needs no cost")),
            Some(0)
        );
    }

    #[test]
    fn edge_cases() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        assert_eq!(p2c(&[], &mut rng), None);
        assert_eq!(p2c(&[c(1.0, 0)], &mut rng), Some(0));
    }
}
