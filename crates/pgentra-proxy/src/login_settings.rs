//! The settings a client's startup packet makes, read as PostgreSQL reads them, to keep the
//! role the proxy logs in as: "In addition to the above, other parameters may be listed.
//! Parameter names beginning with `_pq_.` are reserved for use as protocol extensions, while
//! others are treated as run-time parameters to be set at backend start time" (protocol,
//! 55.7, `StartupMessage`), and `options` carries "command-line arguments for the backend"
//! (libpq, 34.1.2), where `-c name=value` and `--name=value` set any parameter. Either way a
//! client could set `role` or `session_authorization` and act as another role than the one the
//! proxy chose (`--user`, `--client-roles`, the token's); PgBouncer refuses both, and so does
//! the proxy.

use bytes::Bytes;

/// The settings that change the role a session acts as.
const ROLE_SETTINGS: [&str; 2] = ["role", "session_authorization"];

/// The backend's switches that take an argument (`process_postgres_switches` in
/// `src/backend/tcop/postgres.c`: `getopt(argc, argv, "B:bC:c:D:d:EeFf:h:ijk:lN:nOPp:r:S:sTt:v:W:-:")`).
const SWITCHES_WITH_ARGUMENT: &[u8] = b"BCcDdfhkNprStvW-";

/// The first setting among the startup parameters (names and values, as sent) that would
/// change the session's role, as the client spelled it.
pub(crate) fn role_change(params: &[(String, Bytes)]) -> Option<String> {
    for (name, value) in params {
        if name == "options" {
            let options = String::from_utf8_lossy(value);
            if let Some(set) = settings(&options).find(|set| changes_role(set)) {
                return Some(set);
            }
        } else if changes_role(name) {
            return Some(name.clone());
        }
    }
    None
}

/// Whether `name` (or `name=value`) names a role setting: names match without regard to
/// case, and `-` stands for `_` in `--name=value` (`ParseLongOption` in `guc.c`).
fn changes_role(setting: &str) -> bool {
    let name = setting.split('=').next().unwrap_or_default();
    ROLE_SETTINGS.iter().any(|role| {
        role.len() == name.len()
            && name
                .bytes()
                .zip(role.bytes())
                .all(|(a, b)| a.to_ascii_lowercase() == b || (a == b'-' && b == b'_'))
    })
}

/// The `name=value` arguments of the `-c` and `--` switches in `options`. Every argument that
/// starts with `-` is read as switches, wherever it stands (glibc's `getopt` moves the others
/// out of the way), so none is missed.
fn settings(options: &str) -> impl Iterator<Item = String> {
    let mut args = split(options).into_iter();
    std::iter::from_fn(move || {
        while let Some(arg) = args.next() {
            let Some(switches) = arg.strip_prefix('-') else {
                continue;
            };
            for (at, switch) in switches.char_indices() {
                if !switch.is_ascii() || !SWITCHES_WITH_ARGUMENT.contains(&(switch as u8)) {
                    continue;
                }
                // The argument is the rest of this one, or else the next one.
                let rest = &switches[at + 1..];
                let argument = if rest.is_empty() {
                    args.next().unwrap_or_default()
                } else {
                    rest.to_owned()
                };
                if matches!(switch, 'c' | '-') {
                    return Some(argument);
                }
                break;
            }
        }
        None
    })
}

/// `options` split into arguments as `pg_split_opts` (`src/backend/utils/init/postinit.c`)
/// does: "Spaces within this string are considered to separate arguments, unless escaped with
/// a backslash (`\`); write `\\` to represent a literal backslash" (libpq, 34.1.2).
fn split(options: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut arg = String::new();
    let mut escaped = false;
    for c in options.chars() {
        if escaped {
            arg.push(c);
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if is_c_space(c) {
            if !arg.is_empty() {
                args.push(std::mem::take(&mut arg));
            }
        } else {
            arg.push(c);
        }
    }
    if !arg.is_empty() {
        args.push(arg);
    }
    args
}

/// C's `isspace` in the C locale.
fn is_c_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(list: &[(&str, &str)]) -> Vec<(String, Bytes)> {
        list.iter()
            .map(|(n, v)| ((*n).to_owned(), Bytes::copy_from_slice(v.as_bytes())))
            .collect()
    }

    fn change(options: &str) -> Option<String> {
        role_change(&params(&[("user", "alice"), ("options", options)]))
    }

    #[test]
    fn role_settings_in_options_are_found_however_spelled() {
        assert_eq!(change("-c role=admin").as_deref(), Some("role=admin"));
        assert_eq!(change("-crole=admin").as_deref(), Some("role=admin"));
        assert_eq!(change("--role=admin").as_deref(), Some("role=admin"));
        assert_eq!(change("-c ROLE=admin").as_deref(), Some("ROLE=admin"));
        assert_eq!(
            change("--session-authorization=admin").as_deref(),
            Some("session-authorization=admin")
        );
        // Behind other switches, with or without arguments of their own.
        assert_eq!(change("-e -c role=a").as_deref(), Some("role=a"));
        assert_eq!(change("-ecrole=a").as_deref(), Some("role=a"));
        assert_eq!(
            change("-c search_path=x -B 10 -c role=a").as_deref(),
            Some("role=a")
        );
        // After an argument that is not a switch, and after an escaped space.
        assert_eq!(change("stray -c role=a").as_deref(), Some("role=a"));
        assert_eq!(
            change("-c application_name=a\\ b -c role=a").as_deref(),
            Some("role=a")
        );
        assert_eq!(change("\t-c\nrole=a").as_deref(), Some("role=a"));
    }

    #[test]
    fn other_settings_and_values_that_mention_a_role_pass() {
        assert_eq!(change("-c search_path=role"), None);
        assert_eq!(change("-c application_name=role=admin"), None);
        assert_eq!(change("-c rolex=1 --roles=2"), None);
        // The argument of another switch is not a setting.
        assert_eq!(change("-B role=a"), None);
        // An escaped space keeps `role=a` inside application_name's value.
        assert_eq!(change("-c application_name=x\\ -c\\ role=a"), None);
        assert_eq!(change(""), None);
        assert_eq!(change("-c"), None);
    }

    #[test]
    fn role_settings_as_startup_parameters_are_found() {
        for name in [
            "role",
            "Role",
            "session_authorization",
            "SESSION_AUTHORIZATION",
        ] {
            assert_eq!(
                role_change(&params(&[("user", "alice"), (name, "admin")])).as_deref(),
                Some(name)
            );
        }
        let plain = params(&[
            ("user", "role"),
            ("database", "role"),
            ("search_path", "role"),
        ]);
        assert_eq!(role_change(&plain), None);
    }
}
