//! A fast path for the common tensor: a JSON array of plain numbers.
//!
//! Almost every request's data is an array (perhaps nested) of numbers.
//! serde_json reads each through its generic value machinery, about 22 ns a
//! number here, which made parsing the largest part of a small model's
//! inference. [`flat`] reads such an array directly: a byte loop that
//! checks JSON's number grammar and accumulates the digits; a short decimal
//! is one exact division (Clinger's fast path), anything longer or with an
//! exponent goes to `fast-float2` (correctly rounded), and tokens longer
//! than [`MAX_TOKEN`] to serde. It gives each number to the element type
//! exactly as serde_json would (an unsigned, signed or float value, by the
//! same rules, `-0` as a float) so both readings agree. Anything else, a string, a bad token, an
//! element out of range, the wrong count, makes it give up (`None`) and the
//! caller parses the text with serde_json, whose errors say what is wrong.

/// The deepest nesting followed here; deeper arrays (no model's tensor
/// has such a rank) take the slow path, which applies serde_json's limit.
const MAX_DEPTH: usize = 64;

/// The longest float token read here (a double's shortest form is at most
/// 24 bytes); longer ones go the slow path.
const MAX_TOKEN: usize = 64;

/// One JSON number, as serde_json hands it to a visitor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Number {
    /// A non-negative integer that fits in 64 bits.
    Unsigned(u64),
    /// A negative integer that fits in 64 bits.
    Signed(i64),
    /// Anything else: a fraction, an exponent, `-0`, an integer too large.
    Float(f64),
}

/// A tensor element that can be read from a [`Number`].
pub(crate) trait FromNumber: Sized {
    /// The element for `n`, or `None` when it does not fit (the caller's
    /// slow path says why).
    fn from_number(n: Number) -> Option<Self>;
}

/// The `count` numbers of the JSON array `text` (nested arrays flattened),
/// or `None` when `text` is anything but a well-formed array of exactly
/// `count` numbers that each fit `T`.
pub(crate) fn flat<T: FromNumber>(text: &[u8], count: usize) -> Option<Vec<T>> {
    let mut i = skip_space(text, 0);
    if text.get(i) != Some(&b'[') {
        return None;
    }
    i += 1;
    let mut depth = 1usize;
    // Each number takes at least two bytes (digit and comma) but the last.
    let mut out = Vec::with_capacity(count.min(text.len() / 2 + 1));
    // At the top of this loop a value may come, or `]` when the array was
    // just opened (not after a comma).
    let mut opened = true;
    'value: loop {
        i = skip_space(text, i);
        match *text.get(i)? {
            b'[' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return None;
                }
                i += 1;
                opened = true;
                continue 'value;
            }
            b']' if opened => {
                // An empty array: a value of no elements.
                depth -= 1;
                i += 1;
            }
            _ => {
                if out.len() == count {
                    return None;
                }
                let (n, len) = number(&text[i..])?;
                out.push(T::from_number(n)?);
                i += len;
                // The usual separator, `,` or `, ` then a number: straight
                // on to it.
                if text.get(i) == Some(&b',') {
                    i += 1;
                    if text.get(i) == Some(&b' ') {
                        i += 1;
                    }
                    opened = false;
                    continue 'value;
                }
            }
        }
        // After a value: a comma, or the ends of the arrays it closes.
        while depth > 0 {
            i = skip_space(text, i);
            match *text.get(i)? {
                b',' => {
                    i += 1;
                    opened = false;
                    continue 'value;
                }
                b']' => {
                    depth -= 1;
                    i += 1;
                }
                _ => return None,
            }
        }
        break;
    }
    (skip_space(text, i) == text.len() && out.len() == count).then_some(out)
}

/// The index of the first byte at or after `i` that is not JSON whitespace.
#[inline(always)]
fn skip_space(text: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\n' | b'\r' | b'\t') = text.get(i) {
        i += 1;
    }
    i
}

/// The end of the run of digits starting at `i`, and their value (wrapped
/// past 19 digits: the caller counts them). A run longer than four digits
/// (the fractions of floats that clients print in full, 15–17 digits)
/// continues eight digits at a time; short ones never pay for trying.
#[inline(always)]
fn digits(s: &[u8], mut i: usize, mut value: u64) -> (usize, u64) {
    let start = i;
    while let Some(&c) = s.get(i) {
        let d = c.wrapping_sub(b'0');
        if d > 9 {
            return (i, value);
        }
        value = value.wrapping_mul(10).wrapping_add(u64::from(d));
        i += 1;
        if i - start == 4 {
            return long_digits(s, i, value);
        }
    }
    (i, value)
}

