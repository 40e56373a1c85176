//! Validated names for models and versions.
//!
//! Names travel in URLs, file names, metric labels and database keys, so they
//! are restricted to a safe alphabet once, here, instead of being escaped in
//! every one of those places.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest accepted model name or version, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// Why a model name or version was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty.
    #[error("{what} must not be empty")]
    Empty {
        /// "model name" or "version".
        what: &'static str,
    },
    /// The name is longer than [`MAX_NAME_LEN`].
    #[error("{what} is {len} bytes long; the limit is {MAX_NAME_LEN}")]
    TooLong {
        /// "model name" or "version".
        what: &'static str,
        /// Length of the refused name.
        len: usize,
    },
    /// The name contains a character outside `[A-Za-z0-9._-]` or starts with `.` or `-`.
    #[error(
        "{what} {value:?} may only contain letters, digits, '.', '_' and '-', and must start with a letter, digit or '_'"
    )]
    BadCharacter {
        /// "model name" or "version".
        what: &'static str,
        /// The refused name.
        value: String,
    },
    /// A `model:version` key without its version.
    #[error("{value:?} must name a model and a version, as in digits:2")]
    NoVersion {
        /// The refused key.
        value: String,
    },
}

fn validate(what: &'static str, value: &str) -> Result<(), NameError> {
    if value.is_empty() {
        return Err(NameError::Empty { what });
    }
    if value.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong {
            what,
            len: value.len(),
        });
    }
    let first_ok = value
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_');
    let rest_ok = value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if first_ok && rest_ok {
        Ok(())
    } else {
        Err(NameError::BadCharacter {
            what,
            value: value.to_owned(),
        })
    }
}

macro_rules! name_type {
    ($(#[$doc:meta])* $ty:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $ty(String);

        impl $ty {
            /// Validates and wraps `value`.
            pub fn new(value: impl Into<String>) -> Result<Self, NameError> {
                let value = value.into();
                validate($what, &value)?;
                Ok(Self(value))
            }

            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $ty {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        // Ord, Eq and Hash derive from the inner String, so they agree with
        // str's: maps keyed by names can be searched with a plain &str.
        impl std::borrow::Borrow<str> for $ty {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

name_type!(
    /// The name of a model, such as `digits`.
    ModelName,
    "model name"
);
name_type!(
    /// The version of a model, such as `2`. Versions are strings (as in the
    /// Open Inference Protocol), though the registry numbers them `1`, `2`, …
    /// unless told otherwise.
    Version,
    "version"
);

impl Version {
    /// Sort key that orders numeric versions numerically (`2` before `10`)
    /// and puts them before non-numeric ones, which sort as strings.
    pub fn sort_key(&self) -> (u8, u64, &str) {
        match self.0.parse::<u64>() {
            Ok(n) => (0, n, ""),
            Err(_) => (1, 0, &self.0),
        }
    }
}

/// A model with an optional version: `digits` or `digits:2`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ModelRef {
    /// The model.
    pub model: ModelName,
    /// The version, when one was named.
    pub version: Option<Version>,
}

impl FromStr for ModelRef {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            Some((m, v)) => Ok(Self {
                model: m.parse()?,
                version: Some(v.parse()?),
            }),
            None => Ok(Self {
                model: s.parse()?,
                version: None,
            }),
        }
    }
}

impl fmt::Display for ModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.version {
            Some(v) => write!(f, "{}:{}", self.model, v),
            None => write!(f, "{}", self.model),
        }
    }
}

/// One version of one model, written `digits:2`: the key by which
/// replicas, gateways and the control plane index what they know per
/// version (load failures, faults, inference counts, memory), on the wire
/// (as a JSON object key) and in memory.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VersionKey {
    /// The model.
    pub model: ModelName,
    /// Its version.
    pub version: Version,
}

impl VersionKey {
    /// The key of `model`'s `version`.
    pub fn new(model: ModelName, version: Version) -> Self {
        Self { model, version }
    }

    /// The key of `model`'s `version`, given as unchecked strings.
    pub fn parse(model: &str, version: &str) -> Result<Self, NameError> {
        Ok(Self::new(model.parse()?, version.parse()?))
    }

    /// True when this is a version of `model`.
    pub fn is_of(&self, model: &str) -> bool {
        self.model.as_str() == model
    }

    /// True when this is `model`'s `version`: a comparison with unchecked
    /// strings that builds no key (for lookups on the request path).
    pub fn is(&self, model: &str, version: &str) -> bool {
        self.is_of(model) && self.version.as_str() == version
    }
}

