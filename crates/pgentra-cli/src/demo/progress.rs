//! What the demo shows while it runs: what it is about to do, then a progress line on
//! standard error, redrawn in place on a terminal and printed every few seconds otherwise,
//! with a line for each token refresh.

use super::Args;
use super::summary::thousands;
use super::workload::Counters;
use crate::Context;
use crate::output::Style;
use crate::output::outln;
use pgentra::{DbCredentials, EntraAuth};
use pgentra_emulator::Emulator;
use std::io::IsTerminal as _;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How often the progress line is redrawn on a terminal.
const TTY_PROGRESS: Duration = Duration::from_millis(250);
/// How often a progress line is printed when standard error is a file or a pipe.
const LOG_PROGRESS: Duration = Duration::from_secs(5);
/// Erases the rest of the line, after a `\r` redraws it: cursor control, which anstyle (styles
/// only) does not cover.
const ERASE_LINE: &str = "\x1b[K";

/// What is about to happen; on standard error with `--json`, whose standard output is data.
pub(super) fn print_intro(
    args: &Args,
    context: Context,
    emulator: &Emulator,
    auth: &EntraAuth,
    first: &DbCredentials,
) {
    let style = if context.json {
        Style::for_stream(&std::io::stderr())
    } else {
        context.style
    };
    let lifetime = args.token_lifetime;
    let backend = emulator
        .cluster()
        .map_or_else(String::new, |c| format!(" (port {})", c.port()));
    let retire = |fraction: f64| lifetime.mul_f64(fraction).as_secs_f64();
    let rows = [
        (
            "database",
            format!(
                "a throwaway PostgreSQL{backend} behind an Azure-like gateway on localhost:{}, TLS verify-full",
                emulator.gateway().port()
            ),
        ),
        (
            "tokens",
            format!(
                "from the Entra ID emulator, each valid {}",
                humantime::format_duration(lifetime)
            ),
        ),
        (
            "credential",
            format!(
                "{} through IMDS at {}, role {}",
                auth.credential_name(),
                emulator.identity().imds_authority(),
                style.bold(first.user())
            ),
        ),
        (
            "pool",
            format!(
                "deadpool-postgres, {} connections, each closed after {:.1}–{:.1} s so new logins keep happening",
                args.connections,
                retire(0.25),
                retire(0.5),
            ),
        ),
        (
            "workload",
            format!(
                "SELECT current_user, now() in a loop for {}; Ctrl-C stops early",
                humantime::format_duration(args.duration)
            ),
        ),
    ];
    let proxy = (args.proxy_sessions > 0).then(|| {
        (
            "proxy",
            format!(
                "{} sessions through a pgentra proxy, reconnecting as often",
                args.proxy_sessions
            ),
        )
    });
    let mut text = format!(
        "{}\n",
        style.bold("pgentra demo: a pool kept logged in across token lifetimes")
    );
    for (name, value) in rows.into_iter().chain(proxy) {
        text.push_str(&format!(
            "  {}  {value}\n",
            style.dim(&format!("{name:<10}"))
        ));
    }
    if context.json {
        eprint!("{text}");
    } else {
        outln!("{text}");
    }
}

/// The progress display: the counters as one line on standard error.
pub(super) struct Progress<'a> {
    tty: bool,
    started: Instant,
    auth: &'a EntraAuth,
    emulator: &'a Emulator,
    counters: &'a Counters,
}

impl<'a> Progress<'a> {
    /// Starts the clock.
    pub(super) fn start(
        auth: &'a EntraAuth,
        emulator: &'a Emulator,
        counters: &'a Counters,
    ) -> Self {
        Self {
            tty: std::io::stderr().is_terminal(),
            started: Instant::now(),
            auth,
            emulator,
            counters,
        }
    }

    /// How long the workload has run.
    pub(super) fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// How often to call [`show`](Self::show).
    pub(super) fn interval(&self) -> Duration {
        if self.tty { TTY_PROGRESS } else { LOG_PROGRESS }
    }

    /// The counters now, at `elapsed`.
    fn line(&self, elapsed: Duration) -> String {
        format!(
            "{:>5.1}s  tokens {} · connections {} · queries {} · failures {}",
            elapsed.as_secs_f64(),
            self.auth.stats().tokens_fetched,
            self.emulator.gateway().logins(),
            thousands(self.counters.queries.load(Ordering::Relaxed)),
            self.counters.failures(),
        )
    }

    /// The counters now.
    pub(super) fn show(&self) {
        self.draw(&self.line(self.elapsed()), "");
    }

    /// A token refresh, the `number`th token, fetched `lead` seconds before the previous one
    /// expired: a line of its own, above the progress line on a terminal.
    pub(super) fn refreshed(&self, number: usize, lead: f64) {
        let event = format!(
            "{:>5.1}s  new token #{number}, fetched {lead:.1} s before the previous one expired",
            self.elapsed().as_secs_f64(),
        );
        self.draw(&event, "\n");
        if self.tty {
            self.show();
        }
    }

    /// The last progress line, with the counts at the end and the time the workload stopped.
    pub(super) fn finish(&self, elapsed: Duration) {
        self.draw(&self.line(elapsed), "\n");
    }

    /// On a terminal, `line` over the current one, then `end`; otherwise a line of its own.
    fn draw(&self, line: &str, end: &str) {
        if self.tty {
            eprint!("\r{line}{ERASE_LINE}{end}");
        } else {
            eprintln!("{line}");
        }
    }
}
