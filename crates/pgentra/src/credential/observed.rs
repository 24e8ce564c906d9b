//! What the chain's token endpoints answer when they refuse: an HTTP transport that notes each
//! failed answer (its status and a short, sanitised excerpt of its body) in a recorder the
//! chain owns.
//!
//! The `azure_identity` credentials retry 429 and 5xx answers inside their HTTP pipelines, the
//! managed-identity ones for over a minute, and only then report anything. The provider watches
//! the recorder instead, so that a caller with no valid token cached gets the endpoint's answer
//! at once rather than waiting for those retries to run out.
//!
//! Only failed answers are looked at: a successful one, which carries a token, goes to the
//! credential untouched. Nothing from the request (its URL, headers or body) is recorded.

use azure_core::http::{AsyncRawResponse, HttpClient, Request, StatusCode, Transport};
use std::fmt;
use std::sync::Arc;
use tokio::sync::watch;

/// The most characters of a failed answer's body that are kept.
pub(crate) const EXCERPT_CHARS: usize = 200;

/// A token endpoint's answer that was not a success.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FailedAnswer {
    status: StatusCode,
    /// The start of the body, if it is text: control characters and runs of white space made
    /// one space, anything shaped like a JWT replaced, at most [`EXCERPT_CHARS`] characters.
    excerpt: Option<String>,
}

impl FailedAnswer {
    fn new(status: StatusCode, body: &[u8]) -> Self {
        Self {
            status,
            excerpt: excerpt(body),
        }
    }

    /// The HTTP status code.
    #[cfg(test)]
    pub(crate) fn status(&self) -> u16 {
        self.status.into()
    }
}

impl fmt::Display for FailedAnswer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let code = u16::from(self.status);
        write!(f, "the token endpoint answered HTTP {code}")?;
        if !matches!(self.status, StatusCode::UnknownValue(_)) {
            write!(f, " {}", self.status.canonical_reason())?;
        }
        match &self.excerpt {
            Some(excerpt) => write!(f, ": {excerpt}"),
            None => Ok(()),
        }
    }
}

/// The failed answers recorded so far: how many, and the latest.
#[derive(Debug, Clone, Default)]
pub(crate) struct Answers {
    /// Failed answers recorded since the chain was built; the provider notes it when a fetch
    /// starts, to tell the answers given during that fetch from older ones.
    pub(crate) count: u64,
    /// The latest.
    pub(crate) last: Option<FailedAnswer>,
}

/// Where the transports of one chain record failed answers; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct AnswerRecorder(Arc<watch::Sender<Answers>>);

impl AnswerRecorder {
    pub(crate) fn new() -> Self {
        Self(Arc::new(watch::Sender::new(Answers::default())))
    }

    /// A receiver that wakes at each failed answer.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Answers> {
        self.0.subscribe()
    }

    /// How many failed answers have been recorded.
    pub(crate) fn count(&self) -> u64 {
        self.0.borrow().count
    }

    fn record(&self, answer: FailedAnswer) {
        tracing::debug!(%answer, "a token endpoint refused a request");
        self.0.send_modify(|answers| {
            answers.count += 1;
            answers.last = Some(answer);
        });
    }
}

/// An HTTP client that sends each request through `inner` and records the answers that are not
/// a success; the credential gets every response unchanged.
#[derive(Debug)]
pub(crate) struct Observed {
    inner: Arc<dyn HttpClient>,
    recorder: AnswerRecorder,
}

impl Observed {
    /// A transport for a credential's client options.
    pub(crate) fn transport(inner: Arc<dyn HttpClient>, recorder: &AnswerRecorder) -> Transport {
        Transport::new(Arc::new(Self {
            inner,
            recorder: recorder.clone(),
        }))
    }
}

#[async_trait::async_trait]
impl HttpClient for Observed {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<AsyncRawResponse> {
        // Transport errors (connection refused, reset) reach the credential as they are.
        let response = self.inner.execute_request(request).await?;
        if response.status().is_success() {
            return Ok(response);
        }
        let (status, headers, body) = response.deconstruct();
        // A refusal's body is small; the credential would read all of it anyway.
        let body = body.collect().await?;
        self.recorder.record(FailedAnswer::new(status, &body));
        Ok(AsyncRawResponse::from_bytes(status, headers, body))
    }
}

/// The start of `body` if it is UTF-8 text, safe to show: see [`FailedAnswer`].
fn excerpt(body: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    let words: Vec<&str> = text
        .split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|w| !w.is_empty())
        .collect();
    let text = redact_jwts(&words.join(" "));
    let mut chars = text.char_indices();
    let excerpt = match chars.nth(EXCERPT_CHARS) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text,
    };
    (!excerpt.is_empty()).then_some(excerpt)
}

/// `text` with every word that looks like a JWT (base64url and dots, starting `eyJ`, the
/// encoding of `{"`) replaced: a failed answer carries no token, but an odd endpoint might echo
/// one back.
fn redact_jwts(text: &str) -> String {
    let is_jwt_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        let run = rest.find(|c| !is_jwt_char(c)).unwrap_or(rest.len());
        let (word, tail) = if run == 0 {
            rest.split_at(c.len_utf8())
        } else {
            rest.split_at(run)
        };
        out.push_str(if word.starts_with("eyJ") {
            "[redacted]"
        } else {
            word
        });
        rest = tail;
    }
    out
}

#[cfg(test)]
mod tests;
