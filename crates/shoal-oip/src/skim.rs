//! Finding the tensor data in a request body without parsing it, for a
//! precheck that needs everything but the numbers.
//!
//! A gateway checks a request's structure (inputs, datatypes, shapes, the
//! element budget, a sequence's parameters) before routing it, and leaves
//! the tensor data to the replica. A JSON parser skipping the data still
//! reads every number: about 10 ns each here, so a 256-row digits batch
//! (16,384 numbers) cost the gateway ≈ 0.2 ms before it was sent anywhere.
//! [`without_data`] scans the body's structure (strings, brackets and
//! braces: no number is read) and jumps over each `inputs[i].data` array
//! with `memchr`, returning the body with those arrays emptied; the
//! precheck parses that instead. The scan is lenient: it only has to find
//! the arrays, and anything it cannot follow (a syntax error, a key
//! written with escapes) makes it give up, so the caller parses the body as
//! it came and reports errors exactly as before. What is inside a data
//! array is the replica's to check.

use std::ops::Range;

/// `body` with the contents of every `inputs[i].data` array removed
/// (`"data":[…]` becomes `"data":[]`), or `None` when there is nothing to
/// remove or the scan cannot follow the body.
pub fn without_data(body: &[u8]) -> Option<Vec<u8>> {
    split(body).map(|(skeleton, _)| skeleton)
}

/// [`without_data`]'s body, and the byte ranges of `body` holding each
/// removed array, brackets included, in order: a replica parses the rest
/// with serde and each array with [`crate::numbers`].
pub(crate) fn split(body: &[u8]) -> Option<(Vec<u8>, Vec<Range<usize>>)> {
    let spans = data_spans(body)?;
    if spans.is_empty() {
        return None;
    }
    let removed: usize = spans.iter().map(|s| s.len()).sum();
    let mut out = Vec::with_capacity(body.len() - removed);
    let mut at = 0;
    for span in &spans {
        out.extend_from_slice(&body[at..span.start]);
        at = span.end;
    }
    out.extend_from_slice(&body[at..]);
    let arrays = spans.into_iter().map(|s| s.start - 1..s.end + 1).collect();
    Some((out, arrays))
}

/// What an open container is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frame {
    /// An object, and whether the next string in it is a key.
    Object {
        expect_key: bool,
    },
    Array,
}

/// The byte ranges strictly inside each `inputs[i].data` array (between
/// its brackets), in order; `None` if the body does not scan.
fn data_spans(body: &[u8]) -> Option<Vec<Range<usize>>> {
    let mut spans = Vec::new();
    let mut stack: Vec<Frame> = Vec::with_capacity(8);
    // The last key read at each object depth of the path root → inputs[i].
    let mut root_key: &[u8] = b"";
    let mut tensor_key: &[u8] = b"";
    let mut i = 0;
    while i < body.len() {
        match body[i] {
            b'"' => {
                let end = string_end(body, i)?;
                if let Some(Frame::Object { expect_key }) = stack.last_mut()
                    && *expect_key
                {
                    *expect_key = false;
                    let key = &body[i + 1..end];
                    match stack.len() {
                        1 => root_key = key,
                        3 => tensor_key = key,
                        _ => {}
                    }
                }
                i = end + 1;
            }
            b'{' => {
                stack.push(Frame::Object { expect_key: true });
                i += 1;
            }
            b'[' => {
                let in_tensor = stack
                    == [
                        Frame::Object { expect_key: false },
                        Frame::Array,
                        Frame::Object { expect_key: false },
                    ];
                if in_tensor && root_key == b"inputs" && tensor_key == b"data" {
                    let end = array_end(body, i)?;
                    spans.push(i + 1..end);
                    i = end + 1;
                } else {
                    stack.push(Frame::Array);
                    i += 1;
                }
            }
            b'}' => {
                if stack.pop()? != (Frame::Object { expect_key: false })
                    && body[..i].iter().rev().find(|b| !b.is_ascii_whitespace()) != Some(&b'{')
                {
                    return None;
                }
                i += 1;
            }
            b']' => {
                if stack.pop()? != Frame::Array {
                    return None;
                }
                i += 1;
            }
            b',' => {
                if let Some(Frame::Object { expect_key }) = stack.last_mut() {
                    *expect_key = true;
                }
                i += 1;
            }
            _ => i += 1,
        }
    }
    stack.is_empty().then_some(spans)
}

