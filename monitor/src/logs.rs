//! Program output capture: a child's stdout/stderr pipe is copied into a log file rotated by size
//! (`<file>.1` … `<file>.<backups>`, like Supervisord), and each chunk is also broadcast to `tail -f` followers.
//! Also reads the tail of a log for the API.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use nix::errno::Errno;
use nix::fcntl::AtFlags;
use nix::fcntl::OFlag;
use nix::sys::stat::{Mode, SFlag};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::broadcast;
use tracing::warn;

use crate::program::LogSpec;

/// How a log is opened to be written.
const APPEND: OFlag = OFlag::O_WRONLY.union(OFlag::O_APPEND);

/// Largest tail the API returns.
pub const MAX_TAIL_BYTES: u64 = 1024 * 1024;

/// A log file that rotates when it would grow past `maxbytes`, at the end of a line.
#[derive(Debug)]
pub struct RotatingLog {
    path: PathBuf,
    maxbytes: u64,
    backups: u32,
    file: File,
    size: u64,
}

impl RotatingLog {
    pub fn open(spec: &LogSpec) -> std::io::Result<Option<Self>> {
        let Some(path) = &spec.path else { return Ok(None) };
        if let Some(dir) = path.parent() {
            guarded_dir(dir, true)?;
        }
        let file = open_log(path)?;
        let meta = file.metadata()?;
        Ok(Some(Self {
            path: path.clone(),
            // Only a regular file rotates: a device (`/dev/stdout`, Supervisord's idiom in a container) or a
            // FIFO counted its bytes up to `maxbytes` and then renamed `/dev/stdout` itself to a backup.
            maxbytes: if meta.is_file() { spec.maxbytes } else { 0 },
            backups: spec.backups,
            file,
            size: meta.len(),
        }))
    }

    pub fn write(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            // The file may have been emptied behind our back (`ctl clear`, logrotate's copytruncate): its
            // real size, not the count of what we wrote, says whether it is full.
            if self.maxbytes > 0 && self.size >= self.maxbytes {
                self.size = self.file.metadata()?.len();
            }
            if self.maxbytes > 0 && self.size >= self.maxbytes {
                self.rotate()?;
            }
            let room = if self.maxbytes > 0 {
                (self.maxbytes - self.size) as usize
            } else {
                data.len()
            };
            let n = if data.len() <= room {
                data.len()
            } else {
                // Rotate at a line's end, so a line is not cut across two files: this file takes the whole
                // lines that fit; with none, the chunk starts the next file (when this one holds anything).
                // Only a line longer than a whole file is cut.
                match data[..room].iter().rposition(|b| *b == b'\n') {
                    Some(i) => i + 1,
                    None if self.size > 0 => {
                        self.rotate()?;
                        continue;
                    }
                    None => room.max(1),
                }
            };
            self.file.write_all(&data[..n])?;
            self.size += n as u64;
            data = &data[n..];
        }
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        if self.backups == 0 {
            self.file.set_len(0)?;
            self.file.seek(SeekFrom::Start(0))?;
            self.size = 0;
            return Ok(());
        }
        // Shifted already when the log is not there: the last rotation's open failed (no descriptor, no
        // inode), and shifting again on each write, into the file it left open, pushed every backup off the end.
        let (dir, name) = dir_and_name(&self.path)?;
        if nix::sys::stat::fstatat(&dir, name, AtFlags::AT_SYMLINK_NOFOLLOW).is_ok() {
            shift_backups(&dir, name, self.backups)?;
        }
        self.file = open_guarded(APPEND | OFlag::O_CREAT, &self.path)?;
        self.size = 0;
        Ok(())
    }
}

/// The most symbolic links one path resolves through, the kernel's own limit (`ELOOP` past it).
const MAX_LINKS: u32 = 40;

/// What [`walk`] opens at the end of a path.
#[derive(Clone, Copy)]
enum End {
    /// The file, with these flags (`O_NONBLOCK`, `O_NOFOLLOW` and `O_CLOEXEC` added).
    File(OFlag),
    /// The directory (`O_PATH`), each one missing on the way made when `create`.
    Dir { create: bool },
}

/// Whose links the monitor follows: root's and its own user's.
fn trusted(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw()
}

/// Opens `path` with `flags` ([`walk`]).
fn open_guarded(flags: OFlag, path: &Path) -> std::io::Result<File> {
    walk(path, End::File(flags), &trusted).map(File::from)
}

/// The directory `dir`, made with the ones missing above it when `create` ([`walk`]): where a log's
/// backups are renamed and removed, by name, never past a link a program's user put there.
fn guarded_dir(dir: &Path, create: bool) -> std::io::Result<OwnedFd> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    walk(dir, End::Dir { create }, &trusted)
}

