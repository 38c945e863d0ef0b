//! `cellgate demo`: three sim cells on loopback and a full edge node; with
//! `--fleet`, a local etcd and two edge nodes sharing operator state.

use std::{path::Path, sync::Arc, time::Duration};

use anyhow::Context as _;
use cellgate_config::{raw::RawConfig, Config};
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

/// The fleet demo's etcd: client and peer URLs on loopback.
pub const DEMO_ETCD: (&str, &str) = ("http://127.0.0.1:23379", "http://127.0.0.1:23380");

/// The second edge of the fleet demo: HTTP, DNS, admin, TCP listeners.
const SECOND_EDGE: (&str, &str, &str, &str) = ("127.0.0.1:8081", "127.0.0.1:5354", "127.0.0.1:9902", "127.0.0.1:9001");

fn parse(raw: &RawConfig) -> anyhow::Result<Arc<Config>> {
    let text = toml::to_string(raw).context("the demo config")?;
    Ok(Arc::new(
        cellgate_config::parse(&text, Path::new("examples/demo.toml")).context("the built-in demo config")?,
    ))
}

/// The demo's edge configs: one edge, or two in a fleet on the demo etcd.
fn configs(fleet: bool) -> anyhow::Result<Vec<Arc<Config>>> {
    let base: RawConfig = toml::from_str(DEMO_CONFIG).context("the built-in demo config")?;
    if !fleet {
        return Ok(vec![parse(&base)?]);
    }
    let with_fleet = |mut raw: RawConfig, name: &str| {
        raw.edge.name = name.into();
        raw.fleet = Some(cellgate_config::raw::RawFleet {
            etcd: cellgate_config::raw::RawEtcd {
                endpoints: vec![DEMO_ETCD.0.into()],
                auth: None,
                tls: None,
            },
            prefix: Some("/cellgate-demo/".into()),
            connect_timeout: None,
            request_timeout: None,
            lease_ttl: None,
            report_interval: None,
            cache_file: None,
            partial_outage: None,
        });
        raw
    };
    let first = with_fleet(base.clone(), "edge-fra-demo");
    let mut second = with_fleet(base, "edge-fra-demo-2");
    let (http, dns, admin, tcp) = SECOND_EDGE;
    second.listeners.http = Some(http.into());
    second.listeners.dns = Some(dns.into());
    second.listeners.admin = Some(admin.into());
    for t in &mut second.listeners.tcp {
        t.listen = tcp.into();
    }
    Ok(vec![parse(&first)?, parse(&second)?])
}

/// A local etcd for the fleet demo, stopped with the demo.
struct DemoEtcd {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Drop for DemoEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_etcd(config: &Config) -> anyhow::Result<DemoEtcd> {
    let dir = tempfile::tempdir()?;
    let (client, peer) = DEMO_ETCD;
    let child = std::process::Command::new("etcd")
        .args(["--name", "demo", "--data-dir"])
        .arg(dir.path().join("data"))
        .args(["--listen-client-urls", client, "--advertise-client-urls", client])
        .args(["--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer])
        .args(["--initial-cluster", &format!("demo={peer}")])
        .args(["--logger", "zap", "--log-level", "warn"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| {
            anyhow::anyhow!(
                "cellgate demo --fleet runs a local etcd, but `etcd` cannot be started ({e}): install Debian's `etcd-server` package (apt-get install etcd-server)"
            )
        })?;
    let etcd = DemoEtcd { child, _dir: dir };
    let Some(fleet) = &config.fleet else {
        return Ok(etcd);
    };
    let store = cellgate_fleet::FleetStore::new(fleet, "demo-probe")?;
    let ready = async {
        let mut retry = tokio::time::interval(Duration::from_millis(100));
        while store.load().await.is_err() {
            retry.tick().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), ready)
        .await
        .map_err(|_| anyhow::anyhow!("the demo's etcd did not answer on {client} within 20 s (is the port taken?)"))?;
    Ok(etcd)
}

pub fn run(fleet: bool) -> anyhow::Result<()> {
    let configs = configs(fleet)?;
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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(configs[0].proxy.threads)
        .thread_name("cellgate-worker")
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        let _etcd = match fleet {
            true => Some(start_etcd(&configs[0]).await?),
            false => None,
        };
        let mut bound = Vec::new();
        for c in configs {
            bound.push(
                Edge::bind_with(
                    c,
                    EdgeOptions {
                        admin_token: Some(token.clone()),
                        ..Default::default()
                    },
                )
                .await?,
            );
        }
        println!("{}", if fleet { fleet_banner() } else { banner() });
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(None);
        let mut runs = Vec::new();
        for b in bound {
            let mut rx = stop_rx.clone();
            runs.push(tokio::spawn(b.run(async move {
                let _ = rx.wait_for(Option::is_some).await;
                let how = *rx.borrow();
                how.unwrap_or(Stop::Fast)
            })));
        }
        use tokio::signal::unix::{signal, SignalKind};
        let how = match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = term.recv() => Stop::Graceful,
                _ = tokio::signal::ctrl_c() => Stop::Fast,
            },
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                Stop::Fast
            }
        };
        let _ = stop_tx.send(Some(how));
        for r in runs {
            r.await??;
        }
        anyhow::Ok(())
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    drop(cells);
    drop(cells_rt);
    result
}

fn fleet_banner() -> String {
    r#"
cellgate demo --fleet: two edge nodes sharing operator state through a local etcd
  etcd      127.0.0.1:23379 (prefix /cellgate-demo/)
  edge 1    edge-fra-demo    http 127.0.0.1:8080  dns 127.0.0.1:5353  admin 127.0.0.1:9901
  edge 2    edge-fra-demo-2  http 127.0.0.1:8081  dns 127.0.0.1:5354  admin 127.0.0.1:9902
  cells     eu-west 127.0.0.1:18081, us-east 127.0.0.1:18082, ap-south 127.0.0.1:18083

Try: drain through edge 1, watch edge 2 move.
  curl -si -H 'Host: app.demo.test' http://127.0.0.1:8081/ | grep x-cellgate-cell    # edge 2: eu-west
  curl -s -XPOST -H "Authorization: Bearer $CELLGATE_ADMIN_TOKEN" http://127.0.0.1:9901/api/v1/cells/eu-west/drain -d '{"mode":"soft","force":true}'
  curl -si -H 'Host: app.demo.test' http://127.0.0.1:8081/ | grep x-cellgate-cell    # edge 2: us-east
  kdig @127.0.0.1 -p 5354 +short app.demo.test A                                     # edge 2's DNS: 127.0.2.1
  curl -s http://127.0.0.1:9902/api/v1/fleet        # both edges, what each sees of every cell
  curl -s http://127.0.0.1:9902/api/v1/audit        # who drained it, through which edge
  curl -s -XPOST -H "Authorization: Bearer $CELLGATE_ADMIN_TOKEN" http://127.0.0.1:9902/api/v1/cells/eu-west/undrain
  # two operators at once: a write that expects an old revision gets 409 with the current value
  curl -si -XPOST -H "Authorization: Bearer $CELLGATE_ADMIN_TOKEN" -H 'If-Match: "1"' http://127.0.0.1:9901/api/v1/cells/eu-west/drain -d '{"force":true}'
  status pages: http://127.0.0.1:9901/ and http://127.0.0.1:9902/

Ctrl-C stops the demo.
"#
    .to_owned()
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
