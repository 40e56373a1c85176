//! Tensors as Shoal passes them between the protocol layer and the inference
//! runtime: a datatype, a shape and flat row-major data.
//!
//! The datatype names are those of the Open Inference Protocol v2 (`FP32`,
//! `INT64`, …) because that is the vocabulary users see in requests, metadata
//! and errors.

use std::fmt;

use half::f16;

/// The element type of a tensor, named as in the Open Inference Protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    /// `BOOL`
    Bool,
    /// `UINT8`
    Uint8,
    /// `UINT16`
    Uint16,
    /// `UINT32`
    Uint32,
    /// `UINT64`
    Uint64,
    /// `INT8`
    Int8,
    /// `INT16`
    Int16,
    /// `INT32`
    Int32,
    /// `INT64`
    Int64,
    /// `FP16`
    Fp16,
    /// `FP32`
    Fp32,
    /// `FP64`
    Fp64,
    /// `BYTES`: each element is a byte string.
    Bytes,
}

impl DataType {
    /// Every datatype, in protocol order.
    pub const ALL: [DataType; 13] = [
        DataType::Bool,
        DataType::Uint8,
        DataType::Uint16,
        DataType::Uint32,
        DataType::Uint64,
        DataType::Int8,
        DataType::Int16,
        DataType::Int32,
        DataType::Int64,
        DataType::Fp16,
        DataType::Fp32,
        DataType::Fp64,
        DataType::Bytes,
    ];

    /// The protocol name, e.g. `"FP32"`.
    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::Uint8 => "UINT8",
            DataType::Uint16 => "UINT16",
            DataType::Uint32 => "UINT32",
            DataType::Uint64 => "UINT64",
            DataType::Int8 => "INT8",
            DataType::Int16 => "INT16",
            DataType::Int32 => "INT32",
            DataType::Int64 => "INT64",
            DataType::Fp16 => "FP16",
            DataType::Fp32 => "FP32",
            DataType::Fp64 => "FP64",
            DataType::Bytes => "BYTES",
        }
    }

    /// Parses a protocol name; `None` when it is not one.
    pub fn parse(name: &str) -> Option<DataType> {
        DataType::ALL.into_iter().find(|d| d.as_str() == name)
    }

    /// Bytes per element in memory; `None` for `BYTES`, whose elements vary.
    pub fn size_of(self) -> Option<usize> {
        Some(match self {
            DataType::Bool | DataType::Uint8 | DataType::Int8 => 1,
            DataType::Uint16 | DataType::Int16 | DataType::Fp16 => 2,
            DataType::Uint32 | DataType::Int32 | DataType::Fp32 => 4,
            DataType::Uint64 | DataType::Int64 | DataType::Fp64 => 8,
            DataType::Bytes => return None,
        })
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Flat, row-major tensor elements of one datatype.
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)]
pub enum TensorData {
    Bool(Vec<bool>),
    Uint8(Vec<u8>),
    Uint16(Vec<u16>),
    Uint32(Vec<u32>),
    Uint64(Vec<u64>),
    Int8(Vec<i8>),
    Int16(Vec<i16>),
    Int32(Vec<i32>),
    Int64(Vec<i64>),
    Fp16(Vec<f16>),
    Fp32(Vec<f32>),
    Fp64(Vec<f64>),
    Bytes(Vec<Vec<u8>>),
}

/// Calls `$body` with `$v` bound to the inner vector, whatever its type.
#[macro_export]
macro_rules! with_tensor_data {
    ($data:expr, $v:ident => $body:expr) => {
        match $data {
            $crate::TensorData::Bool($v) => $body,
            $crate::TensorData::Uint8($v) => $body,
            $crate::TensorData::Uint16($v) => $body,
            $crate::TensorData::Uint32($v) => $body,
            $crate::TensorData::Uint64($v) => $body,
            $crate::TensorData::Int8($v) => $body,
            $crate::TensorData::Int16($v) => $body,
            $crate::TensorData::Int32($v) => $body,
            $crate::TensorData::Int64($v) => $body,
            $crate::TensorData::Fp16($v) => $body,
            $crate::TensorData::Fp32($v) => $body,
            $crate::TensorData::Fp64($v) => $body,
            $crate::TensorData::Bytes($v) => $body,
        }
    };
}

