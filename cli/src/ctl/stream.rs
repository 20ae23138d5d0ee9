//! `ctl tail`: a log copied to stdout. With `-f`, as it comes, until the monitor ends the stream or the reader
//! of our output goes away. A quiet log writes nothing, so a closed output (`ctl tail -f lb-0 | head -1`)
//! showed only at the program's next line (EPIPE, or SIGPIPE): the wait for the stream watches stdout too.

use std::io::{BufReader, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use nix::libc;

use super::client::read_chunk;
use super::{EXIT_FAILED, Failure, io_failure};

/// Copies the chunks of a followed log to stdout; 0 once the stream ends or our output is closed.
pub(super) fn copy_chunks(r: &mut BufReader<TcpStream>) -> Result<i32, Failure> {
    let mut out = std::io::stdout();
    loop {
        // What is buffered is read at once; only an empty buffer waits on the socket.
        if r.buffer().is_empty() && wait(r.get_ref(), out.as_fd()).map_err(io_failure)? == Ready::OutputClosed
        {
            return Ok(0);
        }
        let Some(chunk) = read_chunk(r)? else {
            return Ok(0);
        };
        if let Err(e) = out.write_all(&chunk).and_then(|()| out.flush()) {
            return Ok(unwritable(&e));
        }
    }
}

/// Copies a whole (bounded) answer to stdout, telling the monitor's failure (a timeout) from our output's.
pub(super) fn copy_all(r: &mut impl Read) -> Result<i32, Failure> {
    let mut out = std::io::stdout().lock();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_failure(e)),
        };
        if let Err(e) = out.write_all(&buf[..n]) {
            return Ok(unwritable(&e));
        }
    }
    Ok(out.flush().map_or_else(|e| unwritable(&e), |()| 0))
}

/// The exit code after a failed write: a reader gone is the normal end of a pipeline, quietly; anything else
/// (a full disk) is an error.
fn unwritable(e: &std::io::Error) -> i32 {
    if e.kind() == ErrorKind::BrokenPipe {
        return 0;
    }
    eprintln!("xcluster ctl: cannot write the log: {e}");
    EXIT_FAILED
}

#[derive(Debug, PartialEq, Eq)]
enum Ready {
    /// The stream has something to read (or has ended).
    Input,
    OutputClosed,
}

/// Waits until `input` is readable or `output` closed, within `input`'s read timeout: none while following (a
/// quiet log is not a dead monitor).
fn wait(input: &TcpStream, output: BorrowedFd<'_>) -> std::io::Result<Ready> {
    let limit = match input.read_timeout()? {
        None => -1,
        Some(t) => libc::c_int::try_from(t.as_millis()).unwrap_or(libc::c_int::MAX),
    };
    let mut fds = [
        libc::pollfd {
            fd: input.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        // No events asked: poll still reports POLLERR (a pipe whose reader is gone) and POLLHUP (a terminal
        // or socket hung up); a regular file reports neither.
        libc::pollfd {
            fd: output.as_raw_fd(),
            events: 0,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: two valid pollfds, borrowed for the call.
        match unsafe { libc::poll(fds.as_mut_ptr(), 2, limit) } {
            0 => return Err(ErrorKind::TimedOut.into()),
            n if n > 0 => break,
            _ => {}
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(if fds[1].revents & (libc::POLLERR | libc::POLLHUP) != 0 {
        Ready::OutputClosed
    } else {
        Ready::Input
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A connected pair of sockets on loopback.
    fn tcp_pair() -> (TcpStream, TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        (a, l.accept().unwrap().0)
    }

    /// A pipe whose reader is gone reads as a closed output, while the input has nothing to say.
    #[test]
    fn a_closed_pipe_is_seen_without_writing() {
        let (quiet, _other_end) = tcp_pair();
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        assert_eq!(wait(&quiet, writer.as_fd()).unwrap(), Ready::OutputClosed);
    }

    #[test]
    fn input_is_seen_while_the_output_is_open() {
        let (input, mut other_end) = tcp_pair();
        let (_reader, writer) = std::io::pipe().unwrap();
        other_end.write_all(b"x").unwrap();
        assert_eq!(wait(&input, writer.as_fd()).unwrap(), Ready::Input);
    }

    /// Not following, the socket's read timeout bounds the wait.
    #[test]
    fn a_silent_input_times_out_by_its_read_timeout() {
        let (input, _other_end) = tcp_pair();
        input
            .set_read_timeout(Some(std::time::Duration::from_millis(50)))
            .unwrap();
        let (_reader, writer) = std::io::pipe().unwrap();
        let e = wait(&input, writer.as_fd()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TimedOut);
    }
}
