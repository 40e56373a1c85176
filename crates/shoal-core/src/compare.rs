//! Comparing two models' answers to the same request, for shadow
//! deployments: do they agree on the class, and how far apart are their
//! numbers?

use crate::tensor::{DataType, Tensor};

/// How two answers to one request compare.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Comparison {
    /// Rows (batch entries) compared for agreement.
    pub rows: u64,
    /// Of which the two agreed on the class.
    pub agreeing: u64,
    /// Largest absolute difference between float outputs of the same name.
    pub max_abs_diff: Option<f64>,
}

fn is_integer(dt: DataType) -> bool {
    matches!(
        dt,
        DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64
            | DataType::Uint8
            | DataType::Uint16
            | DataType::Uint32
            | DataType::Uint64
    )
}

fn is_float(dt: DataType) -> bool {
    matches!(dt, DataType::Fp16 | DataType::Fp32 | DataType::Fp64)
}

/// Per-row labels of a classifier output: an integer `[N]` or `[N, 1]`
/// tensor as it is, a float `[N, K]` (K ≥ 2) tensor by argmax.
fn labels(t: &Tensor) -> Option<Vec<i64>> {
    let values = t.data().to_f64_vec()?;
    let shape = t.shape();
    if is_integer(t.datatype()) && (shape.len() == 1 || (shape.len() == 2 && shape[1] == 1)) {
        #[allow(clippy::cast_possible_truncation)]
        return Some(values.iter().map(|v| *v as i64).collect());
    }
    if is_float(t.datatype()) && shape.len() == 2 && shape[1] >= 2 {
        let k = shape[1];
        return Some(
            values
                .chunks(k)
                .map(|row| {
                    row.iter()
                        .enumerate()
                        .max_by(|a, b| a.1.total_cmp(b.1))
                        .map_or(0, |(i, _)| i64::try_from(i).unwrap_or(i64::MAX))
                })
                .collect(),
        );
    }
    None
}

/// Compares `candidate`'s outputs with `primary`'s, matched by name.
/// Agreement comes from an integer label output when there is one, else
/// from the argmax of a 2-D float output; every float output pair counts
/// towards the largest absolute difference. Outputs of different shapes
/// are not compared.
pub fn compare(primary: &[Tensor], candidate: &[Tensor]) -> Comparison {
    let pairs: Vec<(&Tensor, &Tensor)> = primary
        .iter()
        .filter_map(|p| {
            candidate
                .iter()
                .find(|c| {
                    c.name == p.name && c.shape() == p.shape() && c.datatype() == p.datatype()
                })
                .map(|c| (p, c))
        })
        .collect();
    let mut out = Comparison::default();
    let label_pair = pairs
        .iter()
        .find(|(p, _)| is_integer(p.datatype()))
        .or_else(|| {
            pairs
                .iter()
                .find(|(p, _)| is_float(p.datatype()) && p.shape().len() == 2 && p.shape()[1] >= 2)
        });
    if let Some((p, c)) = label_pair
        && let (Some(a), Some(b)) = (labels(p), labels(c))
    {
        out.rows = a.len() as u64;
        out.agreeing = a.iter().zip(&b).filter(|(x, y)| x == y).count() as u64;
    }
    for (p, c) in pairs.iter().filter(|(p, _)| is_float(p.datatype())) {
        if let (Some(a), Some(b)) = (p.data().to_f64_vec(), c.data().to_f64_vec()) {
            let d = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f64::max);
            out.max_abs_diff = Some(out.max_abs_diff.map_or(d, |m: f64| m.max(d)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::TensorData;

    fn probs(rows: &[[f32; 3]]) -> Tensor {
        let data: Vec<f32> = rows.iter().flatten().copied().collect();
        Tensor::new("probabilities", vec![rows.len(), 3], TensorData::Fp32(data)).unwrap()
    }

    fn labels_t(v: &[i64]) -> Tensor {
        Tensor::new("label", vec![v.len()], TensorData::Int64(v.to_vec())).unwrap()
    }

    #[test]
    fn classifiers_compare_by_label_and_by_argmax() {
        let a = vec![
            probs(&[[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]]),
            labels_t(&[0, 1]),
        ];
        let b = vec![
            probs(&[[0.6, 0.3, 0.1], [0.5, 0.4, 0.1]]),
            labels_t(&[0, 0]),
        ];
        let c = compare(&a, &b);
        assert_eq!((c.rows, c.agreeing), (2, 1));
        assert!((c.max_abs_diff.unwrap() - 0.4).abs() < 1e-6);
        // Without a label output, argmax of the probabilities decides.
        let c = compare(&a[..1], &b[..1]);
        assert_eq!((c.rows, c.agreeing), (2, 1));
    }

    #[test]
    fn regressors_compare_by_difference_only() {
        let a = vec![Tensor::new("y", vec![2], TensorData::Fp32(vec![1.0, 2.0])).unwrap()];
        let b = vec![Tensor::new("y", vec![2], TensorData::Fp32(vec![1.5, 2.0])).unwrap()];
        let c = compare(&a, &b);
        assert_eq!(c.rows, 0);
        assert_eq!(c.max_abs_diff, Some(0.5));
        // Different shapes or names are not compared.
        let d = vec![Tensor::new("y", vec![1], TensorData::Fp32(vec![1.0])).unwrap()];
        assert_eq!(compare(&a, &d), Comparison::default());
    }
}