impl TensorData {
    /// The datatype of the elements.
    pub fn datatype(&self) -> DataType {
        match self {
            TensorData::Bool(_) => DataType::Bool,
            TensorData::Uint8(_) => DataType::Uint8,
            TensorData::Uint16(_) => DataType::Uint16,
            TensorData::Uint32(_) => DataType::Uint32,
            TensorData::Uint64(_) => DataType::Uint64,
            TensorData::Int8(_) => DataType::Int8,
            TensorData::Int16(_) => DataType::Int16,
            TensorData::Int32(_) => DataType::Int32,
            TensorData::Int64(_) => DataType::Int64,
            TensorData::Fp16(_) => DataType::Fp16,
            TensorData::Fp32(_) => DataType::Fp32,
            TensorData::Fp64(_) => DataType::Fp64,
            TensorData::Bytes(_) => DataType::Bytes,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        with_tensor_data!(self, v => v.len())
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends `other`'s elements; `Err` with `other`'s datatype when it
    /// differs from this one's (nothing appended).
    pub fn extend(&mut self, other: TensorData) -> Result<(), DataType> {
        macro_rules! same {
            ($($variant:ident),*) => {
                match (self, other) {
                    $((TensorData::$variant(a), TensorData::$variant(b)) => {
                        a.extend(b);
                        Ok(())
                    })*
                    (_, other) => Err(other.datatype()),
                }
            };
        }
        same!(
            Bool, Uint8, Uint16, Uint32, Uint64, Int8, Int16, Int32, Int64, Fp16, Fp32, Fp64, Bytes
        )
    }

    /// Consecutive pieces of `lens[i]` elements each; the last piece
    /// takes what is left beyond their sum (lens that sum past the end
    /// give empty pieces past it).
    pub fn split(self, lens: &[usize]) -> Vec<TensorData> {
        macro_rules! pieces {
            ($($variant:ident),*) => {
                match self {
                    $(TensorData::$variant(mut rest) => {
                        let mut out = Vec::with_capacity(lens.len());
                        for (i, &n) in lens.iter().enumerate() {
                            if i + 1 == lens.len() {
                                out.push(TensorData::$variant(std::mem::take(&mut rest)));
                            } else {
                                let tail = rest.split_off(n.min(rest.len()));
                                out.push(TensorData::$variant(std::mem::replace(&mut rest, tail)));
                            }
                        }
                        out
                    })*
                }
            };
        }
        pieces!(
            Bool, Uint8, Uint16, Uint32, Uint64, Int8, Int16, Int32, Int64, Fp16, Fp32, Fp64, Bytes
        )
    }

    /// `len` zero-valued elements of `datatype` (empty strings for `BYTES`).
    pub fn zeros(datatype: DataType, len: usize) -> TensorData {
        match datatype {
            DataType::Bool => TensorData::Bool(vec![false; len]),
            DataType::Uint8 => TensorData::Uint8(vec![0; len]),
            DataType::Uint16 => TensorData::Uint16(vec![0; len]),
            DataType::Uint32 => TensorData::Uint32(vec![0; len]),
            DataType::Uint64 => TensorData::Uint64(vec![0; len]),
            DataType::Int8 => TensorData::Int8(vec![0; len]),
            DataType::Int16 => TensorData::Int16(vec![0; len]),
            DataType::Int32 => TensorData::Int32(vec![0; len]),
            DataType::Int64 => TensorData::Int64(vec![0; len]),
            DataType::Fp16 => TensorData::Fp16(vec![f16::ZERO; len]),
            DataType::Fp32 => TensorData::Fp32(vec![0.0; len]),
            DataType::Fp64 => TensorData::Fp64(vec![0.0; len]),
            DataType::Bytes => TensorData::Bytes(vec![Vec::new(); len]),
        }
    }

    /// The elements as `f64`, for comparing outputs of numeric tensors
    /// (argmax, differences). `None` for `BYTES`.
    pub fn to_f64_vec(&self) -> Option<Vec<f64>> {
        Some(match self {
            TensorData::Bool(v) => v.iter().map(|&b| f64::from(u8::from(b))).collect(),
            TensorData::Uint8(v) => v.iter().map(|&x| f64::from(x)).collect(),
            TensorData::Uint16(v) => v.iter().map(|&x| f64::from(x)).collect(),
            TensorData::Uint32(v) => v.iter().map(|&x| f64::from(x)).collect(),
            #[allow(clippy::cast_precision_loss)]
            TensorData::Uint64(v) => v.iter().map(|&x| x as f64).collect(),
            TensorData::Int8(v) => v.iter().map(|&x| f64::from(x)).collect(),
            TensorData::Int16(v) => v.iter().map(|&x| f64::from(x)).collect(),
            TensorData::Int32(v) => v.iter().map(|&x| f64::from(x)).collect(),
            #[allow(clippy::cast_precision_loss)]
            TensorData::Int64(v) => v.iter().map(|&x| x as f64).collect(),
            TensorData::Fp16(v) => v.iter().map(|&x| f64::from(x)).collect(),
            TensorData::Fp32(v) => v.iter().map(|&x| f64::from(x)).collect(),
            TensorData::Fp64(v) => v.clone(),
            TensorData::Bytes(_) => return None,
        })
    }
}

/// Why a tensor could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TensorError {
    /// The shape's element count does not match the data.
    #[error("shape {shape:?} holds {expected} elements but {actual} were given")]
    ShapeMismatch {
        /// The declared shape.
        shape: Vec<usize>,
        /// Elements the shape implies.
        expected: usize,
        /// Elements actually present.
        actual: usize,
    },
    /// The shape's element count overflows.
    #[error("shape {shape:?} is too large")]
    ShapeOverflow {
        /// The declared shape.
        shape: Vec<usize>,
    },
}

/// Number of elements a shape holds, or `None` on overflow.
pub fn element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// A named tensor: shape plus flat row-major data whose length matches it.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// The input or output name in the model.
    pub name: String,
    shape: Vec<usize>,
    data: TensorData,
}

