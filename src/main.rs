use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc};

use anyhow::Context as _;
use cellgate::{
    edge::{Edge, EdgeOptions, Stop},
    logging::{self, AccessLog, Format},
};
use cellgate_admin::contract::{ExplainQuery, Explanation};
use cellgate_handoff::{notify::notify, Handoff, State};
use clap::{Parser, Subcommand, ValueEnum};
use tokio::signal::unix::{signal, Signal, SignalKind};

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
    /// Validate a config file and what it names (certificates, the geo
    /// database, secret files) and exit: 0 when valid, 1 with every problem.
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
        /// Where the access log goes: `stderr` (with the other logs), `off`, or a file path.
        #[arg(long, default_value = "stderr")]
        access_log: AccessLog,
        /// Take over the listening sockets of the running process (which
        /// hands them over on SIGQUIT) instead of binding them: a restart
        /// or upgrade that refuses no connection and loses no query.
        #[arg(long)]
        upgrade: bool,
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
    Demo {
        /// Two edge nodes sharing operator state through a local etcd
        /// (Debian's `etcd-server`).
        #[arg(long)]
        fleet: bool,
    },
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

fn format(f: LogFormat) -> Format {
    match f {
        LogFormat::Text => Format::Text,
        LogFormat::Json => Format::Json,
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
        Command::Run {
            config,
            ignore_state,
            access_log,
            upgrade,
        } => run(config, ignore_state, format(cli.log_format), &access_log, upgrade),
        Command::Explain {
            admin,
            service,
            client,
            key,
            sticky,
        } => explain(
            admin,
            ExplainQuery {
                service,
                client: client.map(|c| c.to_string()),
                key,
                sticky,
            },
        ),
        Command::Demo { fleet } => logging::init(format(cli.log_format), &AccessLog::Stderr)
            .map_err(anyhow::Error::from)
            .and_then(|_logging| cellgate::demo::run(fleet)),
        Command::SimCell {
            id,
            listen,
            control_listen,
            tcp_listen,
        } => logging::init(format(cli.log_format), &AccessLog::Stderr)
            .map_err(anyhow::Error::from)
            .and_then(|_logging| {
                sim_cell(cellgate_sim::SimCellOptions {
                    id,
                    listen,
                    control_listen,
                    tcp_listen,
                })
            }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The signals `cellgate run` answers, installed before anything else so
/// that an early SIGQUIT or SIGUSR2 cannot kill the process.
struct Signals {
    term: Signal,
    int: Signal,
    quit: Signal,
    usr2: Signal,
    hup: Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        let s = |k| signal(k).context("installing signal handlers");
        Ok(Self {
            term: s(SignalKind::terminate())?,
            int: s(SignalKind::interrupt())?,
            quit: s(SignalKind::quit())?,
            usr2: s(SignalKind::user_defined2())?,
            hup: s(SignalKind::hangup())?,
        })
    }
}

/// Starts `<this binary> <these args> --upgrade` (SIGUSR2: the way a
/// systemd unit upgrades, so the new process runs inside the unit).
fn spawn_successor() -> std::io::Result<std::process::Child> {
    let mut args = std::env::args_os();
    let program = args.next().unwrap_or_else(|| "cellgate".into());
    let rest: Vec<std::ffi::OsString> = args.filter(|a| a != "--upgrade").collect();
    std::process::Command::new(program).args(rest).arg("--upgrade").spawn()
}

fn runtime(threads: usize, name: &str) -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name(name)
        .enable_all()
        .build()
        .with_context(|| format!("starting the {name} runtime"))
}

fn run(path: PathBuf, ignore_state: bool, format: Format, access: &AccessLog, upgrade: bool) -> anyhow::Result<()> {
    let config = match cellgate::config::load(&path) {
        Ok(c) => Arc::new(c),
        Err(e) => anyhow::bail!("{e}"),
    };
    let logging = Arc::new(logging::init(format, access).context("setting up logging")?);
    // The control plane (prober, publisher, admin) on a thread of its own,
    // so probe RTTs are not measured through a busy proxy worker.
    let control = runtime(1, "cellgate-control")?;
    let data = runtime(config.proxy.threads, "cellgate-worker")?;
    let grace = config.proxy.grace_period;
    let result = data.block_on(async {
        let mut signals = Signals::install()?;
        let handoff = Handoff::new(Handoff::default_path());
        // An upgrade takes the running process's sockets before binding any.
        let (inherited, predecessor) = if upgrade {
            let i = handoff.receive().await.context("upgrade: taking over the sockets")?;
            tracing::info!(from = i.predecessor.pid(), sockets = i.sockets.len(), "upgrade: sockets received");
            (Some(i.sockets), Some(i.predecessor))
        } else {
            (None, None)
        };
        let bound = Edge::bind_with(
            config,
            EdgeOptions {
                config_path: Some(path),
                ignore_state,
                control: Some(control.handle().clone()),
                log_dropped: Some(logging.dropped_counter()),
                inherited,
                ..Default::default()
            },
        )
        .await;
        let mut bound = match bound {
            Ok(b) => b,
            Err(e) => {
                if let Some(p) = predecessor {
                    // The running process keeps serving and logs why.
                    p.abort(&format!("{e:#}")).await;
                }
                return Err(e);
            }
        };
        // Bound, first probe round done, first table published: ready.
        match predecessor {
            Some(p) => match p.ready().await {
                Ok(released) => {
                    tracing::info!(old_pid = released.pid, grace = ?released.grace_period, "upgrade: the previous process stopped accepting and drains");
                    let _ = notify(&[State::MainPid(std::process::id()), State::Ready]);
                }
                Err(e @ cellgate_handoff::Error::Cancelled { .. }) => {
                    return Err(anyhow::Error::from(e).context("upgrade: the running process gave up; it keeps serving"));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "upgrade: the previous process did not confirm; serving anyway");
                    let _ = notify(&[State::MainPid(std::process::id()), State::Ready]);
                }
            },
            None => {
                let _ = notify(&[State::Ready]);
            }
        }
        let admin = bound.admin().clone();
        let mut hup = signals.hup;
        control.spawn(async move {
            while hup.recv().await.is_some() {
                let _ = notify(&[State::Reloading]);
                match admin.reload().await {
                    Ok(report) => tracing::info!(?report, "SIGHUP: config reloaded"),
                    Err(problems) => {
                        tracing::error!(?problems, "SIGHUP: invalid config; still serving the previous one")
                    }
                }
                let _ = notify(&[State::Ready]);
            }
        });
        let sockets = bound.take_sockets();
        let shutdown = async move {
            loop {
                let mut successor = None;
                tokio::select! {
                    _ = signals.term.recv() => {
                        let _ = notify(&[State::Stopping]);
                        return Stop::Graceful;
                    }
                    _ = signals.int.recv() => return Stop::Fast,
                    _ = signals.quit.recv() => {}
                    _ = signals.usr2.recv() => match spawn_successor() {
                        Ok(child) => successor = Some(child),
                        Err(e) => {
                            tracing::error!(error = %e, "SIGUSR2: cannot start the new process; still serving");
                            continue;
                        }
                    },
                }
                // Hand the sockets over; serve until the new process is ready.
                let handed = match handoff.send(&sockets).await {
                    Ok(offered) => offered.wait_ready().await,
                    Err(e) => Err(e),
                };
                match handed {
                    Ok(s) => {
                        if let Err(e) = s.release(grace).await {
                            tracing::warn!(error = %e, "upgrade: could not confirm the release to the new process");
                        }
                        tracing::info!(?grace, "upgrade: the new process serves; draining and exiting");
                        // The unit goes on with the new process: no STOPPING=1.
                        return Stop::Graceful;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "upgrade failed: still serving");
                        if let Some(mut c) = successor {
                            let _ = c.kill();
                            let _ = c.wait();
                        }
                    }
                }
            }
        };
        bound.run(shutdown).await
    });
    data.shutdown_timeout(std::time::Duration::from_secs(1));
    control.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

