//! [`ConnIo`]: the IO of one HTTP/1 client connection, between the socket
//! (plain or TLS) and pingora's HTTP/1 session.
//!
//! pingora bounds each *read* of a request head, not the head as a whole,
//! caps heads only at 1 MiB and 256 fields with a 400, and answers what its
//! parser rejects with canned responses that say `Server: Pingora` and
//! never reach the proxy's hooks (no access line, no metric). So until a
//! request head has been handed to [`crate::CellProxy`] (which marks the
//! connection busy through [`ConnHandle`]), this wrapper:
//!
//! - bounds the wait for the next request (`keepalive_timeout`) and for
//!   the whole head once its first byte arrived (`header_timeout`): 408;
//! - counts the head's bytes and lines: over the limits, 431;
//! - swallows whatever pingora writes (its parser's 400, the 405 for
//!   CONNECT) and sends cellgate's own answer for the same status instead;
//! - records what it answered in the shared [`ConnState`], for the
//!   connection loop to log and count.
//!
//! Once busy it is a pass-through for reads (one atomic load per read)
//! and a small write buffer: pingora writes a response's head and a short
//! body as separate writes and flushes when it needs the bytes out, relying
//! on the 1460-byte write buffer its own listeners give every connection.
//! That buffer is set by a crate-private call cellgate's accept loop cannot
//! make, so this wrapper buffers instead: one send per small response, not
//! one per write (the bare-pingora bench showed 3 sends per request against
//! 2).

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Duration,
};

use async_trait::async_trait;
use bytes::Bytes;
use pingora::protocols::{
    raw_connect::ProxyDigest, GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    Stream, TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};

/// The request-head limits of a listener.
#[derive(Clone, Debug)]
pub(crate) struct HeadLimits {
    pub header_timeout: Duration,
    pub max_bytes: usize,
    pub max_headers: usize,
}

/// How a connection ended before its request reached the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Early {
    /// What cellgate answered itself (0: nothing, the connection was
    /// closed).
    pub status: u16,
    pub error: &'static str,
    pub count: Count,
}

/// The counter an early end goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Count {
    /// `cellgate_client_errors_total{kind}` (index in `CLIENT_ERRORS`).
    Error(usize),
    /// `cellgate_client_timeouts_total{kind}` (index in `CLIENT_TIMEOUTS`).
    Timeout(usize),
}

/// Why a head was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    TooLarge,
    TooManyHeaders,
    Timeout,
}

impl Early {
    fn answered(status: u16, refusal: Option<Refusal>) -> Self {
        use cellgate_snapshot::metrics::{client_error as e, client_timeout as t};
        let (error, count) = match (status, refusal) {
            (_, Some(Refusal::Timeout)) => (
                "request head not complete within proxy.header_timeout",
                Count::Timeout(t::HEADER),
            ),
            (_, Some(Refusal::TooLarge)) => (
                "request head larger than proxy.max_request_head_bytes",
                Count::Error(e::HEAD_TOO_LARGE),
            ),
            (_, Some(Refusal::TooManyHeaders)) => (
                "more header fields than proxy.max_request_headers",
                Count::Error(e::TOO_MANY_HEADERS),
            ),
            (405, None) => ("CONNECT is not proxied", Count::Error(e::METHOD_NOT_ALLOWED)),
            (_, None) => (
                "malformed request rejected by the HTTP/1 parser",
                Count::Error(e::BAD_REQUEST),
            ),
        };
        Self { status, error, count }
    }

    fn idle(first: bool) -> Self {
        use cellgate_snapshot::metrics::client_timeout as t;
        if first {
            Self {
                status: 0,
                error: "no request within proxy.header_timeout",
                count: Count::Timeout(t::HEADER),
            }
        } else {
            Self {
                status: 0,
                error: "idle past proxy.keepalive_timeout",
                count: Count::Timeout(t::KEEPALIVE),
            }
        }
    }
}

