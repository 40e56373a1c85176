//! One function per fuzz target: what a decoder of untrusted input must
//! survive, and what must hold of its answer. `fuzz/` (cargo-fuzz, run by
//! `scripts/fuzz`) feeds them coverage-guided input; this crate's tests
//! replay each target's seed corpus and every crash ever found
//! (`fuzz/corpus/TARGET`, `fuzz/regressions/TARGET`) as ordinary tests, so
//! a fixed crash stays fixed.
//!
//! Each function panics only when Shoal would: a panic is a finding.

use std::time::Duration;

use shoal_artifacts::pack;
use shoal_oip::Limits;

/// Limits small enough that the fuzzer explores, not allocates.
fn limits() -> Limits {
    Limits {
        max_elements: 1 << 16,
    }
}

/// The OIP JSON request decoder (replicas), against the gateway's lighter
/// precheck: what a replica would accept, a gateway must let through. And
/// the precheck's scan ([`shoal_oip::skim`]) only ever empties the data
/// arrays of inputs: the body it keeps is the body, those aside. And the
/// replica's fast reading (the scan and the number fast path) answers
/// exactly as serde alone does, errors included, and so does the
/// precheck's one-pass reading ([`shoal_oip::precheck_request_by_serde`]).
pub fn oip_json(data: &[u8]) {
    let decoded = shoal_oip::decode_request(data, &limits());
    assert_eq!(
        decoded,
        shoal_oip::decode_request_by_serde(data, &limits()),
        "the fast reading and serde's disagree"
    );
    let prechecked = shoal_oip::precheck_request(data, &limits());
    assert_eq!(
        prechecked,
        shoal_oip::precheck_request_by_serde(data, &limits()),
        "the precheck's one-pass reading and serde's disagree"
    );
    if decoded.is_ok() {
        assert!(
            prechecked.is_ok(),
            "the gateway refuses what a replica accepts: {prechecked:?}"
        );
    }
    if let (Some(skimmed), Ok(original)) = (
        shoal_oip::skim::without_data(data),
        serde_json::from_slice::<serde_json::Value>(data),
    ) {
        let skimmed = serde_json::from_slice::<serde_json::Value>(&skimmed)
            .expect("the scan keeps a JSON body JSON");
        assert_eq!(without_input_data(skimmed), without_input_data(original));
    }
}

/// `body` with every `inputs[i].data` array emptied.
fn without_input_data(mut body: serde_json::Value) -> serde_json::Value {
    if let Some(inputs) = body.get_mut("inputs").and_then(|i| i.as_array_mut()) {
        for input in inputs {
            if let Some(data) = input.get_mut("data").and_then(|d| d.as_array_mut()) {
                data.clear();
            }
        }
    }
    body
}

/// Triton's binary tensor data extension: the first two bytes choose the
/// length of the JSON part (the `Inference-Header-Content-Length` header),
/// the rest is the body.
pub fn oip_binary(data: &[u8]) {
    let Some((head, body)) = data.split_first_chunk::<2>() else {
        return;
    };
    let json_len = u16::from_le_bytes(*head).to_string();
    let decoded = shoal_oip::decode_request_parts(body, Some(&json_len), &limits());
    let prechecked = shoal_oip::precheck_request_parts(body, Some(&json_len), &limits());
    if decoded.is_ok() {
        assert!(
            prechecked.is_ok(),
            "the gateway refuses what a replica accepts: {prechecked:?}"
        );
    }
}

/// Artifact manifests (from the origin or a peer): parsed and checked, and
/// what parses survives a round trip.
pub fn manifest(data: &[u8]) {
    if let Ok(m) = shoal_artifacts::Manifest::from_json(data) {
        let again = shoal_artifacts::Manifest::from_json(&m.to_json())
            .expect("a manifest Shoal wrote reads back");
        assert_eq!(again, m);
    }
}

