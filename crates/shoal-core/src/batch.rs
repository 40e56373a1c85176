//! Dynamic batching, the pure part: when a queue of requests should run
//! as one batch ([`BatchPolicy::decide`]), which of them go together
//! ([`BatchPolicy::take`], [`batch_key`]), and how their tensors are
//! joined along the first (batch) dimension and the outputs split back
//! ([`concat`], [`split`]), so each request gets exactly the rows it sent.
//!
//! The policy is Triton's dynamic batcher's — run when the queued rows
//! reach the largest batch or one of the preferred sizes, or when the
//! oldest request has waited the longest delay allowed — with one more
//! rule: run at once when no other request is on its way (none is being
//! received or decoded), since waiting could only add latency. So a lone
//! caller pays nothing for batching, and under load batches fill within
//! the delay. No clock here: the caller says how long the oldest has
//! waited and whether more are coming.

use std::time::Duration;

use crate::{DataType, Dim, Signature, Tensor, TensorData};

/// The largest batch a version may be configured with.
pub const MAX_BATCH_ROWS: usize = 4096;

/// The longest delay a version may be configured with.
pub const MAX_BATCH_DELAY: Duration = Duration::from_secs(1);

/// How one model version batches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchPolicy {
    /// Rows per batch at most (a single larger request runs alone).
    pub max_rows: usize,
    /// How long the oldest request may wait for others.
    pub delay: Duration,
    /// Batch sizes that run at once when reached (ascending).
    pub preferred: Vec<usize>,
}

/// What to do with the queue now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Run a batch now.
    Run,
    /// Wait this much longer for more requests.
    Wait(Duration),
}

impl BatchPolicy {
    /// A policy, checked: `max_rows` in 1..=4096, `delay` ≤ 1 s, each
    /// preferred size in 1..=`max_rows`.
    pub fn new(
        max_rows: usize,
        delay: Duration,
        preferred: Vec<usize>,
    ) -> Result<BatchPolicy, String> {
        if !(1..=MAX_BATCH_ROWS).contains(&max_rows) {
            return Err(format!(
                "max batch {max_rows}: must be between 1 and {MAX_BATCH_ROWS}"
            ));
        }
        if delay > MAX_BATCH_DELAY {
            return Err(format!(
                "batch delay {delay:?}: at most {MAX_BATCH_DELAY:?} (every request waits up to it)"
            ));
        }
        let mut preferred = preferred;
        preferred.sort_unstable();
        preferred.dedup();
        if let Some(bad) = preferred.iter().find(|p| **p == 0 || **p > max_rows) {
            return Err(format!(
                "preferred batch size {bad}: must be between 1 and the max batch {max_rows}"
            ));
        }
        Ok(BatchPolicy {
            max_rows,
            delay,
            preferred,
        })
    }

    /// Checks that `signature` can batch: every input and output has a
    /// dynamic first dimension (the batch), so requests can be joined
    /// along it and answers split back.
    pub fn check(&self, signature: &Signature) -> Result<(), String> {
        for (kind, spec) in signature
            .inputs
            .iter()
            .map(|s| ("input", s))
            .chain(signature.outputs.iter().map(|s| ("output", s)))
        {
            if !matches!(spec.shape.first(), Some(Dim::Dynamic(_))) {
                return Err(format!(
                    "{kind} {:?} has shape {:?}: batching needs a dynamic first (batch) dimension on \
                     every input and output; push it without --max-batch",
                    spec.name,
                    spec.oip_shape()
                ));
            }
        }
        Ok(())
    }

    /// Whether to run the queue now: `rows` is what the next batch would
    /// hold (see [`BatchPolicy::take`]), `waited` how long its oldest
    /// request has waited, `more_coming` whether other requests are being
    /// received or decoded.
    pub fn decide(&self, rows: usize, waited: Duration, more_coming: bool) -> Decision {
        if !more_coming
            || rows >= self.max_rows
            || self.preferred.contains(&rows)
            || waited >= self.delay
        {
            Decision::Run
        } else {
            Decision::Wait(self.delay - waited)
        }
    }

    /// How many requests, oldest first with `rows` rows each, the next
    /// batch takes: as many as fit in `max_rows`, and at least one.
    pub fn take(&self, rows: &[usize]) -> usize {
        let mut total = 0;
        let mut n = 0;
        for r in rows {
            if n > 0 && total + r > self.max_rows {
                break;
            }
            total += r;
            n += 1;
        }
        n
    }
}

