//! `fleetlm-bench`: drives a real FleetLM server over real sockets and reports throughput,
//! latency and fsync batching. Starts its own server (release binary beside this one, temporary
//! data directory) unless `--url` points at one.

mod catchup;
mod echo;
mod fanout;
mod idle;
mod pgbase;
mod phx;
mod rest;
mod server;
mod turns;
mod wswrite;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "fleetlm-bench", about = "Benchmarks for FleetLM")]
struct Cli {
    /// Use a running server instead of starting one.
    #[arg(long, global = true)]
    url: Option<String>,
    /// Extra arguments for the server this tool starts (e.g. "--wal-lanes 2").
    #[arg(long, global = true, allow_hyphen_values = true)]
    server_args: Option<String>,
    /// Write results as JSON to this file as well.
    #[arg(long, global = true)]
    json: Option<std::path::PathBuf>,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// REST write saturation: S sessions × D requests in flight each; fsync-acked appends/s.
    RestWrite(rest::WriteOptions),
    /// WebSocket write saturation against FleetLM and the bare echo server (the transport limit).
    WsWrite(wswrite::WsWriteOptions),
    /// One writer socket, N subscriber sockets on one session: deliveries/s and latency.
    Fanout(fanout::FanoutOptions),
    /// K idle sockets each joined to a session: server RSS per socket.
    IdleSockets(idle::IdleOptions),
    /// C clients join a session of M messages at once (hot, then archived).
    CatchUp(catchup::CatchUpOptions),
    /// Users talking to a local echo agent: turns/s and debounce accuracy.
    AgentTurns(turns::TurnsOptions),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut server = match &cli.url {
        Some(url) => server::Target::external(url.clone()),
        // Load tests open many sockets per identity; lift that limit on the server they start.
        None => {
            let extra = format!(
                "--ws-max-sockets-per-identity 1000000 {}",
                cli.server_args.as_deref().unwrap_or_default()
            );
            server::Target::spawn(&extra).await?
        }
    };
    let results = match cli.scenario {
        Scenario::RestWrite(options) => rest::write_saturation(&server, &options).await?,
        Scenario::WsWrite(options) => wswrite::ws_write(&server, &options).await?,
        Scenario::Fanout(options) => fanout::fanout(&server, &options).await?,
        Scenario::IdleSockets(options) => idle::idle_sockets(&server, &options).await?,
        Scenario::CatchUp(options) => catchup::catch_up(&mut server, &options).await?,
        Scenario::AgentTurns(options) => turns::agent_turns(&server, &options).await?,
    };
    if let Some(path) = cli.json {
        std::fs::write(path, serde_json::to_vec_pretty(&results)?)?;
    }
    drop(server);
    Ok(())
}