/// Pack files of the chunk cache, as a crash or a bad disk leaves them:
/// the input describes records (kind, length) that are written properly,
/// then the pack is cut short and one byte is flipped where the input
/// says. Scanning must stop at the first damaged record and never report
/// one that does not fit.
pub fn pack(data: &[u8]) {
    let mut bytes = Vec::new();
    let mut specs = data.chunks_exact(4);
    for spec in specs.by_ref().take(64) {
        let kind = if spec[0] & 1 == 0 {
            pack::Kind::Chunk
        } else {
            pack::Kind::Tombstone
        };
        let len = u32::from(u16::from_le_bytes([spec[1], spec[2]]) % 512);
        let id = shoal_artifacts::ChunkId::of(&[spec[3]]);
        let len = if kind == pack::Kind::Tombstone {
            0
        } else {
            len
        };
        bytes.extend_from_slice(&pack::encode_header(kind, &id, len));
        bytes.extend(std::iter::repeat_n(spec[3], len as usize));
    }
    // The last four bytes of the input say where to cut and flip.
    if let [.., cut_lo, cut_hi, flip_lo, flip_hi] = *data {
        let cut = usize::from(u16::from_le_bytes([cut_lo, cut_hi]));
        bytes.truncate(bytes.len().saturating_sub(cut % 64));
        let flip = usize::from(u16::from_le_bytes([flip_lo, flip_hi]));
        if let Some(b) = bytes.get_mut(flip) {
            *b ^= 0x5a;
        }
    }
    let len = bytes.len() as u64;
    let mut last_end = 0;
    let whole = pack::scan(std::io::Cursor::new(&bytes), len, |header, at| {
        assert!(at >= last_end + pack::HEADER as u64, "records overlap");
        last_end = at + u64::from(header.len);
        assert!(last_end <= len, "a record runs past the pack");
    })
    .expect("scanning memory cannot fail");
    assert!(whole <= len && whole >= last_end);
}

/// Routing tables as a gateway receives them (from the control plane or
/// its own `routing.json`): applied, then every model routed.
pub fn routing_table(data: &[u8]) {
    let Ok(table) = serde_json::from_slice::<shoal_api::fleet::RoutingTable>(data) else {
        return;
    };
    let routes = shoal_gateway::routes::Routes::new(
        "us-east".into(),
        shoal_balance::health::HealthPolicy::default(),
    );
    routes.apply(&table, Duration::ZERO);
    let state = routes.snapshot();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(7);
    for policy in &table.models {
        let version = routes.choose_version(&state, &policy.model, Some("user"), &mut rng);
        if let Ok(candidates) = routes.candidates(
            &state,
            &policy.model,
            version.as_deref(),
            &[],
            Duration::ZERO,
        ) {
            let _ = routes.pick(&candidates, Some("session"), &mut rng, Duration::ZERO);
        }
    }
}

/// A fuzz target: a name and the function that takes its input.
pub type Target = (&'static str, fn(&[u8]));

/// Every target by name, for the corpus tests and `scripts/fuzz`.
pub const TARGETS: [Target; 5] = [
    ("oip_json", oip_json),
    ("oip_binary", oip_binary),
    ("manifest", manifest),
    ("pack", pack),
    ("routing_table", routing_table),
];

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    fn dir(kind: &str, target: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../fuzz")
            .join(kind)
            .join(target)
    }

    /// Every seed and every crash the fuzzers ever found, through its
    /// target: no panic.
    #[test]
    fn corpora_and_regressions_pass_every_target() {
        for (target, run) in super::TARGETS {
            let mut replayed = 0;
            for kind in ["corpus", "regressions"] {
                let Ok(entries) = std::fs::read_dir(dir(kind, target)) else {
                    continue;
                };
                for entry in entries {
                    let path = entry.unwrap().path();
                    let data = std::fs::read(&path).unwrap();
                    let outcome = std::panic::catch_unwind(|| run(&data));
                    assert!(outcome.is_ok(), "{target} panics on {}", path.display());
                    replayed += 1;
                }
            }
            assert!(
                replayed > 0,
                "{target} has no seed corpus in fuzz/corpus/{target}"
            );
        }
    }
}
