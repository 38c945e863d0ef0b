use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc};

use clap::{Parser, Subcommand, ValueEnum};

/// cellgate: an edge node that steers clients to the right cell.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a config file and exit: 0 when valid, 1 with every problem otherwise.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run an edge node.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Start even if the operator state file is corrupt (forgetting drains, weights and pins).
        #[arg(long)]
        ignore_state: bool,
    },
    /// Ask a running edge node why a client goes where it goes.
    Explain {
        /// The edge node's admin address.
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: SocketAddr,
        /// Service name, HTTP host or DNS name.
        #[arg(long)]
        service: String,
        /// The client's IP address.
        #[arg(long)]
        client: Option<std::net::IpAddr>,
        /// The request's shard key.
        #[arg(long)]
        key: Option<String>,
        /// The value of the service's sticky cookie.
        #[arg(long)]
        sticky: Option<String>,
    },
    /// Start three simulated cells on loopback and an edge node in front of them.
    Demo,
    /// Run one simulated cell (for the demo, tests and benchmarks).
    SimCell {
        #[arg(long)]
        id: String,
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        control_listen: SocketAddr,
        #[arg(long)]
        tcp_listen: Option<SocketAddr>,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,pingora_core=warn,pingora_proxy=warn,hickory_server=warn")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { config } => {
            return match cellgate::check(&config) {
                Ok(report) => {
                    for w in &report.warnings {
                        eprintln!("warning: {w}");
                    }
                    println!("{}", report.summary);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run { config, ignore_state } => {
            init_logging(cli.log_format);
            match cellgate::config::load(&config) {
                Ok(c) => cellgate::edge::run(
                    Arc::new(c),
                    cellgate::edge::RunOptions {
                        config_path: Some(config),
                        ignore_state,
                        ..Default::default()
                    },
                ),
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        Command::Explain {
            admin,
            service,
            client,
            key,
            sticky,
        } => explain(admin, &service, client, key, sticky),
        Command::Demo => {
            init_logging(cli.log_format);
            cellgate::demo::run()
        }
        Command::SimCell {
            id,
            listen,
            control_listen,
            tcp_listen,
        } => {
            init_logging(cli.log_format);
            sim_cell(cellgate::sim_cell::SimCellOptions {
                id,
                listen,
                control_listen,
                tcp_listen,
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn sim_cell(opts: cellgate::sim_cell::SimCellOptions) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let id = opts.id.clone();
        let (listen, control) = (opts.listen, opts.control_listen);
        let _cell = cellgate::sim_cell::SimCell::start(opts).await?;
        tracing::info!(%id, %listen, %control, "sim cell serving");
        tokio::signal::ctrl_c().await?;
        anyhow::Ok(())
    })
}

fn explain(
    admin: SocketAddr,
    service: &str,
    client: Option<std::net::IpAddr>,
    key: Option<String>,
    sticky: Option<String>,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let mut query: Vec<(&str, String)> = vec![("service", service.to_owned())];
        query.extend(client.map(|c| ("client", c.to_string())));
        query.extend(key.map(|k| ("key", k)));
        query.extend(sticky.map(|s| ("sticky", s)));
        let resp = reqwest::Client::new()
            .get(format!("http://{admin}/api/v1/explain"))
            .query(&query)
            .timeout(std::time::Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach the admin endpoint at {admin}: {e}"))?;
        let status = resp.status();
        let v: serde_json::Value = resp.json().await?;
        if !status.is_success() {
            anyhow::bail!("{}", v["error"].as_str().unwrap_or("request failed"));
        }
        let c = &v["client"];
        println!(
            "service {} (policy {}), table generation {}",
            v["service"].as_str().unwrap_or("?"),
            v["policy"].as_str().unwrap_or("?"),
            v["generation"]
        );
        match (c["ip"].as_str(), c["placed_at_edge"].as_bool()) {
            (Some(ip), Some(false)) => println!(
                "client {ip}: {} at {}, {} (matched /{})",
                c["country"].as_str().unwrap_or("??"),
                c["location"]["lat"],
                c["location"]["lon"],
                c["matched_prefix"]
            ),
            (Some(ip), _) => println!("client {ip}: location unknown, placed at the edge"),
            (None, _) => println!("no client address: placed at the edge"),
        }
        if let Some(s) = v["sticky"].as_str() {
            println!("sticky cookie: {s}");
        }
        println!("outcome: {}", v["outcome"].as_str().unwrap_or("?"));
        for (i, cand) in v["candidates"].as_array().into_iter().flatten().enumerate() {
            println!(
                "  {}. {:<12} {}",
                i + 1,
                cand["cell"].as_str().unwrap_or("?"),
                cand["why"].as_str().unwrap_or("")
            );
        }
        for ex in v["excluded"].as_array().into_iter().flatten() {
            println!(
                "  -  {:<12} {}",
                ex["cell"].as_str().unwrap_or("?"),
                ex["why"].as_str().unwrap_or("")
            );
        }
        anyhow::Ok(())
    })
}
