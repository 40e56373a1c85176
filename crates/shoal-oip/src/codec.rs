//! The JSON tensor codec: inference request bodies in, response bodies out.
//!
//! Tensor data is parsed straight into typed, flat vectors. A request body
//! in its plain form is read in one pass (`crate::lite`: names, shapes and
//! parameters, each tensor's data kept as text); anything else is split by
//! [`crate::skim`] into its tensor data arrays and the rest, which serde
//! reads. Each array is read by `crate::numbers` when it holds plain
//! numbers (about half the instructions a number of serde's visitor;
//! `shoal bench codec`: a decode 1.5–2.5× faster). Anything else (strings,
//! booleans, a bad element, a short array, a body the scan cannot follow)
//! is read by serde, whose errors say what is wrong: the answer is the same
//! either way ([`decode_request_by_serde`] is the reference, and the fuzz
//! target holds the two to it). Nothing is allocated beyond what the
//! declared shape holds, so a request cannot make the server reserve more
//! memory than [`Limits::max_elements`] allows. Responses are written by
//! `crate::out`, byte for byte as serde_json wrote them.

use std::fmt;

use half::f16;
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, SeqAccess, Visitor};
use serde_json::value::RawValue;
use shoal_core::tensor::element_count;
use shoal_core::{DataType, Tensor, TensorData};

use crate::out;
use crate::types::RequestOutput;

/// Bounds on what one request may ask of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most tensor elements accepted across all inputs of one request.
    pub max_elements: usize,
}

impl Default for Limits {
    fn default() -> Self {
        // Enough for a batch of 128 images of 3x224x224 floats.
        Limits {
            max_elements: 1 << 25,
        }
    }
}

/// Why a request body was refused. The message is meant for the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

/// A parsed, checked inference request.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedRequest {
    /// The caller's request id, echoed in the response.
    pub id: Option<String>,
    /// Request parameters, passed through untouched.
    pub parameters: Option<serde_json::Map<String, serde_json::Value>>,
    /// Input tensors, in request order.
    pub inputs: Vec<Tensor>,
    /// Outputs asked for; `None` means all of them.
    pub outputs: Option<Vec<RequestOutput>>,
}

/// A request body as serde reads it, tensor data left as text.
// Errors name what was expected, not these types.
#[derive(Deserialize)]
#[serde(expecting = "an inference request: a JSON object with \"inputs\"")]
struct WireRequest<T> {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Option<serde_json::Map<String, serde_json::Value>>,
    inputs: Vec<T>,
    #[serde(default)]
    outputs: Option<Vec<RequestOutput>>,
}

impl DecodedRequest {
    /// True when output `name` is to be returned as binary data: asked for
    /// with `"binary_data": true`, or by the request-wide
    /// `"binary_data_output": true` unless the output says otherwise.
    pub fn binary_output(&self, name: &str) -> bool {
        let flag = |params: Option<&serde_json::Map<String, serde_json::Value>>, key: &str| {
            params
                .and_then(|p| p.get(key))
                .and_then(serde_json::Value::as_bool)
        };
        let own = self
            .outputs
            .iter()
            .flatten()
            .find(|o| o.name == name)
            .and_then(|o| flag(o.parameters.as_ref(), "binary_data"));
        own.or_else(|| flag(self.parameters.as_ref(), "binary_data_output"))
            .unwrap_or(false)
    }
}

#[derive(Deserialize)]
#[serde(
    expecting = "an input tensor: an object with \"name\", \"shape\", \"datatype\" and \"data\""
)]
struct WireTensor<'a> {
    name: String,
    shape: Vec<i64>,
    #[serde(borrow)]
    datatype: std::borrow::Cow<'a, str>,
    #[serde(default)]
    parameters: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(borrow, default, deserialize_with = "raw_data")]
    data: Option<JsonData<'a>>,
}

/// A tensor's JSON `data`, as text: a JSON value, not yet checked to be
/// an array.
type JsonData<'a> = &'a [u8];

fn raw_data<'de, D: de::Deserializer<'de>>(d: D) -> Result<Option<JsonData<'de>>, D::Error> {
    Ok(Some(<&RawValue>::deserialize(d)?.get().as_bytes()))
}

/// A skeleton as text, its UTF-8 checked once: serde then reads it as a
/// `str` and skips the check it would make on every string (a tenth of a
/// one-row request's skeleton parse).
fn skeleton_text(skeleton: &[u8]) -> Option<&str> {
    std::str::from_utf8(skeleton).ok()
}

/// `skeleton` (a body without its data arrays, [`crate::skim::split`])
/// parsed, each tensor's data given back from `body`'s `arrays`; `None`
/// when serde refuses the skeleton or the arrays do not line up with its
/// tensors.
fn refill<'a>(
    skeleton: &'a [u8],
    arrays: &[std::ops::Range<usize>],
    body: &'a [u8],
) -> Option<WireRequest<WireTensor<'a>>> {
    let mut wire =
        serde_json::from_str::<WireRequest<WireTensor<'a>>>(skeleton_text(skeleton)?).ok()?;
    // Every cut array reads `[]` in the skeleton, in order. A data array the
    // scan did not cut (a key written with escapes) keeps its contents.
    let mut arrays = arrays.iter();
    for data in wire.inputs.iter_mut().filter_map(|t| t.data.as_mut()) {
        if *data == b"[]" {
            *data = &body[arrays.next()?.clone()];
        }
    }
    arrays.next().is_none().then_some(wire)
}

/// Parses and checks an inference request body of JSON tensors.
pub fn decode_request(body: &[u8], limits: &Limits) -> Result<DecodedRequest, DecodeError> {
    decode_request_parts(body, None, limits)
}

/// Parses and checks an inference request body; `json_len` is the value of
/// the `Inference-Header-Content-Length` header when the request uses the
/// binary tensor data extension ([`crate::binary`]).
pub fn decode_request_parts(
    body: &[u8],
    json_len: Option<&str>,
    limits: &Limits,
) -> Result<DecodedRequest, DecodeError> {
    // A refusal is worded by the serde reading: the fast one meets a syntax
    // error in a data array as that tensor's, where serde reading the whole
    // body says where in the body it is. Only refusals pay twice.
    decode_with(body, json_len, limits, Reading::Fast)
        .or_else(|_| decode_with(body, json_len, limits, Reading::Serde))
}

/// [`decode_request`] by serde alone, without the scan and the number fast
/// path: the reference the fast reading must agree with (the fuzz target
/// checks it) and what decoding cost before it (`shoal bench codec`).
pub fn decode_request_by_serde(
    body: &[u8],
    limits: &Limits,
) -> Result<DecodedRequest, DecodeError> {
    decode_with(body, None, limits, Reading::Serde)
}

/// How a request is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reading {
    /// A decode: data arrays cut out by [`crate::skim`] and read by
    /// [`crate::numbers`] where they are plain numbers, serde otherwise.
    /// A precheck: [`crate::lite`]'s one pass, serde when it declines.
    Fast,
    /// By serde (a precheck's still without the data arrays).
    Serde,
}

