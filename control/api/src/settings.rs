//! Configuration files for the daemons: `/etc/mesh/meshd.toml` for `meshd run`,
//! `/etc/mesh/mesh-control.toml` for `mesh-control run`. Every flag of the configured command
//! is a key of the same name (`state-dir = "/var/lib/meshd"`, `no-dataplane = true`, a list for
//! a flag given several times); a flag on the command line wins over its environment variable,
//! which wins over the file, which wins over the default. The file's values go through the same
//! parsers as the flags, so a bad value is refused as a bad flag would be, named by file and
//! line; a key the command does not have is refused with the keys it does.
//!
//! [`Layered::resolve`] reads the file and gives the arguments to parse with the file's settings
//! in them; [`Layered::render`] shows the effective configuration with where each value came
//! from (`--print-config`).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;

/// The flag that names the file.
pub const CONFIG_FLAG: &str = "config";
/// The flag that shows the effective configuration and exits.
pub const PRINT_FLAG: &str = "print-config";

/// A configuration file's settings, layered under a command line.
#[derive(Debug, Default)]
pub struct Layered {
    /// The file read, if any.
    path: Option<PathBuf>,
    /// Key -> the line of the file that set it, for the keys the file put in the arguments.
    from_file: BTreeMap<String, usize>,
}

/// Where an effective value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    CommandLine,
    Environment(String),
    File(PathBuf, usize),
    Default,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::CommandLine => write!(f, "command line"),
            Origin::Environment(name) => write!(f, "environment {name}"),
            Origin::File(path, line) => write!(f, "{}:{line}", path.display()),
            Origin::Default => write!(f, "default"),
        }
    }
}

impl Layered {
    /// The arguments `args` (program name first) with the settings of the configuration file in
    /// them, for subcommand `configured` of `cli`: the file named by `--config FILE`, else by
    /// the environment variable `env`, else `default` when it exists. Other subcommands get the
    /// file's keys they share with `configured` (`state-dir`, say); a command line without a
    /// subcommand, or asking for help, is left as it is.
    pub fn resolve(
        cli: &clap::Command,
        configured: &str,
        args: Vec<OsString>,
        env: &str,
        default: &Path,
    ) -> Result<(Layered, Vec<OsString>), String> {
        // The subcommand: the first word that is neither a flag nor `--config`'s value.
        let mut sub_at = None;
        let mut i = 1;
        while i < args.len() {
            let arg = args[i].to_string_lossy();
            if arg == format!("--{CONFIG_FLAG}") {
                i += 2;
                continue;
            }
            if !arg.starts_with('-') {
                sub_at = Some(i);
                break;
            }
            i += 1;
        }
        let Some(sub_at) = sub_at else { return Ok((Layered::default(), args)) };
        let name = args[sub_at].to_string_lossy().into_owned();
        let (Some(sub), Some(keys)) = (cli.find_subcommand(&name), cli.find_subcommand(configured)) else {
            return Ok((Layered::default(), args));
        };
        let user = &args[sub_at + 1..];
        if user.iter().any(|a| a == "--help" || a == "-h") {
            return Ok((Layered::default(), args));
        }
        let named = flag_value(&args[1..], CONFIG_FLAG).map(PathBuf::from);
        let path = match (named, std::env::var_os(env)) {
            (Some(path), _) => path,
            (None, Some(path)) if !path.is_empty() => PathBuf::from(path),
            _ if default.exists() => default.to_owned(),
            _ => return Ok((Layered::default(), args)),
        };
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read the configuration file {}: {e}", path.display()))?;
        let entries = parse(&path, &text)?;
        let known: Vec<&str> = settable(keys).map(|a| a.get_long().expect("a long flag")).collect();
        let mut inserted = Vec::new();
        let mut from_file = BTreeMap::new();
        for (key, (value, line)) in &entries {
            let at = |message: String| format!("{}:{line}: {message}", path.display());
            if !known.contains(&key.as_str()) {
                return Err(at(format!("unknown key `{key}`; the keys are: {}", known.join(", "))));
            }
            // Only the keys this subcommand has; the command line and environment win.
            let Some(arg) = settable(sub).find(|a| a.get_long() == Some(key)) else { continue };
            let overridden = flag_given(user, key)
                || arg.get_env().is_some_and(|e| std::env::var_os(e).is_some_and(|v| !v.is_empty()));
            if overridden {
                continue;
            }
            let switch = matches!(arg.get_action(), clap::ArgAction::SetTrue);
            match (value, switch) {
                (toml::Value::Boolean(true), true) => inserted.push(format!("--{key}")),
                (toml::Value::Boolean(false), true) => {}
                (_, true) => return Err(at(format!("`{key}` is true or false"))),
                (toml::Value::Array(items), false) => {
                    for item in items {
                        inserted.push(format!("--{key}={}", scalar(item).map_err(&at)?));
                    }
                }
                (value, false) => inserted.push(format!("--{key}={}", scalar(value).map_err(&at)?)),
            }
            from_file.insert(key.clone(), *line);
        }
        let mut resolved: Vec<OsString> = args[..=sub_at].to_vec();
        resolved.extend(inserted.into_iter().map(OsString::from));
        resolved.extend(user.iter().cloned());
        Ok((Layered { path: Some(path), from_file }, resolved))
    }

