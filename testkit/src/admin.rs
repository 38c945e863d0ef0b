//! A typed client of the admin API.

use std::net::SocketAddr;

use cellgate_admin::contract::*;
use serde::{de::DeserializeOwned, Serialize};

/// An admin API error: the status and the typed body.
#[derive(Clone, Debug, PartialEq)]
pub struct AdminError {
    pub status: u16,
    pub body: ErrorBody,
}

impl std::fmt::Display for AdminError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.status, self.body.error)
    }
}

/// Talks to one edge's admin listener.
#[derive(Clone, Debug)]
pub struct AdminClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

type Result<T> = std::result::Result<T, AdminError>;

impl AdminClient {
    pub fn new(addr: SocketAddr, token: Option<String>) -> Self {
        Self {
            base: format!("http://{addr}"),
            token,
            http: reqwest::Client::new(),
        }
    }

    /// The same client with another token (or none).
    pub fn with_token(&self, token: Option<&str>) -> Self {
        Self {
            token: token.map(str::to_owned),
            ..self.clone()
        }
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    async fn send<T: DeserializeOwned>(&self, r: reqwest::RequestBuilder) -> Result<T> {
        let resp = r.send().await.map_err(|e| AdminError {
            status: 0,
            body: ErrorBody {
                error: format!("cannot reach the admin API: {e}"),
                ..Default::default()
            },
        })?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap_or_default();
        if (200..300).contains(&status) {
            serde_json::from_slice(&bytes).map_err(|e| AdminError {
                status,
                body: ErrorBody {
                    error: format!(
                        "response does not fit the contract: {e}: {}",
                        String::from_utf8_lossy(&bytes)
                    ),
                    ..Default::default()
                },
            })
        } else {
            Err(AdminError {
                status,
                body: serde_json::from_slice(&bytes).unwrap_or_else(|_| ErrorBody {
                    error: String::from_utf8_lossy(&bytes).into_owned(),
                    ..Default::default()
                }),
            })
        }
    }

    async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        self.send(self.req(reqwest::Method::POST, path).json(body)).await
    }

    pub async fn cells(&self) -> Result<CellsView> {
        self.send(self.req(reqwest::Method::GET, "/api/v1/cells")).await
    }

    pub async fn cell(&self, id: &str) -> Result<CellView> {
        let cells = self.cells().await?;
        cells.cells.into_iter().find(|c| c.id == id).ok_or_else(|| AdminError {
            status: 404,
            body: ErrorBody {
                error: format!("no cell {id}"),
                ..Default::default()
            },
        })
    }

    pub async fn services(&self) -> Result<ServicesView> {
        self.send(self.req(reqwest::Method::GET, "/api/v1/services")).await
    }

    /// The history of every cell (the samples after `since_ms`, or all).
    pub async fn history(&self, since_ms: Option<u64>) -> Result<HistoryView> {
        self.send(
            self.req(reqwest::Method::GET, "/api/v1/history")
                .query(&HistoryQuery { since_ms }),
        )
        .await
    }

    pub async fn drain(&self, cell: &str, req: &DrainRequest) -> Result<DrainResponse> {
        self.post(&format!("/api/v1/cells/{cell}/drain"), req).await
    }

    pub async fn undrain(&self, cell: &str) -> Result<Undrained> {
        self.send(self.req(reqwest::Method::POST, &format!("/api/v1/cells/{cell}/undrain")))
            .await
    }

    pub async fn weight(&self, cell: &str, weight: f64) -> Result<Weighted> {
        self.send(
            self.req(reqwest::Method::PUT, &format!("/api/v1/cells/{cell}/weight"))
                .json(&WeightRequest {
                    weight,
                    scope: Scope::Fleet,
                    expected_revision: None,
                }),
        )
        .await
    }

    pub async fn pins(&self, service: &str) -> Result<PinsView> {
        self.send(self.req(reqwest::Method::GET, &format!("/api/v1/shards/{service}")))
            .await
    }

    pub async fn pin(&self, service: &str, key: &str, cell: &str) -> Result<Pinned> {
        self.send(
            self.req(reqwest::Method::PUT, &format!("/api/v1/shards/{service}/{key}"))
                .json(&PinRequest {
                    cell: cell.into(),
                    scope: Scope::Fleet,
                    expected_revision: None,
                }),
        )
        .await
    }

    pub async fn unpin(&self, service: &str, key: &str) -> Result<Unpinned> {
        self.send(self.req(reqwest::Method::DELETE, &format!("/api/v1/shards/{service}/{key}")))
            .await
    }

    pub async fn explain(&self, q: &ExplainQuery) -> Result<Explanation> {
        self.send(self.req(reqwest::Method::GET, "/api/v1/explain").query(q))
            .await
    }

    /// A drain sent with `If-Match: "<revision>"`.
    pub async fn drain_if_match(&self, cell: &str, req: &DrainRequest, revision: i64) -> Result<DrainResponse> {
        self.send(
            self.req(reqwest::Method::POST, &format!("/api/v1/cells/{cell}/drain"))
                .header("if-match", format!("\"{revision}\""))
                .json(req),
        )
        .await
    }

    pub async fn fleet(&self) -> Result<FleetStatus> {
        self.send(self.req(reqwest::Method::GET, "/api/v1/fleet")).await
    }

    pub async fn audit(&self) -> Result<AuditView> {
        self.send(self.req(reqwest::Method::GET, "/api/v1/audit")).await
    }

    pub async fn reload(&self) -> Result<ReloadResult> {
        self.send(self.req(reqwest::Method::POST, "/api/v1/reload")).await
    }

    /// A raw request, for malformed-input tests: status and body text.
    pub async fn raw(&self, method: reqwest::Method, path: &str, body: &str) -> (u16, String) {
        match self.req(method, path).body(body.to_owned()).send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                (status, r.text().await.unwrap_or_default())
            }
            Err(e) => (0, e.to_string()),
        }
    }
}
