//! The `chanhost` binary: parses the command line, sets up logging, and
//! prints the cause chain of a fatal error.

use clap::Parser;

fn main() -> std::process::ExitCode {
    chanhost::memory::tune();
    chanhost::logging::init();
    let cli = chanhost::cli::Cli::parse();
    match chanhost::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