    /// A parse error of the resolved arguments, named by file and line when the bad value came
    /// from the file.
    pub fn explain(&self, error: clap::Error) -> clap::Error {
        let Some(path) = &self.path else { return error };
        let arg = match error.get(clap::error::ContextKind::InvalidArg) {
            Some(clap::error::ContextValue::String(arg)) => arg.clone(),
            _ => return error,
        };
        let key = arg.trim_start_matches("--").split([' ', '=', '<']).next().unwrap_or_default();
        match self.from_file.get(key) {
            Some(line) => {
                let message = error.render().to_string();
                let message = message.trim_start_matches("error: ");
                clap::Error::raw(error.kind(), format!("{}:{line}: {message}", path.display()))
            }
            None => error,
        }
    }

    /// Where the value of `key` in `matches` came from.
    pub fn origin(&self, matches: &clap::ArgMatches, arg: &clap::Arg) -> Origin {
        let key = arg.get_long().unwrap_or_default();
        match matches.value_source(arg.get_id().as_str()) {
            Some(ValueSource::CommandLine) => match (&self.path, self.from_file.get(key)) {
                (Some(path), Some(line)) => Origin::File(path.clone(), *line),
                _ => Origin::CommandLine,
            },
            Some(ValueSource::EnvVariable) => Origin::Environment(
                arg.get_env().map(|e| e.to_string_lossy().into_owned()).unwrap_or_default(),
            ),
            _ => Origin::Default,
        }
    }

    /// The effective configuration of subcommand `sub` as parsed in `matches`, a key per line
    /// (in the file's syntax) with where it came from; values of `secret` keys are not shown.
    pub fn render(&self, sub: &clap::Command, matches: &clap::ArgMatches, secret: &[&str]) -> String {
        let mut out = match &self.path {
            Some(path) => format!("# configuration file: {}\n", path.display()),
            None => "# no configuration file\n".to_owned(),
        };
        for arg in settable(sub) {
            let key = arg.get_long().expect("a long flag");
            let id = arg.get_id().as_str();
            let switch = matches!(arg.get_action(), clap::ArgAction::SetTrue);
            let value = if switch {
                Some(matches.get_flag(id).to_string())
            } else {
                matches.get_raw(id).map(|values| {
                    let values: Vec<String> = values
                        .map(|v| toml::Value::String(v.to_string_lossy().into_owned()).to_string())
                        .collect();
                    if values.len() == 1 && !matches!(arg.get_action(), clap::ArgAction::Append) {
                        values[0].clone()
                    } else {
                        format!("[{}]", values.join(", "))
                    }
                })
            };
            let origin = self.origin(matches, arg);
            let line = match value {
                Some(_) if secret.contains(&key) => format!("{key} = \"(secret)\""),
                Some(value) => format!("{key} = {value}"),
                None => format!("# {key} (not set)"),
            };
            out.push_str(&format!("{line:<50} # {origin}\n"));
        }
        out
    }
}

