//! What a model takes and returns: names, datatypes and shapes, with dynamic
//! dimensions. Every request is checked against the signature before it
//! reaches an inference engine, so callers get an error that names the
//! offending input instead of an engine's internal message.

use std::fmt;

use crate::tensor::{DataType, Tensor};

/// One dimension of a declared shape.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Dim {
    /// A fixed size.
    Fixed(usize),
    /// A size chosen per request, optionally named (e.g. `batch`). Dimensions
    /// with the same name must agree across a request's inputs.
    Dynamic(Option<String>),
}

impl Dim {
    /// The Open Inference Protocol's rendering: the size, or -1 when dynamic.
    pub fn to_oip(&self) -> i64 {
        match self {
            Dim::Fixed(n) => i64::try_from(*n).unwrap_or(i64::MAX),
            Dim::Dynamic(_) => -1,
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Dynamic(Some(name)) => f.write_str(name),
            Dim::Dynamic(None) => f.write_str("?"),
        }
    }
}

/// The declared name, datatype and shape of one input or output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Name in the model.
    pub name: String,
    /// Element type.
    pub datatype: DataType,
    /// Shape, possibly with dynamic dimensions.
    pub shape: Vec<Dim>,
}

impl TensorSpec {
    /// The shape as the protocol renders it (`-1` for dynamic dimensions).
    pub fn oip_shape(&self) -> Vec<i64> {
        self.shape.iter().map(Dim::to_oip).collect()
    }

    /// A concrete shape for a warm-up request: dynamic dimensions become 1.
    pub fn example_shape(&self) -> Vec<usize> {
        self.shape
            .iter()
            .map(|d| match d {
                Dim::Fixed(n) => *n,
                Dim::Dynamic(_) => 1,
            })
            .collect()
    }

    fn shape_text(&self) -> String {
        let dims: Vec<String> = self.shape.iter().map(ToString::to_string).collect();
        format!("[{}]", dims.join(", "))
    }
}

/// How large each dynamic dimension of an input may be, unless a model's
/// bounds say otherwise: enough for batches, sequences and images, and
/// small enough that one request cannot ask for a million-pixel-wide
/// image.
pub const DEFAULT_MAX_DIM: usize = 4096;

/// The largest size each dynamic dimension of a model's inputs may take,
/// as the registry records them for a version (`--max-shape` at push);
/// dimensions not named get [`DEFAULT_MAX_DIM`]. Fixed dimensions are
/// fixed: a bound on them changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InputBounds {
    /// Per input, per axis: the bound, or `None` for the default.
    pub per_input: std::collections::BTreeMap<String, Vec<Option<usize>>>,
}

impl InputBounds {
    /// The bound of `input`'s dimension `axis`.
    pub fn max(&self, input: &str, axis: usize) -> usize {
        self.per_input
            .get(input)
            .and_then(|dims| dims.get(axis).copied().flatten())
            .unwrap_or(DEFAULT_MAX_DIM)
    }

    /// Checks that every input these bounds name exists in `signature`
    /// with as many dimensions as bounds are given.
    pub fn fit(&self, signature: &Signature) -> Result<(), String> {
        for (name, dims) in &self.per_input {
            let Some(spec) = signature.inputs.iter().find(|s| &s.name == name) else {
                return Err(format!(
                    "bounds name input {name:?}, which the model does not have; its inputs are {}",
                    signature.input_names()
                ));
            };
            if dims.len() != spec.shape.len() {
                return Err(format!(
                    "bounds give {} dimensions for input {name:?}, which has {} ({})",
                    dims.len(),
                    spec.shape.len(),
                    spec.shape_text()
                ));
            }
        }
        Ok(())
    }
}

/// A model's inputs and outputs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Signature {
    /// Inputs, in the order the model takes them.
    pub inputs: Vec<TensorSpec>,
    /// Outputs, in the order the model produces them.
    pub outputs: Vec<TensorSpec>,
}

