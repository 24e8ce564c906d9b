//! Cancel requests through the proxy, and the keys it issues.

use super::support::*;

/// A running query is cancelled through the proxy; unknown keys change nothing.
#[tokio::test(flavor = "multi_thread")]
async fn cancel_requests_reach_the_running_query() {
    let emulator = Emulator::shared();
    let proxy = Running::start(config(emulator), auth(emulator)).await;
    let client = Arc::new(connect(proxy.addr(), USER, |_| {}).await.unwrap());
    let observer = connect(proxy.addr(), USER, |_| {}).await.unwrap();

    let marker = format!("cancel-me-{}", fastrand::u32(..));
    let sleeping = {
        let client = Arc::clone(&client);
        let sql = format!("select pg_sleep(30) /* {marker} */");
        tokio::spawn(async move { client.simple_query(&sql).await })
    };
    wait_until_running(&observer, &marker).await;

    // A key the proxy never issued: the connection is closed and the query runs on.
    send_cancel(
        proxy.addr(),
        fastrand::i32(1..),
        &fastrand::u32(..).to_be_bytes(),
        false,
    )
    .await;
    send_cancel(proxy.addr(), 42, &[1, 2, 3, 4], true).await;
    wait_until_running(&observer, &marker).await;
    assert!(!sleeping.is_finished());

    // tokio-postgres's own cancel (sslmode=prefer: an SSLRequest answered N, then the cancel).
    let started = Instant::now();
    client.cancel_token().cancel_query(NoTls).await.unwrap();
    let error = within(SHORT, "the cancelled query", sleeping)
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(error.code(), Some(&SqlState::QUERY_CANCELED), "{error:?}");
    assert!(started.elapsed() < SHORT);
    // The session goes on.
    assert_eq!(current_user(&client).await, USER);
    drop((client, observer));
    proxy.stop().await;
}

/// The proxy issues its own positive cancel keys, one per session, and routes them, with or
/// without an SSLRequest before the CancelRequest.
#[tokio::test(flavor = "multi_thread")]
async fn backend_keys_are_the_proxys_own() {
    let emulator = Emulator::shared();
    let proxy = Running::start(config(emulator), auth(emulator)).await;
    let mut first = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut second = TcpStream::connect(proxy.addr()).await.unwrap();
    let first_key = backend_key(&raw_login(&mut first, &[("database", "postgres")]).await);
    let second_key = backend_key(&raw_login(&mut second, &[("database", "postgres")]).await);
    for (pid, key) in [&first_key, &second_key] {
        assert!(*pid > 0, "negative process ID {pid}");
        // Protocol 3.0: exactly 4 bytes.
        assert_eq!(key.len(), 4);
    }
    assert_ne!(first_key, second_key);
    let backend_pid: i32 = raw_value(&mut first, "select pg_backend_pid()")
        .await
        .parse()
        .unwrap();
    assert_ne!(first_key.0, backend_pid, "the backend's process ID leaked");

    // Each key cancels its own session's query only; plain and after an SSLRequest.
    for (ssl_first, stream, key) in [
        (false, &mut first, &first_key),
        (true, &mut second, &second_key),
    ] {
        start_sleeping(stream).await;
        let started = Instant::now();
        send_cancel(proxy.addr(), key.0, &key.1, ssl_first).await;
        assert_cancelled(stream, started).await;
    }
    // The other session was not disturbed by either cancel.
    assert_eq!(raw_value(&mut first, "select 1").await, "1");
    assert_eq!(raw_value(&mut second, "select 2").await, "2");
    // A cancel for an idle session is a no-op: its next query runs.
    send_cancel(proxy.addr(), first_key.0, &first_key.1, false).await;
    assert_eq!(raw_value(&mut first, "select 3").await, "3");
    drop((first, second));
    proxy.stop().await;
}

/// Keys from a seeded non-cryptographic RNG can be predicted by whoever learns its state
/// (a client recovered fastrand's clock-and-thread seed from its own key). The sessions of this
/// current-thread test run on this thread, so the RNG the proxy used to draw keys from is this
/// thread's fastrand: seeded here, none of the keys it could have produced may appear.
#[tokio::test(flavor = "current_thread")]
async fn cancel_keys_cannot_be_predicted_from_a_known_rng_state() {
    let emulator = Emulator::shared();
    let proxy = Running::start(config(emulator), auth(emulator)).await;
    const SEED: u64 = 0x5eed_cafe;
    // Every key the seeded RNG could give, whatever else drew from it in between.
    let mut predicted = std::collections::HashSet::new();
    for skipped in 0..500 {
        let mut rng = fastrand::Rng::with_seed(SEED);
        for _ in 0..skipped {
            rng.u32(..);
        }
        predicted.insert((rng.i32(1..), rng.u32(..).to_be_bytes().to_vec()));
    }
    let mut seen = Vec::new();
    for _ in 0..20 {
        fastrand::seed(SEED);
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        let messages = raw_login(&mut stream, &[("user", USER), ("database", "postgres")]).await;
        let key = backend_key(&messages);
        assert!(key.0 > 0, "process IDs stay positive");
        assert!(
            !predicted.contains(&key),
            "session key {key:?} was predicted"
        );
        seen.push(key);
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 20, "keys repeat");
    proxy.stop().await;
}