impl Tensor {
    /// Builds a tensor, checking that the data fills the shape exactly.
    pub fn new(
        name: impl Into<String>,
        shape: Vec<usize>,
        data: TensorData,
    ) -> Result<Tensor, TensorError> {
        let expected = element_count(&shape).ok_or_else(|| TensorError::ShapeOverflow {
            shape: shape.clone(),
        })?;
        if expected != data.len() {
            return Err(TensorError::ShapeMismatch {
                shape,
                expected,
                actual: data.len(),
            });
        }
        Ok(Tensor {
            name: name.into(),
            shape,
            data,
        })
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The elements.
    pub fn data(&self) -> &TensorData {
        &self.data
    }

    /// The datatype.
    pub fn datatype(&self) -> DataType {
        self.data.datatype()
    }

    /// Splits the tensor into its name, shape and data.
    pub fn into_parts(self) -> (String, Vec<usize>, TensorData) {
        (self.name, self.shape, self.data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datatype_names_round_trip() {
        for d in DataType::ALL {
            assert_eq!(DataType::parse(d.as_str()), Some(d));
        }
        assert_eq!(DataType::parse("FLOAT32"), None);
        assert_eq!(DataType::parse("fp32"), None);
    }

    #[test]
    fn tensor_checks_element_count() {
        assert!(Tensor::new("x", vec![2, 3], TensorData::Fp32(vec![0.0; 6])).is_ok());
        assert_eq!(
            Tensor::new("x", vec![2, 3], TensorData::Fp32(vec![0.0; 5]))
                .unwrap_err()
                .to_string(),
            "shape [2, 3] holds 6 elements but 5 were given"
        );
        assert!(matches!(
            Tensor::new("x", vec![usize::MAX, 2], TensorData::Fp32(vec![])),
            Err(TensorError::ShapeOverflow { .. })
        ));
        // A zero-sized dimension is a valid, empty tensor.
        assert!(Tensor::new("x", vec![0, 64], TensorData::Fp32(vec![])).is_ok());
    }

    #[test]
    fn zeros_have_the_asked_type_and_length() {
        for d in DataType::ALL {
            let z = TensorData::zeros(d, 3);
            assert_eq!(z.datatype(), d);
            assert_eq!(z.len(), 3);
        }
    }
}
