//! Tracing set-up. The Functions host logs the handler's stdout at Information and stderr at
//! Error, so `serve` logs to stdout; terminal commands log to stderr and keep stdout for results.
//!
//! Secrets never reach a log: connection settings redact keys in `Debug`, SAS tokens travel only
//! inside request URLs that we never log, and errors name operations and blobs, not URLs.

use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::EnvFilter;

use crate::settings::LogFormat;

pub fn init(filter: &str, format: LogFormat, to_stdout: bool) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let writer = if to_stdout { BoxMakeWriter::new(std::io::stdout) } else { BoxMakeWriter::new(std::io::stderr) };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer).with_target(false);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
        LogFormat::Text => builder.with_ansi(!to_stdout && std::io::IsTerminal::is_terminal(&std::io::stderr())).try_init(),
    };
}
