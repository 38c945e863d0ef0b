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

use std::{
    fmt::Write as _,
    io::IsTerminal,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Condvar, Mutex, MutexGuard,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tracing::{field::Field, Event, Level, Subscriber};
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
    writers: Vec<WriterThread>,
}

impl std::fmt::Debug for Logging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Logging({} writers)", self.writers.len())
    }
}

impl Logging {
    /// Lines dropped so far because a writer fell behind.
    pub fn dropped(&self) -> u64 {
        self.writers
            .iter()
            .map(|w| w.lines.dropped.load(Ordering::Relaxed))
            .sum()
    }

    /// A shareable reader of [`Logging::dropped`].
    pub fn dropped_counter(self: &Arc<Self>) -> Arc<dyn Fn() -> u64 + Send + Sync> {
        let me = self.clone();
        Arc::new(move || me.dropped())
    }
}

/// Bytes of lines held for a writer thread before new lines are dropped
/// (and counted).
const HELD_BYTES: usize = 16 << 20;
/// How often a writer thread writes what has gathered.
const WRITE_EVERY: Duration = Duration::from_millis(10);
/// Past this many bytes held, the writer thread is woken at once.
const WRITE_SOON: usize = 256 << 10;
/// How long dropping [`Logging`] waits for the last lines to go out.
const FLUSH_GRACE: Duration = Duration::from_secs(1);

/// Lines waiting for a writer thread.
#[derive(Debug, Default)]
struct Gathered {
    state: Mutex<GatherState>,
    wake: Condvar,
    dropped: AtomicU64,
}

#[derive(Debug, Default)]
struct GatherState {
    buf: Vec<u8>,
    stop: bool,
    done: bool,
}

