//! `cellgate demo`: three sim cells on loopback and a full edge node.

use std::{path::Path, sync::Arc};

use anyhow::Context as _;

use cellgate_sim::{SimCell, SimCellOptions};

use crate::edge::{Edge, EdgeOptions, Stop};

/// The demo's config, compiled in so the demo runs from anywhere.
pub const DEMO_CONFIG: &str = include_str!("../examples/demo.toml");

/// The demo's cells: id, HTTP, control and TCP ports.
pub const DEMO_CELLS: [(&str, u16, u16, u16); 3] = [
    ("eu-west", 18081, 19081, 18181),
    ("us-east", 18082, 19082, 18182),
    ("ap-south", 18083, 19083, 18183),
];

pub fn run() -> anyhow::Result<()> {
    let config = Arc::new(
        cellgate_config::parse(DEMO_CONFIG, Path::new("examples/demo.toml")).context("the built-in demo config")?,
    );
    let cells_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("cellgate-sim")
        .enable_all()
        .build()?;
    let cells = cells_rt.block_on(async {
        let mut cells: Vec<SimCell> = Vec::new();
        for (id, http, control, tcp) in DEMO_CELLS {
            let opts = SimCellOptions {
                id: id.into(),
                listen: ([127, 0, 0, 1], http).into(),
                control_listen: ([127, 0, 0, 1], control).into(),
                tcp_listen: Some(([127, 0, 0, 1], tcp).into()),
            };
            cells.push(
                SimCell::start(opts)
                    .await
                    .with_context(|| format!("starting sim cell {id}"))?,
            );
        }
        anyhow::Ok(cells)
    })?;
    let token = match std::env::var("CELLGATE_ADMIN_TOKEN") {
        Ok(t) if t.len() >= 16 => t,
        _ => {
            use rand::Rng;
            let t: String = rand::rng()
                .sample_iter(rand::distr::Alphanumeric)
                .take(32)
                .map(char::from)
                .collect();
            println!("CELLGATE_ADMIN_TOKEN was not set (or shorter than 16): the admin token for this demo is\n  export CELLGATE_ADMIN_TOKEN={t}");
            t
        }
    };
    println!("{}", banner());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.proxy.threads)
        .thread_name("cellgate-worker")
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        let bound = Edge::bind_with(
            config,
            EdgeOptions {
                admin_token: Some(token),
                ..Default::default()
            },
        )
        .await?;
        bound
            .run(async {
                use tokio::signal::unix::{signal, SignalKind};
                match signal(SignalKind::terminate()) {
                    Ok(mut term) => tokio::select! {
                        _ = term.recv() => Stop::Graceful,
                        _ = tokio::signal::ctrl_c() => Stop::Fast,
                    },
                    Err(_) => {
                        let _ = tokio::signal::ctrl_c().await;
                        Stop::Fast
                    }
                }
            })
            .await
    });
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    drop(cells);
    drop(cells_rt);
    result
}

fn banner() -> String {
    r#"
cellgate demo: edge node `edge-fra-demo` (Frankfurt) in front of three sim cells
  eu-west  127.0.0.1:18081  (control 127.0.0.1:19081)
  us-east  127.0.0.1:18082  (control 127.0.0.1:19082)
  ap-south 127.0.0.1:18083  (control 127.0.0.1:19083)

Try:
  # geo policy: a loopback client stands at the edge (Frankfurt) -> eu-west; sticky cookie set
  curl -si -H 'Host: app.demo.test' http://127.0.0.1:8080/
  # a client from 203.0.113.0/24 (India) through a trusted proxy -> ap-south
  #   (add `trusted_proxies = ["127.0.0.1"]` under [proxy] for X-Forwarded-For to count)
  # latency policy with a shard key: a tenant always lands on its home cell; `acme` is pinned to us-east
  curl -si -H 'Host: api.demo.test' -H 'x-tenant: acme' http://127.0.0.1:8080/
  curl -si -H 'Host: api.demo.test' -H 'x-tenant: globex' http://127.0.0.1:8080/
  # kill a cell and watch traffic move (no failed requests), then bring it back
  curl -s -XPOST http://127.0.0.1:19081/down
  curl -si -H 'Host: app.demo.test' http://127.0.0.1:8080/
  curl -s -XPOST http://127.0.0.1:19081/up
  # make a cell slow or loaded
  curl -s -XPOST 'http://127.0.0.1:19082/latency?ms=200'
  curl -s -XPOST 'http://127.0.0.1:19083/load?value=0.95'
  # plain TCP (L4): prints the cell id, then echoes
  nc 127.0.0.1 9000
  # DNS: geo answers by EDNS Client Subnet
  kdig @127.0.0.1 -p 5353 +subnet=203.0.113.7/24 app.demo.test A
  kdig @127.0.0.1 -p 5353 +subnet=198.51.100.7/24 app.demo.test A
  # admin: status page http://127.0.0.1:9901/ ; API:
  curl -s http://127.0.0.1:9901/api/v1/cells
  curl -s -XPOST http://127.0.0.1:9901/api/v1/cells/eu-west/drain -d '{"mode":"soft","dry_run":true}'
  curl -s -XPOST -H "Authorization: Bearer $CELLGATE_ADMIN_TOKEN" http://127.0.0.1:9901/api/v1/cells/eu-west/drain -d '{"mode":"soft","deadline":"5m"}'
  curl -s -XPOST -H "Authorization: Bearer $CELLGATE_ADMIN_TOKEN" http://127.0.0.1:9901/api/v1/cells/eu-west/undrain
  curl -s 'http://127.0.0.1:9901/api/v1/explain?service=app&client=203.0.113.7'
  cargo run --release -- explain --service api --key acme
  curl -s http://127.0.0.1:9901/metrics | grep cellgate_
  (the demo keeps operator state in memory: a restart forgets drains)

Ctrl-C stops the demo.
"#
    .to_owned()
}