fn decode_with(
    body: &[u8],
    json_len: Option<&str>,
    limits: &Limits,
    reading: Reading,
) -> Result<DecodedRequest, DecodeError> {
    let (body, binary) = crate::binary::split_body(body, json_len)?;
    // serde would accept a JSON array for a struct and then complain about
    // its length; say plainly what the body must be instead.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') && !body.is_empty() {
        return Err(DecodeError(
            "invalid inference request: the body must be a JSON object with \"inputs\"".into(),
        ));
    }
    // The plain form is read in one pass (`lite`), each tensor's data kept
    // as text for the number fast path. Otherwise the data arrays are cut
    // out and serde reads the rest. Anything the scan cannot follow, or
    // that serde refuses, is parsed as it came, so errors name the
    // original body.
    let fast = match reading {
        Reading::Fast => crate::lite::read(body).and_then(wire_of_lite),
        Reading::Serde => None,
    };
    let skimmed = match (&fast, reading) {
        (None, Reading::Fast) => crate::skim::split(body),
        _ => None,
    };
    let wire = match fast.or_else(|| {
        let (skeleton, arrays) = skimmed.as_ref()?;
        refill(skeleton, arrays, body)
    }) {
        Some(wire) => wire,
        None => serde_json::from_slice::<WireRequest<WireTensor<'_>>>(body)
            .map_err(|e| json_error("request", &e, json_len))?,
    };
    check_flags(wire.parameters.as_ref(), wire.outputs.as_ref())?;
    if wire.inputs.is_empty() {
        return Err(DecodeError(
            "invalid inference request: \"inputs\" is empty; give at least one input tensor".into(),
        ));
    }
    // Check every declared shape against the budget before parsing any
    // data, so an oversized request is refused without doing the work.
    let mut budget = limits.max_elements;
    let headers = wire
        .inputs
        .into_iter()
        .map(|t| {
            check_header(
                t,
                &mut budget,
                limits.max_elements,
                "input",
                json_len.is_some(),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let inputs = parse_all(headers, binary, "input", reading)?;
    Ok(DecodedRequest {
        id: wire.id,
        parameters: wire.parameters,
        inputs,
        outputs: wire.outputs,
    })
}

/// A request as [`crate::lite::read`] read it, in serde's form; `None`
/// when its `outputs` are not what serde reads (serde's to word).
fn wire_of_lite(lite: crate::lite::Request<'_>) -> Option<WireRequest<WireTensor<'_>>> {
    let outputs = match lite.outputs {
        Some(text) => serde_json::from_slice::<Option<Vec<RequestOutput>>>(text).ok()?,
        None => None,
    };
    Some(WireRequest {
        id: lite.id,
        parameters: lite.parameters,
        inputs: lite
            .inputs
            .into_iter()
            .map(|t| WireTensor {
                name: t.name.into_owned(),
                shape: t.shape,
                datatype: t.datatype,
                parameters: t.parameters,
                data: t.data,
            })
            .collect(),
        outputs,
    })
}

#[derive(Deserialize)]
#[serde(expecting = "an inference request: a JSON object with \"inputs\"")]
struct LiteRequest<'a> {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(borrow)]
    inputs: Vec<LiteTensor<'a>>,
}

#[derive(Deserialize)]
#[serde(
    expecting = "an input tensor: an object with \"name\", \"shape\", \"datatype\" and \"data\""
)]
struct LiteTensor<'a> {
    #[serde(borrow)]
    name: std::borrow::Cow<'a, str>,
    shape: Vec<i64>,
    #[serde(borrow)]
    datatype: std::borrow::Cow<'a, str>,
    #[serde(default)]
    data: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    parameters: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Where a tensor declares its data to be: `Ok(None)` for JSON `data`,
/// `Ok(Some(n))` for the next `n` bytes of the binary part. `binary_allowed`
/// is whether the body has a binary part (the length header was sent).
fn declared_binary(
    has_data: bool,
    parameters: Option<&serde_json::Map<String, serde_json::Value>>,
    binary_allowed: bool,
) -> Result<Option<u64>, String> {
    let size = match parameters.and_then(|p| p.get("binary_data_size")) {
        None => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| {
            format!("binary_data_size must be a non-negative integer byte count, got {v}")
        })?),
    };
    match (has_data, size) {
        (true, None) => Ok(None),
        (true, Some(_)) => {
            Err("set either \"data\" or the \"binary_data_size\" parameter, not both".into())
        }
        (false, None) => Err(MISSING_DATA.into()),
        (false, Some(_)) if !binary_allowed => Err(format!(
            "binary_data_size needs the {} header giving the length of the JSON part",
            crate::binary::HEADER_LENGTH
        )),
        (false, Some(n)) => Ok(Some(n)),
    }
}

/// A JSON syntax error, with a hint when the likely cause is binary data
/// sent without its length header.
fn json_error(what: &str, e: &serde_json::Error, json_len: Option<&str>) -> DecodeError {
    let hint = if json_len.is_none() && e.to_string().contains("trailing characters") {
        format!(
            " (a body with binary tensors needs the {} header)",
            crate::binary::HEADER_LENGTH
        )
    } else {
        String::new()
    };
    DecodeError(format!("invalid inference {what}: {e}{hint}"))
}

/// Checks that Triton's output flags, where given, are booleans.
fn check_flags(
    parameters: Option<&serde_json::Map<String, serde_json::Value>>,
    outputs: Option<&Vec<RequestOutput>>,
) -> Result<(), DecodeError> {
    let check =
        |params: Option<&serde_json::Map<String, serde_json::Value>>, key: &str, whose: &str| {
            match params.and_then(|p| p.get(key)) {
                Some(v) if !v.is_boolean() => Err(DecodeError(format!(
                    "{whose}: \"{key}\" must be true or false, got {v}"
                ))),
                _ => Ok(()),
            }
        };
    check(parameters, "binary_data_output", "request parameters")?;
    for o in outputs.into_iter().flatten() {
        check(
            o.parameters.as_ref(),
            "binary_data",
            &format!("output {:?}", o.name),
        )?;
    }
    Ok(())
}

const MISSING_DATA: &str = "missing field `data` (or, with the binary tensor extension, a \
                            \"binary_data_size\" parameter)";

/// Checks a request's structure without decoding tensor data: a JSON
/// object with non-empty `inputs`, each with a name, a known datatype, a
/// concrete shape and data, within the element budget. Cheap enough for a
/// gateway to refuse malformed requests before they reach a replica, which
/// checks the rest against the model: the data arrays are not even read
/// ([`crate::skim`]), so what is inside them is the replica's to refuse.
/// Returns the request's `id` and sequence, if it has them.
pub fn precheck_request(body: &[u8], limits: &Limits) -> Result<Prechecked, DecodeError> {
    precheck_request_parts(body, None, limits)
}

/// What a precheck learns of a request on the way.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Prechecked {
    /// The caller's request id.
    pub id: Option<String>,
    /// The sequence the request is a step of (Triton's `sequence_id`), for
    /// routing every step to one replica. Parameters a replica would
    /// refuse are not refused here: they read as no sequence.
    pub sequence: Option<crate::sequence::Step>,
}

/// [`precheck_request`] for a body that may use the binary tensor data
/// extension (`json_len`: the `Inference-Header-Content-Length` header).
pub fn precheck_request_parts(
    body: &[u8],
    json_len: Option<&str>,
    limits: &Limits,
) -> Result<Prechecked, DecodeError> {
    precheck_with(body, json_len, limits, Reading::Fast)
}

/// [`precheck_request`] by the scan and serde alone, without
/// [`crate::lite`]'s one-pass reading: the reference that reading must
/// agree with (the fuzz target checks it).
pub fn precheck_request_by_serde(body: &[u8], limits: &Limits) -> Result<Prechecked, DecodeError> {
    precheck_with(body, None, limits, Reading::Serde)
}

/// What serde reads of a request for the precheck: the body without its
/// tensor data when the scan finds it (the numbers are the replica's to
/// read); as it came otherwise, or when that fails, so errors name the
/// original body.
pub(crate) fn lite_by_serde(
    body: &[u8],
) -> Result<crate::lite::Request<'static>, serde_json::Error> {
    let skimmed = crate::skim::without_data(body);
    let lite = match skimmed
        .as_deref()
        .and_then(skeleton_text)
        .and_then(|s| serde_json::from_str::<LiteRequest<'_>>(s).ok())
    {
        Some(lite) => lite,
        None => serde_json::from_slice(body)?,
    };
    let owned = |text: std::borrow::Cow<'_, str>| std::borrow::Cow::Owned(text.into_owned());
    Ok(crate::lite::Request {
        id: lite.id,
        parameters: lite.parameters,
        inputs: lite
            .inputs
            .into_iter()
            .map(|t| crate::lite::Tensor {
                name: owned(t.name),
                shape: t.shape,
                datatype: owned(t.datatype),
                has_data: t.data.is_some(),
                data: None,
                parameters: t.parameters,
            })
            .collect(),
        outputs: None,
    })
}

fn precheck_with(
    body: &[u8],
    json_len: Option<&str>,
    limits: &Limits,
    reading: Reading,
) -> Result<Prechecked, DecodeError> {
    let (body, binary) = crate::binary::split_body(body, json_len)?;
    let mut binary_left = binary.len() as u64;
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') && !body.is_empty() {
        return Err(DecodeError(
            "invalid inference request: the body must be a JSON object with \"inputs\"".into(),
        ));
    }
    // The plain form in one pass; anything else by serde, whose errors
    // say what is wrong.
    let fast = match reading {
        Reading::Fast => crate::lite::read(body),
        Reading::Serde => None,
    };
    let lite = match fast {
        Some(lite) => lite,
        None => lite_by_serde(body).map_err(|e| json_error("request", &e, json_len))?,
    };
    if lite.inputs.is_empty() {
        return Err(DecodeError(
            "invalid inference request: \"inputs\" is empty; give at least one input tensor".into(),
        ));
    }
    let mut budget = limits.max_elements;
    let prechecked = Prechecked {
        id: lite.id,
        sequence: crate::sequence::Step::from_parameters(lite.parameters.as_ref())
            .ok()
            .flatten(),
    };
    for t in lite.inputs {
        let err = |msg: String| DecodeError(format!("input {:?}: {msg}", t.name));
        let binary_size =
            declared_binary(t.has_data, t.parameters.as_ref(), json_len.is_some()).map_err(err)?;
        let Some(datatype) = DataType::parse(&t.datatype) else {
            let known: Vec<&str> = DataType::ALL.iter().map(|d| d.as_str()).collect();
            return Err(err(format!(
                "unknown datatype {:?}; use one of {}",
                t.datatype,
                known.join(", ")
            )));
        };
        if t.shape.iter().any(|&d| d < 0) {
            return Err(err(format!(
                "shape {:?} has a negative dimension; request shapes must be concrete",
                t.shape
            )));
        }
        // Counted without collecting the shape: this runs per request.
        let count = t
            .shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(usize::try_from(d).ok()?))
            .filter(|&n| n <= budget)
            .ok_or_else(|| {
                err(format!(
                    "shape {:?} holds more elements than the server accepts in one request ({})",
                    t.shape, limits.max_elements
                ))
            })?;
        budget -= count;
        if let Some(size) = binary_size {
            if let Some(element) = datatype.size_of() {
                let expected = (count as u64).saturating_mul(element as u64);
                if size != expected {
                    return Err(err(format!(
                        "binary data has {size} bytes but {count} {} elements take {expected}",
                        datatype.as_str()
                    )));
                }
            }
            binary_left = binary_left.checked_sub(size).ok_or_else(|| {
                err(format!(
                    "binary_data_size is {size} but only {binary_left} bytes of binary data remain"
                ))
            })?;
        }
    }
    if binary_left > 0 {
        return Err(DecodeError(format!(
            "{binary_left} bytes of binary data are left over after the inputs that declared binary_data_size"
        )));
    }
    Ok(prechecked)
}

