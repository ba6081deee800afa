//! Log output through `tracing`: human-readable on a terminal, compact
//! lines otherwise, one JSON object per line for shippers, or native
//! journal entries. Filtering follows `RUST_LOG` (default `info`, with
//! sqlx's notices at `warn`). Logs go to stderr (or the journal) so a
//! command's own output on stdout stays machine-readable.
//!
//! In the journal every field is a journal field of its own, upper-cased:
//! a run's span gives each of its lines `RUN_ID`, `CONNECTION`,
//! `CONNECTOR`, `TRIGGER` and `ATTEMPT`, and events carry `EVENT`, so
//! `journalctl -u connectord RUN_ID=42` finds one run's lines. Values go
//! through the journal's length-prefixed protocol, so a connector's output
//! cannot forge a field or an entry.

use std::io::IsTerminal;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    /// Pretty on a terminal, compact otherwise.
    Auto,
    /// Human-readable lines, coloured on a terminal.
    Pretty,
    /// One line per event, for a file.
    Compact,
    /// One JSON object per line, for log shippers.
    Json,
    /// Native journal entries with fields (RUN_ID, CONNECTION, EVENT, ...);
    /// JSON on stderr when there is no journal socket.
    Journald,
}

fn filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"))
}

pub(crate) fn init(format: LogFormat) {
    let format = match format {
        LogFormat::Auto if std::io::stderr().is_terminal() => LogFormat::Pretty,
        LogFormat::Auto => LogFormat::Compact,
        other => other,
    };
    if format == LogFormat::Journald {
        match journald() {
            Ok(layer) => {
                // A second initialisation (tests) is harmless.
                let _ = tracing_subscriber::registry()
                    .with(filter())
                    .with(layer)
                    .try_init();
                return;
            }
            Err(e) => {
                init_fmt(LogFormat::Json);
                tracing::warn!(
                    "no journal to write to ({e} at /run/systemd/journal/socket); \
                     logging JSON lines to stderr instead"
                );
                return;
            }
        }
    }
    init_fmt(format);
}

/// The native journal writer, with fields named as they are logged (no
/// prefix) and levels mapped as syslog reads them.
fn journald() -> std::io::Result<tracing_journald::Layer> {
    use tracing_journald::{Priority, PriorityMappings};
    Ok(tracing_journald::layer()?
        .with_field_prefix(None)
        .with_syslog_identifier("connectord".to_owned())
        .with_priority_mappings(PriorityMappings {
            info: Priority::Informational,
            debug: Priority::Debug,
            ..PriorityMappings::new()
        }))
}

fn init_fmt(format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr);
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
