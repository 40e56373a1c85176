//! The `shoal` binary: parses the command line and hands over to the
//! library crates. Nothing here decides anything.

mod cli;
mod cmd;

/// jemalloc rather than glibc's malloc: a replica loads each new version
/// on whichever blocking thread is free, and glibc gives threads arenas of
/// their own that keep what a retired version freed. RSS grew by the size
/// of a version at every deploy (20 MiB model: 92 → 356 MiB over six)
/// and would keep growing until there was an arena per thread.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    cli::main()
}
