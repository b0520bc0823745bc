//! The `fleetlm` command line: `serve`, `token`. Parsing and process concerns only.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use fleetlm::config::{Config, LogFormat, Settings};
use fleetlm::logging::{print_stdout, say};

// Many small allocations cross threads on the hot path (socket task → shard writer → lane);
// mimalloc's per-thread heaps avoid glibc's arena lock contention seen in profiles.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "fleetlm", version, about = "Conversation engine for stateless AI agents")]
struct Cli {
    #[command(subcommand)]
    command: CommandLine,
}

#[derive(Subcommand)]
enum CommandLine {
    /// Run the server.
    Serve {
        /// TOML file with settings (keys as the flag names, with `_`).
        #[arg(long, env = "FLEETLM_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: Box<Settings>,
    },
    /// Operator tools for the write-ahead log (run them while the server is stopped).
    Wal {
        #[command(subcommand)]
        command: WalCommand,
    },
    /// Operator tools for an archive that went back in time (restored from an older backup).
    Archive {
        #[command(subcommand)]
        command: ArchiveCommand,
    },
    /// Cluster tools.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Mint a user or agent token (HS256 JWT) with the configured secret.
    Token {
        /// The identity the token acts as (user id or agent id).
        #[arg(long)]
        sub: String,
        /// Lifetime of the token, in seconds (at least 1).
        #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(i64).range(1..))]
        ttl_secs: i64,
        #[arg(long, env = "FLEETLM_AUTH_SECRET", hide_env_values = true)]
        auth_secret: String,
    },
}

#[derive(Subcommand)]
enum WalCommand {
    /// Describe every lane: segments, each shard's entries, and any damage with its exact
    /// position. Read-only. Exits 1 if damage was found.
    Inspect {
        #[arg(long, env = "FLEETLM_DATA_DIR", default_value = "./fleetlm-data")]
        data_dir: PathBuf,
    },
    /// Accept the loss of a degraded shard's damaged entries (see `wal inspect`): the shard
    /// serves again from its next start, and every one of its sessions skips (never reuses) the
    /// seqs the lost entries could have held. The server must be stopped.
    Repair {
        #[arg(long, env = "FLEETLM_DATA_DIR", default_value = "./fleetlm-data")]
        data_dir: PathBuf,
        /// A degraded shard whose damaged entries to give up (repeat for several).
        #[arg(long = "shard", required = true)]
        shards: Vec<u16>,
    },
}

#[derive(Subcommand)]
enum ArchiveCommand {
    /// Per shard, what the WAL says the archive was given against what the archive holds.
    /// Read-only. Exits 1 if the archive holds less for any shard.
    Check {
        #[arg(long, env = "FLEETLM_DATA_DIR", default_value = "./fleetlm-data")]
        data_dir: PathBuf,
        /// The Postgres archive (unset: the data directory's SQLite archive).
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: Option<String>,
    },
    /// Give up the log entries an archive that went back in time lost: the shards write again
    /// from their next start, and their sessions skip (never reuse) the seqs those entries
    /// could have held. The server must be stopped.
    Accept {
        #[arg(long, env = "FLEETLM_DATA_DIR", default_value = "./fleetlm-data")]
        data_dir: PathBuf,
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: Option<String>,
        /// Only this shard (repeat for several; default: every shard that went back).
        #[arg(long = "shard")]
        shards: Vec<u16>,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Print the members, each shard's leader and term, and each member's lag, as any member
    /// sees them (its `/api/admin/cluster`). Exits 1 if a member is unreachable or a shard has
    /// no leader.
    Status {
        /// HTTP address of any member, e.g. http://127.0.0.1:4001
        #[arg(long)]
        url: String,
        /// The API key (token mode).
        #[arg(long, env = "FLEETLM_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// Print the raw JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// First step of replacing a member whose storage is lost (stop it first): every shard's
    /// group stops counting it and the cluster forgets it joined, so it may start again on
    /// empty storage. See docs/OPERATIONS.md, "Replacing a node".
    ForgetNode(MemberStep),
    /// Last step of replacing a member: once it runs again on empty storage, every shard's
    /// group sends it the log and counts it as a voter again. Waits until done.
    AddNode(MemberStep),
}

#[derive(clap::Args)]
struct MemberStep {
    /// HTTP address of a running member other than the one named, e.g. http://127.0.0.1:4001
    #[arg(long)]
    url: String,
    /// The member being replaced.
    #[arg(long)]
    node_id: u64,
    /// The API key (token mode).
    #[arg(long, env = "FLEETLM_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
}

/// A runtime for the commands that talk to a running server.
fn client_runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| {
            say(&format!("fleetlm: cannot start the async runtime: {error}"));
            ExitCode::FAILURE
        })
}

