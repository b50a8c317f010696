//! The configuration file (`--config FILE`, TOML): everything the flags of `attach` and `serve`
//! set, under the flags' own long names (`keep-for = "24h"`, `cgroup = ["/sys/fs/cgroup/app"]`).
//! Precedence: a flag given on the command line, then the file, then the flag's default.
//!
//! The file is read into spanned TOML values and each key is converted by hand rather than
//! through a derived `Deserialize`, so every error names the file, the line and the key, and
//! says what was expected (`config file /etc/rocks/agent.toml, line 4: \`keep-for\`: invalid
//! duration "3x": unknown unit ...`). Unknown keys are errors, never ignored: a misspelled key
//! silently falling back to a default is how an outage starts.
use std::{
    collections::BTreeMap,
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::{ArgMatches, parser::ValueSource};
use toml::{Spanned, Value};

use crate::{
    cli::{AttachArgs, CommonArgs, FastPath, Transparent},
    duration,
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read { path: PathBuf, #[source] source: io::Error },
    #[error("config file {path}, line {line}, column {column}: {message}")]
    Syntax { path: PathBuf, line: usize, column: usize, message: String },
    #[error("config file {path}, line {line}: `{key}`: {why}")]
    Key { path: PathBuf, line: usize, key: String, why: String },
    #[error("no cluster secret: give --secret-file FILE, or set `secret-file` in the --config file")]
    MissingSecret,
    #[error(
        "attach needs at least one cgroup: give --cgroup PATH, or set `cgroup = [\"/sys/fs/cgroup/...\"]` \
         in the --config file"
    )]
    MissingCgroups,
}

/// Which command reads the file: `serve` refuses the keys only `attach` understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Attach,
    Serve,
}

/// Keys both commands take (the common options).
const COMMON_KEYS: &[&str] = &["listen", "secret-file", "run-dir", "keep-for", "metrics", "transparent"];
/// Keys only `attach` takes.
const ATTACH_KEYS: &[&str] =
    &["cgroup", "peer-port", "redirect-port", "fast-path", "ports", "exclude-ports", "exclude-cidr", "exclude-cgroup", "negative-ttl", "probe-timeout", "max-connections", "on-exit"];

/// The settings a file holds; `None` for keys it does not set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub listen: Option<SocketAddr>,
    pub secret_file: Option<PathBuf>,
    pub run_dir: Option<PathBuf>,
    pub keep_for: Option<Duration>,
    pub metrics: Option<SocketAddr>,
    pub transparent: Option<Transparent>,
    pub cgroups: Option<Vec<PathBuf>>,
    pub peer_port: Option<u16>,
    pub redirect_port: Option<u16>,
    pub fast_path: Option<FastPath>,
    pub ports: Option<Vec<u16>>,
    pub exclude_ports: Option<Vec<u16>>,
    pub exclude_cidr: Option<Vec<String>>,
    pub exclude_cgroup: Option<Vec<PathBuf>>,
    pub negative_ttl: Option<Duration>,
    pub probe_timeout: Option<Duration>,
    pub max_connections: Option<u64>,
    pub on_exit: Option<crate::cli::OnExit>,
}

