//! `--config FILE`: the long-running verbs (`broker`, `agent`, `revocation`,
//! `dev`) read their settings from a TOML file as well as from flags.
//!
//! The loader knows no flag by name. It walks the clap definition of the
//! verb (`Cli::command()`), so a flag added to a verb is a key of its file
//! with no change here:
//!
//! - a key is a long flag name, as written after `--` (`data-dir`,
//!   `rate-limit`, `dev-issuer`); global flags (`log`, …) are keys too;
//! - a value is a string, a number or a boolean; a repeatable flag takes an
//!   array (or one value); an on/off flag takes `true` or `false`;
//! - the file is turned into `--key=value` arguments and parsed by clap
//!   with the command line, so a value is checked by the same parser as a
//!   flag, and the resulting `Cli` is the one the flags would give.
//!
//! Precedence, highest first: command-line flags, `BATON_<FLAG>` variables
//! (every flag of these verbs has one, added here from its long name unless
//! it already names its own), the file, the built-in defaults. A file
//! setting is dropped when its flag was given on the command line or in the
//! environment, or conflicts with one that was (e.g. `redis` in the file,
//! `--redis-cluster` on the command line).
//!
//! Unknown keys, tables and values of the wrong type are refused with
//! `FILE:LINE:COLUMN` and the key; a file never starts a daemon half-read.
//!
//! `baton gateway --config FILE` reads a file of its own format (listener,
//! upstreams, routes: the `baton-gateway` crate); its process settings
//! (the flags of `baton gateway`: `socket`, `ready-file`, `ops-listen`,
//! `shutdown-timeout`, `log`, ...) are the keys of its `[process]` table,
//! with the same precedence and checks, and every one of them has its
//! `BATON_<FLAG>` variable too.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, CommandFactory, FromArgMatches, ValueEnum};

use crate::cli::{Cli, EXIT_REFUSED, exit};

/// The verbs that take `--config`.
pub const VERBS: [&str; 4] = ["broker", "agent", "revocation", "dev"];

/// The id (and long name) of the `--config` argument.
const CONFIG_ARG: &str = "config";

/// The verb whose file has its own format; its process settings are the
/// keys of [`PROCESS_TABLE`].
const GATEWAY: &str = "gateway";
const PROCESS_TABLE: &str = "process";

/// A verb that takes a configuration file (`baton config check --for`).
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Verb {
    Broker,
    Agent,
    Revocation,
    Dev,
    /// `baton gateway --config FILE`: the gateway's own format (listener,
    /// upstreams, routes), checked as `baton gateway --check` does.
    Gateway,
}

impl Verb {
    pub fn name(self) -> &'static str {
        match self {
            Verb::Broker => "broker",
            Verb::Agent => "agent",
            Verb::Revocation => "revocation",
            Verb::Dev => "dev",
            Verb::Gateway => "gateway",
        }
    }
}

/// The `baton` command as parsed: the derive definition plus, on the verbs
/// of [`VERBS`], `--config FILE` and a `BATON_<FLAG>` variable for every flag
/// that has none (global flags included).
pub fn command() -> clap::Command {
    let mut cmd = Cli::command().mut_args(with_env);
    for verb in VERBS {
        if cmd.find_subcommand(verb).is_none() {
            continue;
        }
        cmd = cmd.mut_subcommand(verb, |sub| {
            sub.mut_args(with_env).arg(
                Arg::new(CONFIG_ARG)
                    .long(CONFIG_ARG)
                    .value_name("FILE")
                    .value_parser(clap::value_parser!(PathBuf))
                    .env("BATON_CONFIG")
                    .hide_env_values(true)
                    .help(
                        "Read settings from this TOML file: keys are the long flag names \
                         (`data-dir = \"/var/lib/baton\"`). Flags and BATON_* variables \
                         override it. Check one with `baton config check`.",
                    ),
            )
        });
    }
    if cmd.find_subcommand(GATEWAY).is_some() {
        // The gateway names its own file (`--config`, required); `--check`
        // is an action, not a setting.
        cmd = cmd.mut_subcommand(GATEWAY, |sub| {
            sub.mut_args(|a| {
                if a.get_id() == "check" {
                    a
                } else {
                    with_env(a)
                }
            })
        });
    }
    cmd
}

/// The environment variable a flag without one is read from: `BATON_` and
/// its long name in upper case with `_` for `-` (`--data-dir`:
/// `BATON_DATA_DIR`).
pub fn env_name(long: &str) -> String {
    format!("BATON_{}", long.to_ascii_uppercase().replace('-', "_"))
}

/// Flags that turn a safety check off.
const DANGEROUS_PREFIX: &str = "dangerously-";

fn with_env(arg: Arg) -> Arg {
    if arg.get_env().is_some() || arg.is_positional() {
        return arg;
    }
    let Some(name) = arg.get_long().filter(|_| is_setting(&arg)).map(env_name) else {
        return arg;
    };
    arg.env(name).hide_env_values(true)
}

/// An argument a file may set: a long option that takes values or is an
/// on/off switch or a counter (not `--help`, `--version`, `--config`), and
/// not a `--dangerously-*` flag: those turn a check off for one start
/// (a loss looked into, a test), so they are taken on the command line
/// only, never left behind in a file or an environment.
fn is_setting(arg: &Arg) -> bool {
    arg.get_long()
        .is_some_and(|l| !l.starts_with(DANGEROUS_PREFIX))
        && arg.get_id() != CONFIG_ARG
        && matches!(
            arg.get_action(),
            ArgAction::Set
                | ArgAction::Append
                | ArgAction::SetTrue
                | ArgAction::SetFalse
                | ArgAction::Count
        )
}

/// Why the command line (with its file) was not accepted.
#[derive(Debug)]
pub enum ParseError {
    /// clap's own answer (usage errors, `--help`, `--version`): print it as
    /// clap does.
    Clap(clap::Error),
    /// The configuration file: one line per problem.
    Config(Vec<String>),
}

