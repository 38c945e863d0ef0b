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

use std::{fmt::Write as _, io::IsTerminal, path::PathBuf, sync::Arc};

use tracing::{field::Field, Event, Level, Subscriber};
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_log::NormalizeEvent;
use tracing_subscriber::{
    filter::filter_fn,
    fmt::{
        self,
        format::{FormatEvent, FormatFields, Writer},
        FmtContext,
    },
    layer::Context,
    layer::SubscriberExt,
    registry::LookupSpan,
    util::SubscriberInitExt,
    EnvFilter, Layer,
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
/// What a writer thread gathers into one `write`: it writes whatever lines
/// are queued, then flushes as soon as the queue is empty, so a line waits
/// no longer than before, but a busy access log costs one system call per
/// batch instead of one per line.
const WRITE_BUFFER: usize = 64 * 1024;

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
        Format::Text => base.event_format(TextLines::default()).boxed(),
        Format::Json => base.json().boxed(),
    }
}

/// tracing-subscriber's text lines, with the access line written by hand:
/// the same bytes, for a fifth of the instructions of the general
/// formatter (which styles every field name and formats every value
/// through `Debug`, 21 000 instructions a line, more than all of
/// cellgate's forwarding headers). Lines with colour, inside a span or of
/// another kind go to the general formatter.
#[derive(Debug, Default)]
struct TextLines {
    full: fmt::format::Format,
}

impl<S, N> FormatEvent<S, N> for TextLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> std::fmt::Result {
        let meta = event.metadata();
        if meta.target() != ACCESS
            || *meta.level() != Level::INFO
            || writer.has_ansi_escapes()
            || ctx.event_scope().is_some()
        {
            return self.full.format_event(ctx, writer, event);
        }
        // As `Format<Full, SystemTime>` writes it without colour.
        write!(
            writer,
            "{}  INFO {ACCESS}: ",
            humantime::format_rfc3339_micros(std::time::SystemTime::now())
        )?;
        let mut fields = AccessFields {
            w: &mut writer,
            first: true,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        writer.write_char('\n')
    }
}

/// Writes an event's fields as tracing-subscriber's `DefaultVisitor`
/// does without colour: the message as it is, then ` name=value` with
/// values as `Debug` shows them (strings quoted and escaped).
struct AccessFields<'a, 'w> {
    w: &'a mut Writer<'w>,
    first: bool,
    result: std::fmt::Result,
}

impl AccessFields<'_, '_> {
    /// The separator and `name=`; `false` when writing already failed.
    fn name(&mut self, field: &Field) -> bool {
        if self.result.is_err() {
            return false;
        }
        let name = field.name();
        let name = name.strip_prefix("r#").unwrap_or(name);
        let sep = if std::mem::take(&mut self.first) { "" } else { " " };
        self.result = self
            .w
            .write_str(sep)
            .and_then(|()| self.w.write_str(name))
            .and_then(|()| self.w.write_char('='));
        self.result.is_ok()
    }
}

impl tracing::field::Visit for AccessFields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            // Only ever a constant; anything unusual takes the slow road.
            return self.record_debug(field, &format_args!("{value}"));
        }
        if !self.name(field) {
            return;
        }
        // `Debug` of a str: quoted, with `"`, `\` and anything outside
        // printable ASCII escaped; printable ASCII passes as it is.
        self.result = if value
            .bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
        {
            self.w
                .write_char('"')
                .and_then(|()| self.w.write_str(value))
                .and_then(|()| self.w.write_char('"'))
        } else {
            write!(self.w, "{value:?}")
        };
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if !self.name(field) {
            return;
        }
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        let mut v = value;
        loop {
            at -= 1;
            digits[at] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.result = self.w.write_str(std::str::from_utf8(&digits[at..]).unwrap_or("0"));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            if self.result.is_ok() {
                let sep = if std::mem::take(&mut self.first) { "" } else { " " };
                let mut text = String::new();
                let _ = write!(text, "{value:?}");
                self.result = self.w.write_str(sep).and_then(|()| {
                    if self.w.sanitizes_ansi_escapes() {
                        escape_controls(self.w, &text)
                    } else {
                        self.w.write_str(&text)
                    }
                });
            }
            return;
        }
        if self.name(field) {
            self.result = write!(self.w, "{value:?}");
        }
    }
}