/// The arguments of `sub` that a file can set: its long flags, less help, version and the
/// configuration flags themselves.
pub fn settable(sub: &clap::Command) -> impl Iterator<Item = &clap::Arg> {
    sub.get_arguments().filter(|a| {
        a.get_long().is_some_and(|l| ![CONFIG_FLAG, PRINT_FLAG, "help", "version"].contains(&l))
            && !matches!(a.get_action(), clap::ArgAction::Help | clap::ArgAction::Version)
    })
}

/// The file's top-level keys, each with its value and line.
fn parse(path: &Path, text: &str) -> Result<BTreeMap<String, (toml::Value, usize)>, String> {
    // Where and what, never the line itself: the file may be one the caller could not read.
    let table: BTreeMap<String, toml::Spanned<toml::Value>> = toml::from_str(text).map_err(|e| {
        let at = e.span().map_or(0, |s| s.start).min(text.len());
        let line = text[..at].matches('\n').count() + 1;
        let column = at - text[..at].rfind('\n').map_or(0, |n| n + 1) + 1;
        format!("{}:{line}:{column}: {}", path.display(), e.message().trim_end())
    })?;
    Ok(table
        .into_iter()
        .map(|(key, value)| {
            let line = text[..value.span().start].matches('\n').count() + 1;
            (key, (value.into_inner(), line))
        })
        .collect())
}