/// Why a request's inputs do not fit a model's signature. Every message
/// names the input and says what was expected, so callers can fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    /// An input the model does not have.
    #[error("unknown input {name:?}; the model's inputs are {expected}")]
    Unknown {
        /// The given name.
        name: String,
        /// The model's input names.
        expected: String,
    },
    /// The same input was given twice.
    #[error("input {name:?} is given more than once")]
    Duplicate {
        /// The repeated name.
        name: String,
    },
    /// A model input is missing from the request.
    #[error("missing input {name:?} ({datatype} {shape})")]
    Missing {
        /// The missing input.
        name: String,
        /// Its datatype.
        datatype: DataType,
        /// Its declared shape.
        shape: String,
    },
    /// The datatype differs from the declared one.
    #[error("input {name:?} has datatype {actual} but the model expects {expected}")]
    WrongDatatype {
        /// The input.
        name: String,
        /// Declared datatype.
        expected: DataType,
        /// Given datatype.
        actual: DataType,
    },
    /// The shape does not fit the declared one.
    #[error("input {name:?} has shape {actual:?} but the model expects {expected}{detail}")]
    WrongShape {
        /// The input.
        name: String,
        /// Declared shape, dynamic dimensions by name.
        expected: String,
        /// Given shape.
        actual: Vec<usize>,
        /// What exactly is wrong, starting with "; " (or empty).
        detail: String,
    },
    /// A dynamic dimension is over the model's bound.
    #[error(
        "input {name:?} dimension {axis} is {size}, over this model's bound of {max}; send smaller \
         requests, or push the model with a larger bound (shoal model push --max-shape \
         {name}=D,D,…)"
    )]
    TooLarge {
        /// The input.
        name: String,
        /// The dimension.
        axis: usize,
        /// Its size in the request.
        size: usize,
        /// The bound.
        max: usize,
    },
    /// A floating-point input holds NaN or an infinity (a JSON number
    /// beyond the type's range, or such bits in a binary tensor).
    #[error(
        "input {name:?} element {index} is {value}: {datatype} inputs must be finite numbers \
         (JSON numbers beyond the type's range become infinite)"
    )]
    NotFinite {
        /// The input.
        name: String,
        /// Its datatype.
        datatype: DataType,
        /// Flat index of the first such element.
        index: usize,
        /// `NaN`, `inf` or `-inf`.
        value: String,
    },
}

/// The first NaN or infinite element of floating-point data, if any.
fn first_not_finite(data: &crate::TensorData) -> Option<(usize, String)> {
    use crate::TensorData;
    match data {
        TensorData::Fp16(v) => v
            .iter()
            .position(|x| !x.is_finite())
            .map(|i| (i, v[i].to_string())),
        TensorData::Fp32(v) => v
            .iter()
            .position(|x| !x.is_finite())
            .map(|i| (i, v[i].to_string())),
        TensorData::Fp64(v) => v
            .iter()
            .position(|x| !x.is_finite())
            .map(|i| (i, v[i].to_string())),
        _ => None,
    }
}