/// Where a tensor's data is.
enum Payload<'a> {
    /// A JSON array, as text.
    Json(&'a [u8]),
    /// The next this many bytes of the binary part.
    Binary(usize),
}

/// A tensor whose name, datatype and shape are checked but whose data is
/// still raw JSON text.
struct Header<'a> {
    /// "input" or "output", for errors.
    what: &'static str,
    name: String,
    datatype: DataType,
    shape: Vec<usize>,
    count: usize,
    data: Payload<'a>,
}

/// A request tensor's datatype and concrete shape, checked, and its
/// element count taken from `budget` (what the whole request may hold, at
/// most `max_elements`). Errors say what is wrong, for the caller to prefix
/// with the tensor's name. Shared by every protocol's decoder.
pub fn tensor_header(
    datatype: &str,
    shape: &[i64],
    budget: &mut usize,
    max_elements: usize,
) -> Result<(DataType, Vec<usize>, usize), String> {
    let parsed = DataType::parse(datatype).ok_or_else(|| {
        let known: Vec<&str> = DataType::ALL.iter().map(|d| d.as_str()).collect();
        format!(
            "unknown datatype {datatype:?}; use one of {}",
            known.join(", ")
        )
    })?;
    let dims = shape
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<Vec<usize>, _>>()
        .map_err(|_| {
            format!("shape {shape:?} has a negative dimension; request shapes must be concrete")
        })?;
    let count = element_count(&dims)
        .filter(|&n| n <= *budget)
        .ok_or_else(|| {
            format!(
                "shape {dims:?} holds more elements than the server accepts in one request ({max_elements})"
            )
        })?;
    *budget -= count;
    Ok((parsed, dims, count))
}

fn check_header<'a>(
    wire: WireTensor<'a>,
    budget: &mut usize,
    max_elements: usize,
    what: &'static str,
    binary_allowed: bool,
) -> Result<Header<'a>, DecodeError> {
    let name = wire.name;
    let err = |msg: String| DecodeError(format!("{what} {name:?}: {msg}"));
    let (datatype, shape, count) =
        tensor_header(&wire.datatype, &wire.shape, budget, max_elements).map_err(err)?;
    let binary = declared_binary(
        wire.data.is_some(),
        wire.parameters.as_ref(),
        binary_allowed,
    )
    .map_err(err)?;
    let data = match (wire.data, binary) {
        (_, Some(size)) => Payload::Binary(usize::try_from(size).unwrap_or(usize::MAX)),
        (Some(text), None) => Payload::Json(text),
        (None, None) => return Err(err(MISSING_DATA.into())),
    };
    Ok(Header {
        what,
        name,
        datatype,
        shape,
        count,
        data,
    })
}

/// Parses every tensor, taking binary payloads from `binary` in order;
/// `what` ("input", "output") names them in errors.
fn parse_all(
    headers: Vec<Header<'_>>,
    binary: &[u8],
    what: &str,
    reading: Reading,
) -> Result<Vec<Tensor>, DecodeError> {
    let mut rest = binary;
    let tensors = headers
        .into_iter()
        .map(|h| {
            let bytes = match h.data {
                Payload::Binary(size) => {
                    if size > rest.len() {
                        return Err(DecodeError(format!(
                            "{what} {:?}: binary_data_size is {size} but only {} bytes of binary data remain",
                            h.name,
                            rest.len()
                        )));
                    }
                    let (mine, tail) = rest.split_at(size);
                    rest = tail;
                    Some(mine)
                }
                Payload::Json(_) => None,
            };
            h.parse(bytes, reading)
        })
        .collect::<Result<Vec<_>, _>>()?;
    if !rest.is_empty() {
        return Err(DecodeError(format!(
            "{} bytes of binary data are left over after the {what}s that declared binary_data_size",
            rest.len()
        )));
    }
    Ok(tensors)
}

impl Header<'_> {
    /// The tensor, from its JSON data or from `binary` (its share of the
    /// binary part).
    fn parse(self, binary: Option<&[u8]>, reading: Reading) -> Result<Tensor, DecodeError> {
        let Header {
            what,
            name,
            datatype,
            shape,
            count,
            data,
        } = self;
        let err = |msg: String| DecodeError(format!("{what} {name:?}: {msg}"));
        let data = match (data, binary) {
            (Payload::Json(text), _) => text,
            (Payload::Binary(_), bytes) => {
                let data = crate::binary::decode(bytes.unwrap_or_default(), datatype, count)
                    .map_err(|e| err(e.0))?;
                return Tensor::new(name.clone(), shape, data).map_err(|e| err(e.to_string()));
            }
        };
        if !data.starts_with(b"[") {
            return Err(err(format!(
                "\"data\" must be a JSON array of {count} elements, got {}",
                abbreviate(&String::from_utf8_lossy(data))
            )));
        }
        let data = parse_data(data, datatype, count, reading).map_err(|e| err(e.to_string()))?;
        Tensor::new(name.clone(), shape, data).map_err(|e| err(e.to_string()))
    }
}

fn abbreviate(text: &str) -> String {
    match text.char_indices().nth(40) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_owned(),
    }
}

/// Parses the JSON array `text` (possibly nested) into `count` elements of
/// `datatype`.
fn parse_data(
    text: &[u8],
    datatype: DataType,
    count: usize,
    reading: Reading,
) -> Result<TensorData, DecodeError> {
    /// The array in `text`, flattened.
    struct Text<'a> {
        text: &'a [u8],
        count: usize,
        reading: Reading,
    }
    impl ForEachType for Text<'_> {
        type Error = DecodeError;
        fn run<T: Element>(self) -> Result<Vec<T>, DecodeError> {
            let Text {
                text,
                count,
                reading,
            } = self;
            if reading == Reading::Fast
                && let Some(numbers) = crate::numbers::flat(text, count)
            {
                return Ok(numbers);
            }
            // Not plain numbers (strings, booleans) or something wrong:
            // serde reads it, and says what.
            // A hostile shape cannot make us pre-allocate much: cap the
            // reservation by what the text could possibly hold.
            let mut out = Vec::with_capacity(count.min(text.len() / 2 + 1));
            let mut de = serde_json::Deserializer::from_slice(text);
            Flatten {
                out: &mut out,
                limit: count,
            }
            .deserialize(&mut de)
            .and_then(|()| de.end())
            .map_err(|e| DecodeError(format!("bad \"data\": {e}")))?;
            if out.len() != count {
                return Err(DecodeError(format!(
                    "\"data\" has {} elements but the shape holds {count}",
                    out.len()
                )));
            }
            Ok(out)
        }
    }
    for_each_type(
        datatype,
        Text {
            text,
            count,
            reading,
        },
    )
}

/// Something done for one element type, chosen at run time by
/// [`for_each_type`].
trait ForEachType {
    type Error;
    fn run<T: Element>(self) -> Result<Vec<T>, Self::Error>;
}

/// `what`, run for the element type of `datatype`.
fn for_each_type<W: ForEachType>(datatype: DataType, what: W) -> Result<TensorData, W::Error> {
    Ok(match datatype {
        DataType::Bool => TensorData::Bool(what.run()?),
        DataType::Uint8 => TensorData::Uint8(what.run()?),
        DataType::Uint16 => TensorData::Uint16(what.run()?),
        DataType::Uint32 => TensorData::Uint32(what.run()?),
        DataType::Uint64 => TensorData::Uint64(what.run()?),
        DataType::Int8 => TensorData::Int8(what.run()?),
        DataType::Int16 => TensorData::Int16(what.run()?),
        DataType::Int32 => TensorData::Int32(what.run()?),
        DataType::Int64 => TensorData::Int64(what.run()?),
        DataType::Fp16 => TensorData::Fp16(what.run()?),
        DataType::Fp32 => TensorData::Fp32(what.run()?),
        DataType::Fp64 => TensorData::Fp64(what.run()?),
        DataType::Bytes => {
            TensorData::Bytes(what.run::<ByteString>()?.into_iter().map(|b| b.0).collect())
        }
    })
}