/// [`digits`] past its first four: eight at a time while eight follow,
/// then one at a time. Arithmetic wraps as one digit at a time would.
#[inline(never)]
fn long_digits(s: &[u8], mut i: usize, mut value: u64) -> (usize, u64) {
    while let Some(eight) = s.get(i..i + 8).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
        let Some(v) = eight_digits(u64::from_le_bytes(eight)) else {
            break;
        };
        value = value.wrapping_mul(100_000_000).wrapping_add(v);
        i += 8;
    }
    while let Some(&c) = s.get(i) {
        let d = c.wrapping_sub(b'0');
        if d > 9 {
            break;
        }
        value = value.wrapping_mul(10).wrapping_add(u64::from(d));
        i += 1;
    }
    (i, value)
}

/// The value of eight ASCII digits read as a little-endian word (the
/// first digit in the lowest byte), or `None` unless all eight are
/// digits: the usual SWAR steps, pairs, then fours, then the eight.
#[inline(always)]
fn eight_digits(word: u64) -> Option<u64> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    // A byte below '0' borrows into its high bit when '0' is taken away;
    // one above '9' carries into it when 0x46 ('9' + 0x46 = 0x7f) is added.
    if (word.wrapping_sub(ONES * u64::from(b'0')) | word.wrapping_add(ONES * 0x46)) & (ONES * 0x80)
        != 0
    {
        return None;
    }
    // Byte k of `digits` is digit k, the most significant first. Products
    // spill past the top lane and wrap: only the lanes kept are read.
    let digits = word - ONES * u64::from(b'0');
    // Byte 2k: ten times digit 2k plus digit 2k + 1.
    let pairs = (digits * 10 + (digits >> 8)) & 0x00ff_00ff_00ff_00ff;
    // 16-bit lane 2k + 1 (moved down to 2k): a hundred times pair 2k plus
    // pair 2k + 1.
    let fours = (pairs.wrapping_mul(1 + (100 << 16)) >> 16) & 0x0000_ffff_0000_ffff;
    // The upper 32 bits: ten thousand times the first four plus the second.
    Some(fours.wrapping_mul(1 + (10_000 << 32)) >> 32)
}

/// The JSON number at the start of `s` and its length in bytes, or `None`
/// when `s` does not start with one.
#[inline(always)]
pub(crate) fn number(s: &[u8]) -> Option<(Number, usize)> {
    let negative = s.first() == Some(&b'-');
    let start = usize::from(negative);
    // Every digit, integer and fraction, goes into `mantissa`; it is exact
    // while there are at most 19 of them.
    let (i, mantissa) = digits(s, start, 0);
    let integer_digits = i - start;
    // One zero, or digits not starting with zero.
    if integer_digits == 0 || (integer_digits > 1 && s[start] == b'0') {
        return None;
    }
    let (i, mantissa, fraction_digits) = if s.get(i) == Some(&b'.') {
        let (end, mantissa) = digits(s, i + 1, mantissa);
        if end == i + 1 {
            return None;
        }
        (end, mantissa, end - i - 1)
    } else {
        (i, mantissa, 0)
    };
    if let Some(b'e' | b'E') = s.get(i) {
        return with_exponent(s, i);
    }
    let n = if integer_digits + fraction_digits > 19 {
        return long(s, i, fraction_digits == 0);
    } else if fraction_digits > 0 {
        // Unsigned: the sign is applied below.
        let v = match divided(mantissa, fraction_digits) {
            Some(v) => v,
            None => parse_float(&s[start..i])?,
        };
        Number::Float(if negative { -v } else { v })
    } else {
        // serde_json's rules: a non-negative integer is unsigned, a
        // negative one signed when it fits, `-0` a float.
        integer(mantissa, negative)
    };
    Some((n, i))
}

/// A non-negative integer as unsigned, a negative one as signed when it
/// fits, as a float otherwise (`-0` included), as serde_json reads them.
#[inline(always)]
fn integer(magnitude: u64, negative: bool) -> Number {
    #[allow(clippy::cast_precision_loss)]
    match negative {
        false => Number::Unsigned(magnitude),
        true if magnitude != 0 && magnitude <= 1 << 63 => {
            Number::Signed(0i64.wrapping_sub_unsigned(magnitude))
        }
        true => Number::Float(-(magnitude as f64)),
    }
}

