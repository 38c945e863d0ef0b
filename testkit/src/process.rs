//! A `cellgate` process started by a test: its standard error read line by
//! line (kept, and waited on) so a test can wait for "edge node serving" or
//! an access line, and read every line after it stopped.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
};

use tokio::sync::mpsc;

use crate::PATIENCE;

/// What `cellgate run` logs once it serves.
pub const SERVING: &str = "edge node serving";

/// A child process whose standard error is being read.
#[derive(Debug)]
pub struct Process {
    pub child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    rx: mpsc::UnboundedReceiver<String>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Process {
    /// Starts `cmd` with standard error piped (standard output discarded
    /// unless `cmd` says otherwise).
    pub fn spawn(cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let stderr = child.stderr.take().unwrap_or_else(|| unreachable!("piped"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let kept = lines.clone();
        let (tx, rx) = mpsc::unbounded_channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line.clone());
                kept.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        Self {
            child,
            lines,
            rx,
            reader: Some(reader),
        }
    }

    /// Waits (at most [`PATIENCE`]) for a line that contains every one of
    /// `what`; false if the process closed its standard error first or the
    /// wait ran out.
    pub async fn wait_for(&mut self, what: &[&str]) -> bool {
        tokio::time::timeout(PATIENCE, async {
            while let Some(l) = self.rx.recv().await {
                if what.iter().all(|w| l.contains(w)) {
                    return true;
                }
            }
            false
        })
        .await
        .unwrap_or(false)
    }

    /// [`Process::wait_for`], panicking with the lines so far when the line
    /// does not come.
    pub async fn expect_line(&mut self, what: &[&str]) {
        if !self.wait_for(what).await {
            panic!(
                "no line with {what:?} within {PATIENCE:?}; the process wrote:\n{}",
                self.lines().join("\n")
            );
        }
    }

    /// Every line written so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (`"TERM"`, `"QUIT"`, ...) with kill(1).
    pub fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([format!("-{signal}"), self.id().to_string()])
            .status();
    }

    /// Waits for the process to exit and for its last lines; returns the
    /// exit status and every line.
    pub async fn wait(mut self) -> (ExitStatus, Vec<String>) {
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
                Err(e) => panic!("wait: {e}"),
            }
        };
        if let Some(reader) = self.reader.take() {
            // The pipe closes with the process: the reader has every line.
            let _ = tokio::task::spawn_blocking(move || reader.join()).await;
        }
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone();
        (status, lines)
    }

    /// Kills the process and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    /// A test that fails half-way leaves no process behind.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}
