//! The reconcile decision: from what should be served and what is served,
//! the steps to take. Pure; [`crate::Agent`] carries the steps out.
//!
//! Order matters for "never fewer serving": every missing version is loaded
//! first, then defaults switch, and only then are unwanted versions
//! retired (they drain; requests in flight finish).

use std::collections::BTreeMap;

use shoal_api::fleet::{DesiredState, DesiredVersion};
use shoal_runtime::LoadOptions;

/// A version loaded on the replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// Model.
    pub model: String,
    /// Version.
    pub version: String,
    /// SHA-256 of what is loaded.
    pub sha256: String,
    /// Whether it is the model's default.
    pub default: bool,
    /// The options it was loaded with.
    pub options: LoadOptions,
}

/// The options a replica loads `version` with, from what the registry
/// records for it.
pub fn load_options(version: &DesiredVersion) -> Result<LoadOptions, String> {
    let batching = version
        .batching
        .as_ref()
        .map(shoal_api::registry::Batching::policy)
        .transpose()?;
    LoadOptions::from_registry(
        &version.input_shapes,
        &version.max_shapes,
        &version.state,
        batching,
        version.engine,
    )
}

/// One step of a reconcile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Fetch, verify, load and warm a version (then make it the default
    /// if `default`).
    Load {
        /// Model.
        model: String,
        /// The version to load.
        version: DesiredVersion,
        /// Make it the default once loaded.
        default: bool,
        /// It is loaded now, with other bytes or options: the new
        /// instance replaces the serving one once warm.
        reload: bool,
    },
    /// Make a loaded version the default.
    SetDefault {
        /// Model.
        model: String,
        /// Version.
        version: String,
    },
    /// Retire a version (it drains).
    Unload {
        /// Model.
        model: String,
        /// Version.
        version: String,
    },
}

/// The steps that take `loaded` to `desired`.
pub fn plan(desired: &DesiredState, loaded: &[Loaded]) -> Vec<Step> {
    let have: BTreeMap<(&str, &str), &Loaded> = loaded
        .iter()
        .map(|l| ((l.model.as_str(), l.version.as_str()), l))
        .collect();
    let mut loads = Vec::new();
    let mut defaults = Vec::new();
    for m in &desired.models {
        for v in &m.versions {
            let is_default = v.version == m.default;
            match have.get(&(m.model.as_str(), v.version.as_str())) {
                // Kept if loaded; never fetched for.
                None if v.optional => {}
                // Same name, other bytes: reload (the registry never reuses
                // a version name, but a replica's cache may predate a reset).
                // Same bytes, other options (a deploy changed its batching
                // or engine): reload too; the new instance replaces the old
                // once warm, as a new version would. Options that do not
                // parse reload as well, and fail the load with the reason.
                Some(l)
                    if l.sha256 != v.sha256
                        || load_options(v).as_ref().ok() != Some(&l.options) =>
                {
                    loads.push(Step::Load {
                        model: m.model.clone(),
                        version: v.clone(),
                        default: is_default,
                        reload: true,
                    });
                }
                Some(l) => {
                    if is_default && !l.default {
                        defaults.push(Step::SetDefault {
                            model: m.model.clone(),
                            version: v.version.clone(),
                        });
                    }
                }
                None => loads.push(Step::Load {
                    model: m.model.clone(),
                    version: v.clone(),
                    default: is_default,
                    reload: false,
                }),
            }
        }
    }
    let wanted: std::collections::BTreeSet<(&str, &str)> = desired
        .models
        .iter()
        .flat_map(|m| {
            m.versions
                .iter()
                .map(move |v| (m.model.as_str(), v.version.as_str()))
        })
        .collect();
    let unloads = loaded
        .iter()
        .filter(|l| !wanted.contains(&(l.model.as_str(), l.version.as_str())))
        .map(|l| Step::Unload {
            model: l.model.clone(),
            version: l.version.clone(),
        });
    loads.into_iter().chain(defaults).chain(unloads).collect()
}

#[cfg(test)]
mod tests {
    use shoal_api::fleet::DesiredModel;

    use super::*;

    fn dv(version: &str) -> DesiredVersion {
        DesiredVersion {
            version: version.into(),
            sha256: format!("sha{version}"),
            size: 1,
            input_shapes: Default::default(),
            max_shapes: Default::default(),
            state: Default::default(),
            batching: None,
            engine: Default::default(),
            optional: false,
        }
    }

