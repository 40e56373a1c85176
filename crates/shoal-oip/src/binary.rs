//! Triton's binary tensor data extension: tensors as raw bytes after the
//! JSON part of a request or response, instead of JSON arrays.
//!
//! The body is the JSON document followed by the tensors' bytes, one after
//! another in the order the JSON lists them; the HTTP header
//! `Inference-Header-Content-Length` gives the JSON part's length. A tensor
//! sent this way carries `"parameters": {"binary_data_size": N}` and no
//! `data`. Elements are little-endian in row-major order; `BOOL` is one
//! byte (0 or 1); each `BYTES` element is a 4-byte little-endian length and
//! then that many bytes. Triton's own clients send inputs this way by
//! default.

use half::f16;
use shoal_core::{DataType, TensorData};

use crate::codec::DecodeError;

/// The HTTP header that gives the length of the JSON part.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// Splits a body into its JSON part and binary part, given the value of
/// [`HEADER_LENGTH`] (`None`: all JSON).
pub fn split_body<'a>(
    body: &'a [u8],
    json_len: Option<&str>,
) -> Result<(&'a [u8], &'a [u8]), DecodeError> {
    let Some(value) = json_len else {
        return Ok((body, &[]));
    };
    let len: usize = value.trim().parse().map_err(|_| {
        DecodeError(format!(
            "{HEADER_LENGTH} must be the length of the JSON part in bytes, got {value:?}"
        ))
    })?;
    if len > body.len() {
        return Err(DecodeError(format!(
            "{HEADER_LENGTH} is {len} but the body has only {} bytes",
            body.len()
        )));
    }
    Ok(body.split_at(len))
}

/// Decodes `bytes` as `count` elements of `datatype` (also the layout of
/// the gRPC protocol's `raw_input_contents`).
pub fn decode(bytes: &[u8], datatype: DataType, count: usize) -> Result<TensorData, DecodeError> {
    if let Some(size) = datatype.size_of() {
        let expected = count.saturating_mul(size);
        if bytes.len() != expected {
            return Err(DecodeError(format!(
                "binary data has {} bytes but {count} {} elements take {expected}",
                bytes.len(),
                datatype.as_str()
            )));
        }
    }
    fn le<const N: usize, T>(bytes: &[u8], f: fn([u8; N]) -> T) -> Vec<T> {
        bytes
            .chunks_exact(N)
            .map(|c| {
                let mut a = [0u8; N];
                a.copy_from_slice(c);
                f(a)
            })
            .collect()
    }
    Ok(match datatype {
        DataType::Bool => TensorData::Bool(
            bytes
                .iter()
                .enumerate()
                .map(|(i, &b)| match b {
                    0 => Ok(false),
                    1 => Ok(true),
                    other => Err(DecodeError(format!(
                        "binary BOOL element {i} is {other}; use 0 or 1"
                    ))),
                })
                .collect::<Result<_, _>>()?,
        ),
        DataType::Uint8 => TensorData::Uint8(bytes.to_vec()),
        DataType::Int8 => TensorData::Int8(le(bytes, i8::from_le_bytes)),
        DataType::Uint16 => TensorData::Uint16(le(bytes, u16::from_le_bytes)),
        DataType::Int16 => TensorData::Int16(le(bytes, i16::from_le_bytes)),
        DataType::Fp16 => TensorData::Fp16(le(bytes, f16::from_le_bytes)),
        DataType::Uint32 => TensorData::Uint32(le(bytes, u32::from_le_bytes)),
        DataType::Int32 => TensorData::Int32(le(bytes, i32::from_le_bytes)),
        DataType::Fp32 => TensorData::Fp32(le(bytes, f32::from_le_bytes)),
        DataType::Uint64 => TensorData::Uint64(le(bytes, u64::from_le_bytes)),
        DataType::Int64 => TensorData::Int64(le(bytes, i64::from_le_bytes)),
        DataType::Fp64 => TensorData::Fp64(le(bytes, f64::from_le_bytes)),
        DataType::Bytes => {
            let mut out = Vec::with_capacity(count.min(bytes.len() / 4));
            let mut rest = bytes;
            while !rest.is_empty() {
                let index = out.len();
                if index == count {
                    return Err(DecodeError(format!(
                        "binary BYTES data holds more than the shape's {count} elements"
                    )));
                }
                let (len, tail) = rest.split_first_chunk::<4>().ok_or_else(|| {
                    DecodeError(format!(
                        "binary BYTES element {index}: its 4-byte length is cut short"
                    ))
                })?;
                let len = u32::from_le_bytes(*len) as usize;
                if len > tail.len() {
                    return Err(DecodeError(format!(
                        "binary BYTES element {index} claims {len} bytes but {} remain",
                        tail.len()
                    )));
                }
                let (element, tail) = tail.split_at(len);
                out.push(element.to_vec());
                rest = tail;
            }
            if out.len() != count {
                return Err(DecodeError(format!(
                    "binary BYTES data has {} elements but the shape holds {count}",
                    out.len()
                )));
            }
            TensorData::Bytes(out)
        }
    })
}

