//! Listening sockets built with `socket2` from an options struct and converted to tokio at the edge.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// How to build a listening socket.
#[derive(Debug, Clone)]
pub struct ListenOptions {
    pub addr: SocketAddr,
    pub backlog: i32,
    /// Lets several processes or threads share one address (the kernel spreads connections).
    pub reuse_port: bool,
}

impl ListenOptions {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            backlog: 1024,
            reuse_port: false,
        }
    }
}

/// Binds a non-blocking std listener.
pub fn bind_std(opts: &ListenOptions) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(opts.addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if opts.reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket
        .bind(&SockAddr::from(opts.addr))
        .map_err(|e| io::Error::new(e.kind(), format!("cannot bind {}: {e}", opts.addr)))?;
    socket.listen(opts.backlog)?;
    Ok(socket.into())
}

/// Binds a tokio listener (must be called inside a runtime).
pub fn bind(opts: &ListenOptions) -> io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::from_std(bind_std(opts)?)
}