impl ParseError {
    /// Prints the error and gives the process exit code.
    pub fn report(&self) -> u8 {
        match self {
            ParseError::Clap(e) => {
                let _ = e.print();
                u8::try_from(e.exit_code()).unwrap_or(EXIT_REFUSED)
            }
            ParseError::Config(lines) => {
                for line in lines {
                    eprintln!("error: {line}");
                }
                EXIT_REFUSED
            }
        }
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::Clap(e) => write!(f, "{}", e.render()),
            ParseError::Config(lines) => f.write_str(&lines.join("\n")),
        }
    }
}

/// Parses the command line, with the file of `--config` (or
/// `BATON_CONFIG`) underneath it when the verb takes one.
pub fn parse_cli<I, T>(args: I) -> Result<Cli, ParseError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let argv: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let mut cmd = command();
    let matches = match file_of(&cmd, &argv) {
        None => cmd
            .try_get_matches_from_mut(&argv)
            .map_err(ParseError::Clap)?,
        Some((verb, path)) => {
            let file = ConfigFile::read(&path).map_err(|e| ParseError::Config(vec![e]))?;
            let settings = file.settings(&cmd, verb).map_err(ParseError::Config)?;
            merge(&mut cmd, &argv, verb, &file, settings)?
        }
    };
    Cli::from_arg_matches(&matches).map_err(ParseError::Clap)
}

/// The verb and the file named by `--config`, from a lenient first parse
/// (required flags may still be missing: the file may hold them).
fn file_of(cmd: &clap::Command, argv: &[OsString]) -> Option<(&'static str, PathBuf)> {
    let m = cmd
        .clone()
        .ignore_errors(true)
        .try_get_matches_from(argv)
        .ok()?;
    let (name, sub) = m.subcommand()?;
    let verb = VERBS.into_iter().chain([GATEWAY]).find(|v| *v == name)?;
    let path = sub.try_get_one::<PathBuf>(CONFIG_ARG).ok()??.clone();
    Some((verb, path))
}

/// Where the flags of the first parse came from, to drop file settings
/// that the command line or the environment already set.
struct Given {
    root: ArgMatches,
    verb: ArgMatches,
}

impl Given {
    fn new(cmd: &clap::Command, argv: &[OsString], verb: &str) -> Option<Self> {
        let root = cmd
            .clone()
            .ignore_errors(true)
            .try_get_matches_from(argv)
            .ok()?;
        let verb = root.subcommand_matches(verb)?.clone();
        Some(Given { root, verb })
    }

    /// Set on the command line or in the environment (not a default).
    fn explicit(&self, id: &str) -> bool {
        let source = |m: &ArgMatches| {
            m.try_contains_id(id)
                .ok()
                .filter(|present| *present)
                .and_then(|_| m.value_source(id))
        };
        matches!(
            source(&self.verb).or_else(|| source(&self.root)),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
    }
}

/// Appends the file's settings that nothing above them set, and parses.
fn merge(
    cmd: &mut clap::Command,
    argv: &[OsString],
    verb: &str,
    file: &ConfigFile,
    settings: Vec<Setting>,
) -> Result<ArgMatches, ParseError> {
    let given = Given::new(cmd, argv, verb);
    let mut kept: Vec<Setting> = settings
        .into_iter()
        .filter(|s| !given.as_ref().is_some_and(|g| g.explicit(&s.id)))
        .collect();
    // Each pass drops at most one file setting that conflicts with a flag
    // given above the file, so this ends.
    loop {
        let mut all = argv.to_vec();
        for s in &kept {
            all.extend(s.args.iter().cloned());
        }
        match cmd.try_get_matches_from_mut(&all) {
            Ok(m) => return Ok(m),
            Err(e) => {
                if e.kind() == ErrorKind::ArgumentConflict
                    && let Some(i) = overridden_by_conflict(&e, &kept)
                {
                    kept.remove(i);
                    continue;
                }
                return Err(file_error(e, file, &kept));
            }
        }
    }
}

/// The long name in an argument as clap prints it (`--data-dir <DIR>`).
fn long_in(rendered: &str) -> Option<&str> {
    let rest = rendered.trim().strip_prefix("--")?;
    let end = rest.find([' ', '=', '<']).unwrap_or(rest.len());
    Some(&rest[..end])
}

fn context_strings(e: &clap::Error, kind: ContextKind) -> Vec<String> {
    match e.get(kind) {
        Some(ContextValue::String(s)) => vec![s.clone()],
        Some(ContextValue::Strings(v)) => v.clone(),
        _ => Vec::new(),
    }
}

/// In a conflict between a file setting and a flag not from the file, the
/// index of the file setting (the flag wins).
fn overridden_by_conflict(e: &clap::Error, kept: &[Setting]) -> Option<usize> {
    let mut longs: Vec<String> = context_strings(e, ContextKind::InvalidArg);
    longs.extend(context_strings(e, ContextKind::PriorArg));
    let longs: Vec<&str> = longs.iter().filter_map(|s| long_in(s)).collect();
    let from_file: Vec<usize> = longs
        .iter()
        .filter_map(|l| kept.iter().position(|s| s.long == *l))
        .collect();
    match from_file.as_slice() {
        [one] if longs.len() >= 2 => Some(*one),
        _ => None,
    }
}

/// clap's error about the merged arguments, pointing at the file's lines.
fn file_error(e: clap::Error, file: &ConfigFile, kept: &[Setting]) -> ParseError {
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        return ParseError::Clap(e);
    }
    let text = plain(&e);
    let mut lines = vec![format!("{text} (with the settings of {})", file.name)];
    for s in kept {
        if mentions(&text, &s.long) {
            lines.push(format!(
                "{}: `{}` is set here",
                file.at(s.key_span.start),
                s.long
            ));
        }
    }
    ParseError::Config(lines)
}

/// Whether clap's message names `--long` (not merely a longer flag that
/// starts with it).
fn mentions(text: &str, long: &str) -> bool {
    let flag = format!("--{long}");
    text.match_indices(&flag).any(|(i, _)| {
        !text
            .get(i + flag.len()..)
            .and_then(|rest| rest.chars().next())
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '-')
    })
}

