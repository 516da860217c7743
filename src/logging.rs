//! Logging: takes `log.format` and `log.level` (after flags and env), refuses a level that would
//! silently log something else than asked, and hands `run` a handle that swaps both on SIGHUP.

use std::io::IsTerminal;
use std::str::FromStr;

use tracing::level_filters::LevelFilter;
use tracing_subscriber::layer::{Layered, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

use serde::{Deserialize, Serialize};

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Why a log setting was refused.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The level is not a filter haconfd would apply as written.
    #[error("invalid log level {value:?} in {origin}: {reason}")]
    Level {
        /// The value as given.
        value: String,
        /// Where it came from: `--log-level`, `HACONFD_LOG_LEVEL` or `log.level`.
        origin: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The subscriber could not be installed or changed.
    #[error("cannot set up logging: {0}")]
    Subscriber(String),
}

type Filtered = Layered<reload::Layer<EnvFilter, Registry>, Registry>;
type Output = Box<dyn Layer<Filtered> + Send + Sync>;

/// The installed subscriber's handles, to apply a new `log.format` and `log.level` in place.
pub struct Logging {
    filter: reload::Handle<EnvFilter, Registry>,
    output: reload::Handle<Output, Filtered>,
}

/// Parses a level such as `info` or `info,haconfd=debug`. A bare word must be a level:
/// tracing would take `verbose` as a target name and then log nothing else, and a filter it
/// cannot parse would otherwise fall back to a default, both without a word.
pub fn parse_level(value: &str, origin: &str) -> Result<EnvFilter, LogError> {
    let refuse = |reason: String| LogError::Level {
        value: value.to_owned(),
        origin: origin.to_owned(),
        reason,
    };
    let directives: Vec<&str> = value.split(',').map(str::trim).collect();
    if directives.iter().all(|d| d.is_empty()) {
        return Err(refuse("it is empty; use e.g. info".into()));
    }
    for d in directives.iter().filter(|d| !d.is_empty()) {
        let level = d.rsplit_once('=').map_or(*d, |(_, l)| l);
        if LevelFilter::from_str(level).is_err() {
            return Err(refuse(format!(
                "{level:?} is not a level (trace, debug, info, warn, error, off); \
                 a target takes one after `=`, e.g. haconfd=debug"
            )));
        }
    }
    EnvFilter::try_new(value).map_err(|e| refuse(e.to_string()))
}

fn output(format: LogFormat) -> Output {
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => layer.json().flatten_event(true).boxed(),
        LogFormat::Text => layer.boxed(),
    }
}

impl Logging {
    /// Installs the global subscriber logging to stderr. `origin` names where `level` came from.
    pub fn init(format: LogFormat, level: &str, origin: &str) -> Result<Logging, LogError> {
        let (filter, filter_handle) = reload::Layer::new(parse_level(level, origin)?);
        let (out, output_handle) = reload::Layer::new(output(format));
        tracing_subscriber::registry()
            .with(filter)
            .with(out)
            .try_init()
            .map_err(|e| LogError::Subscriber(e.to_string()))?;
        Ok(Logging {
            filter: filter_handle,
            output: output_handle,
        })
    }

    /// Applies a new format and level (the level already checked with [`parse_level`]).
    pub fn apply(&self, format: LogFormat, filter: EnvFilter) -> Result<(), LogError> {
        self.filter
            .reload(filter)
            .map_err(|e| LogError::Subscriber(e.to_string()))?;
        self.output
            .reload(output(format))
            .map_err(|e| LogError::Subscriber(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_target_levels_are_accepted() {
        for ok in [
            "info",
            "DEBUG",
            "warn,haconfd=trace",
            "haconfd::source=debug",
            "off",
        ] {
            parse_level(ok, "log.level").unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn a_word_that_is_no_level_is_refused_naming_value_and_origin() {
        for bad in ["loud", "verbose", "haconfd=loud", "", " , ", "info,[=x"] {
            let err = parse_level(bad, "--log-level").unwrap_err().to_string();
            assert!(
                err.contains(&format!("{bad:?}")) && err.contains("--log-level"),
                "{bad:?}: {err}"
            );
        }
    }
}
