//! What Cairn's three daemons (`cairn-volmgr`, `cairn-chunkserver`,
//! `cairn-target`) share:
//!
//! - [`Fatal`] and the exit codes: 2 ([`EXIT_CONFIG`]) when the
//!   configuration or the data directory is wrong, so that a restart cannot
//!   help (the systemd units set `RestartPreventExitStatus=2`); 1
//!   ([`EXIT_RUNTIME`]) for a failure while running; 0 after a clean stop.
//! - [`init_tracing`]: log lines on stderr, as text or for the journal.
//! - [`notify`]: the systemd notification protocol (`Type=notify`): READY,
//!   STOPPING, STATUS and a watchdog tied to a liveness check. Everything
//!   there is a no-op when the process was not started by systemd (no
//!   `NOTIFY_SOCKET`).

pub mod config_check;
pub mod notify;

use std::fmt;
use std::io::IsTerminal;
use std::process::ExitCode;

use clap::ValueEnum;
use serde::Deserialize;
use tracing_subscriber::EnvFilter;

/// The configuration or the data directory is wrong; a restart will not fix it.
pub const EXIT_CONFIG: u8 = 2;
/// Something failed while running.
pub const EXIT_RUNTIME: u8 = 1;

/// What ends a daemon with an error: a one-paragraph message and the exit
/// status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fatal {
    pub code: u8,
    pub message: String,
}

impl Fatal {
    /// A configuration or data-directory error (exit status 2).
    pub fn config(message: impl Into<String>) -> Self {
        Fatal {
            code: EXIT_CONFIG,
            message: message.into(),
        }
    }

    /// A failure while running (exit status 1).
    pub fn runtime(message: impl Into<String>) -> Self {
        Fatal {
            code: EXIT_RUNTIME,
            message: message.into(),
        }
    }
}

impl fmt::Display for Fatal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Turns a daemon's outcome into its exit status. The error goes to stderr
/// as a plain line rather than a log line, so that it reaches the operator
/// even when the log filter or format is what is wrong; under systemd it is
/// also the unit's last STATUS= (shown by `systemctl status`).
pub fn exit(program: &str, result: Result<(), Fatal>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(fatal) => {
            eprintln!("{program}: error: {}", fatal.message);
            notify::status(&format!("error: {}", fatal.message));
            ExitCode::from(fatal.code)
        }
    }
}

/// How log lines are written to stderr (`--log-format`, `log_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Timestamp, level, target and message (colours only on a terminal).
    #[default]
    Text,
    /// No timestamp and no colours: journald stamps every line itself.
    Journal,
}

/// Installs the process's logger: lines on stderr (the journal under
/// systemd), filtered by `level` (`--log-level`, tracing's EnvFilter
/// syntax). RUST_LOG, when set, wins over `level`, as it does for every
/// tracing-based program. A bad filter is a configuration error.
pub fn init_tracing(level: &str, format: LogFormat) -> Result<(), Fatal> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(value) if !value.trim().is_empty() => EnvFilter::try_new(&value)
            .map_err(|e| Fatal::config(format!("invalid RUST_LOG={value:?}: {e}")))?,
        _ => EnvFilter::try_new(level).map_err(|e| {
            Fatal::config(format!(
                "invalid log_level {level:?} (--log-level / log_level): {e}"
            ))
        })?,
    };
    let ansi = format == LogFormat::Text
        && std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Journal => builder.without_time().try_init(),
    };
    installed.map_err(|e| Fatal::runtime(format!("cannot install the logger: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fatal_codes() {
        assert_eq!(Fatal::config("x").code, 2);
        assert_eq!(Fatal::runtime("x").code, 1);
        assert_eq!(Fatal::config("bad key").to_string(), "bad key");
    }

    #[test]
    fn log_format_parses_from_toml_and_flags() {
        #[derive(Deserialize)]
        struct F {
            log_format: LogFormat,
        }
        let f: F = toml::from_str("log_format = \"journal\"").expect("parses");
        assert_eq!(f.log_format, LogFormat::Journal);
        assert!(toml::from_str::<F>("log_format = \"json\"").is_err());
        assert_eq!(LogFormat::from_str("text", false).unwrap(), LogFormat::Text);
        assert!(LogFormat::from_str("json", false).is_err());
    }

    #[test]
    fn a_bad_filter_is_a_configuration_error() {
        if std::env::var_os("RUST_LOG").is_some() {
            return; // RUST_LOG wins over the argument
        }
        let err = init_tracing("info,[", LogFormat::Text).unwrap_err();
        assert_eq!(err.code, EXIT_CONFIG);
        assert!(err.message.contains("--log-level"), "{err}");
    }
}
