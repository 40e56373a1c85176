//! A stateful model's state, the pure part: which inputs carry state from
//! one step of a sequence to the next and which outputs feed them
//! ([`StateSpec`], as `shoal model push --state h=hn` declares it),
//! checked against the model's signature, the zero state a sequence
//! starts from, and the state a step hands on.
//!
//! Clients send only the other inputs and receive only the other outputs;
//! the replica (or a shared store) keeps the state between steps.

use std::collections::BTreeMap;
use std::fmt;

use crate::signature::{Dim, Signature, TensorSpec};
use crate::tensor::{Tensor, TensorData};

/// State inputs and the outputs that feed them at the next step, sorted by
/// input name. Empty for a stateless model.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StateSpec {
    pairs: Vec<(String, String)>,
}

impl StateSpec {
    /// From the registry's map of state input to output.
    pub fn new(map: &BTreeMap<String, String>) -> StateSpec {
        StateSpec {
            pairs: map.iter().map(|(i, o)| (i.clone(), o.clone())).collect(),
        }
    }

    /// True for a stateless model.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// Whether `name` is an input the state feeds.
    pub fn is_state_input(&self, name: &str) -> bool {
        self.pairs.iter().any(|(i, _)| i == name)
    }

    /// Whether `name` is an output that feeds the state.
    pub fn is_state_output(&self, name: &str) -> bool {
        self.pairs.iter().any(|(_, o)| o == name)
    }

    /// Checks the declaration against `signature`: every state input and
    /// output exists, has the same datatype, and a fully fixed shape the
    /// output shares (the state of one step is the next step's input);
    /// some input is left for clients to send. Errors say what to fix.
    pub fn check(&self, signature: &Signature) -> Result<(), String> {
        let names = |specs: &[TensorSpec]| -> String {
            specs
                .iter()
                .map(|s| format!("{:?}", s.name))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut outputs_seen = Vec::new();
        for (input, output) in &self.pairs {
            let i = signature
                .inputs
                .iter()
                .find(|s| &s.name == input)
                .ok_or_else(|| {
                    format!(
                        "state {input}={output}: the model has no input {input:?} (its inputs are {})",
                        names(&signature.inputs)
                    )
                })?;
            let o = signature
                .outputs
                .iter()
                .find(|s| &s.name == output)
                .ok_or_else(|| {
                    format!(
                        "state {input}={output}: the model has no output {output:?} (its outputs are {})",
                        names(&signature.outputs)
                    )
                })?;
            if outputs_seen.contains(&output) {
                return Err(format!("state output {output:?} feeds two inputs"));
            }
            outputs_seen.push(output);
            if i.datatype != o.datatype {
                return Err(format!(
                    "state {input}={output}: input is {} but output is {}",
                    i.datatype, o.datatype
                ));
            }
            if i.shape.iter().any(|d| matches!(d, Dim::Dynamic(_))) {
                return Err(format!(
                    "state input {input:?} has a dynamic shape [{}]; fix it with --input-shape {input}=D,D,…",
                    shape_text(&i.shape)
                ));
            }
            let fits = i.shape.len() == o.shape.len()
                && i.shape.iter().zip(&o.shape).all(|(a, b)| match b {
                    Dim::Fixed(_) => a == b,
                    Dim::Dynamic(_) => true,
                });
            if !fits {
                return Err(format!(
                    "state {input}={output}: output shape [{}] cannot feed input shape [{}]",
                    shape_text(&o.shape),
                    shape_text(&i.shape)
                ));
            }
        }
        if !self.is_empty()
            && signature
                .inputs
                .iter()
                .all(|s| self.is_state_input(&s.name))
        {
            return Err("every input is state: a step would take nothing from the client".into());
        }
        Ok(())
    }

    /// The state a sequence starts from: zeros of each state input's shape
    /// and datatype. Call after [`StateSpec::check`].
    pub fn initial(&self, signature: &Signature) -> Result<Vec<Tensor>, String> {
        self.pairs
            .iter()
            .map(|(input, _)| {
                let spec = signature
                    .inputs
                    .iter()
                    .find(|s| &s.name == input)
                    .ok_or_else(|| format!("no state input {input:?}"))?;
                let shape: Vec<usize> = spec
                    .shape
                    .iter()
                    .map(|d| match d {
                        Dim::Fixed(n) => Ok(*n),
                        Dim::Dynamic(_) => Err(format!("state input {input:?} is dynamic")),
                    })
                    .collect::<Result<_, _>>()?;
                let len = shape.iter().product();
                Tensor::new(input.clone(), shape, TensorData::zeros(spec.datatype, len))
                    .map_err(|e| e.to_string())
            })
            .collect()
    }

    /// Splits a step's outputs into what the client gets and the state the
    /// next step takes (each state output renamed to the input it feeds).
    pub fn split(&self, outputs: Vec<Tensor>) -> Result<(Vec<Tensor>, Vec<Tensor>), String> {
        let mut state: Vec<Option<Tensor>> = vec![None; self.pairs.len()];
        let mut answer = Vec::new();
        for t in outputs {
            match self.pairs.iter().position(|(_, o)| *o == t.name) {
                Some(k) => {
                    let (_, shape, data) = t.into_parts();
                    state[k] = Some(
                        Tensor::new(self.pairs[k].0.clone(), shape, data)
                            .map_err(|e| e.to_string())?,
                    );
                }
                None => answer.push(t),
            }
        }
        let state = state
            .into_iter()
            .zip(&self.pairs)
            .map(|(t, (_, o))| t.ok_or_else(|| format!("the model did not produce {o:?}")))
            .collect::<Result<_, _>>()?;
        Ok((answer, state))
    }
}

impl fmt::Display for StateSpec {
    /// `h ← hn, c ← cn`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pairs: Vec<String> = self
            .pairs
            .iter()
            .map(|(i, o)| format!("{i} ← {o}"))
            .collect();
        f.write_str(&pairs.join(", "))
    }
}