fn scalar(value: &toml::Value) -> Result<String, String> {
    match value {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(n) => Ok(n.to_string()),
        toml::Value::Float(x) => Ok(x.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        other => Err(format!("a {} is not a value here: give a string or a number", other.type_str())),
    }
}

/// Whether `--key` is among `args` (as `--key VALUE` or `--key=VALUE`).
fn flag_given(args: &[OsString], key: &str) -> bool {
    let flag = format!("--{key}");
    args.iter().map(|a| a.to_string_lossy()).any(|a| a == flag || a.starts_with(&format!("{flag}=")))
}

/// The value of `--key` among `args`.
fn flag_value(args: &[OsString], key: &str) -> Option<OsString> {
    let flag = format!("--{key}");
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy();
        if text == flag {
            return args.next().cloned();
        }
        if let Some(value) = text.strip_prefix(&format!("{flag}=")) {
            return Some(value.into());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use clap::{Arg, ArgAction, Command};

    use super::*;

    fn cli() -> Command {
        let run = Command::new("run")
            .arg(Arg::new("state_dir").long("state-dir").default_value("/var/lib/x"))
            .arg(Arg::new("mode").long("mode").value_parser(["all", "policy"]).default_value("all"))
            .arg(Arg::new("port").long("port").value_parser(clap::value_parser!(u16)))
            .arg(Arg::new("quiet").long("no-dataplane").action(ArgAction::SetTrue))
            .arg(Arg::new("peer").long("peer").action(ArgAction::Append))
            .arg(Arg::new("token").long("token").env("SETTINGS_TEST_NEVER_SET"))
            .arg(Arg::new(PRINT_FLAG).long(PRINT_FLAG).action(ArgAction::SetTrue));
        let status =
            Command::new("status").arg(Arg::new("state_dir").long("state-dir").default_value("/var/lib/x"));
        Command::new("d")
            .arg(Arg::new(CONFIG_FLAG).long(CONFIG_FLAG).global(true))
            .subcommand(run)
            .subcommand(status)
    }

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    /// Resolves `argv` with `file` as the configuration file; the matches of the subcommand.
    fn resolve(file: &str, argv: &[&str]) -> Result<(Layered, clap::ArgMatches, tempfile::TempDir), String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.toml");
        std::fs::write(&path, file).unwrap();
        let (layered, resolved) = Layered::resolve(&cli(), "run", args(argv), "SETTINGS_TEST_NO_ENV", &path)?;
        let matches = cli().try_get_matches_from(resolved).map_err(|e| layered.explain(e).to_string())?;
        let (_, sub) = matches.subcommand().unwrap();
        Ok((layered, sub.clone(), dir))
    }

    #[test]
    fn the_file_sets_what_no_flag_does_and_each_value_says_where_it_came_from() {
        let file = "state-dir = \"/srv/x\"\nmode = \"policy\"\nport = 4801\nno-dataplane = true\npeer = [\"a\", \"b\"]\n";
        let (layered, m, _dir) = resolve(file, &["d", "run", "--mode", "all"]).unwrap();
        assert_eq!(m.get_one::<String>("state_dir").unwrap(), "/srv/x");
        assert_eq!(m.get_one::<String>("mode").unwrap(), "all", "the flag wins");
        assert_eq!(*m.get_one::<u16>("port").unwrap(), 4801);
        assert!(m.get_flag("quiet"));
        assert_eq!(m.get_many::<String>("peer").unwrap().collect::<Vec<_>>(), ["a", "b"]);
        let shown = layered.render(cli().find_subcommand("run").unwrap(), &m, &["token"]);
        assert!(shown.contains("state-dir = \"/srv/x\"") && shown.contains("d.toml:1"), "{shown}");
        assert!(
            shown.lines().any(|l| l.starts_with("mode = \"all\"") && l.ends_with("# command line")),
            "{shown}"
        );
        assert!(
            shown.lines().any(|l| l.starts_with("port = \"4801\"") && l.ends_with("d.toml:3")),
            "{shown}"
        );
        assert!(shown.contains("peer = [\"a\", \"b\"]"), "{shown}");
        assert!(shown.contains("# token (not set)"), "{shown}");
        // Another subcommand takes the keys it shares, and ignores the others.
        let (_, m, _dir) = resolve(file, &["d", "status"]).unwrap();
        assert_eq!(m.get_one::<String>("state_dir").unwrap(), "/srv/x");
        // No file: defaults, said so.
        let (layered, m, _dir) = resolve("", &["d", "run"]).unwrap();
        assert!(layered.render(cli().find_subcommand("run").unwrap(), &m, &[]).contains("# default"));
    }

    #[test]
    fn bad_files_are_refused_by_file_and_line_with_what_is_allowed() {
        let refused = |file: &str| resolve(file, &["d", "run"]).map(drop).unwrap_err();
        let e = refused("mode = \"all\"\nstate_dir = \"/x\"\n");
        assert!(e.contains("d.toml:2: unknown key `state_dir`") && e.contains("state-dir, mode"), "{e}");
        let e = refused("\n\nmode = \"everything\"\n");
        assert!(e.contains("d.toml:3") && e.contains("everything") && e.contains("all, policy"), "{e}");
        let e = refused("port = 70000\n");
        assert!(e.contains("d.toml:1") && e.contains("70000"), "{e}");
        let e = refused("no-dataplane = \"yes\"\n");
        assert!(e.contains("d.toml:1: `no-dataplane` is true or false"), "{e}");
        let e = refused("mode = { a = 1 }\n");
        assert!(e.contains("d.toml:1") && e.contains("table"), "{e}");
        let e = refused("mode = \n");
        assert!(e.contains("d.toml:1:"), "{e}");
        // A file that is not TOML (one the caller could not read, say): no line of it is shown.
        let e = refused("root:$6$secret-hash:19000:0:99999:7:::\n");
        assert!(e.contains("d.toml:1:") && !e.contains("secret-hash"), "{e}");
        let e = refused("print-config = true\n");
        assert!(e.contains("unknown key `print-config`"), "{e}");
        // A file named and missing is an error, not nothing; named before the subcommand too.
        let e = resolve("", &["d", "run", "--config", "/nonexistent/d.toml"]).map(drop).unwrap_err();
        assert!(e.contains("/nonexistent/d.toml"), "{e}");
        let e = resolve("", &["d", "--config", "/nonexistent/e.toml", "run"]).map(drop).unwrap_err();
        assert!(e.contains("/nonexistent/e.toml"), "{e}");
    }
}
