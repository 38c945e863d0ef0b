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
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,pingora_core=warn,pingora_proxy=warn,hickory_server=warn"));
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
        Command::Run { config } => {
            init_logging(cli.log_format);
            match cellgate::config::load(&config) {
                Ok(c) => cellgate::edge::run(Arc::new(c), None),
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            }
        }
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