/// Runs a step of replacing a member and prints the answer; exit 1 if the step failed.
fn cluster_member_step(member: &MemberStep, step: &str) -> ExitCode {
    let runtime = match client_runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let MemberStep { url, node_id, api_key } = member;
    match runtime.block_on(fleetlm::cluster_status::change_member(
        url,
        api_key.as_deref(),
        *node_id,
        step,
    )) {
        Ok(answer) => {
            print_stdout(&format!("{answer:#}\n"));
            ExitCode::SUCCESS
        }
        Err(error) => {
            say(&format!("fleetlm: {error:#}"));
            ExitCode::from(1)
        }
    }
}

fn cluster_status(url: &str, api_key: Option<&str>, json: bool) -> ExitCode {
    let runtime = match client_runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    match runtime.block_on(fleetlm::cluster_status::fetch(url, api_key)) {
        Ok(status) => {
            if json {
                print_stdout(&format!("{status:#}\n"));
            } else {
                print_stdout(&fleetlm::cluster_status::render(&status));
            }
            if fleetlm::cluster_status::healthy(&status) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(error) => {
            say(&format!("fleetlm: {error:#}"));
            ExitCode::from(2)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        CommandLine::Serve { config, settings } => serve(config, *settings),
        CommandLine::Wal {
            command: WalCommand::Inspect { data_dir },
        } => match fleetlm::operator::wal_inspect(&data_dir) {
            Ok((report, damaged)) => {
                print_stdout(&report);
                if damaged { ExitCode::from(1) } else { ExitCode::SUCCESS }
            }
            Err(error) => {
                say(&format!("fleetlm: {error:#}"));
                ExitCode::from(2)
            }
        },
        CommandLine::Wal {
            command: WalCommand::Repair { data_dir, shards },
        } => match fleetlm::operator::wal_repair(&data_dir, &shards) {
            Ok(report) => {
                print_stdout(&report);
                ExitCode::SUCCESS
            }
            Err(error) => {
                say(&format!("fleetlm: {error:#}"));
                ExitCode::from(2)
            }
        },
        CommandLine::Archive {
            command: ArchiveCommand::Check { data_dir, database_url },
        } => match fleetlm::archive::check::archive_check(&data_dir, database_url.as_deref()) {
            Ok((report, consistent)) => {
                print!("{report}");
                if consistent {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                }
            }
            Err(error) => {
                eprintln!("fleetlm: {error:#}");
                ExitCode::from(2)
            }
        },
        CommandLine::Archive {
            command:
                ArchiveCommand::Accept {
                    data_dir,
                    database_url,
                    shards,
                },
        } => match fleetlm::archive::check::archive_accept(&data_dir, database_url.as_deref(), &shards) {
            Ok(report) => {
                print!("{report}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("fleetlm: {error:#}");
                ExitCode::from(2)
            }
        },
        CommandLine::Cluster {
            command: ClusterCommand::Status { url, api_key, json },
        } => cluster_status(&url, api_key.as_deref(), json),
        CommandLine::Cluster {
            command: ClusterCommand::ForgetNode(step),
        } => cluster_member_step(&step, "forget"),
        CommandLine::Cluster {
            command: ClusterCommand::AddNode(step),
        } => cluster_member_step(&step, "add"),
        CommandLine::Token {
            sub,
            ttl_secs,
            auth_secret,
        } => {
            // The same rules as `serve`: a secret `serve` would refuse mints nothing.
            let checked = Settings {
                auth_secret: Some(auth_secret.clone()),
                ..Settings::default()
            };
            if let Err(error) = checked.validate() {
                say(&format!("fleetlm: {error}"));
                return ExitCode::from(2);
            }
            if auth_secret.is_empty() {
                say("fleetlm: invalid configuration: auth_secret: must be set");
                return ExitCode::from(2);
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            let claims = fleetlm::auth::Claims {
                sub,
                exp: now.as_secs() as i64 + ttl_secs,
            };
            print_stdout(&format!("{}\n", fleetlm::auth::mint(auth_secret.as_bytes(), &claims)));
            ExitCode::SUCCESS
        }
    }
}

fn load_config(file: Option<PathBuf>, settings: Settings) -> Result<Config, fleetlm::config::ConfigError> {
    let from_file = match file {
        Some(path) => Settings::from_file(&path)?,
        None => Settings::default(),
    };
    settings.or(from_file).validate()
}

fn serve(file: Option<PathBuf>, settings: Settings) -> ExitCode {
    let config = match load_config(file, settings) {
        Ok(config) => config,
        Err(error) => {
            say(&format!("fleetlm: {error}"));
            return ExitCode::from(2);
        }
    };
    fleetlm::logging::init(config.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            say(&format!("fleetlm: cannot start the async runtime: {error}"));
            fleetlm::logging::flush(LOG_FLUSH_AT_EXIT);
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(run_server(config));
    // A blocking task that never returns (a read stuck on a dead disk) must not hold the exit.
    runtime.shutdown_timeout(RUNTIME_STOP_WAIT);
    fleetlm::logging::flush(LOG_FLUSH_AT_EXIT);
    code
}

/// How long the exit waits for the log to take its last lines, and for the runtime's tasks.
const LOG_FLUSH_AT_EXIT: Duration = Duration::from_secs(1);
const RUNTIME_STOP_WAIT: Duration = Duration::from_secs(1);
/// Past the shutdown deadline, how long the orderly path may still take before the process
/// exits regardless.
const EXIT_GRACE: Duration = Duration::from_secs(2);

async fn run_server(config: Config) -> ExitCode {
    let log_format = config.log_format;
    let shutdown_deadline = config.shutdown_deadline;
    // Listen for signals before anything else: a SIGTERM while the server starts (waiting
    // for its archive) or right after its listening line must not go unnoticed.
    let mut signals = Signals::register();
    let started = tokio::select! {
        started = fleetlm::server::start(config) => started,
        () = signals.next() => {
            say("fleetlm: signal received while starting; exiting");
            return ExitCode::from(130);
        }
    };
    let server = match started {
        Ok(server) => server,
        Err(error) => {
            say(&format!("fleetlm: {error:#}"));
            let is_config = format!("{error:#}").starts_with("invalid configuration");
            return if is_config {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            };
        }
    };
    let url = format!("http://{}", server.local_addr);
    let listening = match log_format {
        LogFormat::Text => format!("fleetlm listening on {url} (archive: {})\n", server.archive_description),
        LogFormat::Json => format!(
            "{}\n",
            serde_json::json!({"level": "INFO", "message": "fleetlm listening", "url": url,
                "archive": server.archive_description})
        ),
    };
    print_stdout(&listening);
    let trigger = server.shutdown_trigger();
    let progress = server.shutdown_progress();
    tokio::spawn(async move {
        signals.next().await;
        // First the bound, so nothing below (nor a wedged runtime) can keep the process alive.
        exit_after(shutdown_deadline + EXIT_GRACE, progress);
        let _ = trigger.send(true);
        tracing::info!("shutting down: draining requests and flushing the archive");
        signals.next().await;
        tracing::warn!("second signal, exiting now (the WAL holds every acknowledged message)");
        fleetlm::logging::flush(LOG_FLUSH_AT_EXIT);
        std::process::exit(130);
    });
    match server.wait().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            say(&format!("fleetlm: {error:#}"));
            ExitCode::FAILURE
        }
    }
}

/// Ends the process `bound` after a shutdown began if it has not ended by then, saying which
/// step was still running. A thread of its own: it must work even if the runtime does not.
fn exit_after(bound: Duration, progress: fleetlm::server::ShutdownProgress) {
    let spawned = std::thread::Builder::new()
        .name("fleetlm-exit-bound".into())
        .spawn(move || {
            std::thread::sleep(bound);
            if progress.finished() {
                // The orderly path ended; what is left of the exit is bounded on its own.
                std::thread::sleep(RUNTIME_STOP_WAIT + LOG_FLUSH_AT_EXIT);
            }
            tracing::error!(
                step = progress.current(),
                bound_ms = bound.as_millis() as u64,
                "shutdown did not finish in time; exiting now (the WAL holds every acknowledged entry; what the archive lacks is archived at the next start)"
            );
            fleetlm::logging::flush(LOG_FLUSH_AT_EXIT);
            std::process::exit(1);
        });
    if let Err(error) = spawned {
        tracing::warn!(%error, "cannot bound the shutdown's duration");
    }
}

/// SIGTERM and SIGINT, listened for from the start of the process.
struct Signals {
    terminate: Option<tokio::signal::unix::Signal>,
    interrupt: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn register() -> Signals {
        use tokio::signal::unix::{SignalKind, signal};
        Signals {
            terminate: signal(SignalKind::terminate()).ok(),
            interrupt: signal(SignalKind::interrupt()).ok(),
        }
    }

    /// The next SIGTERM or SIGINT (never, if they could not be listened for).
    async fn next(&mut self) {
        match (self.terminate.as_mut(), self.interrupt.as_mut()) {
            (Some(terminate), Some(interrupt)) => {
                tokio::select! {
                    _ = terminate.recv() => {}
                    _ = interrupt.recv() => {}
                }
            }
            _ => std::future::pending::<()>().await,
        }
    }
}
