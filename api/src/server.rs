//! The HTTP/1.1 server under the poem endpoint: our own accept loop over hyper's HTTP/1
//! connection, in place of `poem::Server`.
//!
//! Why not `poem::Server`: it serves every connection through hyper-util's `auto` builder
//! (HTTP/1 or h2c, sniffed), inside a spawned future that carries the HTTP/2 settings, the
//! endpoint and several tokens. An open SSE stream is one connection held for minutes, and
//! heaptrack put about 30 KB of a 31 KB stream in that per-connection state. Served by
//! `hyper::server::conn::http1` directly, a connection is hyper's read buffer and header
//! buffer plus a small task (`docs/bench-chat.md`, "SSE capacity").
//!
//! What it keeps of poem's server: TCP_NODELAY on every connection, graceful shutdown (stop
//! accepting, let each connection finish its in-flight response, then close; after `drain` the
//! remaining connections are dropped), the poem `Request` with local and remote addresses. What it
//! adds: a header-read timeout (slow clients are closed; hyper's timer also closes a keep-alive
//! connection idle that long, hence a default above common proxy idle timeouts), a cap on the
//! request head, a growing pause after accept errors such as running out of file descriptors (poem
//! retried at once, spinning), and a 500 for a panicking handler (`CatchPanic` in
//! `startup::routes`). HTTP/2 is not served: the API is HTTP/1.1 (docs/architecture/api.md); a
//! TLS-terminating proxy in front may speak HTTP/2 to clients.

use std::convert::Infallible;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use poem::endpoint::BoxEndpoint;
use poem::http::uri::Scheme;
use poem::web::{LocalAddr, RemoteAddr};
use poem::{Addr, Endpoint, EndpointExt, IntoEndpoint, Request, Response};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// poem's response body type, as hyper serves it.
type Body = http_body_util::combinators::BoxBody<bytes::Bytes, io::Error>;

/// Limits of the HTTP/1 connections.
#[derive(Clone, Debug)]
pub struct ServerLimits {
    /// A request head (request line and headers) longer than this is answered 431.
    pub max_header_bytes: usize,
    /// A client that takes longer to send a request head is disconnected (also an idle
    /// keep-alive connection: the timer starts when the connection is ready for its next head).
    pub header_read_timeout: Duration,
    /// How long a graceful shutdown waits for in-flight responses before closing connections.
    pub drain: Duration,
}

/// Serve `app` on `listener` until `stop` is cancelled, then drain (see [`ServerLimits`]).
/// Connection-level failures (a client hanging up mid-request, a malformed request) end that
/// connection only.
pub async fn serve(
    listener: TcpListener,
    app: impl IntoEndpoint<Endpoint: 'static>,
    limits: ServerLimits,
    stop: CancellationToken,
) -> io::Result<()> {
    let local = LocalAddr(Addr::SocketAddr(listener.local_addr()?));
    let app: Arc<BoxEndpoint<'static, Response>> =
        Arc::new(app.into_endpoint().map_to_response().boxed());
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_header_bytes)
        .keep_alive(true);
    // Cancelled when the drain time is up: every connection still open is then dropped.
    let hard_stop = CancellationToken::new();
    let connections = TaskTracker::new();
    let mut failing = AcceptFailures::default();
    loop {
        let accepted = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, remote) = match accepted {
            Ok(accepted) => {
                failing.reset();
                accepted
            }
            Err(e) => {
                if let Some(pause) = failing.record(&e) {
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(pause) => {}
                    }
                }
                continue;
            }
        };
        // An SSE response writes its headers and then each event as a small write of its own;
        // with Nagle on, the first event after the headers waited for the client's delayed ACK
        // (tens of milliseconds, measured by `bench chat` as ~20 ms added to the first event).
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let peer = Peer {
            app: app.clone(),
            local: local.clone(),
            remote: RemoteAddr(Addr::SocketAddr(remote)),
        };
        // Boxed: hyper keeps a slot the size of the service's future for the connection's whole
        // life (2.3 KB for the unboxed poem call, measured with heaptrack); boxed, the slot is a
        // pointer and the future lives only while its request is being answered.
        let service = hyper::service::service_fn(move |req| Box::pin(peer.clone().call(req)));
        let conn = http.serve_connection(TokioIo::new(tcp), service);
        connections.spawn(serve_connection(conn, stop.clone(), hard_stop.clone()));
    }
    drop(listener);
    connections.close();
    if tokio::time::timeout(limits.drain, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = connections.len(),
            drain_secs = limits.drain.as_secs_f32(),
            "connections still open after the drain time; closing them"
        );
        hard_stop.cancel();
        connections.wait().await;
    }
    Ok(())
}

