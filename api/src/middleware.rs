//! Request body size limits on every route (API.md: 413 too large).
//!
//! A declared `Content-Length` over the limit is refused before anything is read; a body
//! without one (chunked) is read up to the limit and refused as soon as it passes it.

use poem::http::header;
use poem::{Endpoint, Middleware, Request, Result};

use crate::error::ApiError;

/// Limits request bodies; `upload_limit` applies to paths accepted by `is_upload`.
#[derive(Clone, Copy)]
pub struct BodyLimit {
    pub default_limit: usize,
    pub upload_limit: usize,
    pub is_upload: fn(&str) -> bool,
}

impl<E: Endpoint> Middleware<E> for BodyLimit {
    type Output = BodyLimitEndpoint<E>;

    fn transform(&self, ep: E) -> Self::Output {
        BodyLimitEndpoint {
            inner: ep,
            cfg: *self,
        }
    }
}

pub struct BodyLimitEndpoint<E> {
    inner: E,
    cfg: BodyLimit,
}

impl<E: Endpoint> Endpoint for BodyLimitEndpoint<E> {
    type Output = E::Output;

    async fn call(&self, mut req: Request) -> Result<Self::Output> {
        let limit = if (self.cfg.is_upload)(req.uri().path()) {
            self.cfg.upload_limit
        } else {
            self.cfg.default_limit
        };
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        match declared {
            Some(len) if len > limit as u64 => {
                return Err(ApiError::PayloadTooLarge { limit }.into());
            }
            Some(_) => {}
            None if req.headers().contains_key(header::TRANSFER_ENCODING) => {
                let body = req.take_body();
                let bytes = body
                    .into_bytes_limit(limit)
                    .await
                    .map_err(|_| ApiError::PayloadTooLarge { limit })?;
                req.set_body(bytes);
            }
            None => {}
        }
        self.inner.call(req).await
    }
}