/// Opens what `path` names as `end` says, following a symbolic link, in any of its components, only when a
/// user `trust` accepts owns it (root or the monitor's own, [`trusted`]) and it lies in a directory such a
/// user owns that no other may write to, or a sticky one (where only a link's owner may move it). The
/// monitor (root) opens its programs' logs, rotates and clears them, in directories a program's user may
/// write to: a link that user put in a log's place, or in the place of a directory on its path
/// (`/srv/app/logs` for `/srv/app/logs/out.log`), had root make, append the program's output to, rename,
/// empty or remove files anywhere on the host, and `tail` serve them. Root's links, such as `/dev/stdout`,
/// are followed, by a monitor not running as root too (a container's user).
///
/// The path is walked one name at a time from a descriptor of the directory reached, each opened without
/// following a link, and a link is checked on a descriptor of the link itself before its text is read:
/// checked by name first and followed after, a link swapped in between passed. A link under `/proc`
/// (`/dev/stdout` leads to `/proc/self/fd/1`, whose text is `pipe:[...]` in a container) names no path: the
/// kernel follows it, once its owner is checked. The file is opened non-blocking, so a FIFO put in a log's
/// place does not hold the open until a reader comes.
fn walk(path: &Path, end: End, trust: &dyn Fn(u32) -> bool) -> std::io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    const DIR: OFlag = OFlag::O_PATH.union(OFlag::O_DIRECTORY).union(OFlag::O_CLOEXEC);
    let bytes = path.as_os_str().as_bytes();
    // A name with a `/` after it is a directory's, never a file's to open.
    if matches!(end, End::File(_)) && (bytes.ends_with(b"/") || bytes.ends_with(b"/.")) {
        return Err(Errno::EISDIR.into());
    }
    let start = if path.is_absolute() { "/" } else { "." };
    let mut dir = nix::fcntl::open(start, DIR, Mode::empty())?;
    let mut left = names(bytes);
    let mut links = 0;
    while let Some(name) = left.pop_front() {
        let last = left.is_empty();
        let (how, mode) = match end {
            End::File(flags) if last => (
                flags | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o666),
            ),
            _ => (DIR, Mode::empty()),
        };
        let not_link = match nix::fcntl::openat(&dir, name.as_os_str(), how | OFlag::O_NOFOLLOW, mode) {
            Ok(fd) if last => return Ok(fd),
            Ok(fd) => {
                dir = fd;
                continue;
            }
            Err(Errno::ENOENT) if matches!(end, End::Dir { create: true }) => {
                match nix::sys::stat::mkdirat(&dir, name.as_os_str(), Mode::from_bits_truncate(0o755)) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(e.into()),
                }
                left.push_front(name);
                continue;
            }
            // What a link named with `O_NOFOLLOW` gives: itself, or a directory's place, not one.
            Err(e @ (Errno::ELOOP | Errno::ENOTDIR)) => e,
            Err(e) => return Err(e.into()),
        };
        // `O_PATH` with `O_NOFOLLOW` opens a link itself: its owner and text are then of this one link.
        let link = nix::fcntl::openat(
            &dir,
            name.as_os_str(),
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        let stat = nix::sys::stat::fstat(&link)?;
        if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFLNK {
            return Err(not_link.into());
        }
        let held = nix::sys::stat::fstat(&dir)?;
        let (others_write, sticky) = (held.st_mode & 0o022 != 0, held.st_mode & 0o1000 != 0);
        if !trust(stat.st_uid) || !trust(held.st_uid) || (others_write && !sticky) {
            let whose = match trust(stat.st_uid) {
                true => format!("in a directory uid {} or others may write to", held.st_uid),
                false => format!("owned by uid {}", stat.st_uid),
            };
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "{} leads through a symbolic link {whose}: the monitor follows only root's and its own, \
                     in directories only they may write to (`chown -h root` the link, or name its target)",
                    path.display()
                ),
            ));
        }
        links += 1;
        if links > MAX_LINKS {
            return Err(Errno::ELOOP.into());
        }
        let proc = nix::sys::statfs::fstatfs(&dir)
            .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::PROC_SUPER_MAGIC);
        if proc {
            let fd = nix::fcntl::openat(&dir, name.as_os_str(), how, mode)?;
            match last {
                true => return Ok(fd),
                false => dir = fd,
            }
            continue;
        }
        let text = nix::fcntl::readlinkat(&link, "")?;
        if text.as_bytes().starts_with(b"/") {
            dir = nix::fcntl::open("/", DIR, Mode::empty())?;
        }
        for name in names(text.as_bytes()).into_iter().rev() {
            left.push_front(name);
        }
    }
    match end {
        // The directory reached: the start itself (`.`, `/`), or where a link led.
        End::Dir { .. } => Ok(dir),
        // A link that led to `/` or `.` names no file.
        End::File(_) => Err(Errno::EISDIR.into()),
    }
}

/// A path's names, in order, without the empty ones and `.` (`..` stays: it leads to the parent of the
/// directory reached, as the kernel takes it).
fn names(path: &[u8]) -> std::collections::VecDeque<std::ffi::OsString> {
    use std::os::unix::ffi::OsStrExt;
    (path.split(|&b| b == b'/'))
        .filter(|n| !n.is_empty() && *n != b".")
        .map(|n| std::ffi::OsStr::from_bytes(n).to_owned())
        .collect()
}

