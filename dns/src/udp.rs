//! The UDP workers: each one a thread of its own with a socket of its own
//! (`SO_REUSEPORT`, so the kernel spreads clients over the workers),
//! receiving up to [`BATCH`] datagrams per `recvmmsg`, answering each in
//! place (from the worker's [`AnswerCache`] when it can) and sending the
//! responses with one `sendmmsg`. No task, channel or allocation per query:
//! the buffers, the message headers and the cache are allocated when the
//! worker starts. The snapshot and the clocks are read once per batch.
//!
//! `recvmmsg` is nix's safe wrapper; `sendmmsg` is rustix's, which reports
//! how many messages went out (nix's reports it through an iterator that
//! reads address slots a send never fills).
//!
//! The socket is blocking (`MSG_WAITFORONE`: the call returns as soon as
//! one datagram is there, with whatever else is queued), so an idle worker
//! sleeps in the kernel. [`Workers::stop`] wakes them by shutting the
//! sockets' read side down; a receive timeout bounds the wait should a
//! kernel not wake them.

use std::{
    io::{IoSlice, IoSliceMut},
    net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use nix::sys::socket::{recvmmsg, MsgFlags, MultiHeaders, SockaddrLike, SockaddrStorage};
use rustix::net::{sendmmsg, MMsgHdr, SendAncillaryBuffer, SendFlags, SocketAddrAny};
use socket2::Socket;

use crate::{
    cache::AnswerCache,
    handler::{CellDns, Transport},
};

/// Datagrams per `recvmmsg`/`sendmmsg`.
pub(crate) const BATCH: usize = 32;
/// Largest datagram read (a UDP payload cannot be larger). The buffers are
/// allocated zeroed, so pages no datagram reached are never touched.
const MAX_DATAGRAM: usize = 65_535;
/// How long a blocked receive waits before it looks at the stop flag
/// again: the longest a stop waits for an idle worker.
const STOP_POLL: Duration = Duration::from_millis(100);

/// Whether a response may be sent to `src` (never to port 0, the
/// unspecified address or broadcast: a spoofed source would make us a
/// reflector).
fn answerable(src: SocketAddr) -> bool {
    src.port() != 0
        && match src.ip() {
            IpAddr::V4(v4) => !v4.is_unspecified() && !v4.is_broadcast(),
            IpAddr::V6(v6) => !v6.is_unspecified(),
        }
}

fn socket_addr(s: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = s.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    s.as_sockaddr_in6().map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
}

/// The running UDP workers.
pub(crate) struct Workers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Starts one worker per socket, each with a cache of `cache_entries`.
    pub(crate) fn start(sockets: Vec<Socket>, handler: Arc<CellDns>, cache_entries: usize) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut workers = Self {
            stop: stop.clone(),
            threads: Vec::new(),
        };
        for (i, socket) in sockets.into_iter().enumerate() {
            socket.set_nonblocking(false)?;
            socket.set_read_timeout(Some(STOP_POLL))?;
            let (handler, stop) = (handler.clone(), stop.clone());
            let thread = std::thread::Builder::new()
                .name(format!("cellgate-dns-{i}"))
                .spawn(move || Worker::new(socket, cache_entries).run(&handler, &stop))?;
            workers.threads.push(thread);
        }
        Ok(workers)
    }

    /// Asks the workers to stop; each notices within [`STOP_POLL`] (its
    /// receive timeout). The socket is never shut down to wake them: after
    /// an upgrade the same socket serves the next process.
    fn signal(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Stops every worker and waits for them.
    pub(crate) fn stop(mut self) {
        self.signal();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.signal();
        }
    }
}

/// One worker's socket and buffers.
struct Worker {
    socket: Socket,
    /// [`BATCH`] receive buffers of [`MAX_DATAGRAM`] bytes, end to end.
    bufs: Vec<u8>,
    lens: [usize; BATCH],
    /// Senders; `None`: not to be answered.
    from: [Option<SocketAddr>; BATCH],
    /// Responses, one per received datagram.
    out: Vec<Vec<u8>>,
    recv_headers: MultiHeaders<SockaddrStorage>,
    cache: AnswerCache,
}