/// True when `data` can be sent as binary: every `BYTES` element's length
/// fits the 4-byte prefix.
pub fn fits(data: &TensorData) -> bool {
    match data {
        TensorData::Bytes(v) => v.iter().all(|e| u32::try_from(e.len()).is_ok()),
        _ => true,
    }
}

/// Appends `data` to `out` in the binary encoding (see [`fits`]).
pub fn encode(data: &TensorData, out: &mut Vec<u8>) {
    match data {
        TensorData::Bool(v) => out.extend(v.iter().map(|&b| u8::from(b))),
        TensorData::Uint8(v) => out.extend_from_slice(v),
        TensorData::Int8(v) => out.extend(v.iter().flat_map(|x| x.to_le_bytes())),
        TensorData::Uint16(v) => out.extend(v.iter().flat_map(|x| x.to_le_bytes())),
        TensorData::Int16(v) => out.extend(v.iter().flat_map(|x| x.to_le_bytes())),
        TensorData::Fp16(v) => out.extend(v.iter().flat_map(|x| x.to_le_bytes())),
        TensorData::Uint32(v) => out.extend(v.iter().flat_map(|x| x.to_le_bytes())),
        TensorData::Int32(v) => out.extend(v.iter().flat_map(|x| x.to_le_bytes())),
        TensorData::Fp32(v) => out.extend(v.iter().flat_map(|x| x.to_le_bytes())),
        TensorData::Uint64(v) => out.extend(v.iter().flat_map(|x| x.to_le_bytes())),
        TensorData::Int64(v) => out.extend(v.iter().flat_map(|x| x.to_le_bytes())),
        TensorData::Fp64(v) => out.extend(v.iter().flat_map(|x| x.to_le_bytes())),
        TensorData::Bytes(v) => {
            for element in v {
                // `fits` has been checked: the length fits the prefix.
                let len = u32::try_from(element.len()).unwrap_or(u32::MAX);
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(element);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_datatype_round_trips() {
        let cases = vec![
            TensorData::Bool(vec![true, false, true]),
            TensorData::Uint8(vec![0, 7, 255]),
            TensorData::Int8(vec![-128, 0, 127]),
            TensorData::Uint16(vec![1, 65535, 3]),
            TensorData::Int16(vec![-2, 0, 2]),
            TensorData::Fp16(vec![f16::from_f32(0.5), f16::from_f32(-2.0), f16::ZERO]),
            TensorData::Uint32(vec![1, u32::MAX, 3]),
            TensorData::Int32(vec![-1, 0, i32::MAX]),
            TensorData::Fp32(vec![0.25, -1.5, 3.0]),
            TensorData::Uint64(vec![1, u64::MAX, 3]),
            TensorData::Int64(vec![i64::MIN, 0, 9]),
            TensorData::Fp64(vec![1e300, -0.5, 0.0]),
            TensorData::Bytes(vec![b"ab".to_vec(), Vec::new(), "é".as_bytes().to_vec()]),
        ];
        for data in cases {
            let mut bytes = Vec::new();
            encode(&data, &mut bytes);
            let back = decode(&bytes, data.datatype(), 3).unwrap();
            assert_eq!(back, data);
        }
        // FP32 is little-endian, as Triton's clients write it.
        let mut bytes = Vec::new();
        encode(&TensorData::Fp32(vec![1.0]), &mut bytes);
        assert_eq!(bytes, [0, 0, 0x80, 0x3f]);
    }

    #[test]
    fn malformed_binary_data_is_refused_with_the_reason() {
        for (bytes, datatype, count, message) in [
            (
                vec![0u8; 7],
                DataType::Fp32,
                2,
                "has 7 bytes but 2 FP32 elements take 8",
            ),
            (vec![2u8], DataType::Bool, 1, "use 0 or 1"),
            (
                vec![1, 0, 0],
                DataType::Bytes,
                1,
                "4-byte length is cut short",
            ),
            (
                vec![9, 0, 0, 0, b'a'],
                DataType::Bytes,
                1,
                "claims 9 bytes but 1 remain",
            ),
            (
                vec![0, 0, 0, 0, 0, 0, 0, 0],
                DataType::Bytes,
                1,
                "more than the shape's 1",
            ),
            (
                vec![0, 0, 0, 0],
                DataType::Bytes,
                2,
                "has 1 elements but the shape holds 2",
            ),
        ] {
            let e = decode(&bytes, datatype, count).unwrap_err().0;
            assert!(e.contains(message), "{e}");
        }
        assert_eq!(
            split_body(b"{}xy", Some("2")).unwrap(),
            (&b"{}"[..], &b"xy"[..])
        );
        assert!(
            split_body(b"{}", Some("3"))
                .unwrap_err()
                .0
                .contains("only 2 bytes")
        );
        assert!(
            split_body(b"{}", Some("two"))
                .unwrap_err()
                .0
                .contains("length of the JSON part")
        );
        assert_eq!(split_body(b"{}", None).unwrap(), (&b"{}"[..], &b""[..]));
    }
}

/// One tensor's place in a [`pack`]ed snapshot.
#[derive(serde::Serialize, serde::Deserialize)]
struct Packed {
    name: String,
    shape: Vec<usize>,
    datatype: String,
    bytes: usize,
}

/// An inference request body with every input as binary data and every
/// output asked for as binary data: the JSON part, then the inputs' bytes.
/// Returns the body and the JSON part's length (the value of
/// [`HEADER_LENGTH`]). What a gateway sends on for a request that arrived
/// as raw bytes (gRPC), so nothing is turned into JSON numbers.
pub fn encode_request(request: &crate::DecodedRequest) -> (Vec<u8>, usize) {
    let mut data = Vec::new();
    let inputs: Vec<serde_json::Value> = request
        .inputs
        .iter()
        .map(|t| {
            let before = data.len();
            encode(t.data(), &mut data);
            serde_json::json!({
                "name": t.name,
                "shape": t.shape(),
                "datatype": t.datatype().as_str(),
                "parameters": {"binary_data_size": data.len() - before},
            })
        })
        .collect();
    let mut parameters = request.parameters.clone().unwrap_or_default();
    parameters.insert("binary_data_output".into(), serde_json::Value::Bool(true));
    let mut json = serde_json::json!({
        "parameters": parameters,
        "inputs": inputs,
    });
    if let Some(id) = &request.id {
        json["id"] = serde_json::Value::String(id.clone());
    }
    if let Some(outputs) = &request.outputs {
        json["outputs"] = outputs
            .iter()
            .map(|o| serde_json::json!({"name": o.name, "parameters": {"binary_data": true}}))
            .collect();
    }
    let mut body = serde_json::to_vec(&json).unwrap_or_default();
    let json_len = body.len();
    body.extend_from_slice(&data);
    (body, json_len)
}

/// Packs `tensors` into one byte string: a little-endian `u32` length, a
/// JSON list of names, shapes, datatypes and sizes, then each tensor's
/// data in the binary encoding. For keeping tensors outside the process
/// (a sequence's state in Redis); [`unpack`] reads it back.
pub fn pack(tensors: &[shoal_core::Tensor]) -> Vec<u8> {
    let mut data = Vec::new();
    let mut index = Vec::with_capacity(tensors.len());
    for t in tensors {
        let before = data.len();
        encode(t.data(), &mut data);
        index.push(Packed {
            name: t.name.clone(),
            shape: t.shape().to_vec(),
            datatype: t.datatype().as_str().to_owned(),
            bytes: data.len() - before,
        });
    }
    let header = serde_json::to_vec(&index).unwrap_or_default();
    let mut out = Vec::with_capacity(4 + header.len() + data.len());
    out.extend_from_slice(
        &u32::try_from(header.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    out.extend_from_slice(&header);
    out.extend_from_slice(&data);
    out
}

/// Reads back what [`pack`] wrote; an error says what is wrong with it.
pub fn unpack(bytes: &[u8]) -> Result<Vec<shoal_core::Tensor>, DecodeError> {
    let bad = |why: &str| DecodeError(format!("packed tensors: {why}"));
    let (len, rest) = bytes
        .split_first_chunk::<4>()
        .ok_or_else(|| bad("shorter than its header length"))?;
    let len = u32::from_le_bytes(*len) as usize;
    if rest.len() < len {
        return Err(bad("shorter than its header"));
    }
    let (header, mut data) = rest.split_at(len);
    let index: Vec<Packed> =
        serde_json::from_slice(header).map_err(|e| bad(&format!("header: {e}")))?;
    let mut tensors = Vec::with_capacity(index.len());
    for p in index {
        let datatype = DataType::parse(&p.datatype)
            .ok_or_else(|| bad(&format!("unknown datatype {:?}", p.datatype)))?;
        if data.len() < p.bytes {
            return Err(bad(&format!("data of {:?} cut short", p.name)));
        }
        let (mine, after) = data.split_at(p.bytes);
        data = after;
        let count = p.shape.iter().product();
        let values = decode(mine, datatype, count)?;
        tensors.push(
            shoal_core::Tensor::new(p.name, p.shape, values).map_err(|e| bad(&e.to_string()))?,
        );
    }
    if !data.is_empty() {
        return Err(bad("bytes left over"));
    }
    Ok(tensors)
}

#[cfg(test)]
mod pack_tests {
    use shoal_core::{Tensor, TensorData};

    use super::*;

    #[test]
    fn packed_tensors_come_back_as_they_were() {
        let tensors = vec![
            Tensor::new("h", vec![1, 1, 3], TensorData::Fp32(vec![0.5, -1.0, 2.25])).unwrap(),
            Tensor::new("n", vec![2], TensorData::Int64(vec![7, -9])).unwrap(),
            Tensor::new("s", vec![1], TensorData::Bytes(vec![b"abc".to_vec()])).unwrap(),
        ];
        let packed = pack(&tensors);
        assert_eq!(unpack(&packed).unwrap(), tensors);
        assert_eq!(unpack(&pack(&[])).unwrap(), Vec::<Tensor>::new());
        for cut in [0, 3, 10, packed.len() - 1] {
            assert!(unpack(&packed[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = packed.clone();
        longer.push(0);
        assert!(unpack(&longer).unwrap_err().0.contains("left over"));
    }
}

#[cfg(test)]
mod request_tests {
    use shoal_core::{Tensor, TensorData};

    use super::*;
    use crate::{DecodedRequest, Limits, RequestOutput};

    #[test]
    fn an_encoded_binary_request_decodes_to_itself_and_asks_for_binary_outputs() {
        let request = DecodedRequest {
            id: Some("r-1".into()),
            parameters: Some(
                [("sequence_id".to_owned(), serde_json::json!(9))]
                    .into_iter()
                    .collect(),
            ),
            inputs: vec![
                Tensor::new("x", vec![2, 2], TensorData::Fp32(vec![1.0, -2.0, 0.5, 3.0])).unwrap(),
                Tensor::new(
                    "s",
                    vec![2],
                    TensorData::Bytes(vec![b"ab".to_vec(), vec![]]),
                )
                .unwrap(),
            ],
            outputs: Some(vec![RequestOutput {
                name: "label".into(),
                parameters: None,
            }]),
        };
        let (body, json_len) = encode_request(&request);
        let decoded =
            crate::decode_request_parts(&body, Some(&json_len.to_string()), &Limits::default())
                .unwrap();
        assert_eq!(decoded.inputs, request.inputs);
        assert_eq!(decoded.id.as_deref(), Some("r-1"));
        assert_eq!(decoded.parameters.as_ref().unwrap()["sequence_id"], 9);
        assert!(decoded.binary_output("label") && decoded.binary_output("other"));
        assert_eq!(decoded.outputs.unwrap()[0].name, "label");
    }
}
