//! `cellgate-bench`: the parts of the benchmark suite that need a program of
//! their own rather than a peer's tool.
//!
//! * `scenarios`: fault scenarios under steady client load against
//!   `cellgate run` in front of three `cellgate sim-cell` processes.
//! * `idle`: opens many idle keep-alive connections through a proxy and
//!   reports how much resident memory the proxy grew by.
//! * `compliance`: DNS behaviours ISC's genreport does not cover, against
//!   cellgate and its peers side by side (`bench/compliance/run`).
//! * `fleet`: three edges sharing operator intent through a three-member
//!   etcd cluster under load: drain propagation, the etcd leader killed.
//! * `upgrade`: `cellgate run --upgrade` + SIGQUIT under HTTP, DNS and L4
//!   load: nothing failed, unanswered or cut early.
//!
//! The `bare-pingora` binary beside it is the engine floor of
//! `bench/proxy/run`. `bench/run` drives them all. Everything stays on loopback, and every loop is
//! bounded in count and in time.

#![forbid(unsafe_code)]

mod compliance;
mod fleet;
mod idle;
mod load;
mod scenarios;
mod topo;
mod upgrade;

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fault scenarios against `cellgate run` with three sim cells; prints a Markdown table.
    Scenarios {
        /// The cellgate binary to run (edge and sim cells).
        #[arg(long, default_value = "target/release/cellgate")]
        cellgate: PathBuf,
        /// Short durations and at most 200 requests/s (the flap and reload scenarios last 3 s and 2 s
        /// instead of 30 s and 15 s).
        #[arg(long)]
        smoke: bool,
        /// Run only these scenarios (comma separated): kill, blackhole, slow, flap, drain, reload.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Client request rate, in requests per second over all workers.
        #[arg(long, default_value_t = 1000)]
        rate: u32,
    },
    /// Opens idle keep-alive connections through a proxy and reports its resident memory.
    Idle {
        /// The proxy's listening address (loopback).
        #[arg(long)]
        addr: SocketAddr,
        /// The Host header to send.
        #[arg(long)]
        host: String,
        #[arg(long, default_value_t = 10_000)]
        conns: usize,
        /// Processes whose resident memory is summed (a master and its workers, say).
        #[arg(long, required = true, value_delimiter = ',')]
        pid: Vec<u32>,
        /// How long the connections stay idle before memory is read again.
        #[arg(long, default_value = "3s")]
        hold: humantime::Duration,
    },
    /// DNS compliance checks beyond genreport's, against servers side by side; prints a Markdown table.
    Compliance {
        /// A server as NAME=IP:PORT (loopback only); repeat for each.
        #[arg(long = "server", required = true)]
        servers: Vec<compliance::Server>,
        /// The zone every server serves (with app, big, ns1 names: see `compliance.rs`).
        #[arg(long, default_value = "demo.test")]
        zone: String,
    },
    /// Three edges on a three-member etcd cluster under load: drain propagation, then the etcd
    /// leader killed; prints Markdown tables.
    Fleet {
        /// The cellgate binary to run (edges and sim cells).
        #[arg(long, default_value = "target/release/cellgate")]
        cellgate: PathBuf,
        /// 3 drain/undrain cycles instead of 20, 150 requests/s instead of 600, shorter waits.
        #[arg(long)]
        smoke: bool,
    },
    /// `cellgate run --upgrade` + SIGQUIT under HTTP, DNS (UDP, TCP) and L4 load; prints Markdown
    /// tables.
    Upgrade {
        /// The cellgate binary to run (edge and sim cells).
        #[arg(long, default_value = "target/release/cellgate")]
        cellgate: PathBuf,
        /// One upgrade instead of three, a 2 s grace period instead of 5 s, lighter load.
        #[arg(long)]
        smoke: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Scenarios {
                cellgate,
                smoke,
                only,
                rate,
            } => scenarios::run(&cellgate, smoke, &only, rate).await,
            Command::Idle {
                addr,
                host,
                conns,
                pid,
                hold,
            } => idle::run(addr, &host, conns, &pid, Duration::from(hold)).await,
            Command::Compliance { servers, zone } => compliance::run(&servers, &zone).await,
            Command::Fleet { cellgate, smoke } => fleet::run(&cellgate, smoke).await,
            Command::Upgrade { cellgate, smoke } => upgrade::run(&cellgate, smoke).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