/// Rows in the trial batch a replica times when it loads a batched
/// version (see [`pays`]).
pub const TRIAL_ROWS: usize = 8;

/// Whether batching pays on the engine that runs a model: a row in a
/// batch must cost under 0.9× a row run alone. Not every engine gains:
/// tract runs the text-orientation convnet 4× slower per row in batches
/// than one image at a time, and batching it would cut throughput.
pub fn pays(alone_per_row: Duration, batched_per_row: Duration) -> bool {
    batched_per_row.as_secs_f64() < 0.9 * alone_per_row.as_secs_f64()
}

/// Per input: name, datatype and every dimension but the first.
pub type BatchKey = Vec<(String, DataType, Vec<usize>)>;

/// What requests must share to run in one batch: per input, its name,
/// datatype and every dimension but the first. `None` when an input has
/// no batch dimension, or the inputs disagree on their row count.
pub fn batch_key(inputs: &[Tensor]) -> Option<(usize, BatchKey)> {
    let rows = inputs.first()?.shape().first().copied()?;
    let mut key = Vec::with_capacity(inputs.len());
    for t in inputs {
        let (&first, rest) = t.shape().split_first()?;
        if first != rows {
            return None;
        }
        key.push((t.name.clone(), t.datatype(), rest.to_vec()));
    }
    Some((rows, key))
}

/// The inputs of several requests (same [`batch_key`], same input order)
/// joined along the first dimension.
pub fn concat(requests: Vec<Vec<Tensor>>) -> Result<Vec<Tensor>, String> {
    let mut requests = requests.into_iter();
    let first = requests.next().ok_or("no request to batch")?;
    let mut joined: Vec<(String, Vec<usize>, TensorData)> =
        first.into_iter().map(Tensor::into_parts).collect();
    for request in requests {
        if request.len() != joined.len() {
            return Err("requests with different inputs cannot share a batch".into());
        }
        for ((name, shape, data), t) in joined.iter_mut().zip(request) {
            let (other_name, other_shape, other_data) = t.into_parts();
            if *name != other_name || shape.get(1..) != other_shape.get(1..) {
                return Err(format!(
                    "input {other_name:?} {other_shape:?} cannot join a batch of {name:?} {shape:?}"
                ));
            }
            data.extend(other_data)
                .map_err(|d| format!("input {name:?}: {d} cannot join a batch of another type"))?;
            shape[0] += other_shape[0];
        }
    }
    joined
        .into_iter()
        .map(|(name, shape, data)| Tensor::new(name, shape, data).map_err(|e| e.to_string()))
        .collect()
}

