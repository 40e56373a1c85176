//! `shoal scale`: how many replicas serve a model, and what the
//! autoscaler recommends.

use anyhow::Context;
use shoal_api::scale::{ScaleSpec, ScaleStatus, ScaleTarget};
use shoal_telemetry::say;

use super::client::{print_json, table};
use crate::cli::Global;

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub(crate) struct ScaleArgs {
    #[command(subcommand)]
    command: Option<ScaleCommand>,
    /// The model.
    #[arg(required = true)]
    name: Option<String>,
    /// Serve the model on exactly N replicas.
    #[arg(long, conflicts_with_all = ["min", "max", "everywhere"])]
    replicas: Option<u32>,
    /// Autoscale: at least N replicas…
    #[arg(long, requires = "max", conflicts_with = "everywhere")]
    min: Option<u32>,
    /// …and at most M.
    #[arg(long, requires = "min", conflicts_with = "everywhere")]
    max: Option<u32>,
    /// Of the replicas, at least K on on-demand (not spot) capacity.
    #[arg(long, default_value_t = 0)]
    min_on_demand: u32,
    /// What autoscaling follows: rps (requests per second per replica),
    /// in-flight (requests in flight per replica) or p99-ms (the model's
    /// p99 latency, an SLO).
    #[arg(long, default_value = "rps", requires = "min")]
    signal: String,
    /// The signal's value one replica should carry (rps, in-flight) or the
    /// p99 to keep under (p99-ms) [default: 50 rps].
    #[arg(long, requires = "min")]
    target: Option<f64>,
    /// Serve the model on every replica again (the default before any
    /// `shoal scale`).
    #[arg(long)]
    everywhere: bool,
}

#[derive(Debug, clap::Subcommand)]
enum ScaleCommand {
    /// A model's placement and the autoscaler's recommendations.
    Status {
        /// The model.
        name: String,
    },
}

fn spec(args: &ScaleArgs) -> anyhow::Result<ScaleSpec> {
    let target = match (args.min, args.target) {
        (Some(_), Some(value)) => {
            Some(ScaleTarget::parse(&args.signal, value).map_err(anyhow::Error::msg)?)
        }
        (Some(_), None) if args.signal != "rps" => anyhow::bail!(
            "--signal {} needs --target: the value one replica should carry",
            args.signal
        ),
        _ => None,
    };
    if args.replicas.is_none() && args.min.is_none() && !args.everywhere {
        anyhow::bail!(
            "say how many replicas: --replicas N, --min N --max M (autoscaled) or --everywhere"
        );
    }
    let spec = ScaleSpec {
        replicas: args.replicas,
        min: args.min,
        max: args.max,
        min_on_demand: args.min_on_demand,
        target,
    };
    spec.check().map_err(anyhow::Error::msg)?;
    Ok(spec)
}

pub(crate) async fn run(args: ScaleArgs, global: &Global) -> anyhow::Result<()> {
    let client = super::client::client(global)?;
    if let Some(ScaleCommand::Status { name }) = &args.command {
        let status = client.scale_status(name).await?;
        if global.json {
            return print_json(&status);
        }
        print_status(&status);
        return Ok(());
    }
    let name = args.name.clone().context("name the model")?;
    let spec = spec(&args)?;
    let deployment = client.set_scale(&name, &spec).await?;
    if global.json {
        return print_json(&deployment);
    }
    say!(
        "{name}: {}; the control plane places it within a second (shoal scale status {name})",
        describe(&spec)
    );
    Ok(())
}

fn describe(spec: &ScaleSpec) -> String {
    let count = match (spec.replicas, spec.min, spec.max) {
        (Some(n), _, _) => format!("{n} replica{}", if n == 1 { "" } else { "s" }),
        (None, Some(min), Some(max)) => {
            let t = spec.target_or_default();
            format!(
                "autoscaled from {min} to {max} replicas on {} {}",
                t.signal(),
                t.value()
            )
        }
        _ => "every replica".to_owned(),
    };
    if spec.min_on_demand > 0 {
        format!(
            "{count}, at least {} on on-demand capacity",
            spec.min_on_demand
        )
    } else {
        count
    }
}

