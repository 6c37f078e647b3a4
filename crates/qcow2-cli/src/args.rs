//! A small command-line parser for qemu-img's option style: short options
//! with a value (`-f qcow2`), flags (`-p`), long options with a value given
//! either way (`--output json`, `--output=json`), and positionals.

use std::collections::HashMap;

use crate::error::CliError;

/// Parsed arguments of one command.
#[derive(Debug, Default)]
pub struct Args {
    values: HashMap<String, String>,
    flags: Vec<String>,
    /// Positional arguments in order.
    pub positional: Vec<String>,
}

impl Args {
    /// Parses `argv`; `with_value` lists the options that take a value,
    /// `flags` those that do not. Anything else starting with `-` is an error.
    pub fn parse(argv: &[String], with_value: &[&str], flags: &[&str]) -> Result<Self, CliError> {
        let mut out = Args::default();
        let mut iter = argv.iter();
        while let Some(arg) = iter.next() {
            if arg == "-h" || arg == "--help" {
                return Err(CliError::Help);
            }
            if arg.len() < 2 || !arg.starts_with('-') {
                out.positional.push(arg.clone());
                continue;
            }
            let (name, inline) = match arg.split_once('=') {
                Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
                _ => (arg.clone(), None),
            };
            if with_value.contains(&name.as_str()) {
                let value = match inline {
                    Some(v) => v,
                    None => iter
                        .next()
                        .cloned()
                        .ok_or_else(|| CliError::Usage(format!("option {name} needs a value")))?,
                };
                out.values.insert(name, value);
            } else if flags.contains(&name.as_str()) && inline.is_none() {
                out.flags.push(name);
            } else {
                return Err(CliError::Usage(format!("unknown option {arg}")));
            }
        }
        Ok(out)
    }

    /// The value of an option, if given.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    /// Whether a flag was given.
    pub fn flag(&self, name: &str) -> bool {
        self.flags.iter().any(|f| f == name)
    }

    /// Exactly `n` positionals, named in `what` for the error message.
    pub fn expect_positional(&self, what: &[&str]) -> Result<Vec<&str>, CliError> {
        if self.positional.len() != what.len() {
            return Err(CliError::Usage(format!(
                "expected {} (got {} argument{})",
                what.join(" "),
                self.positional.len(),
                if self.positional.len() == 1 { "" } else { "s" }
            )));
        }
        Ok(self.positional.iter().map(String::as_str).collect())
    }

    /// `--output human|json`; human by default.
    pub fn json_output(&self) -> Result<bool, CliError> {
        match self.value("--output") {
            None | Some("human") => Ok(false),
            Some("json") => Ok(true),
            Some(other) => Err(CliError::Usage(format!(
                "--output must be human or json, not {other:?}"
            ))),
        }
    }
}

/// Splits `-o key=value,key=value` (a bare `key` means `key=on`).
pub fn parse_options(text: &str) -> Result<Vec<(String, String)>, CliError> {
    text.split(',')
        .filter(|s| !s.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            Some(_) => Err(CliError::Usage(format!("invalid option {kv:?}"))),
            None => Ok((kv.to_string(), "on".to_string())),
        })
        .collect()
}

/// Parses `on`/`off` (and the usual synonyms).
pub fn parse_bool(key: &str, value: &str) -> Result<bool, CliError> {
    match value {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(CliError::Usage(format!(
            "{key} must be on or off, not {value:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn parses_both_long_option_forms_and_flags() {
        let a = Args::parse(
            &argv("-p --output=json -f raw a b"),
            &["-f", "--output"],
            &["-p"],
        )
        .unwrap();
        assert!(a.flag("-p"));
        assert_eq!(a.value("--output"), Some("json"));
        assert_eq!(a.value("-f"), Some("raw"));
        assert_eq!(a.positional, vec!["a", "b"]);
        let a = Args::parse(&argv("--output json x"), &["--output"], &[]).unwrap();
        assert!(a.json_output().unwrap());
        assert!(Args::parse(&argv("--bogus"), &[], &[]).is_err());
        assert!(Args::parse(&argv("-f"), &["-f"], &[]).is_err());
    }

    #[test]
    fn splits_option_lists() {
        assert_eq!(
            parse_options("cluster_size=4k,lazy_refcounts").unwrap(),
            vec![
                ("cluster_size".to_string(), "4k".to_string()),
                ("lazy_refcounts".to_string(), "on".to_string())
            ]
        );
        assert!(parse_options("=3").is_err());
    }
}
