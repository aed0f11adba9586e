//! archmerge's one-shot commands (`reconcile`, `inspect`, `check-config`):
//! the binary cargo built for this test run, run to completion with a
//! clean environment and a timeout.

use std::process::{Command, Output};
use std::time::Duration;

use super::run_with_timeout;

// === one-shot commands ===

/// How long a one-shot command (`reconcile`, `inspect`, `check-config`)
/// may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `archmerge <args>` (the binary cargo built for this test run) to
/// completion with none of the test's own `ARCHMERGE_*` variables, plus
/// `env`. Does not check the exit status.
pub fn archmerge_command(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_archmerge"));
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("ARCHMERGE_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_with_timeout(&mut cmd, COMMAND_TIMEOUT)
}

/// What a command printed, for assertion messages.
pub fn shown(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