fn sim_cell(opts: cellgate_sim::SimCellOptions) -> anyhow::Result<()> {
    let rt = runtime(2, "cellgate-sim")?;
    rt.block_on(async {
        let id = opts.id.clone();
        let (listen, control) = (opts.listen, opts.control_listen);
        let _cell = cellgate_sim::SimCell::start(opts).await?;
        tracing::info!(%id, %listen, %control, "sim cell serving");
        tokio::signal::ctrl_c().await?;
        anyhow::Ok(())
    })
}

fn explain(admin: SocketAddr, query: ExplainQuery) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let resp = reqwest::Client::new()
            .get(format!("http://{admin}/api/v1/explain"))
            .query(&query)
            .timeout(std::time::Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach the admin endpoint at {admin}: {e}"))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let body: cellgate_admin::contract::ErrorBody = resp.json().await.unwrap_or_default();
            anyhow::bail!("{status}: {}", body.error);
        }
        let e: Explanation = resp
            .json()
            .await
            .context("the answer does not fit the admin contract")?;
        println!(
            "service {} (policy {}), table generation {}",
            e.service, e.policy, e.generation
        );
        let c = &e.client;
        match (&c.ip, &c.location, c.placed_at_edge) {
            (Some(ip), Some(loc), false) => println!(
                "client {ip}: {} at {}, {} (matched /{})",
                c.country.as_deref().unwrap_or("??"),
                loc.lat,
                loc.lon,
                c.matched_prefix.unwrap_or(0)
            ),
            (Some(ip), _, _) => println!("client {ip}: location unknown, placed at the edge"),
            (None, _, _) => println!("no client address: placed at the edge"),
        }
        if let Some(s) = &e.sticky {
            println!("sticky cookie: {s}");
        }
        println!("outcome: {}", serde_json::to_string(&e.outcome)?.trim_matches('"'));
        for (i, cand) in e.candidates.iter().enumerate() {
            println!("  {}. {:<12} {}", i + 1, cand.cell, cand.why);
        }
        for ex in &e.excluded {
            println!("  -  {:<12} {}", ex.cell, ex.why);
        }
        anyhow::Ok(())
    })
}
