//! `leadgate` command line: parse, load configuration, initialise logging, run.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use leadgate::app::{Gateway, ServeOptions};
use leadgate::config::Settings;
use leadgate::telemetry::{self, LogFormat};

/// Each request makes many small, short-lived allocations across worker threads; mimalloc
/// serves them faster than the system allocator (see tests/bench/RESULTS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "leadgate",
    version,
    about = "Capture sales leads and deliver them to Onpipeline's Leadsin"
)]
struct Cli {
    /// Log format (also LEADGATE_LOG_FORMAT).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway: HTTP ingest and the forwarder.
    Serve {
        /// Deliver to a built-in Onpipeline simulator (HTTPS on loopback) instead of Onpipeline,
        /// and serve a demo form at / and the simulator's inbox at /sandbox.
        #[arg(long)]
        sandbox: bool,
        /// Do not run the forwarder (scale ingest separately).
        #[arg(long, conflicts_with = "no_ingest")]
        no_forwarder: bool,
        /// Do not accept leads; only deliver what is queued (health routes stay up).
        #[arg(long)]
        no_ingest: bool,
    },
    /// Run the Onpipeline simulator as a standalone HTTPS server.
    Sim(leadgate::sim::SimArgs),
    /// Load the environment and the sources file, print each source, and exit non-zero on
    /// any error.
    CheckConfig,
    /// Operate a running instance through its admin API (token: LEADGATE_ADMIN_TOKEN).
    Admin {
        /// The instance's base URL.
        #[arg(
            long,
            env = "LEADGATE_ADMIN_URL",
            default_value = "http://127.0.0.1:8080"
        )]
        url: String,
        #[command(subcommand)]
        command: leadgate::admin_client::AdminCommand,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = Settings::from_env();
    let format = cli
        .log_format
        .or_else(|| settings.as_ref().ok().map(|s| s.log_format))
        .unwrap_or_default();
    let _log_guard = telemetry::init(format);

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve {
                sandbox,
                no_forwarder,
                no_ingest,
            } => {
                let options = ServeOptions {
                    sandbox,
                    ingest: !no_ingest,
                    forwarder: !no_forwarder,
                };
                Gateway::start(settings?, options)
                    .await?
                    .run_until_signal()
                    .await
            }
            Command::Sim(args) => leadgate::sim::run(args).await,
            Command::CheckConfig => leadgate::config::check::run(&settings?),
            Command::Admin { url, command } => {
                leadgate::tls::install_default_provider();
                let token = settings?.admin_token;
                leadgate::admin_client::run(&url, token.as_ref(), command).await
            }
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
