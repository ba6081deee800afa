//! Log output through `tracing`: human-readable on a terminal, compact
//! lines otherwise, or one JSON object per line for journald and shippers.
//! Filtering follows `RUST_LOG` (default `info`, with sqlx's notices at `warn`). Logs go to stderr so a
//! command's own output on stdout stays machine-readable.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    /// Pretty on a terminal, compact otherwise.
    Auto,
    /// Human-readable lines, coloured on a terminal.
    Pretty,
    /// One line per event, for a file or journald.
    Compact,
    /// One JSON object per line, for journald and log shippers.
    Json,
}

pub(crate) fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let format = match format {
        LogFormat::Auto if std::io::stderr().is_terminal() => LogFormat::Pretty,
        LogFormat::Auto => LogFormat::Compact,
        other => other,
    };
    // A second initialisation (tests) is harmless, so its error is ignored.
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        // Colours only where a terminal shows them, not in a file or pipe.
        LogFormat::Pretty => builder
            .with_target(false)
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        _ => builder.compact().with_ansi(false).try_init(),
    };
}