impl Gathered {
    fn lock(&self) -> MutexGuard<'_, GatherState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What the log layers write to. A line is appended to what its writer
/// thread will write next, a copy and an uncontended lock on the worker
/// thread; the writer thread wakes every `WRITE_EVERY` (or once past
/// `WRITE_SOON` bytes) and writes everything in one call. (A writer thread
/// woken for every line, as tracing-appender's is, cost a futex wake, a
/// write and the thread's spinning per line: about 35 µs of CPU per
/// request with the access log on, measured on a 2-core machine.) When
/// `HELD_BYTES` are waiting, new lines are dropped and counted.
#[derive(Clone, Debug)]
struct LineSink(Arc<Gathered>);

impl std::io::Write for LineSink {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let mut st = self.0.lock();
        let before = st.buf.len();
        if before + line.len() > HELD_BYTES {
            drop(st);
            self.0.dropped.fetch_add(1, Ordering::Relaxed);
        } else {
            st.buf.extend_from_slice(line);
            let crossed = before < WRITE_SOON && st.buf.len() >= WRITE_SOON;
            drop(st);
            if crossed {
                self.0.wake.notify_one();
            }
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> fmt::MakeWriter<'a> for LineSink {
    type Writer = LineSink;
    fn make_writer(&'a self) -> LineSink {
        self.clone()
    }
}

/// A writer thread and the lines it writes; dropped, it writes what is
/// left (waiting at most `FLUSH_GRACE`).
struct WriterThread {
    lines: Arc<Gathered>,
    thread: Option<JoinHandle<()>>,
}

impl WriterThread {
    fn start(name: &str, mut out: impl std::io::Write + Send + 'static) -> std::io::Result<(LineSink, Self)> {
        let lines = Arc::new(Gathered::default());
        let theirs = lines.clone();
        let thread = std::thread::Builder::new().name(name.to_owned()).spawn(move || {
            let mut batch = Vec::new();
            loop {
                let stop = {
                    let mut st = theirs.lock();
                    if !st.stop && st.buf.len() < WRITE_SOON {
                        st = theirs
                            .wake
                            .wait_timeout(st, WRITE_EVERY)
                            .map_or_else(|p| p.into_inner().0, |(st, _)| st);
                    }
                    std::mem::swap(&mut st.buf, &mut batch);
                    st.stop
                };
                if !batch.is_empty() {
                    // A failed write loses this batch; nothing better to
                    // do with log lines that cannot be written.
                    let _ = out.write_all(&batch).and_then(|()| out.flush());
                    batch.clear();
                    if batch.capacity() > WRITE_SOON * 4 {
                        batch = Vec::new();
                    }
                }
                if stop {
                    let rest = std::mem::take(&mut theirs.lock().buf);
                    let _ = out.write_all(&rest).and_then(|()| out.flush());
                    theirs.lock().done = true;
                    theirs.wake.notify_all();
                    return;
                }
            }
        })?;
        Ok((
            LineSink(lines.clone()),
            Self {
                lines,
                thread: Some(thread),
            },
        ))
    }
}

impl Drop for WriterThread {
    fn drop(&mut self) {
        let deadline = Instant::now() + FLUSH_GRACE;
        let mut st = self.lines.lock();
        st.stop = true;
        self.lines.wake.notify_all();
        while !st.done {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                // A writer stuck on a full pipe: leave it behind.
                return;
            }
            st = self
                .lines
                .wake
                .wait_timeout(st, left)
                .map_or_else(|p| p.into_inner().0, |(st, _)| st);
        }
        drop(st);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

const ACCESS: &str = "cellgate::access";

fn layer<S>(format: Format, writer: LineSink, ansi: bool) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let base = fmt::layer().with_writer(writer).with_ansi(ansi);
    match format {
        Format::Text => base.event_format(AccessLines::text()).boxed(),
        Format::Json => base.json().event_format(AccessLines::json()).boxed(),
    }
}

/// tracing-subscriber's lines, text or JSON, with the access line written
/// by hand: the same bytes, for a fraction of the instructions of the
/// general formatters (which, in text, style every field name and format
/// every value through `Debug`: 21 900 instructions a line, more than all
/// of cellgate's forwarding headers; 32 500 in JSON). Lines of another
/// kind, with colour, or inside a span (which JSON writes as `span` and
/// `spans`) go to the general formatter, `full`.
#[derive(Debug)]
struct AccessLines<F> {
    full: F,
    json: bool,
}

impl AccessLines<fmt::format::Format> {
    fn text() -> Self {
        Self {
            full: fmt::format(),
            json: false,
        }
    }
}

impl AccessLines<fmt::format::Format<fmt::format::Json>> {
    fn json() -> Self {
        Self {
            full: fmt::format().json(),
            json: true,
        }
    }
}

impl<S, N, F> FormatEvent<S, N> for AccessLines<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> std::fmt::Result {
        let meta = event.metadata();
        let general = meta.target() != ACCESS
            || *meta.level() != Level::INFO
            || if self.json {
                // As the JSON formatter finds the span it would write.
                event
                    .parent()
                    .and_then(|id| ctx.span(id))
                    .or_else(|| ctx.lookup_current())
                    .is_some()
            } else {
                writer.has_ansi_escapes() || ctx.event_scope().is_some()
            };
        if general {
            return self.full.format_event(ctx, writer, event);
        }
        let now = humantime::format_rfc3339_micros(std::time::SystemTime::now());
        if self.json {
            write!(writer, "{{\"timestamp\":\"{now}\",\"level\":\"INFO\",\"fields\":{{")?;
            FieldsOut::write(&mut writer, Json, event)?;
            writer.write_str("},\"target\":\"cellgate::access\"}\n")
        } else {
            // As `Format<Full, SystemTime>` writes it without colour.
            write!(writer, "{now}  INFO {ACCESS}: ")?;
            FieldsOut::write(&mut writer, Text, event)?;
            writer.write_char('\n')
        }
    }
}

/// Writes an event's fields for a hand-written access line, in a style:
/// [`Text`] or [`Json`]. Writing stops at the first error, kept in `result`.
struct FieldsOut<'a, 'w, S> {
    w: &'a mut Writer<'w>,
    first: bool,
    result: std::fmt::Result,
    _style: S,
}

/// As tracing-subscriber's `DefaultVisitor` writes fields without colour:
/// the message as it is, then ` name=value` with values as `Debug` shows
/// them (strings quoted and escaped).
struct Text;

/// As tracing-serde serializes fields through serde_json: `"name":value`
/// pairs, strings and `Debug` values as JSON strings, integers and
/// booleans as they are, floats as serde_json writes them (`null` when not
/// finite).
struct Json;

impl<'a, 'w, S> FieldsOut<'a, 'w, S>
where
    Self: tracing::field::Visit,
{
    /// Writes `event`'s fields to `w`.
    fn write(w: &'a mut Writer<'w>, style: S, event: &Event<'_>) -> std::fmt::Result {
        let mut out = Self {
            w,
            first: true,
            result: Ok(()),
            _style: style,
        };
        event.record(&mut out);
        out.result
    }
}

impl<S> FieldsOut<'_, '_, S> {
    /// `sep` unless this is the first field; `false` when writing already
    /// failed.
    fn separate(&mut self, sep: &str) -> bool {
        if self.result.is_err() {
            return false;
        }
        if !std::mem::take(&mut self.first) {
            self.result = self.w.write_str(sep);
        }
        self.result.is_ok()
    }
}

impl FieldsOut<'_, '_, Text> {
    /// The separator and `name=`; `false` when writing already failed.
    fn name(&mut self, field: &Field) -> bool {
        if !self.separate(" ") {
            return false;
        }
        let name = field.name();
        let name = name.strip_prefix("r#").unwrap_or(name);
        self.result = self.w.write_str(name).and_then(|()| self.w.write_char('='));
        self.result.is_ok()
    }
}

impl tracing::field::Visit for FieldsOut<'_, '_, Text> {
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
        if self.name(field) {
            self.result = write_u64(self.w, value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            if self.separate(" ") {
                let mut text = String::new();
                let _ = write!(text, "{value:?}");
                self.result = if self.w.sanitizes_ansi_escapes() {
                    escape_controls(self.w, &text)
                } else {
                    self.w.write_str(&text)
                };
            }
            return;
        }
        if self.name(field) {
            self.result = write!(self.w, "{value:?}");
        }
    }
}

/// `value` in decimal, without the formatting machinery.
fn write_u64(w: &mut Writer<'_>, value: u64) -> std::fmt::Result {
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
    w.write_str(std::str::from_utf8(&digits[at..]).unwrap_or("0"))
}

impl FieldsOut<'_, '_, Json> {
    /// The separator and `"name":`; `false` when writing already failed.
    fn name(&mut self, field: &Field) -> bool {
        if !self.separate(",") {
            return false;
        }
        self.result = self
            .w
            .write_char('"')
            .and_then(|()| json_escape(self.w, field.name()))
            .and_then(|()| self.w.write_str("\":"));
        self.result.is_ok()
    }
}

impl tracing::field::Visit for FieldsOut<'_, '_, Json> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.name(field) {
            self.result = self
                .w
                .write_char('"')
                .and_then(|()| json_escape(self.w, value))
                .and_then(|()| self.w.write_char('"'));
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.name(field) {
            self.result = write_u64(self.w, value);
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.name(field) {
            let sign = if value < 0 { "-" } else { "" };
            self.result = self
                .w
                .write_str(sign)
                .and_then(|()| write_u64(self.w, value.unsigned_abs()));
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.name(field) {
            self.result = self.w.write_str(if value { "true" } else { "false" });
        }
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if self.name(field) {
            self.result = if value.is_finite() {
                // serde_json's own float format (shortest round trip,
                // `e+`/`e-` exponents), into a stack buffer.
                use serde_json::ser::Formatter as _;
                let mut buf = [0u8; 32];
                let mut out: &mut [u8] = &mut buf;
                let left = serde_json::ser::CompactFormatter
                    .write_f64(&mut out, value)
                    .map(|()| out.len())
                    .map_err(|_| std::fmt::Error);
                left.and_then(|left| {
                    let text = std::str::from_utf8(&buf[..buf.len() - left]).map_err(|_| std::fmt::Error)?;
                    self.w.write_str(text)
                })
            } else {
                self.w.write_str("null")
            };
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if self.name(field) {
            self.result = self
                .w
                .write_char('"')
                .and_then(|()| write!(JsonEscaped(self.w), "{value:?}"))
                .and_then(|()| self.w.write_char('"'));
        }
    }
}

/// Escapes what is written through it as the contents of a JSON string.
struct JsonEscaped<'a, 'w>(&'a mut Writer<'w>);

impl std::fmt::Write for JsonEscaped<'_, '_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        json_escape(self.0, s)
    }
}

/// `text` as serde_json writes it inside a string: `"` and `\` escaped,
/// the C0 controls as `\n`, `\t` and the like or `\u00XX`; everything else,
/// DEL and non-ASCII included, as it is.
fn json_escape(w: &mut Writer<'_>, text: &str) -> std::fmt::Result {
    let mut start = 0;
    for (i, b) in text.bytes().enumerate() {
        let short = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0..=0x1f => "",
            _ => continue,
        };
        // `i` is an ASCII byte, so a char boundary.
        w.write_str(&text[start..i])?;
        if short.is_empty() {
            write!(w, "\\u{b:04x}")?;
        } else {
            w.write_str(short)?;
        }
        start = i + 1;
    }
    w.write_str(&text[start..])
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
    let ansi = std::io::stderr().is_terminal();
    let (stderr, stderr_writer) = WriterThread::start("cellgate-log", std::io::stderr())?;
    let mut writers = vec![stderr_writer];
    let to_stderr = match access {
        AccessLog::Stderr => true,
        AccessLog::File(_) | AccessLog::Off => false,
    };
    let app = layer(format, stderr, ansi).with_filter(filter_fn(move |m| to_stderr || m.target() != ACCESS));
    let access_layer = match access {
        AccessLog::File(path) => {
            let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
            let (w, writer) = WriterThread::start("cellgate-access-log", file)?;
            writers.push(writer);
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
    Ok(Logging { writers })
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

    #[test]
    fn the_writer_thread_writes_every_line_in_order_and_the_rest_when_dropped() {
        use std::io::Write as _;
        let out = Buf::default();
        let (mut sink, writer) = WriterThread::start("test-log", out.clone()).expect("thread");
        for i in 0..5_000 {
            writeln!(sink, "line {i}").expect("write");
            if i == 2_000 {
                // Some go out on the timer, the rest when dropped.
                std::thread::sleep(WRITE_EVERY * 3);
            }
        }
        drop(writer);
        let text = out.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5_000);
        assert!(lines.iter().enumerate().all(|(i, l)| *l == format!("line {i}")));
    }

    /// An output that takes nothing until opened.
    #[derive(Clone, Default)]
    struct Gate(Arc<(Mutex<bool>, Condvar)>, Buf);

    impl std::io::Write for Gate {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let (open, cv) = &*self.0;
            let mut o = open.lock().unwrap_or_else(|p| p.into_inner());
            while !*o {
                o = cv.wait(o).unwrap_or_else(|p| p.into_inner());
            }
            self.1.write(b)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_past_what_a_stuck_writer_holds_are_dropped_and_counted() {
        use std::io::Write as _;
        let gate = Gate::default();
        let (mut sink, writer) = WriterThread::start("test-log", gate.clone()).expect("thread");
        let line = [b'x'; 1023];
        // Twice what it holds: whatever the writer took before it got stuck.
        let sent = 2 * HELD_BYTES / 1024;
        for _ in 0..sent {
            sink.write_all(&line)
                .and_then(|()| sink.write_all(b"\n"))
                .expect("write");
        }
        let dropped = writer.lines.dropped.load(Ordering::Relaxed) as usize;
        assert!(dropped > 0, "nothing was dropped with the writer stuck");
        {
            let (open, cv) = &*gate.0;
            *open.lock().unwrap_or_else(|p| p.into_inner()) = true;
            cv.notify_all();
        }
        drop(writer);
        // Each line is two writes: the text and its newline, both kept or
        // both dropped but for the one line that straddles the limit.
        let text = gate.1.text();
        let written = text.matches('\n').count();
        assert!(
            written + dropped / 2 >= sent - 1 && written + dropped / 2 <= sent + 1,
            "{written} written, {dropped} dropped of {sent}"
        );
    }

    /// Lines as the hand-written formatter and as tracing-subscriber's own
    /// write them, for the same events.
    fn both(format: Format, events: impl FnOnce()) -> (String, String) {
        let (ours, general) = (Buf::default(), Buf::default());
        let json = format == Format::Json;
        let sub = tracing_subscriber::registry()
            .with((!json).then(|| {
                fmt::layer()
                    .with_writer(ours.clone())
                    .with_ansi(false)
                    .event_format(AccessLines::text())
            }))
            .with((!json).then(|| fmt::layer().with_writer(general.clone()).with_ansi(false)))
            .with(json.then(|| {
                fmt::layer()
                    .with_writer(ours.clone())
                    .json()
                    .event_format(AccessLines::json())
            }))
            .with(json.then(|| fmt::layer().with_writer(general.clone()).json()));
        tracing::subscriber::with_default(sub, events);
        (ours.text(), general.text())
    }

    /// Equal but for the timestamps, which must have the same shape; they
    /// start `at` bytes into the line.
    fn same_lines(ours: &str, general: &str, at: usize) -> Result<(), String> {
        let (a, b): (Vec<_>, Vec<_>) = (ours.lines().collect(), general.lines().collect());
        if a.len() != b.len() {
            return Err(format!("{} lines against {}", a.len(), b.len()));
        }
        for (x, y) in a.iter().zip(&b) {
            let shape = |l: &str| l.len() > at + 27 && l.as_bytes()[at + 10] == b'T' && l.as_bytes()[at + 26] == b'Z';
            if !shape(x) || !shape(y) || x[..at] != y[..at] || x[at + 27..] != y[at + 27..] {
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
            let (ours, general) = both(Format::Text, || {
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
            if let Err(diff) = same_lines(&ours, &general, 0) {
                proptest::prop_assert!(false, "{}", diff);
            }
        }

        #[test]
        fn the_json_access_line_is_what_the_json_formatter_writes(
            path in ".*",
            service in "[a-z\"\\\\ ]{0,12}",
            error in proptest::option::of(".*"),
            status in proptest::prelude::any::<u16>(),
            bytes in proptest::prelude::any::<u64>(),
            delta in proptest::prelude::any::<i64>(),
            duration in proptest::prelude::any::<f64>(),
            sticky in proptest::prelude::any::<bool>(),
        ) {
            let (ours, general) = both(Format::Json, || {
                tracing::info!(
                    target: "cellgate::access",
                    trace_id = tracing::field::display(""),
                    client = tracing::field::display("127.0.0.1"),
                    method = %http::Method::GET,
                    path = path.as_str(),
                    service = service.as_str(),
                    status,
                    bytes,
                    delta,
                    sticky,
                    duration_ms = duration,
                    big = u128::from(bytes) * 3,
                    error = tracing::field::display(error.as_deref().unwrap_or("")),
                    "request"
                );
                // Other lines, an access line with a message of its own,
                // and one inside a span (which the general formatter takes).
                tracing::warn!(target: "cellgate::other", status, "something {}", "else");
                tracing::info!(target: "cellgate::access", path = path.as_str(), "odd \x1b[31m \"message\"");
                tracing::info_span!("conn", peer = "127.0.0.1").in_scope(|| {
                    tracing::info!(target: "cellgate::access", status, "request");
                });
            });
            proptest::prop_assert_eq!(general.lines().count(), 4);
            for line in ours.lines() {
                let parsed: Result<serde_json::Value, _> = serde_json::from_str(line);
                proptest::prop_assert!(parsed.is_ok(), "not JSON: {}", line);
            }
            if let Err(diff) = same_lines(&ours, &general, "{\"timestamp\":\"".len()) {
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