/// clap's message without colour, its `error: ` or the usage.
fn plain(e: &clap::Error) -> String {
    let rendered = e.render().to_string();
    // The first paragraph (a list of missing flags continues on the next
    // lines), on one line; the usage after it is left out.
    let first = rendered.split("\n\n").next().unwrap_or_default();
    let first = first.strip_prefix("error: ").unwrap_or(first);
    first.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// One key of the file, as the arguments it stands for.
#[derive(Debug, Clone)]
struct Setting {
    /// The argument's id (`admin_uids`) and long name (`admin-uid`).
    id: String,
    long: String,
    key_span: std::ops::Range<usize>,
    value_span: std::ops::Range<usize>,
    /// `--long=value`, once per value (none for `false` of an on/off flag).
    args: Vec<OsString>,
}

/// A parsed TOML file, kept with its text for line numbers.
pub struct ConfigFile {
    /// The path as given, for messages.
    name: String,
    doc: toml_edit::Document<String>,
}

impl ConfigFile {
    /// Reads and parses the file (TOML syntax only).
    pub fn read(path: &Path) -> Result<Self, String> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{name}: cannot read the configuration file: {e}"))?;
        Self::parse(name, text)
    }

    fn parse(name: String, text: String) -> Result<Self, String> {
        match toml_edit::Document::parse(text.clone()) {
            Ok(doc) => Ok(ConfigFile { name, doc }),
            // The message without its excerpt of the file: the line may
            // hold a secret (a join token, a Redis URL with a password).
            Err(e) => Err(format!(
                "{}: not valid TOML: {}",
                location(&name, &text, e.span().map_or(0, |s| s.start)),
                e.message().trim_end()
            )),
        }
    }

    /// `FILE:LINE:COLUMN` of a byte offset (both 1-based).
    fn at(&self, offset: usize) -> String {
        location(&self.name, self.doc.raw(), offset)
    }

    /// Every key checked against `verb`'s flags and turned into arguments;
    /// all problems at once.
    fn settings(&self, cmd: &clap::Command, verb: &str) -> Result<Vec<Setting>, Vec<String>> {
        let Some(sub) = cmd.find_subcommand(verb) else {
            return Err(vec![format!("`baton {verb}` takes no configuration file")]);
        };
        let table = if verb == GATEWAY {
            // The rest of the file is the gateway's (its crate checks it).
            match self.doc.get(PROCESS_TABLE) {
                None => return Ok(Vec::new()),
                Some(item) => match item.as_table() {
                    Some(t) => t,
                    None => {
                        return Err(vec![format!(
                            "{}: `{PROCESS_TABLE}` must be a table (`[{PROCESS_TABLE}]`) of `baton {verb}` flags",
                            self.at(item.span().map_or(0, |s| s.start))
                        )]);
                    }
                },
            }
        } else {
            self.doc.as_table()
        };
        let mut errors = Vec::new();
        let mut out = Vec::new();
        for (key, item) in table.iter() {
            let key_span = table
                .key(key)
                .and_then(toml_edit::Key::span)
                .unwrap_or(0..0);
            let value_span = item.span().unwrap_or_else(|| key_span.clone());
            let here = self.at(key_span.start);
            let Some(arg) = find_setting(cmd, sub, key) else {
                errors.push((
                    key_span.start,
                    format!(
                        "{here}: unknown key `{key}` for `baton {verb}`{}",
                        suggest(cmd, sub, key)
                    ),
                ));
                continue;
            };
            if let Some(why) = inline_secret(cmd, sub, arg, key, item) {
                errors.push((
                    value_span.start,
                    format!("{}: `{key}`: {why}", self.at(value_span.start)),
                ));
                continue;
            }
            match values(arg, key, item) {
                Ok(args) => out.push(Setting {
                    id: arg.get_id().to_string(),
                    long: key.to_owned(),
                    key_span,
                    value_span,
                    args,
                }),
                Err(why) => errors.push((
                    value_span.start,
                    format!("{}: `{key}`: {why}", self.at(value_span.start)),
                )),
            }
        }
        // Values through the flag's own parser, one key at a time so that
        // every bad value is named, not only the first.
        let mut probe = cmd
            .clone()
            .color(clap::ColorChoice::Never)
            .mut_subcommand(verb, |s| s.mut_args(|a| a.required(false)));
        for s in &out {
            let mut argv: Vec<OsString> = vec!["baton".into(), verb.into()];
            argv.extend(s.args.iter().cloned());
            if let Err(e) = probe.try_get_matches_from_mut(&argv)
                && is_value_error(e.kind())
                && context_strings(&e, ContextKind::InvalidArg)
                    .iter()
                    .any(|a| long_in(a) == Some(s.long.as_str()))
            {
                errors.push((
                    s.value_span.start,
                    format!(
                        "{}: `{}`: {}",
                        self.at(s.value_span.start),
                        s.long,
                        plain(&e)
                    ),
                ));
            }
        }
        if errors.is_empty() {
            Ok(out)
        } else {
            // In the file's order.
            errors.sort_by_key(|(at, _)| *at);
            Err(errors.into_iter().map(|(_, e)| e).collect())
        }
    }
}

fn is_value_error(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::InvalidValue
            | ErrorKind::ValueValidation
            | ErrorKind::InvalidUtf8
            | ErrorKind::NoEquals
            | ErrorKind::TooManyValues
            | ErrorKind::TooFewValues
            | ErrorKind::WrongNumberOfValues
    )
}

/// The argument a key names: a flag of the verb, else a global flag.
fn find_setting<'a>(root: &'a clap::Command, sub: &'a clap::Command, key: &str) -> Option<&'a Arg> {
    let is = |a: &&Arg| a.get_long() == Some(key) && is_setting(a);
    sub.get_arguments()
        .find(is)
        .or_else(|| root.get_arguments().filter(|a| a.is_global_set()).find(is))
}

