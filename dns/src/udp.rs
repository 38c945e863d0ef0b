//! The UDP receive loop: each datagram is read, answered by [`CellDns`]
//! and sent back from the same task, with no task spawned, no channel
//! crossed and no allocation per query. Answers never wait on I/O (the
//! routing table is in memory), so one loop per worker thread, all reading
//! the same socket, answers in place.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use tokio::{net::UdpSocket, sync::watch};

use crate::handler::{CellDns, Transport};

/// Largest datagram read (a UDP payload cannot be larger).
const MAX_DATAGRAM: usize = 65_535;

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

/// Serves `socket` until `stop` turns true.
pub(crate) async fn serve(socket: Arc<UdpSocket>, handler: Arc<CellDns>, mut stop: watch::Receiver<bool>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut out = Vec::with_capacity(4096);
    loop {
        let (n, src) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(e) => {
                    // ICMP errors from earlier sends surface here on some
                    // systems; they concern one client, not the socket.
                    tracing::debug!(error = %e, "dns: udp receive error");
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        if !answerable(src) {
            continue;
        }
        if handler.respond(&buf[..n], src, Transport::Udp, &mut out) {
            if let Err(e) = socket.send_to(&out, src).await {
                tracing::debug!(error = %e, %src, "dns: udp send failed");
            }
        }
    }
}