impl Config {
    /// Reads and checks `path` for `command`.
    pub fn load(path: &Path, command: Command) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Config::parse(&text, path, command)
    }

    /// Parses the text of the file at `path` (the path names the file in errors, and relative
    /// paths in the file are taken relative to its directory).
    pub fn parse(text: &str, path: &Path, command: Command) -> Result<Config, ConfigError> {
        let mut entries: Vec<(Spanned<String>, Spanned<Value>)> =
            toml::from_str::<BTreeMap<Spanned<String>, Spanned<Value>>>(text)
                .map_err(|e| {
                    let (line, column) = e.span().map(|s| line_column(text, s.start)).unwrap_or((1, 1));
                    ConfigError::Syntax { path: path.to_owned(), line, column, message: e.message().trim().to_owned() }
                })?
                .into_iter()
                .collect();
        // Report problems in the order they appear in the file.
        entries.sort_by_key(|(k, _)| k.span().start);

        let base = path.parent().unwrap_or(Path::new("."));
        let mut config = Config::default();
        for (key, value) in entries {
            let line = line_column(text, key.span().start).0;
            let name = key.get_ref().as_str();
            let fail = |why: String| ConfigError::Key { path: path.to_owned(), line, key: name.to_owned(), why };
            if command == Command::Serve && ATTACH_KEYS.contains(&name) {
                return Err(fail("only `rocks-agent attach` takes this key; remove it for `serve`".to_owned()));
            }
            let v = value.get_ref();
            match name {
                "listen" => config.listen = Some(socket_addr(v).map_err(fail)?),
                "secret-file" => config.secret_file = Some(file_path(v, base).map_err(fail)?),
                "run-dir" => config.run_dir = Some(file_path(v, base).map_err(fail)?),
                "keep-for" => config.keep_for = Some(duration_value(v).map_err(fail)?),
                "metrics" => config.metrics = Some(socket_addr(v).map_err(fail)?),
                "transparent" => config.transparent = Some(transparent(v).map_err(fail)?),
                "cgroup" => config.cgroups = Some(path_list(v, base).map_err(fail)?),
                "peer-port" => config.peer_port = Some(port(v).map_err(fail)?),
                "redirect-port" => config.redirect_port = Some(port(v).map_err(fail)?),
                "fast-path" => config.fast_path = Some(fast_path(v).map_err(fail)?),
                "ports" => config.ports = Some(port_list(v).map_err(fail)?),
                "exclude-ports" => config.exclude_ports = Some(port_list(v).map_err(fail)?),
                "exclude-cidr" => config.exclude_cidr = Some(cidr_list(v).map_err(fail)?),
                // May be empty: excluding nothing is a valid policy.
                "exclude-cgroup" => {
                    config.exclude_cgroup =
                        Some(if v.as_array().is_some_and(Vec::is_empty) { Vec::new() } else { path_list(v, base).map_err(fail)? })
                }
                "negative-ttl" => config.negative_ttl = Some(duration_value(v).map_err(fail)?),
                "probe-timeout" => config.probe_timeout = Some(duration_value(v).map_err(fail)?),
                "max-connections" => config.max_connections = Some(count(v).map_err(fail)?),
                "on-exit" => config.on_exit = Some(on_exit(v).map_err(fail)?),
                other => return Err(fail(unknown_key(other, command))),
            }
        }
        Ok(config)
    }
}

/// `attach`: fills every option not given on the command line from `--config`, then checks
/// that the required ones (secret, at least one cgroup) came from somewhere.
pub fn resolve_attach(args: &mut AttachArgs, matches: &ArgMatches) -> Result<(), ConfigError> {
    if let Some(path) = args.common.config.clone() {
        let config = Config::load(&path, Command::Attach)?;
        apply_common(&mut args.common, matches, &config);
        let from_file = |id: &str| !given(matches, id);
        if let (true, Some(v)) = (from_file("cgroups"), &config.cgroups) {
            args.cgroups.clone_from(v);
        }
        if let (true, Some(v)) = (from_file("peer_port"), config.peer_port) {
            args.peer_port = v;
        }
        if let (true, Some(v)) = (from_file("redirect_port"), config.redirect_port) {
            args.redirect_port = v;
        }
        if let (true, Some(v)) = (from_file("fast_path"), config.fast_path) {
            args.fast_path = v;
        }
        if let (true, Some(v)) = (from_file("ports"), &config.ports) {
            args.ports = Some(v.clone());
        }
        if let (true, Some(v)) = (from_file("exclude_ports"), &config.exclude_ports) {
            args.exclude_ports.clone_from(v);
        }
        if let (true, Some(v)) = (from_file("exclude_cidr"), &config.exclude_cidr) {
            args.exclude_cidr.clone_from(v);
        }
        if let (true, Some(v)) = (from_file("exclude_cgroup"), &config.exclude_cgroup) {
            args.exclude_cgroup.clone_from(v);
        }
        if let (true, Some(v)) = (from_file("negative_ttl"), config.negative_ttl) {
            args.negative_ttl = v;
        }
        if let (true, Some(v)) = (from_file("probe_timeout"), config.probe_timeout) {
            args.probe_timeout = v;
        }
        if let (true, Some(v)) = (from_file("max_connections"), config.max_connections) {
            args.max_connections = Some(v);
        }
        if let (true, Some(v)) = (from_file("on_exit"), config.on_exit) {
            args.on_exit = v;
        }
    }
    if args.common.secret_file.is_none() {
        return Err(ConfigError::MissingSecret);
    }
    if args.cgroups.is_empty() {
        return Err(ConfigError::MissingCgroups);
    }
    Ok(())
}

