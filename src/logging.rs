//! Logging: application logs and the access log, written by a background
//! thread so a worker thread never blocks on a slow terminal, file or pipe.
//! When the writer falls behind, lines are dropped and counted
//! (`cellgate_log_dropped_lines_total`), never queued without bound.
//! Output that is not a terminal carries no ANSI colour codes.
//!
//! pingora logs some client misbehaviour at ERROR or WARN from places that
//! have no hook to quiet them (a head that fails to read, an answer that
//! cannot be sent to a client that left). [`ClientNoise`] turns those into
//! DEBUG lines under `cellgate::client`: a client must not be able to fill
//! the error log. cellgate counts them itself
//! (`cellgate_client_errors_total`, `cellgate_client_timeouts_total`).

use std::{io::IsTerminal, path::PathBuf, sync::Arc};

use tracing::{field::Field, Event, Level, Subscriber};
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_log::NormalizeEvent;
use tracing_subscriber::{
    filter::filter_fn, fmt, layer::Context, layer::SubscriberExt, util::SubscriberInitExt, EnvFilter, Layer,
};

/// Where the access log goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccessLog {
    /// With the other logs, on standard error (the default).
    Stderr,
    /// Appended to this file.
    File(PathBuf),
    Off,
}

impl std::str::FromStr for AccessLog {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "stderr" | "on" => Self::Stderr,
            "off" => Self::Off,
            "" => return Err("expected `stderr`, `off` or a file path".into()),
            path => Self::File(PathBuf::from(path)),
        })
    }
}

/// Text or JSON lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

/// Keeps the writer threads alive (dropping it flushes them) and counts
/// dropped lines.
pub struct Logging {
    _guards: Vec<WorkerGuard>,
    counters: Vec<ErrorCounter>,
}

impl std::fmt::Debug for Logging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Logging({} writers)", self._guards.len())
    }
}

impl Logging {
    /// Lines dropped so far because a writer fell behind.
    pub fn dropped(&self) -> u64 {
        self.counters.iter().map(|c| c.dropped_lines() as u64).sum()
    }

    /// A shareable reader of [`Logging::dropped`].
    pub fn dropped_counter(self: &Arc<Self>) -> Arc<dyn Fn() -> u64 + Send + Sync> {
        let me = self.clone();
        Arc::new(move || me.dropped())
    }
}

/// Lines buffered per writer before new ones are dropped.
const BUFFERED_LINES: usize = 64 * 1024;

const ACCESS: &str = "cellgate::access";

fn layer<S>(
    format: Format,
    writer: tracing_appender::non_blocking::NonBlocking,
    ansi: bool,
) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let base = fmt::layer().with_writer(writer).with_ansi(ansi);
    match format {
        Format::Text => base.boxed(),
        Format::Json => base.json().boxed(),
    }
}

/// Vetoes pingora's WARN and ERROR lines about clients and logs them
/// again at DEBUG (target `cellgate::client`).
#[derive(Debug, Default)]
pub struct ClientNoise;

/// What pingora says when the client, not the cell or the proxy, is at
/// fault: its errors print their source (`Downstream ...`), cellgate's
/// connection wrapper marks its own (`cellgate: ...`), and a few messages
/// name the downstream side or the client's framing.
pub fn is_client_noise(target: &str, level: Level, message: &str) -> bool {
    target.starts_with("pingora")
        && level <= Level::WARN
        && ["Downstream", "downstream", "cellgate: ", "content-length"]
            .iter()
            .any(|needle| message.contains(needle))
}

#[derive(Default)]
struct Message(String);

impl tracing::field::Visit for Message {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            use std::fmt::Write as _;
            let _ = write!(self.0, "{value:?}");
        }
    }
}

impl<S: Subscriber> Layer<S> for ClientNoise {
    fn event_enabled(&self, event: &Event<'_>, _ctx: Context<'_, S>) -> bool {
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        if !meta.target().starts_with("pingora") || *meta.level() > Level::WARN {
            return true;
        }
        let mut msg = Message::default();
        event.record(&mut msg);
        if !is_client_noise(meta.target(), *meta.level(), &msg.0) {
            return true;
        }
        // The global dispatcher takes no re-entrancy guard: this line is
        // delivered (and filtered by RUST_LOG like any other).
        tracing::debug!(target: "cellgate::client", origin = meta.target(), "{}", msg.0);
        false
    }
}

/// Installs the global subscriber. `RUST_LOG` overrides the default
/// filter (`info`, pingora and hickory at `warn`).
pub fn init(format: Format, access: &AccessLog) -> std::io::Result<Logging> {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,pingora_core=warn,pingora_proxy=warn,hickory_server=warn"));
    let builder = || {
        NonBlockingBuilder::default()
            .lossy(true)
            .buffered_lines_limit(BUFFERED_LINES)
    };
    let ansi = std::io::stderr().is_terminal();
    let (stderr, stderr_guard) = builder().thread_name("cellgate-log").finish(std::io::stderr());
    let mut guards = vec![stderr_guard];
    let mut counters = vec![stderr.error_counter()];
    let to_stderr = match access {
        AccessLog::Stderr => true,
        AccessLog::File(_) | AccessLog::Off => false,
    };
    let app = layer(format, stderr, ansi).with_filter(filter_fn(move |m| to_stderr || m.target() != ACCESS));
    let access_layer = match access {
        AccessLog::File(path) => {
            let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
            let (w, g) = builder().thread_name("cellgate-access-log").finish(file);
            counters.push(w.error_counter());
            guards.push(g);
            Some(layer(format, w, false).with_filter(filter_fn(|m| m.target() == ACCESS)))
        }
        AccessLog::Stderr | AccessLog::Off => None,
    };
    tracing_subscriber::registry()
        .with(ClientNoise)
        .with(filter)
        .with(app)
        .with(access_layer)
        .try_init()
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(Logging {
        _guards: guards,
        counters,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_pingora_lines_about_clients_are_noise() {
        let down = "Fail to proxy: Downstream ReadError context: while reading request headers";
        assert!(is_client_noise("pingora_proxy", Level::ERROR, down));
        assert!(is_client_noise(
            "pingora_proxy",
            Level::ERROR,
            "failed to send error response to downstream: x"
        ));
        assert!(!is_client_noise(
            "pingora_proxy",
            Level::ERROR,
            "Fail to proxy: Upstream ConnectRefused"
        ));
        assert!(!is_client_noise("cellgate::edge", Level::ERROR, down), "only pingora's");
        assert!(
            !is_client_noise("pingora_proxy", Level::INFO, down),
            "WARN and ERROR only"
        );
    }
}
