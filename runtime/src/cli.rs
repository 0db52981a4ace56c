//! Conventions every binary's command line follows. Environment twins renamed after their flags:
//! the old name keeps working for a while (a pod injected before the rename still sets it), with a
//! warning naming the new one. Every flag says what it is for ([`undocumented_args`]).

/// Parses the command line and the environment into `P`, reading each renamed variable (`(new,
/// old)` in `renamed`) under its old name when only that one is set. Returns the parse result and
/// one warning per old name used, to log once logging is set up.
pub fn parse_with_renamed_env<P>(
    renamed: &[(&'static str, &'static str)],
) -> (Result<P, clap::Error>, Vec<String>)
where
    P: clap::Parser,
{
    parse_from_with_renamed_env(std::env::args_os(), renamed, |name| {
        std::env::var_os(name).is_some()
    })
}

/// [`parse_with_renamed_env`] over `argv` and an environment in which `is_set` says which
/// variables are set (the values are still read from the process environment by clap).
pub fn parse_from_with_renamed_env<P, I, T>(
    argv: I,
    renamed: &[(&'static str, &'static str)],
    is_set: impl Fn(&str) -> bool,
) -> (Result<P, clap::Error>, Vec<String>)
where
    P: clap::Parser,
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let mut warnings = Vec::new();
    let command = redirect(P::command(), renamed, &is_set, &mut warnings);
    let parsed = command
        .try_get_matches_from(argv)
        .and_then(|matches| P::from_arg_matches(&matches));
    (parsed, warnings)
}

/// Points every argument whose variable was renamed, and is set only under its old name, at the
/// old name; in every subcommand too.
fn redirect(
    mut command: clap::Command,
    renamed: &[(&'static str, &'static str)],
    is_set: &impl Fn(&str) -> bool,
    warnings: &mut Vec<String>,
) -> clap::Command {
    let moved: Vec<(clap::Id, &'static str)> = command
        .get_arguments()
        .filter_map(|arg| {
            let new = arg.get_env()?.to_str()?;
            let &(_, old) = renamed.iter().find(|(n, _)| *n == new)?;
            (!is_set(new) && is_set(old)).then(|| (arg.get_id().clone(), old))
        })
        .collect();
    for (id, old) in moved {
        let new = renamed
            .iter()
            .find(|(_, o)| *o == old)
            .map_or("", |(n, _)| n);
        let warning = format!("{old} is deprecated and will be removed: set {new} instead");
        if !warnings.contains(&warning) {
            warnings.push(warning);
        }
        command = command.mut_arg(id, |arg| arg.env(old));
    }
    let subcommands: Vec<String> = command
        .get_subcommands()
        .map(|s| s.get_name().to_owned())
        .collect();
    for name in subcommands {
        command = command.mut_subcommand(name, |sub| redirect(sub, renamed, is_set, warnings));
    }
    command
}

/// Every argument of `command` and its subcommands without help text, as `subcommand --flag`.
pub fn undocumented_args(command: &clap::Command) -> Vec<String> {
    let mut out = Vec::new();
    for arg in command.get_arguments() {
        let builtin = matches!(arg.get_id().as_str(), "help" | "version");
        if !builtin && arg.get_help().is_none() && arg.get_long_help().is_none() {
            let name = arg
                .get_long()
                .map_or_else(|| arg.get_id().to_string(), |l| format!("--{l}"));
            out.push(format!("{} {name}", command.get_name()));
        }
    }
    for sub in command.get_subcommands() {
        if sub.get_about().is_none() && sub.get_long_about().is_none() && sub.get_name() != "help" {
            out.push(format!(
                "{} {} (the subcommand)",
                command.get_name(),
                sub.get_name()
            ));
        }
        out.extend(
            undocumented_args(sub)
                .into_iter()
                .map(|a| format!("{} {a}", command.get_name())),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(subcommand)]
        command: Sub,
    }

    #[derive(Debug, clap::Subcommand)]
    enum Sub {
        Run {
            #[arg(long, env = "MESHID_RUNTIME_TEST_NEW_HOME")]
            home: Option<String>,
        },
    }

    const RENAMED: &[(&str, &str)] = &[("MESHID_RUNTIME_TEST_NEW_HOME", "HOME")];

    #[test]
    fn an_old_name_is_read_with_a_warning_and_the_new_one_wins() {
        // HOME is set in any test environment; the new name is never set.
        let home = std::env::var("HOME").unwrap_or_default();
        let (cli, warnings) =
            parse_from_with_renamed_env::<Cli, _, _>(["t", "run"], RENAMED, |n| n == "HOME");
        let Sub::Run { home: got } = cli.unwrap().command;
        assert_eq!(got.as_deref(), Some(home.as_str()));
        assert_eq!(
            warnings,
            vec![
                "HOME is deprecated and will be removed: set MESHID_RUNTIME_TEST_NEW_HOME instead"
            ]
        );
        // A flag still beats both.
        let (cli, _) =
            parse_from_with_renamed_env::<Cli, _, _>(["t", "run", "--home", "/x"], RENAMED, |n| {
                n == "HOME"
            });
        let Sub::Run { home: got } = cli.unwrap().command;
        assert_eq!(got.as_deref(), Some("/x"));
        // The new name set (here: said to be): the old one is not consulted, no warning.
        let (_, warnings) =
            parse_from_with_renamed_env::<Cli, _, _>(["t", "run"], RENAMED, |_| true);
        assert!(warnings.is_empty());
    }
}
