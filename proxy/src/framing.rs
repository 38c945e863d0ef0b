//! HTTP/1.0 clients and chunked bodies.
//!
//! pingora frames a response body of unknown length as chunked, for any
//! client, and for an h2 cell adds the coding only after the proxy's
//! `response_filter`. An HTTP/1.0 client cannot read chunked (RFC 9112
//! §6.1): this downstream module, which runs last, takes the coding off
//! responses marked [`Http10`] by the proxy, so the body goes out
//! close-delimited. The module keeps no state (no allocation per request):
//! the mark travels in the response's extensions.

use std::any::Any;

use async_trait::async_trait;
use pingora::{
    http::ResponseHeader,
    modules::http::{HttpModule, HttpModuleBuilder, Module},
    Result,
};

/// Marks a response to an HTTP/1.0 request.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Http10;

#[derive(Debug)]
pub(crate) struct Http10Framing;

#[async_trait]
impl HttpModule for Http10Framing {
    async fn response_header_filter(&mut self, resp: &mut ResponseHeader, _end_of_stream: bool) -> Result<()> {
        if resp.extensions_mut().remove::<Http10>().is_some() {
            resp.remove_header(&http::header::TRANSFER_ENCODING);
            resp.remove_header(&http::header::TRAILER);
        }
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

#[derive(Debug)]
pub(crate) struct Http10FramingBuilder;

impl HttpModuleBuilder for Http10FramingBuilder {
    fn init(&self) -> Module {
        // A unit struct: boxing it does not allocate.
        Box::new(Http10Framing)
    }
}
