//! DNS over TCP (RFC 1035 4.2.2, RFC 7766): two-byte length-prefixed
//! messages, answered in order on each connection by the same
//! [`CellDns::respond`] as UDP, so both transports parse and answer alike
//! (only the size limit differs, and RRL applies to UDP only).
//!
//! Connections are limited in number; one idle for [`IDLE`] (or slower than
//! that to send a message or to take a response) is closed.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{watch, Semaphore},
    task::JoinSet,
};

use crate::handler::{CellDns, Transport};

/// How long a client may stay idle between queries.
pub(crate) const IDLE: Duration = Duration::from_secs(10);
/// Connections open at once; more are closed on accept.
const MAX_CONNECTIONS: usize = 1024;
/// After a stop, how long a connection may still take to send the query
/// it has started (or was about to send): it is answered, then closed. A
/// client that connected just before the stop loses nothing.
const DRAIN: Duration = Duration::from_millis(500);

/// Serves `listener` until `stop` turns true.
pub(crate) async fn serve(listener: TcpListener, handler: Arc<CellDns>, mut stop: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut conns = JoinSet::new();
    loop {
        let (stream, src) = tokio::select! {
            r = listener.accept() => match r {
                Ok(r) => r,
                Err(e) => {
                    // Out of file descriptors, say: do not spin.
                    tracing::debug!(error = %e, "dns: tcp accept error");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        while conns.try_join_next().is_some() {}
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%src, "dns: too many tcp connections; closing a new one");
            continue;
        };
        let handler = handler.clone();
        let stop = stop.clone();
        conns.spawn(async move {
            connection(stream, src, &handler, stop).await;
            drop(slot);
        });
    }
    // Open connections answer what they have been sent, then close.
    let drained = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(DRAIN * 2, drained).await.is_err() {
        conns.abort_all();
        while conns.join_next().await.is_some() {}
    }
}

async fn connection(mut stream: TcpStream, src: SocketAddr, handler: &CellDns, mut stop: watch::Receiver<bool>) {
    let _ = stream.set_nodelay(true);
    let mut msg = Vec::new();
    let mut out = Vec::new();
    let mut framed = Vec::new();
    loop {
        let read = async {
            let mut len = [0u8; 2];
            stream.read_exact(&mut len).await?;
            msg.resize(usize::from(u16::from_be_bytes(len)), 0);
            stream.read_exact(&mut msg).await?;
            Ok::<_, std::io::Error>(())
        };
        tokio::pin!(read);
        let r = if *stop.borrow() {
            tokio::time::timeout(DRAIN, &mut read).await
        } else {
            tokio::select! {
                r = tokio::time::timeout(IDLE, &mut read) => r,
                // Stopping: the query being sent (if any) is still read
                // and answered, within the drain time.
                _ = stop.changed() => tokio::time::timeout(DRAIN, &mut read).await,
            }
        };
        match r {
            Ok(Ok(())) => {}
            _ => return, // closed, broken, idle, or stopping with nothing sent
        }
        if !handler.respond(&msg, src, Transport::Tcp, &mut out) {
            continue;
        }
        let Ok(len) = u16::try_from(out.len()) else {
            return; // cannot happen: responses are kept within 65 535 bytes
        };
        framed.clear();
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&out);
        match tokio::time::timeout(IDLE, stream.write_all(&framed)).await {
            Ok(Ok(())) => {}
            _ => return,
        }
    }
}
