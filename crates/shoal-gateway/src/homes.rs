//! Which replica answered each live sequence's last step, so that when a
//! step has to go elsewhere (that replica died or was ejected) the gateway
//! tells the new replica where the sequence was (`x-shoal-sequence-from`).
//! A replica that does not hold the sequence then answers 410, naming the
//! lost state, instead of a 400 for a sequence it never heard of. Bounded:
//! entries older than ten minutes go first, and past the cap the oldest
//! half is dropped (a forgotten home only makes the error less precise).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

pub use shoal_api::replica::SEQUENCE_FROM_HEADER as SEQUENCE_FROM;

/// Sequence key to the replica that answered its last step, with when.
#[derive(Debug)]
pub struct Homes {
    map: Mutex<HashMap<String, (String, Duration)>>,
    cap: usize,
    ttl: Duration,
}

impl Default for Homes {
    fn default() -> Self {
        Homes::new(100_000, Duration::from_secs(600))
    }
}

impl Homes {
    /// At most `cap` sequences, each forgotten `ttl` after its last step.
    pub fn new(cap: usize, ttl: Duration) -> Homes {
        Homes {
            map: Mutex::new(HashMap::new()),
            cap,
            ttl,
        }
    }

    /// The replica that answered `key`'s last step, if known.
    pub fn home(&self, key: &str, now: Duration) -> Option<String> {
        let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(key)
            .filter(|(_, at)| now.saturating_sub(*at) <= self.ttl)
            .map(|(id, _)| id.clone())
    }

    /// `replica` answered a step of `key` at `now`; an `end` step forgets it.
    pub fn answered(&self, key: &str, replica: &str, end: bool, now: Duration) {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if end {
            map.remove(key);
            return;
        }
        map.insert(key.to_owned(), (replica.to_owned(), now));
        if map.len() > self.cap {
            let ttl = self.ttl;
            map.retain(|_, (_, at)| now.saturating_sub(*at) <= ttl);
            if map.len() > self.cap {
                let mut ages: Vec<Duration> = map.values().map(|(_, at)| *at).collect();
                ages.sort_unstable();
                let cut = ages[ages.len() / 2];
                map.retain(|_, (_, at)| *at > cut);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn homes_are_remembered_forgotten_and_bounded() {
        let h = Homes::new(4, Duration::from_secs(60));
        let t = Duration::from_secs;
        h.answered("seq:1", "r-a", false, t(1));
        assert_eq!(h.home("seq:1", t(2)).as_deref(), Some("r-a"));
        h.answered("seq:1", "r-b", false, t(3));
        assert_eq!(h.home("seq:1", t(3)).as_deref(), Some("r-b"));
        assert_eq!(h.home("seq:1", t(100)), None, "too old");
        h.answered("seq:1", "r-b", true, t(4));
        assert_eq!(h.home("seq:1", t(4)), None, "ended");
        for i in 0..10 {
            h.answered(&format!("seq:{i}"), "r", false, t(10 + i));
        }
        let kept = (0..10)
            .filter(|i| h.home(&format!("seq:{i}"), t(20)).is_some())
            .count();
        assert!(kept <= 4, "{kept}");
        assert!(h.home("seq:9", t(20)).is_some(), "the newest stay");
    }
}
