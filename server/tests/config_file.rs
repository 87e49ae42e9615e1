//! The `--config` file: every flag settable by its long name, precedence
//! flag > environment > file > default, clear errors for unknown keys and bad
//! values, and `crosswire.example.toml` kept in step with the flags.

use std::{
    path::{Path, PathBuf},
    sync::Mutex,
};

use clap::{ArgAction, CommandFactory, Parser};
use crosswire_server::{try_parse_cli_from, Args, ConfigFileError, ProxyHeader, ServerConfig};

#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    args: Args,
}

/// Every test here parses flags, which read `CROSSWIRE_*` variables, and one
/// test sets some: they take turns.
static ENV: Mutex<()> = Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    ENV.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A file of `text` in a directory of this test's own.
fn file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("crosswire-config-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("crosswire.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn parse(argv: &[&str]) -> Result<ServerConfig, ConfigFileError> {
    let cli: Cli = try_parse_cli_from(std::iter::once("crosswire-server").chain(argv.iter().copied()))?;
    Ok(cli.args.into_config().expect("a valid config"))
}

#[test]
fn flag_beats_env_beats_file_beats_default() {
    let _env = lock();
    let path = file("precedence", "max-connections = 111\nmax_topics = 222\npublish-rate = 333\nhistory-size = 444\n");
    // No other test of this binary parses while the lock is held.
    std::env::set_var("CROSSWIRE_MAX_CONNECTIONS", "1000");
    std::env::set_var("CROSSWIRE_MAX_TOPICS", "2000");
    let result = parse(&["--config", path.to_str().unwrap(), "--max-connections", "7"]);
    std::env::remove_var("CROSSWIRE_MAX_CONNECTIONS");
    std::env::remove_var("CROSSWIRE_MAX_TOPICS");
    let config = result.unwrap();
    let default = ServerConfig::default();
    assert_eq!(config.max_connections, 7, "the flag beats the environment and the file");
    assert_eq!(config.max_topics, 2000, "the environment beats the file");
    assert_eq!(config.publish_rate, 333, "the file beats the default");
    assert_eq!(config.history_size, 444);
    assert_eq!(config.subscribe_rate, default.subscribe_rate, "the default stands where nothing is set");
}

#[test]
fn the_file_can_be_named_in_the_environment() {
    let _env = lock();
    let path = file("env-named", "port = 4321\n");
    std::env::set_var("CROSSWIRE_CONFIG", &path);
    let result = parse(&[]);
    std::env::remove_var("CROSSWIRE_CONFIG");
    assert_eq!(result.unwrap().addr.port(), 4321);
}

#[test]
fn lists_booleans_numbers_and_strings_are_read() {
    let _env = lock();
    let path = file(
        "types",
        r#"
host = "0.0.0.0"
path = "/ws"
allowed-origins = ["https://a.example", "https://b.example"]
allowed_host = "chat.example"
trusted-proxy = ["10.0.0.0/8", "192.168.1.1"]
allow-loopback-origins = true
heartbeat-ms = 1500
static = "dist"
"#,
    );
    let config = parse(&["--config", path.to_str().unwrap()]).unwrap();
    assert_eq!(config.addr.ip().to_string(), "0.0.0.0");
    assert_eq!(config.path, "/ws");
    assert_eq!(config.allowed_origins, ["https://a.example", "https://b.example"]);
    assert_eq!(config.allowed_hosts, ["chat.example"]);
    assert_eq!(config.trusted_proxies.len(), 2);
    assert!(config.allow_loopback_origins);
    assert_eq!(config.heartbeat.as_millis(), 1500);
    assert_eq!(config.static_dir.as_deref(), Some(Path::new("dist")));

    // A list on the command line replaces the file's, it does not add to it.
    let config = parse(&["--config", path.to_str().unwrap(), "--allowed-origin", "https://c.example"]).unwrap();
    assert_eq!(config.allowed_origins, ["https://c.example"]);
}

#[test]
fn an_unknown_key_is_an_error_naming_it() {
    let _env = lock();
    let path = file("unknown", "port = 1\nmax-conections = 5\n");
    let err = parse(&["--config", path.to_str().unwrap()]).unwrap_err();
    assert!(matches!(&err, ConfigFileError::UnknownKey { key, .. } if key == "max-conections"), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("`max-conections`") && message.contains(path.to_str().unwrap()), "{message}");
}

#[test]
fn a_wrong_type_is_an_error_naming_the_key_and_the_file() {
    let _env = lock();
    for (name, text, key) in [
        ("string-for-number", "port = \"eighty\"\n", "port"),
        ("out-of-range", "port = 70000\n", "port"),
        ("string-for-bool", "allow-loopback-origins = \"yes\"\n", "allow-loopback-origins"),
        ("list-for-scalar", "max-topics = [1, 2]\n", "max-topics"),
        ("table", "path = { a = 1 }\n", "path"),
    ] {
        let path = file(name, text);
        let err = parse(&["--config", path.to_str().unwrap()]).unwrap_err();
        let message = err.to_string();
        assert!(matches!(&err, ConfigFileError::BadValue { key: k, .. } if k == key), "{name}: {err:?}");
        assert!(message.contains(&format!("`{key}`")) && message.contains(path.to_str().unwrap()), "{message}");
    }
    let missing = std::env::temp_dir().join("crosswire-config-no-such-file.toml");
    let err = parse(&["--config", missing.to_str().unwrap()]).unwrap_err();
    assert!(matches!(err, ConfigFileError::Read { .. }), "{err:?}");
    let path = file("syntax", "port = \n");
    let err = parse(&["--config", path.to_str().unwrap()]).unwrap_err();
    assert!(matches!(err, ConfigFileError::Syntax { .. }), "{err:?}");
}

/// `crosswire.example.toml` as the flags describe it: every key, with its
/// default (commented out where a flag has none).
fn example() -> String {
    let mut out = String::from(
        "# crosswire-server configuration: pass it with --config FILE (or CROSSWIRE_CONFIG).\n\
         # Every key is a command-line flag's long name (`_` may stand for `-`); flags and\n\
         # CROSSWIRE_* environment variables override the file. The values below are the\n\
         # defaults. Generated from the flags by server/tests/config_file.rs:\n\
         # CROSSWIRE_BLESS=1 cargo test -p crosswire-server --test config_file rewrites it.\n",
    );
    for arg in Cli::command().get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if matches!(long, "config" | "help" | "version") {
            continue;
        }
        let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
        out.push('\n');
        for line in help.lines() {
            out.push_str(&format!("# {line}\n").replace("# \n", "#\n"));
        }
        let defaults: Vec<String> = arg.get_default_values().iter().map(|v| v.to_string_lossy().into_owned()).collect();
        let value = |text: &str| match text.parse::<i64>() {
            Ok(number) => number.to_string(),
            Err(_) => toml::Value::String(text.to_owned()).to_string(),
        };
        match (arg.get_action(), defaults.as_slice()) {
            // clap gives a switch its `false` default only when it builds the command.
            (ArgAction::SetTrue, _) => out.push_str(&format!("{long} = false\n")),
            (ArgAction::Append, defaults) => {
                let items: Vec<String> = defaults.iter().map(|d| value(d)).collect();
                out.push_str(&format!("{long} = [{}]\n", items.join(", ")));
            }
            (_, [default]) => out.push_str(&format!("{long} = {}\n", value(default))),
            _ => {
                let name = arg.get_value_names().and_then(|n| n.first()).map(|n| n.to_string()).unwrap_or_default();
                out.push_str(&format!("# {long} = \"<{name}>\" (unset by default)\n"));
            }
        }
    }
    out
}

