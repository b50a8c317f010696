//! Running external commands. Actions go through [`run`], which prints the command first and
//! fails with an error naming it; queries go through [`stdout`] and [`probe`], which stay quiet
//! because their output is an answer, not progress.

use std::{
    fmt,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// A command from a fixed line of words split at spaces (no quoting: for literals in this crate).
pub fn command(line: &str) -> Command {
    let mut words = line.split_whitespace();
    let mut cmd = Command::new(words.next().unwrap_or_default());
    cmd.args(words);
    cmd
}

/// Prints `cmd`, runs it with the terminal's stdio, and fails unless it exits with status 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = Shown(cmd).to_string();
    println!("+ {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed: {status}");
    }
    Ok(())
}

/// Runs `cmd` quietly and returns its stdout; fails (with its stderr) unless it exits with 0.
pub fn stdout(cmd: &mut Command) -> Result<String> {
    let shown = Shown(cmd).to_string();
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !output.status.success() {
        bail!(
            "`{shown}` failed: {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    String::from_utf8(output.stdout).with_context(|| format!("`{shown}` printed non-UTF-8 output"))
}

/// `cmd` as a shell line that can be pasted back into a shell, for commands a caller prints
/// itself (the demo prints them only with `--verbose`).
pub fn shown(cmd: &Command) -> String {
    Shown(cmd).to_string()
}

/// Like [`stdout`], for probes where "not installed" or "failed" just means absent.
pub fn probe(cmd: &mut Command) -> Option<String> {
    stdout(cmd).ok()
}

/// A command as a shell line: explicitly set environment variables, program, arguments.
struct Shown<'a>(&'a Command);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cmd = self.0;
        for (key, value) in cmd.get_envs() {
            if let Some(value) = value {
                write!(
                    f,
                    "{}={} ",
                    key.to_string_lossy(),
                    quoted(&value.to_string_lossy())
                )?;
            }
        }
        write!(f, "{}", quoted(&cmd.get_program().to_string_lossy()))?;
        for arg in cmd.get_args() {
            write!(f, " {}", quoted(&arg.to_string_lossy()))?;
        }
        Ok(())
    }
}

/// Single-quotes `s` when a shell would otherwise split or expand it, so a printed command
/// can be pasted back into a shell.
fn quoted(s: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_=+./:,@%".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}
