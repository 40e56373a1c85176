//! A request's place in a sequence, as Triton's clients send it: the
//! request `parameters` `sequence_id` (an unsigned integer or a string; 0
//! or "" means none), `sequence_start` and `sequence_end` (booleans,
//! false when absent). `tritonclient`'s `infer(…, sequence_id=…,
//! sequence_start=…, sequence_end=…)` sends exactly these.

use std::fmt;

use serde_json::{Map, Value};

/// A sequence's id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SequenceId {
    /// An unsigned integer (Triton's correlation id).
    Number(u64),
    /// A string.
    Text(String),
}

impl fmt::Display for SequenceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SequenceId::Number(n) => write!(f, "{n}"),
            SequenceId::Text(s) => write!(f, "{s:?}"),
        }
    }
}

impl SequenceId {
    /// A key for routing (the gateway hashes it to pick a replica).
    pub fn key(&self) -> String {
        match self {
            SequenceId::Number(n) => format!("seq:{n}"),
            SequenceId::Text(s) => format!("seq:s:{s}"),
        }
    }
}

/// One step of a sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Which sequence.
    pub id: SequenceId,
    /// Starts the sequence (from the initial state; restarts one that is
    /// live).
    pub start: bool,
    /// Ends it: its state is freed after this step.
    pub end: bool,
}

impl Step {
    /// The step `parameters` name, `None` when the request belongs to no
    /// sequence. Errors say which parameter is wrong and what it takes.
    pub fn from_parameters(
        parameters: Option<&Map<String, Value>>,
    ) -> Result<Option<Step>, String> {
        let Some(p) = parameters else {
            return Ok(None);
        };
        let flag = |name: &str| match p.get(name) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(format!(
                "parameter {name} must be true or false, not {other}"
            )),
        };
        let (start, end) = (flag("sequence_start")?, flag("sequence_end")?);
        let id = match p.get("sequence_id") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => match n.as_u64() {
                Some(0) => None,
                Some(n) => Some(SequenceId::Number(n)),
                None => {
                    return Err(format!(
                        "parameter sequence_id must be an unsigned integer or a string, not {n}"
                    ));
                }
            },
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::String(s)) => Some(SequenceId::Text(s.clone())),
            Some(other) => {
                return Err(format!(
                    "parameter sequence_id must be an unsigned integer or a string, not {other}"
                ));
            }
        };
        match id {
            Some(id) => Ok(Some(Step { id, start, end })),
            None if start || end => Err(
                "sequence_start or sequence_end without a sequence_id: give the sequence's id"
                    .into(),
            ),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(json: &str) -> Map<String, Value> {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn triton_sequence_parameters_are_read() {
        let step = Step::from_parameters(Some(&params(
            r#"{"sequence_id": 42, "sequence_start": true}"#,
        )))
        .unwrap()
        .unwrap();
        assert_eq!(step.id, SequenceId::Number(42));
        assert!(step.start && !step.end);
        let step = Step::from_parameters(Some(&params(
            r#"{"sequence_id": "call-7", "sequence_end": true}"#,
        )))
        .unwrap()
        .unwrap();
        assert_eq!(step.id, SequenceId::Text("call-7".into()));
        assert!(!step.start && step.end);
        assert_eq!(step.id.to_string(), "\"call-7\"");
        assert_ne!(
            SequenceId::Number(7).key(),
            SequenceId::Text("7".into()).key()
        );
    }

    #[test]
    fn no_sequence_and_bad_parameters() {
        assert_eq!(Step::from_parameters(None), Ok(None));
        assert_eq!(Step::from_parameters(Some(&params("{}"))), Ok(None));
        assert_eq!(
            Step::from_parameters(Some(&params(r#"{"sequence_id": 0}"#))),
            Ok(None),
            "Triton's 0: no sequence"
        );
        for (json, says) in [
            (r#"{"sequence_id": -3}"#, "unsigned integer"),
            (r#"{"sequence_id": 1.5}"#, "unsigned integer"),
            (r#"{"sequence_id": [1]}"#, "unsigned integer"),
            (
                r#"{"sequence_id": 1, "sequence_start": "yes"}"#,
                "true or false",
            ),
            (r#"{"sequence_start": true}"#, "without a sequence_id"),
        ] {
            let err = Step::from_parameters(Some(&params(json))).unwrap_err();
            assert!(err.contains(says), "{json}: {err}");
        }
    }
}
