//! `rocks-agent`: a thin CLI over the library.
use std::process::ExitCode;

use clap::{ArgMatches, CommandFactory as _, FromArgMatches as _};
use rocks_agent::{agent, cli, config, control, policy, secret::Secret};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // The matches are kept beside the parsed options: `--config` needs to know which options
    // were given on the command line (they override the file) and which are defaults.
    let matches = cli::Cli::command().get_matches();
    let cli = cli::Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rocks-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command, &matches)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rocks-agent: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: cli::Command, matches: &ArgMatches) -> anyhow::Result<()> {
    let sub = |name| matches.subcommand_matches(name).expect("clap parsed this subcommand");
    match command {
        cli::Command::Attach(mut args) => {
            config::resolve_attach(&mut args, sub("attach"))?;
            agent::attach(args, agent::shutdown_signal()).await
        }
        cli::Command::Serve(mut args) => {
            config::resolve_serve(&mut args, sub("serve"))?;
            agent::serve(args, agent::shutdown_signal()).await
        }
        cli::Command::Status(args) => {
            let report = control::query_status(&args.run_dir).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", control::render_table(&report));
            }
            Ok(())
        }
        cli::Command::Policy(args) => {
            let change = args.change().map_err(anyhow::Error::msg)?;
            let policy = if change.is_empty() {
                let report = control::query_status(&args.run_dir).await?;
                report.policy.ok_or_else(|| {
                    anyhow::anyhow!("the agent runs `serve`: it redirects nothing and has no policy")
                })?
            } else {
                control::set_policy(&args.run_dir, change).await?
            };
            if args.json {
                println!("{}", serde_json::to_string_pretty(&policy)?);
            } else {
                print!("{}", policy::render(&policy));
            }
            Ok(())
        }
        cli::Command::FastPath(args) => {
            let status = control::set_fast_path(&args.run_dir, args.mode).await?;
            println!("{}", serde_json::to_string_pretty(&status)?);
            Ok(())
        }
        cli::Command::Detach(args) => agent::detach_leftovers(&args.run_dir).await,
        cli::Command::Keygen(args) => {
            Secret::generate().write_new(&args.out)?;
            eprintln!("rocks-agent: wrote a new cluster secret to {}", args.out.display());
            Ok(())
        }
    }
}