/// `serve`: as [`resolve_attach`], for the common options only.
pub fn resolve_serve(args: &mut CommonArgs, matches: &ArgMatches) -> Result<(), ConfigError> {
    if let Some(path) = args.config.clone() {
        let config = Config::load(&path, Command::Serve)?;
        apply_common(args, matches, &config);
    }
    if args.secret_file.is_none() {
        return Err(ConfigError::MissingSecret);
    }
    Ok(())
}

fn apply_common(args: &mut CommonArgs, matches: &ArgMatches, config: &Config) {
    let from_file = |id: &str| !given(matches, id);
    if let (true, Some(v)) = (from_file("listen"), config.listen) {
        args.listen = v;
    }
    if let (true, Some(v)) = (from_file("secret_file"), &config.secret_file) {
        args.secret_file = Some(v.clone());
    }
    if let (true, Some(v)) = (from_file("run_dir"), &config.run_dir) {
        args.run_dir.clone_from(v);
    }
    if let (true, Some(v)) = (from_file("keep_for"), config.keep_for) {
        args.keep_for = v;
    }
    if let (true, Some(v)) = (from_file("metrics"), config.metrics) {
        args.metrics = Some(v);
    }
    if let (true, Some(v)) = (from_file("transparent"), config.transparent) {
        args.transparent = v;
    }
}

/// Whether the option with clap id `id` was given on the command line (not a default).
fn given(matches: &ArgMatches, id: &str) -> bool {
    matches.value_source(id) == Some(ValueSource::CommandLine)
}

fn unknown_key(key: &str, command: Command) -> String {
    let known: Vec<&str> = match command {
        Command::Attach => COMMON_KEYS.iter().chain(ATTACH_KEYS).copied().collect(),
        Command::Serve => COMMON_KEYS.to_vec(),
    };
    let dashed = key.replace('_', "-");
    if dashed != key && known.contains(&dashed.as_str()) {
        return format!("unknown key (keys are the flag names with dashes: did you mean `{dashed}`?)");
    }
    if key == "cgroups" && command == Command::Attach {
        return "unknown key (did you mean `cgroup`? It takes a list, like repeating --cgroup)".to_owned();
    }
    format!("unknown key (known keys: {})", known.join(", "))
}

/// 1-based line and column of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

fn found(v: &Value) -> String {
    match v {
        Value::String(s) => format!("the string {s:?}"),
        Value::Integer(i) => format!("the integer {i}"),
        Value::Float(f) => format!("the float {f}"),
        Value::Boolean(b) => format!("the boolean {b}"),
        Value::Datetime(d) => format!("the date-time {d}"),
        Value::Array(_) => "an array".to_owned(),
        Value::Table(_) => "a table".to_owned(),
    }
}

fn string<'a>(v: &'a Value, expected: &str) -> Result<&'a str, String> {
    v.as_str().ok_or_else(|| format!("expected {expected}, found {}", found(v)))
}

fn socket_addr(v: &Value) -> Result<SocketAddr, String> {
    const EXPECTED: &str = "an address and port as a string, such as \"[::]:4470\" or \"127.0.0.1:9470\"";
    let s = string(v, EXPECTED)?;
    s.parse().map_err(|_| format!("expected {EXPECTED}, found {s:?}"))
}