fn shape_text(shape: &[Dim]) -> String {
    shape
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DataType;

    fn spec(name: &str, shape: Vec<Dim>) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            datatype: DataType::Fp32,
            shape,
        }
    }

    /// Silero VAD's sequence model, as tract reads it.
    fn vad() -> Signature {
        let state = || vec![Dim::Fixed(1), Dim::Fixed(1), Dim::Fixed(128)];
        Signature {
            inputs: vec![
                spec("input", vec![Dim::Dynamic(None), Dim::Fixed(576)]),
                spec("h", state()),
                spec("c", state()),
            ],
            outputs: vec![
                spec("speech_probs", vec![Dim::Dynamic(None)]),
                spec("hn", state()),
                spec("cn", state()),
            ],
        }
    }

    fn state(pairs: &[(&str, &str)]) -> StateSpec {
        StateSpec::new(
            &pairs
                .iter()
                .map(|(i, o)| ((*i).to_owned(), (*o).to_owned()))
                .collect(),
        )
    }

    #[test]
    fn a_declaration_is_checked_against_the_signature() {
        assert!(state(&[("h", "hn"), ("c", "cn")]).check(&vad()).is_ok());
        assert!(StateSpec::default().check(&vad()).is_ok());
        let err = state(&[("x", "hn")]).check(&vad()).unwrap_err();
        assert!(
            err.contains("no input \"x\"") && err.contains("\"input\", \"h\", \"c\""),
            "{err}"
        );
        let err = state(&[("h", "nope")]).check(&vad()).unwrap_err();
        assert!(err.contains("no output \"nope\""), "{err}");
        let err = state(&[("h", "hn"), ("c", "hn")])
            .check(&vad())
            .unwrap_err();
        assert!(err.contains("feeds two inputs"), "{err}");
        let err = state(&[("input", "hn")]).check(&vad()).unwrap_err();
        assert!(
            err.contains("dynamic shape") && err.contains("--input-shape"),
            "{err}"
        );
        let err = state(&[("h", "speech_probs")]).check(&vad()).unwrap_err();
        assert!(err.contains("cannot feed"), "{err}");
        let mut one_input = vad();
        one_input.inputs.remove(0);
        one_input.inputs.remove(1);
        let err = state(&[("h", "hn")]).check(&one_input).unwrap_err();
        assert!(err.contains("every input is state"), "{err}");
    }

    #[test]
    fn a_sequence_starts_from_zeros_and_hands_on_its_state_outputs() {
        let s = state(&[("h", "hn"), ("c", "cn")]);
        let initial = s.initial(&vad()).unwrap();
        assert_eq!(initial.len(), 2);
        assert_eq!(initial[0].name, "c", "sorted by input");
        assert_eq!(initial[1].shape(), &[1, 1, 128]);
        assert!(
            initial[1]
                .data()
                .to_f64_vec()
                .unwrap()
                .iter()
                .all(|v| *v == 0.0)
        );
        let out = |name: &str, v: f32, n: usize| {
            Tensor::new(name, vec![n], TensorData::Fp32(vec![v; n])).unwrap()
        };
        let (answer, next) = s
            .split(vec![
                out("speech_probs", 0.5, 2),
                out("hn", 1.0, 128),
                out("cn", 2.0, 128),
            ])
            .unwrap();
        assert_eq!(answer.len(), 1);
        assert_eq!(answer[0].name, "speech_probs");
        assert_eq!((next[0].name.as_str(), next[1].name.as_str()), ("c", "h"));
        assert_eq!(next[0].data().to_f64_vec().unwrap()[0], 2.0);
        assert!(
            s.split(vec![out("hn", 1.0, 128)])
                .unwrap_err()
                .contains("\"cn\"")
        );
        assert_eq!(s.to_string(), "c ← cn, h ← hn");
    }
}