/// ` (did you mean `data-dir`?)` when a flag is close to the key.
fn suggest(root: &clap::Command, sub: &clap::Command, key: &str) -> String {
    if key == CONFIG_ARG {
        return " (a configuration file cannot name another)".to_owned();
    }
    if key.starts_with(DANGEROUS_PREFIX) {
        return format!(
            " (`--{key}` turns a check off for one start: it is taken on the command line only, never from a file or the environment)"
        );
    }
    let longs = sub
        .get_arguments()
        .chain(root.get_arguments().filter(|a| a.is_global_set()))
        .filter(|a| is_setting(a))
        .filter_map(Arg::get_long);
    let hyphens = key.replace('_', "-");
    let mut best: Option<(f64, &str)> = None;
    for long in longs {
        let score = if long == hyphens {
            1.0
        } else {
            strsim::jaro(&hyphens, long)
        };
        if score > 0.8 && best.is_none_or(|(b, _)| score > b) {
            best = Some((score, long));
        }
    }
    match best {
        Some((_, long)) => format!(" (did you mean `{long}`?)"),
        None => format!(
            " (keys are its long flag names: `baton {} --help`)",
            sub.get_name()
        ),
    }
}

/// Why a value must not be written in a configuration file, if it is a
/// secret: the file is read by more people and tools (editors, backups,
/// configuration management, `kubectl get configmap`) than a 0600 secret
/// file. Generic over the flags, like the rest of the loader:
///
/// - a key whose flag has a `<key>-file` sibling (`join-token`, `grant`)
///   holds a secret by definition;
/// - any string that carries a password: a URL with one in its user part
///   (`redis://user:pw@host`) or a libpq `password=` setting.
///
/// The message never quotes the value.
fn inline_secret(
    root: &clap::Command,
    sub: &clap::Command,
    arg: &Arg,
    key: &str,
    item: &toml_edit::Item,
) -> Option<String> {
    let env = arg
        .get_env()
        .map(|e| e.to_string_lossy().into_owned())
        .unwrap_or_else(|| env_name(key));
    let file_key = format!("{key}-file");
    if find_setting(root, sub, &file_key).is_some() {
        return Some(format!(
            "a secret is not accepted inline in a configuration file; name a file \
             holding it with `{file_key}` (mode 0600), or set {env}"
        ));
    }
    let strings: Vec<&str> = match item {
        toml_edit::Item::Value(toml_edit::Value::String(s)) => vec![s.value().as_str()],
        toml_edit::Item::Value(toml_edit::Value::Array(list)) => {
            list.iter().filter_map(toml_edit::Value::as_str).collect()
        }
        _ => Vec::new(),
    };
    if strings.iter().any(|s| holds_password(s)) {
        // `redis` -> `redis-password-file`; `redis-cluster` ->
        // `redis-password-file`; `pg-admin-url` -> `pg-admin-password-file`.
        let stem = key.split('-').next().unwrap_or(key);
        let hint = [
            format!("{key}-password-file"),
            format!("{}-password-file", key.trim_end_matches("-url")),
            format!("{stem}-password-file"),
        ]
        .into_iter()
        .find(|k| find_setting(root, sub, k).is_some())
        .map(|k| format!("`{k}` (mode 0600) or "))
        .unwrap_or_default();
        return Some(format!(
            "holds a password inline, which is not accepted in a configuration file; \
             leave it out and give it with {hint}{env}"
        ));
    }
    None
}

/// A URL with a password in its user part (`scheme://user:pw@host`), or a
/// libpq key/value string with `password=`.
fn holds_password(s: &str) -> bool {
    // Every URL in the string (`redis-cluster` takes a list of them).
    let url_password = s.split("://").skip(1).any(|rest| {
        let authority = rest.split(['/', '?', '#', ',']).next().unwrap_or_default();
        authority
            .rsplit_once('@')
            .is_some_and(|(user, _)| user.split_once(':').is_some_and(|(_, pw)| !pw.is_empty()))
    });
    // A `password` key: libpq's key/value form, where spaces may surround
    // the `=` (`password = p`), or a URL's query (`?password=p`).
    let lower = s.to_ascii_lowercase();
    let kv_password = lower.match_indices("password").any(|(at, key)| {
        let starts_key = lower[..at]
            .chars()
            .next_back()
            .is_none_or(|c| c.is_whitespace() || matches!(c, '?' | '&'));
        starts_key && lower[at + key.len()..].trim_start().starts_with('=')
    });
    url_password || kv_password
}

/// The arguments a TOML value stands for, by what the flag takes.
fn values(arg: &Arg, key: &str, item: &toml_edit::Item) -> Result<Vec<OsString>, String> {
    use toml_edit::{Item, Value};
    let value = match item {
        Item::Value(v) => v,
        Item::Table(_) | Item::ArrayOfTables(_) => {
            return Err(
                "a table; settings are top-level `flag-name = value` lines, with no [sections] \
                 or dotted keys"
                    .to_owned(),
            );
        }
        Item::None => return Err("no value".to_owned()),
    };
    let flag = || OsString::from(format!("--{key}"));
    let with = |v: String| OsString::from(format!("--{key}={v}"));
    match arg.get_action() {
        ArgAction::SetTrue | ArgAction::SetFalse => {
            let Value::Boolean(b) = value else {
                return Err(format!(
                    "expected true or false, found {}",
                    value.type_name()
                ));
            };
            let on = *b.value() == matches!(arg.get_action(), ArgAction::SetTrue);
            Ok(if on { vec![flag()] } else { Vec::new() })
        }
        ArgAction::Count => match value {
            Value::Integer(n) if *n.value() >= 0 => Ok((0..*n.value()).map(|_| flag()).collect()),
            _ => Err(format!(
                "expected a count (0, 1, 2, …), found {}",
                value.type_name()
            )),
        },
        ArgAction::Append => match value {
            Value::Array(list) => list
                .iter()
                .map(|v| scalar(v).map(with))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|found| format!("expected a list of values, found {found} in it")),
            other => Ok(vec![with(scalar(other).map_err(|found| {
                format!("expected a value or a list of values, found {found}")
            })?)]),
        },
        _ => Ok(vec![with(scalar(value).map_err(|found| {
            format!("expected a string, number or boolean, found {found}")
        })?)]),
    }
}

/// A string, number or boolean as the text a flag would take; else the
/// TOML type found.
fn scalar(v: &toml_edit::Value) -> Result<String, &'static str> {
    use toml_edit::Value;
    match v {
        Value::String(s) => Ok(s.value().clone()),
        Value::Integer(n) => Ok(n.value().to_string()),
        Value::Float(x) => Ok(x.value().to_string()),
        Value::Boolean(b) => Ok(b.value().to_string()),
        other => Err(other.type_name()),
    }
}

