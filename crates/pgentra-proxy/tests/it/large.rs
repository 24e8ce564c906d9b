//! Large messages through transaction pooling, as ordinary applications send them: a `Bind`
//! of more than a megabyte whose `Sync` comes later, psycopg 3 inserting large `bytea` values
//! and `executemany` of large rows, and `psql \copy` of a 40 MB file — each answered, with the
//! connection usable afterwards (the proxy once stopped reading a client that had more than
//! 1 MiB waiting for the server, while the server waited for the rest of it).

use super::support::*;

/// `Parse` and `Bind` of `select length($1)` with a `size`-byte text parameter, and `Execute`.
fn large_bind(size: usize) -> Vec<u8> {
    let mut out = message(b'P', b"\0select length($1)\0\0\0").to_vec();
    let mut bind = b"\0\0\0\0\0\x01".to_vec();
    bind.extend_from_slice(&i32::try_from(size).unwrap().to_be_bytes());
    bind.resize(bind.len() + size, b'x');
    bind.extend_from_slice(b"\0\0");
    out.extend_from_slice(&message(b'B', &bind));
    out.extend_from_slice(&message(b'E', b"\0\0\0\0\0"));
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_large_bind_whose_sync_comes_later_is_answered() {
    let emulator = Emulator::shared();
    let (proxy, _) = transactional(emulator, 1).await;
    for size in [900_000, 1_100_000, 8 << 20] {
        let mut stream = logged_in(&proxy).await;
        stream.write_all(&large_bind(size)).await.unwrap();
        // The client pauses before its Sync, as one that computes the next message does: the
        // server has nothing to answer meanwhile (no Sync, no Flush), so nothing but the
        // client's next bytes can move the relay on. (The pause is the scenario, not a wait
        // for anything: any length shows the bug once it outlasts the relay's writes.)
        tokio::time::sleep(Duration::from_millis(300)).await;
        stream.write_all(&message(b'S', b"")).await.unwrap();
        let answers = read_until_ready(&mut stream).await;
        assert_eq!(
            tags(&answers),
            "12DCZ",
            "{size} bytes: {:?}",
            error_of(&answers)
        );
        let row = answers.iter().find(|(tag, _)| *tag == b'D').unwrap();
        assert_eq!(
            data_row(&row.1)[0].as_deref(),
            Some(size.to_string().as_str())
        );
        assert_eq!(raw_value(&mut stream, "select 1").await, "1");
    }
    proxy.stop().await;
}

/// psycopg 3 inserts 3 MB `bytea` values, then `executemany` inserts ten rows of 300 KB (a
/// pipeline), through one server connection; every value arrives whole.
#[tokio::test(flavor = "multi_thread")]
async fn psycopg_3_sends_large_values_and_rows() {
    let emulator = Emulator::shared();
    let (proxy, _) = transactional(emulator, 1).await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/psycopg_large.py");
    let run = tokio::process::Command::new("python3")
        .arg(&script)
        .args([&proxy.port(), USER])
        .kill_on_drop(true)
        .output();
    let output = within(Duration::from_secs(60), "psycopg", run)
        .await
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("bytea 3 x 3000000\n"), "{stdout}");
    assert!(stdout.contains("rows 10 x 300000\n"), "{stdout}");
    proxy.stop().await;
}

/// `psql \copy` of a 40 MB file into a table, then the rows are counted on the same pool.
#[tokio::test(flavor = "multi_thread")]
async fn psql_copies_40_megabytes_in() {
    let emulator = Emulator::shared();
    let (proxy, _) = transactional(emulator, 1).await;
    let dir = temp_dir("copy-40mb");
    let file = dir.join("rows.csv");
    let line = format!("{},{}\n", 1, "y".repeat(200));
    let rows = (40 << 20) / line.len() + 1;
    std::fs::write(&file, line.repeat(rows)).unwrap();
    let table = format!("copied_40mb_{}", std::process::id());
    let script = format!(
        "create table {table} (n int, t text);\n\\copy {table} from '{}' csv\nselect count(*) from {table};\ndrop table {table};\n",
        file.display()
    );
    let out = psql_ok(proxy.addr(), &[], &script).await;
    assert_eq!(out.trim(), rows.to_string());
    let mut after = logged_in(&proxy).await;
    assert_eq!(raw_value(&mut after, "select 1").await, "1");
    drop(after);
    proxy.stop().await;
}
