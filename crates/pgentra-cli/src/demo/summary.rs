//! The demo's result: the statistics of a run, printed for people, and the `--json` summary,
//! which is the demo's one machine-readable contract (`scripts/soak` and the tests read it).

use crate::Context;
use crate::output::outln;
use serde::Serialize;
use std::time::Duration;

/// Everything the summary reports.
#[derive(Debug)]
pub(super) struct Summary {
    pub(super) elapsed: Duration,
    pub(super) interrupted: bool,
    pub(super) token_lifetime: Duration,
    pub(super) connections: usize,
    pub(super) proxy_sessions: usize,
    pub(super) role: String,
    pub(super) tokens_fetched: u64,
    pub(super) connections_opened: u64,
    pub(super) gateway_refused: u64,
    pub(super) queries: u64,
    pub(super) login_failures: u64,
    pub(super) query_failures: u64,
    /// For each refresh, seconds between fetching the new token and the old one's expiry
    /// (negative if it came late).
    pub(super) refresh_leads: Vec<f64>,
    /// New logins' durations in seconds, sorted.
    pub(super) login_seconds: Vec<f64>,
    /// Resident memory once the workload ran for a while, and at the end.
    pub(super) rss_kib: (Option<u64>, Option<u64>),
    pub(super) first_error: Option<String>,
}

/// The `--json` summary: one object on one line of standard output, and nothing else there.
/// Fields are added, never renamed or given another meaning, since scripts parse them.
#[derive(Debug, Serialize)]
pub(super) struct Json<'a> {
    /// Seconds the workload ran.
    duration_s: f64,
    /// Whether Ctrl-C stopped it before `--duration`.
    interrupted: bool,
    /// `--token-lifetime`, in seconds.
    token_lifetime_s: f64,
    /// `--connections`: the pool's size.
    connections: usize,
    /// `--proxy-sessions`.
    proxy_sessions: usize,
    /// The role the pool logged in as.
    role: &'a str,
    /// Tokens the provider fetched, the first one included.
    tokens_fetched: u64,
    /// Logins the gateway accepted (pool and proxy).
    connections_opened: u64,
    /// Queries that succeeded.
    queries: u64,
    /// Logins that failed, seen by the clients or refused by the gateway.
    failed_logins: u64,
    /// Logins the gateway refused.
    gateway_refused: u64,
    /// Queries that failed.
    query_failures: u64,
    /// For each refresh, seconds between fetching the new token and the previous one's expiry
    /// (negative if late); one entry per token after the first.
    refresh_leads_s: Vec<f64>,
    /// How many logins were timed for the percentiles.
    logins_timed: usize,
    /// Median login time in milliseconds; null without a timed login.
    login_p50_ms: Option<f64>,
    /// 99th percentile login time in milliseconds; null without a timed login.
    login_p99_ms: Option<f64>,
    /// Resident memory in KiB once the workload is warm; null where `/proc` is missing.
    rss_start_kib: Option<u64>,
    /// Resident memory in KiB at the end; null where `/proc` is missing.
    rss_end_kib: Option<u64>,
    /// The first failure's error, if any failed.
    first_error: Option<&'a str>,
    /// Why the run did not show what it should, one sentence each; empty if it did.
    problems: &'a [String],
    /// `problems` is empty (the exit code is 0).
    ok: bool,
}

/// `1 token`, `1,234 tokens`.
fn count(n: u64, one: &str, many: &str) -> String {
    format!("{} {}", thousands(n), if n == 1 { one } else { many })
}

/// `1234567` as `1,234,567`.
pub(super) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

impl Summary {
    fn failed_logins(&self) -> u64 {
        // A refusal by the gateway is also a failed login on the client: adding the two would
        // count it twice, the larger count misses neither.
        self.login_failures.max(self.gateway_refused)
    }

