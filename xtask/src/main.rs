//! Project tasks, run as `cargo xtask <command>` (aliased in `.cargo/config.toml`).
//!
//! Every external command goes through [`exec`], so each is printed before it runs and a
//! failure names the command that failed.

mod exec;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Declares the subcommands. Each is a module with a clap `Options` struct (its doc comment is
/// the command's help) and `run(Options) -> Result<()>`, so adding one is one line below.
macro_rules! subcommands {
    ($($variant:ident => $module:ident),+ $(,)?) => {
        $(mod $module;)+

        #[derive(Subcommand)]
        enum Command {
            $($variant($module::Options),)+
        }

        impl Command {
            fn run(self) -> Result<()> {
                match self {
                    $(Command::$variant(options) => $module::run(options),)+
                }
            }
        }
    };
}

subcommands! {
    Setup => setup,
    Build => build,
    Test => test,
    Demo => demo,
    Bench => bench,
    VmTest => vm_test,
    Image => image,
}

/// Project tasks for rocks.
#[derive(Parser)]
#[command(bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

fn main() -> ExitCode {
    // The error chain alone, without anyhow's backtrace (RUST_BACKTRACE may be set for the
    // programs under test): it names the command or requirement that failed, which is the point.
    match Cli::parse().command.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