/// How one JSON scalar becomes a tensor element.
trait Element: Sized {
    /// What the datatype expects, for error messages.
    const EXPECTED: &'static str;
    fn from_f64(_: f64) -> Result<Self, String> {
        Err(format!("expected {}, found a number", Self::EXPECTED))
    }
    fn from_i64(_: i64) -> Result<Self, String> {
        Err(format!("expected {}, found a number", Self::EXPECTED))
    }
    fn from_u64(_: u64) -> Result<Self, String> {
        Err(format!("expected {}, found a number", Self::EXPECTED))
    }
    fn from_bool(_: bool) -> Result<Self, String> {
        Err(format!("expected {}, found a boolean", Self::EXPECTED))
    }
    fn from_str(_: &str) -> Result<Self, String> {
        Err(format!("expected {}, found a string", Self::EXPECTED))
    }
}

macro_rules! float_element {
    ($t:ty, $from:expr) => {
        impl Element for $t {
            const EXPECTED: &'static str = "a number";
            #[allow(clippy::cast_possible_truncation)]
            #[inline(always)]
            fn from_f64(v: f64) -> Result<Self, String> {
                Ok($from(v))
            }
            #[allow(clippy::cast_precision_loss)]
            #[inline(always)]
            fn from_i64(v: i64) -> Result<Self, String> {
                Ok($from(v as f64))
            }
            #[allow(clippy::cast_precision_loss)]
            #[inline(always)]
            fn from_u64(v: u64) -> Result<Self, String> {
                Ok($from(v as f64))
            }
        }
    };
}
float_element!(f32, |v: f64| v as f32);
float_element!(f64, |v: f64| v);
float_element!(f16, f16::from_f64);

macro_rules! int_element {
    ($t:ty, $name:literal) => {
        impl Element for $t {
            const EXPECTED: &'static str = concat!("an integer in the range of ", $name);
            fn from_f64(v: f64) -> Result<Self, String> {
                // Integral floats (1.0) are accepted: some encoders write them.
                #[allow(clippy::cast_possible_truncation)]
                if v.fract() == 0.0 && v >= i64::MIN as f64 && v <= u64::MAX as f64 {
                    if v < 0.0 {
                        return Self::from_i64(v as i64);
                    }
                    return Self::from_u64(v as u64);
                }
                Err(format!("{v} is not an integer; {} expects integers", $name))
            }
            fn from_i64(v: i64) -> Result<Self, String> {
                <$t>::try_from(v).map_err(|_| format!("{v} is out of range for {}", $name))
            }
            fn from_u64(v: u64) -> Result<Self, String> {
                <$t>::try_from(v).map_err(|_| format!("{v} is out of range for {}", $name))
            }
        }
    };
}
int_element!(u8, "UINT8");
int_element!(u16, "UINT16");
int_element!(u32, "UINT32");
int_element!(u64, "UINT64");
int_element!(i8, "INT8");
int_element!(i16, "INT16");
int_element!(i32, "INT32");
int_element!(i64, "INT64");

impl Element for bool {
    const EXPECTED: &'static str = "true or false";
    fn from_bool(v: bool) -> Result<Self, String> {
        Ok(v)
    }
}

struct ByteString(Vec<u8>);

impl Element for ByteString {
    const EXPECTED: &'static str = "a string";
    fn from_str(v: &str) -> Result<Self, String> {
        Ok(ByteString(v.as_bytes().to_vec()))
    }
}

impl<T: Element> crate::numbers::FromNumber for T {
    #[inline(always)]
    fn from_number(n: crate::numbers::Number) -> Option<T> {
        use crate::numbers::Number;
        match n {
            Number::Unsigned(v) => T::from_u64(v).ok(),
            Number::Signed(v) => T::from_i64(v).ok(),
            Number::Float(v) => T::from_f64(v).ok(),
        }
    }
}

/// Visits a (possibly nested) JSON array, appending its scalars to `out`.
struct Flatten<'a, T> {
    out: &'a mut Vec<T>,
    limit: usize,
}

impl<T: Element> Flatten<'_, T> {
    fn push<E: de::Error>(self, v: Result<T, String>) -> Result<(), E> {
        let index = self.out.len();
        if index >= self.limit {
            return Err(E::custom(format!(
                "more elements than the shape holds ({})",
                self.limit
            )));
        }
        let v = v.map_err(|m| E::custom(format!("element {index}: {m}")))?;
        self.out.push(v);
        Ok(())
    }
}

