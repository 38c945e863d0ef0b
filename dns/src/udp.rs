//! The UDP receive loop: each datagram is parsed, answered by [`CellDns`]
//! and sent back from the same task, with no task spawned and no channel
//! crossed per query.
//!
//! hickory's own UDP server spawns a task per datagram and hands each
//! response to a sender task over a channel; profiled under dnsperf that,
//! with its per-query logging spans, cost more than the answer itself.
//! Answers never wait on I/O here (the routing table is in memory), so one
//! loop per worker thread, all reading the same socket, answers in place.
//! TCP stays on hickory's server.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};

use hickory_proto::{
    op::{Header, HeaderCounts, MessageType, Metadata, OpCode},
    serialize::binary::{BinDecodable, BinDecoder, BinEncodable, BinEncoder},
};
use hickory_server::{
    net::{runtime::TokioTime, xfer::Protocol, NetError},
    proto::{op::ResponseCode, rr::Record},
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    zone_handler::{MessageResponse, MessageResponseBuilder, Queries},
};
use tokio::{net::UdpSocket, sync::watch};

use crate::handler::CellDns;

/// Largest datagram read; larger ones are truncated by the kernel and fail
/// to parse (a FORMERR answer).
const MAX_DATAGRAM: usize = 4096;

/// Collects the encoded response of one query.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Option<Vec<u8>>>>);

impl Capture {
    fn take(&self) -> Option<Vec<u8>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

#[async_trait::async_trait]
impl ResponseHandler for Capture {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        // Over UDP a response fits the payload size the client advertised
        // (512 without EDNS); what does not fit is left out and TC set.
        let id = response.metadata().id;
        let max = response.edns().map_or(512, |e| e.max_payload());
        let mut bytes = Vec::with_capacity(512);
        let mut encoder = BinEncoder::new(&mut bytes);
        encoder.set_max_size(max);
        let info = match response.destructive_emit(&mut encoder) {
            Ok(info) => info,
            Err(e) => {
                tracing::warn!(error = %e, "dns: cannot encode a response; answering SERVFAIL");
                bytes.clear();
                let mut metadata = Metadata::new(id, MessageType::Response, OpCode::Query);
                metadata.response_code = ResponseCode::ServFail;
                let header = Header {
                    metadata,
                    counts: HeaderCounts::default(),
                };
                header.emit(&mut BinEncoder::new(&mut bytes))?;
                ResponseInfo::from(header)
            }
        };
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(bytes);
        Ok(info)
    }
}

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

/// Answers one datagram; `None` when nothing is to be sent back.
async fn answer(handler: &CellDns, datagram: &[u8], src: SocketAddr, capture: &Capture) -> Option<Vec<u8>> {
    let mut decoder = BinDecoder::new(datagram);
    // Shorter than a header: not DNS, no answer.
    let header = Header::read(&mut decoder).ok()?;
    if header.metadata.message_type == MessageType::Response {
        // Never answer a response (reflection).
        return None;
    }
    match Request::from_bytes(datagram.to_vec(), src, Protocol::Udp) {
        Ok(request) => {
            handler.handle_request::<_, TokioTime>(&request, capture.clone()).await;
        }
        Err(_) => {
            // The header parsed but the rest did not: FORMERR, no question.
            let queries = Queries::read(&mut BinDecoder::new(&[]), 0).ok()?;
            let response =
                MessageResponseBuilder::new(&queries, None).error_msg(&header.metadata, ResponseCode::FormErr);
            capture.clone().send_response(response).await.ok()?;
        }
    }
    capture.take()
}

/// Serves `socket` until `stop` turns true.
pub(crate) async fn serve(socket: Arc<UdpSocket>, handler: Arc<CellDns>, mut stop: watch::Receiver<bool>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let capture = Capture::default();
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
        if let Some(out) = answer(&handler, &buf[..n], src, &capture).await {
            if let Err(e) = socket.send_to(&out, src).await {
                tracing::debug!(error = %e, %src, "dns: udp send failed");
            }
        }
    }
}