    /// Why the run did not show what it should; empty if it did.
    pub(super) fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.failed_logins() > 0 {
            problems.push(count(self.failed_logins(), "failed login", "failed logins"));
        }
        if self.query_failures > 0 {
            problems.push(count(self.query_failures, "failed query", "failed queries"));
        }
        if self.elapsed > self.token_lifetime && self.refresh_leads.is_empty() {
            problems.push(format!(
                "no token was refreshed in {:.1} s of {} s tokens",
                self.elapsed.as_secs_f64(),
                self.token_lifetime.as_secs_f64()
            ));
        }
        let late = self
            .refresh_leads
            .iter()
            .filter(|lead| **lead <= 0.0)
            .count();
        if late > 0 {
            problems.push(format!(
                "{} only after the previous one expired",
                count(late as u64, "token was refreshed", "tokens were refreshed")
            ));
        }
        if let (false, Some(error)) = (problems.is_empty(), &self.first_error) {
            problems.push(format!("first error: {error}"));
        }
        problems
    }

    /// The login time below which `share` of the logins took, in milliseconds.
    fn login_ms(&self, share: f64) -> Option<f64> {
        let sorted = &self.login_seconds;
        let last = sorted.len().checked_sub(1)?;
        let index = ((last as f64) * share).round() as usize;
        Some(sorted[index.min(last)] * 1000.0)
    }

    fn leads(&self) -> Option<(f64, f64, f64)> {
        let leads = &self.refresh_leads;
        let min = leads.iter().copied().reduce(f64::min)?;
        let max = leads.iter().copied().reduce(f64::max)?;
        Some((min, leads.iter().sum::<f64>() / leads.len() as f64, max))
    }

    pub(super) fn print(&self, context: Context, problems: &[String]) {
        let style = context.style;
        let row = |name: &str, value: &str| {
            outln!("  {}  {value}", style.dim(&format!("{name:<20}")));
        };
        let failed = |count: u64| {
            if count == 0 {
                style.good("0")
            } else {
                style.bad(&thousands(count))
            }
        };
        outln!();
        outln!(
            "{}",
            style.bold(if self.interrupted {
                "Summary (stopped early by Ctrl-C)"
            } else {
                "Summary"
            })
        );
        let proxied = if self.proxy_sessions > 0 {
            format!(" and {} through the proxy", self.proxy_sessions)
        } else {
            String::new()
        };
        row(
            "ran for",
            &format!(
                "{:.1} s with {} connections{proxied}, tokens valid {} each",
                self.elapsed.as_secs_f64(),
                self.connections,
                humantime::format_duration(self.token_lifetime)
            ),
        );
        row("tokens fetched", &thousands(self.tokens_fetched));
        let per_token = self.connections_opened as f64 / self.tokens_fetched.max(1) as f64;
        row(
            "connections opened",
            &format!(
                "{}  ({per_token:.1} per token, as {})",
                thousands(self.connections_opened),
                self.role
            ),
        );
        if let (Some(p50), Some(p99)) = (self.login_ms(0.5), self.login_ms(0.99)) {
            row("login time", &format!("p50 {p50:.1} ms · p99 {p99:.1} ms"));
        }
        row("queries", &thousands(self.queries));
        row(
            "failed logins",
            &format!(
                "{}  (refused by the gateway: {})",
                failed(self.failed_logins()),
                self.gateway_refused
            ),
        );
        row("failed queries", &failed(self.query_failures));
        row(
            "refreshed ahead",
            &match self.leads() {
                Some((min, avg, max)) => format!(
                    "min {min:.1} s · avg {avg:.1} s · max {max:.1} s before expiry  ({})",
                    count(self.refresh_leads.len() as u64, "refresh", "refreshes")
                ),
                None => "no refresh (the run was shorter than a token's life)".into(),
            },
        );
        if let (Some(start), Some(end)) = self.rss_kib {
            row(
                "memory (RSS)",
                &format!(
                    "{:.1} MiB once warm, {:.1} MiB at the end",
                    start as f64 / 1024.0,
                    end as f64 / 1024.0
                ),
            );
        }
        outln!();
        if problems.is_empty() {
            outln!(
                "{}",
                style.good(&format!(
                    "✓ {} logged in with {}; no login failed.",
                    count(self.connections_opened, "new connection", "new connections"),
                    count(self.tokens_fetched, "token", "tokens")
                ))
            );
        } else {
            outln!("{}", style.bad(&format!("✗ {}", problems.join("; "))));
        }
    }

    /// The `--json` summary for this run and its `problems`.
    pub(super) fn json<'a>(&'a self, problems: &'a [String]) -> Json<'a> {
        // Three decimals: milliseconds of the seconds, microseconds of the milliseconds.
        let round = |value: f64| (value * 1000.0).round() / 1000.0;
        Json {
            duration_s: round(self.elapsed.as_secs_f64()),
            interrupted: self.interrupted,
            token_lifetime_s: round(self.token_lifetime.as_secs_f64()),
            connections: self.connections,
            proxy_sessions: self.proxy_sessions,
            role: &self.role,
            tokens_fetched: self.tokens_fetched,
            connections_opened: self.connections_opened,
            queries: self.queries,
            failed_logins: self.failed_logins(),
            gateway_refused: self.gateway_refused,
            query_failures: self.query_failures,
            refresh_leads_s: self.refresh_leads.iter().copied().map(round).collect(),
            logins_timed: self.login_seconds.len(),
            login_p50_ms: self.login_ms(0.5).map(round),
            login_p99_ms: self.login_ms(0.99).map(round),
            rss_start_kib: self.rss_kib.0,
            rss_end_kib: self.rss_kib.1,
            first_error: self.first_error.as_deref(),
            problems,
            ok: problems.is_empty(),
        }
    }
}

/// This process's resident memory in KiB, from `/proc/self/status`.
pub(super) fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_readable() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(count(1, "token", "tokens"), "1 token");
        assert_eq!(count(1200, "token", "tokens"), "1,200 tokens");
    }
}
