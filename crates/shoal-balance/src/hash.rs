//! Consistent hashing: sticky sessions and version splits.

/// 64 bits of BLAKE3 over the parts, separated.
fn hash64(parts: &[&[u8]]) -> u64 {
    let mut h = blake3::Hasher::new();
    for p in parts {
        h.update(p);
        h.update(&[0xff]);
    }
    let mut first = [0u8; 8];
    first.copy_from_slice(&h.finalize().as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// The index of the endpoint (by id) that owns `key`: rendezvous hashing.
/// Adding or removing an endpoint moves only the keys it owns.
pub fn rendezvous<'a>(key: &str, ids: impl IntoIterator<Item = &'a str>) -> Option<usize> {
    ids.into_iter()
        .enumerate()
        .max_by_key(|(_, id)| hash64(&[id.as_bytes(), key.as_bytes()]))
        .map(|(i, _)| i)
}

/// Picks a version by weight. With a key (a user id), the same key always
/// lands on the same version while the weights stay the same, and moves
/// only as far as weights change (buckets are cumulative). Without a key,
/// `roll` (uniform in [0, 1)) decides. `targets` are `(version, weight)`
/// pairs, walked twice and never copied (this runs on every request).
pub fn split<'a, I>(targets: I, key: Option<&str>, roll: f64) -> Option<&'a str>
where
    I: IntoIterator<Item = (&'a str, u32)>,
    I::IntoIter: Clone,
{
    let targets = targets.into_iter();
    let total: u64 = targets.clone().map(|(_, w)| u64::from(w)).sum();
    if total == 0 {
        return None;
    }
    let point = match key {
        Some(k) => hash64(&[b"split", k.as_bytes()]) % total,
        None => ((roll.clamp(0.0, 0.999_999_999) * total as f64) as u64).min(total - 1),
    };
    let mut acc = 0u64;
    let mut last = None;
    for (version, w) in targets {
        acc += u64::from(w);
        if point < acc {
            return Some(version);
        }
        last = Some(version);
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_stick_and_move_minimally() {
        let three = ["a", "b", "c"];
        let keys: Vec<String> = (0..3000).map(|i| format!("session-{i}")).collect();
        let owner =
            |ids: &[&str], k: &str| ids[rendezvous(k, ids.iter().copied()).unwrap()].to_owned();
        let before: Vec<String> = keys.iter().map(|k| owner(&three, k)).collect();
        // Same key, same owner, every time.
        assert!(
            keys.iter()
                .zip(&before)
                .all(|(k, o)| &owner(&three, k) == o)
        );
        // "b" leaves: only its sessions move.
        let two = ["a", "c"];
        for (k, o) in keys.iter().zip(&before) {
            let now = owner(&two, k);
            if o != "b" {
                assert_eq!(&now, o);
            }
        }
        let share_b = before.iter().filter(|o| *o == "b").count();
        assert!((800..1200).contains(&share_b), "{share_b}");
    }

    #[test]
    fn splits_follow_weights_and_keep_users() {
        let targets = [("1", 90), ("2", 10)];
        let users: Vec<String> = (0..10_000).map(|i| format!("user-{i}")).collect();
        let on_two = users
            .iter()
            .filter(|u| split(targets, Some(u), 0.0) == Some("2"))
            .count();
        assert!((850..1150).contains(&on_two), "{on_two}");
        assert!(
            users
                .iter()
                .all(|u| split(targets, Some(u), 0.0) == split(targets, Some(u), 0.7))
        );
        // Growing the canary from 10 % to 50 % only moves users onto it.
        let wider = [("1", 50), ("2", 50)];
        for u in &users {
            if split(targets, Some(u), 0.0) == Some("2") {
                assert_eq!(split(wider, Some(u), 0.0), Some("2"));
            }
        }
        assert_eq!(split(targets, None, 0.95), Some("2"));
        assert_eq!(split(targets, None, 0.5), Some("1"));
        assert_eq!(split([], None, 0.5), None);
        // Zero weights are skipped; all zero is no choice.
        assert_eq!(split([("1", 0), ("2", 5)], None, 0.0), Some("2"));
        assert_eq!(split([("1", 0)], None, 0.0), None);
    }
}
