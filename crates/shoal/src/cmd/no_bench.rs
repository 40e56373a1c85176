//! `shoal bench` in a build without the `bench` feature: the command is
//! still known, and says how to get a build that has it.

/// Whatever was asked of the benchmarks.
#[derive(clap::Args, Debug)]
pub(crate) struct BenchCommand {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    args: Vec<String>,
}

pub(crate) async fn run(_: BenchCommand, _json: bool) -> anyhow::Result<()> {
    anyhow::bail!(
        "this shoal was built without benchmarks; build one with them from a \
         checkout: cargo build --release --features bench"
    )
}
