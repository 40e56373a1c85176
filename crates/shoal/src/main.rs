//! The `shoal` binary: parses the command line and hands over to the
//! library crates. Nothing here decides anything.

mod cli;
mod cmd;

fn main() -> std::process::ExitCode {
    cli::main()
}