/// What tracing-subscriber escapes in a message when it sanitizes: the C0
/// controls of terminal escape sequences, DEL and the C1 controls.
fn escape_controls(w: &mut Writer<'_>, text: &str) -> std::fmt::Result {
    for ch in text.chars() {
        match ch {
            '\x1b' => w.write_str("\\x1b")?,
            '\x07' => w.write_str("\\x07")?,
            '\x08' => w.write_str("\\x08")?,
            '\x0c' => w.write_str("\\x0c")?,
            '\x7f' => w.write_str("\\x7f")?,
            c if ('\u{80}'..='\u{9f}').contains(&c) => write!(w, "\\u{{{:x}}}", c as u32)?,
            c => w.write_char(c)?,
        }
    }
    Ok(())
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
    let (stderr, stderr_guard) = builder()
        .thread_name("cellgate-log")
        .finish(std::io::BufWriter::with_capacity(WRITE_BUFFER, std::io::stderr()));
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
            let (w, g) = builder()
                .thread_name("cellgate-access-log")
                .finish(std::io::BufWriter::with_capacity(WRITE_BUFFER, file));
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

    /// A writer into a shared buffer, for a fmt layer.
    #[derive(Clone, Default)]
    struct Buf(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> fmt::MakeWriter<'a> for Buf {
        type Writer = Buf;
        fn make_writer(&'a self) -> Buf {
            self.clone()
        }
    }

    impl Buf {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
        }
    }

    /// Lines as the hand-written formatter and as tracing-subscriber's own
    /// write them, for the same events.
    fn both(events: impl FnOnce()) -> (String, String) {
        let (ours, general) = (Buf::default(), Buf::default());
        let sub = tracing_subscriber::registry()
            .with(
                fmt::layer()
                    .with_writer(ours.clone())
                    .with_ansi(false)
                    .event_format(TextLines::default()),
            )
            .with(fmt::layer().with_writer(general.clone()).with_ansi(false));
        tracing::subscriber::with_default(sub, events);
        (ours.text(), general.text())
    }

    /// Equal but for the timestamps, which must have the same shape.
    fn same_lines(ours: &str, general: &str) -> Result<(), String> {
        let (a, b): (Vec<_>, Vec<_>) = (ours.lines().collect(), general.lines().collect());
        if a.len() != b.len() {
            return Err(format!("{} lines against {}", a.len(), b.len()));
        }
        for (x, y) in a.iter().zip(&b) {
            let shape = |l: &str| l.len() > 27 && l.as_bytes()[10] == b'T' && l.as_bytes()[26] == b'Z';
            if !shape(x) || !shape(y) || x[27..] != y[27..] {
                return Err(format!("ours:    {x}\ngeneral: {y}"));
            }
        }
        Ok(())
    }

    proptest::proptest! {
        #[test]
        fn the_access_line_is_what_the_general_formatter_writes(
            path in ".*",
            service in "[a-z\"\\\\ ]{0,12}",
            error in proptest::option::of(".*"),
            status in proptest::prelude::any::<u16>(),
            bytes in proptest::prelude::any::<u64>(),
            duration in proptest::prelude::any::<f64>(),
        ) {
            let client: Option<std::net::IpAddr> = Some([127, 0, 0, 1].into());
            let (ours, general) = both(|| {
                tracing::info!(
                    target: "cellgate::access",
                    trace_id = tracing::field::display(""),
                    client = tracing::field::display(client.map_or("-".to_owned(), |c| c.to_string())),
                    method = %http::Method::GET,
                    path = path.as_str(),
                    service = service.as_str(),
                    cell = "eu-west",
                    status,
                    bytes,
                    duration_ms = duration,
                    retries = 0u16,
                    error = tracing::field::display(error.as_deref().unwrap_or("")),
                    "request"
                );
                // Other lines, and an access line with a message of its
                // own, take the general formatter or agree with it.
                tracing::warn!(target: "cellgate::other", status, "something {}", "else");
                tracing::info!(target: "cellgate::access", path = path.as_str(), "odd \x1b[31m message");
            });
            proptest::prop_assert_eq!(general.lines().count(), 3);
            if let Err(diff) = same_lines(&ours, &general) {
                proptest::prop_assert!(false, "{}", diff);
            }
        }
    }

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