fn file_path(v: &Value, base: &Path) -> Result<PathBuf, String> {
    let s = string(v, "a path as a string")?;
    if s.is_empty() {
        return Err("expected a path, found an empty string".to_owned());
    }
    Ok(base.join(s))
}

fn path_list(v: &Value, base: &Path) -> Result<Vec<PathBuf>, String> {
    const EXPECTED: &str = "a list of paths, such as [\"/sys/fs/cgroup/app\"]";
    let items = v.as_array().ok_or_else(|| format!("expected {EXPECTED}, found {}", found(v)))?;
    if items.is_empty() {
        return Err(format!("expected {EXPECTED}, found an empty list"));
    }
    items.iter().map(|item| file_path(item, base).map_err(|e| format!("{e} in the list"))).collect()
}

fn duration_value(v: &Value) -> Result<Duration, String> {
    let s = string(v, "a duration as a string, such as \"72h\", \"10m\" or \"1s\"")?;
    duration::parse(s).map_err(|e| e.to_string())
}

fn port(v: &Value) -> Result<u16, String> {
    match v.as_integer() {
        Some(n) => match u16::try_from(n) {
            Ok(p) if p != 0 => Ok(p),
            _ => Err(format!("expected a port number (1-65535), found {n}")),
        },
        None => Err(format!("expected a port number (1-65535), found {}", found(v))),
    }
}

fn port_list(v: &Value) -> Result<Vec<u16>, String> {
    const EXPECTED: &str = "a list of port numbers, such as [22, 443]";
    let items = v.as_array().ok_or_else(|| format!("expected {EXPECTED}, found {}", found(v)))?;
    items.iter().map(|item| port(item).map_err(|e| format!("{e} in the list"))).collect()
}

fn transparent(v: &Value) -> Result<Transparent, String> {
    match v {
        Value::String(s) if s == "on" => Ok(Transparent::On),
        Value::String(s) if s == "off" => Ok(Transparent::Off),
        Value::Boolean(true) => Ok(Transparent::On),
        Value::Boolean(false) => Ok(Transparent::Off),
        other => Err(format!("expected \"on\" or \"off\", found {}", found(other))),
    }
}

/// A positive whole number (the range is checked where the value is used).
fn count(v: &Value) -> Result<u64, String> {
    match v.as_integer() {
        Some(n) if n > 0 => Ok(n as u64),
        Some(n) => Err(format!("expected a positive number, found {n}")),
        None => Err(format!("expected a positive number, found {}", found(v))),
    }
}

/// Prefixes are checked where every policy is (`policy::Cidr::parse`), which names the value;
/// here each is checked once more so the error also names the file's line.
fn cidr_list(v: &Value) -> Result<Vec<String>, String> {
    const EXPECTED: &str = "a list of prefixes, such as [\"10.0.0.0/8\", \"fd00::/8\"]";
    let items = v.as_array().ok_or_else(|| format!("expected {EXPECTED}, found {}", found(v)))?;
    items
        .iter()
        .map(|item| {
            let s = string(item, "a prefix as a string, such as \"10.0.0.0/8\"").map_err(|e| format!("{e} in the list"))?;
            crate::policy::Cidr::parse(s).map_err(|e| e.to_string())?;
            Ok(s.to_owned())
        })
        .collect()
}

fn on_exit(v: &Value) -> Result<crate::cli::OnExit, String> {
    match v {
        Value::String(s) if s == "detach" => Ok(crate::cli::OnExit::Detach),
        Value::String(s) if s == "keep" => Ok(crate::cli::OnExit::Keep),
        other => Err(format!("expected \"detach\" or \"keep\", found {}", found(other))),
    }
}