fn location(name: &str, text: &str, offset: usize) -> String {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("{name}:{line}:{column}")
}

/// `baton config check FILE [--for VERB]`: the file is read, its keys and
/// values checked against the verb's flags and the merged settings parsed
/// as the verb would at start (with this process's BATON_* variables),
/// without starting anything.
pub fn check(file: &Path, verb: Option<Verb>) -> Result<()> {
    let verb = match verb {
        Some(v) => v.name(),
        None => guess_verb(file).ok_or_else(|| {
            exit(
                EXIT_REFUSED,
                format!(
                    "{}: cannot tell which verb this file is for; add --for {}|gateway",
                    file.display(),
                    VERBS.join("|")
                ),
            )
        })?,
    };
    // The gateway's own format first (its crate checks it), then, for
    // every verb, the flags the file sets (the gateway's [process] table).
    let gateway = if verb == GATEWAY {
        Some(baton_gateway::Config::load(file).map_err(|e| exit(EXIT_REFUSED, e.to_string()))?)
    } else {
        None
    };
    let argv: Vec<OsString> = vec![
        "baton".into(),
        verb.into(),
        "--config".into(),
        file.as_os_str().to_owned(),
    ];
    match parse_cli(argv) {
        Ok(_) => {
            crate::output::line(&match gateway {
                Some(c) => format!(
                    "{}: ok for `baton gateway` ({} routes, {} MCP endpoints, audience {})",
                    file.display(),
                    c.routes.len(),
                    c.mcp.len(),
                    c.audience
                ),
                None => format!("{}: ok for `baton {verb}`", file.display()),
            });
            Ok(())
        }
        Err(ParseError::Config(lines)) => Err(exit(EXIT_REFUSED, lines.join("\nerror: "))),
        Err(ParseError::Clap(e)) => Err(exit(EXIT_REFUSED, plain(&e))),
    }
}