impl Signature {
    /// Checks `inputs` against the declared inputs, with the default
    /// bounds on dynamic dimensions, and returns them in the model's order.
    /// Floating-point values must be finite.
    pub fn check_inputs(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, InputError> {
        self.check_inputs_within(inputs, &InputBounds::default())
    }

    /// [`Signature::check_inputs`] with a model's own bounds.
    pub fn check_inputs_within(
        &self,
        inputs: Vec<Tensor>,
        bounds: &InputBounds,
    ) -> Result<Vec<Tensor>, InputError> {
        let mut slots: Vec<Option<Tensor>> = vec![None; self.inputs.len()];
        for tensor in inputs {
            let Some(index) = self.inputs.iter().position(|s| s.name == tensor.name) else {
                return Err(InputError::Unknown {
                    name: tensor.name,
                    expected: self.input_names(),
                });
            };
            if slots[index].is_some() {
                return Err(InputError::Duplicate { name: tensor.name });
            }
            slots[index] = Some(tensor);
        }
        // Each symbolic dimension's size, and the input that set it: a
        // model has a few at most, so a list (no hashing per request).
        let mut symbols: Vec<(&str, usize, &str)> = Vec::new();
        let mut ordered = Vec::with_capacity(slots.len());
        for (spec, slot) in self.inputs.iter().zip(slots) {
            let Some(tensor) = slot else {
                return Err(InputError::Missing {
                    name: spec.name.clone(),
                    datatype: spec.datatype,
                    shape: spec.shape_text(),
                });
            };
            if tensor.datatype() != spec.datatype {
                return Err(InputError::WrongDatatype {
                    name: spec.name.clone(),
                    expected: spec.datatype,
                    actual: tensor.datatype(),
                });
            }
            let wrong_shape = |detail: String| InputError::WrongShape {
                name: spec.name.clone(),
                expected: spec.shape_text(),
                actual: tensor.shape().to_vec(),
                detail,
            };
            if tensor.shape().len() != spec.shape.len() {
                return Err(wrong_shape(format!(
                    "; it must have {} dimensions, not {}",
                    spec.shape.len(),
                    tensor.shape().len()
                )));
            }
            for (axis, (dim, &size)) in spec.shape.iter().zip(tensor.shape()).enumerate() {
                if matches!(dim, Dim::Dynamic(_)) && size > bounds.max(&spec.name, axis) {
                    return Err(InputError::TooLarge {
                        name: spec.name.clone(),
                        axis,
                        size,
                        max: bounds.max(&spec.name, axis),
                    });
                }
                match dim {
                    Dim::Fixed(n) if *n != size => {
                        return Err(wrong_shape(format!(
                            "; dimension {axis} must be {n}, not {size}"
                        )));
                    }
                    Dim::Dynamic(Some(sym)) => {
                        if let Some(&(_, seen, other)) = symbols.iter().find(|(s, ..)| s == sym) {
                            if seen != size {
                                return Err(wrong_shape(format!(
                                    "; dimension {axis} ({sym}) is {size} but input {other:?} has {sym} = {seen}"
                                )));
                            }
                        } else {
                            symbols.push((sym, size, &spec.name));
                        }
                    }
                    _ => {}
                }
            }
            if let Some((index, value)) = first_not_finite(tensor.data()) {
                return Err(InputError::NotFinite {
                    name: spec.name.clone(),
                    datatype: spec.datatype,
                    index,
                    value,
                });
            }
            ordered.push(tensor);
        }
        Ok(ordered)
    }

    fn input_names(&self) -> String {
        let names: Vec<String> = self
            .inputs
            .iter()
            .map(|s| format!("{:?}", s.name))
            .collect();
        names.join(", ")
    }

    /// The spec of the output called `name`.
    pub fn output(&self, name: &str) -> Option<&TensorSpec> {
        self.outputs.iter().find(|s| s.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::TensorData;

    fn digits() -> Signature {
        Signature {
            inputs: vec![TensorSpec {
                name: "input".into(),
                datatype: DataType::Fp32,
                shape: vec![Dim::Dynamic(Some("batch".into())), Dim::Fixed(64)],
            }],
            outputs: vec![],
        }
    }

    fn two_inputs() -> Signature {
        Signature {
            inputs: vec![
                TensorSpec {
                    name: "a".into(),
                    datatype: DataType::Fp32,
                    shape: vec![Dim::Dynamic(Some("n".into())), Dim::Fixed(2)],
                },
                TensorSpec {
                    name: "b".into(),
                    datatype: DataType::Int64,
                    shape: vec![Dim::Dynamic(Some("n".into()))],
                },
            ],
            outputs: vec![],
        }
    }

    fn f32s(name: &str, shape: &[usize]) -> Tensor {
        let n = shape.iter().product();
        Tensor::new(name, shape.to_vec(), TensorData::Fp32(vec![0.0; n])).unwrap()
    }

    fn i64s(name: &str, shape: &[usize]) -> Tensor {
        let n = shape.iter().product();
        Tensor::new(name, shape.to_vec(), TensorData::Int64(vec![0; n])).unwrap()
    }

    fn check(sig: &Signature, inputs: Vec<Tensor>, expected: Result<Vec<&str>, &str>) {
        let got = sig
            .check_inputs(inputs)
            .map(|v| v.into_iter().map(|t| t.name).collect::<Vec<_>>())
            .map_err(|e| e.to_string());
        let expected = expected
            .map(|v| v.into_iter().map(str::to_owned).collect::<Vec<_>>())
            .map_err(str::to_owned);
        assert_eq!(got, expected);
    }

    #[test]
    fn accepts_any_batch() {
        check(&digits(), vec![f32s("input", &[1, 64])], Ok(vec!["input"]));
        check(&digits(), vec![f32s("input", &[32, 64])], Ok(vec!["input"]));
        check(&digits(), vec![f32s("input", &[0, 64])], Ok(vec!["input"]));
    }

    #[test]
    fn reorders_to_model_order() {
        check(
            &two_inputs(),
            vec![i64s("b", &[3]), f32s("a", &[3, 2])],
            Ok(vec!["a", "b"]),
        );
    }

    #[test]
    fn names_what_is_wrong() {
        check(
            &digits(),
            vec![f32s("pixels", &[1, 64])],
            Err("unknown input \"pixels\"; the model's inputs are \"input\""),
        );
        check(
            &digits(),
            vec![],
            Err("missing input \"input\" (FP32 [batch, 64])"),
        );
        check(
            &digits(),
            vec![f32s("input", &[1, 64]), f32s("input", &[1, 64])],
            Err("input \"input\" is given more than once"),
        );
        check(
            &digits(),
            vec![i64s("input", &[1, 64])],
            Err("input \"input\" has datatype INT64 but the model expects FP32"),
        );
        check(
            &digits(),
            vec![f32s("input", &[1, 63])],
            Err(
                "input \"input\" has shape [1, 63] but the model expects [batch, 64]; dimension 1 must be 64, not 63",
            ),
        );
        check(
            &digits(),
            vec![f32s("input", &[64])],
            Err(
                "input \"input\" has shape [64] but the model expects [batch, 64]; it must have 2 dimensions, not 1",
            ),
        );
        check(
            &two_inputs(),
            vec![f32s("a", &[3, 2]), i64s("b", &[4])],
            Err(
                "input \"b\" has shape [4] but the model expects [n]; dimension 0 (n) is 4 but input \"a\" has n = 3",
            ),
        );
    }

    #[test]
    fn dynamic_dimensions_are_bounded() {
        let big = |n| vec![f32s("input", &[n, 64])];
        check(&digits(), big(DEFAULT_MAX_DIM), Ok(vec!["input"]));
        check(
            &digits(),
            big(DEFAULT_MAX_DIM + 1),
            Err(&format!(
                "input \"input\" dimension 0 is {}, over this model's bound of {DEFAULT_MAX_DIM}; send smaller requests, or push the model with a larger bound (shoal model push --max-shape input=D,D,…)",
                DEFAULT_MAX_DIM + 1
            )),
        );
        let bounds = InputBounds {
            per_input: [("input".to_owned(), vec![Some(8), Some(1)])].into(),
        };
        let within = |n| digits().check_inputs_within(big(n), &bounds);
        assert!(within(8).is_ok());
        assert!(matches!(
            within(9),
            Err(InputError::TooLarge {
                axis: 0,
                size: 9,
                max: 8,
                ..
            })
        ));
        // A bound on a fixed dimension changes nothing.
        assert!(within(1).is_ok());
        assert_eq!(bounds.fit(&digits()), Ok(()));
        let wrong = InputBounds {
            per_input: [("pixels".to_owned(), vec![Some(1)])].into(),
        };
        assert!(wrong.fit(&digits()).unwrap_err().contains("does not have"));
        let rank = InputBounds {
            per_input: [("input".to_owned(), vec![Some(1)])].into(),
        };
        assert!(
            rank.fit(&digits())
                .unwrap_err()
                .contains("gives 1 dimensions")
                || rank
                    .fit(&digits())
                    .unwrap_err()
                    .contains("give 1 dimensions")
        );
    }

    #[test]
    fn non_finite_floats_are_refused_naming_the_input_and_element() {
        let with = |value: f32| {
            let mut data = vec![0.5; 64];
            data[7] = value;
            vec![Tensor::new("input", vec![1, 64], TensorData::Fp32(data)).unwrap()]
        };
        let refusal = |v: &str| {
            format!(
                "input \"input\" element 7 is {v}: FP32 inputs must be finite numbers (JSON numbers beyond the type's range become infinite)"
            )
        };
        check(&digits(), with(f32::NAN), Err(&refusal("NaN")));
        check(&digits(), with(f32::INFINITY), Err(&refusal("inf")));
        check(&digits(), with(f32::NEG_INFINITY), Err(&refusal("-inf")));
        check(&digits(), with(f32::MAX), Ok(vec!["input"]));
        // Integers have no such values; other inputs are not scanned.
        check(
            &two_inputs(),
            vec![f32s("a", &[1, 2]), i64s("b", &[1])],
            Ok(vec!["a", "b"]),
        );
    }

    #[test]
    fn oip_shapes_mark_dynamic_dims() {
        assert_eq!(digits().inputs[0].oip_shape(), vec![-1, 64]);
        assert_eq!(digits().inputs[0].example_shape(), vec![1, 64]);
    }
}