/// The index of the quote closing the string whose opening quote is at
/// `start`.
fn string_end(body: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    loop {
        i += memchr::memchr2(b'"', b'\\', body.get(i..)?)?;
        if body[i] == b'"' {
            return Some(i);
        }
        // An escape: skip the backslash and the character it escapes.
        i += 2;
    }
}

/// The index of the bracket closing the array opened at `start`, nested
/// arrays and strings included.
pub(crate) fn array_end(body: &[u8], start: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut i = start;
    loop {
        i += memchr::memchr3(b'[', b']', b'"', body.get(i..)?)?;
        match body[i] {
            b'[' => depth += 1,
            b']' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => i = string_end(body, i)?,
        }
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn skim(body: &str) -> Option<String> {
        without_data(body.as_bytes()).map(|b| String::from_utf8(b).unwrap())
    }

    #[test]
    fn every_inputs_data_array_is_emptied() {
        let body = r#"{"id":"a[","inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[[1,2.5e3],[3,-4]]},{"data":["a]\"[",[]],"name":"s"}],"outputs":[{"name":"y"}]}"#;
        assert_eq!(
            skim(body).unwrap(),
            r#"{"id":"a[","inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[]},{"data":[],"name":"s"}],"outputs":[{"name":"y"}]}"#
        );
        // Whitespace anywhere, as encoders write it.
        let spaced = "{ \"inputs\" : [ { \"data\" : [ 1 , 2 ] , \"name\" : \"x\" } ] }";
        assert_eq!(
            skim(spaced).unwrap(),
            "{ \"inputs\" : [ { \"data\" : [] , \"name\" : \"x\" } ] }"
        );
    }

    #[test]
    fn only_the_data_of_inputs_is_touched() {
        // A "data" key elsewhere (parameters, outputs, nested deeper) stays.
        for body in [
            r#"{"parameters":{"data":[1,2]},"inputs":[{"name":"x","parameters":{"data":[3]}}]}"#,
            r#"{"outputs":[{"data":[1]}],"inputs":[]}"#,
            r#"{"inputs":[[{"data":[1]}]]}"#,
            r#"{"inputs":[{"name":"data","shape":[1]}]}"#,
            r#"{"inputs":[{"data":1}]}"#,
        ] {
            assert_eq!(skim(body), None, "{body}");
        }
        // A key "data" given as a string value is not a key.
        assert_eq!(skim(r#"{"inputs":[{"name":"data","x":[1]}]}"#), None);
    }

    #[test]
    fn what_the_scan_cannot_follow_is_left_to_the_parser() {
        for body in [
            r#"{"inputs":[{"data":[1,2]}"#,
            r#"{"inputs":[{"data":[1,2}]}"#,
            r#"{"inputs":[{"data":["unterminated]}]}"#,
            r#"{"inputs":[{"data":[1]}]]}"#,
            r#"{"inputs":[{"data":[1],}]}"#,
            r#"}{"inputs":[{"data":[1]}]}"#,
            "",
            "\"",
        ] {
            assert_eq!(skim(body), None, "{body}");
        }
    }

    #[test]
    fn what_it_keeps_parses_as_the_original_does_without_data() {
        let body = serde_json::json!({
            "id": "r\"1",
            "parameters": {"sequence_id": 7, "data": [1, 2]},
            "inputs": [
                {"name": "a", "shape": [1, 3], "datatype": "FP32", "data": [0.5, 1e-3, -2]},
                {"name": "b", "shape": [2], "datatype": "BYTES", "data": ["x]", "\\\"["]},
            ],
        });
        let skimmed: serde_json::Value =
            serde_json::from_slice(&without_data(body.to_string().as_bytes()).unwrap()).unwrap();
        let mut expected = body.clone();
        for input in expected["inputs"].as_array_mut().unwrap() {
            input["data"] = serde_json::json!([]);
        }
        assert_eq!(skimmed, expected);
    }
}