/// What the connection loop learns from [`ConnIo`] after a request.
#[derive(Debug, Default)]
pub(crate) struct ConnState {
    /// The current request head has been handed to the proxy.
    busy: AtomicBool,
    early: Mutex<Option<(Early, String)>>,
}

impl ConnState {
    /// What ended the connection before the proxy saw a request, with the
    /// request line as far as it was read (escaped, at most 256 bytes).
    pub fn take_early(&self) -> Option<(Early, String)> {
        self.early.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    fn set_early(&self, early: Early, line: &[u8]) {
        *self.early.lock().unwrap_or_else(|e| e.into_inner()) = Some((early, escape(line)));
    }
}

/// Given to pingora as the connection's user context; [`crate::CellProxy`]
/// marks the connection busy with it as soon as a request head is parsed.
#[derive(Debug, Clone)]
pub(crate) struct ConnHandle {
    pub state: Arc<ConnState>,
    /// Whether the connection may be kept alive after this request.
    pub keepalive: bool,
}

impl ConnHandle {
    pub fn busy(&self) {
        self.state.busy.store(true, Ordering::Relaxed);
    }
}

#[derive(Clone, Copy, Debug)]
enum Phase {
    /// Waiting for the first byte of a request until `until`.
    Idle { until: Instant, first: bool },
    /// Reading a head that must be complete by `until`.
    Head { until: Instant },
}

/// Most bytes [`ConnIo::wait_for_request`] reads for pingora (a typical
/// request head; the rest comes through pingora's own reads).
const HELD: usize = 1024;

/// Writes up to this size are gathered until pingora flushes (or the next
/// write would overflow); larger ones go straight to the socket. A typical
/// response head plus a small body fits. The buffer is freed between
/// requests.
const WRITE_BUF: usize = 4096;

/// Longest request line kept for the access log.
const LINE_KEPT: usize = 256;
/// How long a connection we answered ourselves is drained before it is
/// closed (so the client reads the answer instead of a reset), and how
/// much of it at most.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 1 << 20;

/// See the module documentation.
pub(crate) struct ConnIo {
    inner: Stream,
    st: Arc<ConnState>,
    lim: Arc<HeadLimits>,
    phase: Phase,
    timer: Pin<Box<Sleep>>,
    timer_at: Instant,
    head_bytes: usize,
    head_lines: usize,
    /// The scan is at the start of a line (an empty line ends the head).
    line_start: bool,
    /// The end of the head was seen: stop counting.
    head_done: bool,
    line: Vec<u8>,
    /// 408 or 431 to answer instead of reading on.
    reject: Option<(u16, Refusal)>,
    /// A limit was crossed on the first read of a head: pingora would take
    /// an error there for a silent close, so the error waits for the next
    /// read (if pingora parses the head meanwhile, the proxy's own check
    /// answers 431).
    reject_next_read: bool,
    /// The start of what pingora wrote before the proxy had the request.
    swallowed: Vec<u8>,
    /// Our own answer, being written.
    out: Option<(Bytes, usize)>,
    answered: bool,
    linger: Linger,
    /// The start of the next request, read by [`ConnIo::wait_for_request`]
    /// (already counted), and how much of it pingora has taken.
    held: Vec<u8>,
    held_at: usize,
    /// Bytes past a request's head went to pingora (a body, a pipelined
    /// request, its idle probe), or a head came without a read here (from
    /// what pingora held): pingora may hold the start of a next request
    /// itself, now or later. Kept for the connection's life (see
    /// [`ConnIo::pingora_may_hold_input`]).
    past_head: bool,
    /// Written but not yet sent (see [`WRITE_BUF`]), and how much of it has
    /// been sent.
    wbuf: Vec<u8>,
    wsent: usize,
}

/// Closing a connection we answered ourselves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Linger {
    No,
    Closing,
    /// Reading and dropping what the client still sends (bytes so far).
    Draining(usize),
    Done,
}