/// The directory of `path` (walked, [`guarded_dir`]) and its file name, for calls by name within it.
fn dir_and_name(path: &Path) -> std::io::Result<(OwnedFd, &std::ffi::OsStr)> {
    let name = path.file_name().ok_or(Errno::EISDIR)?;
    Ok((guarded_dir(path.parent().unwrap_or(Path::new(".")), false)?, name))
}

/// Opens a log for appending. A FIFO or a device (a terminal, a pipe reopened through `/dev/stdout`) is
/// opened non-blocking: the writes happen on the monitor's runtime, and a FIFO opened for writing blocked
/// until a reader came (a log shipper started after the program froze the supervisor at the spawn), and a
/// full pipe or a terminal under flow control (^S) blocked each write. Now output that such a log does not
/// take at once is dropped, as for any failed write (`copy_pipe`). A FIFO is opened read-write, so it needs
/// no reader to open: what is written before one comes waits in the pipe.
fn open_log(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::FileTypeExt;
    let kind = match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => m.file_type(),
        _ => return open_guarded(APPEND | OFlag::O_CREAT, path),
    };
    let access = if kind.is_fifo() {
        OFlag::O_RDWR
    } else {
        OFlag::O_WRONLY
    };
    open_guarded(access | OFlag::O_APPEND | OFlag::O_NONBLOCK, path)
}

/// Whether `path` names a device or a FIFO rather than a file: under `/dev/`, or there already and not a
/// regular file. Such a log is never rotated.
pub fn is_device(path: &Path) -> bool {
    path.starts_with("/dev/") || std::fs::metadata(path).is_ok_and(|m| !m.is_file())
}