impl FromStr for VersionKey {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (model, version) = s.split_once(':').ok_or_else(|| NameError::NoVersion {
            value: s.to_owned(),
        })?;
        Self::parse(model, version)
    }
}

impl fmt::Display for VersionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.model, self.version)
    }
}

// A key equals its written form, so tests and lookups can say "digits:2".
impl PartialEq<str> for VersionKey {
    fn eq(&self, other: &str) -> bool {
        other
            .split_once(':')
            .is_some_and(|(m, v)| self.model.as_str() == m && self.version.as_str() == v)
    }
}

impl PartialEq<&str> for VersionKey {
    fn eq(&self, other: &&str) -> bool {
        *self == **other
    }
}

impl From<VersionKey> for ModelRef {
    fn from(key: VersionKey) -> Self {
        Self {
            model: key.model,
            version: Some(key.version),
        }
    }
}

impl Serialize for VersionKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for VersionKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<str>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: Result<(), &str>) {
        let got = ModelName::new(input).map(|_| ()).map_err(|e| e.to_string());
        assert_eq!(got, expected.map_err(str::to_owned), "input {input:?}");
    }

    #[test]
    fn model_names() {
        check("digits", Ok(()));
        check("digits_v2-final.onnx", Ok(()));
        check("_private", Ok(()));
        check("", Err("model name must not be empty"));
        check(
            "../etc/passwd",
            Err(
                "model name \"../etc/passwd\" may only contain letters, digits, '.', '_' and '-', and must start with a letter, digit or '_'",
            ),
        );
        check(
            "a b",
            Err(
                "model name \"a b\" may only contain letters, digits, '.', '_' and '-', and must start with a letter, digit or '_'",
            ),
        );
        check(
            &"x".repeat(129),
            Err("model name is 129 bytes long; the limit is 128"),
        );
    }

    #[test]
    fn model_refs() {
        let r: ModelRef = "digits:2".parse().unwrap();
        assert_eq!(r.model.as_str(), "digits");
        assert_eq!(r.version.as_ref().map(Version::as_str), Some("2"));
        assert_eq!(r.to_string(), "digits:2");
        let r: ModelRef = "digits".parse().unwrap();
        assert!(r.version.is_none());
        assert!("digits:".parse::<ModelRef>().is_err());
    }

    #[test]
    fn version_keys() {
        let k: VersionKey = "digits:2".parse().unwrap();
        assert_eq!((k.model.as_str(), k.version.as_str()), ("digits", "2"));
        assert_eq!(k.to_string(), "digits:2");
        assert!(k.is_of("digits") && !k.is_of("digit"));
        assert!(k.is("digits", "2") && !k.is("digits", "20") && !k.is("digit", "2"));
        assert!(k == "digits:2" && k != "digits:20" && k != "digits");
        assert_eq!(VersionKey::parse("digits", "2").unwrap(), k);
        assert_eq!(
            "digits".parse::<VersionKey>().unwrap_err().to_string(),
            "\"digits\" must name a model and a version, as in digits:2"
        );
        assert!("digits:".parse::<VersionKey>().is_err());
        assert!("a/b:1".parse::<VersionKey>().is_err());
        // As a JSON object key, the way heartbeats carry per-version facts.
        let map: std::collections::BTreeMap<VersionKey, u32> = [(k.clone(), 7)].into();
        let json = serde_json::to_string(&map).unwrap();
        assert_eq!(json, r#"{"digits:2":7}"#);
        let back: std::collections::BTreeMap<VersionKey, u32> =
            serde_json::from_str(&json).unwrap();
        assert_eq!(back, map);
        assert!(serde_json::from_str::<VersionKey>(r#""digits""#).is_err());
        let r: ModelRef = k.into();
        assert_eq!(r.to_string(), "digits:2");
    }

    #[test]
    fn numeric_versions_sort_numerically() {
        let mut v: Vec<Version> = ["10", "2", "beta", "1"]
            .iter()
            .map(|s| Version::new(*s).unwrap())
            .collect();
        v.sort_by(|a, b| a.sort_key().cmp(&b.sort_key()));
        let got: Vec<&str> = v.iter().map(Version::as_str).collect();
        assert_eq!(got, ["1", "2", "10", "beta"]);
    }

    #[test]
    fn deserialize_validates() {
        let ok: ModelName = serde_json::from_str("\"digits\"").unwrap();
        assert_eq!(ok.as_str(), "digits");
        assert!(serde_json::from_str::<ModelName>("\"a/b\"").is_err());
    }
}