/// A batch's outputs split back into one set per request, `rows[i]` rows
/// for request `i`. Every output must have the batch's rows first.
pub fn split(outputs: Vec<Tensor>, rows: &[usize]) -> Result<Vec<Vec<Tensor>>, String> {
    let total: usize = rows.iter().sum();
    let mut per_request: Vec<Vec<Tensor>> = rows.iter().map(|_| Vec::new()).collect();
    for output in outputs {
        let (name, shape, data) = output.into_parts();
        if shape.first() != Some(&total) {
            return Err(format!(
                "output {name:?} has shape {shape:?}: a batch of {total} rows needs them first"
            ));
        }
        let row_len: usize = shape[1..].iter().product();
        let lens: Vec<usize> = rows.iter().map(|r| r * row_len).collect();
        for ((piece, r), out) in data
            .split(&lens)
            .into_iter()
            .zip(rows)
            .zip(&mut per_request)
        {
            let mut piece_shape = shape.clone();
            piece_shape[0] = *r;
            out.push(Tensor::new(name.clone(), piece_shape, piece).map_err(|e| e.to_string())?);
        }
    }
    Ok(per_request)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn policy(max: usize, preferred: &[usize]) -> BatchPolicy {
        BatchPolicy::new(max, 2 * MS, preferred.to_vec()).unwrap()
    }

    fn rows(name: &str, n: usize, start: f32) -> Tensor {
        let data = (0..n * 3).map(|i| start + i as f32).collect();
        Tensor::new(name, vec![n, 3], TensorData::Fp32(data)).unwrap()
    }

    #[test]
    fn runs_at_the_largest_batch_a_preferred_size_or_the_deadline() {
        let p = policy(16, &[8]);
        let coming = |rows, waited| p.decide(rows, waited, true);
        assert_eq!(coming(3, Duration::ZERO), Decision::Wait(2 * MS));
        assert_eq!(coming(3, MS), Decision::Wait(MS));
        assert_eq!(coming(3, 2 * MS), Decision::Run);
        assert_eq!(coming(8, Duration::ZERO), Decision::Run, "preferred");
        assert_eq!(coming(9, Duration::ZERO), Decision::Wait(2 * MS));
        assert_eq!(coming(16, Duration::ZERO), Decision::Run);
        assert_eq!(coming(40, Duration::ZERO), Decision::Run);
        // Nothing else on its way: waiting cannot fill the batch.
        assert_eq!(p.decide(1, Duration::ZERO, false), Decision::Run);
        assert_eq!(p.decide(3, Duration::ZERO, false), Decision::Run);
    }

    #[test]
    fn batching_pays_only_when_a_row_in_a_batch_is_clearly_cheaper() {
        let us = Duration::from_micros;
        assert!(pays(us(7), us(2)), "the digits MLP");
        assert!(!pays(us(1400), us(5700)), "the convnet on tract");
        assert!(!pays(us(100), us(95)), "within noise");
    }

    #[test]
    fn takes_what_fits_and_never_nothing() {
        let p = policy(8, &[]);
        assert_eq!(p.take(&[3, 3, 3]), 2);
        assert_eq!(p.take(&[8, 1]), 1);
        assert_eq!(p.take(&[20, 1]), 1, "a large request runs alone");
        assert_eq!(p.take(&[1, 1, 1, 1, 1, 1, 1, 1, 1]), 8);
        assert_eq!(p.take(&[]), 0);
    }

    #[test]
    fn bad_policies_are_refused_with_the_reason() {
        for (max, delay, preferred) in [
            (0, MS, vec![]),
            (5000, MS, vec![]),
            (8, Duration::from_secs(2), vec![]),
            (8, MS, vec![16]),
            (8, MS, vec![0]),
        ] {
            let e = BatchPolicy::new(max, delay, preferred.clone()).unwrap_err();
            assert!(e.contains("must") || e.contains("at most"), "{e}");
        }
        assert_eq!(
            BatchPolicy::new(16, MS, vec![16, 8, 8]).unwrap().preferred,
            [8, 16]
        );
    }

    #[test]
    fn concatenated_and_split_every_request_gets_its_own_rows() {
        let requests = vec![
            vec![rows("x", 1, 0.0)],
            vec![rows("x", 3, 100.0)],
            vec![rows("x", 2, 200.0)],
        ];
        let counts = [1, 3, 2];
        let joined = concat(requests.clone()).unwrap();
        assert_eq!(joined[0].shape(), [6, 3]);
        // An identity "model": the outputs are the inputs.
        let back = split(joined, &counts).unwrap();
        assert_eq!(back, requests);
    }

    #[test]
    fn requests_that_cannot_share_a_batch_are_told_apart() {
        let a = rows("x", 2, 0.0);
        let wide = Tensor::new("x", vec![1, 4], TensorData::Fp32(vec![0.0; 4])).unwrap();
        let ints = Tensor::new("x", vec![1, 3], TensorData::Int64(vec![0; 3])).unwrap();
        let scalar = Tensor::new("x", vec![], TensorData::Fp32(vec![1.0])).unwrap();
        let key = |t: &Tensor| batch_key(std::slice::from_ref(t));
        assert_eq!(key(&a).unwrap().0, 2);
        assert_ne!(key(&a).unwrap().1, key(&wide).unwrap().1);
        assert_ne!(key(&a).unwrap().1, key(&ints).unwrap().1);
        assert_eq!(key(&scalar), None);
        assert_eq!(batch_key(&[rows("x", 2, 0.0), rows("y", 3, 0.0)]), None);
        assert!(concat(vec![vec![a.clone()], vec![wide]]).is_err());
        assert!(concat(vec![vec![a], vec![ints]]).is_err());
    }

    #[test]
    fn an_output_without_the_batch_rows_is_an_error() {
        let out = Tensor::new("y", vec![3], TensorData::Fp32(vec![0.0; 3])).unwrap();
        assert!(split(vec![out], &[1, 1]).unwrap_err().contains("rows"));
    }
}
