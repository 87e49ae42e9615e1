//! The `--config` file (env `CROSSWIRE_CONFIG`): a TOML file in which every
//! flag of a clap parser can be set. Precedence, highest first: the command
//! line, the environment, the file, the flag's default.
//!
//! Generic over the parser: whatever flags it has (the server's `Args`, an
//! example's extra ones) can be set, under the same names, so the file never
//! lags behind a new flag. The command line is parsed once; every file key
//! whose flag was not given on the command line or in the environment is
//! then added as a synthesized `--flag=value`, and the whole is parsed again,
//! so the file's values go through exactly the flags' own parsers.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
};

use clap::{parser::ValueSource, Arg, ArgAction, Parser};

/// The id of the flag naming the file (`Args::config`).
const CONFIG_ID: &str = "config";

/// Why the command line and its configuration file could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigFileError {
    /// The command line itself was refused (or asked for `--help`/`--version`).
    #[error("{0}")]
    Cli(#[from] clap::Error),
    /// The file could not be read.
    #[error("cannot read the config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("the config file {} is not valid TOML: {source}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// What the TOML parser said.
        source: Box<toml::de::Error>,
    },
    /// A key that names no flag.
    #[error("unknown key `{key}` in the config file {}: keys are the long flag names (see --help)", path.display())]
    UnknownKey {
        /// The key as written.
        key: String,
        /// The file.
        path: PathBuf,
    },
    /// A value of the wrong type or out of range for its flag.
    #[error("bad value for `{key}` in the config file {}: {message}", path.display())]
    BadValue {
        /// The key as written.
        key: String,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
}

/// Parses the process's arguments into `C` (a clap parser that flattens
/// [`crate::Args`]), with the `--config` file applied. A command-line error,
/// `--help` and `--version` exit the process as [`Parser::parse`] does; an
/// error in the file is returned.
pub fn parse_cli<C: Parser>() -> Result<C, ConfigFileError> {
    match try_parse_cli_from(std::env::args_os()) {
        Err(ConfigFileError::Cli(e)) => e.exit(),
        other => other,
    }
}

/// [`parse_cli`] for the given arguments (the first is the program name),
/// returning every error, those of the command line included.
pub fn try_parse_cli_from<C, I, T>(argv: I) -> Result<C, ConfigFileError>
where
    C: Parser,
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
    let cmd = C::command();
    let matches = cmd.clone().try_get_matches_from(&argv)?;
    let Some(path) = matches.try_get_one::<PathBuf>(CONFIG_ID).ok().flatten().cloned() else {
        return Ok(C::from_arg_matches(&matches)?);
    };
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigFileError::Read { path: path.clone(), source })?;
    let table: toml::Table =
        text.parse().map_err(|source| ConfigFileError::Syntax { path: path.clone(), source: Box::new(source) })?;
    let mut synthesized = argv;
    for (key, value) in &table {
        let arg =
            find_arg(&cmd, key).ok_or_else(|| ConfigFileError::UnknownKey { key: key.clone(), path: path.clone() })?;
        let id = arg.get_id().as_str();
        if matches!(matches.value_source(id), Some(ValueSource::CommandLine | ValueSource::EnvVariable)) {
            continue;
        }
        let flags = as_flags(arg, value).map_err(|message| bad_value(key, &path, message))?;
        // Each value alone first, so that a bad one is reported against its
        // key and file rather than as a command-line flag nobody typed.
        let mut alone = vec![OsString::from("crosswire")];
        alone.extend(flags.iter().cloned());
        if let Err(e) = cmd.clone().try_get_matches_from(alone) {
            return Err(bad_value(key, &path, clap_message(&e)));
        }
        synthesized.extend(flags);
    }
    let matches = cmd.try_get_matches_from(synthesized)?;
    Ok(C::from_arg_matches(&matches)?)
}

/// The flag a file key names: its long name or its field name, with `-` or `_`.
fn find_arg<'c>(cmd: &'c clap::Command, key: &str) -> Option<&'c Arg> {
    let kebab = key.replace('_', "-");
    if kebab == CONFIG_ID || kebab == "help" || kebab == "version" {
        return None;
    }
    cmd.get_arguments().find(|arg| {
        arg.get_long().is_some_and(|long| long == kebab) || arg.get_id().as_str().replace('_', "-") == kebab
    })
}

/// The `--flag=value` arguments a file value stands for.
fn as_flags(arg: &Arg, value: &toml::Value) -> Result<Vec<OsString>, String> {
    let long = arg.get_long().ok_or("this flag has no long name")?;
    match arg.get_action() {
        ArgAction::SetTrue => match value {
            toml::Value::Boolean(true) => Ok(vec![format!("--{long}").into()]),
            toml::Value::Boolean(false) => Ok(vec![]),
            other => Err(format!("expected true or false, got {}", other.type_str())),
        },
        ArgAction::Append => {
            let items = match value {
                toml::Value::Array(items) => items.iter().collect(),
                single => vec![single],
            };
            items.into_iter().map(|item| Ok(format!("--{long}={}", scalar(item)?).into())).collect()
        }
        _ => Ok(vec![format!("--{long}={}", scalar(value)?).into()]),
    }
}

fn scalar(value: &toml::Value) -> Result<String, String> {
    match value {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        other => Err(format!("expected a single value, got {}", other.type_str())),
    }
}

fn bad_value(key: &str, path: &Path, message: String) -> ConfigFileError {
    ConfigFileError::BadValue { key: key.to_owned(), path: path.to_owned(), message }
}

/// clap's own explanation, without its `error:` prefix and usage hints.
fn clap_message(error: &clap::Error) -> String {
    let rendered = error.to_string();
    let first = rendered.lines().next().unwrap_or_default();
    first.strip_prefix("error: ").unwrap_or(first).to_owned()
}