fn fast_path(v: &Value) -> Result<FastPath, String> {
    match v {
        Value::String(s) if s == "on" => Ok(FastPath::On),
        Value::String(s) if s == "off" => Ok(FastPath::Off),
        Value::String(s) if s == "auto" => Ok(FastPath::Auto),
        Value::Boolean(true) => Ok(FastPath::On),
        Value::Boolean(false) => Ok(FastPath::Off),
        other => Err(format!("expected \"on\", \"off\" or \"auto\", found {}", found(other))),
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, FromArgMatches as _};

    use super::*;
    use crate::cli::{self, Cli};

    const FILE: &str = "/etc/rocks/agent.toml";

    fn parse(text: &str, command: Command) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new(FILE), command)
    }

    fn err(text: &str, command: Command) -> String {
        parse(text, command).expect_err("should be refused").to_string()
    }

    #[test]
    fn every_key_of_attach() {
        let text = r#"
            # every option
            listen = "0.0.0.0:4480"
            secret-file = "/etc/rocks/cluster.secret"
            run-dir = "rocks-run"
            keep-for = "24h"
            metrics = "127.0.0.1:9470"
            cgroup = ["/sys/fs/cgroup/a", "/sys/fs/cgroup/b"]
            peer-port = 4480
            redirect-port = 4481
            fast-path = "off"
            ports = [22, 443]
            exclude-ports = [25]
            negative-ttl = "5m"
            probe-timeout = "250ms"
        "#;
        let c = parse(text, Command::Attach).unwrap();
        assert_eq!(c.listen, Some("0.0.0.0:4480".parse().unwrap()));
        assert_eq!(c.secret_file, Some(PathBuf::from("/etc/rocks/cluster.secret")));
        assert_eq!(c.run_dir, Some(PathBuf::from("/etc/rocks/rocks-run")), "relative to the file's directory");
        assert_eq!(c.keep_for, Some(Duration::from_secs(24 * 3600)));
        assert_eq!(c.metrics, Some("127.0.0.1:9470".parse().unwrap()));
        assert_eq!(c.cgroups, Some(vec![PathBuf::from("/sys/fs/cgroup/a"), PathBuf::from("/sys/fs/cgroup/b")]));
        assert_eq!((c.peer_port, c.redirect_port), (Some(4480), Some(4481)));
        assert_eq!(c.fast_path, Some(FastPath::Off));
        assert_eq!(c.ports, Some(vec![22, 443]));
        assert_eq!(c.exclude_ports, Some(vec![25]));
        assert_eq!(c.negative_ttl, Some(Duration::from_secs(300)));
        assert_eq!(c.probe_timeout, Some(Duration::from_millis(250)));
        assert_eq!(parse("", Command::Attach).unwrap(), Config::default());
        assert_eq!(parse("fast-path = true", Command::Attach).unwrap().fast_path, Some(FastPath::On));
        assert_eq!(parse("fast-path = \"auto\"", Command::Attach).unwrap().fast_path, Some(FastPath::Auto));
    }

    #[test]
    fn transparent_is_a_common_key() {
        assert_eq!(parse("transparent = \"off\"", Command::Serve).unwrap().transparent, Some(Transparent::Off));
        assert_eq!(parse("transparent = true", Command::Attach).unwrap().transparent, Some(Transparent::On));
        let e = err("transparent = \"maybe\"", Command::Serve);
        assert!(e.contains("`transparent`: expected \"on\" or \"off\""), "{e}");
    }

    #[test]
    fn max_connections_is_a_positive_number() {
        assert_eq!(parse("max-connections = 5", Command::Attach).unwrap().max_connections, Some(5));
        let e = err("max-connections = \"5\"", Command::Attach);
        assert!(e.contains("`max-connections`: expected a positive number, found the string \"5\""), "{e}");
        let e = err("max-connections = 0", Command::Attach);
        assert!(e.contains("expected a positive number, found 0"), "{e}");
        let e = err("max-connections = 5", Command::Serve);
        assert!(e.contains("only `rocks-agent attach`"), "{e}");
    }

    #[test]
    fn on_exit_is_detach_or_keep() {
        assert_eq!(parse("on-exit = \"keep\"", Command::Attach).unwrap().on_exit, Some(cli::OnExit::Keep));
        assert_eq!(parse("on-exit = \"detach\"", Command::Attach).unwrap().on_exit, Some(cli::OnExit::Detach));
        let e = err("on-exit = \"stay\"", Command::Attach);
        assert!(e.contains("`on-exit`: expected \"detach\" or \"keep\", found the string \"stay\""), "{e}");
        let e = err("on-exit = \"keep\"", Command::Serve);
        assert!(e.contains("only `rocks-agent attach`"), "{e}");
    }

    #[test]
    fn unknown_keys_name_the_key_and_line() {
        let e = err("keep-for = \"1h\"\n\nbogus = 1\n", Command::Attach);
        assert!(e.starts_with("config file /etc/rocks/agent.toml, line 3: `bogus`: unknown key (known keys: listen,"), "{e}");
        let e = err("keep_for = \"1h\"", Command::Attach);
        assert!(e.contains("line 1: `keep_for`: unknown key") && e.contains("did you mean `keep-for`?"), "{e}");
        let e = err("cgroups = [\"/x\"]", Command::Attach);
        assert!(e.contains("did you mean `cgroup`?"), "{e}");
        // A table is not a way around the check.
        let e = err("[attach]\ncgroup = [\"/x\"]\n", Command::Attach);
        assert!(e.contains("line 1: `attach`: unknown key"), "{e}");
    }

    #[test]
    fn attach_only_keys_are_refused_by_serve() {
        let e = err("listen = \"[::]:4470\"\ncgroup = [\"/sys/fs/cgroup/a\"]\n", Command::Serve);
        assert!(e.contains("line 2: `cgroup`: only `rocks-agent attach` takes this key"), "{e}");
        let e = err("negative-ttl = \"1m\"", Command::Serve);
        assert!(e.contains("`negative-ttl`: only `rocks-agent attach`"), "{e}");
        assert!(parse("listen = \"[::]:4470\"\nkeep-for = \"1h\"\n", Command::Serve).is_ok());
    }

    #[test]
    fn wrong_types_say_what_was_expected() {
        let cases = [
            ("peer-port = \"4470\"", "line 1: `peer-port`: expected a port number (1-65535), found the string \"4470\""),
            ("peer-port = 70000", "`peer-port`: expected a port number (1-65535), found 70000"),
            ("peer-port = 0", "found 0"),
            ("listen = 4470", "`listen`: expected an address and port as a string"),
            ("listen = \"localhost\"", "found \"localhost\""),
            ("keep-for = 72", "`keep-for`: expected a duration as a string, such as \"72h\""),
            ("cgroup = \"/sys/fs/cgroup/a\"", "`cgroup`: expected a list of paths, such as [\"/sys/fs/cgroup/app\"], found the string"),
            ("cgroup = []", "found an empty list"),
            ("cgroup = [1]", "expected a path as a string, found the integer 1 in the list"),
            ("ports = [22, \"ssh\"]", "`ports`: expected a port number (1-65535), found the string \"ssh\" in the list"),
            ("fast-path = \"maybe\"", "`fast-path`: expected \"on\", \"off\" or \"auto\", found the string \"maybe\""),
            ("secret-file = \"\"", "`secret-file`: expected a path, found an empty string"),
            ("run-dir = true", "`run-dir`: expected a path as a string, found the boolean true"),
        ];
        for (text, want) in cases {
            let e = err(&format!("# comment\n{text}\n"), Command::Attach);
            assert!(e.starts_with("config file /etc/rocks/agent.toml, line 2: "), "{text}: {e}");
            assert!(e.contains(want.trim_start_matches("line 1: ")), "{text}: {e}");
        }
    }

    #[test]
    fn bad_durations_name_key_line_and_value() {
        let e = err("listen = \"[::]:4470\"\nkeep-for = \"3x\"\n", Command::Attach);
        assert_eq!(
            e,
            "config file /etc/rocks/agent.toml, line 2: `keep-for`: invalid duration \"3x\": unknown unit \
             (examples: 72h, 10m, 5s, 250ms, 1h30m)"
        );
        let e = err("probe-timeout = \"5\"", Command::Attach);
        assert!(e.contains("line 1: `probe-timeout`: invalid duration \"5\": missing unit"), "{e}");
    }

    #[test]
    fn syntax_errors_give_line_and_column() {
        let e = err("listen = \"[::]:4470\"\nkeep-for = \n", Command::Attach);
        assert!(e.starts_with("config file /etc/rocks/agent.toml, line 2, column "), "{e}");
        let e = err("a = 1\na = 2\n", Command::Attach);
        assert!(e.contains("line 2") && e.contains("duplicate key"), "{e}");
    }

    /// Parses `argv` as the real CLI does, then resolves it against the config `text`.
    fn attach_with(argv: &[&str], text: &str) -> Result<AttachArgs, ConfigError> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let file = std::env::temp_dir().join(format!("rocks-config-test-{}-{n}.toml", std::process::id()));
        std::fs::write(&file, text).unwrap();
        let mut full = vec!["rocks-agent", "attach", "--config", file.to_str().unwrap()];
        full.extend_from_slice(argv);
        let matches = Cli::command().try_get_matches_from(full).expect("argv parses");
        let cli = Cli::from_arg_matches(&matches).unwrap();
        let cli::Command::Attach(mut args) = cli.command else { panic!("not attach") };
        let result = resolve_attach(&mut args, matches.subcommand_matches("attach").unwrap());
        let _ = std::fs::remove_file(&file);
        result.map(|()| args)
    }

    #[test]
    fn flags_override_the_file_and_the_file_overrides_defaults() {
        let text = r#"
            secret-file = "/etc/rocks/cluster.secret"
            cgroup = ["/sys/fs/cgroup/from-file"]
            keep-for = "1h"
            listen = "0.0.0.0:4480"
            probe-timeout = "2s"
            ports = [22]
            metrics = "127.0.0.1:9470"
        "#;
        let args = attach_with(&[], text).unwrap();
        assert_eq!(args.cgroups, vec![PathBuf::from("/sys/fs/cgroup/from-file")]);
        assert_eq!(args.common.keep_for, Duration::from_secs(3600));
        assert_eq!(args.common.listen, "0.0.0.0:4480".parse().unwrap());
        assert_eq!(args.common.secret_file, Some(PathBuf::from("/etc/rocks/cluster.secret")));
        assert_eq!(args.common.metrics, Some("127.0.0.1:9470".parse().unwrap()));
        assert_eq!(args.probe_timeout, Duration::from_secs(2));
        assert_eq!(args.ports, Some(vec![22]));
        // Not in the file: the flag's default.
        assert_eq!(args.negative_ttl, Duration::from_secs(600));
        assert_eq!(args.common.run_dir, PathBuf::from("/run/rocks"));

        let args = attach_with(
            &["--cgroup", "/sys/fs/cgroup/flag", "--keep-for", "5m", "--listen", "[::]:4470", "--ports", "80,443"],
            text,
        )
        .unwrap();
        assert_eq!(args.cgroups, vec![PathBuf::from("/sys/fs/cgroup/flag")], "flags replace the file's list");
        assert_eq!(args.common.keep_for, Duration::from_secs(300));
        assert_eq!(args.common.listen, "[::]:4470".parse().unwrap());
        assert_eq!(args.ports, Some(vec![80, 443]));
        assert_eq!(args.probe_timeout, Duration::from_secs(2), "still from the file");
        // A flag given with its default value still wins over the file.
        let args = attach_with(&["--keep-for", "72h"], text).unwrap();
        assert_eq!(args.common.keep_for, Duration::from_secs(72 * 3600));
    }

    #[test]
    fn required_options_may_come_from_either_place() {
        assert!(matches!(attach_with(&[], "cgroup = [\"/x\"]"), Err(ConfigError::MissingSecret)));
        assert!(matches!(attach_with(&[], "secret-file = \"/s\""), Err(ConfigError::MissingCgroups)));
        let args = attach_with(&["--secret-file", "/flag.secret"], "cgroup = [\"/x\"]").unwrap();
        assert_eq!(args.common.secret_file, Some(PathBuf::from("/flag.secret")));
        // Without --config, clap itself insists on both.
        assert!(Cli::command().try_get_matches_from(["rocks-agent", "attach", "--secret-file", "/s"]).is_err());
        assert!(Cli::command().try_get_matches_from(["rocks-agent", "serve"]).is_err());
        assert!(Cli::command().try_get_matches_from(["rocks-agent", "serve", "--config", "/c.toml"]).is_ok());
    }

    #[test]
    fn policy_keys() {
        let c = parse(
            "exclude-cidr = [\"10.0.0.0/8\", \"fd00::/8\"]\nexclude-cgroup = [\"/sys/fs/cgroup/app/batch\"]\n",
            Command::Attach,
        )
        .unwrap();
        assert_eq!(c.exclude_cidr, Some(vec!["10.0.0.0/8".to_owned(), "fd00::/8".to_owned()]));
        assert_eq!(c.exclude_cgroup, Some(vec![PathBuf::from("/sys/fs/cgroup/app/batch")]));
        assert_eq!(parse("exclude-cgroup = []", Command::Attach).unwrap().exclude_cgroup, Some(vec![]));
        let e = err("# c\nexclude-cidr = [\"10.0.0.0/8\", \"10.1.0.0/8\"]\n", Command::Attach);
        assert!(
            e.starts_with("config file /etc/rocks/agent.toml, line 2: `exclude-cidr`: invalid --exclude-cidr value \"10.1.0.0/8\": ")
                && e.contains("did you mean 10.0.0.0/8?"),
            "{e}"
        );
        let e = err("exclude-cidr = \"10.0.0.0/8\"", Command::Attach);
        assert!(e.contains("expected a list of prefixes"), "{e}");
        let e = err("exclude-cidr = [8]", Command::Attach);
        assert!(e.contains("expected a prefix as a string, such as \"10.0.0.0/8\", found the integer 8 in the list"), "{e}");
        let e = err("exclude-cidr = []", Command::Serve);
        assert!(e.contains("only `rocks-agent attach`"), "{e}");

        // The file fills what the command line leaves out; a flag replaces the file's list.
        let text = "secret-file = \"/s\"\ncgroup = [\"/sys/fs/cgroup/app\"]\nexclude-cidr = [\"10.0.0.0/8\"]\n\
                    exclude-cgroup = [\"/sys/fs/cgroup/app/batch\"]\n";
        let args = attach_with(&[], text).unwrap();
        assert_eq!(args.exclude_cidr, ["10.0.0.0/8"]);
        assert_eq!(args.exclude_cgroup, [PathBuf::from("/sys/fs/cgroup/app/batch")]);
        let args = attach_with(&["--exclude-cidr", "fd00::/8,192.0.2.0/24"], text).unwrap();
        assert_eq!(args.exclude_cidr, ["fd00::/8", "192.0.2.0/24"]);
        assert_eq!(args.exclude_cgroup, [PathBuf::from("/sys/fs/cgroup/app/batch")]);
    }

    /// The sample configurations shipped in `deploy/` parse.
    #[test]
    fn shipped_configs_parse() {
        let systemd = include_str!("../../deploy/systemd/agent.toml");
        let c = parse(systemd, Command::Attach).unwrap();
        assert!(c.secret_file.is_some() && c.cgroups.is_some(), "{c:?}");

        // The DaemonSet's ConfigMap holds the file as a block scalar under `agent.toml: |`.
        let manifest = include_str!("../../deploy/kubernetes/03-configmap.yaml");
        let mut lines = manifest.lines().skip_while(|l| l.trim() != "agent.toml: |").skip(1).peekable();
        let indent = lines.peek().map(|l| l.len() - l.trim_start().len()).expect("agent.toml block");
        let toml: String = lines
            .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() >= indent)
            .map(|l| format!("{}\n", l.get(indent..).unwrap_or("")))
            .collect();
        let c = parse(&toml, Command::Attach).unwrap();
        assert!(c.secret_file.is_some() && c.cgroups.is_some() && c.metrics.is_some(), "{c:?}");
    }
}
