//! Between the protocol's messages and Shoal's tensors. A
//! `ModelInferRequest` becomes the same [`DecodedRequest`] a REST body
//! does, checked the same way (datatypes, concrete shapes, the element
//! budget of [`Limits`], data that fills the shape), with errors that name
//! the input and say what is wrong. Inputs come either all in
//! `raw_input_contents` (little-endian bytes, what `tritonclient.grpc`
//! sends) or each in its typed `contents`; outputs go back in
//! `raw_output_contents`, as Triton answers.

use std::collections::HashMap;

use shoal_core::{DataType, Tensor, TensorData};
use shoal_oip::{DecodeError, DecodedRequest, Limits, RequestOutput};

use crate::pb::infer_parameter::ParameterChoice;
use crate::pb::model_infer_request::InferInputTensor;
use crate::pb::model_infer_response::InferOutputTensor;
use crate::pb::model_metadata_response::TensorMetadata;
use crate::pb::{
    InferParameter, InferTensorContents, ModelInferRequest, ModelInferResponse,
    ModelMetadataResponse, ServerMetadataResponse,
};

/// Checks `request` and turns it into tensors; `request.model_name` and
/// `model_version` are the caller's to route by.
pub fn decode_request(
    request: ModelInferRequest,
    limits: &Limits,
) -> Result<DecodedRequest, DecodeError> {
    let ModelInferRequest {
        id,
        parameters,
        inputs,
        outputs,
        raw_input_contents: raw,
        ..
    } = request;
    if inputs.is_empty() {
        return Err(DecodeError(
            "invalid inference request: inputs is empty; give at least one input tensor".into(),
        ));
    }
    if !raw.is_empty() {
        if raw.len() != inputs.len() {
            return Err(DecodeError(format!(
                "raw_input_contents has {} entries for {} inputs: give one per input, in order",
                raw.len(),
                inputs.len()
            )));
        }
        if let Some(input) = inputs.iter().find(|i| i.contents.is_some()) {
            return Err(DecodeError(format!(
                "input {:?} has contents as well as raw_input_contents: use one or the other",
                input.name
            )));
        }
    }
    let mut budget = limits.max_elements;
    let mut raw = raw.into_iter();
    let inputs = inputs
        .into_iter()
        .map(|input| {
            let bytes = raw.next();
            tensor(input, bytes.as_deref(), &mut budget, limits.max_elements)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let outputs = (!outputs.is_empty()).then(|| {
        outputs
            .into_iter()
            .map(|o| RequestOutput {
                name: o.name,
                parameters: None,
            })
            .collect()
    });
    Ok(DecodedRequest {
        id: (!id.is_empty()).then_some(id),
        parameters: json_parameters(parameters),
        inputs,
        outputs,
    })
}

/// The request's parameters as the JSON object a REST request carries
/// (`None` when there are none), so sequence parameters read the same.
fn json_parameters(
    parameters: HashMap<String, InferParameter>,
) -> Option<serde_json::Map<String, serde_json::Value>> {
    if parameters.is_empty() {
        return None;
    }
    Some(
        parameters
            .into_iter()
            .filter_map(|(k, v)| {
                let value = match v.parameter_choice? {
                    ParameterChoice::BoolParam(b) => serde_json::Value::Bool(b),
                    ParameterChoice::Int64Param(n) => n.into(),
                    ParameterChoice::Uint64Param(n) => n.into(),
                    ParameterChoice::DoubleParam(x) => serde_json::Number::from_f64(x)?.into(),
                    ParameterChoice::StringParam(s) => serde_json::Value::String(s),
                };
                Some((k, value))
            })
            .collect(),
    )
}

/// One input, its data from `raw` or from its typed contents.
fn tensor(
    input: InferInputTensor,
    raw: Option<&[u8]>,
    budget: &mut usize,
    max_elements: usize,
) -> Result<Tensor, DecodeError> {
    let name = input.name;
    let err = |msg: String| DecodeError(format!("input {name:?}: {msg}"));
    let (datatype, shape, count) =
        shoal_oip::codec::tensor_header(&input.datatype, &input.shape, budget, max_elements)
            .map_err(err)?;
    let data = match raw {
        Some(bytes) => shoal_oip::binary::decode(bytes, datatype, count)
            .map_err(|e| err(format!("raw_input_contents: {}", e.0)))?,
        None => typed(input.contents.unwrap_or_default(), datatype, count).map_err(err)?,
    };
    Tensor::new(name.clone(), shape, data).map_err(|e| err(e.to_string()))
}

/// The typed contents field that holds `datatype`, converted, holding
/// exactly `count` elements.
fn typed(c: InferTensorContents, datatype: DataType, count: usize) -> Result<TensorData, String> {
    fn narrow<T, U: TryFrom<T> + Copy>(
        v: Vec<T>,
        field: &str,
        dt: DataType,
    ) -> Result<Vec<U>, String>
    where
        T: Copy + std::fmt::Display,
    {
        v.into_iter()
            .enumerate()
            .map(|(i, x)| {
                U::try_from(x).map_err(|_| {
                    format!(
                        "{field} element {i} is {x}, out of range for {}",
                        dt.as_str()
                    )
                })
            })
            .collect()
    }
    let (field, data) = match datatype {
        DataType::Bool => ("bool_contents", TensorData::Bool(c.bool_contents)),
        DataType::Int8 => (
            "int_contents",
            TensorData::Int8(narrow(c.int_contents, "int_contents", datatype)?),
        ),
        DataType::Int16 => (
            "int_contents",
            TensorData::Int16(narrow(c.int_contents, "int_contents", datatype)?),
        ),
        DataType::Int32 => ("int_contents", TensorData::Int32(c.int_contents)),
        DataType::Int64 => ("int64_contents", TensorData::Int64(c.int64_contents)),
        DataType::Uint8 => (
            "uint_contents",
            TensorData::Uint8(narrow(c.uint_contents, "uint_contents", datatype)?),
        ),
        DataType::Uint16 => (
            "uint_contents",
            TensorData::Uint16(narrow(c.uint_contents, "uint_contents", datatype)?),
        ),
        DataType::Uint32 => ("uint_contents", TensorData::Uint32(c.uint_contents)),
        DataType::Uint64 => ("uint64_contents", TensorData::Uint64(c.uint64_contents)),
        DataType::Fp32 => ("fp32_contents", TensorData::Fp32(c.fp32_contents)),
        DataType::Fp64 => ("fp64_contents", TensorData::Fp64(c.fp64_contents)),
        DataType::Bytes => ("bytes_contents", TensorData::Bytes(c.bytes_contents)),
        DataType::Fp16 => {
            return Err("FP16 has no typed contents field: send it in raw_input_contents".into());
        }
    };
    if data.len() != count {
        return Err(format!(
            "{field} holds {} elements but the shape holds {count} (a {} tensor's data goes in {field})",
            data.len(),
            datatype.as_str()
        ));
    }
    Ok(data)
}

/// The answer to an inference: every output in `raw_output_contents`.
pub fn encode_response(
    model: &str,
    version: &str,
    id: Option<&str>,
    outputs: &[Tensor],
) -> ModelInferResponse {
    let mut tensors = Vec::with_capacity(outputs.len());
    let mut raw = Vec::with_capacity(outputs.len());
    for t in outputs {
        let mut bytes = Vec::new();
        shoal_oip::binary::encode(t.data(), &mut bytes);
        raw.push(bytes);
        tensors.push(InferOutputTensor {
            name: t.name.clone(),
            datatype: t.datatype().as_str().to_owned(),
            shape: t.shape().iter().map(|&d| dim(d)).collect(),
            parameters: HashMap::new(),
            contents: None,
        });
    }
    ModelInferResponse {
        model_name: model.to_owned(),
        model_version: version.to_owned(),
        id: id.unwrap_or_default().to_owned(),
        parameters: HashMap::new(),
        outputs: tensors,
        raw_output_contents: raw,
    }
}

fn dim(d: usize) -> i64 {
    i64::try_from(d).unwrap_or(i64::MAX)
}

/// The tensors of a response, from `raw_output_contents` or typed
/// contents (what a client or a gateway reads back).
pub fn decode_response(response: ModelInferResponse) -> Result<Vec<Tensor>, DecodeError> {
    let raw = response.raw_output_contents;
    if !raw.is_empty() && raw.len() != response.outputs.len() {
        return Err(DecodeError(format!(
            "raw_output_contents has {} entries for {} outputs",
            raw.len(),
            response.outputs.len()
        )));
    }
    let mut raw = raw.into_iter();
    let mut budget = usize::MAX;
    response
        .outputs
        .into_iter()
        .map(|o| {
            let input = InferInputTensor {
                name: o.name,
                datatype: o.datatype,
                shape: o.shape,
                parameters: HashMap::new(),
                contents: o.contents,
            };
            let bytes = raw.next();
            tensor(input, bytes.as_deref(), &mut budget, usize::MAX)
                .map_err(|e| DecodeError(e.0.replacen("input", "output", 1)))
        })
        .collect()
}

/// Model metadata, as REST's `GET /v2/models/{name}` gives it.
pub fn model_metadata(m: &shoal_oip::ModelMetadata) -> ModelMetadataResponse {
    let tensors = |ts: &[shoal_oip::MetadataTensor]| {
        ts.iter()
            .map(|t| TensorMetadata {
                name: t.name.clone(),
                datatype: t.datatype.clone(),
                shape: t.shape.clone(),
            })
            .collect()
    };
    ModelMetadataResponse {
        name: m.name.clone(),
        versions: m.versions.clone(),
        platform: m.platform.clone(),
        inputs: tensors(&m.inputs),
        outputs: tensors(&m.outputs),
    }
}

/// Server metadata, as REST's `GET /v2` gives it.
pub fn server_metadata(m: &shoal_oip::ServerMetadata) -> ServerMetadataResponse {
    ServerMetadataResponse {
        name: m.name.clone(),
        version: m.version.clone(),
        extensions: m.extensions.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(name: &str, datatype: &str, shape: &[i64]) -> InferInputTensor {
        InferInputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape: shape.to_vec(),
            parameters: HashMap::new(),
            contents: None,
        }
    }

    fn request(inputs: Vec<InferInputTensor>, raw: Vec<Vec<u8>>) -> ModelInferRequest {
        ModelInferRequest {
            model_name: "m".into(),
            inputs,
            raw_input_contents: raw,
            ..ModelInferRequest::default()
        }
    }

    fn limits() -> Limits {
        Limits { max_elements: 100 }
    }

    #[test]
    fn raw_and_typed_contents_decode_to_the_same_tensors() {
        let values = [1.5f32, -2.0, 0.25, 8.0];
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let by_raw = decode_request(
            request(vec![input("x", "FP32", &[2, 2])], vec![raw]),
            &limits(),
        )
        .unwrap();
        let mut typed = input("x", "FP32", &[2, 2]);
        typed.contents = Some(InferTensorContents {
            fp32_contents: values.to_vec(),
            ..InferTensorContents::default()
        });
        let by_contents = decode_request(request(vec![typed], vec![]), &limits()).unwrap();
        assert_eq!(by_raw.inputs, by_contents.inputs);
        assert_eq!(by_raw.inputs[0].shape(), &[2, 2]);
        assert_eq!(by_raw.inputs[0].data(), &TensorData::Fp32(values.to_vec()));
        assert!(by_raw.id.is_none() && by_raw.outputs.is_none() && by_raw.parameters.is_none());
    }

    #[test]
    fn every_typed_field_carries_its_datatypes() {
        let cases: Vec<(&str, InferTensorContents, TensorData)> = vec![
            (
                "BOOL",
                InferTensorContents {
                    bool_contents: vec![true, false],
                    ..Default::default()
                },
                TensorData::Bool(vec![true, false]),
            ),
            (
                "INT8",
                InferTensorContents {
                    int_contents: vec![-3, 7],
                    ..Default::default()
                },
                TensorData::Int8(vec![-3, 7]),
            ),
            (
                "INT64",
                InferTensorContents {
                    int64_contents: vec![1 << 40, -1],
                    ..Default::default()
                },
                TensorData::Int64(vec![1 << 40, -1]),
            ),
            (
                "UINT16",
                InferTensorContents {
                    uint_contents: vec![65535, 0],
                    ..Default::default()
                },
                TensorData::Uint16(vec![65535, 0]),
            ),
            (
                "UINT64",
                InferTensorContents {
                    uint64_contents: vec![u64::MAX, 1],
                    ..Default::default()
                },
                TensorData::Uint64(vec![u64::MAX, 1]),
            ),
            (
                "FP64",
                InferTensorContents {
                    fp64_contents: vec![0.5, 1e300],
                    ..Default::default()
                },
                TensorData::Fp64(vec![0.5, 1e300]),
            ),
            (
                "BYTES",
                InferTensorContents {
                    bytes_contents: vec![b"ab".to_vec(), vec![]],
                    ..Default::default()
                },
                TensorData::Bytes(vec![b"ab".to_vec(), vec![]]),
            ),
        ];
        for (datatype, contents, expected) in cases {
            let mut t = input("x", datatype, &[2]);
            t.contents = Some(contents);
            let decoded = decode_request(request(vec![t], vec![]), &limits())
                .unwrap_or_else(|e| panic!("{datatype}: {}", e.0));
            assert_eq!(decoded.inputs[0].data(), &expected, "{datatype}");
            // The same tensor raw decodes the same, and encodes back.
            let response = encode_response("m", "1", None, &decoded.inputs);
            let back = decode_response(response).unwrap();
            assert_eq!(back, decoded.inputs, "{datatype}");
        }
    }

    #[test]
    fn parameters_outputs_and_id_read_as_in_rest() {
        let mut r = request(
            vec![input("x", "INT64", &[1])],
            vec![7i64.to_le_bytes().to_vec()],
        );
        r.id = "req-1".into();
        let p = |c| InferParameter {
            parameter_choice: Some(c),
        };
        r.parameters
            .insert("sequence_id".into(), p(ParameterChoice::Uint64Param(42)));
        r.parameters
            .insert("sequence_start".into(), p(ParameterChoice::BoolParam(true)));
        r.parameters
            .insert("tag".into(), p(ParameterChoice::StringParam("a".into())));
        r.outputs
            .push(crate::pb::model_infer_request::InferRequestedOutputTensor {
                name: "label".into(),
                parameters: HashMap::new(),
            });
        let d = decode_request(r, &limits()).unwrap();
        assert_eq!(d.id.as_deref(), Some("req-1"));
        let step = shoal_oip::sequence::Step::from_parameters(d.parameters.as_ref())
            .unwrap()
            .unwrap();
        assert!(step.start && !step.end);
        assert_eq!(d.parameters.unwrap()["tag"], "a");
        assert_eq!(d.outputs.unwrap()[0].name, "label");
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let raw4 = vec![0u8; 16];
        let cases: Vec<(ModelInferRequest, &str)> = vec![
            (request(vec![], vec![]), "inputs is empty"),
            (
                request(vec![input("x", "FP23", &[4])], vec![raw4.clone()]),
                "unknown datatype \"FP23\"",
            ),
            (
                request(vec![input("x", "FP32", &[-1, 4])], vec![raw4.clone()]),
                "negative dimension",
            ),
            (
                request(vec![input("x", "FP32", &[11, 10])], vec![vec![0; 440]]),
                "more elements than the server accepts",
            ),
            (
                request(vec![input("x", "FP32", &[5])], vec![raw4.clone()]),
                "16 bytes but 5 FP32 elements take 20",
            ),
            (
                request(
                    vec![input("x", "FP32", &[4]), input("y", "FP32", &[4])],
                    vec![raw4.clone()],
                ),
                "raw_input_contents has 1 entries for 2 inputs",
            ),
            (
                request(vec![input("x", "FP32", &[4])], vec![]),
                "fp32_contents holds 0 elements but the shape holds 4",
            ),
            (
                request(vec![input("x", "FP16", &[4])], vec![]),
                "send it in raw_input_contents",
            ),
        ];
        for (r, says) in cases {
            let e = decode_request(r, &limits()).unwrap_err();
            assert!(e.0.contains(says), "{:?} should say {says:?}", e.0);
        }
        let mut t = input("x", "INT8", &[1]);
        t.contents = Some(InferTensorContents {
            int_contents: vec![300],
            ..Default::default()
        });
        let e = decode_request(request(vec![t], vec![]), &limits()).unwrap_err();
        assert!(
            e.0.contains("int_contents element 0 is 300, out of range for INT8"),
            "{}",
            e.0
        );
        let mut both = input("x", "FP32", &[4]);
        both.contents = Some(InferTensorContents::default());
        let e = decode_request(request(vec![both], vec![raw4]), &limits()).unwrap_err();
        assert!(e.0.contains("use one or the other"), "{}", e.0);
    }
}
