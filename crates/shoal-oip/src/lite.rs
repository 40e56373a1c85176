//! A request's structure read in one pass over the body: the gateway's
//! precheck, and the replica's decode before it reads the numbers.
//!
//! The precheck needs a request's id, its parameters and, of each input,
//! the name, datatype, shape, parameters and whether it has data. Reading
//! that with serde cost a gateway about 5k instructions per one-row
//! request (the scan that cuts the data arrays out, a copy of the rest,
//! serde over the copy), a sixth of all it spent forwarding one.
//! [`read`] walks the body once: it follows the JSON grammar strictly
//! outside the data arrays, reads the few fields the precheck needs in
//! place, jumps over each `inputs[i].data` array with `memchr` as
//! [`crate::skim`] does (what is inside is the replica's to check), and
//! hands only `parameters` objects, when there are any, to serde.
//! A decode also gets each tensor's `data` and the request's `outputs` as
//! text (the numbers are read by `crate::numbers`, the outputs by serde):
//! a replica's one-row request read 2.5k instructions faster this way than
//! by the scan and serde over the rest.
//!
//! It reads only the plain form of a request: keys and the strings it
//! reads without escapes or non-ASCII bytes, each known key once, `id` a
//! string, shapes of integers. Anything else (an escape, a duplicate key,
//! a syntax error, a float in a shape) gives `None` and the caller reads
//! the body with serde as before, so every error and every unusual request
//! is answered exactly as serde answers it. The fuzz target and the tests
//! hold [`read`] to that reading: whatever it reads, serde reads the same.

use std::borrow::Cow;

use serde_json::{Map, Value};

/// The most nested containers [`read`] follows before leaving the body to
/// serde (whose own limit is 128).
const MAX_DEPTH: usize = 64;

/// What the precheck needs of a request, and the texts a decode reads.
#[derive(Debug, PartialEq)]
pub(crate) struct Request<'a> {
    pub(crate) id: Option<String>,
    pub(crate) parameters: Option<Map<String, Value>>,
    pub(crate) inputs: Vec<Tensor<'a>>,
    /// The `outputs` member's text, when there is one (read by [`read`]
    /// only: the precheck's serde reading leaves it `None`).
    pub(crate) outputs: Option<&'a [u8]>,
}

/// What the precheck needs of one input.
#[derive(Debug, PartialEq)]
pub(crate) struct Tensor<'a> {
    pub(crate) name: Cow<'a, str>,
    pub(crate) shape: Vec<i64>,
    pub(crate) datatype: Cow<'a, str>,
    /// A `data` member that is not `null`.
    pub(crate) has_data: bool,
    /// The `data` member's text, `null` included, when there is one (read
    /// by [`read`] only, as for [`Request::outputs`]).
    pub(crate) data: Option<&'a [u8]>,
    pub(crate) parameters: Option<Map<String, Value>>,
}

/// The request in `body`, or `None` when the body is not in the plain
/// form this reads (serde's to read, then).
pub(crate) fn read(body: &[u8]) -> Option<Request<'_>> {
    let mut r = Reader { body, at: 0 };
    r.ws();
    r.eat(b'{')?;
    let (mut id, mut parameters, mut inputs, mut outputs) = (None, None, None, None);
    r.members(|r, key| {
        match key {
            b"id" => set_once(&mut id, r.nullable(Reader::string)?)?,
            b"parameters" => set_once(&mut parameters, r.nullable(Reader::parameters)?)?,
            b"inputs" => set_once(&mut inputs, r.inputs()?)?,
            b"outputs" => set_once(&mut outputs, r.text(1)?)?,
            _ => r.skip(1)?,
        }
        Some(())
    })?;
    r.ws();
    if r.at != body.len() {
        return None;
    }
    Some(Request {
        id: id.flatten().map(str::to_owned),
        parameters: parameters.flatten(),
        inputs: inputs?,
        outputs,
    })
}

/// A known key's value, refusing a second one (serde's "duplicate field").
fn set_once<T>(slot: &mut Option<T>, value: T) -> Option<()> {
    if slot.is_some() {
        return None;
    }
    *slot = Some(value);
    Some(())
}

