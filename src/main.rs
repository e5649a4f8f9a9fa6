//! `lakeguard`: configuration, telemetry and wiring only; everything else is in the library.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use lakeguard::app::App;
use lakeguard::cli::{Bar, Cli, Command, Output};
use lakeguard::ops::{self, OpError};
use lakeguard::settings::Settings;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("lakeguard: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let serving = matches!(cli.command, Command::Serve);
    lakeguard::telemetry::init(&settings.log_filter, settings.log_format, serving);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lakeguard: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command, settings)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lakeguard: {e:#}");
            let invalid = e.downcast_ref::<OpError>().is_some_and(|e| matches!(e, OpError::InvalidInput(_)));
            ExitCode::from(if invalid { 2 } else { 1 })
        }
    }
}

async fn run(command: Command, settings: Settings) -> anyhow::Result<ExitCode> {
    let port = settings.port;
    let app = App::new(settings).context("building storage clients")?;
    match command {
        Command::Serve => {
            let port = port.context("FUNCTIONS_CUSTOMHANDLER_PORT is not set (the Functions host sets it)")?;
            lakeguard::handler::serve(app, port).await.context("serving")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Snapshot { container, prefix, output } => {
            let bar = Bar::new("snapshot", output);
            let report = ops::snapshot::run(&app, &container, prefix.as_deref(), bar.clone()).await?;
            bar.finish();
            print(output, &report, || {
                format!(
                    "{}: scanned {}, snapshotted {}, enqueued {}, unchanged {}, skipped {}, failed {} in {} ms{}",
                    report.container,
                    report.scanned,
                    report.snapshotted,
                    report.enqueued,
                    report.unchanged,
                    report.skipped,
                    report.failed,
                    report.elapsed_ms,
                    report.failures.iter().map(|f| format!("\n  failed: {}: {}", f.blob, f.error)).collect::<String>()
                )
            });
            Ok(if report.is_complete() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Backup { drain, queue, output } => {
            anyhow::ensure!(drain, "`lakeguard backup` needs --drain (process the queue until it is empty)");
            let queue = match queue {
                Some(name) => {
                    lakeguard::settings::validate_queue_name(&name).map_err(OpError::InvalidInput)?;
                    app.clients.backup_queue(&app.settings.jobs, &name)?
                }
                None => app.queue.clone(),
            };
            let bar = Bar::new("backup", output);
            let report = ops::backup::drain(&app, &queue, bar.clone()).await?;
            bar.finish();
            print(output, &report, || {
                format!(
                    "{}: processed {}, backed up {}, already backed up {}, superseded {}, poisoned {}, retried {} in {} ms",
                    report.queue,
                    report.processed,
                    report.backed_up,
                    report.already_backed_up,
                    report.superseded,
                    report.poisoned,
                    report.retried,
                    report.elapsed_ms
                )
            });
            Ok(if report.poisoned == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
    }
}

fn print<T: serde::Serialize>(output: Output, value: &T, text: impl FnOnce() -> String) {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(value).unwrap_or_default()),
        Output::Text => println!("{}", text()),
    }
}
