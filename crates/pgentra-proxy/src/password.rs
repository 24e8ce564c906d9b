//! The optional local client password: asked for with `AuthenticationCleartextPassword`,
//! compared in constant time, and throttled so that guessing it is slow.

use crate::refusal::Refusal;
use crate::startup::{StartupError, Stream};
use parking_lot::Mutex;
use pgentra::Secret;
use pgentra_wire::{cleartext_password_request, parse_password, read_message};
use tokio::io::AsyncWriteExt;
use tokio::time::{Duration, Instant};

/// Largest password message a client may send.
const MAX_CLIENT_PASSWORD: usize = 1024;

/// Wrong passwords answered per second, over all clients, once the burst is spent.
const FAILURES_PER_SECOND: f64 = 10.0;
/// Wrong passwords answered at once before the rate applies.
const FAILURE_BURST: f64 = 10.0;

/// The password and the throttle on wrong guesses.
pub(crate) struct PasswordGate {
    expected: Secret,
    budget: Mutex<Budget>,
}

/// A token bucket of password checks: each check takes one, a right password gives it back.
/// Guesses, which never give back, are held to [`FAILURES_PER_SECOND`] however many clients
/// make them in parallel.
struct Budget {
    tokens: f64,
    at: Instant,
}

impl PasswordGate {
    pub(crate) fn new(expected: Secret) -> Self {
        Self {
            expected,
            budget: Mutex::new(Budget {
                tokens: FAILURE_BURST,
                at: Instant::now(),
            }),
        }
    }

    /// Asks `client` for the password and checks it. (Under the login deadline, which also
    /// bounds the wait for the throttle.)
    pub(crate) async fn check(
        &self,
        client: &mut Box<dyn Stream>,
        user: &str,
    ) -> Result<(), StartupError> {
        client.write_all(&cleartext_password_request()).await?;
        let (tag, body) = read_message(client, MAX_CLIENT_PASSWORD).await?;
        let given = match tag {
            b'p' => parse_password(&body).unwrap_or_default(),
            _ => "",
        };
        tokio::time::sleep_until(self.take()).await;
        if constant_time_eq(given.as_bytes(), self.expected.expose_secret().as_bytes()) {
            self.give_back();
            Ok(())
        } else {
            Err(StartupError::Refuse(Refusal::ClientPassword {
                user: user.to_owned(),
            }))
        }
    }

    /// Takes a token, going into debt if none is left; returns when its check may run.
    fn take(&self) -> Instant {
        let mut budget = self.budget.lock();
        let now = Instant::now();
        let refill = now.duration_since(budget.at).as_secs_f64() * FAILURES_PER_SECOND;
        budget.tokens = (budget.tokens + refill).min(FAILURE_BURST) - 1.0;
        budget.at = now;
        if budget.tokens >= 0.0 {
            now
        } else {
            now + Duration::from_secs_f64(-budget.tokens / FAILURES_PER_SECOND)
        }
    }

    fn give_back(&self) {
        let mut budget = self.budget.lock();
        budget.tokens = (budget.tokens + 1.0).min(FAILURE_BURST);
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_compare_in_full() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn guesses_are_held_to_the_rate_after_the_burst() {
        let gate = PasswordGate::new(Secret::new("x"));
        let start = Instant::now();
        let soon = start + Duration::from_millis(50);
        let due: Vec<Instant> = (0..30).map(|_| gate.take()).collect();
        // The burst runs at once; then one check every 100 ms.
        assert!(due[..10].iter().all(|at| *at < soon), "{due:?}");
        let last = due[29].duration_since(start).as_secs_f64();
        assert!((1.9..2.05).contains(&last), "{last}");
        // Right passwords give their token back, so they do not spend the budget.
        let gate = PasswordGate::new(Secret::new("x"));
        for _ in 0..100 {
            assert!(gate.take() < soon);
            gate.give_back();
        }
    }
}