fn print_status(s: &ScaleStatus) {
    say!("{}: {}", s.model, describe(&s.spec));
    match &s.placement {
        Some(ids) if ids.is_empty() => say!("placed on no replica yet"),
        Some(ids) => say!("placed on {} ({} serving)", ids.join(", "), s.current),
        None => say!("served by every eligible replica ({} serving)", s.current),
    }
    let mut t = table(&["", "replicas", "why"]);
    t.add_row(vec![
        "current".to_owned(),
        s.current.to_string(),
        "placed replicas serving it".to_owned(),
    ]);
    t.add_row(vec![
        "desired".to_owned(),
        s.desired.to_string(),
        "the larger recommendation, within the bounds".to_owned(),
    ]);
    if let Some(r) = &s.reactive {
        t.add_row(vec![
            "reactive".to_owned(),
            r.replicas.to_string(),
            r.reason.clone(),
        ]);
    }
    match &s.predicted {
        Some(p) => {
            t.add_row(vec![
                "predicted".to_owned(),
                p.replicas.to_string(),
                p.reason.clone(),
            ]);
        }
        None if s.spec.autoscaled() => {
            t.add_row(vec![
                "predicted".to_owned(),
                "-".to_owned(),
                "learning: a day of load is needed first".to_owned(),
            ]);
        }
        None => {}
    }
    if let (Some(n), Some(per)) = (s.right_size, s.rps_per_replica) {
        t.add_row(vec![
            "right size".to_owned(),
            n.to_string(),
            format!(
                "peak {:.1} req/s ÷ {per:.1} req/s per replica × {}",
                s.peak_rps, s.safety_factor
            ),
        ]);
    }
    if let Some(next) = &s.next_change {
        let in_s = (next.at - shoal_api::now_millis()).max(0) / 1000;
        t.add_row(vec![
            "next change".to_owned(),
            next.replicas.to_string(),
            format!("predicted in {}m{:02}s", in_s / 60, in_s % 60),
        ]);
    }
    say!("{t}");
    let load = s.load_ms.map_or("not measured yet".to_owned(), |ms| {
        format!("{:.1} s", ms as f64 / 1000.0)
    });
    say!(
        "load now {:.1} req/s; a replica takes {load} to fetch, load and warm it",
        s.rps
    );
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: ScaleArgs,
    }

    fn parse(line: &[&str]) -> Result<ScaleArgs, String> {
        let mut argv = vec!["scale"];
        argv.extend_from_slice(line);
        Cli::try_parse_from(argv)
            .map(|c| c.args)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn flags_make_specs_and_refuse_what_does_not_go_together() {
        let s = spec(&parse(&["digits", "--replicas", "2"]).unwrap()).unwrap();
        assert_eq!(s.replicas, Some(2));
        let s = spec(
            &parse(&[
                "digits",
                "--min",
                "1",
                "--max",
                "6",
                "--signal",
                "in-flight",
                "--target",
                "4",
            ])
            .unwrap(),
        )
        .unwrap();
        assert_eq!(
            (s.min, s.max, s.target),
            (Some(1), Some(6), Some(ScaleTarget::InFlight(4.0)))
        );
        // Defaults: rps at 50 per replica, no on-demand minimum.
        let s = spec(&parse(&["digits", "--min", "1", "--max", "6"]).unwrap()).unwrap();
        assert_eq!((s.target, s.min_on_demand), (None, 0));
        assert!(
            spec(&parse(&["digits", "--everywhere"]).unwrap())
                .unwrap()
                .is_everywhere()
        );
        assert!(parse(&["digits", "--replicas", "2", "--min", "1", "--max", "2"]).is_err());
        assert!(parse(&["digits", "--min", "1"]).is_err());
        assert!(
            spec(&parse(&["digits"]).unwrap())
                .unwrap_err()
                .to_string()
                .contains("--replicas N")
        );
        assert!(
            spec(&parse(&["digits", "--min", "1", "--max", "2", "--signal", "p99-ms"]).unwrap())
                .unwrap_err()
                .to_string()
                .contains("needs --target")
        );
        assert!(
            spec(&parse(&["digits", "--replicas", "0"]).unwrap())
                .unwrap_err()
                .to_string()
                .contains("at least 1")
        );
        let status = parse(&["status", "digits"]).unwrap();
        assert!(
            matches!(status.command, Some(ScaleCommand::Status { ref name }) if name == "digits")
        );
    }
}
