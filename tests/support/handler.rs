//! Runs the real `lakeguard` binary the way the Functions host does.
//!
//! `serve` gets a clean environment (only PATH/HOME etc. from the test process, plus the settings
//! given) and `FUNCTIONS_CUSTOMHANDLER_PORT`; readiness is "any HTTP answer to `GET /`" polled
//! every 25 ms for at most 30 s, like the host's `initializationTimeout`. stdout and stderr go to
//! files so tests can assert on them (notably: no key, SAS or token in any log line).

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use super::azurite::{base_env, free_port, kill_group};

/// Path of the binary under test (built by cargo for integration tests).
pub fn lakeguard_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_lakeguard"))
}

/// A running `lakeguard serve`; killed (whole process group) on drop.
pub struct Handler {
    child: Child,
    port: u16,
    stdout: PathBuf,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

impl Handler {
    /// Starts `lakeguard serve` with `env` and waits until `GET /` answers (30 s). Panics with the
    /// handler's output if it exits or never answers. Retries with another port on a bind race.
    pub async fn spawn(env: &[(String, String)]) -> Handler {
        Self::spawn_program(&lakeguard_bin(), &["serve"], env).await
    }

    /// `spawn` for any program speaking the custom-handler startup contract (harness self-tests).
    pub async fn spawn_program(
        program: &std::path::Path,
        args: &[&str],
        env: &[(String, String)],
    ) -> Handler {
        let dir = tempfile::Builder::new()
            .prefix("lakeguard-handler-")
            .tempdir()
            .expect("tempdir");
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        let mut last = String::new();
        for attempt in 0..3 {
            let port = free_port();
            let stdout = dir.path().join(format!("stdout-{attempt}.log"));
            let stderr = dir.path().join(format!("stderr-{attempt}.log"));
            let mut child = Command::new(program)
                .args(args)
                .env_clear()
                .envs(base_env())
                .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .env("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string())
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(File::create(&stdout).unwrap())
                .stderr(File::create(&stderr).unwrap())
                .process_group(0)
                .spawn()
                .expect("spawn lakeguard serve");
            let deadline = Instant::now() + Duration::from_secs(30);
            let url = format!("http://127.0.0.1:{port}/");
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    let logs = read_logs(&stdout, &stderr);
                    let lower = logs.to_ascii_lowercase();
                    if lower.contains("address already in use") || lower.contains("addrinuse") {
                        last = logs;
                        break;
                    }
                    panic!(
                        "{} exited ({status}) before answering GET /:\n{logs}",
                        program.display()
                    );
                }
                if Instant::now() > deadline {
                    kill_group(&mut child);
                    panic!(
                        "{} did not answer GET / within 30 s:\n{}",
                        program.display(),
                        read_logs(&stdout, &stderr)
                    );
                }
                if client.get(&url).send().await.is_ok() {
                    return Handler {
                        child,
                        port,
                        stdout,
                        stderr,
                        _dir: dir,
                    };
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
        panic!(
            "{} could not bind a port in 3 attempts:\n{last}",
            program.display()
        );
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port>`
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// stdout followed by stderr, as written so far.
    pub fn logs(&self) -> String {
        read_logs(&self.stdout, &self.stderr)
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Panics if any of `secrets` (keys, SAS signatures, tokens) occurs in the logs.
    pub fn assert_logs_free_of(&self, secrets: &[&str]) {
        assert_free_of(&self.logs(), secrets);
    }

    /// Sends SIGTERM (what the host does on shutdown) without waiting.
    pub fn terminate(&self) {
        // SAFETY: plain syscall on our own child.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
    }

    /// SIGKILL: the instance dies mid-invocation, as when the platform recycles it.
    pub fn kill(&self) {
        // SAFETY: plain syscall on our own child.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGKILL);
        }
    }

    /// Waits up to `timeout` for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        kill_group(&mut self.child);
    }
}

fn read_logs(stdout: &PathBuf, stderr: &PathBuf) -> String {
    format!(
        "{}{}",
        std::fs::read_to_string(stdout).unwrap_or_default(),
        std::fs::read_to_string(stderr).unwrap_or_default()
    )
}

/// Panics if any non-empty secret occurs in `text` (the secret itself is not printed).
pub fn assert_free_of(text: &str, secrets: &[&str]) {
    for (i, s) in secrets.iter().enumerate() {
        if s.len() >= 8 {
            assert!(
                !text.contains(s),
                "secret #{i} ({} chars, starts {:?}) appears in the logs",
                s.len(),
                &s[..4]
            );
        }
    }
}

/// Runs `lakeguard <args>` to completion (5 minutes at most) with a clean environment plus `env`.
/// Async so that in-process stand-ins keep serving while it runs.
pub async fn run_cli(args: &[&str], env: &[(String, String)]) -> Output {
    let mut cmd = tokio::process::Command::new(lakeguard_bin());
    cmd.args(args)
        .env_clear()
        .envs(base_env())
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    match tokio::time::timeout(Duration::from_secs(300), cmd.output()).await {
        Ok(out) => out.expect("run lakeguard"),
        Err(_) => panic!("lakeguard {args:?} did not finish within 5 minutes"),
    }
}