impl std::fmt::Debug for ConnIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnIo")
            .field("inner", &self.inner)
            .field("phase", &self.phase)
            .field("busy", &self.st.busy.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl ConnIo {
    /// The first request's head must be complete by `deadline`.
    pub fn new(inner: Stream, st: Arc<ConnState>, lim: Arc<HeadLimits>, deadline: Instant) -> Self {
        Self {
            inner,
            st,
            lim,
            phase: Phase::Idle {
                until: deadline,
                first: true,
            },
            timer: Box::pin(tokio::time::sleep_until(deadline)),
            timer_at: deadline,
            head_bytes: 0,
            head_lines: 0,
            line_start: true,
            head_done: false,
            line: Vec::new(),
            reject: None,
            reject_next_read: false,
            swallowed: Vec::new(),
            out: None,
            answered: false,
            linger: Linger::No,
            held: Vec::new(),
            held_at: 0,
            past_head: false,
            wbuf: Vec::new(),
            wsent: 0,
        }
    }

    /// Gets ready for the next request on the connection, which may take
    /// `keepalive` to start.
    pub fn next_request(&mut self, keepalive: Duration) {
        self.phase = Phase::Idle {
            until: Instant::now() + keepalive,
            first: false,
        };
        self.head_bytes = 0;
        self.head_lines = 0;
        self.line_start = true;
        self.head_done = false;
        self.line.clear();
        self.reject = None;
        self.reject_next_read = false;
        self.swallowed.clear();
        self.out = None;
        self.answered = false;
        self.linger = Linger::No;
        if self.wbuf.is_empty() {
            // An idle connection keeps no write buffer. (pingora flushes a
            // response before the connection is reused; anything left
            // would still go out first on the next write or flush.)
            self.wbuf = Vec::new();
        }
        self.st.busy.store(false, Ordering::Relaxed);
    }

    /// Whether pingora may hold bytes of a next request: it was given
    /// bytes past a request's head, or took a head from such bytes (this
    /// request's head did not come through here). Then only pingora can
    /// tell when the next request starts, and the connection waits for it
    /// inside pingora as before, for the rest of its life: a pipelined
    /// head read partly from pingora's bytes would be counted from its
    /// middle here, so no later request boundary would be known for sure.
    /// Plain keep-alive clients (one request at a time, no body) never set
    /// it.
    pub fn pingora_may_hold_input(&mut self) -> bool {
        self.past_head |= self.head_bytes == 0;
        self.past_head
    }

    /// Between two requests on a kept-alive connection: waits for the next
    /// request's first bytes (kept for pingora's first read) so that an
    /// idle connection holds only this wrapper and a 1 KiB buffer, not a
    /// request in progress (pingora's proxy future and header buffer). `false`: the client
    /// closed or failed, or the keep-alive timeout ran out (recorded in
    /// [`ConnState`] as for a wait in pingora). Call only when
    /// [`ConnIo::pingora_may_hold_input`] was false, after
    /// [`ConnIo::next_request`].
    pub async fn wait_for_request(&mut self) -> bool {
        // Read what comes (a whole head, usually) in the one read pingora
        // would have made; pingora's first read takes it from here, and the
        // buffer is freed once it has.
        // Into spare capacity: nothing to zero first.
        let mut held = Vec::with_capacity(HELD);
        let read = tokio::io::AsyncReadExt::read_buf(self, &mut held).await;
        // An error (the keep-alive timeout included) ends the connection
        // as nothing read does.
        let n = read.unwrap_or_default();
        if n > 0 {
            self.held = held;
            self.held_at = 0;
        }
        n > 0
    }

    fn busy(&self) -> bool {
        self.st.busy.load(Ordering::Relaxed)
    }

    fn deadline(&self) -> Instant {
        match self.phase {
            Phase::Idle { until, .. } | Phase::Head { until } => until,
        }
    }

    /// Counts head bytes and lines in `new`; `Err` past a limit.
    fn scan(&mut self, new: &[u8]) -> Result<(), Refusal> {
        if self.head_done {
            self.past_head |= !new.is_empty();
            return Ok(());
        }
        // Line by line (memchr finds each end): a line of nothing but
        // `\r` that starts a line ends the head.
        let mut start = 0;
        for end in memchr::memchr_iter(b'\n', new) {
            let line = &new[start..end];
            self.keep(line);
            if self.line_start && line.iter().all(|&b| b == b'\r') {
                // An empty line: the head ends here (leading empty
                // lines before a request line end the count early,
                // which only leaves the proxy's own check).
                self.head_bytes += end + 1;
                self.head_done = true;
                self.past_head |= end + 1 < new.len();
                return self.check();
            }
            self.head_lines += 1;
            self.line_start = true;
            start = end + 1;
        }
        let rest = &new[start..];
        self.keep(rest);
        self.line_start &= rest.iter().all(|&b| b == b'\r');
        self.head_bytes += new.len();
        self.check()
    }

    /// Keeps the first line's bytes (for the access line of a request
    /// cellgate answers itself), `\r` left out, up to `LINE_KEPT`.
    fn keep(&mut self, bytes: &[u8]) {
        if self.head_lines > 0 {
            return;
        }
        let room = LINE_KEPT.saturating_sub(self.line.len());
        self.line
            .extend(bytes.iter().copied().filter(|&b| b != b'\r').take(room));
    }

    fn check(&self) -> Result<(), Refusal> {
        if self.head_bytes > self.lim.max_bytes {
            Err(Refusal::TooLarge)
        } else if self.head_lines > self.lim.max_headers + 1 {
            // The request line is not a header field.
            Err(Refusal::TooManyHeaders)
        } else {
            Ok(())
        }
    }

    /// Prepares our own answer: the refusal we decided on, else the status
    /// pingora chose (once per request).
    fn answer(&mut self, pingora_status: Option<u16>) {
        if self.answered {
            return;
        }
        let early = match (self.reject, pingora_status) {
            (Some((status, why)), _) => Early::answered(status, Some(why)),
            (None, Some(status)) => Early::answered(status, None),
            (None, None) => return,
        };
        self.answered = true;
        self.out = Some((canned(early.status), 0));
        self.st.set_early(early, &self.line);
    }

    /// Sends what the write buffer holds.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.wsent < self.wbuf.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &self.wbuf[self.wsent..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.wsent += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        self.wbuf.clear();
        self.wsent = 0;
        Poll::Ready(Ok(()))
    }

    /// Whether `len` more bytes go into the write buffer (after sending
    /// what it holds, when they would not fit); `Pending` while that send
    /// is.
    fn poll_buffer(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<bool>> {
        if self.wbuf.len() + len > WRITE_BUF {
            std::task::ready!(self.poll_drain(cx))?;
        }
        if len >= WRITE_BUF {
            return Poll::Ready(Ok(false));
        }
        if self.wbuf.capacity() == 0 {
            self.wbuf.reserve_exact(WRITE_BUF);
        }
        Poll::Ready(Ok(true))
    }

    /// Writes what is left of our own answer.
    fn poll_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, pos)) = &mut self.out {
            if *pos >= bytes.len() {
                self.out = None;
                break;
            }
            match Pin::new(&mut self.inner).poll_write(cx, &bytes[*pos..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => *pos += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// cellgate's answer for a status it (or pingora's parser) chose: no
/// `Server`, the connection closes.
pub(crate) fn canned(status: u16) -> Bytes {
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    let body = format!("{reason}\n");
    Bytes::from(format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\ncache-control: private, no-store\r\nconnection: close\r\n\r\n{body}",
        body.len()
    ))
}

/// The status code of an HTTP/1 response head (`HTTP/1.1 400 ...`).
fn status_of(head: &[u8]) -> Option<u16> {
    let code = head.get(9..12)?;
    std::str::from_utf8(code).ok()?.parse().ok()
}

/// Bytes from the network as printable text for a log line.
fn escape(b: &[u8]) -> String {
    b.escape_ascii().to_string()
}

impl AsyncRead for ConnIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let me = &mut *self;
        if me.busy() {
            let before = buf.filled().len();
            let r = Pin::new(&mut me.inner).poll_read(cx, buf);
            me.past_head |= buf.filled().len() > before;
            return r;
        }
        if me.held_at < me.held.len() && buf.remaining() > 0 {
            let n = (me.held.len() - me.held_at).min(buf.remaining());
            buf.put_slice(&me.held[me.held_at..me.held_at + n]);
            me.held_at += n;
            if me.held_at == me.held.len() {
                // Freed: an idle connection keeps no buffer.
                me.held = Vec::new();
                me.held_at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        if me.reject_next_read {
            me.reject_next_read = false;
            return Poll::Ready(Err(io::Error::other("cellgate: request head too large")));
        }
        let before = buf.filled().len();
        match Pin::new(&mut me.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let new = &buf.filled()[before..];
                if new.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                if let Phase::Idle { until, first } = me.phase {
                    let until = if first {
                        until
                    } else {
                        Instant::now() + me.lim.header_timeout
                    };
                    me.phase = Phase::Head { until };
                }
                let first_read = me.head_bytes == 0;
                if let Err(why) = me.scan(new) {
                    me.reject = Some((431, why));
                    if first_read {
                        me.reject_next_read = true;
                        return Poll::Ready(Ok(()));
                    }
                    return Poll::Ready(Err(io::Error::other("cellgate: request head too large")));
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let at = me.deadline();
                if at != me.timer_at {
                    me.timer.as_mut().reset(at);
                    me.timer_at = at;
                }
                if me.timer.as_mut().poll(cx).is_ready() {
                    match me.phase {
                        Phase::Head { .. } => me.reject = Some((408, Refusal::Timeout)),
                        Phase::Idle { first, .. } => me.st.set_early(Early::idle(first), b""),
                    }
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "cellgate: request head timeout",
                    )));
                }
                Poll::Pending
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let me = &mut *self;
        if me.busy() {
            if std::task::ready!(me.poll_buffer(cx, buf.len()))? {
                me.wbuf.extend_from_slice(buf);
                return Poll::Ready(Ok(buf.len()));
            }
            return Pin::new(&mut me.inner).poll_write(cx, buf);
        }
        // pingora answering on its own: keep the status line, drop the rest.
        let room = 16usize.saturating_sub(me.swallowed.len());
        me.swallowed.extend_from_slice(&buf[..room.min(buf.len())]);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let me = &mut *self;
        if me.busy() {
            let len = bufs.iter().map(|b| b.len()).sum();
            if std::task::ready!(me.poll_buffer(cx, len))? {
                for b in bufs {
                    me.wbuf.extend_from_slice(b);
                }
                return Poll::Ready(Ok(len));
            }
            return Pin::new(&mut me.inner).poll_write_vectored(cx, bufs);
        }
        let mut n = 0;
        for b in bufs {
            let room = 16usize.saturating_sub(me.swallowed.len());
            me.swallowed.extend_from_slice(&b[..room.min(b.len())]);
            n += b.len();
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = &mut *self;
        std::task::ready!(me.poll_drain(cx))?;
        if !me.busy() && !me.answered {
            if let Some(status) = status_of(&me.swallowed) {
                // A limit we saw wins over pingora's generic 400.
                me.answer(Some(status));
            }
        }
        match me.poll_out(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut me.inner).poll_flush(cx),
            other => other,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // pingora closes a connection whose head it could not read (our
        // 408 and 431 among them) through here.
        let me = &mut *self;
        std::task::ready!(me.poll_drain(cx))?;
        if !me.busy() && !me.answered {
            let status = status_of(&me.swallowed);
            me.answer(status);
        }
        if let Poll::Ready(Err(e)) = me.poll_out(cx) {
            return Poll::Ready(Err(e));
        }
        if me.out.is_some() {
            return Poll::Pending;
        }
        if !me.answered {
            return Pin::new(&mut me.inner).poll_shutdown(cx);
        }
        me.poll_linger(cx)
    }
}

impl ConnIo {
    /// After our own answer: flush, close our side, and read what the
    /// client is still sending for a moment, so that closing with unread
    /// data does not reset the connection before the answer is read.
    fn poll_linger(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match self.linger {
                Linger::No => {
                    if Pin::new(&mut self.inner).poll_flush(cx).is_pending() {
                        return Poll::Pending;
                    }
                    self.linger = Linger::Closing;
                }
                Linger::Closing => {
                    if Pin::new(&mut self.inner).poll_shutdown(cx).is_pending() {
                        return Poll::Pending;
                    }
                    let until = Instant::now() + LINGER;
                    self.timer.as_mut().reset(until);
                    self.timer_at = until;
                    self.linger = Linger::Draining(0);
                }
                Linger::Draining(drained) => {
                    let mut sink = [0u8; 8192];
                    let mut buf = ReadBuf::new(&mut sink);
                    match Pin::new(&mut self.inner).poll_read(cx, &mut buf) {
                        Poll::Ready(Ok(())) if !buf.filled().is_empty() && drained < LINGER_BYTES => {
                            self.linger = Linger::Draining(drained + buf.filled().len());
                        }
                        Poll::Pending if self.timer.as_mut().poll(cx).is_pending() => return Poll::Pending,
                        _ => {
                            self.linger = Linger::Done;
                        }
                    }
                }
                Linger::Done => return Poll::Ready(Ok(())),
            }
        }
    }
}

impl Drop for ConnIo {
    fn drop(&mut self) {
        // As pingora's own stream does: a last try, without waiting, to
        // send what was written but never flushed.
        if self.wsent < self.wbuf.len() {
            let _ = self.poll_drain(&mut Context::from_waker(std::task::Waker::noop()));
        }
    }
}

#[async_trait]
impl Shutdown for ConnIo {
    async fn shutdown(&mut self) {
        let _ = std::future::poll_fn(|cx| Pin::new(&mut *self).poll_shutdown(cx)).await;
    }
}

impl UniqueID for ConnIo {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for ConnIo {
    fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }
    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for ConnIo {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for ConnIo {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl GetSocketDigest for ConnIo {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
}

#[async_trait]
impl Peek for ConnIo {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A busy `ConnIo` over a real loopback connection, and the peer.
    async fn busy_pair() -> (ConnIo, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = tokio::net::TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let stream: Stream = Box::new(pingora::protocols::l4::stream::Stream::from(server));
        let limits = Arc::new(HeadLimits {
            header_timeout: Duration::from_secs(5),
            max_bytes: 8192,
            max_headers: 100,
        });
        let st = Arc::new(ConnState::default());
        st.busy.store(true, Ordering::Relaxed);
        let io = ConnIo::new(stream, st, limits, Instant::now() + Duration::from_secs(5));
        (io, client)
    }

    /// What the peer can read within `wait`.
    async fn readable(peer: &mut tokio::net::TcpStream, wait: Duration) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut got = Vec::new();
        let mut buf = [0u8; 16384];
        while let Ok(Ok(n)) = tokio::time::timeout(wait, peer.read(&mut buf)).await {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        got
    }

    /// The head scan as it was written first, a byte at a time: the
    /// reference the line-by-line scan must agree with.
    #[derive(Debug, PartialEq)]
    struct ByteScan {
        bytes: usize,
        lines: usize,
        line_start: bool,
        done: bool,
        past: bool,
        line: Vec<u8>,
    }

    impl ByteScan {
        fn scan(&mut self, new: &[u8]) {
            if self.done {
                self.past |= !new.is_empty();
                return;
            }
            for (i, &b) in new.iter().enumerate() {
                if self.lines == 0 && self.line.len() < LINE_KEPT && b != b'\r' && b != b'\n' {
                    self.line.push(b);
                }
                match b {
                    b'\n' if self.line_start => {
                        self.bytes += i + 1;
                        self.done = true;
                        self.past |= i + 1 < new.len();
                        return;
                    }
                    b'\n' => {
                        self.lines += 1;
                        self.line_start = true;
                    }
                    b'\r' => {}
                    _ => self.line_start = false,
                }
            }
            self.bytes += new.len();
        }
    }

    #[test]
    fn the_head_scan_agrees_with_a_byte_at_a_time() {
        use proptest::{collection::vec, prelude::*, test_runner::TestRunner};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let (io, _peer) = rt.block_on(busy_pair());
        let io = std::cell::RefCell::new(io);
        // Heads of `a`, spaces, CR and LF (long first lines too), cut
        // into reads anywhere.
        let byte = prop_oneof![Just(b'a'), Just(b' '), Just(b'\r'), Just(b'\n')];
        let head = vec(byte, 0..400);
        let cuts = vec(0usize..400, 0..6);
        let mut runner = TestRunner::default();
        let result = runner.run(&(head, cuts), |(head, mut cuts)| {
            let mut io = io.borrow_mut();
            io.next_request(Duration::from_secs(5));
            io.past_head = false;
            let mut reference = ByteScan {
                bytes: 0,
                lines: 0,
                line_start: true,
                done: false,
                past: false,
                line: Vec::new(),
            };
            cuts.push(head.len());
            cuts.sort_unstable();
            let mut from = 0;
            for cut in cuts.into_iter().map(|c| c.min(head.len())) {
                let chunk = &head[from..cut];
                from = cut;
                let _ = io.scan(chunk);
                reference.scan(chunk);
                let ours = ByteScan {
                    bytes: io.head_bytes,
                    lines: io.head_lines,
                    line_start: io.line_start,
                    done: io.head_done,
                    past: io.past_head,
                    line: io.line.clone(),
                };
                prop_assert_eq!(&ours, &reference);
            }
            Ok(())
        });
        result.expect("the scans agree");
    }

    #[tokio::test]
    async fn small_writes_wait_for_the_flush_and_go_out_in_order() {
        use tokio::io::AsyncWriteExt;
        let (mut io, mut peer) = busy_pair().await;
        io.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n")
            .await
            .expect("head");
        io.write_all(b"body").await.expect("body");
        assert!(
            readable(&mut peer, Duration::from_millis(100)).await.is_empty(),
            "nothing is sent before the flush"
        );
        io.flush().await.expect("flush");
        let got = readable(&mut peer, Duration::from_millis(200)).await;
        assert_eq!(got, b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nbody");
        // Between requests the buffer is given back.
        assert!(io.wbuf.capacity() > 0);
        io.next_request(Duration::from_secs(5));
        assert_eq!(io.wbuf.capacity(), 0);
    }

    #[tokio::test]
    async fn a_large_write_sends_what_was_buffered_first() {
        use tokio::io::AsyncWriteExt;
        let (mut io, mut peer) = busy_pair().await;
        io.write_all(b"head:").await.expect("head");
        let big = vec![b'x'; WRITE_BUF * 2];
        io.write_all(&big).await.expect("big");
        io.flush().await.expect("flush");
        let got = readable(&mut peer, Duration::from_millis(200)).await;
        assert_eq!(got.len(), 5 + big.len());
        assert!(got.starts_with(b"head:x"));
        // Vectored writes keep the order as well.
        io.write_all(b"a").await.expect("a");
        let n = io
            .write_vectored(&[io::IoSlice::new(b"bc"), io::IoSlice::new(b"d")])
            .await
            .expect("vectored");
        assert_eq!(n, 3);
        AsyncWriteExt::shutdown(&mut io).await.expect("shutdown flushes");
        assert_eq!(readable(&mut peer, Duration::from_millis(200)).await, b"abcd");
    }

    #[test]
    fn canned_answers_are_complete_http_responses() {
        let r = canned(431);
        let text = std::str::from_utf8(&r).expect("ascii");
        assert!(
            text.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{text}"
        );
        assert!(text.contains("connection: close\r\n"));
        assert!(!text.to_ascii_lowercase().contains("server:"));
        assert_eq!(status_of(b"HTTP/1.1 400 Bad Request\r\n"), Some(400));
        assert_eq!(status_of(b"HTTP/1.1"), None);
    }
}
