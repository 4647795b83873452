//! The `sensorgate` command: `serve` (the default), `token`, `config`. Thin: it parses flags,
//! loads the configuration (exit 64 when it is invalid) and hands over to the library.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

use sensorgate::auth::{self, Role};
use sensorgate::config::{Config, Durability, Overrides};

/// Exit status for an unusable configuration (sysexits' EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "sensorgate",
    version,
    about = "Real-time WebSocket gateway for sensor readings"
)]
struct Cli {
    /// TOML configuration file (every key is listed in deploy/sensorgate.toml).
    #[arg(long, global = true, env = "SENSORGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, global = true)]
    listen: Option<std::net::SocketAddr>,
    /// Directory for the store, the token secret and the demo developer [default: ./data].
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// "strict" (dispatch after fsync) or "fast" (dispatch after append) [default: strict].
    #[arg(long, global = true)]
    durability: Option<Durability>,
    /// Log JSON lines instead of text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the default).
    Serve,
    /// Mint a token offline, for scripts; the server must share this config and data dir.
    Token {
        /// Developer id [default: the only configured developer, or the demo developer].
        #[arg(long)]
        developer: Option<String>,
        /// "user" (producer, needs --user), "employee" (a user counted as seed 002's staff,
        /// needs --user) or "developer" (consumer).
        #[arg(long, default_value = "developer")]
        role: String,
        /// The user id, for --role user or employee.
        #[arg(long)]
        user: Option<String>,
    },
    /// Print the effective configuration (secrets masked).
    Config,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let overrides = Overrides {
        listen: cli.listen,
        data_dir: cli.data_dir.clone(),
        durability: cli.durability,
        log_json: cli.log_json.then_some(true),
    };
    let config = match Config::load(cli.config.as_deref(), &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sensorgate: invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(config),
        Command::Token {
            developer,
            role,
            user,
        } => token(&config, developer, &role, user),
        Command::Config => {
            print!("{}", config.to_toml_masked());
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sensorgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SENSORGATE_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .init();
    }
}

fn serve(config: Config) -> anyhow::Result<()> {
    init_logging(config.log_json);
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if config.worker_threads > 0 {
        runtime.worker_threads(config.worker_threads);
    }
    let runtime = runtime
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async move {
        let server = sensorgate::Server::start(config.clone()).await?;
        if let Some(demo) = &server.demo {
            print_demo(&config, demo, server.local_addr(), server.demo_created);
        }
        server.run_until_signal().await;
        Ok(())
    })
}

/// Tells how to use the demo developer. The key itself is printed only when it was just
/// created: logs are kept and shipped, and a secret belongs in its file (mode 0600).
fn print_demo(
    config: &Config,
    demo: &sensorgate::config::DeveloperConfig,
    addr: std::net::SocketAddr,
    created: bool,
) {
    let file = auth::demo_path(&config.data_dir);
    let key = if created {
        demo.api_key.clone().unwrap_or_default()
    } else {
        "$KEY".to_owned()
    };
    if created {
        println!(
            "No developers configured: created the demo developer.\n  dev-id:  {}\n  api-key: {key}   (kept in {}; printed this once)",
            demo.id,
            file.display(),
        );
    } else {
        println!(
            "No developers configured: serving the demo developer {} (its api-key is in {}).\n  KEY=$(sed -n 's/^api_key = \"\\(.*\\)\"$/\\1/p' {})",
            demo.id,
            file.display(),
            file.display(),
        );
    }
    println!(
        "  Consumer token:  curl -s -X POST -H 'dev-id: {}' -H \"x-api-key: {key}\" http://{addr}/auth/developer\n  \
         Producer token:  curl -s -X POST -H 'dev-id: {}' -H \"x-api-key: {key}\" 'http://{addr}/auth/user?id=user-1'\n  \
         Then open ws://{addr}/connect and IDENTIFY (see README.md).",
        demo.id, demo.id,
    );
}

fn token(
    config: &Config,
    developer: Option<String>,
    role: &str,
    user: Option<String>,
) -> anyhow::Result<()> {
    let (role, employee) = match role {
        "user" => (Role::User, false),
        "employee" => (Role::User, true),
        "developer" => (Role::Developer, false),
        other => {
            anyhow::bail!("--role must be \"user\", \"employee\" or \"developer\", not {other:?}")
        }
    };
    let secret = match &config.token_secret {
        Some(s) => s.as_bytes().to_vec(),
        None => {
            std::fs::create_dir_all(&config.data_dir)
                .with_context(|| format!("creating {}", config.data_dir.display()))?;
            auth::load_or_create_secret(&config.data_dir).context("reading the token secret")?
        }
    };
    let developers = if config.developers.is_empty() {
        std::fs::create_dir_all(&config.data_dir)?;
        vec![
            auth::load_or_create_demo(&config.data_dir)
                .context("reading the demo developer")?
                .0,
        ]
    } else {
        config.developers.clone()
    };
    let developer = match developer {
        Some(d) => d,
        None if developers.len() == 1 => developers[0].id.clone(),
        None => anyhow::bail!("several developers are configured: pass --developer"),
    };
    let auth = auth::Auth::new(&developers, &secret, config.token_ttl_s);
    let token = match (employee, user.as_deref()) {
        (true, Some(user)) => auth.mint_employee(&developer, user),
        (true, None) => anyhow::bail!("--role employee needs --user"),
        (false, user) => auth.mint(&developer, role, user),
    }
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("{token}");
    Ok(())
}
