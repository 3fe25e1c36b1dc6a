//! A small chaos run as an ordinary test: `bench chaos --scenario kill` with 100 turns and 3
//! worker kills against the real binaries (built next to this test's `bench`). Fails when a turn
//! is lost, duplicated or mismatched; the timing figures are for the full run (README,
//! "Performance"), never asserted here.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

#[test]
fn a_small_kill_run_loses_and_duplicates_nothing() {
    let out = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args([
            "chaos",
            "--scenario",
            "kill",
            "--turns",
            "100",
            "--kills",
            "3",
        ])
        .args(["--kill-every-secs", "1", "--timeout-secs", "240"])
        .output()
        .expect("bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("chaos kill:"))
        .unwrap_or_else(|| panic!("no result line; stdout: {stdout}\nstderr: {stderr}"));
    let field = |name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in {line}"))
    };
    assert_eq!(field("turns"), 100, "{line}");
    assert_eq!(
        field("kills"),
        3,
        "three workers were killed: {line}\n{stderr}"
    );
    assert_eq!(
        (field("lost"), field("duplicated"), field("mismatched")),
        (0, 0, 0),
        "{line}\n{stderr}"
    );
    assert_eq!(field("completed"), 100, "{line}");
    assert!(out.status.success(), "{line}\n{stderr}");
}
