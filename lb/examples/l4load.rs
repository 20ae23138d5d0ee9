//! Load tools for `scripts/bench/l4` (a benchmark helper, not a test):
//! - `echo ADDR`: an echo backend (one thread);
//! - `record ADDR`: a backend that sends back the client's first TLS record and closes (first, so no
//!   TIME_WAIT is left on the client's side of a connection per exchange);
//! - `pingpong ADDR CONNS SECS SIZE`: small messages over long-lived connections; prints
//!   `msgs_per_sec p50_us p99_us`;
//! - `hello ADDR CONNS SECS`: a new connection per exchange, each sending a real TLS ClientHello (OpenSSL's,
//!   naming `shop.example.com`) to a `record` backend, reading it back and then the close; prints
//!   `conns_per_sec p50_us p99_us`;
//! - `idle ADDR CONNS`: opens CONNS connections, one echoed byte on each, prints `ready` and holds them until
//!   stdin closes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let arg = |i: usize| -> anyhow::Result<&str> {
        args.get(i)
            .map(String::as_str)
            .ok_or_else(|| anyhow::anyhow!("usage: l4load echo|record|pingpong|hello|idle ADDR ..."))
    };
    let addr: SocketAddr = arg(1)?.parse()?;
    match arg(0)? {
        "echo" => rt.block_on(echo(addr)),
        "record" => rt.block_on(record(addr)),
        "pingpong" => rt.block_on(pingpong(
            addr,
            arg(2)?.parse()?,
            Duration::from_secs_f64(arg(3)?.parse()?),
            arg(4)?.parse()?,
        )),
        "hello" => rt.block_on(hello(
            addr,
            arg(2)?.parse()?,
            Duration::from_secs_f64(arg(3)?.parse()?),
        )),
        "idle" => rt.block_on(idle(addr, arg(2)?.parse()?)),
        other => anyhow::bail!("unknown mode {other}"),
    }
}

async fn echo(addr: SocketAddr) -> anyhow::Result<()> {
    let l = TcpListener::bind(addr).await?;
    loop {
        let (mut s, _) = l.accept().await?;
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
}

async fn record(addr: SocketAddr) -> anyhow::Result<()> {
    let l = TcpListener::bind(addr).await?;
    loop {
        let (mut s, _) = l.accept().await?;
        tokio::spawn(async move {
            let mut head = [0u8; 5];
            if s.read_exact(&mut head).await.is_err() {
                return;
            }
            let mut rec = vec![0u8; 5 + usize::from(u16::from_be_bytes([head[3], head[4]]))];
            rec[..5].copy_from_slice(&head);
            if s.read_exact(&mut rec[5..]).await.is_ok() {
                let _ = s.write_all(&rec).await;
            }
        });
    }
}

/// Longest a ping-pong exchange may take before the run fails.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);

async fn pingpong(addr: SocketAddr, conns: usize, secs: Duration, size: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + secs;
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let mut s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        tasks.push(tokio::spawn(async move {
            let msg = vec![7u8; size];
            let mut back = vec![0u8; size];
            let mut lat: Vec<u32> = Vec::with_capacity(1 << 16);
            while Instant::now() < deadline {
                let t0 = Instant::now();
                let exchange = async {
                    s.write_all(&msg).await?;
                    s.read_exact(&mut back).await
                };
                // A proxy that stalls a connection fails the run rather than hang it.
                match tokio::time::timeout(EXCHANGE_TIMEOUT, exchange).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) => break,
                    Err(_) => anyhow::bail!("an exchange of {size} bytes took over {EXCHANGE_TIMEOUT:?}"),
                }
                lat.push(u32::try_from(t0.elapsed().as_micros()).unwrap_or(u32::MAX));
            }
            Ok(lat)
        }));
    }
    report(tasks).await
}

/// Waits for the tasks' latencies (µs) and prints the rate, the p50 and the p99.
async fn report(tasks: Vec<tokio::task::JoinHandle<anyhow::Result<Vec<u32>>>>) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
    };
    println!(
        "{:.0} {} {}",
        all.len() as f64 / elapsed,
        pct(0.50).unwrap_or(0),
        pct(0.99).unwrap_or(0)
    );
    Ok(())
}

/// The first record of `openssl s_client -servername shop.example.com` (322 bytes).
const HELLO: &[u8] = include_bytes!("../src/proxy/testdata/openssl_client_hello.bin");

async fn hello(addr: SocketAddr, conns: usize, secs: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + secs;
    let tasks = (0..conns)
        .map(|_| {
            tokio::spawn(async move {
                let mut back = vec![0u8; HELLO.len()];
                let mut lat: Vec<u32> = Vec::with_capacity(1 << 14);
                while Instant::now() < deadline {
                    let t0 = Instant::now();
                    let exchange = async {
                        let mut s = TcpStream::connect(addr).await?;
                        s.set_nodelay(true)?;
                        s.write_all(HELLO).await?;
                        s.read_exact(&mut back).await?;
                        // The backend closes first: its end, passed on by the proxy.
                        s.read(&mut back[..1]).await
                    };
                    match tokio::time::timeout(EXCHANGE_TIMEOUT, exchange).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => anyhow::bail!("a hello exchange failed: {e}"),
                        Err(_) => anyhow::bail!("a hello exchange took over {EXCHANGE_TIMEOUT:?}"),
                    }
                    lat.push(u32::try_from(t0.elapsed().as_micros()).unwrap_or(u32::MAX));
                }
                Ok(lat)
            })
        })
        .collect();
    report(tasks).await
}

async fn idle(addr: SocketAddr, conns: usize) -> anyhow::Result<()> {
    let mut held = Vec::with_capacity(conns);
    for _ in 0..conns {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(b"x").await?;
        let mut b = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut b)).await??;
        held.push(s);
    }
    println!("ready");
    let mut stdin = tokio::io::stdin();
    let mut sink = [0u8; 64];
    while stdin.read(&mut sink).await? > 0 {}
    drop(held);
    Ok(())
}