impl Worker {
    fn new(socket: Socket, cache_entries: usize) -> Self {
        Self {
            socket,
            bufs: vec![0; BATCH * MAX_DATAGRAM],
            lens: [0; BATCH],
            from: [None; BATCH],
            out: (0..BATCH).map(|_| Vec::with_capacity(1232)).collect(),
            recv_headers: MultiHeaders::preallocate(BATCH, None),
            cache: AnswerCache::new(cache_entries),
        }
    }

    fn run(mut self, handler: &CellDns, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            let n = match self.receive() {
                Ok(n) => n,
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    // ICMP errors from earlier sends surface here on some
                    // systems; they concern one client, not the socket.
                    tracing::debug!(error = %e, "dns: udp receive error");
                    continue;
                }
            };
            // What was received is answered even when a stop came in the
            // meantime: nobody else will read those datagrams.
            let batch = handler.batch(Transport::Udp);
            let mut send = [0usize; BATCH];
            let mut m = 0;
            for i in 0..n {
                let Some(src) = self.from[i].filter(|&a| answerable(a)) else {
                    continue;
                };
                let msg = &self.bufs[i * MAX_DATAGRAM..i * MAX_DATAGRAM + self.lens[i]];
                if batch.respond(Some(&mut self.cache), msg, src, &mut self.out[i]) {
                    send[m] = i;
                    m += 1;
                }
            }
            drop(batch);
            self.send(&send[..m]);
        }
    }

    /// Receives a batch: how many datagrams, their lengths in `lens` and
    /// senders in `from`.
    fn receive(&mut self) -> nix::Result<usize> {
        let mut chunks = self.bufs.chunks_exact_mut(MAX_DATAGRAM);
        let mut iovs: [[IoSliceMut<'_>; 1]; BATCH] =
            std::array::from_fn(|_| [IoSliceMut::new(chunks.next().unwrap_or_default())]);
        let received = recvmmsg(
            self.socket.as_raw_fd(),
            &mut self.recv_headers,
            iovs.iter_mut(),
            MsgFlags::MSG_WAITFORONE,
            None,
        )?;
        let mut n = 0;
        for (i, r) in received.enumerate() {
            // A datagram longer than the buffer, or one with no sender,
            // is not answered.
            let whole = !r.flags.contains(MsgFlags::MSG_TRUNC);
            self.lens[i] = r.bytes.min(MAX_DATAGRAM);
            self.from[i] = r
                .address
                .filter(|a| whole && a.len() > 0)
                .as_ref()
                .and_then(socket_addr);
            n = i + 1;
        }
        Ok(n)
    }

    /// Sends the responses of the datagrams `which`.
    fn send(&mut self, which: &[usize]) {
        let nowhere = SocketAddrAny::from(SocketAddr::from(([0, 0, 0, 0], 0)));
        let mut rest = which;
        while !rest.is_empty() {
            let k = rest.len().min(BATCH);
            let (out, from) = (&self.out, &self.from);
            let to: [SocketAddrAny; BATCH] = std::array::from_fn(|j| {
                rest.get(j)
                    .and_then(|&i| from[i])
                    .map_or_else(|| nowhere.clone(), SocketAddrAny::from)
            });
            let iovs: [[IoSlice<'_>; 1]; BATCH] =
                std::array::from_fn(|j| [IoSlice::new(rest.get(j).map_or(&[][..], |&i| &out[i][..]))]);
            let mut control: [SendAncillaryBuffer<'_, '_, '_>; BATCH] =
                std::array::from_fn(|_| SendAncillaryBuffer::default());
            let mut j = 0;
            let mut msgs = control.each_mut().map(|c| {
                let m = MMsgHdr::new_with_addr(&to[j], &iovs[j], c);
                j += 1;
                m
            });
            match sendmmsg(&self.socket, &mut msgs[..k], SendFlags::empty()) {
                Ok(sent) => rest = &rest[sent.clamp(1, k)..],
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    // The first message failed: skip it, send the rest.
                    tracing::debug!(error = %e, "dns: udp send failed");
                    rest = &rest[1..];
                }
            }
        }
    }
}
