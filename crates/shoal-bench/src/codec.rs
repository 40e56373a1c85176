//! What reading a JSON inference request costs, in process, per request:
//! the gateway's precheck beside a plain serde walk of the same body (what
//! the precheck cost before it skipped the tensor data), and the replica's
//! decode (the skim and the number fast path) beside the same decode by
//! serde alone (what it cost before). Digits rows (64 FP32 each),
//! alternating rounds; each series is timed over a batch of calls and
//! reported as the median of rounds.

use std::time::Instant;

use serde::Serialize;
use shoal_core::{Tensor, TensorData};
use shoal_oip::{DecodedRequest, Limits};

use crate::stats::Spread;

/// One body size's timings, µs per call (median of rounds).
#[derive(Debug, Clone, Serialize)]
pub struct CodecRow {
    /// Rows of 64 numbers in the request.
    pub rows: usize,
    /// Body size in bytes.
    pub bytes: usize,
    /// `serde_json` walking the whole body without keeping anything.
    pub serde_walk_us: f64,
    /// The gateway's precheck.
    pub precheck_us: f64,
    /// The replica's decode.
    pub decode_us: f64,
    /// The same decode by serde alone.
    pub decode_serde_us: f64,
    /// serde walk ÷ precheck, per round.
    pub precheck_speedup: Spread,
    /// serde decode ÷ decode, per round.
    pub decode_speedup: Spread,
}

/// Times `rounds` rounds for each of `rows`.
pub fn measure(rows: &[usize], rounds: usize) -> anyhow::Result<Vec<CodecRow>> {
    let all = crate::digits_rows(rows.iter().copied().max().unwrap_or(1))?;
    rows.iter()
        .map(|&n| {
            let data: Vec<f32> = all.iter().take(n).flatten().copied().collect();
            let request = DecodedRequest {
                id: Some("bench".into()),
                parameters: None,
                inputs: vec![Tensor::new("input", vec![n, 64], TensorData::Fp32(data))?],
                outputs: None,
            };
            let ordered = shoal_oip::encode_request(&request);
            let limits = Limits::default();
            anyhow::ensure!(
                shoal_oip::decode_request(&ordered, &limits)?
                    == shoal_oip::decode_request_by_serde(&ordered, &limits)?,
                "both readings must decode alike"
            );
            Ok(row(n, &ordered, rounds))
        })
        .collect()
}

fn row(rows: usize, ordered: &[u8], rounds: usize) -> CodecRow {
    let limits = Limits::default();
    // About 20 ms of work per series and round.
    let calls = (200_000 / ordered.len()).clamp(20, 20_000);
    let time = |f: &dyn Fn()| {
        let started = Instant::now();
        for _ in 0..calls {
            f();
        }
        #[allow(clippy::cast_precision_loss)]
        let per_call = started.elapsed().as_secs_f64() * 1e6 / calls as f64;
        per_call
    };
    let mut series: [Vec<f64>; 4] = Default::default();
    for _ in 0..rounds {
        series[0].push(time(&|| {
            let walked: Result<serde::de::IgnoredAny, _> =
                serde_json::from_slice(std::hint::black_box(ordered));
            std::hint::black_box(walked.is_ok());
        }));
        series[1].push(time(&|| {
            let checked = shoal_oip::precheck_request(std::hint::black_box(ordered), &limits);
            std::hint::black_box(checked.is_ok());
        }));
        series[2].push(time(&|| {
            let decoded = shoal_oip::decode_request(std::hint::black_box(ordered), &limits);
            std::hint::black_box(decoded.is_ok());
        }));
        series[3].push(time(&|| {
            let decoded =
                shoal_oip::decode_request_by_serde(std::hint::black_box(ordered), &limits);
            std::hint::black_box(decoded.is_ok());
        }));
    }
    let ratio =
        |a: &[f64], b: &[f64]| -> Vec<f64> { a.iter().zip(b).map(|(a, b)| a / b).collect() };
    CodecRow {
        rows,
        bytes: ordered.len(),
        serde_walk_us: crate::stats::median(&series[0]),
        precheck_us: crate::stats::median(&series[1]),
        decode_us: crate::stats::median(&series[2]),
        decode_serde_us: crate::stats::median(&series[3]),
        precheck_speedup: Spread::of(&ratio(&series[0], &series[1])),
        decode_speedup: Spread::of(&ratio(&series[3], &series[2])),
    }
}