    fn loaded(version: &str, default: bool) -> Loaded {
        Loaded {
            model: "m".into(),
            version: version.into(),
            sha256: format!("sha{version}"),
            default,
            options: LoadOptions::default(),
        }
    }

    fn desired(default: &str, versions: &[&str]) -> DesiredState {
        DesiredState {
            revision: 1,
            models: vec![DesiredModel {
                model: "m".into(),
                default: default.into(),
                versions: versions.iter().map(|v| dv(v)).collect(),
            }],
            peers: vec![],
        }
    }

    #[test]
    fn a_new_version_is_loaded_before_the_old_one_leaves() {
        let steps = plan(&desired("2", &["2"]), &[loaded("1", true)]);
        assert_eq!(
            steps,
            vec![
                Step::Load {
                    model: "m".into(),
                    version: dv("2"),
                    default: true,
                    reload: false,
                },
                Step::Unload {
                    model: "m".into(),
                    version: "1".into()
                },
            ]
        );
    }

    #[test]
    fn converged_means_no_steps() {
        assert!(
            plan(
                &desired("1", &["1", "2"]),
                &[loaded("1", true), loaded("2", false)]
            )
            .is_empty()
        );
    }

    #[test]
    fn defaults_switch_without_reloading() {
        let steps = plan(
            &desired("2", &["1", "2"]),
            &[loaded("1", true), loaded("2", false)],
        );
        assert_eq!(
            steps,
            vec![Step::SetDefault {
                model: "m".into(),
                version: "2".into()
            }]
        );
    }

    #[test]
    fn different_bytes_under_the_same_name_are_reloaded() {
        let mut l = loaded("1", true);
        l.sha256 = "other".into();
        let steps = plan(&desired("1", &["1"]), &[l]);
        assert!(matches!(&steps[..], [Step::Load { reload: true, .. }]));
    }

    #[test]
    fn changed_options_reload_the_same_bytes() {
        let mut d = desired("1", &["1", "2"]);
        d.models[0].versions[0].engine = shoal_core::Engine::Ort;
        d.models[0].versions[1].batching = Some(shoal_api::registry::Batching {
            max_batch: 8,
            delay_us: 500,
            preferred: vec![],
        });
        let steps = plan(&d, &[loaded("1", true), loaded("2", false)]);
        let reloaded: Vec<(&str, bool, bool)> = steps
            .iter()
            .map(|s| match s {
                Step::Load {
                    version,
                    default,
                    reload,
                    ..
                } => (version.version.as_str(), *default, *reload),
                other => panic!("only loads expected, got {other:?}"),
            })
            .collect();
        assert_eq!(reloaded, [("1", true, true), ("2", false, true)]);
        // Loaded with those options: converged.
        let now: Vec<Loaded> = d.models[0]
            .versions
            .iter()
            .map(|v| Loaded {
                options: load_options(v).unwrap(),
                ..loaded(&v.version, v.version == "1")
            })
            .collect();
        assert!(plan(&d, &now).is_empty());
    }

    #[test]
    fn options_that_do_not_parse_reload_and_fail_there() {
        let mut d = desired("1", &["1"]);
        d.models[0].versions[0]
            .input_shapes
            .insert("x".into(), vec![-7]);
        assert!(load_options(&d.models[0].versions[0]).is_err());
        assert!(matches!(
            &plan(&d, &[loaded("1", true)])[..],
            [Step::Load { .. }]
        ));
    }

    #[test]
    fn optional_versions_are_kept_but_never_loaded() {
        let mut d = desired("1", &["1", "0", "9"]);
        d.models[0].versions[1].optional = true;
        d.models[0].versions[2].optional = true;
        // 0 is loaded: kept. 9 is not: not loaded.
        assert!(plan(&d, &[loaded("1", true), loaded("0", false)]).is_empty());
    }

    #[test]
    fn nothing_desired_unloads_everything() {
        let steps = plan(&DesiredState::default(), &[loaded("1", true)]);
        assert_eq!(
            steps,
            vec![Step::Unload {
                model: "m".into(),
                version: "1".into()
            }]
        );
    }
}