/// Empties the log at `path` and removes its rotated backups (`<path>.1`, ...). A writer keeps writing to
/// it: it appends, so its next write lands at the start of the emptied file.
pub fn clear(path: &Path) -> std::io::Result<()> {
    // A log never written may have no directory yet (one made at a program's first start): nothing to do.
    let (dir, name) = match dir_and_name(path) {
        Ok(found) => found,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    match open_guarded(OFlag::O_WRONLY, path) {
        // A FIFO or a device holds nothing to empty.
        Ok(f) if !f.metadata()?.is_file() => return Ok(()),
        Ok(f) => f.set_len(0)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        // A FIFO with no reader (opened non-blocking, it is refused rather than waited on).
        Err(e) if e.raw_os_error() == Some(nix::libc::ENXIO) => return Ok(()),
        Err(e) => return Err(e),
    }
    let mut entries = nix::dir::Dir::openat(
        &dir,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    for entry in entries.iter() {
        let entry = entry?;
        let backup = (entry.file_name().to_bytes())
            .strip_prefix(name.as_encoded_bytes())
            .and_then(|rest| rest.strip_prefix(b"."))
            .is_some_and(|n| !n.is_empty() && n.iter().all(u8::is_ascii_digit));
        if backup {
            nix::unistd::unlinkat(&dir, entry.file_name(), nix::unistd::UnlinkatFlags::NoRemoveDir)?;
        }
    }
    Ok(())
}

/// Moves `name` (in `dir`) to `<name>.1`, each `<name>.i` to `<name>.i+1`, and drops the one past `backups`
/// (at least 1). By name in the directory walked to, so a link put in its place since is not followed.
fn shift_backups(dir: &OwnedFd, name: &std::ffi::OsStr, backups: u32) -> std::io::Result<()> {
    let numbered = |i: u32| {
        let mut s = name.to_owned();
        s.push(format!(".{i}"));
        s
    };
    let rename = |from: &std::ffi::OsStr, to: &std::ffi::OsStr| match nix::fcntl::renameat(dir, from, dir, to)
    {
        // Not there: a backup not made yet, or the log itself gone (its directory removed and made again),
        // nothing to keep, and the reopen makes it.
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(std::io::Error::from(e)),
    };
    for i in (1..backups).rev() {
        rename(&numbered(i), &numbered(i + 1))?;
    }
    rename(name, &numbered(1))
}

/// Rotates the monitor's own log ([`own_log_file`]: `up --detach`'s `monitor.log`) once it holds `maxbytes`,
/// as Supervisord's `logfile_maxbytes` and `logfile_backups` do for its own: the file moves to `<file>.1`
/// (or is removed with no backups), a new one takes its place, and stderr (and stdout, when it wrote to the
/// same file) points at it. A line written meanwhile lands in the old file. Returns the file it rotated.
pub fn rotate_own_log(maxbytes: u64, backups: u32) -> std::io::Result<Option<PathBuf>> {
    use std::os::unix::fs::MetadataExt;
    if maxbytes == 0 {
        return Ok(None);
    }
    // The size first (one stat a second); which file it is only once it is full.
    let err = std::fs::metadata("/proc/self/fd/2")?;
    if !err.is_file() || err.len() < maxbytes {
        return Ok(None);
    }
    let Some(path) = own_log_file() else {
        return Ok(None);
    };
    let out = std::fs::metadata("/proc/self/fd/1").ok();
    let stdout_too = out.is_some_and(|o| (o.dev(), o.ino()) == (err.dev(), err.ino()));
    if backups == 0 {
        std::fs::remove_file(&path)?;
    } else {
        let (dir, name) = dir_and_name(&path)?;
        shift_backups(&dir, name, backups)?;
    }
    let file = OpenOptions::new().create(true).append(true).open(&path)?;
    nix::unistd::dup2_stderr(&file).map_err(std::io::Error::from)?;
    if stdout_too {
        nix::unistd::dup2_stdout(&file).map_err(std::io::Error::from)?;
    }
    Ok(Some(path))
}

/// Copies a child's pipe into `log` (if any) and to followers until the pipe closes.
pub async fn copy_pipe(
    mut pipe: impl AsyncRead + Unpin,
    log: Option<SharedLog>,
    followers: broadcast::Sender<Bytes>,
) {
    let mut buf = vec![0u8; 8192];
    // A failed write drops its chunk, not the log: the next chunk is tried again, so a disk full for a
    // minute loses that minute's output, where before the file stayed frozen until the program restarted.
    let mut failing = false;
    loop {
        let n = match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if let Some(l) = &log {
            let mut guard = l.lock().unwrap_or_else(|p| p.into_inner());
            match guard.write(&buf[..n]) {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!(path = %guard.path.display(), "program log written again");
                }
                Ok(()) => {}
                Err(e) if !failing => {
                    failing = true;
                    warn!(path = %guard.path.display(), error = %e,
                        "cannot write program log; dropping output until a write succeeds (followers still get it)");
                }
                Err(_) => {}
            }
        }
        let _ = followers.send(Bytes::copy_from_slice(&buf[..n]));
    }
}

/// What a program writes from now on, for `tail -f`. A reader too slow for the program's output skips
/// ahead, and says so on a line of its own: it skipped in silence, so the end of one line ran into the
/// middle of another, and that spliced line (`620322741385` between 620324 and 2741386) read as output.
pub fn follow(rx: broadcast::Receiver<Bytes>) -> impl futures_util::Stream<Item = Bytes> {
    use tokio::sync::broadcast::error::RecvError;
    // The state's flag: what went out last ended its line (so the notice needs no line end of its own).
    futures_util::stream::unfold((rx, true), |(mut rx, at_line_start)| async move {
        match rx.recv().await {
            Ok(b) => {
                let ends = b.last().map_or(at_line_start, |c| *c == b'\n');
                Some((b, (rx, ends)))
            }
            Err(RecvError::Lagged(n)) => {
                let notice = format!(
                    "{}[xcluster: {n} chunk{} of output skipped here, this reader fell behind; the log file has them]\n",
                    if at_line_start { "" } else { "\n" },
                    if n == 1 { "" } else { "s" },
                );
                Some((Bytes::from(notice), (rx, true)))
            }
            Err(RecvError::Closed) => None,
        }
    })
}

/// A log shared by stdout and stderr when `redirect_stderr` is set.
pub type SharedLog = std::sync::Arc<std::sync::Mutex<RotatingLog>>;

/// The end of a log file in whole lines, at most `bytes` bytes of it (bounded by [`MAX_TAIL_BYTES`]); empty if
/// it does not exist yet. A tail that starts mid-file leaves out the cut first line, as `tail -n` shows
/// lines (`ctl tail`'s first line used to start mid-word), unless that line is all the window holds: a line
/// longer than the window is shown cut rather than not at all.
///
/// A path that is not a regular file (`/dev/stdout` in a container, a FIFO) is refused with
/// `ErrorKind::Unsupported` before it is opened: opening a FIFO blocks until a writer comes, and reading a
/// pipe or terminal to its end never ends, so one request pinned a runtime worker for good.
pub fn tail(path: &Path, bytes: u64) -> std::io::Result<Vec<u8>> {
    let bytes = bytes.min(MAX_TAIL_BYTES);
    let len = match std::fs::metadata(path) {
        Ok(m) if m.is_file() => m.len(),
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                format!(
                    "{} is not a regular file (a device or a pipe), which keeps nothing to tail",
                    path.display()
                ),
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    // The size is the one just read: a file truncated since reads less, which `whole_lines` takes.
    let mut f = match open_guarded(OFlag::O_RDONLY, path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let start = len.saturating_sub(bytes);
    // One byte before the window says whether its first line is whole (that byte is a line end).
    let before = u64::from(start > 0);
    f.seek(SeekFrom::Start(start - before))?;
    let mut out = Vec::with_capacity((bytes + before).min(len) as usize);
    f.take(bytes + before).read_to_end(&mut out)?;
    Ok(whole_lines(out, before == 1))
}

/// `window` without its first line, when `after_byte` (it was read with the byte before it) and that line
/// is cut; a window that holds no line start keeps its cut line, better than nothing. Empty stays empty:
/// a file truncated between its size and the read (a rotation without backups, `ctl clear`) reads nothing,
/// and cutting one byte of nothing panicked.
fn whole_lines(mut window: Vec<u8>, after_byte: bool) -> Vec<u8> {
    if !after_byte {
        return window;
    }
    let cut = match window.iter().position(|&b| b == b'\n') {
        // The byte before was a line end: the window starts with a whole line.
        Some(0) => 1,
        Some(end) if end + 1 < window.len() => end + 1,
        _ => 1,
    };
    window.split_off(cut.min(window.len()))
}

/// The file this process's stderr writes to, when it is a regular file (`xcluster up --detach`'s log); `None`
/// for a terminal, a pipe or a socket (the journal).
pub fn own_log_file() -> Option<std::path::PathBuf> {
    let path = std::fs::read_link("/proc/self/fd/2").ok()?;
    std::fs::metadata(&path).ok()?.is_file().then_some(path)
}

/// What `path` gained past `*at`, at most `max` bytes, moving `*at` on; from the start again when the file
/// shrank (truncated or replaced by a rotation).
pub async fn read_from(path: &Path, at: &mut u64, max: u64) -> std::io::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let owned = path.to_owned();
    let f = tokio::task::spawn_blocking(move || open_guarded(OFlag::O_RDONLY, &owned))
        .await
        .map_err(std::io::Error::other)??;
    let mut f = tokio::fs::File::from_std(f);
    let len = f.metadata().await?.len();
    if len < *at {
        *at = 0;
    }
    f.seek(SeekFrom::Start(*at)).await?;
    let mut out = Vec::with_capacity(len.saturating_sub(*at).min(max) as usize);
    f.take(max).read_to_end(&mut out).await?;
    *at += out.len() as u64;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log `p.log` in `dir` rotating at `maxbytes` with `backups`: its path, and it opened.
    fn rotating_in(dir: &Path, maxbytes: u64, backups: u32) -> (PathBuf, RotatingLog) {
        let path = dir.join("p.log");
        let spec = LogSpec {
            path: Some(path.clone()),
            maxbytes,
            backups,
        };
        (path, RotatingLog::open(&spec).unwrap().unwrap())
    }

    /// `<path>.<i>`: a backup's name.
    fn numbered(path: &Path, i: u32) -> PathBuf {
        let mut s = path.as_os_str().to_owned();
        s.push(format!(".{i}"));
        PathBuf::from(s)
    }

    /// A reader of the FIFO at `path` that needs no writer to open (non-blocking).
    fn fifo_reader(path: &Path) -> File {
        use std::os::unix::fs::OpenOptionsExt;
        (OpenOptions::new().read(true).custom_flags(nix::libc::O_NONBLOCK))
            .open(path)
            .unwrap()
    }

    fn make_fifo(dir: &Path) -> PathBuf {
        let path = dir.join("out.fifo");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        path
    }

    /// A log that is not a regular file (a FIFO here; `/dev/stdout` in a container) is never rotated: a
    /// rotation renamed it to a backup and put a plain file in its place.
    #[test]
    fn a_log_that_is_no_regular_file_is_not_rotated() {
        let dir = tempfile::tempdir().unwrap();
        let path = make_fifo(dir.path());
        let mut reader = fifo_reader(&path);
        let spec = LogSpec {
            path: Some(path.clone()),
            maxbytes: 16,
            backups: 2,
        };
        let mut log = RotatingLog::open(&spec).unwrap().unwrap();
        for _ in 0..10 {
            log.write(b"0123456789\n").unwrap();
        }
        drop(log);
        // The writer is gone, so the read ends (0) once it has taken what was written.
        let mut all = Vec::new();
        reader.read_to_end(&mut all).unwrap();
        assert_eq!(all.len(), 110, "every line reached the reader");
        assert!(is_device(&path) && !numbered(&path, 1).exists());
    }

    /// A FIFO log with no reader yet blocks neither its open (the supervisor froze at the program's spawn
    /// until a log shipper started) nor a write the pipe has no room for (that output is dropped); a reader
    /// that comes later gets what the pipe held.
    #[test]
    fn a_fifo_log_without_a_reader_blocks_neither_its_open_nor_its_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = make_fifo(dir.path());
        let spec = LogSpec {
            path: Some(path.clone()),
            maxbytes: 0,
            backups: 0,
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let writer = std::thread::spawn(move || {
            let mut log = RotatingLog::open(&spec).unwrap().unwrap();
            // 1 MiB, far more than a pipe holds.
            let taken = (0..64).filter(|_| log.write(&[b'x'; 16 * 1024]).is_ok()).count();
            tx.send(taken).unwrap();
            log
        });
        let taken =
            (rx.recv_timeout(std::time::Duration::from_secs(10))).expect("the log's open or a write blocked");
        assert!((1..64).contains(&taken), "{taken} of 64 writes taken");
        let log = writer.join().unwrap();
        let mut buf = vec![0u8; 4096];
        let n = fifo_reader(&path).read(&mut buf).unwrap();
        assert!(n > 0 && buf[..n].iter().all(|b| *b == b'x'), "{n}");
        drop(log);
    }

    /// A log in a directory its program's user may write to: a symbolic link that user put in the log's
    /// place is not followed, by the open, `clear` or `tail` (root appended the program's output
    /// to, or emptied, the file it named); the monitor's own links are, as `/dev/stdout` is.
    #[test]
    fn a_log_follows_only_the_monitors_own_symbolic_links() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, "kept\n").unwrap();
        let path = dir.path().join("p.log");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let spec = LogSpec {
            path: Some(path.clone()),
            maxbytes: 0,
            backups: 0,
        };
        let mut ours = RotatingLog::open(&spec).unwrap().unwrap();
        ours.write(b"ours\n").unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "kept\nours\n");
        if !nix::unistd::geteuid().is_root() {
            eprintln!("the rest not run: giving the link to another user needs root");
            return;
        }
        std::os::unix::fs::lchown(&path, Some(65534), None).unwrap();
        let err = RotatingLog::open(&spec).unwrap_err();
        assert!(
            err.to_string().contains("symbolic link owned by uid 65534"),
            "{err}"
        );
        assert!(clear(&path).is_err());
        assert!(tail(&path, 64).is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "kept\nours\n");
    }

    /// A link in the place of a directory on a log's path is judged as one in the log's place: checked only
    /// there, a program's user who may write to `/srv/app` replaced `logs` by a link to `/etc`, and root
    /// made `/etc/out.log` and appended the program's output to it. Links of a trusted user, relative,
    /// chained, or into `/proc`, are followed. (The links here are the test's own user's; `walk` is told
    /// whom to trust, so this runs as any user.)
    #[test]
    fn a_log_follows_only_trusted_links_on_its_whole_path() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let [app, elsewhere] = ["app", "elsewhere"].map(|d| dir.path().join(d));
        std::fs::create_dir(&app).unwrap();
        std::fs::create_dir(&elsewhere).unwrap();
        symlink(&elsewhere, app.join("logs")).unwrap();
        symlink("logs", app.join("chain")).unwrap();
        symlink("../elsewhere/./", app.join("relative")).unwrap();
        let me = nix::unistd::geteuid().as_raw();
        let (ours, theirs) = (move |uid: u32| uid == me, |uid: u32| uid == u32::MAX - 1);
        let append = End::File(APPEND | OFlag::O_CREAT);
        for (via, name) in [("logs", "a.log"), ("chain", "b.log"), ("relative", "c.log")] {
            let path = app.join(via).join(name);
            let mut log = File::from(walk(&path, append, &ours).unwrap());
            log.write_all(b"ours\n").unwrap();
            assert_eq!(std::fs::read_to_string(elsewhere.join(name)).unwrap(), "ours\n");
            let err = walk(&app.join(via).join("new.log"), append, &theirs).unwrap_err();
            assert!(err.to_string().contains("symbolic link owned by uid"), "{err}");
            let err = walk(&app.join(via).join("sub"), End::Dir { create: true }, &theirs).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
        }
        assert!(!elsewhere.join("new.log").exists() && !elsewhere.join("sub").exists());
        // Through `/proc/self` (root's) and this process's own descriptor of a pipe (its user's).
        let (read_end, write_end) = nix::unistd::pipe().unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&write_end);
        let mut out = File::from(walk(Path::new(&format!("/proc/self/fd/{fd}")), append, &ours).unwrap());
        out.write_all(b"through /proc\n").unwrap();
        let mut got = [0u8; 14];
        File::from(read_end).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"through /proc\n");
        let not_dir = walk(&app.join("logs/a.log/x"), End::File(OFlag::O_RDONLY), &ours).unwrap_err();
        assert_eq!(not_dir.raw_os_error(), Some(nix::libc::ENOTDIR));
        symlink("loop", app.join("loop")).unwrap();
        let looped = walk(&app.join("loop/x"), End::File(OFlag::O_RDONLY), &ours).unwrap_err();
        assert_eq!(looped.raw_os_error(), Some(nix::libc::ELOOP));
        let slash = walk(&app.join("logs/"), append, &ours).unwrap_err();
        assert_eq!(slash.raw_os_error(), Some(nix::libc::EISDIR));
        // A directory others may write to holds no link the monitor follows, whoever owns it.
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
        symlink(&elsewhere, open.join("logs")).unwrap();
        let err = walk(&open.join("logs/a.log"), append, &ours).unwrap_err();
        assert!(err.to_string().contains("others may write to"), "{err}");
    }

    /// Rotating and clearing a log rename and remove files by name in the directory walked to: through a
    /// link a program's user put in a directory's place, root renamed and removed the files of that name
    /// wherever it led. A FIFO put in a log's place is refused at once, not waited on for a reader.
    #[test]
    fn rotating_and_clearing_stay_in_the_logs_own_directory() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut log) = rotating_in(dir.path(), 8, 2);
        for line in ["aaa\n", "bbb\n", "ccc\n", "ddd\n", "eee\n", "fff\n"] {
            log.write(line.as_bytes()).unwrap();
        }
        assert!(numbered(&path, 1).exists() && numbered(&path, 2).exists());
        clear(&path).unwrap();
        assert!(!numbered(&path, 1).exists() && !numbered(&path, 2).exists());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");

        let fifo = dir.path().join("f.log");
        nix::unistd::mkfifo(&fifo, Mode::from_bits_truncate(0o600)).unwrap();
        let refused = open_guarded(APPEND | OFlag::O_CREAT, &fifo).unwrap_err();
        assert_eq!(
            refused.raw_os_error(),
            Some(nix::libc::ENXIO),
            "no reader: refused, not waited on"
        );
        clear(&fifo).unwrap();
    }

    /// A write that fails drops its chunk, not the log: once the log can be written again, output lands
    /// in it again (here its directory was removed, so a rotation failed, and then made again).
    #[tokio::test]
    async fn a_failed_log_write_drops_only_its_chunk() {
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path().join("logs");
        let path = logs.join("p.log");
        let spec = LogSpec {
            path: Some(path.clone()),
            maxbytes: 8,
            backups: 1,
        };
        let log: SharedLog =
            std::sync::Arc::new(std::sync::Mutex::new(RotatingLog::open(&spec).unwrap().unwrap()));
        let (tx, mut rx) = broadcast::channel(16);
        let (mut w, r) = tokio::io::duplex(64);
        let copier = tokio::spawn(copy_pipe(r, Some(log), tx));
        async fn send(w: &mut tokio::io::DuplexStream, rx: &mut broadcast::Receiver<Bytes>, line: &str) {
            w.write_all(line.as_bytes()).await.unwrap();
            assert_eq!(rx.recv().await.unwrap(), line, "followers get every chunk");
        }
        send(&mut w, &mut rx, "one1234\n").await;
        std::fs::remove_dir_all(&logs).unwrap();
        // Full: the rotation's reopen fails, and so does this chunk.
        send(&mut w, &mut rx, "lost567\n").await;
        std::fs::create_dir(&logs).unwrap();
        send(&mut w, &mut rx, "back890\n").await;
        drop(w);
        copier.await.unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "back890\n");
    }

    /// A log that is a FIFO or a device is refused at once: opening the FIFO blocked until a writer came,
    /// and a request to tail it pinned a runtime worker for good.
    #[test]
    fn a_log_that_is_not_a_file_is_refused_without_being_opened() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("out.fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let path = fifo.clone();
        // On a thread of its own, so a regression hangs that thread, not the test.
        std::thread::spawn(move || tx.send(tail(&path, 100).map_err(|e| e.kind())));
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("a FIFO's tail answers, not blocks");
        assert_eq!(got, Err(std::io::ErrorKind::Unsupported));
        assert_eq!(
            tail(Path::new("/dev/null"), 100).map_err(|e| e.kind()),
            Err(std::io::ErrorKind::Unsupported)
        );
    }

    /// A file read empty (truncated between its size and the read) gives an empty tail, not a panic.
    #[test]
    fn an_empty_window_gives_an_empty_tail() {
        assert!(whole_lines(Vec::new(), true).is_empty());
        assert!(
            whole_lines(b"x".to_vec(), true).is_empty(),
            "only the byte before"
        );
        assert_eq!(
            whole_lines(b"xcut".to_vec(), true),
            b"cut",
            "no line start: the cut line"
        );
        assert_eq!(whole_lines(b"\nab\n".to_vec(), true), b"ab\n");
        assert_eq!(whole_lines(b"cut\nab\n".to_vec(), true), b"ab\n");
        assert_eq!(whole_lines(b"cut\n".to_vec(), false), b"cut\n");
    }

    /// A follower that falls behind says where it skipped, on a line of its own, and goes on.
    #[tokio::test]
    async fn a_lagging_follower_says_it_skipped() {
        use futures_util::StreamExt;
        let (tx, rx) = broadcast::channel(2);
        let mut more = std::pin::pin!(follow(rx));
        for chunk in ["a1\na2", "-cut\n", "b1\n", "c1\n"] {
            tx.send(Bytes::from(chunk)).unwrap();
        }
        let notice = more.next().await.unwrap();
        assert_eq!(
            notice,
            "[xcluster: 2 chunks of output skipped here, this reader fell behind; the log file has them]\n"
        );
        assert_eq!(more.next().await.unwrap(), "b1\n");
        assert_eq!(more.next().await.unwrap(), "c1\n");
        tx.send(Bytes::from("d1\nd2")).unwrap();
        assert_eq!(more.next().await.unwrap(), "d1\nd2");
        for chunk in ["e1\n", "f1\n", "g1\n"] {
            tx.send(Bytes::from(chunk)).unwrap();
        }
        // The last chunk out ended mid-line: the notice starts a line of its own.
        let notice = more.next().await.unwrap();
        assert!(
            notice.starts_with(b"\n[xcluster: 1 chunk of output"),
            "{notice:?}"
        );
        drop(tx);
        assert_eq!(more.next().await.unwrap(), "f1\n");
        assert_eq!(more.next().await.unwrap(), "g1\n");
        assert!(more.next().await.is_none());
    }

    /// A followed log is read on from where the last read ended, in chunks, and from the start once it
    /// shrank.
    #[tokio::test]
    async fn a_followed_log_reads_what_it_gained() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.log");
        std::fs::write(&path, "one\n").unwrap();
        let mut at = 4;
        assert!(read_from(&path, &mut at, 64).await.unwrap().is_empty());
        std::fs::write(&path, "one\ntwo\nthree\n").unwrap();
        assert_eq!(read_from(&path, &mut at, 4).await.unwrap(), b"two\n");
        assert_eq!(read_from(&path, &mut at, 64).await.unwrap(), b"three\n");
        std::fs::write(&path, "new\n").unwrap();
        assert_eq!(read_from(&path, &mut at, 64).await.unwrap(), b"new\n");
        assert_eq!(at, 4);
    }

    #[test]
    fn rotates_by_size_and_keeps_backups() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut log) = rotating_in(dir.path(), 1024, 2);
        for i in 0..5u8 {
            log.write(&[b'a' + i; 1024]).unwrap();
        }
        assert_eq!(std::fs::read(&path).unwrap(), vec![b'e'; 1024]);
        assert_eq!(std::fs::read(numbered(&path, 1)).unwrap(), vec![b'd'; 1024]);
        assert_eq!(std::fs::read(numbered(&path, 2)).unwrap(), vec![b'c'; 1024]);
        assert!(!numbered(&path, 3).exists());
        assert_eq!(tail(&path, 3).unwrap(), b"eee");
    }

    /// A tail from mid-file starts at a line: the cut first line is left out, unless it is all there is.
    #[test]
    fn tail_starts_at_a_whole_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.log");
        std::fs::write(&path, b"aaa\nbbb\nccc\n").unwrap();
        let tail = |n| String::from_utf8(tail(&path, n).unwrap()).unwrap();
        assert_eq!(tail(6), "ccc\n", "cut first line left out");
        assert_eq!(tail(8), "bbb\nccc\n", "the window starts at a line");
        assert_eq!(tail(9), "bbb\nccc\n");
        assert_eq!(tail(12), "aaa\nbbb\nccc\n", "the whole file");
        assert_eq!(tail(100), "aaa\nbbb\nccc\n");
        assert_eq!(tail(3), "cc\n", "no line start in the window: the cut line");
        assert_eq!(tail(0), "");
        std::fs::write(&path, b"aaa\nbbbbbbbb").unwrap();
        assert_eq!(tail(5), "bbbbb", "an unended last line longer than the window");
        assert_eq!(tail(9), "bbbbbbbb", "an unended last line");
        assert_eq!(super::tail(&dir.path().join("none.log"), 10).unwrap(), b"");
    }

    /// A file ends at a line's end: a chunk over the room left is split after its last line that fits, a
    /// chunk with no line end in the room starts the next file, and only a line longer than a file is cut.
    #[test]
    fn rotates_at_a_line_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.log");
        let spec = LogSpec {
            path: Some(path.clone()),
            maxbytes: 10,
            backups: 5,
        };
        let mut log = RotatingLog::open(&spec).unwrap().unwrap();
        log.write(b"aaa\nbbb\nccc\n").unwrap();
        log.write(b"dddddd\n").unwrap();
        log.write(b"0123456789abcde\n").unwrap();
        let files: Vec<String> = (1..=4)
            .rev()
            .map(|i| String::from_utf8(std::fs::read(numbered(&path, i)).unwrap()).unwrap())
            .chain([String::from_utf8(std::fs::read(&path).unwrap()).unwrap()])
            .collect();
        assert_eq!(
            files,
            ["aaa\nbbb\n", "ccc\n", "dddddd\n", "0123456789", "abcde\n"]
        );
    }

    /// A clear empties the file under a live writer and removes the backups (and only them); the writer
    /// goes on at the start of the file and rotates by the file's real size, not by what it wrote before.
    #[test]
    fn a_clear_empties_the_log_under_its_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.log");
        let other = dir.path().join("p.log.old");
        std::fs::write(&other, b"kept").unwrap();
        let spec = LogSpec {
            path: Some(path.clone()),
            maxbytes: 1024,
            backups: 2,
        };
        let mut log = RotatingLog::open(&spec).unwrap().unwrap();
        for i in 0..4u8 {
            log.write(&[b'a' + i; 1024]).unwrap();
        }
        clear(&path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"");
        assert!(!numbered(&path, 1).exists() && !numbered(&path, 2).exists());
        assert_eq!(std::fs::read(&other).unwrap(), b"kept");
        log.write(b"after").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"after");
        assert!(
            !numbered(&path, 1).exists(),
            "rotated a file that is far from full"
        );
        log.write(&[b'z'; 1019]).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1024);
        assert!(!numbered(&path, 1).exists());
        log.write(b"next").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"next");
        assert_eq!(std::fs::metadata(numbered(&path, 1)).unwrap().len(), 1024);
        // Clearing a log that was never written is no error.
        clear(&dir.path().join("none.log")).unwrap();
        clear(&dir.path().join("no-dir/none.log")).unwrap();
    }
}
