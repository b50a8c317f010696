//! Project tasks, run as `cargo xtask <command>` (aliased in `.cargo/config.toml`).
//!
//! Every external command goes through [`exec`], so each is printed before it runs and a
//! failure names the command that failed.

mod exec;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

mod bench;
mod build;
mod demo;
mod image;
mod setup;
mod test;
mod vm_test;

/// The subcommands. Each is a module with a clap `Options` struct (its doc comment is the
/// command's help) and `run(Options) -> Result<()>`.
#[derive(Subcommand)]
enum Command {
    Setup(setup::Options),
    Build(build::Options),
    Test(test::Options),
    Demo(demo::Options),
    Bench(bench::Options),
    VmTest(vm_test::Options),
    Image(image::Options),
}

impl Command {
    fn run(self) -> Result<()> {
        match self {
            Command::Setup(options) => setup::run(options),
            Command::Build(options) => build::run(options),
            Command::Test(options) => test::run(options),
            Command::Demo(options) => demo::run(options),
            Command::Bench(options) => bench::run(options),
            Command::VmTest(options) => vm_test::run(options),
            Command::Image(options) => image::run(options),
        }
    }
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