/// The verb a file's name points to (`broker.toml`, `baton-agent.toml`).
fn guess_verb(file: &Path) -> Option<&'static str> {
    let stem = file.file_stem()?.to_str()?;
    let found: Vec<&'static str> = VERBS
        .into_iter()
        .chain(["gateway"])
        .filter(|v| stem.split(['-', '_', '.']).any(|w| w == *v))
        .collect();
    match found.as_slice() {
        [one] => Some(one),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Command;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn parse(args: &[&str]) -> Result<Cli, ParseError> {
        parse_cli(std::iter::once("baton").chain(args.iter().copied()))
    }

    fn config_errors(r: Result<Cli, ParseError>) -> Vec<String> {
        match r {
            Err(ParseError::Config(lines)) => lines,
            Err(ParseError::Clap(e)) => panic!("clap error, not a file error: {e}"),
            Ok(cli) => panic!("accepted: {cli:?}"),
        }
    }

    fn broker(cli: Cli) -> crate::cli::BrokerArgs {
        match cli.command {
            Command::Broker(b) => *b,
            other => panic!("not a broker: {other:?}"),
        }
    }

    const BROKER: &str = r#"# a broker
trust-domain = "file.example"
data-dir = "/var/lib/baton/broker"
listen = "127.0.0.1:9443"
admin-uid = [1000, 1001]
rate-limit = "attest=5/1m"
dev-issuer = true
max-connections = 10
prepare-at = 0.25
redis-prefix = "ops"
log = "debug"
"#;

    #[test]
    fn the_augmented_command_is_consistent() {
        command().debug_assert();
    }

    #[test]
    fn a_file_sets_every_kind_of_flag() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(dir.path(), "broker.toml", BROKER);
        let cli = parse(&["broker", "--config", f.to_str().unwrap()]).unwrap();
        assert_eq!(cli.log.as_deref(), Some("debug"));
        let b = broker(cli);
        assert_eq!(b.trust_domain, "file.example");
        assert_eq!(b.data_dir, PathBuf::from("/var/lib/baton/broker"));
        assert_eq!(b.listen.to_string(), "127.0.0.1:9443");
        assert_eq!(b.admin_uids, vec![1000, 1001]);
        assert_eq!(b.limits.rate_limits, vec!["attest=5/1m".to_owned()]);
        assert!(b.dev_issuer);
        assert_eq!(b.limits.max_connections, 10);
        assert!((b.rotation.prepare_at - 0.25).abs() < f64::EPSILON);
        assert_eq!(b.redis.redis_prefix, "ops");
        // Untouched flags keep their defaults.
        assert_eq!(b.limits.request_timeout, std::time::Duration::from_secs(60));
    }

    #[test]
    fn a_dangerously_flag_is_taken_on_the_command_line_only() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(
            dir.path(),
            "broker.toml",
            "trust-domain = \"x.org\"\ndata-dir = \"/d\"\ndangerously-accept-audit-log-loss = true\n",
        );
        let lines = config_errors(parse(&["broker", "--config", f.to_str().unwrap()]));
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].contains(":3:1: unknown key `dangerously-accept-audit-log-loss`")
                && lines[0].contains("command line only"),
            "{lines:?}"
        );
        // Nor is there an environment variable for it.
        let cmd = command();
        let verb = cmd.find_subcommand("broker").unwrap();
        let flag = verb
            .get_arguments()
            .find(|a| a.get_long() == Some("dangerously-accept-audit-log-loss"))
            .unwrap();
        assert!(flag.get_env().is_none());
        // Control: on the command line it is taken, and the rest of the
        // file still applies.
        let ok = write(
            dir.path(),
            "ok.toml",
            "trust-domain = \"x.org\"\ndata-dir = \"/d\"\n",
        );
        let b = broker(
            parse(&[
                "broker",
                "--config",
                ok.to_str().unwrap(),
                "--dangerously-accept-audit-log-loss",
            ])
            .unwrap(),
        );
        assert!(b.dangerously_accept_audit_log_loss);
        assert_eq!(b.trust_domain, "x.org");
    }

    #[test]
    fn a_gateway_file_sets_its_process_flags_in_its_process_table() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(
            dir.path(),
            "gateway.toml",
            "listen = \"127.0.0.1:0\"\n\n[process]\nsocket = \"/run/baton/agent.sock\"\nready-file = \"/run/gw.addr\"\nshutdown-timeout = \"5s\"\nops-listen = \"127.0.0.1:9091\"\nlog = \"debug\"\n",
        );
        let gw = |cli: Cli| match cli.command {
            Command::Gateway(g) => g,
            other => panic!("not a gateway: {other:?}"),
        };
        let cli = parse(&["gateway", "--config", f.to_str().unwrap()]).unwrap();
        assert_eq!(cli.log.as_deref(), Some("debug"));
        let g = gw(cli);
        assert_eq!(g.socket.socket, "/run/baton/agent.sock");
        assert_eq!(g.ready_file, Some(PathBuf::from("/run/gw.addr")));
        assert_eq!(
            g.shutdown.shutdown_timeout,
            std::time::Duration::from_secs(5)
        );
        assert_eq!(g.ops.ops_listen.unwrap().to_string(), "127.0.0.1:9091");
        // A flag beats the file.
        let g = gw(parse(&[
            "gateway",
            "--config",
            f.to_str().unwrap(),
            "--ready-file",
            "/elsewhere",
        ])
        .unwrap());
        assert_eq!(g.ready_file, Some(PathBuf::from("/elsewhere")));
        // Control: a gateway file without the table sets nothing.
        let bare = write(dir.path(), "bare.toml", "listen = \"127.0.0.1:0\"\n");
        let g = gw(parse(&["gateway", "--config", bare.to_str().unwrap()]).unwrap());
        assert_eq!(g.ready_file, None);
        // A typo in the table is named with its line; so is a table that is
        // not one, and a key that would name another file.
        for (text, says) in [
            (
                "[process]\nredy-file = \"x\"\n",
                ":2:1: unknown key `redy-file` for `baton gateway` (did you mean `ready-file`?)",
            ),
            ("process = 3\n", "`process` must be a table"),
            (
                "[process]\nconfig = \"other.toml\"\n",
                "cannot name another",
            ),
            (
                "[process]\nshutdown-timeout = \"0s\"\n",
                "`shutdown-timeout`",
            ),
        ] {
            let bad = write(dir.path(), "bad.toml", text);
            let errors = config_errors(parse(&["gateway", "--config", bad.to_str().unwrap()]));
            assert!(
                errors.iter().any(|e| e.contains(says)),
                "{text}: {errors:?}"
            );
        }
        // Every process flag has its BATON_ variable (check is an action).
        let cmd = command();
        let sub = cmd.find_subcommand("gateway").unwrap();
        for long in ["ready-file", "shutdown-timeout", "ops-listen"] {
            let arg = sub
                .get_arguments()
                .find(|a| a.get_long() == Some(long))
                .unwrap();
            assert_eq!(
                arg.get_env().and_then(|e| e.to_str()),
                Some(env_name(long).as_str())
            );
        }
        let check = sub
            .get_arguments()
            .find(|a| a.get_long() == Some("check"))
            .unwrap();
        assert!(check.get_env().is_none());
    }

    #[test]
    fn flags_override_the_file_and_defaults_fill_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(dir.path(), "broker.toml", BROKER);
        let b = broker(
            parse(&[
                "broker",
                "--listen",
                "127.0.0.1:1",
                "--config",
                f.to_str().unwrap(),
                "--admin-uid",
                "7",
            ])
            .unwrap(),
        );
        assert_eq!(b.listen.to_string(), "127.0.0.1:1");
        // A repeatable flag on the command line replaces the file's list.
        assert_eq!(b.admin_uids, vec![7]);
        assert_eq!(b.trust_domain, "file.example");
        // Control: without the flags, the file's values.
        let b = broker(parse(&["broker", "--config", f.to_str().unwrap()]).unwrap());
        assert_eq!(b.listen.to_string(), "127.0.0.1:9443");
    }

    #[test]
    fn a_flag_conflicting_with_a_file_setting_wins() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(
            dir.path(),
            "r.toml",
            "redis = \"redis://file:6379\"\nheartbeat = \"2s\"\n",
        );
        let cli = parse(&[
            "revocation",
            "--config",
            f.to_str().unwrap(),
            "--redis-cluster",
            "redis://a:1,redis://b:2",
        ])
        .unwrap();
        let Command::Revocation(r) = cli.command else {
            panic!("not revocation")
        };
        assert_eq!(r.redis.redis, None);
        assert_eq!(
            r.redis.redis_cluster.as_deref(),
            Some("redis://a:1,redis://b:2")
        );
        assert_eq!(r.heartbeat, std::time::Duration::from_secs(2));
        // Both in the file: a conflict, pointed at its lines.
        let g = write(
            dir.path(),
            "both.toml",
            "redis = \"redis://file:6379\"\nredis-cluster = \"redis://a:1\"\n",
        );
        let lines = config_errors(parse(&["revocation", "--config", g.to_str().unwrap()]));
        let all = lines.join("\n");
        assert!(all.contains("cannot be used with"), "{all}");
        assert!(all.contains("both.toml:1:1"), "{all}");
        assert!(all.contains("both.toml:2:1"), "{all}");
    }

    #[test]
    fn unknown_keys_are_refused_with_file_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(
            dir.path(),
            "broker.toml",
            "trust-domain = \"x.org\"\ndata-dir = \"/d\"\n  data_dir = \"/e\"\nredis-url = \"redis://h\"\nconfig = \"/other.toml\"\n",
        );
        let lines = config_errors(parse(&["broker", "--config", f.to_str().unwrap()]));
        assert_eq!(lines.len(), 3, "{lines:?}");
        let name = f.display().to_string();
        assert!(
            lines[0].starts_with(&format!("{name}:3:3: unknown key `data_dir`"))
                && lines[0].contains("did you mean `data-dir`?"),
            "{lines:?}"
        );
        assert!(
            lines[1].starts_with(&format!("{name}:4:1: unknown key `redis-url`"))
                && lines[1].contains("did you mean `redis"),
            "{lines:?}"
        );
        assert!(lines[2].contains(":5:1: unknown key `config`"), "{lines:?}");
        // A flag of another verb is unknown here too.
        let g = write(dir.path(), "a.toml", "sync-interval = \"1s\"\n");
        let lines = config_errors(parse(&["broker", "--config", g.to_str().unwrap()]));
        assert!(lines[0].contains(":1:1: unknown key `sync-interval` for `baton broker`"));
    }

    #[test]
    fn wrong_types_are_refused_with_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(
            dir.path(),
            "broker.toml",
            "trust-domain = \"x.org\"\ndata-dir = \"/d\"\ndev-issuer = \"yes\"\nmax-connections = \"many\"\nlisten = 8443\nadmin-uid = [1, \"root\"]\nca-ttl = \"soon\"\n[redis]\nurl = \"x\"\n",
        );
        let lines = config_errors(parse(&["broker", "--config", f.to_str().unwrap()]));
        let all = lines.join("\n");
        for (at, key) in [
            (
                ":3:14:",
                "`dev-issuer`: expected true or false, found string",
            ),
            (":8:", "`redis`: a table"),
            (":4:19:", "`max-connections`: invalid value 'many'"),
            (":5:10:", "`listen`: invalid value '8443'"),
            (":6:13:", "`admin-uid`: invalid value 'root'"),
            (":7:10:", "`ca-ttl`: invalid value 'soon'"),
        ] {
            assert!(
                lines.iter().any(|l| l.contains(at) && l.contains(key)),
                "no {at} {key} in:\n{all}"
            );
        }
        assert_eq!(lines.len(), 6, "{all}");
    }

    #[test]
    fn syntax_errors_name_the_line_but_not_its_text() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(
            dir.path(),
            "agent.toml",
            "trust-domain = \"x.org\"\njoin-token = \"s3cret-token\n",
        );
        let lines = config_errors(parse(&["agent", "--config", f.to_str().unwrap()]));
        assert!(lines[0].contains("agent.toml:2:"), "{lines:?}");
        assert!(lines[0].contains("not valid TOML"), "{lines:?}");
        assert!(!lines[0].contains("s3cret"), "{lines:?}");
    }

    #[test]
    fn required_flags_may_come_from_the_file_or_stay_missing() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(dir.path(), "b.toml", "data-dir = \"/d\"\n");
        let lines = config_errors(parse(&["broker", "--config", f.to_str().unwrap()]));
        assert!(lines[0].contains("--trust-domain"), "{lines:?}");
        assert!(lines[0].contains("b.toml"), "{lines:?}");
        let b = broker(
            parse(&[
                "broker",
                "--config",
                f.to_str().unwrap(),
                "--trust-domain",
                "x.org",
            ])
            .unwrap(),
        );
        assert_eq!(b.data_dir, PathBuf::from("/d"));
    }

    #[test]
    fn false_switches_and_empty_lists_set_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(
            dir.path(),
            "b.toml",
            "trust-domain = \"x.org\"\ndata-dir = \"/d\"\ndev-issuer = false\ntool-server = []\n",
        );
        let b = broker(parse(&["broker", "--config", f.to_str().unwrap()]).unwrap());
        assert!(!b.dev_issuer);
        assert!(b.tool_servers.is_empty());
    }

    #[test]
    fn every_flag_of_every_verb_is_a_key_and_has_a_variable() {
        let cmd = command();
        for verb in VERBS {
            let sub = cmd.find_subcommand(verb).unwrap();
            for arg in sub.get_arguments().filter(|a| is_setting(a)) {
                let long = arg.get_long().unwrap();
                assert!(find_setting(&cmd, sub, long).is_some(), "{verb} {long}");
                assert!(arg.get_env().is_some(), "{verb} --{long} has no variable");
            }
            assert!(find_setting(&cmd, sub, "log").is_some());
        }
        let broker = cmd.find_subcommand("broker").unwrap();
        let data_dir = broker
            .get_arguments()
            .find(|a| a.get_long() == Some("data-dir"))
            .unwrap();
        assert_eq!(data_dir.get_env().unwrap(), "BATON_DATA_DIR");
        // A variable the flag already named is kept.
        let redis = broker
            .get_arguments()
            .find(|a| a.get_long() == Some("redis"))
            .unwrap();
        assert_eq!(redis.get_env().unwrap(), "BATON_REDIS_URL");
    }

    #[test]
    fn inline_secrets_are_refused_without_quoting_them() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(
            dir.path(),
            "agent.toml",
            "trust-domain = \"x.org\"\njoin-token = \"tok-s3cret\"\n",
        );
        let lines = config_errors(parse(&["agent", "--config", f.to_str().unwrap()]));
        let all = lines.join("\n");
        assert_eq!(lines.len(), 1, "{all}");
        assert!(lines[0].contains("agent.toml:2:14: `join-token`"), "{all}");
        assert!(lines[0].contains("`join-token-file`"), "{all}");
        assert!(lines[0].contains("BATON_JOIN_TOKEN"), "{all}");
        assert!(!all.contains("s3cret"), "{all}");

        let g = write(
            dir.path(),
            "broker.toml",
            "trust-domain = \"x.org\"\ndata-dir = \"/d\"\nredis = \"redis://baton:pw-s3cret@h:6379\"\npg-database = \"crm\"\npg-admin-url = \"host=db user=admin password=s3cret\"\n",
        );
        let lines = config_errors(parse(&["broker", "--config", g.to_str().unwrap()]));
        let all = lines.join("\n");
        assert_eq!(lines.len(), 2, "{all}");
        assert!(
            lines[0].contains(":3:9: `redis`: holds a password"),
            "{all}"
        );
        assert!(lines[0].contains("`redis-password-file`"), "{all}");
        assert!(
            lines[1].contains(":5:16: `pg-admin-url`: holds a password"),
            "{all}"
        );
        assert!(lines[1].contains("`pg-admin-password-file`"), "{all}");
        assert!(lines[1].contains("BATON_PG_ADMIN_URL"), "{all}");
        assert!(!all.contains("s3cret"), "{all}");

        // Controls: a user name without a password, the password in a file,
        // the secret in the environment.
        let h = write(
            dir.path(),
            "broker-ok.toml",
            "trust-domain = \"x.org\"\ndata-dir = \"/d\"\nredis = \"redis://baton@h:6379\"\nredis-password-file = \"/run/pw\"\n",
        );
        let b = broker(parse(&["broker", "--config", h.to_str().unwrap()]).unwrap());
        assert_eq!(b.redis.redis.as_deref(), Some("redis://baton@h:6379"));
        let k = write(
            dir.path(),
            "agent-ok.toml",
            "trust-domain = \"x.org\"\nbroker-url = \"https://b:8443\"\ndata-dir = \"/d\"\nsocket = \"/s\"\njoin-token-file = \"/etc/baton/join-token\"\n",
        );
        parse(&["agent", "--config", k.to_str().unwrap()]).unwrap();
    }

    #[test]
    fn passwords_are_found_in_urls_and_libpq_strings() {
        for s in [
            "redis://u:p@h",
            "rediss://:p@h:6380/0",
            "redis://a:1,redis://u:p@b:2",
            "postgresql://admin:p@db/crm",
            "host=db password=p",
            "host=db PASSWORD=p",
            "host=db password = p",
            "host=db password ='p'",
            "password=p host=db",
            "postgresql://admin@db/crm?sslmode=require&password=p",
        ] {
            assert!(holds_password(s), "{s}");
        }
        for s in [
            "redis://u@h",
            "redis://h:6379",
            "https://[::1]:8443",
            "postgresql://admin@db/crm?sslmode=require",
            "host=db user=admin",
            "/run/credentials/x/password",
            "u:p@h",
            "host=db passwordless=1",
            "host=db user=nopassword",
        ] {
            assert!(!holds_password(s), "{s}");
        }
    }

    #[test]
    fn dev_mode_takes_a_file_too() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(
            dir.path(),
            "dev.toml",
            "data-dir = \"/srv/baton-dev\"\ntrust-domain = \"dev.example\"\nx509-ttl = \"10m\"\nshutdown-timeout = \"5s\"\n",
        );
        let cli = parse(&["dev", "--config", f.to_str().unwrap(), "--x509-ttl", "2m"]).unwrap();
        let Command::Dev(d) = cli.command else {
            panic!("not dev")
        };
        assert_eq!(d.data_dir, PathBuf::from("/srv/baton-dev"));
        assert_eq!(d.trust_domain, "dev.example");
        assert_eq!(d.x509_ttl, Some(std::time::Duration::from_secs(120)));
        assert_eq!(
            d.shutdown.shutdown_timeout,
            std::time::Duration::from_secs(5)
        );
        // A broker-only key is unknown to dev.
        let g = write(dir.path(), "dev2.toml", "redis = \"redis://h\"\n");
        let lines = config_errors(parse(&["dev", "--config", g.to_str().unwrap()]));
        assert!(
            lines[0].contains("unknown key `redis` for `baton dev`"),
            "{lines:?}"
        );
    }

    #[test]
    fn file_names_point_to_their_verb() {
        assert_eq!(
            guess_verb(Path::new("/etc/baton/broker.toml")),
            Some("broker")
        );
        assert_eq!(guess_verb(Path::new("baton-agent.toml")), Some("agent"));
        assert_eq!(guess_verb(Path::new("baton.toml")), None);
    }

    #[test]
    fn messages_name_a_flag_only_when_it_is_there() {
        let text = "the argument '--redis-cluster <URL>' cannot be used with '--redis-prefix'";
        assert!(mentions(text, "redis-cluster"));
        assert!(mentions(text, "redis-prefix"));
        assert!(!mentions(text, "redis"));
        assert!(mentions("'--dev-issuer'", "dev-issuer"));
    }

    #[test]
    fn locations_count_lines_and_characters_from_one() {
        let text = "a = 1\nbé = 2\n";
        assert_eq!(location("f", text, 0), "f:1:1");
        assert_eq!(location("f", text, 6), "f:2:1");
        assert_eq!(location("f", text, text.find('=').unwrap()), "f:1:3");
        assert_eq!(location("f", text, text.rfind('=').unwrap()), "f:2:4");
    }

    #[test]
    fn the_agent_takes_several_broker_urls() {
        fn urls(cli: Cli) -> Vec<String> {
            match cli.command {
                Command::Agent(a) => a.broker_urls,
                other => panic!("not an agent: {other:?}"),
            }
        }
        let args = |extra: &[&str]| {
            let mut a = vec![
                "agent",
                "--trust-domain",
                "x.org",
                "--data-dir",
                "/d",
                "--socket",
                "/s",
            ];
            a.extend_from_slice(extra);
            parse(&a)
        };
        // One URL, as before.
        assert_eq!(
            urls(args(&["--broker-url", "https://a:8443"]).unwrap()),
            ["https://a:8443"]
        );
        // Repeated, and comma-separated.
        assert_eq!(
            urls(
                args(&[
                    "--broker-url",
                    "https://a:8443,https://b:8443",
                    "--broker-url=https://c:8443",
                ])
                .unwrap()
            ),
            ["https://a:8443", "https://b:8443", "https://c:8443"]
        );
        assert!(matches!(args(&[]), Err(ParseError::Clap(_))));

        // In a file: one string (with commas) or an array; a flag replaces it.
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, value: &str| {
            write(
                dir.path(),
                name,
                &format!(
                    "trust-domain = \"x.org\"\ndata-dir = \"/d\"\nsocket = \"/s\"\nbroker-url = {value}\n"
                ),
            )
        };
        let f = file("one.toml", "\"https://a:8443\"");
        let f = f.to_str().unwrap();
        assert_eq!(
            urls(parse(&["agent", "--config", f]).unwrap()),
            ["https://a:8443"]
        );
        let f = file("commas.toml", "\"https://a:8443,https://b:8443\"");
        let f = f.to_str().unwrap();
        assert_eq!(
            urls(parse(&["agent", "--config", f]).unwrap()),
            ["https://a:8443", "https://b:8443"]
        );
        let f = file("array.toml", "[\"https://a:8443\", \"https://b:8443\"]");
        let f = f.to_str().unwrap();
        assert_eq!(
            urls(parse(&["agent", "--config", f]).unwrap()),
            ["https://a:8443", "https://b:8443"]
        );
        assert_eq!(
            urls(parse(&["agent", "--config", f, "--broker-url", "https://c:8443"]).unwrap()),
            ["https://c:8443"]
        );
    }
}
