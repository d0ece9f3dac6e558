//! The `postwarden` command.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = postwarden::cli::Cli::parse();
    postwarden::cli::init_logging(cli.verbose);
    match postwarden::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
