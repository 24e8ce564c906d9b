//! `provider_hot_path`: a cached `EntraAuth::credentials()` against the obvious design, an
//! `RwLock<Option<token>>` whose reader clones the token (as `azure_identity`'s internal cache
//! does), from 1 and from 8 threads at once. Prints the ratio of the two at the end.
//!
//! Run with `cargo bench -p pgentra --bench provider_hot_path`.

use azure_core::credentials::AccessToken;
use azure_core::time::OffsetDateTime;
use base64::Engine as _;
use criterion::{BenchmarkId, Criterion};
use pgentra::EntraAuth;
use pgentra_emulator::testing::TestCredential;
use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::{Arc, Barrier, RwLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime};

/// A realistic managed-identity token is about 1,900 characters.
fn token_text() -> String {
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(
        r#"{{"upn":"alice@contoso.com","pad":"{}"}}"#,
        "x".repeat(1000)
    ));
    format!("eyJhbGciOiJSUzI1NiJ9.{payload}.{}", "s".repeat(342))
}

/// The obvious design: a lock around an optional token, cloned out on every read.
struct Baseline {
    cache: RwLock<Option<(String, String, SystemTime)>>,
}

impl Baseline {
    fn credentials(&self) -> Option<(String, String, SystemTime)> {
        let guard = self.cache.read().unwrap();
        let (user, token, expires) = guard.as_ref()?;
        (*expires > SystemTime::now()).then(|| (user.clone(), token.clone(), *expires))
    }
}

/// Polls a future that is expected to be ready at once (a cache hit).
fn poll_ready<F: Future>(future: F) -> F::Output {
    let mut cx = Context::from_waker(Waker::noop());
    match pin!(future).poll(&mut cx) {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("the hot path must not wait"),
    }
}

/// One way of getting credentials, called from many threads.
type Call = Arc<dyn Fn() + Send + Sync>;

/// Runs `iters` calls on each of `threads` threads at once; returns the wall time, which is
/// the time per call per thread under contention.
fn contended(threads: usize, iters: u64, call: Call) -> Duration {
    let start = Arc::new(Barrier::new(threads + 1));
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (start, call) = (Arc::clone(&start), Arc::clone(&call));
            std::thread::spawn(move || {
                start.wait();
                for _ in 0..iters {
                    call();
                }
            })
        })
        .collect();
    start.wait();
    let began = Instant::now();
    for worker in workers {
        worker.join().unwrap();
    }
    began.elapsed()
}

fn main() {
    let token = token_text();
    let minted = token.clone();
    let auth = EntraAuth::builder()
        .credential(TestCredential::minting(move || {
            let expires = OffsetDateTime::now_utc() + azure_core::time::Duration::hours(1);
            AccessToken::new(minted.clone(), expires)
        }))
        .build()
        .unwrap();
    auth.credentials_blocking().unwrap();
    let baseline = Arc::new(Baseline {
        cache: RwLock::new(Some((
            "alice@contoso.com".to_owned(),
            token,
            SystemTime::now() + Duration::from_secs(3600),
        ))),
    });

    let calls: [(&str, Call); 2] = [
        ("pgentra", {
            Arc::new(move || {
                black_box(poll_ready(auth.credentials()).unwrap());
            })
        }),
        ("rwlock_clone", {
            let baseline = Arc::clone(&baseline);
            Arc::new(move || {
                black_box(baseline.credentials().unwrap());
            })
        }),
    ];

    let mut criterion = Criterion::default().configure_from_args();
    let mut group = criterion.benchmark_group("provider_hot_path");
    for threads in [1usize, 8] {
        for (name, call) in &calls {
            group.bench_with_input(BenchmarkId::new(*name, threads), &threads, |b, &threads| {
                b.iter_custom(|iters| contended(threads, iters, Arc::clone(call)));
            });
        }
    }
    group.finish();
    criterion.final_summary();
    print_ratios();
}

/// Reads criterion's estimates for this run and prints pgentra against the baseline.
fn print_ratios() {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target")
        })
        .join("criterion/provider_hot_path");
    let mean_ns = |name: &str, threads: usize| -> Option<f64> {
        let path = dir
            .join(name)
            .join(threads.to_string())
            .join("new/estimates.json");
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
        json["mean"]["point_estimate"].as_f64()
    };
    println!("\nprovider_hot_path: mean time per call (per thread), baseline measured in this run");
    println!(
        "{:>8} {:>14} {:>16} {:>10}",
        "threads", "pgentra (ns)", "rwlock+clone (ns)", "speed-up"
    );
    for threads in [1usize, 8] {
        match (
            mean_ns("pgentra", threads),
            mean_ns("rwlock_clone", threads),
        ) {
            (Some(ours), Some(base)) => {
                println!(
                    "{threads:>8} {ours:>14.1} {base:>16.1} {:>9.1}x",
                    base / ours
                );
            }
            _ => println!("{threads:>8} (no estimate: run without a filter to measure both)"),
        }
    }
}