/// A number of more than 19 digits ending at `end`.
#[cold]
fn long(s: &[u8], end: usize, integral: bool) -> Option<(Number, usize)> {
    let text = std::str::from_utf8(&s[..end]).ok()?;
    let negative = text.starts_with('-');
    if integral && let Ok(magnitude) = text.trim_start_matches('-').parse::<u64>() {
        return Some((integer(magnitude, negative), end));
    }
    Some((Number::Float(parse_float(text.as_bytes())?), end))
}

/// A number with an exponent, whose mantissa ends at `e`.
#[cold]
fn with_exponent(s: &[u8], e: usize) -> Option<(Number, usize)> {
    let mut i = e + 1;
    if let Some(b'+' | b'-') = s.get(i) {
        i += 1;
    }
    let (end, _) = digits(s, i, 0);
    if end == i {
        return None;
    }
    Some((Number::Float(parse_float(&s[..end])?), end))
}

/// A float token, correctly rounded; `None` out of f64's range (serde_json
/// refuses it, and so does the slow path the caller falls back to).
#[cold]
#[inline(never)]
fn parse_float(token: &[u8]) -> Option<f64> {
    // fast-float2 stops reading an exponent's digits at 65,536, which a
    // number padded with thousands of digits can reach past ("1" and 65,535
    // zeros, then "e-655360"); no encoder writes a tensor element longer
    // than this, so such tokens are left to serde.
    if token.len() > MAX_TOKEN {
        return None;
    }
    fast_float2::parse::<f64, _>(token)
        .ok()
        .filter(|v| v.is_finite())
}

