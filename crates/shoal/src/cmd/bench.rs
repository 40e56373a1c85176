//! `shoal bench`: benchmarks side by side with reference systems.

use std::path::PathBuf;

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub(crate) enum BenchCommand {
    /// tract against ONNX Runtime on the bundled models (build with --features ort).
    Runtime {
        /// Path of libonnxruntime.so (from the onnxruntime wheel).
        #[arg(long, env = "ORT_DYLIB_PATH")]
        ort_lib: PathBuf,
        /// Alternating rounds per model.
        #[arg(long, default_value_t = 7)]
        rounds: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// A replica's serving overhead: HTTP end-to-end p50 minus raw inference p50.
    Overhead {
        /// Bundled model file to serve.
        #[arg(long, default_value = "digits-v1.onnx")]
        model: String,
        /// Alternating rounds.
        #[arg(long, default_value_t = 7)]
        rounds: usize,
        /// Requests per round and series.
        #[arg(long, default_value_t = 3000)]
        iterations: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) async fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Runtime {
            ort_lib,
            rounds,
            json,
        } => {
            let ort = shoal_bench::runtime::ort_backend(&ort_lib)?;
            let results = tokio::task::spawn_blocking(move || {
                shoal_bench::runtime::compare(ort.as_ref(), rounds)
            })
            .await??;
            if json {
                println!("{}", serde_json::to_string_pretty(&results)?);
            } else {
                println!(
                    "{:<38} {:>14} {:>12} {:>12} {:>12} {:>12} {:>10}",
                    "model", "shape", "tract p50", "tract p99", "ORT p50", "ORT p99", "p50 ratio"
                );
                for r in results {
                    println!(
                        "{:<38} {:>14} {:>10.1}µs {:>10.1}µs {:>10.1}µs {:>10.1}µs {:>9.2}×",
                        r.model,
                        format!("{:?}", r.shape),
                        r.tract.p50_us,
                        r.tract.p99_us,
                        r.onnxruntime.p50_us,
                        r.onnxruntime.p99_us,
                        r.p50_ratio
                    );
                }
            }
        }
        BenchCommand::Overhead {
            model,
            rounds,
            iterations,
            json,
        } => {
            let r = shoal_bench::overhead::measure(&model, rounds, iterations).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "model {}: {} rounds x {} requests",
                    r.model, rounds, iterations
                );
                println!(
                    "  raw inference  p50 {:>8.1}µs  p99 {:>8.1}µs",
                    r.raw.p50_us, r.raw.p99_us
                );
                println!(
                    "  HTTP end-to-end p50 {:>8.1}µs  p99 {:>8.1}µs",
                    r.http.p50_us, r.http.p99_us
                );
                println!(
                    "  GET /health     p50 {:>8.1}µs  p99 {:>8.1}µs  (HTTP floor, no work)",
                    r.floor.p50_us, r.floor.p99_us
                );
                println!(
                    "  serving overhead (median of per-round p50 differences): {:.1}µs",
                    r.overhead_p50_us
                );
            }
        }
    }
    Ok(())
}