/// What one connection's requests are served with.
#[derive(Clone)]
struct Peer {
    app: Arc<BoxEndpoint<'static, Response>>,
    local: LocalAddr,
    remote: RemoteAddr,
}

impl Peer {
    async fn call(
        self,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> Result<hyper::Response<Body>, Infallible> {
        let req = Request::from((req, self.local, self.remote, Scheme::HTTP));
        Ok(self.app.get_response(req).await.into())
    }
}

/// Serve one connection until it ends; at `stop`, finish the response in flight and close;
/// at `hard_stop`, drop it.
async fn serve_connection<S>(
    conn: http1::Connection<TokioIo<TcpStream>, S>,
    stop: CancellationToken,
    hard_stop: CancellationToken,
) where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = Body>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::pin!(conn);
    let finished = tokio::select! {
        finished = conn.as_mut() => Some(finished),
        () = stop.cancelled() => None,
    };
    let finished = match finished {
        Some(finished) => finished,
        None => {
            // Finish the response in flight (open SSE streams end on the same token), then
            // close instead of waiting for the next request.
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                finished = conn.as_mut() => finished,
                () = hard_stop.cancelled() => return,
            }
        }
    };
    if let Err(e) = finished {
        // A client that hangs up or sends garbage; nothing of ours failed.
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Each open connection (an SSE stream is one, held for minutes) is a file descriptor, and
/// the usual soft limit (1,024) is far below what one API process holds (10,000 streams in
/// `bench chat`). Raise the soft limit to the hard one, as servers commonly do at start, and
/// say what it is; returns the limit now in force (`None` if it cannot be read).
pub fn raise_open_files_limit() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => {
            if limit < 4096 {
                tracing::warn!(
                    open_files = limit,
                    "low open-files limit: each connection (each SSE stream) takes one; raise \
                     the hard limit (LimitNOFILE=, ulimit -Hn)"
                );
            } else {
                tracing::info!(open_files = limit, "open-files limit");
            }
            Some(limit)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-files limit");
            None
        }
    }
}

/// Failed `accept`s in a row. A connection reset before it was accepted is the client's
/// business (no pause). Anything else (out of file descriptors, out of memory) lasts until
/// connections close: the loop pauses, 10 ms doubling to 1 s, so that it does not spin, and
/// logs the first failure and then at most one line per 10 s with the count.
#[derive(Default)]
struct AcceptFailures {
    in_a_row: u32,
    pause: Duration,
    logged: Option<std::time::Instant>,
}

impl AcceptFailures {
    fn reset(&mut self) {
        if self.in_a_row > 0 {
            tracing::info!(failures = self.in_a_row, "accepting connections again");
        }
        *self = Self::default();
    }

    /// How long to pause after `e` (`None`: retry at once).
    fn record(&mut self, e: &io::Error) -> Option<Duration> {
        if matches!(
            e.kind(),
            io::ErrorKind::ConnectionAborted
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionRefused
                | io::ErrorKind::Interrupted
        ) {
            return None;
        }
        self.in_a_row += 1;
        self.pause = (self.pause * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
        if self
            .logged
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(10))
        {
            tracing::warn!(error = %e, failures = self.in_a_row, "accept failed; pausing");
            self.logged = Some(std::time::Instant::now());
        }
        Some(self.pause)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_open_files_limit_is_raised_to_the_hard_limit() {
        let (_, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
        let low = hard.min(256);
        rlimit::setrlimit(rlimit::Resource::NOFILE, low, hard).unwrap();
        assert_eq!(raise_open_files_limit(), Some(hard));
        assert_eq!(
            rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap(),
            (hard, hard)
        );
    }

    #[test]
    fn accept_failures_pause_10_ms_doubling_to_1_s_and_reset() {
        let mut f = AcceptFailures::default();
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert_eq!(f.record(&reset), None, "a client's reset: no pause");
        let emfile = io::Error::from_raw_os_error(24);
        let pauses: Vec<_> = (0..9).filter_map(|_| f.record(&emfile)).collect();
        let ms: Vec<u128> = pauses.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        f.reset();
        assert_eq!(f.record(&emfile), Some(Duration::from_millis(10)));
    }
}
