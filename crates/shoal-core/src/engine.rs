//! Which inference engine runs a model version: the one choice an operator
//! makes per version (`shoal model push --engine tract|ort|auto`), recorded
//! in the registry and sent to replicas in their desired state.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The engine a version asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// tract, compiled into Shoal (pure Rust, always there).
    #[default]
    Tract,
    /// ONNX Runtime, loaded from `libonnxruntime.so` at run time; a replica
    /// without it fails the load and says how to install it.
    Ort,
    /// Both where ONNX Runtime is present: measured on a warm-up input at
    /// load, the faster one kept. tract alone where it is not.
    Auto,
}

impl Engine {
    /// Every choice, in the order the CLI lists them.
    pub const ALL: [Engine; 3] = [Engine::Tract, Engine::Ort, Engine::Auto];

    /// The name used on the command line and in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Tract => "tract",
            Engine::Ort => "ort",
            Engine::Auto => "auto",
        }
    }

    /// True for the default (tract), which records and serialises as absent.
    pub fn is_default(&self) -> bool {
        *self == Engine::default()
    }
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Engine {
    type Err = String;

    fn from_str(s: &str) -> Result<Engine, String> {
        Engine::ALL
            .into_iter()
            .find(|e| e.as_str() == s)
            .ok_or_else(|| format!("unknown engine {s:?}: use tract, ort or auto"))
    }
}

/// Which of two measured engines `auto` keeps: the faster on the warm-up
/// input; tract on a tie, since it needs no library at run time.
pub fn faster(tract: std::time::Duration, ort: std::time::Duration) -> Engine {
    if ort < tract {
        Engine::Ort
    } else {
        Engine::Tract
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn names_round_trip_through_text_and_json() {
        for engine in Engine::ALL {
            assert_eq!(engine.as_str().parse::<Engine>(), Ok(engine));
            let json = serde_json::to_string(&engine).unwrap();
            assert_eq!(json, format!("\"{engine}\""));
            assert_eq!(serde_json::from_str::<Engine>(&json).unwrap(), engine);
        }
        let err = "onnxruntime".parse::<Engine>().unwrap_err();
        assert!(err.contains("tract, ort or auto"), "{err}");
        assert!(Engine::default().is_default());
        assert!(!Engine::Auto.is_default());
    }

    #[test]
    fn auto_keeps_the_faster_and_tract_on_a_tie() {
        let ms = Duration::from_millis;
        assert_eq!(faster(ms(5), ms(2)), Engine::Ort);
        assert_eq!(faster(ms(2), ms(5)), Engine::Tract);
        assert_eq!(faster(ms(3), ms(3)), Engine::Tract);
    }
}
