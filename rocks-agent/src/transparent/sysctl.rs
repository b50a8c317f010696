//! The network namespace's sysctls transparent dials need, set to 1 and put back at exit.
//!
//! The values found before the agent changed anything are written to a state file in the run
//! directory first. An agent that was killed never restores them; the next agent with that run
//! directory finds the file and restores those original values at its own exit, rather than
//! mistaking its predecessor's 1 for the host's setting.
use std::{
    fs, io,
    path::{Path, PathBuf},
};

/// A sysctl under `/proc/sys`, named as `sysctl` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Knob {
    pub name: &'static str,
}

impl Knob {
    fn path(self) -> PathBuf {
        Path::new("/proc/sys").join(self.name.replace('.', "/"))
    }

    pub fn exists(self) -> bool {
        self.path().exists()
    }

    pub fn read(self) -> io::Result<String> {
        Ok(fs::read_to_string(self.path())?.trim().to_owned())
    }

    pub fn write(self, value: &str) -> io::Result<()> {
        fs::write(self.path(), value)
    }
}

/// The state file's name in the run directory.
pub const STATE_FILE: &str = "transparent.sysctl";

/// Original values: `name=value` lines.
pub fn parse_state(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .filter(|(k, v)| !k.is_empty() && !v.is_empty())
        .collect()
}

pub fn format_state(originals: &[(String, String)]) -> String {
    originals.iter().map(|(k, v)| format!("{k}={v}\n")).collect()
}

/// Reads the state left by an earlier agent, if any.
pub fn load_state(run_dir: &Path) -> io::Result<Option<Vec<(String, String)>>> {
    match fs::read_to_string(run_dir.join(STATE_FILE)) {
        Ok(text) => Ok(Some(parse_state(&text))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Written before any change, so a crash at any later point leaves the originals on disk.
pub fn save_state(run_dir: &Path, originals: &[(String, String)]) -> io::Result<()> {
    let tmp = run_dir.join(format!("{STATE_FILE}.tmp"));
    fs::write(&tmp, format_state(originals))?;
    fs::rename(tmp, run_dir.join(STATE_FILE))
}

pub fn remove_state(run_dir: &Path) -> io::Result<()> {
    match fs::remove_file(run_dir.join(STATE_FILE)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_ignores_junk() {
        let originals = vec![
            ("net.ipv4.tcp_fwmark_accept".to_owned(), "0".to_owned()),
            ("net.ipv6.fwmark_reflect".to_owned(), "0".to_owned()),
        ];
        assert_eq!(parse_state(&format_state(&originals)), originals);
        assert_eq!(parse_state("junk\n=1\nx=\n a = 2 \n"), vec![("a".to_owned(), "2".to_owned())]);
    }

    #[test]
    fn knob_paths() {
        let k = Knob { name: "net.ipv4.tcp_fwmark_accept" };
        assert_eq!(k.path(), Path::new("/proc/sys/net/ipv4/tcp_fwmark_accept"));
    }
}