impl<'de, T: Element> DeserializeSeed<'de> for Flatten<'_, T> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, T: Element> Visitor<'de> for Flatten<'_, T> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "an array of {}", T::EXPECTED)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let limit = self.limit;
        while seq
            .next_element_seed(Flatten {
                out: &mut *self.out,
                limit,
            })?
            .is_some()
        {}
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.push(T::from_f64(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.push(T::from_i64(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.push(T::from_u64(v))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.push(T::from_bool(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.push(T::from_str(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        let index = self.out.len();
        Err(E::custom(format!(
            "element {index}: expected {}, found null",
            T::EXPECTED
        )))
    }
    fn visit_map<A: de::MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        let index = self.out.len();
        Err(de::Error::custom(format!(
            "element {index}: expected {}, found an object",
            T::EXPECTED
        )))
    }
}

/// Writes an inference request body of JSON tensors: each tensor's name,
/// datatype and shape before its data, the order Triton's clients write.
/// The JSON twin of [`crate::binary::encode_request`], for Shoal's own
/// clients (load generators, benchmarks); written as responses are.
pub fn encode_request(request: &DecodedRequest) -> Vec<u8> {
    let elements: usize = request.inputs.iter().map(|t| t.data().len()).sum();
    let mut body = Vec::with_capacity((256 + 12 * elements).min(1 << 20));
    body.push(b'{');
    if let Some(id) = &request.id {
        body.extend_from_slice(br#""id":"#);
        out::string(&mut body, id);
        body.push(b',');
    }
    if let Some(parameters) = &request.parameters {
        body.extend_from_slice(br#""parameters":"#);
        // A map of JSON values into a `Vec` cannot fail.
        serde_json::to_writer(&mut body, parameters).unwrap_or_default();
        body.push(b',');
    }
    body.extend_from_slice(br#""inputs":["#);
    for (i, t) in request.inputs.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        out::tensor_head(&mut body, t);
        body.extend_from_slice(br#","data":"#);
        out::data(&mut body, t.data());
        body.push(b'}');
    }
    body.push(b']');
    if let Some(outputs) = &request.outputs {
        body.extend_from_slice(br#","outputs":"#);
        serde_json::to_writer(&mut body, outputs).unwrap_or_default();
    }
    body.push(b'}');
    body
}

/// An encoded response body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedResponse {
    /// The body: JSON, then any binary outputs.
    pub body: Vec<u8>,
    /// Length of the JSON part when there are binary outputs: the value of
    /// the `Inference-Header-Content-Length` response header.
    pub json_len: Option<usize>,
}

/// Writes an inference response body of JSON tensors.
pub fn encode_response(
    model_name: &str,
    model_version: Option<&str>,
    id: Option<&str>,
    outputs: &[Tensor],
) -> Vec<u8> {
    encode_response_parts(model_name, model_version, id, outputs, |_| false).body
}

/// Writes an inference response body, with the outputs for which
/// `binary(name)` holds as binary data after the JSON part.
pub fn encode_response_parts(
    model_name: &str,
    model_version: Option<&str>,
    id: Option<&str>,
    outputs: &[Tensor],
    binary: impl Fn(&str) -> bool,
) -> EncodedResponse {
    // Room for the usual answer at once: names and shapes, and a dozen
    // bytes a number.
    let elements: usize = outputs.iter().map(|t| t.data().len()).sum();
    let mut body = Vec::with_capacity((256 + 12 * elements).min(1 << 20));
    let mut tail = Vec::new();
    let mut any_binary = false;
    body.extend_from_slice(br#"{"model_name":"#);
    out::string(&mut body, model_name);
    if let Some(version) = model_version {
        body.extend_from_slice(br#","model_version":"#);
        out::string(&mut body, version);
    }
    if let Some(id) = id {
        body.extend_from_slice(br#","id":"#);
        out::string(&mut body, id);
    }
    body.extend_from_slice(br#","outputs":["#);
    for (i, t) in outputs.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        out::tensor_head(&mut body, t);
        if binary(&t.name) && crate::binary::fits(t.data()) {
            any_binary = true;
            let before = tail.len();
            crate::binary::encode(t.data(), &mut tail);
            body.extend_from_slice(br#","parameters":{"binary_data_size":"#);
            out::unsigned(&mut body, tail.len() - before);
            body.push(b'}');
        } else {
            body.extend_from_slice(br#","data":"#);
            out::data(&mut body, t.data());
        }
        body.push(b'}');
    }
    body.extend_from_slice(b"]}");
    let json_len = any_binary.then_some(body.len());
    body.extend_from_slice(&tail);
    EncodedResponse { body, json_len }
}

/// A parsed inference response, for clients (gateway comparisons, tools, tests).
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedResponse {
    /// Model that answered.
    pub model_name: String,
    /// Version that answered.
    pub model_version: Option<String>,
    /// Echoed request id.
    pub id: Option<String>,
    /// Output tensors.
    pub outputs: Vec<Tensor>,
}

#[derive(Deserialize)]
struct WireResponseIn<'a> {
    model_name: String,
    #[serde(default)]
    model_version: Option<String>,
    #[serde(default)]
    id: Option<String>,
    #[serde(borrow)]
    outputs: Vec<WireTensor<'a>>,
}

/// Parses an inference response body of JSON tensors.
pub fn decode_response(body: &[u8]) -> Result<DecodedResponse, DecodeError> {
    decode_response_parts(body, None)
}

/// Parses an inference response body; `json_len` is its
/// `Inference-Header-Content-Length` header, if any.
pub fn decode_response_parts(
    body: &[u8],
    json_len: Option<&str>,
) -> Result<DecodedResponse, DecodeError> {
    let (body, binary) = crate::binary::split_body(body, json_len)?;
    let wire: WireResponseIn<'_> =
        serde_json::from_slice(body).map_err(|e| json_error("response", &e, json_len))?;
    let mut budget = usize::MAX;
    let headers = wire
        .outputs
        .into_iter()
        .map(|t| check_header(t, &mut budget, usize::MAX, "output", json_len.is_some()))
        .collect::<Result<Vec<_>, _>>()?;
    let outputs = parse_all(headers, binary, "output", Reading::Fast)?;
    Ok(DecodedResponse {
        model_name: wire.model_name,
        model_version: wire.model_version,
        id: wire.id,
        outputs,
    })
}

#[cfg(test)]
mod tests {
    use serde::{Serialize, Serializer};
    use shoal_core::with_tensor_data;

    use super::*;

    fn check(body: &str, expected: Result<&str, &str>) {
        let limits = Limits { max_elements: 1000 };
        let got = decode_request(body.as_bytes(), &limits)
            .map(|r| format!("{:?}", r.inputs))
            .map_err(|e| e.0);
        match (got, expected) {
            (Ok(got), Ok(expected)) => assert_eq!(got, expected, "body {body}"),
            (Err(got), Err(expected)) => {
                assert!(
                    got.contains(expected),
                    "body {body}: {got:?} lacks {expected:?}"
                )
            }
            (got, expected) => panic!("body {body}: got {got:?}, expected {expected:?}"),
        }
    }

    #[test]
    fn flat_and_nested_data() {
        let flat =
            r#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[1,2.5,3,4]}]}"#;
        let nested =
            r#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[[1,2.5],[3,4]]}]}"#;
        let expected = r#"[Tensor { name: "x", shape: [2, 2], data: Fp32([1.0, 2.5, 3.0, 4.0]) }]"#;
        check(flat, Ok(expected));
        check(nested, Ok(expected));
    }

    #[test]
    fn every_datatype() {
        let cases = [
            ("BOOL", "[true,false]", "Bool([true, false])"),
            ("UINT8", "[0,255]", "Uint8([0, 255])"),
            ("UINT16", "[0,65535]", "Uint16([0, 65535])"),
            ("UINT32", "[0,4294967295]", "Uint32([0, 4294967295])"),
            (
                "UINT64",
                "[0,18446744073709551615]",
                "Uint64([0, 18446744073709551615])",
            ),
            ("INT8", "[-128,127]", "Int8([-128, 127])"),
            ("INT16", "[-32768,32767]", "Int16([-32768, 32767])"),
            ("INT32", "[-1,2.0]", "Int32([-1, 2])"),
            (
                "INT64",
                "[-9223372036854775808,16000]",
                "Int64([-9223372036854775808, 16000])",
            ),
            ("FP16", "[0.5,-2]", "Fp16([0.5, -2.0])"),
            ("FP32", "[0.5,-2]", "Fp32([0.5, -2.0])"),
            ("FP64", "[0.1,1e300]", "Fp64([0.1, 1e300])"),
            ("BYTES", r#"["ab","ü"]"#, "Bytes([[97, 98], [195, 188]])"),
        ];
        for (dt, data, expected) in cases {
            let body = format!(
                r#"{{"inputs":[{{"name":"x","shape":[2],"datatype":"{dt}","data":{data}}}]}}"#
            );
            let expected = format!(r#"[Tensor {{ name: "x", shape: [2], data: {expected} }}]"#);
            check(&body, Ok(&expected));
            assert_eq!(by_serde(&body), decode(&body), "{body}");
            // Data before its datatype, as serde_json's own maps write it.
            let data_first = format!(
                r#"{{"inputs":[{{"data":{data},"name":"x","shape":[2],"datatype":"{dt}"}}]}}"#
            );
            check(&data_first, Ok(&expected));
        }
    }

    #[test]
    fn an_encoded_request_decodes_to_itself() {
        let request = DecodedRequest {
            id: Some("r\"1".into()),
            parameters: Some(serde_json::from_str(r#"{"sequence_id":3}"#).unwrap()),
            inputs: vec![
                Tensor::new(
                    "a",
                    vec![2, 2],
                    TensorData::Fp32(vec![0.1, -2.0, 3.5, 1e-7]),
                )
                .unwrap(),
                Tensor::new("b", vec![1], TensorData::Bytes(vec![b"x]".to_vec()])).unwrap(),
                Tensor::new("c", vec![2], TensorData::Int64(vec![-1, i64::MAX])).unwrap(),
            ],
            outputs: Some(vec![RequestOutput {
                name: "y".into(),
                parameters: None,
            }]),
        };
        let body = encode_request(&request);
        assert_eq!(decode_request(&body, &Limits::default()).unwrap(), request);
        // Written byte for byte as serde_json wrote it, with and without
        // each optional member.
        assert_eq!(
            String::from_utf8(body).unwrap(),
            String::from_utf8(encode_request_by_serde(&request)).unwrap()
        );
        let bare = DecodedRequest {
            id: None,
            parameters: None,
            outputs: None,
            ..request
        };
        assert_eq!(encode_request(&bare), encode_request_by_serde(&bare));
        let none = DecodedRequest {
            inputs: Vec::new(),
            ..bare
        };
        assert_eq!(encode_request(&none), br#"{"inputs":[]}"#);
    }

    fn decode(body: &str) -> Result<DecodedRequest, DecodeError> {
        decode_request(body.as_bytes(), &Limits::default())
    }

    fn by_serde(body: &str) -> Result<DecodedRequest, DecodeError> {
        decode_request_by_serde(body.as_bytes(), &Limits::default())
    }

    #[test]
    fn both_readings_give_the_same_request() {
        // Keys in the order clients write them (serde_json's own maps would
        // sort "data" first).
        let body = r#"{"id":"r1","parameters":{"binary_data_output":false},"inputs":[
            {"name":"a","shape":[2,2],"datatype":"FP32","parameters":{"p":1},"data":[[1,2.5],[3,-4e-3]]},
            {"data":[1,2],"name":"b","shape":[2],"datatype":"INT64","extra":{"data":[9]}},
            {"shape":[1],"datatype":"BYTES","name":"c","data":["x\"]"]}],
            "outputs":[{"name":"y"}]}"#;
        // Both fast readings take it: the one-pass one, and the scan with
        // serde over the rest that reads what the first declines.
        assert!(
            crate::lite::read(body.as_bytes())
                .and_then(wire_of_lite)
                .is_some()
        );
        let (skeleton, arrays) = crate::skim::split(body.as_bytes()).unwrap();
        assert!(refill(&skeleton, &arrays, body.as_bytes()).is_some());
        let decoded = decode(body).unwrap();
        assert_eq!(decoded.id.as_deref(), Some("r1"));
        assert_eq!(Ok(decoded), by_serde(body));
        // Every number as serde_json reads it, to the bit.
        let numbers = [
            "0",
            "-0",
            "-0.0",
            "1",
            "-1",
            "0.1",
            "16.0",
            "0.30000000000000004",
            "1e-7",
            "-2.5E+3",
            "3.4028235e38",
            "-3.4028236e38",
            "1e-46",
            "65504",
            "65520",
            "4294967296",
            "9007199254740993",
            "18446744073709551615",
            "18446744073709551616",
            "-9223372036854775808",
            "-9223372036854775809",
            "123456.789e-3",
            "5e-324",
            "1.7976931348623157e308",
            "-0.009985063225030899",
            "-0.5",
            "-12.25",
            "-1e-7",
        ];
        for dt in ["FP16", "FP32", "FP64", "UINT64", "INT64", "INT8", "UINT8"] {
            let body = format!(
                r#"{{"inputs":[{{"name":"x","shape":[{}],"datatype":"{dt}","data":[{}]}}]}}"#,
                numbers.len(),
                numbers.join(" , ")
            );
            assert_eq!(decode(&body).is_ok(), by_serde(&body).is_ok(), "{dt}");
            if let Ok(decoded) = decode(&body) {
                assert_eq!(
                    format!("{:?}", decoded.inputs),
                    format!("{:?}", by_serde(&body).unwrap().inputs)
                );
            }
            for n in numbers {
                let one = format!(
                    r#"{{"inputs":[{{"name":"x","shape":[1],"datatype":"{dt}","data":[{n}]}}]}}"#
                );
                let (ours, theirs) = (decode(&one), by_serde(&one));
                assert_eq!(ours.is_ok(), theirs.is_ok(), "{dt} {n}");
                if let (Ok(ours), Ok(theirs)) = (ours, theirs) {
                    // Debug prints floats exactly, -0 included.
                    assert_eq!(format!("{ours:?}"), format!("{theirs:?}"), "{dt} {n}");
                }
            }
        }
        // Numbers padded past what fast-float2 reads of an exponent: left
        // to serde, which reads them exactly (0.0) or refuses them.
        let zeros = "0".repeat(65_535);
        for n in [format!("1{zeros}e-655360"), format!("0.{zeros}1e655360")] {
            let body = format!(
                r#"{{"inputs":[{{"name":"x","shape":[1],"datatype":"FP64","data":[{n}]}}]}}"#
            );
            assert_eq!(decode(&body), by_serde(&body));
        }
        // What the fast path refuses, serde explains.
        for (bad, why) in [
            (
                r#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","data":[1]}]}"#,
                "has 1 elements but the shape holds 2",
            ),
            (
                r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":["a"]}]}"#,
                "element 0: expected a number",
            ),
            (
                r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP33","data":[1]}]}"#,
                "unknown datatype \"FP33\"",
            ),
            (
                r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1],"data":[2]}]}"#,
                "duplicate field `data`",
            ),
            (
                r#"{"inputs":[{"shape":[1],"datatype":"FP32","data":[1]}]}"#,
                "missing field `name`",
            ),
        ] {
            check(bad, Err(why));
            assert_eq!(decode(bad), by_serde(bad), "{bad}");
        }
    }

    #[test]
    fn a_damaged_body_decodes_as_serde_decodes_it() {
        // Every body one byte away from a plain one (each byte cut, or
        // replaced by each byte of JSON's syntax) decodes, or is refused
        // with the same words, by the fast readings and by serde alone.
        let bodies = [
            r#"{"id":"r-1","inputs":[{"name":"input","shape":[1,4],"datatype":"FP32","data":[0,1.5,-2e3,[4]]}],"outputs":[{"name":"y","parameters":{"binary_data":false}}]}"#,
            r#"{"parameters":{"sequence_id":7},"inputs":[{"name":"a","shape":[2],"datatype":"INT64","data":[1,2]},{"name":"b","shape":[1],"datatype":"BOOL","data":[true],"parameters":{}}],"x":[true,false,null,1.5e-3]}"#,
        ];
        let (mut compared, mut one_pass) = (0, 0);
        for body in bodies {
            for v in &crate::lite::one_byte_away(body) {
                let ours = decode(v);
                assert_eq!(ours, by_serde(v), "{v}");
                compared += 1;
                if ours.is_ok() && crate::lite::read(v.as_bytes()).is_some() {
                    one_pass += 1;
                }
            }
        }
        // Many damaged bodies still decode, and through the one-pass reading.
        assert!(one_pass > 200, "{one_pass} of {compared}");
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let input = |shape: &str, dt: &str, data: &str| {
            format!(
                r#"{{"inputs":[{{"name":"x","shape":{shape},"datatype":"{dt}","data":{data}}}]}}"#
            )
        };
        check("{", Err("invalid inference request: EOF while parsing"));
        check(
            "[]",
            Err("invalid inference request: the body must be a JSON object"),
        );
        check("", Err("invalid inference request: EOF while parsing"));
        check(r#"{"id":"1"}"#, Err("missing field `inputs`"));
        // Wrong types say what was expected, not the decoder's type names;
        // the gateway's precheck words them the same.
        for (body, expected) in [
            (
                r#"{"inputs":[1]}"#,
                "invalid type: integer `1`, expected an input tensor: an object with \"name\"",
            ),
            ("[1]", "the body must be a JSON object"),
            (
                r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]}],"x":"#,
                "EOF while parsing",
            ),
        ] {
            check(body, Err(expected));
            let prechecked = precheck_request(body.as_bytes(), &Limits::default()).unwrap_err();
            assert!(prechecked.0.contains(expected), "{body}: {}", prechecked.0);
        }
        let not_object = serde_json::from_str::<LiteRequest<'_>>("1").err().unwrap();
        assert!(
            not_object
                .to_string()
                .contains("expected an inference request: a JSON object with \"inputs\""),
            "{not_object}"
        );
        check(r#"{"inputs":[]}"#, Err("\"inputs\" is empty"));
        check(
            r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32"}]}"#,
            Err("missing field `data`"),
        );
        check(
            &input("[1]", "FLOAT", "[1]"),
            Err("input \"x\": unknown datatype \"FLOAT\"; use one of BOOL"),
        );
        check(
            &input("[-1]", "FP32", "[1]"),
            Err("input \"x\": shape [-1] has a negative dimension"),
        );
        check(
            &input("[2]", "FP32", "[1]"),
            Err("input \"x\": \"data\" has 1 elements but the shape holds 2"),
        );
        check(
            &input("[1]", "FP32", "[1,2]"),
            Err("input \"x\": bad \"data\": more elements than the shape holds (1)"),
        );
        check(
            &input("[1]", "FP32", "[\"a\"]"),
            Err("element 0: expected a number, found a string"),
        );
        check(
            &input("[2]", "FP32", "[1,null]"),
            Err("element 1: expected a number, found null"),
        );
        check(
            &input("[1]", "FP32", "[{}]"),
            Err("element 0: expected a number, found an object"),
        );
        check(
            &input("[1]", "FP32", "1"),
            Err("\"data\" must be a JSON array of 1 elements, got 1"),
        );
        check(
            &input("[1]", "UINT8", "[256]"),
            Err("element 0: 256 is out of range for UINT8"),
        );
        check(
            &input("[1]", "INT8", "[-129]"),
            Err("-129 is out of range for INT8"),
        );
        check(
            &input("[1]", "INT64", "[1.5]"),
            Err("1.5 is not an integer; INT64 expects integers"),
        );
        check(
            &input("[1]", "BOOL", "[1]"),
            Err("expected true or false, found a number"),
        );
        check(
            &input("[1]", "BYTES", "[1]"),
            Err("expected a string, found a number"),
        );
        check(
            &input("[1001]", "FP32", "[]"),
            Err("holds more elements than the server accepts in one request (1000)"),
        );
        check(
            &input("[4294967296, 4294967296, 4294967296]", "FP32", "[]"),
            Err("holds more elements than the server accepts"),
        );
        // The element budget is shared by all inputs of a request.
        check(
            r#"{"inputs":[{"name":"a","shape":[600],"datatype":"FP32","data":[]},{"name":"b","shape":[600],"datatype":"FP32","data":[]}]}"#,
            Err("input \"b\": shape [600] holds more elements than the server accepts"),
        );
    }

    #[test]
    fn precheck_agrees_with_decode_on_structure() {
        let limits = Limits { max_elements: 1000 };
        let good =
            r#"{"id":"r1","inputs":[{"name":"x","shape":[2],"datatype":"FP32","data":[1,2]}]}"#;
        assert_eq!(
            precheck_request(good.as_bytes(), &limits)
                .unwrap()
                .id
                .as_deref(),
            Some("r1")
        );
        // The sequence a step belongs to, for routing; parameters a
        // replica would refuse read as none, never as a refusal here.
        let step = r#"{"parameters":{"sequence_id":"call-1","sequence_start":true},"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]}]}"#;
        assert_eq!(
            precheck_request(step.as_bytes(), &limits)
                .unwrap()
                .sequence
                .map(|s| s.id),
            Some(crate::sequence::SequenceId::Text("call-1".into()))
        );
        let odd = r#"{"parameters":{"sequence_id":-4},"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]}]}"#;
        assert_eq!(
            precheck_request(odd.as_bytes(), &limits).unwrap().sequence,
            None
        );
        for (body, message) in [
            ("{", "EOF while parsing"),
            ("[]", "must be a JSON object"),
            (r#"{"inputs":[]}"#, "\"inputs\" is empty"),
            (
                r#"{"inputs":[{"name":"x","shape":[2],"datatype":"F32","data":[1,2]}]}"#,
                "unknown datatype \"F32\"",
            ),
            (
                r#"{"inputs":[{"name":"x","shape":[-2],"datatype":"FP32","data":[1,2]}]}"#,
                "negative dimension",
            ),
            (
                r#"{"inputs":[{"name":"x","shape":[2000],"datatype":"FP32","data":[]}]}"#,
                "more elements than the server accepts",
            ),
            (
                r#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP32"}]}"#,
                "missing field `data`",
            ),
        ] {
            let e = precheck_request(body.as_bytes(), &limits).unwrap_err().0;
            assert!(e.contains(message), "{body}: {e}");
        }
    }

    #[test]
    fn request_fields_are_kept() {
        let body = r#"{"id":"req-7","parameters":{"k":1},"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1],"parameters":{"note":"kept"}}],"outputs":[{"name":"y","parameters":{"binary_data":false}}]}"#;
        let r = decode_request(body.as_bytes(), &Limits::default()).unwrap();
        assert_eq!(r.id.as_deref(), Some("req-7"));
        assert_eq!(r.parameters.unwrap()["k"], 1);
        assert_eq!(r.outputs.unwrap()[0].name, "y");
    }

    #[test]
    fn binary_inputs_and_outputs() {
        let mut binary = Vec::new();
        for x in [0.5f32, -1.0, 2.0, 4.0] {
            binary.extend_from_slice(&x.to_le_bytes());
        }
        binary.extend_from_slice(&[1, 0]);
        let json = r#"{"id":"b","parameters":{"binary_data_output":true},"inputs":[
            {"name":"x","shape":[2,2],"datatype":"FP32","parameters":{"binary_data_size":16}},
            {"name":"k","shape":[1],"datatype":"INT64","data":[3]},
            {"name":"m","shape":[2],"datatype":"BOOL","parameters":{"binary_data_size":2}}],
            "outputs":[{"name":"p"},{"name":"label","parameters":{"binary_data":false}}]}"#;
        let mut body = json.as_bytes().to_vec();
        body.extend_from_slice(&binary);
        let len = json.len().to_string();
        let limits = Limits::default();
        let r = decode_request_parts(&body, Some(&len), &limits).unwrap();
        assert_eq!(
            r.inputs,
            vec![
                Tensor::new("x", vec![2, 2], TensorData::Fp32(vec![0.5, -1.0, 2.0, 4.0])).unwrap(),
                Tensor::new("k", vec![1], TensorData::Int64(vec![3])).unwrap(),
                Tensor::new("m", vec![2], TensorData::Bool(vec![true, false])).unwrap(),
            ]
        );
        assert_eq!(
            precheck_request_parts(&body, Some(&len), &limits)
                .unwrap()
                .id
                .as_deref(),
            Some("b")
        );
        // Request-wide binary_data_output, unless an output says otherwise.
        assert!(r.binary_output("p"));
        assert!(!r.binary_output("label"));
        assert!(
            !decode_request(
                br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]}]}"#,
                &limits
            )
            .unwrap()
            .binary_output("p")
        );

        let outputs = vec![
            Tensor::new("p", vec![1, 2], TensorData::Fp32(vec![0.25, 0.75])).unwrap(),
            Tensor::new("label", vec![1], TensorData::Int64(vec![1])).unwrap(),
        ];
        let encoded = encode_response_parts("digits", Some("2"), Some("b"), &outputs, |n| {
            r.binary_output(n)
        });
        let json_len = encoded.json_len.expect("a binary output");
        let head = std::str::from_utf8(&encoded.body[..json_len]).unwrap();
        assert_eq!(
            head,
            r#"{"model_name":"digits","model_version":"2","id":"b","outputs":[{"name":"p","datatype":"FP32","shape":[1,2],"parameters":{"binary_data_size":8}},{"name":"label","datatype":"INT64","shape":[1],"data":[1]}]}"#
        );
        assert_eq!(encoded.body.len(), json_len + 8);
        let back = decode_response_parts(&encoded.body, Some(&json_len.to_string())).unwrap();
        assert_eq!(back.outputs, outputs);
        let plain = encode_response_parts("digits", None, None, &outputs, |_| false);
        assert_eq!(plain.json_len, None);
        assert_eq!(plain.body, encode_response("digits", None, None, &outputs));
    }

    #[test]
    fn bad_binary_requests_say_what_is_wrong() {
        let limits = Limits::default();
        let json = r#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","parameters":{"binary_data_size":8}}]}"#;
        let with = |tail: &[u8]| {
            let mut body = json.as_bytes().to_vec();
            body.extend_from_slice(tail);
            body
        };
        let len = json.len().to_string();
        for (body, header, message) in [
            (
                with(&[0; 4]),
                Some(len.as_str()),
                "binary_data_size is 8 but only 4 bytes",
            ),
            (
                with(&[0; 12]),
                Some(len.as_str()),
                "4 bytes of binary data are left over",
            ),
            (
                with(&[]),
                None,
                "binary_data_size needs the inference-header-content-length header",
            ),
            (with(&[0; 8]), Some("9999"), "the body has only"),
        ] {
            let e = decode_request_parts(&body, header, &limits).unwrap_err().0;
            assert!(e.contains(message), "{e}");
        }
        // Declaring binary data wrongly, or without the length header.
        for (body, header, message) in [
            (
                r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1],"parameters":{"binary_data_size":4}}]}"#,
                Some("0"),
                "set either \"data\" or the \"binary_data_size\" parameter, not both",
            ),
            (
                r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","parameters":{"binary_data_size":4}}]}"#,
                None,
                "binary_data_size needs the inference-header-content-length header",
            ),
            (
                r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","parameters":{"binary_data_size":"4"}}]}"#,
                Some("0"),
                "binary_data_size must be a non-negative integer byte count, got \"4\"",
            ),
            (
                r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]}],"outputs":[{"name":"y","parameters":{"binary_data":"yes"}}]}"#,
                None,
                "output \"y\": \"binary_data\" must be true or false",
            ),
            (
                r#"{"parameters":{"binary_data_output":1},"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]}]}"#,
                None,
                "\"binary_data_output\" must be true or false",
            ),
        ] {
            // A header of "0" would make the JSON part empty; use the real length.
            let len = body.len().to_string();
            let header = header.map(|_| len.as_str());
            let e = decode_request_parts(body.as_bytes(), header, &limits)
                .unwrap_err()
                .0;
            assert!(e.contains(message), "{body}: {e}");
        }
        // `"data": null` is data given, as serde reads it: not with a
        // binary size, even when the binary part holds the bytes.
        let json = br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":null,"parameters":{"binary_data_size":4}}]}"#;
        let len = json.len().to_string();
        let body = [&json[..], &[0, 0, 128, 63]].concat();
        let e = decode_request_parts(&body, Some(&len), &limits)
            .unwrap_err()
            .0;
        assert!(e.contains("not both"), "{e}");
        let mut trailing = br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","parameters":{"binary_data_size":4}}]}"#.to_vec();
        trailing.extend_from_slice(&[0, 0, 128, 63]);
        for e in [
            decode_request_parts(&trailing, None, &limits)
                .unwrap_err()
                .0,
            precheck_request_parts(&trailing, None, &limits)
                .unwrap_err()
                .0,
        ] {
            assert!(
                e.contains("trailing characters")
                    && e.contains("needs the inference-header-content-length header"),
                "{e}"
            );
        }

        // The wrong size for the shape.
        let json = r#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","parameters":{"binary_data_size":4}}]}"#;
        let mut body = json.as_bytes().to_vec();
        body.extend_from_slice(&[0; 4]);
        let e = decode_request_parts(&body, Some(&json.len().to_string()), &limits)
            .unwrap_err()
            .0;
        assert!(e.contains("has 4 bytes but 2 FP32 elements take 8"), "{e}");
        // The gateway's precheck sees a short binary part too.
        let e = precheck_request_parts(&body[..json.len()], Some(&json.len().to_string()), &limits)
            .unwrap_err()
            .0;
        assert!(e.contains("has 4 bytes but 2 FP32 elements take 8"), "{e}");
        // Precheck refuses what decode refuses: leftovers, short parts.
        let json = r#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","parameters":{"binary_data_size":8}}]}"#;
        for (tail, message) in [
            (&[0u8; 12][..], "4 bytes of binary data are left over"),
            (&[0u8; 4][..], "only 4 bytes of binary data remain"),
        ] {
            let mut body = json.as_bytes().to_vec();
            body.extend_from_slice(tail);
            let header = json.len().to_string();
            let e = precheck_request_parts(&body, Some(&header), &limits)
                .unwrap_err()
                .0;
            assert!(e.contains(message), "{e}");
            let e = decode_request_parts(&body, Some(&header), &limits)
                .unwrap_err()
                .0;
            assert!(
                e.contains(message) || e.contains("binary_data_size is 8 but only 4"),
                "{e}"
            );
        }
        // Errors in responses name outputs.
        let e = decode_response_parts(
            br#"{"model_name":"m","outputs":[{"name":"p","shape":[1],"datatype":"FP32"}]}"#,
            None,
        )
        .unwrap_err()
        .0;
        assert!(e.starts_with("output \"p\""), "{e}");
    }

    #[test]
    fn responses_round_trip() {
        let outputs = vec![
            Tensor::new("p", vec![1, 2], TensorData::Fp32(vec![0.25, 0.75])).unwrap(),
            Tensor::new("label", vec![1], TensorData::Int64(vec![1])).unwrap(),
            Tensor::new("h", vec![1], TensorData::Fp16(vec![f16::from_f32(0.5)])).unwrap(),
        ];
        let body = encode_response("digits", Some("2"), Some("abc"), &outputs);
        let text = std::str::from_utf8(&body).unwrap();
        assert_eq!(
            text,
            r#"{"model_name":"digits","model_version":"2","id":"abc","outputs":[{"name":"p","datatype":"FP32","shape":[1,2],"data":[0.25,0.75]},{"name":"label","datatype":"INT64","shape":[1],"data":[1]},{"name":"h","datatype":"FP16","shape":[1],"data":[0.5]}]}"#
        );
        let back = decode_response(&body).unwrap();
        assert_eq!(back.outputs, outputs);
        assert_eq!(back.model_version.as_deref(), Some("2"));
        let no_id = encode_response("digits", None, None, &[]);
        assert_eq!(no_id, br#"{"model_name":"digits","outputs":[]}"#);
    }

    /// Serializes tensor data as a flat JSON array (the serde reference).
    struct DataJson<'a>(&'a TensorData);

    impl Serialize for DataJson<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            match self.0 {
                TensorData::Fp16(v) => s.collect_seq(v.iter().map(|x| x.to_f32())),
                TensorData::Bytes(v) => s.collect_seq(v.iter().map(|b| String::from_utf8_lossy(b))),
                other => with_tensor_data!(other, v => s.collect_seq(v.iter())),
            }
        }
    }

    #[derive(Serialize)]
    struct BinaryParameters {
        binary_data_size: usize,
    }

    #[derive(Serialize)]
    struct WireOutput<'a> {
        name: &'a str,
        datatype: &'static str,
        shape: &'a [usize],
        #[serde(skip_serializing_if = "Option::is_none")]
        parameters: Option<BinaryParameters>,
        #[serde(skip_serializing_if = "Option::is_none")]
        data: Option<DataJson<'a>>,
    }

    /// A request as serde_json wrote it before [`crate::out`].
    fn encode_request_by_serde(request: &DecodedRequest) -> Vec<u8> {
        #[derive(Serialize)]
        struct Out<'a> {
            #[serde(skip_serializing_if = "Option::is_none")]
            id: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            parameters: Option<&'a serde_json::Map<String, serde_json::Value>>,
            inputs: Vec<WireOutput<'a>>,
            #[serde(skip_serializing_if = "Option::is_none")]
            outputs: Option<&'a [RequestOutput]>,
        }
        let out = Out {
            id: request.id.as_deref(),
            parameters: request.parameters.as_ref(),
            inputs: request
                .inputs
                .iter()
                .map(|t| WireOutput {
                    name: &t.name,
                    datatype: t.datatype().as_str(),
                    shape: t.shape(),
                    parameters: None,
                    data: Some(DataJson(t.data())),
                })
                .collect(),
            outputs: request.outputs.as_deref(),
        };
        serde_json::to_vec(&out).unwrap()
    }

    /// A response as serde_json wrote it before [`crate::out`]: the
    /// reference the direct writer is held to.
    fn encode_response_by_serde(
        model_name: &str,
        model_version: Option<&str>,
        id: Option<&str>,
        outputs: &[Tensor],
        binary: impl Fn(&str) -> bool,
    ) -> EncodedResponse {
        #[derive(Serialize)]
        struct WireResponse<'a> {
            model_name: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            model_version: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            id: Option<&'a str>,
            outputs: Vec<WireOutput<'a>>,
        }
        let mut tail = Vec::new();
        let mut any_binary = false;
        let wire = WireResponse {
            model_name,
            model_version,
            id,
            outputs: outputs
                .iter()
                .map(|t| {
                    let (parameters, data) = if binary(&t.name) && crate::binary::fits(t.data()) {
                        any_binary = true;
                        let before = tail.len();
                        crate::binary::encode(t.data(), &mut tail);
                        let binary_data_size = tail.len() - before;
                        (Some(BinaryParameters { binary_data_size }), None)
                    } else {
                        (None, Some(DataJson(t.data())))
                    };
                    WireOutput {
                        name: &t.name,
                        datatype: t.datatype().as_str(),
                        shape: t.shape(),
                        parameters,
                        data,
                    }
                })
                .collect(),
        };
        let mut body = serde_json::to_vec(&wire).unwrap();
        let json_len = any_binary.then_some(body.len());
        body.extend_from_slice(&tail);
        EncodedResponse { body, json_len }
    }

    #[test]
    fn responses_are_written_as_serde_json_writes_them() {
        let tensor = |name: &str, data: TensorData| {
            let n = data.len();
            Tensor::new(name, vec![1, n], data).unwrap()
        };
        let every_type = vec![
            tensor("b", TensorData::Bool(vec![true, false])),
            tensor("u8", TensorData::Uint8(vec![0, 255])),
            tensor("u16", TensorData::Uint16(vec![0, 65_535])),
            tensor("u32", TensorData::Uint32(vec![0, u32::MAX])),
            tensor("u64", TensorData::Uint64(vec![0, u64::MAX])),
            tensor("i8", TensorData::Int8(vec![i8::MIN, -1, 0, i8::MAX])),
            tensor("i16", TensorData::Int16(vec![i16::MIN, 7])),
            tensor("i32", TensorData::Int32(vec![i32::MIN, -42])),
            tensor("i64", TensorData::Int64(vec![i64::MIN, i64::MAX, 0])),
            tensor(
                "f16",
                TensorData::Fp16(vec![
                    f16::from_f32(0.1),
                    f16::INFINITY,
                    f16::NAN,
                    f16::from_f32(-0.0),
                    f16::MAX,
                ]),
            ),
            tensor(
                "f32",
                TensorData::Fp32(vec![
                    0.1,
                    -1.5e-7,
                    3.0e38,
                    f32::MIN_POSITIVE,
                    1.0e-45,
                    f32::NAN,
                    f32::NEG_INFINITY,
                    -0.0,
                    16.0,
                    0.913_472_1,
                ]),
            ),
            tensor(
                "f64",
                TensorData::Fp64(vec![0.1, 1e300, -2.5e-308, f64::INFINITY, 5e-324, 1.0]),
            ),
            tensor(
                "bytes",
                TensorData::Bytes(vec![
                    b"plain".to_vec(),
                    b"quote \" back\\slash".to_vec(),
                    b"tab\tnew\nline\x01\x1f".to_vec(),
                    "caf\u{e9} \u{2028} \u{1f980}".as_bytes().to_vec(),
                    vec![0xff, 0xfe, b'x'],
                    Vec::new(),
                ]),
            ),
            tensor("empty", TensorData::Fp32(Vec::new())),
        ];
        let names = ["digits", "with \"quotes\"", "ctl\u{7}", "mod\u{e8}le", ""];
        let ids = [None, Some("abc"), Some("line\nbreak"), Some("")];
        let versions = [None, Some("1"), Some("v\\2")];
        let binaries: [&dyn Fn(&str) -> bool; 3] =
            [&|_| false, &|n| n.starts_with('f') || n == "bytes", &|_| {
                true
            }];
        for name in names {
            for id in ids {
                for version in versions {
                    for binary in binaries {
                        let ours = encode_response_parts(name, version, id, &every_type, binary);
                        let theirs =
                            encode_response_by_serde(name, version, id, &every_type, binary);
                        assert_eq!(
                            String::from_utf8_lossy(&ours.body),
                            String::from_utf8_lossy(&theirs.body)
                        );
                        assert_eq!(ours, theirs);
                    }
                }
            }
        }
        // A tensor of its own name escaped, alone and binary.
        let odd = vec![tensor("o\"dd\u{0}", TensorData::Fp32(vec![1.0]))];
        for binary in binaries {
            assert_eq!(
                encode_response_parts("m", None, None, &odd, binary),
                encode_response_by_serde("m", None, None, &odd, binary)
            );
        }
    }
}
