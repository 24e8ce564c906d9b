//! Counters of the proxy's work, rendered in the Prometheus text format.

use crate::pool::PoolSnapshot;
use crate::refusal::Reason;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the upstream login latency histogram, in seconds.
const LOGIN_BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// The proxy's counters. Cheap to update from every session.
#[derive(Debug, Default)]
pub struct Metrics {
    opened: AtomicU64,
    closed: AtomicU64,
    refused: [AtomicU64; Reason::ALL.len()],
    to_upstream: AtomicU64,
    to_client: AtomicU64,
    logins: AtomicU64,
    login_failures: AtomicU64,
    login_buckets: [AtomicU64; LOGIN_BUCKETS.len()],
    login_micros: AtomicU64,
    cancels: AtomicU64,
}

impl Metrics {
    pub(crate) fn connection_opened(&self) {
        self.opened.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn connection_closed(&self) {
        self.closed.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn refused(&self, reason: Reason) {
        self.refused[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn bytes(&self, to_upstream: u64, to_client: u64) {
        self.to_upstream.fetch_add(to_upstream, Ordering::Relaxed);
        self.to_client.fetch_add(to_client, Ordering::Relaxed);
    }

    pub(crate) fn login_succeeded(&self, latency: Duration) {
        self.logins.fetch_add(1, Ordering::Relaxed);
        let seconds = latency.as_secs_f64();
        for (bucket, bound) in self.login_buckets.iter().zip(LOGIN_BUCKETS) {
            if seconds <= bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.login_micros.fetch_add(micros, Ordering::Relaxed);
    }

    pub(crate) fn login_failed(&self) {
        self.login_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn cancel_request(&self) {
        self.cancels.fetch_add(1, Ordering::Relaxed);
    }

    /// Client connections open now.
    pub fn connections_open(&self) -> u64 {
        let closed = self.closed.load(Ordering::Relaxed);
        self.opened.load(Ordering::Relaxed).saturating_sub(closed)
    }

    /// Client connections accepted so far.
    pub fn connections_total(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// Clients refused so far, for any reason.
    pub fn connections_refused(&self) -> u64 {
        self.refused.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Successful upstream logins so far.
    pub fn logins(&self) -> u64 {
        self.logins.load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition of these counters and the provider's.
    pub(crate) fn render(&self, token: &pgentra::provider::Stats) -> String {
        let mut out = String::new();
        for (name, kind, help, samples) in FAMILIES {
            let _ = writeln!(out, "# HELP pgentra_proxy_{name} {help}");
            let _ = writeln!(out, "# TYPE pgentra_proxy_{name} {kind}");
            for (labels, value) in samples(self, token) {
                let _ = writeln!(out, "pgentra_proxy_{name}{labels} {value}");
            }
        }
        out
    }

    /// The login latency histogram's samples.
    fn login_histogram(&self) -> Vec<(String, f64)> {
        let mut histogram: Vec<(String, f64)> = LOGIN_BUCKETS
            .iter()
            .zip(&self.login_buckets)
            .map(|(bound, n)| (format!("_bucket{{le=\"{bound}\"}}"), count(load(n))))
            .collect();
        let logins = count(load(&self.logins));
        histogram.push(("_bucket{le=\"+Inf\"}".into(), logins));
        histogram.push(("_sum".into(), count(load(&self.login_micros)) / 1e6));
        histogram.push(("_count".into(), logins));
        histogram
    }
}

fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// One unlabelled sample.
fn one(value: f64) -> Vec<(String, f64)> {
    vec![(String::new(), value)]
}

/// One family's samples: the labels (with their braces) and the value.
type Family = fn(&Metrics, &pgentra::provider::Stats) -> Vec<(String, f64)>;

/// The proxy's own families, and the token provider's.
const FAMILIES: [(&str, &str, &str, Family); 10] = [
    (
        "connections_open",
        "gauge",
        "Client connections open now.",
        |m, _| one(count(m.connections_open())),
    ),
    (
        "connections_total",
        "counter",
        "Client connections accepted.",
        |m, _| one(count(load(&m.opened))),
    ),
    (
        "connections_refused_total",
        "counter",
        "Clients refused, and sessions the proxy ended with a FATAL, by reason.",
        |m, _| {
            (Reason::ALL.iter().zip(&m.refused))
                .map(|(reason, n)| (format!("{{reason=\"{}\"}}", reason.label()), count(load(n))))
                .collect()
        },
    ),
    (
        "bytes_total",
        "counter",
        "Bytes relayed by ended sessions, by direction.",
        |m, _| {
            vec![
                (
                    "{direction=\"to_upstream\"}".into(),
                    count(load(&m.to_upstream)),
                ),
                (
                    "{direction=\"to_client\"}".into(),
                    count(load(&m.to_client)),
                ),
            ]
        },
    ),
    (
        "cancel_requests_total",
        "counter",
        "Cancel requests received.",
        |m, _| one(count(load(&m.cancels))),
    ),
    (
        "upstream_login_failures_total",
        "counter",
        "Upstream logins that failed (token, connection or server refusal).",
        |m, _| one(count(load(&m.login_failures))),
    ),
    (
        "upstream_login_seconds",
        "histogram",
        "Time to log in to the upstream server: TCP, TLS, the token check and the server's answers.",
        |m, _| m.login_histogram(),
    ),
    (
        "token_refreshes_total",
        "counter",
        "Tokens obtained from the credential.",
        |_, token| one(count(token.tokens_fetched)),
    ),
    (
        "token_failures_total",
        "counter",
        "Credential calls that failed.",
        |_, token| one(count(token.fetch_failures)),
    ),
    (
        "token_expires_in_seconds",
        "gauge",
        "Seconds until the cached token expires (0 without one).",
        |_, token| {
            let left = (token.expires_at)
                .and_then(|at| at.duration_since(std::time::SystemTime::now()).ok());
            one(left.map_or(0.0, |d| d.as_secs_f64()))
        },
    ),
];

/// A Prometheus label value, escaped (backslash, double quote and newline).
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// One sample of a pool family: the extra labels (after the pool's own) and the value.
type Samples = fn(&PoolSnapshot) -> Vec<(String, f64)>;

#[allow(clippy::cast_precision_loss)] // counts stay far below 2^53
fn count(value: u64) -> f64 {
    value as f64
}

/// The pools' families, labelled by upstream, role and database.
const POOL_FAMILIES: [(&str, &str, &str, Samples); 13] = [
    (
        "pool_server_connections",
        "gauge",
        "Server connections of a pool, by state (idle, active).",
        |p| {
            vec![
                (",state=\"idle\"".into(), count(p.idle)),
                (",state=\"active\"".into(), count(p.active)),
            ]
        },
    ),
    (
        "pool_clients",
        "gauge",
        "Client sessions logged in on a pool now.",
        |p| vec![(String::new(), count(p.clients))],
    ),
    (
        "pool_clients_pinned",
        "gauge",
        "Client sessions pinned to their server connection now (transaction pooling).",
        |p| vec![(String::new(), count(p.pinned))],
    ),
    (
        "pool_pins_total",
        "counter",
        "Client sessions pinned to their server connection, by the session state that pinned them.",
        |p| {
            p.pins
                .iter()
                .map(|(reason, n)| (format!(",reason=\"{reason}\""), count(*n)))
                .collect()
        },
    ),
    (
        "pool_clients_waiting",
        "gauge",
        "Clients waiting for a server connection now.",
        |p| vec![(String::new(), count(p.waiting))],
    ),
    (
        "pool_server_logins_total",
        "counter",
        "Server connections opened (each an upstream login with a token).",
        |p| vec![(String::new(), count(p.opened))],
    ),
    (
        "pool_reuses_total",
        "counter",
        "Clients given an idle server connection, without a new login.",
        |p| vec![(String::new(), count(p.reused))],
    ),
    (
        "pool_resets_total",
        "counter",
        "Server connections reset with the reset query and put back.",
        |p| vec![(String::new(), count(p.resets))],
    ),
    (
        "pool_replays_total",
        "counter",
        "Clients' recorded settings set on a server connection they got (transaction pooling).",
        |p| vec![(String::new(), count(p.replays))],
    ),
    (
        "pool_state_checks_total",
        "counter",
        "Server connections checked after a transaction that ran code the proxy cannot read.",
        |p| vec![(String::new(), count(p.state_checks))],
    ),
    (
        "pool_waits_total",
        "counter",
        "Clients that waited for a server connection.",
        |p| vec![(String::new(), count(p.waits))],
    ),
    (
        "pool_wait_seconds_total",
        "counter",
        "Time clients spent waiting for a server connection.",
        |p| vec![(String::new(), p.wait_seconds)],
    ),
    (
        "pool_server_closes_total",
        "counter",
        "Server connections closed, by reason.",
        |p| {
            p.closed
                .iter()
                .map(|(reason, n)| (format!(",reason=\"{reason}\""), count(*n)))
                .collect()
        },
    ),
];

/// The pools' families in the Prometheus text format: per upstream, its pools.
pub(crate) fn render_pools(pools: &[(String, Vec<PoolSnapshot>)]) -> String {
    let mut out = String::new();
    for (name, kind, help, samples) in POOL_FAMILIES {
        let _ = writeln!(out, "# HELP pgentra_proxy_{name} {help}");
        let _ = writeln!(out, "# TYPE pgentra_proxy_{name} {kind}");
        for (upstream, snapshots) in pools {
            for pool in snapshots {
                let labels = format!(
                    "upstream=\"{}\",role=\"{}\",database=\"{}\"",
                    label(upstream),
                    label(&pool.role),
                    label(&pool.database)
                );
                for (extra, value) in samples(pool) {
                    let _ = writeln!(out, "pgentra_proxy_{name}{{{labels}{extra}}} {value}");
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_has_every_family_once() {
        let metrics = Metrics::default();
        metrics.connection_opened();
        metrics.refused(Reason::MaxConnections);
        metrics.login_succeeded(Duration::from_millis(30));
        metrics.bytes(10, 20);
        let text = metrics.render(&pgentra::provider::Stats::default());
        assert!(
            text.contains("pgentra_proxy_connections_open 1\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "pgentra_proxy_connections_refused_total{reason=\"max_connections\"} 1\n"
            )
        );
        assert!(text.contains("pgentra_proxy_upstream_login_seconds_bucket{le=\"0.025\"} 0\n"));
        assert!(text.contains("pgentra_proxy_upstream_login_seconds_bucket{le=\"0.05\"} 1\n"));
        assert!(text.contains("pgentra_proxy_upstream_login_seconds_count 1\n"));
        assert!(text.contains("pgentra_proxy_bytes_total{direction=\"to_client\"} 20\n"));
        let families = text.lines().filter(|l| l.starts_with("# TYPE")).count();
        assert_eq!(families, 10);
    }
}
