//! The provider's sense of time, injectable so that expiry logic can be tested without sleeping,
//! and conversions to and from the Unix seconds that token claims count in.

use crate::sync::lock;
use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// A boxed, sendable future, as returned by [`Clock::sleep_until`].
pub type Sleep = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Wall-clock time and sleeping, as the provider sees them.
///
/// Token expiry is wall-clock time (`exp` is seconds since the Unix epoch), so the clock reads
/// [`SystemTime`]. [`SystemClock`] is the default; [`ManualClock`] lets tests move time by hand.
pub trait Clock: fmt::Debug + Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> SystemTime;

    /// A future that completes once [`now`](Self::now) has reached `deadline`.
    fn sleep_until(&self, deadline: SystemTime) -> Sleep;
}

/// The system's clock. Sleeps wake at least every 10 seconds to re-read the wall clock, so a
/// clock that jumps forward (a suspended laptop, an NTP step) is noticed promptly.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

const MAX_WALL_CLOCK_SLEEP: Duration = Duration::from_secs(10);

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }

    fn sleep_until(&self, deadline: SystemTime) -> Sleep {
        Box::pin(async move {
            while let Ok(left) = deadline.duration_since(SystemTime::now()) {
                if left.is_zero() {
                    break;
                }
                tokio::time::sleep(left.min(MAX_WALL_CLOCK_SLEEP)).await;
            }
        })
    }
}

/// Whole seconds since the Unix epoch, the unit of the `exp`, `nbf` and `iat` claims; 0 for
/// earlier times.
///
/// ```
/// use std::time::{Duration, UNIX_EPOCH};
/// let time = UNIX_EPOCH + Duration::from_millis(1_900_000_000_999);
/// assert_eq!(pgentra::clock::unix_seconds(time), 1_900_000_000);
/// assert_eq!(pgentra::clock::unix_seconds(UNIX_EPOCH - Duration::from_secs(5)), 0);
/// ```
pub fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// The last second of the year 9999, the latest time RFC 3339 can write.
const YEAR_9999_END: u64 = 253_402_300_799;

/// The time `seconds` after the Unix epoch, as a claim such as `exp` gives it, clamped to
/// 1970-01-01T00:00:00Z..=9999-12-31T23:59:59Z so that no claim value can panic (a
/// [`SystemTime`] cannot hold every `i64`) or fail to print.
///
/// ```
/// use pgentra::clock::from_unix_seconds;
/// use std::time::{Duration, UNIX_EPOCH};
/// assert_eq!(from_unix_seconds(1_900_000_000), UNIX_EPOCH + Duration::from_secs(1_900_000_000));
/// assert_eq!(from_unix_seconds(-5), UNIX_EPOCH);
/// assert_eq!(from_unix_seconds(i64::MAX), UNIX_EPOCH + Duration::from_secs(253_402_300_799));
/// ```
pub fn from_unix_seconds(seconds: i64) -> SystemTime {
    let seconds = u64::try_from(seconds).unwrap_or(0).min(YEAR_9999_END);
    UNIX_EPOCH + Duration::from_secs(seconds)
}

/// A clock that only moves when told to, for tests. Clones share the same time.
///
/// Sleepers wake when [`advance`](Self::advance) or [`set`](Self::set) moves time past their
/// deadline. [`next_deadline`](Self::next_deadline) lets a test wait until something is
/// sleeping, and see until when, which makes scheduling decisions observable without real
/// sleeps.
///
/// ```
/// use pgentra::clock::{Clock, ManualClock};
/// use std::time::{Duration, UNIX_EPOCH};
///
/// let clock = ManualClock::new(UNIX_EPOCH + Duration::from_secs(1_000));
/// clock.advance(Duration::from_secs(5));
/// assert_eq!(clock.now(), UNIX_EPOCH + Duration::from_secs(1_005));
/// ```
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<ManualState>);

#[derive(Debug)]
struct ManualState {
    now: watch::Sender<SystemTime>,
    /// Deadlines of pending sleeps, keyed with a unique id so equal deadlines can coexist.
    sleepers: Mutex<BTreeSet<(SystemTime, u64)>>,
    sleepers_changed: watch::Sender<()>,
    next_id: AtomicU64,
}

impl ManualClock {
    /// A clock stopped at `start`.
    pub fn new(start: SystemTime) -> Self {
        Self(Arc::new(ManualState {
            now: watch::Sender::new(start),
            sleepers: Mutex::new(BTreeSet::new()),
            sleepers_changed: watch::Sender::new(()),
            next_id: AtomicU64::new(0),
        }))
    }

    /// Moves time forward by `by`, waking every sleeper whose deadline has passed.
    pub fn advance(&self, by: Duration) {
        self.0.now.send_modify(|now| *now += by);
    }

    /// Sets the time (forward or backward).
    pub fn set(&self, to: SystemTime) {
        self.0.now.send_replace(to);
    }

    /// Waits until at least one sleeper is waiting, and returns the earliest deadline.
    pub async fn next_deadline(&self) -> SystemTime {
        let mut changed = self.0.sleepers_changed.subscribe();
        loop {
            if let Some((deadline, _)) = self.sleepers().first() {
                return *deadline;
            }
            // The sender lives in self, so this cannot fail while we hold self.
            let _ = changed.changed().await;
        }
    }

    /// Waits until at least `count` sleepers are waiting at once.
    pub async fn wait_for_sleepers(&self, count: usize) {
        let mut changed = self.0.sleepers_changed.subscribe();
        while self.sleepers().len() < count {
            let _ = changed.changed().await;
        }
    }

    /// Deadlines of everything currently sleeping, earliest first.
    pub fn deadlines(&self) -> Vec<SystemTime> {
        self.sleepers()
            .iter()
            .map(|(deadline, _)| *deadline)
            .collect()
    }

    fn sleepers(&self) -> MutexGuard<'_, BTreeSet<(SystemTime, u64)>> {
        lock(&self.0.sleepers)
    }

    fn set_sleeper(&self, key: (SystemTime, u64), present: bool) {
        if present {
            self.sleepers().insert(key);
        } else {
            self.sleepers().remove(&key);
        }
        self.0.sleepers_changed.send_replace(());
    }
}

/// Removes a sleeper's deadline when its sleep completes or is dropped.
struct SleeperGuard {
    clock: ManualClock,
    key: (SystemTime, u64),
}

impl Drop for SleeperGuard {
    fn drop(&mut self) {
        self.clock.set_sleeper(self.key, false);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.0.now.borrow()
    }

    fn sleep_until(&self, deadline: SystemTime) -> Sleep {
        let clock = self.clone();
        Box::pin(async move {
            let mut now = clock.0.now.subscribe();
            if *now.borrow_and_update() >= deadline {
                return;
            }
            let key = (deadline, clock.0.next_id.fetch_add(1, Ordering::Relaxed));
            clock.set_sleeper(key, true);
            let _guard = SleeperGuard {
                clock: clock.clone(),
                key,
            };
            // Ends when time reaches the deadline; the sender lives as long as `clock`.
            let _ = now.wait_for(|now| *now >= deadline).await;
        })
    }
}
