//! `api serve` | `api migrate` | `api token --user-email E` | `api usage [--org ID] [--since DAY]`
//! — the Switchboard HTTP API process and its operator commands. (Conversation memory is
//! managed with `worker memory ...`: adding an entry embeds it, and the API never calls a model.)

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "api", version, about = "Switchboard HTTP API")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API on API_ADDR until SIGTERM/Ctrl-C.
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Print a bearer token for a user (operators); the token is the only thing on stdout.
    Token {
        /// The user's email address.
        #[arg(long)]
        user_email: String,
    },
    /// Print token usage per day, org and model (every model call of the workers) and totals;
    /// with `--org`, also what that org's token budget has left.
    Usage {
        /// Only this organization (default: all).
        #[arg(long, value_name = "ORG_ID")]
        org: Option<uuid::Uuid>,
        /// The first day (UTC) to include (default: 30 days ago).
        #[arg(long, value_name = "YYYY-MM-DD", value_parser = api::usage_report::parse_day)]
        since: Option<chrono::NaiveDate>,
    },
}

/// `api usage` without `--since` starts this many days ago.
const USAGE_DEFAULT_DAYS: u64 = 30;

// (`docs/bench-bus.md`: the allocator was a quarter of a job's CPU with glibc's malloc)
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match config::Settings::load() {
        Ok(s) => s,
        Err(e) => {
            #[allow(clippy::print_stderr)]
            {
                eprintln!("api: {e}");
            }
            return ExitCode::from(2);
        }
    };
    jobs::telemetry::init_tracing(&settings.log);
    match run(cli.command, settings).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "api failed");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, settings: config::Settings) -> anyhow::Result<()> {
    match command {
        Command::Serve => {
            let stop_signal = jobs::telemetry::shutdown_signal();
            api::server::raise_open_files_limit();
            let app = api::Application::build(settings).await?;
            let shutdown = CancellationToken::new();
            let signal = shutdown.clone();
            tokio::spawn(async move {
                stop_signal.await;
                tracing::info!("shutdown requested");
                signal.cancel();
            });
            app.run_until_stopped(shutdown).await?;
            tracing::info!("api stopped");
            Ok(())
        }
        Command::Token { user_email } => {
            let keys = api::auth::JwtKeys::from_settings(&settings)?;
            let pool = store::pool(&settings.database)?;
            let (user, org_id) = store::tenancy::find_user_by_email(&pool, &user_email)
                .await?
                .ok_or_else(|| anyhow::anyhow!("no user with email {user_email:?}"))?;
            let (token, expires_at) = keys
                .issue(user.id.into(), org_id.into())
                .map_err(|e| anyhow::anyhow!("cannot issue a token: {e}"))?;
            tracing::info!(user_id = %user.id, %org_id, %expires_at, "token issued");
            use std::io::Write as _;
            let mut out = std::io::stdout().lock();
            writeln!(out, "{token}")?;
            out.flush()?;
            Ok(())
        }
        Command::Usage { org, since } => {
            let since = since.unwrap_or_else(|| {
                chrono::Utc::now().date_naive() - chrono::Days::new(USAGE_DEFAULT_DAYS)
            });
            let pool = store::pool(&settings.database)?;
            let rows = store::usage::report(&pool, org.map(Into::into), since).await?;
            let mut table = api::usage_report::render(&rows);
            // one org: what its budget has left
            if let Some(org) = org {
                let policy = store::budgets::Policy::from_settings(&settings.budget);
                let now = chrono::Utc::now();
                let mut conn = pool.acquire().await?;
                let standing =
                    store::budgets::standing(&mut conn, &policy, org.into(), now).await?;
                table.push('\n');
                table.push_str(&api::usage_report::render_budget(&standing, now));
            }
            // A locked writer rather than `println!`: a closed pipe (`api usage | head`) is an
            // error to report, not a panic.
            use std::io::Write as _;
            let mut out = std::io::stdout().lock();
            out.write_all(table.as_bytes())?;
            out.flush()?;
            Ok(())
        }
        Command::Migrate => {
            let pool = store::pool(&settings.database)?;
            store::migrate_with_vector_index(&pool, settings.embedding.dim).await?;
            tracing::info!("migrations applied");
            Ok(())
        }
    }
}