/// A cursor over the body.
struct Reader<'a> {
    body: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn peek(&self) -> Option<u8> {
        self.body.get(self.at).copied()
    }

    /// Skips JSON whitespace.
    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.peek() {
            self.at += 1;
        }
    }

    /// The byte `byte`, consumed.
    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.at += 1)
    }

    /// The rest of an object whose `{` was read: each member's key is
    /// handed to `member`, which reads the value after the colon.
    fn members(&mut self, mut member: impl FnMut(&mut Self, &'a [u8]) -> Option<()>) -> Option<()> {
        self.ws();
        if self.eat(b'}').is_some() {
            return Some(());
        }
        loop {
            self.ws();
            let key = self.bytes()?;
            self.ws();
            self.eat(b':')?;
            self.ws();
            member(self, key)?;
            self.ws();
            match self.peek()? {
                b',' => self.at += 1,
                b'}' => {
                    self.at += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// The rest of an array whose `[` was read: `element` reads each.
    fn elements(&mut self, mut element: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        self.ws();
        if self.eat(b']').is_some() {
            return Some(());
        }
        loop {
            self.ws();
            element(self)?;
            self.ws();
            match self.peek()? {
                b',' => self.at += 1,
                b']' => {
                    self.at += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// `null` as `None`, else the value `read` reads.
    fn nullable<T>(&mut self, read: impl FnOnce(&mut Self) -> Option<T>) -> Option<Option<T>> {
        if self.literal(b"null").is_some() {
            return Some(None);
        }
        read(self).map(Some)
    }

    /// A string of printable ASCII without escapes, quotes excluded.
    fn bytes(&mut self) -> Option<&'a [u8]> {
        self.eat(b'"')?;
        let start = self.at;
        loop {
            match self.peek()? {
                b'"' => break,
                b'\\' | 0..0x20 | 0x80.. => return None,
                _ => self.at += 1,
            }
        }
        self.at += 1;
        Some(&self.body[start..self.at - 1])
    }

    /// [`Reader::bytes`] as text (keys are only compared, never made
    /// text: checking UTF-8 costs more than reading them).
    fn string(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.bytes()?).ok()
    }

    /// A `parameters` object, read by serde (they are few and rare).
    fn parameters(&mut self) -> Option<Map<String, Value>> {
        let start = self.at;
        if self.peek()? != b'{' {
            return None;
        }
        self.skip(1)?;
        serde_json::from_slice(&self.body[start..self.at]).ok()
    }

    /// The `inputs` array.
    fn inputs(&mut self) -> Option<Vec<Tensor<'a>>> {
        self.eat(b'[')?;
        let mut inputs = Vec::new();
        self.elements(|r| {
            inputs.push(r.tensor()?);
            Some(())
        })?;
        Some(inputs)
    }

    /// One input tensor.
    fn tensor(&mut self) -> Option<Tensor<'a>> {
        self.eat(b'{')?;
        let (mut name, mut shape, mut datatype, mut data, mut parameters) =
            (None, None, None, None, None);
        self.members(|r, key| {
            match key {
                b"name" => set_once(&mut name, r.string()?)?,
                b"shape" => set_once(&mut shape, r.shape()?)?,
                b"datatype" => set_once(&mut datatype, r.string()?)?,
                b"data" => set_once(&mut data, r.data()?)?,
                b"parameters" => set_once(&mut parameters, r.nullable(Reader::parameters)?)?,
                _ => r.skip(3)?,
            }
            Some(())
        })?;
        Some(Tensor {
            name: Cow::Borrowed(name?),
            shape: shape?,
            datatype: Cow::Borrowed(datatype?),
            has_data: data.is_some_and(|d| d != b"null"),
            data,
            parameters: parameters.flatten(),
        })
    }

    /// A shape: an array of integers that fit an `i64`.
    fn shape(&mut self) -> Option<Vec<i64>> {
        self.eat(b'[')?;
        let mut shape = Vec::with_capacity(4);
        self.elements(|r| {
            shape.push(r.integer()?);
            Some(())
        })?;
        Some(shape)
    }

    /// An integer as JSON writes it, not followed by a fraction or an
    /// exponent (serde refuses those as an `i64`).
    fn integer(&mut self) -> Option<i64> {
        let negative = self.eat(b'-').is_some();
        let digits = self.at;
        let mut magnitude: i64 = 0;
        while let Some(digit @ b'0'..=b'9') = self.peek() {
            // Past i64::MAX (i64::MIN included): left to serde.
            magnitude = magnitude
                .checked_mul(10)?
                .checked_add(i64::from(digit - b'0'))?;
            self.at += 1;
        }
        let length = self.at - digits;
        if length == 0
            || (length > 1 && self.body[digits] == b'0')
            || matches!(self.peek(), Some(b'.' | b'e' | b'E'))
            // serde reads `-0` as a float.
            || (negative && magnitude == 0)
        {
            return None;
        }
        Some(if negative { -magnitude } else { magnitude })
    }

    /// A tensor's `data`, as text. An array is jumped over without
    /// reading its elements.
    fn data(&mut self) -> Option<&'a [u8]> {
        match self.peek()? {
            b'[' => {
                let start = self.at;
                self.at = crate::skim::array_end(self.body, self.at)? + 1;
                Some(&self.body[start..self.at])
            }
            _ => self.text(3),
        }
    }

    /// Any JSON value, checked by the grammar, as text; `depth` is how deep
    /// it starts.
    fn text(&mut self, depth: usize) -> Option<&'a [u8]> {
        let start = self.at;
        self.skip(depth)?;
        Some(&self.body[start..self.at])
    }

    /// Any JSON value, checked by the grammar and not kept; `depth` is how
    /// deep it starts.
    fn skip(&mut self, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        match self.peek()? {
            b'"' => self.bytes().map(drop),
            b'{' => {
                self.at += 1;
                self.members(|r, _| r.skip(depth + 1))
            }
            b'[' => {
                self.at += 1;
                self.elements(|r| r.skip(depth + 1))
            }
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            _ => self.number(),
        }
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        self.body[self.at..]
            .starts_with(word)
            .then(|| self.at += word.len())
    }

    /// A number by JSON's grammar.
    fn number(&mut self) -> Option<()> {
        self.eat(b'-');
        match self.peek()? {
            b'0' => self.at += 1,
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.eat(b'.').is_some() {
            self.digits1()?;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.at += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.at += 1;
            }
            self.digits1()?;
        }
        Some(())
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.at += 1;
        }
    }

    /// At least one digit.
    fn digits1(&mut self) -> Option<()> {
        let start = self.at;
        self.digits();
        (self.at > start).then_some(())
    }
}

/// Every body one byte away from `body`: each byte cut, or replaced by
/// each byte of JSON's syntax (and two that are not). For tests that hold
/// a fast reading to serde's on damaged input.
#[cfg(test)]
pub(crate) fn one_byte_away(body: &str) -> Vec<String> {
    let mut variants = Vec::new();
    for at in 0..body.len() {
        variants.push([&body[..at], &body[at + 1..]].concat());
        for b in b"{}[],:\"0-.eE ntf\\x" {
            let mut v = body.as_bytes().to_vec();
            v[at] = *b;
            variants.push(String::from_utf8(v).unwrap());
        }
    }
    variants
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What serde reads of `body`, in the same form, through the
    /// precheck's own serde path.
    fn by_serde(body: &str) -> Option<Request<'_>> {
        crate::codec::lite_by_serde(body.as_bytes()).ok()
    }

    /// What [`read`] reads of `body` that the precheck's serde reading
    /// reads too: without the texts only a decode uses.
    fn precheck_part(body: &str) -> Option<Request<'_>> {
        let mut request = read(body.as_bytes())?;
        request.outputs = None;
        for t in &mut request.inputs {
            t.data = None;
        }
        Some(request)
    }

    const PLAIN: &str = r#"{"id":"r-1","inputs":[{"name":"input","shape":[1,64],"datatype":"FP32","data":[0,1.5,-2e3,[4]]}]}"#;

    #[test]
    fn a_plain_request_reads_as_serde_reads_it() {
        let read = precheck_part(PLAIN).unwrap();
        assert_eq!(read.id.as_deref(), Some("r-1"));
        assert_eq!(read.inputs[0].name, "input");
        assert_eq!(read.inputs[0].shape, [1, 64]);
        assert!(read.inputs[0].has_data);
        assert_eq!(Some(read), by_serde(PLAIN));
    }

    #[test]
    fn every_form_it_reads_is_read_as_serde_reads_it() {
        for body in [
            PLAIN,
            " {\n\t\"inputs\" : [ { \"data\" : [ 1 , 2 ] , \"name\" : \"x\", \"shape\":[ ], \"datatype\":\"BYTES\" } ] } \r\n",
            r#"{"inputs":[],"id":null,"parameters":null}"#,
            r#"{"parameters":{"sequence_id":7,"sequence_start":true},"inputs":[{"name":"a","shape":[-1,0,9223372036854775807],"datatype":"INT64","data":null,"parameters":{"binary_data_size":8}}]}"#,
            r#"{"inputs":[{"name":"a","shape":[2],"datatype":"FP32","data":"not an array"}],"outputs":[{"name":"y","parameters":{"binary_data":true}}],"extra":[1.5e-3,-0,true,false,null,{},[]]}"#,
            r#"{"inputs":[{"name":"a","shape":[1],"datatype":"FP32","unknown":{"a":[{"b":"c"}]},"data":{"x":1}}]}"#,
            r#"{"inputs":[{"name":"a","shape":[1],"datatype":"FP32"},{"name":"b","shape":[1],"datatype":"BOOL","data":[true]}]}"#,
        ] {
            let read = precheck_part(body);
            assert!(read.is_some(), "{body}");
            assert_eq!(read, by_serde(body), "{body}");
        }
    }

    #[test]
    fn a_decode_gets_each_data_and_the_outputs_as_text() {
        let body = r#"{"outputs" : [{"name":"y"}] ,"inputs":[{"data":[0, [1.5]],"name":"a","shape":[2],"datatype":"FP32"},{"name":"b","data": null ,"shape":[1],"datatype":"FP32"},{"name":"c","shape":[1],"datatype":"FP32","data":"x]"},{"name":"d","shape":[1],"datatype":"FP32"}]}"#;
        let request = read(body.as_bytes()).unwrap();
        fn text(t: Option<&[u8]>) -> Option<&str> {
            t.map(|t| std::str::from_utf8(t).unwrap())
        }
        assert_eq!(text(request.outputs), Some(r#"[{"name":"y"}]"#));
        let data: Vec<_> = request.inputs.iter().map(|t| text(t.data)).collect();
        assert_eq!(
            data,
            [Some("[0, [1.5]]"), Some("null"), Some(r#""x]""#), None]
        );
        let has: Vec<_> = request.inputs.iter().map(|t| t.has_data).collect();
        assert_eq!(has, [true, false, true, false]);
        assert_eq!(read(br#"{"inputs":[]}"#).unwrap().outputs, None);
        // A second `outputs` is serde's "duplicate field".
        assert_eq!(read(br#"{"inputs":[],"outputs":[],"outputs":[]}"#), None);
    }

    #[test]
    fn what_it_does_not_read_is_left_to_serde() {
        for body in [
            // Escapes, non-ASCII and control characters.
            r#"{"id":"a\"b","inputs":[]}"#,
            r#"{"inputs":[{"name":"é","shape":[1],"datatype":"FP32","data":[1]}]}"#,
            "{\"inputs\":[{\"name\":\"a\tb\",\"shape\":[1],\"datatype\":\"FP32\",\"data\":[1]}]}",
            r#"{"in\u0070uts":[]}"#,
            // Duplicates, missing fields, wrong types.
            r#"{"inputs":[],"inputs":[]}"#,
            r#"{"inputs":[{"name":"a","name":"b","shape":[1],"datatype":"FP32"}]}"#,
            r#"{"id":"x"}"#,
            r#"{"inputs":[{"shape":[1],"datatype":"FP32","data":[1]}]}"#,
            r#"{"inputs":null}"#,
            r#"{"id":5,"inputs":[]}"#,
            r#"{"inputs":[{"name":"a","shape":[1.0],"datatype":"FP32"}]}"#,
            r#"{"inputs":[{"name":"a","shape":[1e2],"datatype":"FP32"}]}"#,
            r#"{"inputs":[{"name":"a","shape":[01],"datatype":"FP32"}]}"#,
            r#"{"inputs":[{"name":"a","shape":[-0],"datatype":"FP32"}]}"#,
            r#"{"inputs":[{"name":"a","shape":[-9223372036854775808],"datatype":"FP32"}]}"#,
            r#"{"inputs":[{"name":"a","shape":[9223372036854775808],"datatype":"FP32"}]}"#,
            r#"{"inputs":[],"parameters":[1]}"#,
            // Syntax.
            r#"{"inputs":[],}"#,
            r#"{"inputs":[] "id":"x"}"#,
            r#"{"inputs":[]} x"#,
            r#"{"inputs":[],"x":01}"#,
            r#"{"inputs":[],"x":1.}"#,
            r#"{"inputs":[],"x":tru}"#,
            r#"{"inputs":[],"x":[1,]}"#,
            r#"{"inputs":[{"name":"a","shape":[1],"datatype":"FP32","data":[1,2}]}"#,
            "{\"inputs\":[]}\u{c}",
            "",
        ] {
            assert_eq!(read(body.as_bytes()), None, "{body}");
        }
        // Deeper than it follows.
        let deep = format!(
            r#"{{"inputs":[],"x":{}{}}}"#,
            "[".repeat(MAX_DEPTH + 1),
            "]".repeat(MAX_DEPTH + 1)
        );
        assert_eq!(read(deep.as_bytes()), None);
    }

    #[test]
    fn whatever_it_reads_of_a_damaged_body_serde_reads_the_same() {
        // Every body one byte away from a plain one (each byte cut, or
        // replaced by each byte of JSON's syntax): when the reading takes
        // it, serde reads the same; when serde refuses it, so does the
        // reading.
        let bodies = [
            PLAIN,
            r#"{"parameters":{"sequence_id":7},"inputs":[{"name":"a","shape":[2,-1],"datatype":"INT64","data":null,"parameters":{"binary_data_size":8}}],"outputs":[{"name":"y"}],"x":[true,false,null,1.5e-3]}"#,
        ];
        let mut read_by_both = 0;
        for body in bodies {
            for v in &one_byte_away(body) {
                let ours = precheck_part(v);
                let serde = by_serde(v);
                if ours.is_some() {
                    assert_eq!(ours, serde, "{v}");
                    read_by_both += 1;
                }
            }
        }
        // The comparison is not empty: many damaged bodies still read.
        assert!(read_by_both > 200, "{read_by_both}");
    }
}
