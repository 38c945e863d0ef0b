//! Headless Chromium driven over the DevTools protocol (a WebSocket), for
//! tests of the status page: navigate, run script, wait for a condition,
//! take a screenshot. Chromium comes from Debian (`apt-get install
//! chromium`; `.ci/run` installs it).

use std::{path::Path, time::Duration};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::{tungstenite::Message, MaybeTlsStream, WebSocketStream};

type Socket = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// A headless Chromium with one page.
#[derive(Debug)]
pub struct Browser {
    child: std::process::Child,
    page: Socket,
    next_id: u64,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find_chromium() -> anyhow::Result<&'static str> {
    ["chromium", "chromium-browser"]
        .into_iter()
        .find(|c| {
            std::process::Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .ok_or_else(|| anyhow::anyhow!("chromium is needed (apt-get install chromium; .ci/run installs it)"))
}

impl Browser {
    /// Starts Chromium (headless, no network beyond loopback, a fresh
    /// profile) and attaches to its page.
    pub async fn launch(width: u32, height: u32) -> anyhow::Result<Self> {
        let chromium = find_chromium()?;
        let profile = tempfile::tempdir()?;
        let child = std::process::Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-port=0",
                "--remote-debugging-address=127.0.0.1",
            ])
            .arg(format!("--window-size={width},{height}"))
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        // Chromium writes its DevTools port into the profile once it listens.
        let port_file = profile.path().join("DevToolsActivePort");
        let port: u16 = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if let Some(p) = std::fs::read_to_string(&port_file)
                    .ok()
                    .and_then(|t| t.lines().next().and_then(|l| l.trim().parse().ok()))
                {
                    return p;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
        .await
        .map_err(|_| anyhow::anyhow!("chromium did not open its DevTools port"))?;
        let targets: Vec<Value> = reqwest::get(format!("http://127.0.0.1:{port}/json/list"))
            .await?
            .json()
            .await?;
        let ws = targets
            .iter()
            .find(|t| t["type"] == "page")
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .ok_or_else(|| anyhow::anyhow!("no page target: {targets:?}"))?
            .to_owned();
        let (page, _) = tokio_tungstenite::connect_async(ws).await?;
        let mut b = Self {
            child,
            page,
            next_id: 0,
            _profile: profile,
        };
        b.call("Page.enable", json!({})).await?;
        b.call("Runtime.enable", json!({})).await?;
        Ok(b)
    }

    /// Sends one DevTools command and returns its result.
    pub async fn call(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({ "id": id, "method": method, "params": params });
        self.page.send(Message::text(msg.to_string())).await?;
        let reply = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(m) = self.page.next().await {
                let m = m?;
                let Message::Text(t) = m else { continue };
                let v: Value = serde_json::from_str(t.as_str())?;
                if v["id"] == id {
                    return Ok(v);
                }
            }
            Err(anyhow::anyhow!("DevTools connection closed"))
        })
        .await
        .map_err(|_| anyhow::anyhow!("no answer to {method}"))??;
        if let Some(e) = reply.get("error") {
            anyhow::bail!("{method}: {e}");
        }
        Ok(reply["result"].clone())
    }

    /// Loads `url` and waits for its `load` event to have fired.
    pub async fn goto(&mut self, url: &str) -> anyhow::Result<()> {
        self.call("Page.navigate", json!({ "url": url })).await?;
        self.wait_for("document.readyState === 'complete'", Duration::from_secs(20))
            .await
    }

    /// Evaluates `expression` in the page (promises awaited) and returns
    /// its value.
    pub async fn eval(&mut self, expression: &str) -> anyhow::Result<Value> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "awaitPromise": true, "returnByValue": true }),
            )
            .await?;
        if let Some(e) = r.get("exceptionDetails") {
            anyhow::bail!("script failed: {e}");
        }
        Ok(r["result"]["value"].clone())
    }

    /// Polls `condition` (a script returning a boolean) until it holds.
    pub async fn wait_for(&mut self, condition: &str, limit: Duration) -> anyhow::Result<()> {
        let until = tokio::time::Instant::now() + limit;
        loop {
            if self.eval(condition).await?.as_bool() == Some(true) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= until {
                anyhow::bail!("`{condition}` still false after {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A PNG of the page as shown.
    pub async fn screenshot(&mut self, path: &Path) -> anyhow::Result<()> {
        use base64::Engine as _;
        let r = self.call("Page.captureScreenshot", json!({ "format": "png" })).await?;
        let data = r["data"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("no screenshot data"))?;
        let png = base64::engine::general_purpose::STANDARD.decode(data)?;
        std::fs::write(path, png)?;
        Ok(())
    }
}
