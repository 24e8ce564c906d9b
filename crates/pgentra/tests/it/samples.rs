//! The driver samples run unchanged against the emulator: only the environment points them at
//! it (`PG*`, `PGSSLROOTCERT`, and the App Service managed-identity variables).

use pgentra_emulator::{Emulator, MANAGED_IDENTITY};
use std::path::PathBuf;
use std::process::Command;

/// `target/<profile>/examples/<name>`: cargo builds the examples before running tests.
fn example(name: &str) -> PathBuf {
    let deps = std::env::current_exe().unwrap();
    deps.parent()
        .and_then(|d| d.parent())
        .unwrap()
        .join("examples")
        .join(name)
}

fn run(name: &str, args: &[&str]) -> String {
    let output = Command::new(example(name))
        .args(args)
        .env_clear()
        .envs(Emulator::shared().env())
        .output()
        .unwrap_or_else(|e| panic!("run {name}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{name} {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[test]
fn postgres_sample_in_each_mode() {
    for (mode, sync, async_) in [("sync", 4, 0), ("async", 0, 4), ("both", 4, 4)] {
        let out = run("sample_postgres", &["--mode", mode]);
        assert_eq!(
            out.matches(&format!("{MANAGED_IDENTITY} at")).count(),
            sync + async_,
            "{mode}:\n{out}"
        );
        assert_eq!(out.matches("sync  #").count(), sync, "{mode}:\n{out}");
        assert_eq!(out.matches("async #").count(), async_, "{mode}:\n{out}");
    }
}

#[test]
fn pool_samples() {
    for name in [
        "sample_deadpool",
        "sample_bb8",
        "sample_r2d2",
        "sample_sqlx",
        "sample_sea_orm",
    ] {
        let out = run(name, &[]);
        assert!(
            out.contains(&format!("connected as {MANAGED_IDENTITY} at")),
            "{name}:\n{out}"
        );
        for i in 0..4 {
            assert!(
                out.contains(&format!("query result: {}", i * 10)),
                "{name}:\n{out}"
            );
        }
    }
}

#[test]
fn diesel_sample_in_each_mode() {
    for (mode, sync, async_) in [
        ("sync", true, false),
        ("async", false, true),
        ("both", true, true),
    ] {
        let out = run("sample_diesel", &["--mode", mode]);
        for (side, expected) in [("sync: ", sync), ("async:", async_)] {
            assert_eq!(
                out.contains(&format!("{side} connected as {MANAGED_IDENTITY} at")),
                expected,
                "{mode}:\n{out}"
            );
            assert_eq!(
                out.contains(&format!("{side} query result: 30")),
                expected,
                "{mode}:\n{out}"
            );
        }
    }
}
