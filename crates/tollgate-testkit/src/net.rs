//! The mock's own accept loop over real TCP, so an answer can end in a true TCP reset.
//!
//! Each connection's socket is wrapped in `Socket`, whose drop sets `SO_LINGER` to zero
//! when a handler armed its `ConnectionReset`: closing then sends RST instead of FIN.
//! Connections live in a `JoinSet` owned by the loop, so stopping the loop stops them all.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tower::ServiceExt;

/// Request extension: lets a handler turn its connection's close into a reset.
#[derive(Debug, Clone, Default)]
pub(crate) struct ConnectionReset(Arc<AtomicBool>);

impl ConnectionReset {
    /// The connection will be closed with RST when hyper lets go of it.
    pub(crate) fn arm(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

pub(crate) async fn accept_loop(listener: TcpListener, app: Router) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve_connection(stream, app.clone()));
                }
                Err(error) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "mock upstream: accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = connections.join_next() => {}
        }
    }
}

async fn serve_connection(stream: TcpStream, app: Router) {
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "mock upstream: TCP_NODELAY not set");
    }
    let reset = ConnectionReset::default();
    let socket = Socket {
        inner: stream,
        reset: reset.clone(),
    };
    let service = hyper::service::service_fn(move |mut request: http::Request<Incoming>| {
        request.extensions_mut().insert(reset.clone());
        app.clone().oneshot(request)
    });
    let served = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(socket), service)
        .await;
    if let Err(error) = served {
        tracing::debug!(%error, "mock upstream: connection ended");
    }
}

/// A TCP stream that closes with RST once its `ConnectionReset` is armed.
struct Socket {
    inner: TcpStream,
    reset: ConnectionReset,
}

impl Drop for Socket {
    fn drop(&mut self) {
        if self.reset.0.load(Ordering::SeqCst) {
            if let Err(error) = self.inner.set_zero_linger() {
                tracing::debug!(%error, "mock upstream: SO_LINGER not set");
            }
        }
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
