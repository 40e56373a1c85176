//! Responses' (and Shoal's own clients' requests') JSON written
//! directly, byte for byte what serde_json writes.
//!
//! serde_json's writer went through its generic serializer for every key,
//! string and number: about 6k instructions for a digits answer (two
//! outputs, eleven numbers), a tenth of all a replica spent on a one-row
//! request, most of it checking constant keys for characters to escape
//! and the per-element dispatch. Here the keys are constants, a string is
//! copied as it is when it has nothing to escape (serde_json writes the
//! rest), numbers go straight to `zmij` and `itoa` (the formatters
//! serde_json itself calls), and non-finite floats are `null` as there.
//! The tests hold the output to serde_json's, byte for byte.

use half::f16;
use shoal_core::{Tensor, TensorData};

/// `s` as a JSON string.
pub(crate) fn string(out: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        // Escapes are serde_json's to write: writing a `str` into a `Vec`
        // cannot fail.
        serde_json::to_writer(&mut *out, s).unwrap_or_default();
    }
}

/// An unsigned integer.
pub(crate) fn unsigned(out: &mut Vec<u8>, value: usize) {
    out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
}

/// A tensor object's opening up to its shape: `{"name":…,"datatype":…,
/// "shape":[…]`; the caller adds `parameters` or `data` and the `}`.
pub(crate) fn tensor_head(out: &mut Vec<u8>, tensor: &Tensor) {
    out.extend_from_slice(br#"{"name":"#);
    string(out, &tensor.name);
    // Datatype names need no escaping.
    out.extend_from_slice(br#","datatype":""#);
    out.extend_from_slice(tensor.datatype().as_str().as_bytes());
    out.extend_from_slice(br#"","shape":["#);
    integers(out, tensor.shape());
    out.push(b']');
}

/// Tensor data as a flat JSON array.
pub(crate) fn data(out: &mut Vec<u8>, data: &TensorData) {
    out.push(b'[');
    match data {
        TensorData::Bool(v) => each(out, v, |out, b| {
            out.extend_from_slice(if *b { b"true" } else { b"false" });
        }),
        TensorData::Uint8(v) => integers(out, v),
        TensorData::Uint16(v) => integers(out, v),
        TensorData::Uint32(v) => integers(out, v),
        TensorData::Uint64(v) => integers(out, v),
        TensorData::Int8(v) => integers(out, v),
        TensorData::Int16(v) => integers(out, v),
        TensorData::Int32(v) => integers(out, v),
        TensorData::Int64(v) => integers(out, v),
        TensorData::Fp16(v) => each(out, v, |out, x| {
            let x = f16::to_f32(*x);
            float(out, x, x.is_finite());
        }),
        TensorData::Fp32(v) => each(out, v, |out, x| float(out, *x, x.is_finite())),
        TensorData::Fp64(v) => each(out, v, |out, x| float(out, *x, x.is_finite())),
        TensorData::Bytes(v) => each(out, v, |out, b| {
            string(out, &String::from_utf8_lossy(b));
        }),
    }
    out.push(b']');
}

/// Each of `values` written by `write`, comma-separated.
#[inline(always)]
fn each<T>(out: &mut Vec<u8>, values: &[T], mut write: impl FnMut(&mut Vec<u8>, &T)) {
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write(out, v);
    }
}

fn integers<T: itoa::Integer + Copy>(out: &mut Vec<u8>, values: &[T]) {
    let mut buffer = itoa::Buffer::new();
    each(out, values, |out, v| {
        out.extend_from_slice(buffer.format(*v).as_bytes());
    });
}

/// A float as serde_json writes it: its shortest round-trip form, `null`
/// when it is not `finite`.
#[inline(always)]
fn float<F: zmij::Float>(out: &mut Vec<u8>, x: F, finite: bool) {
    if finite {
        out.extend_from_slice(zmij::Buffer::new().format_finite(x).as_bytes());
    } else {
        out.extend_from_slice(b"null");
    }
}
