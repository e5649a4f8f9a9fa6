//! The operator's terminal: the same operations as the functions, with progress bars and
//! `--output json` for scripts.

use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use crate::ops::Progress;

#[derive(Debug, Parser)]
#[command(name = "lakeguard", version, about = "Snapshots, incremental backups and point-in-time restore for Azure Blob Storage / ADLS")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the Azure Functions custom handler on 127.0.0.1:$FUNCTIONS_CUSTOMHANDLER_PORT.
    Serve,
    /// Snapshot new or changed blobs of a container and queue backup requests (SnapshotProducer).
    Snapshot {
        #[arg(long)]
        container: String,
        #[arg(long)]
        prefix: Option<String>,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Process backup requests from the queue until it is empty (BackupWorker).
    Backup {
        /// Required: process the queue until it is empty.
        #[arg(long)]
        drain: bool,
        /// Queue name (default: $LAKEGUARD_BACKUP_QUEUE) on the AzureWebJobsStorage account.
        #[arg(long)]
        queue: Option<String>,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
}

/// A progress bar on a terminal; hidden when stderr is not one (CI, pipes, `--output json`).
pub struct Bar(ProgressBar);

impl Bar {
    pub fn new(label: &str, output: Output) -> Arc<Self> {
        let pb = if output == Output::Text && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            ProgressBar::new(0)
        } else {
            ProgressBar::hidden()
        };
        pb.set_style(
            ProgressStyle::with_template("{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        pb.set_prefix(label.to_owned());
        Arc::new(Bar(pb))
    }

    pub fn finish(&self) {
        self.0.finish_and_clear();
    }
}

impl Progress for Bar {
    fn add_total(&self, n: u64) {
        self.0.inc_length(n);
    }
    fn inc(&self, n: u64) {
        self.0.inc(n);
    }
    fn message(&self, msg: &str) {
        self.0.set_message(msg.to_owned());
    }
}