fn example_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("crosswire.example.toml")
}

#[test]
fn the_example_file_lists_every_flag_with_its_default() {
    let _env = lock();
    let expected = example();
    if std::env::var_os("CROSSWIRE_BLESS").is_some() {
        std::fs::write(example_path(), &expected).unwrap();
    }
    let actual = std::fs::read_to_string(example_path()).expect("crosswire.example.toml at the repository root");
    assert!(
        actual == expected,
        "crosswire.example.toml is out of step with the flags; rerun with CROSSWIRE_BLESS=1.\n--- expected ---\n{expected}"
    );
}

#[test]
fn the_example_file_loads_as_the_defaults() {
    let _env = lock();
    let from_file = parse(&["--config", example_path().to_str().unwrap()]).unwrap();
    let defaults = parse(&[]).unwrap();
    assert_eq!(format!("{from_file:?}"), format!("{defaults:?}"));
}

#[test]
fn the_trusted_proxy_header_is_one_of_two_and_a_bad_one_names_the_flag() {
    let _env = lock();
    assert_eq!(parse(&[]).unwrap().trusted_proxy_header, ProxyHeader::XForwardedFor);
    assert_eq!(parse(&["--trusted-proxy-header", "Forwarded"]).unwrap().trusted_proxy_header, ProxyHeader::Forwarded);
    let err = parse(&["--trusted-proxy-header", "x-real-ip"]).unwrap_err().to_string();
    assert!(err.contains("--trusted-proxy-header") && err.contains("x-real-ip"), "{err}");
    let path = file("proxy-header", "trusted-proxy-header = \"x-real-ip\"\n");
    let err = parse(&["--config", path.to_str().unwrap()]).unwrap_err();
    assert!(matches!(&err, ConfigFileError::BadValue { key, .. } if key == "trusted-proxy-header"), "{err:?}");
}

#[test]
fn default_topic_patterns_are_lists_of_claim_patterns() {
    let _env = lock();
    let config = parse(&[
        "--jwt-secret",
        "0123456789abcdef0123",
        "--jwt-default-subscribe",
        "chat:*,news:*",
        "--jwt-default-subscribe",
        "help",
        "--jwt-default-publish",
        "chat:lobby",
    ])
    .unwrap();
    let text = |list: &[crosswire_server::protocol::TopicPattern]| {
        list.iter().map(|p| p.as_str().to_owned()).collect::<Vec<_>>()
    };
    assert_eq!(text(&config.jwt_default_subscribe), ["chat:*", "news:*", "help"]);
    assert_eq!(text(&config.jwt_default_publish), ["chat:lobby"]);
    let err = parse(&["--jwt-default-subscribe", "chat room"]).unwrap_err().to_string();
    assert!(err.contains("--jwt-default-subscribe"), "{err}");
    // Defaults without a secret would read as a restriction where everything is open.
    let cli: Cli = try_parse_cli_from(["crosswire-server", "--jwt-default-publish", "chat:*"]).unwrap();
    let err = cli.args.into_config().unwrap_err();
    assert!(err.to_string().contains("jwt_default_publish (--jwt-default-publish) needs a JWT secret"), "{err}");
}
