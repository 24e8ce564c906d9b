//! The observing transport over a client that answers what each test says.

use super::*;
use azure_core::http::headers::Headers;
use azure_core::http::{Method, Url};
use std::sync::Mutex;

/// Answers every request with `status`, `headers` and `body`, and keeps the requests it got.
#[derive(Debug)]
struct Canned {
    status: StatusCode,
    headers: Headers,
    body: Vec<u8>,
    seen: Mutex<Vec<Request>>,
}

impl Canned {
    fn new(status: u16, body: impl Into<Vec<u8>>) -> Arc<Self> {
        let mut headers = Headers::new();
        headers.insert("content-type", "application/json");
        headers.insert("x-ms-request-id", "req-1");
        Arc::new(Self {
            status: StatusCode::from(status),
            headers,
            body: body.into(),
            seen: Mutex::new(Vec::new()),
        })
    }
}

#[async_trait::async_trait]
impl HttpClient for Canned {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<AsyncRawResponse> {
        self.seen.lock().unwrap().push(request.clone());
        Ok(AsyncRawResponse::from_bytes(
            self.status,
            self.headers.clone(),
            self.body.clone(),
        ))
    }
}

/// A request carrying secrets, as a client-credentials request does.
fn request() -> Request {
    let url = Url::parse("https://login.example/tenant/oauth2/v2.0/token?secret=q5ecret").unwrap();
    let mut request = Request::new(url, Method::Post);
    request.insert_header("authorization", "Bearer h5ecret");
    request.set_body("client_secret=b5ecret&grant_type=client_credentials");
    request
}

/// Sends `request()` through an observed `inner`; returns the response's parts.
async fn send(inner: &Arc<Canned>, recorder: &AnswerRecorder) -> (StatusCode, Headers, Vec<u8>) {
    let observed = Observed {
        inner: Arc::clone(inner) as Arc<dyn HttpClient>,
        recorder: recorder.clone(),
    };
    let response = observed.execute_request(&request()).await.unwrap();
    let (status, headers, body) = response.deconstruct();
    (status, headers, body.collect().await.unwrap().to_vec())
}

#[tokio::test]
async fn a_failed_answer_is_recorded_and_passed_on_unchanged() {
    let body = r#"{"error":"invalid_request","error_description":"Identity not found"}"#;
    let inner = Canned::new(500, body);
    let recorder = AnswerRecorder::new();
    let mut answers = recorder.subscribe();

    let (status, headers, received) = send(&inner, &recorder).await;
    assert_eq!(status, StatusCode::InternalServerError);
    assert_eq!(headers, inner.headers);
    assert_eq!(received, body.as_bytes());
    assert_eq!(inner.seen.lock().unwrap().len(), 1);

    assert!(answers.has_changed().unwrap(), "the receiver is woken");
    let recorded = answers.borrow_and_update().clone();
    assert_eq!(recorded.count, 1);
    let answer = recorded.last.unwrap();
    assert_eq!(answer.status(), 500);
    assert_eq!(
        answer.to_string(),
        format!("the token endpoint answered HTTP 500 Internal Server Error: {body}")
    );

    // Each failed answer counts; the latest is kept.
    let throttled = Canned::new(429, "");
    send(&throttled, &recorder).await;
    assert_eq!(recorder.count(), 2);
    let last = recorder.subscribe().borrow().last.clone().unwrap();
    assert_eq!(
        last.to_string(),
        "the token endpoint answered HTTP 429 Too Many Requests"
    );
    let odd = Canned::new(599, "x");
    send(&odd, &recorder).await;
    let last = recorder.subscribe().borrow().last.clone().unwrap();
    assert_eq!(last.to_string(), "the token endpoint answered HTTP 599: x");
}

#[tokio::test]
async fn a_success_is_not_recorded() {
    let body = r#"{"access_token":"eyJhbGciOiJSUzI1NiJ9.e30.c2ln","expires_in":"3600"}"#;
    let inner = Canned::new(200, body);
    let recorder = AnswerRecorder::new();
    let answers = recorder.subscribe();

    let (status, headers, received) = send(&inner, &recorder).await;
    assert_eq!(status, StatusCode::Ok);
    assert_eq!(headers, inner.headers);
    assert_eq!(received, body.as_bytes());
    assert!(!answers.has_changed().unwrap());
    assert_eq!(recorder.count(), 0);
}

#[tokio::test]
async fn the_excerpt_is_capped_sanitised_and_holds_nothing_from_the_request() {
    let long = "y".repeat(3 * EXCERPT_CHARS);
    let body = format!(
        "line one\r\n\tline\u{7}two\u{1b}[31m  echo: eyJhbGciOiJSUzI1NiJ9.eyJ1cG4iOiJhIn0.c2ln, \"eyJx\"; {long}"
    );
    let inner = Canned::new(400, body.clone());
    let recorder = AnswerRecorder::new();

    let (_, _, received) = send(&inner, &recorder).await;
    assert_eq!(
        received,
        body.as_bytes(),
        "the credential sees the body as sent"
    );
    let answers = recorder.subscribe().borrow().clone();
    let text = answers.last.as_ref().unwrap().to_string();
    let excerpt = text
        .strip_prefix("the token endpoint answered HTTP 400 Bad Request: ")
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        excerpt.starts_with("line one line two [31m echo: [redacted], \"[redacted]\"; yyy"),
        "{excerpt}"
    );
    assert_eq!(excerpt.chars().count(), EXCERPT_CHARS + 1, "{excerpt}");
    assert!(excerpt.ends_with('…'), "{excerpt}");
    assert!(!excerpt.chars().any(char::is_control), "{excerpt:?}");
    assert!(!text.contains("eyJ"), "{text}");
    for secret in ["q5ecret", "h5ecret", "b5ecret", "login.example"] {
        assert!(!text.contains(secret), "{text}");
        assert!(!format!("{answers:?}").contains(secret));
    }
}

#[tokio::test]
async fn a_body_that_is_not_text_is_left_out() {
    let inner = Canned::new(502, vec![0xff, 0xfe, 0x00, 0x41]);
    let recorder = AnswerRecorder::new();
    let (_, _, received) = send(&inner, &recorder).await;
    assert_eq!(received, [0xff, 0xfe, 0x00, 0x41]);
    let last = recorder.subscribe().borrow().last.clone().unwrap();
    assert_eq!(
        last.to_string(),
        "the token endpoint answered HTTP 502 Bad Gateway"
    );
    // White space only is no excerpt either.
    let blank = Canned::new(503, " \r\n ");
    send(&blank, &recorder).await;
    let last = recorder.subscribe().borrow().last.clone().unwrap();
    assert_eq!(
        last.to_string(),
        "the token endpoint answered HTTP 503 Service Unavailable"
    );
}
