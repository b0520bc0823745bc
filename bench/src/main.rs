//! `fleetlm-bench`: drives a real FleetLM server over real sockets and reports throughput,
//! latency and fsync batching. Starts its own server (release binary beside this one, temporary
//! data directory) unless `--url` points at one.

mod archive_link;
mod catchup;
mod cluster;
mod cpu;
mod echo;
mod fanout;
mod idle;
mod jetstream;
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
    /// A 3-node cluster against a single node (both archiving to Postgres) under the `ws-write`
    /// load: acked appends/s, latency, the ratio, appends per log entry. Ignores `--url`.
    ClusterWrite(cluster::ClusterWriteOptions),
    /// kill -9 a shard's leader repeatedly under load: time until that shard takes writes again
    /// through a surviving node (p50/p99/max). Ignores `--url`.
    Failover(cluster::FailoverOptions),
    /// CPU and RSS of idle cluster nodes and of an idle single node. Ignores `--url`.
    ClusterIdle(cluster::ClusterIdleOptions),
    /// Every single-node scenario above in turn, each on a fresh server, with the default sizes
    /// (about 3 minutes); `--quick` runs them shorter and smaller (under a minute).
    All(AllOptions),
}

#[derive(clap::Args)]
struct AllOptions {
    /// Short runs with smaller sizes (catch-up keeps 1000 clients × 200 messages).
    #[arg(long)]
    quick: bool,
}

/// A scenario's options from command-line style arguments (its defaults for the rest).
fn options<T: clap::Args + clap::FromArgMatches>(args: &[&str]) -> anyhow::Result<T> {
    let command = T::augment_args(clap::Command::new("scenario").no_binary_name(true));
    Ok(T::from_arg_matches(&command.try_get_matches_from(args)?)?)
}

/// One scenario of `all`, as the subcommand and arguments it would be run with by hand.
fn planned_runs(quick: bool) -> Vec<(&'static str, Vec<&'static str>)> {
    if quick {
        vec![
            ("ws-write", vec!["--seconds", "2", "--half-load"]),
            ("rest-write", vec!["--seconds", "2"]),
            ("fanout", vec!["--seconds", "2"]),
            ("idle-sockets", vec!["--sockets", "2000"]),
            ("catch-up", vec![]),
            ("agent-turns", vec!["--seconds", "2"]),
        ]
    } else {
        vec![
            ("ws-write", vec!["--half-load"]),
            ("rest-write", vec![]),
            ("fanout", vec![]),
            ("idle-sockets", vec![]),
            ("catch-up", vec![]),
            ("agent-turns", vec![]),
        ]
    }
}

async fn run_scenario(target: &mut server::Target, name: &str, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    match name {
        "rest-write" => rest::write_saturation(target, &options(args)?).await,
        "ws-write" => wswrite::ws_write(target, &options(args)?).await,
        "fanout" => fanout::fanout(target, &options(args)?).await,
        "idle-sockets" => idle::idle_sockets(target, &options(args)?).await,
        "catch-up" => catchup::catch_up(target, &options(args)?).await,
        "agent-turns" => turns::agent_turns(target, &options(args)?).await,
        other => anyhow::bail!("unknown scenario {other}"),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let extra = cli.server_args.clone().unwrap_or_default();
    if cli.url.is_some()
        && matches!(
            cli.scenario,
            Scenario::ClusterWrite(_) | Scenario::Failover(_) | Scenario::ClusterIdle(_)
        )
    {
        anyhow::bail!("the cluster scenarios start their own servers; --url does not apply");
    }
    let results = match cli.scenario {
        Scenario::All(all) => run_all(&cli.url, cli.server_args.as_deref(), all.quick).await?,
        Scenario::ClusterWrite(options) => cluster::cluster_write(&options, &extra).await?,
        Scenario::Failover(options) => cluster::failover(&options, &extra).await?,
        Scenario::ClusterIdle(options) => cluster::cluster_idle(&options, &extra).await?,
        scenario => run_one(&cli.url, cli.server_args.as_deref(), scenario).await?,
    };
    if let Some(path) = cli.json {
        std::fs::write(path, serde_json::to_vec_pretty(&results)?)?;
    }
    Ok(())
}

/// The server a scenario runs against: `--url`'s, or a fresh one this tool starts.
async fn target(url: &Option<String>, server_args: Option<&str>) -> anyhow::Result<server::Target> {
    Ok(match url {
        Some(url) => server::Target::external(url.clone()),
        // Load tests open many sockets per identity; lift that limit on the server they start.
        None => {
            let extra = format!(
                "--ws-max-sockets-per-identity 1000000 {}",
                server_args.unwrap_or_default()
            );
            server::Target::spawn(&extra).await?
        }
    })
}

async fn run_all(url: &Option<String>, server_args: Option<&str>, quick: bool) -> anyhow::Result<serde_json::Value> {
    let started = std::time::Instant::now();
    let mut results = serde_json::Map::new();
    for (name, args) in planned_runs(quick) {
        println!("\n== fleetlm-bench {name} {}", args.join(" "));
        let mut server = target(url, server_args).await?;
        let result = run_scenario(&mut server, name, &args).await?;
        results.insert(name.to_string(), result);
    }
    println!("\nall scenarios ran in {:.1} s", started.elapsed().as_secs_f64());
    Ok(serde_json::Value::Object(results))
}

async fn run_one(
    url: &Option<String>,
    server_args: Option<&str>,
    scenario: Scenario,
) -> anyhow::Result<serde_json::Value> {
    let mut server = target(url, server_args).await?;
    let results = match scenario {
        Scenario::RestWrite(options) => rest::write_saturation(&server, &options).await?,
        Scenario::WsWrite(options) => wswrite::ws_write(&server, &options).await?,
        Scenario::Fanout(options) => fanout::fanout(&server, &options).await?,
        Scenario::IdleSockets(options) => idle::idle_sockets(&server, &options).await?,
        Scenario::CatchUp(options) => catchup::catch_up(&mut server, &options).await?,
        Scenario::AgentTurns(options) => turns::agent_turns(&server, &options).await?,
        Scenario::All(_) | Scenario::ClusterWrite(_) | Scenario::Failover(_) | Scenario::ClusterIdle(_) => {
            unreachable!("handled in main")
        }
    };
    drop(server);
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every run `all` plans parses into its scenario's options (a typo would fail only
    /// minutes into a full run otherwise).
    #[test]
    fn every_planned_run_parses() {
        for quick in [true, false] {
            for (name, args) in planned_runs(quick) {
                let parsed = match name {
                    "rest-write" => options::<rest::WriteOptions>(&args).map(drop),
                    "ws-write" => options::<wswrite::WsWriteOptions>(&args).map(drop),
                    "fanout" => options::<fanout::FanoutOptions>(&args).map(drop),
                    "idle-sockets" => options::<idle::IdleOptions>(&args).map(drop),
                    "catch-up" => options::<catchup::CatchUpOptions>(&args).map(drop),
                    "agent-turns" => options::<turns::TurnsOptions>(&args).map(drop),
                    other => panic!("all plans an unknown scenario {other}"),
                };
                assert!(parsed.is_ok(), "{name} {args:?}: {parsed:?}");
            }
        }
        let quick: wswrite::WsWriteOptions = options(&["--seconds", "2", "--half-load"]).expect("parses");
        assert_eq!((quick.seconds, quick.half_load, quick.sessions), (2, true, 64));
    }
}
