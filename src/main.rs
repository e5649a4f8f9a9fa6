//! `lakeguard`: configuration, telemetry and wiring only; everything else is in the library.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use lakeguard::app::App;
use lakeguard::cli::{drain_text, snapshot_text, Bar, Cli, Command, Output, RestoreFrom};
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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
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
            let invalid = e
                .downcast_ref::<OpError>()
                .is_some_and(|e| matches!(e, OpError::InvalidInput(_)));
            ExitCode::from(if invalid { 2 } else { 1 })
        }
    }
}

async fn run(command: Command, settings: Settings) -> anyhow::Result<ExitCode> {
    let port = settings.port;
    let app = App::new(settings).context("building storage clients")?;
    match command {
        Command::Serve => {
            let port = port
                .context("FUNCTIONS_CUSTOMHANDLER_PORT is not set (the Functions host sets it)")?;
            lakeguard::handler::serve(app, port)
                .await
                .context("serving")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Snapshot {
            container,
            prefix,
            full,
            drain,
            output,
        } => {
            if drain {
                // Requests go straight to the drain beside the producer (no queue round trip),
                // as in `reconcile --drain`; see `ops::snapshot::record_batch_unless_handed_off`.
                let app = backlog_limited(app).with_handoff();
                let (bar, dbar) = Bar::pair("snapshot", "backup", output);
                let run =
                    ops::snapshot::run_with(&app, &container, prefix.as_deref(), full, bar.clone());
                let (report, drained) =
                    ops::backup::drain_alongside(&app, &app.queue, dbar.clone(), run).await;
                bar.finish();
                dbar.finish();
                let (report, drained) = (report?, drained?);
                let both = serde_json::json!({ "snapshot": report, "backup": drained });
                print(output, &both, || {
                    format!("{}\n{}", snapshot_text(&report), drain_text(&drained))
                });
                return Ok(exit(report.is_complete() && drained.is_complete()));
            }
            let bar = Bar::new("snapshot", output);
            let report =
                ops::snapshot::run_with(&app, &container, prefix.as_deref(), full, bar.clone())
                    .await?;
            bar.finish();
            print(output, &report, || snapshot_text(&report));
            Ok(exit(report.is_complete()))
        }
        Command::Backup {
            drain,
            queue,
            output,
        } => {
            anyhow::ensure!(
                drain,
                "`lakeguard backup` needs --drain (process the queue until it is empty)"
            );
            let queue = match queue {
                Some(name) => {
                    lakeguard::settings::validate_queue_name(&name)
                        .map_err(OpError::InvalidInput)?;
                    app.clients.backup_queue(&app.settings.jobs, &name)?
                }
                None => app.queue.clone(),
            };
            let bar = Bar::new("backup", output);
            let report = ops::backup::drain(&app, &queue, bar.clone()).await?;
            bar.finish();
            print(output, &report, || drain_text(&report));
            Ok(exit(report.is_complete()))
        }
        Command::Restore {
            container,
            prefix,
            at,
            from,
            to_account,
            to_container,
            undo,
            dry_run,
            force,
            output,
        } => {
            if let Some(id) = undo {
                let req = ops::restore::undo::UndoRequest {
                    id,
                    container,
                    dry_run,
                    force,
                };
                let bar = Bar::new("undo", output);
                let report = ops::restore::undo::run(&app, &req, bar.clone()).await?;
                bar.finish();
                print(output, &report, || lakeguard::cli::undo_text(&report));
                return Ok(if report.refused.is_some() {
                    ExitCode::from(3)
                } else if !report.executed || report.is_complete() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                });
            }
            let (Some(container), Some(at)) = (container, at) else {
                return Err(OpError::InvalidInput(
                    "restore needs --container and --at (or --undo <id>)".into(),
                )
                .into());
            };
            let at = lakeguard::model::metadata::parse_time(&at).ok_or_else(|| {
                OpError::InvalidInput(format!(
                    "--at `{at}` is not an RFC 3339 time (e.g. 2026-11-22T03:00:00Z)"
                ))
            })?;
            let mut req = ops::restore::RestoreRequest::new(container.clone(), at);
            req.prefix = prefix.filter(|p| !p.is_empty());
            req.from = match from {
                RestoreFrom::Backup => lakeguard::core::restore::HistoryFrom::Backup,
                RestoreFrom::BackupOnly => lakeguard::core::restore::HistoryFrom::BackupOnly,
                RestoreFrom::Snapshots => lakeguard::core::restore::HistoryFrom::SourceSnapshots,
            };
            req.dry_run = dry_run;
            req.force = force;
            if to_account.is_some() || to_container.is_some() {
                let store = match &to_account {
                    Some(a) => {
                        let conn = lakeguard::settings::named_connection(a)
                            .map_err(|e| OpError::InvalidInput(e.to_string()))?;
                        app.clients.blob_store(&conn)?
                    }
                    None => app.source.clone(),
                };
                req.to = Some(ops::restore::TargetSpec {
                    store,
                    container: to_container.unwrap_or(container),
                });
            }
            let bar = Bar::new("restore", output);
            let report = ops::restore::run(&app, &req, bar.clone()).await?;
            bar.finish();
            print(output, &report, || lakeguard::cli::restore_text(&report));
            Ok(if report.refused.is_some() {
                ExitCode::from(3)
            } else if !report.executed || report.is_complete() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Verify {
            container,
            deep,
            history,
            sample,
            restore_drill,
            output,
        } => {
            if restore_drill {
                let bar = Bar::new("drill", output);
                let report = ops::verify::drill(
                    &app,
                    container.as_deref(),
                    sample.unwrap_or(5),
                    bar.clone(),
                )
                .await?;
                bar.finish();
                print(output, &report, || lakeguard::cli::drill_text(&report));
                return Ok(if report.is_ok() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                });
            }
            let container = container.ok_or_else(|| {
                OpError::InvalidInput("verify needs --container (or --restore-drill)".into())
            })?;
            let bar = Bar::new("verify", output);
            let opts = ops::verify::VerifyOptions {
                deep,
                history,
                sample,
            };
            let report = ops::verify::run_with(&app, &container, &opts, bar.clone()).await?;
            bar.finish();
            print(output, &report, || lakeguard::cli::verify_text(&report));
            Ok(if report.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Prune {
            container,
            dry_run,
            max_delete,
            keep,
            keep_source,
            tombstone_retention,
            output,
        } => {
            let mut policy = app.settings.retention.clone();
            let parse =
                |t: &str| lakeguard::core::retention::Keep::parse(t).map_err(OpError::InvalidInput);
            if let Some(k) = keep {
                policy.backup = parse(&k)?;
            }
            if let Some(k) = keep_source {
                policy.source_snapshots = parse(&k)?;
            }
            if let Some(t) = tombstone_retention {
                policy.tombstone_retention = if t.trim().eq_ignore_ascii_case("none") {
                    None
                } else {
                    Some(
                        lakeguard::core::retention::parse_duration(&t)
                            .map_err(OpError::InvalidInput)?,
                    )
                };
            }
            let opts = ops::prune::PruneOptions {
                container,
                dry_run,
                max_delete,
                policy: Some(policy),
            };
            let bar = Bar::new("prune", output);
            let report = ops::prune::run(&app, &opts, bar.clone()).await?;
            bar.finish();
            print(output, &report, || lakeguard::cli::prune_text(&report));
            Ok(if report.refused.is_some() {
                ExitCode::from(3)
            } else if report.is_complete() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Reconcile {
            container,
            dry_run,
            budget_secs,
            continuations,
            drain,
            output,
        } => {
            let mut drained = None;
            let report = if continuations {
                ops::reconcile::drain_continuations(&app).await?
            } else {
                let opts = ops::reconcile::RunOptions {
                    container,
                    dry_run,
                    budget: budget_secs.map(std::time::Duration::from_secs),
                };
                if drain {
                    let app = backlog_limited(app.clone()).with_handoff();
                    let (bar, dbar) = Bar::pair("reconcile", "backup", output);
                    let run = ops::reconcile::run(&app, &opts, bar.clone());
                    let (report, d) =
                        ops::backup::drain_alongside(&app, &app.queue, dbar.clone(), run).await;
                    bar.finish();
                    dbar.finish();
                    drained = Some(d?);
                    report?
                } else {
                    let bar = Bar::new("reconcile", output);
                    let report = ops::reconcile::run(&app, &opts, bar.clone()).await?;
                    bar.finish();
                    report
                }
            };
            if let Some(d) = drained {
                let both = serde_json::json!({ "reconcile": report, "backup": d });
                print(output, &both, || {
                    format!("{}\n{}", report.summary(), drain_text(&d))
                });
                return Ok(exit(report.errors == 0 && d.is_complete()));
            }
            print(output, &report, || {
                let errors: String = report
                    .error_list
                    .iter()
                    .map(|f| {
                        format!(
                            "\n  error: {}/{}: {}",
                            f.container,
                            f.blob.as_deref().unwrap_or(""),
                            f.error
                        )
                    })
                    .collect();
                format!("{}{errors}", report.summary())
            });
            Ok(if report.errors == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Usage {
            container,
            changed_percent,
            output,
        } => {
            let opts = ops::usage::UsageOptions {
                container,
                changed_percent,
            };
            let report = ops::usage::run(&app, &opts).await?;
            print(output, &report, || ops::usage::text(&report));
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo => {
            println!("{}", ops::demo::run(&app).await?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `--drain`: the producer stays at most 32 batches of the worker's concurrency ahead.
fn backlog_limited(app: App) -> App {
    let limit = app.settings.concurrency * 32;
    app.with_backlog_limit(limit)
}

fn exit(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn print<T: serde::Serialize>(output: Output, value: &T, text: impl FnOnce() -> String) {
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(value).unwrap_or_default()
        ),
        Output::Text => println!("{}", text()),
    }
}