/// `mantissa` ÷ 10^`fraction_digits` when both are exact in an f64 (a
/// mantissa below 2^53, a power of ten up to 10^22): one correctly rounded
/// division then gives the correctly rounded value (Clinger's fast path,
/// which short decimals like `0.0625` or `13.0` always take).
#[inline(always)]
fn divided(mantissa: u64, fraction_digits: usize) -> Option<f64> {
    const POWERS: [f64; 23] = [
        1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
        1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
    ];
    if mantissa >= 1 << 53 {
        return None;
    }
    #[allow(clippy::cast_precision_loss)]
    Some(mantissa as f64 / POWERS.get(fraction_digits)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What serde_json hands a visitor for `text`.
    fn serde_number(text: &str) -> Option<Number> {
        match serde_json::from_str::<serde_json::Value>(text).ok()? {
            serde_json::Value::Number(n) => Some(if let Some(u) = n.as_u64() {
                Number::Unsigned(u)
            } else if let Some(i) = n.as_i64() {
                Number::Signed(i)
            } else {
                Number::Float(n.as_f64()?)
            }),
            _ => None,
        }
    }

    #[test]
    fn numbers_read_as_serde_json_reads_them() {
        for text in [
            "0",
            "-0",
            "7",
            "-7",
            "0.5",
            "-0.0",
            "16.0",
            "1e3",
            "1E+3",
            "2.5e-3",
            "-1.25E-10",
            "18446744073709551615",
            "18446744073709551616",
            "-9223372036854775808",
            "-9223372036854775809",
            "123456789012345678901234567890",
            "123456789012345678901",
            "3.4028235e38",
            "1e400",
            "4.9e-324",
            "0.1",
            "0.30000000000000004",
            // Beyond Clinger's fast path (a mantissa of 2^53 or more), signed.
            "-0.009985063225030899",
            "0.009985063225030899",
            "-123.45",
            // As Python prints float32 values: 16 and 17 digits.
            "13.558939933776855",
            "2.1498279571533203",
            "-0.30000001192092896",
            "12345678.90123456",
            "0.1234567",
            "1234.5678e-2",
            "99999999999999999",
        ] {
            let ours = number(text.as_bytes()).map(|(n, len)| {
                assert_eq!(len, text.len(), "{text}");
                n
            });
            let theirs = serde_number(text);
            match (ours, theirs) {
                (Some(Number::Float(a)), Some(Number::Float(b))) => {
                    assert_eq!(a.to_bits(), b.to_bits(), "{text}: {a} against {b}");
                }
                (a, b) => assert_eq!(a, b, "{text}"),
            }
        }
    }

    #[test]
    fn eight_digits_at_a_time_read_as_one_at_a_time() {
        let word = |text: &[u8; 8]| u64::from_le_bytes(*text);
        assert_eq!(eight_digits(word(b"12345678")), Some(12_345_678));
        assert_eq!(eight_digits(word(b"00000000")), Some(0));
        assert_eq!(eight_digits(word(b"99999999")), Some(99_999_999));
        assert_eq!(eight_digits(word(b"00000001")), Some(1));
        assert_eq!(eight_digits(word(b"10000000")), Some(10_000_000));
        for at in 0..8 {
            for byte in [
                b'/',
                b':',
                b'.',
                b'e',
                b' ',
                b',',
                0,
                0x80,
                0xff,
                b'0' + 0x80,
            ] {
                let mut text = *b"12345678";
                text[at] = byte;
                assert_eq!(eight_digits(word(&text)), None, "{text:?}");
            }
        }
        // Runs of every length, wrapping past 19 digits as one at a time.
        let one_at_a_time = |text: &[u8]| {
            text.iter()
                .take_while(|c| c.is_ascii_digit())
                .fold((0, 0u64), |(n, v), c| {
                    (n + 1, v.wrapping_mul(10).wrapping_add(u64::from(c - b'0')))
                })
        };
        let all = b"98765432109876543210987654321x";
        for start in 0..all.len() {
            for end in start..=all.len() {
                let text = &all[start..end];
                assert_eq!(
                    digits(text, 0, 7),
                    {
                        let (n, v) = one_at_a_time(text);
                        (
                            n,
                            (0..n).fold(7u64, |a, _| a.wrapping_mul(10)).wrapping_add(v),
                        )
                    },
                    "{:?}",
                    std::str::from_utf8(text)
                );
            }
        }
    }

    #[test]
    fn what_json_does_not_allow_is_not_a_number() {
        for text in [
            "", "-", "+1", "01", "-01", ".5", "1.", "1.e3", "1e", "1e+", "inf", "NaN", "-inf",
            "0x10",
        ] {
            let read = number(text.as_bytes());
            assert!(
                read.is_none_or(|(_, len)| len < text.len()),
                "{text:?} read as {read:?}"
            );
        }
    }

    /// A plain float element, as FP64's.
    #[derive(Debug, PartialEq)]
    struct F(f64);

    impl FromNumber for F {
        fn from_number(n: Number) -> Option<F> {
            #[allow(clippy::cast_precision_loss)]
            Some(F(match n {
                Number::Unsigned(v) => v as f64,
                Number::Signed(v) => v as f64,
                Number::Float(v) => v,
            }))
        }
    }

    fn floats(text: &str, count: usize) -> Option<Vec<f64>> {
        flat::<F>(text.as_bytes(), count).map(|v| v.into_iter().map(|F(x)| x).collect())
    }

    #[test]
    fn arrays_flatten_and_anything_else_is_given_up() {
        assert_eq!(
            floats(" [ [1, 2.5] ,\n[-3,\t4e1] ] ", 4),
            Some(vec![1.0, 2.5, -3.0, 40.0])
        );
        for text in [
            "[1, 2]", "[1,2]", "[1,  2]", "[1, \n2]", "[1 , 2 ]", "[1, [2]]",
        ] {
            assert_eq!(floats(text, 2), Some(vec![1.0, 2.0]), "{text}");
        }
        assert_eq!(floats("[]", 0), Some(vec![]));
        assert_eq!(floats("[[],[1]]", 1), Some(vec![1.0]));
        for text in [
            "[1,2]x", "[1,2", "[1,,2]", "[,1]", "[1,]", "[1 2]", "1", "[[1],2", "[1]]", "[true]",
            "[\"1\"]", "[null]", "[1,2,3]", "[1]", "{}", "[01]", "[1, ]", "[1, ,2]", "[1,  ]",
            "[1, 2,]",
        ] {
            assert_eq!(floats(text, 2), None, "{text}");
        }
        let nested = |depth: usize| format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
        assert_eq!(floats(&nested(MAX_DEPTH), 1), Some(vec![1.0]));
        assert_eq!(floats(&nested(MAX_DEPTH + 1), 1), None);
    }
}
