//! Output helpers: logging, colour, shell quoting and time formatting.

use std::io::{IsTerminal, Write as _};
use std::time::{Duration, SystemTime};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::prelude::*;

/// How log lines look.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `fields`, `target`).
    Json,
}

/// Logs go to standard error: warnings by default, more with `-v`, or what `RUST_LOG` says.
pub(crate) fn init_logging(verbose: u8, format: LogFormat) {
    let level = match verbose {
        0 => LevelFilter::WARN,
        1 => LevelFilter::INFO,
        2 => LevelFilter::DEBUG,
        _ => LevelFilter::TRACE,
    };
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => spec.parse().unwrap_or_else(|error| {
            eprintln!("pgentra: ignoring RUST_LOG ({error})");
            Targets::new().with_default(level)
        }),
        // A failed token fetch is already this command's error; the provider's warning about
        // it (meant for long-running apps) would say it twice.
        _ if verbose == 0 => Targets::new()
            .with_default(level)
            .with_target("pgentra::provider", LevelFilter::ERROR),
        _ => Targets::new().with_default(level),
    };
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(verbose > 1);
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry.with(layer).init(),
        LogFormat::Json => registry.with(layer.json()).init(),
    }
}

/// Colour for a stream: only on a terminal, and never with `NO_COLOR` set.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Style {
    colour: bool,
}

impl Style {
    pub(crate) fn for_stdout() -> Self {
        Self::for_stream(&std::io::stdout())
    }

    pub(crate) fn for_stream(stream: &impl IsTerminal) -> Self {
        Self {
            colour: stream.is_terminal()
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        }
    }

    fn paint(self, style: anstyle::Style, text: &str) -> String {
        if self.colour {
            format!("{style}{text}{style:#}")
        } else {
            text.to_owned()
        }
    }

    pub(crate) fn good(self, text: &str) -> String {
        self.paint(anstyle::AnsiColor::Green.on_default(), text)
    }

    pub(crate) fn bad(self, text: &str) -> String {
        self.paint(anstyle::AnsiColor::Red.on_default(), text)
    }

    pub(crate) fn dim(self, text: &str) -> String {
        self.paint(anstyle::Style::new().dimmed(), text)
    }

    pub(crate) fn bold(self, text: &str) -> String {
        self.paint(anstyle::Style::new().bold(), text)
    }
}

/// The shells `env` and `emulator` print variables for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Shell {
    /// POSIX `sh`, bash, zsh: `export NAME='value'`.
    #[default]
    Sh,
    /// fish: `set -gx NAME 'value'`.
    Fish,
    /// PowerShell: `$Env:NAME = 'value'`.
    Powershell,
}

impl Shell {
    /// One line that sets `name` to `value` in this shell.
    pub(crate) fn export(self, name: &str, value: &str) -> String {
        match self {
            Self::Sh => format!("export {name}='{}'", value.replace('\'', r"'\''")),
            Self::Fish => format!(
                "set -gx {name} '{}'",
                value.replace('\\', r"\\").replace('\'', r"\'")
            ),
            Self::Powershell => format!("$Env:{name} = '{}'", value.replace('\'', "''")),
        }
    }
}

/// Prints environment variables for `shell`, or as one JSON object with `--json`.
pub(crate) fn print_vars<K: Into<String>>(
    vars: impl IntoIterator<Item = (K, String)>,
    shell: Shell,
    json: bool,
) {
    let vars = vars.into_iter().map(|(name, value)| (name.into(), value));
    if json {
        let object: serde_json::Map<String, serde_json::Value> =
            vars.map(|(name, value)| (name, value.into())).collect();
        print_json(&object.into());
    } else {
        // A reader that stops early (`sed '/^# ready/q'`) is not an error.
        let mut out = std::io::stdout().lock();
        for (name, value) in vars {
            let _ = writeln!(out, "{}", shell.export(&name, &value));
        }
    }
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed at the call, not on first poll,
/// so a signal sent as soon as a foreground command says it is ready stops it cleanly instead
/// of killing it.
pub(crate) fn shutdown_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{Signal, SignalKind, signal};
    async fn received(signal: Option<&mut Signal>) {
        match signal {
            Some(signal) => {
                signal.recv().await;
            }
            None => std::future::pending().await,
        }
    }
    let mut terminate = signal(SignalKind::terminate()).ok();
    let mut interrupt = signal(SignalKind::interrupt()).ok();
    async move {
        tokio::select! {
            () = received(terminate.as_mut()) => {}
            () = received(interrupt.as_mut()) => {}
        }
        tracing::info!("shutdown requested");
    }
}

/// An RFC 3339 time, seconds precision.
pub(crate) fn timestamp(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

/// `in 59m 58s` or `3m 2s ago`, to whole seconds.
pub(crate) fn relative(time: SystemTime) -> String {
    let now = SystemTime::now();
    let whole = |d: Duration| humantime::format_duration(Duration::from_secs(d.as_secs()));
    match time.duration_since(now) {
        Ok(ahead) => format!("in {}", whole(ahead)),
        Err(behind) => format!("{} ago", whole(behind.duration())),
    }
}

/// Prints a JSON value on one line.
pub(crate) fn print_json(value: &serde_json::Value) {
    outln!("{value}");
}

/// What a process killed by `SIGPIPE` exits with in a shell (128 + 13).
const BROKEN_PIPE_EXIT: i32 = 141;

/// Writes a line to standard output. A reader that went away (`pgentra check | head -1`) ends
/// the command quietly, as `SIGPIPE` ends `cat` (Rust ignores the signal, so a `println!`
/// would panic); any other failure to write (a full disk) is reported and exits 1.
pub(crate) fn write_line(line: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    if let Err(error) = writeln!(stdout, "{line}").and_then(|()| stdout.flush()) {
        if error.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(BROKEN_PIPE_EXIT);
        }
        eprintln!("pgentra: writing to standard output: {error}");
        std::process::exit(1);
    }
}

/// `println!` for standard output, through [`write_line`].
macro_rules! outln {
    () => {
        $crate::output::write_line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::output::write_line(format_args!($($arg)*))
    };
}
pub(crate) use outln;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_quoted_for_each_shell() {
        assert_eq!(Shell::Sh.export("A", "it's"), r"export A='it'\''s'");
        assert_eq!(
            Shell::Fish.export("A", r"it's \o/"),
            r"set -gx A 'it\'s \\o/'"
        );
        assert_eq!(Shell::Powershell.export("A", "it's"), "$Env:A = 'it''s'");
    }

    #[test]
    fn times_are_relative_to_now() {
        let later = SystemTime::now() + Duration::from_secs(125);
        assert!(relative(later).starts_with("in 2m"), "{}", relative(later));
        let earlier = SystemTime::now() - Duration::from_secs(3600);
        assert_eq!(relative(earlier), "1h ago");
    }
}
