//! FUSE over io_uring (Linux 6.14 and later). Added by litefs, see `LITEFS-PATCH.md`.
//!
//! After `FUSE_INIT` granted `FUSE_OVER_IO_URING`, the kernel keeps one request queue
//! per possible CPU and hands a request to a ring entry registered on the queue of the
//! CPU the calling process runs on. Each entry here belongs to one thread pinned to that
//! CPU, with its own io_uring: the thread submits `FUSE_IO_URING_CMD_REGISTER` once,
//! then for every request it is handed it dispatches it like a `/dev/fuse` request and
//! answers with `FUSE_IO_URING_CMD_COMMIT_AND_FETCH`, which also waits for the next one.
//! A handler that blocks therefore holds up only its own entry.
//!
//! The kernel keeps `FORGET` and `INTERRUPT` (and requests queued before the rings were
//! complete) on `/dev/fuse`, so the session's `/dev/fuse` threads keep running.
//!
//! Layout of an entry (`include/uapi/linux/fuse.h`, `fs/fuse/dev_uring.c`):
//! - the header buffer is `struct fuse_uring_req_header`: `in_out` (the
//!   `fuse_in_header` of a request, the `fuse_out_header` of its reply), `op_in` (the
//!   request's first argument, its per-opcode struct) and `ring_ent_in_out` (`commit_id`
//!   and `payload_sz`, the bytes used in the payload buffer, in both directions);
//! - the payload buffer holds the request's other arguments and all of the reply's, and
//!   must be at least as big as the largest request or reply of the connection.

use std::alloc::Layout;
use std::io;
use std::io::IoSlice;
use std::os::fd::AsFd;
use std::os::fd::AsRawFd;
use std::os::fd::FromRawFd;
use std::os::fd::OwnedFd;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::Condvar;
use std::sync::Mutex;
use std::sync::atomic::AtomicU32;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::thread;
use std::thread::JoinHandle;
use std::time::Duration;
use std::time::Instant;

use log::debug;
use log::error;
use log::warn;

use crate::Filesystem;
use crate::KernelConfig;
use crate::channel::Channel;
use crate::channel::ChannelSender;
use crate::ll;
use crate::ll::flags::init_flags::InitFlags;
use crate::ll::fuse_abi as abi;
use crate::passthrough::BackingId;
use crate::request::RequestWithSender;
use crate::session::SessionEventLoop;

/// How requests reach the file system, as decided at `FUSE_INIT`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum IoUringStatus {
    /// Not asked for (`Config::io_uring_threads_per_cpu` is 0): `/dev/fuse` only.
    Off,
    /// The kernel did not offer `FUSE_OVER_IO_URING`: it is older than 6.14, built
    /// without `CONFIG_FUSE_IO_URING`, or `/sys/module/fuse/parameters/enable_uring`
    /// is `N`. `/dev/fuse` serves all requests.
    NotOffered,
    /// Offered, but the rings could not be set up (the reason); `/dev/fuse` serves all
    /// requests.
    Failed(String),
    /// Requests are served over io_uring.
    Active {
        /// Kernel queues, one per possible CPU.
        queues: usize,
        /// Threads (ring entries) per queue.
        threads_per_queue: usize,
    },
}

/// The io_uring state a session shares with its [`crate::BackgroundSession`].
#[derive(Debug, Default)]
pub(crate) struct Shared {
    status: Mutex<Option<IoUringStatus>>,
    decided: Condvar,
    requests: AtomicU64,
}

impl Shared {
    pub(crate) fn set_status(&self, status: IoUringStatus) {
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = Some(status);
        self.decided.notify_all();
    }

    /// The status once decided, waiting up to `wait` for the rings to register.
    pub(crate) fn status(&self, wait: Duration) -> Option<IoUringStatus> {
        let guard = self.status.lock().unwrap_or_else(|e| e.into_inner());
        let (guard, _) = self
            .decided
            .wait_timeout_while(guard, wait, |s| s.is_none())
            .unwrap_or_else(|e| e.into_inner());
        guard.clone()
    }

    /// Requests served over io_uring so far.
    pub(crate) fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

/// What the handshake decided to set up once the session runs.
#[derive(Debug)]
pub(crate) struct Plan {
    /// A ring without an owning thread, used to turn io_uring off again at the kernel
    /// if a queue's ring cannot be set up (see [`start`]).
    probe: Ring,
    threads_per_queue: usize,
    payload_size: usize,
}

/// Called during `FUSE_INIT` before the reply: asks for `FUSE_OVER_IO_URING` when the
/// kernel offers it and an io_uring can be created here. Once granted, the kernel holds
/// every request until all queues have an entry, so nothing may be left to fail later
/// that cannot be undone.
pub(crate) fn negotiate(
    threads_per_queue: usize,
    config: &mut KernelConfig,
) -> Result<Plan, IoUringStatus> {
    if threads_per_queue == 0 {
        return Err(IoUringStatus::Off);
    }
    if !config.capabilities.contains(InitFlags::FUSE_OVER_IO_URING) {
        return Err(IoUringStatus::NotOffered);
    }
    let probe = Ring::new(false).map_err(|e| {
        IoUringStatus::Failed(format!(
            "cannot create an io_uring with 128-byte entries: {e}"
        ))
    })?;
    config.requested |= InitFlags::FUSE_OVER_IO_URING;
    let page = page_size::get();
    // The kernel's `max_payload_sz`: max(FUSE_MIN_READ_BUFFER, max_write,
    // max_pages * PAGE_SIZE), where it caps max_pages at or below what is sent.
    let payload_size = (config.max_write as usize)
        .max(usize::from(config.max_pages()) * page)
        .max(FUSE_MIN_READ_BUFFER)
        .max(32 * page)
        .next_multiple_of(page);
    Ok(Plan {
        probe,
        threads_per_queue,
        payload_size,
    })
}

/// `FUSE_MIN_READ_BUFFER` in the kernel.
const FUSE_MIN_READ_BUFFER: usize = 8192;

/// Starts `threads_per_queue` threads per kernel queue, waits for their registrations
/// and publishes the outcome in `shared`. If any queue cannot be served the kernel is
/// told to stop waiting for the rings (a deliberately invalid registration makes it
/// drop io_uring for the connection) and `/dev/fuse` serves everything.
pub(crate) fn start<FS: Filesystem + Send + Sync + 'static>(
    plan: Plan,
    ch: &Channel,
    event_loop: impl Fn(String) -> SessionEventLoop<FS>,
    shared: &Arc<Shared>,
) -> Vec<JoinHandle<io::Result<()>>> {
    let queues = possible_cpus();
    let allowed = allowed_cpus();
    let (tx, rx) = mpsc::channel();
    let mut threads = Vec::new();
    let mut failure = None;
    'spawn: for qid in 0..queues {
        for t in 0..plan.threads_per_queue {
            let name = format!("fuser-ring-{qid}-{t}");
            let event_loop = event_loop(name.clone());
            let ch = ch.clone();
            let tx = tx.clone();
            let shared = shared.clone();
            let pin = allowed.contains(&qid).then_some(qid);
            let payload_size = plan.payload_size;
            let spawned = thread::Builder::new().name(name).spawn(move || {
                serve(
                    &ch,
                    qid as u16,
                    pin,
                    payload_size,
                    &event_loop,
                    &tx,
                    &shared,
                )
            });
            match spawned {
                Ok(handle) => threads.push(handle),
                Err(e) => {
                    failure = Some(format!("cannot start a ring thread: {e}"));
                    break 'spawn;
                }
            }
        }
    }
    drop(tx);
    // Registration does not block: each thread reports at once.
    let deadline = Instant::now() + Duration::from_secs(10);
    for _ in 0..threads.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                failure.get_or_insert(e);
            }
            Err(_) => {
                failure.get_or_insert_with(|| "ring threads did not register in time".into());
                break;
            }
        }
    }
    let status = match failure {
        None => IoUringStatus::Active {
            queues,
            threads_per_queue: plan.threads_per_queue,
        },
        Some(why) => {
            error!("FUSE over io_uring: {why}; serving all requests from /dev/fuse");
            if let Err(e) = plan.probe.disable_at_kernel(ch) {
                error!("could not turn FUSE over io_uring off again: {e}");
            }
            IoUringStatus::Failed(why)
        }
    };
    shared.set_status(status);
    threads
}

/// The body of a ring thread: register its entry, then serve requests until the
/// connection ends.
fn serve<FS: Filesystem>(
    ch: &Channel,
    qid: u16,
    pin: Option<usize>,
    payload_size: usize,
    event_loop: &SessionEventLoop<FS>,
    registered: &mpsc::Sender<Result<(), String>>,
    shared: &Shared,
) -> io::Result<()> {
    if let Some(cpu) = pin {
        pin_to(cpu);
    }
    let setup = Ring::new(true).and_then(|ring| Ok((ring, Entry::new(payload_size)?)));
    let (ring, mut entry) = match setup {
        Ok(x) => x,
        Err(e) => {
            let _ = registered.send(Err(format!("queue {qid}: {e}")));
            return Ok(());
        }
    };
    let fd = ch.as_fd().as_raw_fd();
    let first = ring.push(&entry.command(fd, CMD_REGISTER, qid, 0));
    let mut early = match first.and_then(|()| ring.submit()).map(|()| ring.peek()) {
        Ok(Some(res)) if res < 0 => {
            let e = io::Error::from_raw_os_error(-res);
            let _ = registered.send(Err(format!("queue {qid}: registration refused: {e}")));
            return Ok(());
        }
        Ok(early) => {
            let _ = registered.send(Ok(()));
            early
        }
        Err(e) => {
            // Whether the kernel took the entry is unknown: keep its buffers.
            std::mem::forget(entry);
            let _ = registered.send(Err(format!("queue {qid}: {e}")));
            return Ok(());
        }
    };
    let mut next = None;
    // Set while a replacement entry's registration is outstanding.
    let mut replaced = false;
    loop {
        let res = match (early.take(), next.take()) {
            (Some(res), _) => Ok(res),
            (None, None) => ring.wait(),
            (None, Some(cmd)) => ring.push(&cmd).and_then(|()| ring.wait()),
        };
        let res = match res {
            Ok(res) => res,
            Err(e) => {
                error!("FUSE over io_uring, queue {qid}: {e}");
                std::mem::forget(entry);
                return Err(e);
            }
        };
        match -res {
            ..=0 => {}
            // The connection ended (unmount, abort, the daemon's /dev/fuse closed) and
            // the kernel released the entry.
            libc::ENOTCONN | libc::ECONNABORTED | libc::ECANCELED | libc::ENODEV => {
                debug!("ring thread for queue {qid}: connection ended");
                return Ok(());
            }
            // The kernel kept the entry but will not hand it a request again (a commit
            // it could not match): carry on with a new one rather than leave the queue
            // a thread short.
            errno if !replaced => {
                let e = io::Error::from_raw_os_error(errno);
                error!("FUSE over io_uring, queue {qid}: {e}; registering a new entry");
                std::mem::forget(entry);
                entry = Entry::new(payload_size)?;
                next = Some(entry.command(fd, CMD_REGISTER, qid, 0));
                replaced = true;
                continue;
            }
            errno => {
                let e = io::Error::from_raw_os_error(errno);
                error!("FUSE over io_uring, queue {qid}: a new entry was refused: {e}");
                return Err(e);
            }
        }
        replaced = false;
        let unique = entry.handle(ch, event_loop);
        shared.requests.fetch_add(1, Ordering::Relaxed);
        next = Some(entry.command(fd, CMD_COMMIT_AND_FETCH, qid, unique));
    }
}

const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;
/// Sizes of `fuse_uring_req_header`'s `in_out` and `op_in`.
const IN_OUT_SZ: usize = 128;
const OP_IN_SZ: usize = 128;
/// Room before the payload where a request's headers are copied so that the request is
/// contiguous, as read from `/dev/fuse`.
const PREFIX: usize = 256;

/// `struct fuse_uring_ent_in_out`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct EntInOut {
    flags: u64,
    commit_id: u64,
    payload_sz: u32,
    padding: u32,
    reserved: u64,
}

/// `struct fuse_uring_req_header`.
#[repr(C)]
struct ReqHeader {
    in_out: [u8; IN_OUT_SZ],
    op_in: [u8; OP_IN_SZ],
    ent: EntInOut,
}

const _: () = assert!(size_of::<ReqHeader>() == 288);

/// One ring entry's buffers. The kernel writes into them while this thread waits in
/// `io_uring_enter`; in between they are only touched through the raw pointers here.
#[derive(Debug)]
struct Entry {
    header: NonNull<ReqHeader>,
    /// `PREFIX` bytes of room, then the payload buffer (mapped: pages the kernel never
    /// writes to are never allocated).
    buf: Map,
    payload_size: usize,
    /// `iov[0]` = header, `iov[1]` = payload, read by the kernel at registration.
    iov: Box<[libc::iovec; 2]>,
    reply: Arc<Slot>,
}

// SAFETY: the buffers are owned by the entry and only used by the thread owning it.
unsafe impl Send for Entry {}

impl Entry {
    fn new(payload_size: usize) -> io::Result<Entry> {
        let buf = Map::anonymous(PREFIX + payload_size)?;
        // SAFETY: the layout is not zero-sized.
        let header = NonNull::new(unsafe { std::alloc::alloc_zeroed(Layout::new::<ReqHeader>()) })
            .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?
            .cast::<ReqHeader>();
        let iov = Box::new([
            libc::iovec {
                iov_base: header.as_ptr().cast(),
                iov_len: size_of::<ReqHeader>(),
            },
            libc::iovec {
                // SAFETY: within the mapping.
                iov_base: unsafe { buf.at::<libc::c_void>(PREFIX as u32) },
                iov_len: payload_size,
            },
        ]);
        Ok(Entry {
            header,
            buf,
            payload_size,
            iov,
            reply: Arc::new(Slot::default()),
        })
    }

    /// A `IORING_OP_URING_CMD` SQE (128 bytes) for this entry.
    fn command(&self, fd: i32, cmd_op: u32, qid: u16, commit_id: u64) -> [u8; 128] {
        let mut sqe = [0u8; 128];
        sqe[0] = IORING_OP_URING_CMD;
        sqe[4..8].copy_from_slice(&fd.to_ne_bytes());
        sqe[8..12].copy_from_slice(&cmd_op.to_ne_bytes());
        sqe[16..24].copy_from_slice(&(self.iov.as_ptr() as u64).to_ne_bytes());
        sqe[24..28].copy_from_slice(&2u32.to_ne_bytes());
        // struct fuse_uring_cmd_req at the command area (byte 48): flags, commit_id, qid.
        sqe[56..64].copy_from_slice(&commit_id.to_ne_bytes());
        sqe[64..66].copy_from_slice(&qid.to_ne_bytes());
        sqe
    }

    /// Dispatches the request the kernel put into the buffers and writes the reply
    /// into them; returns the request's `unique` (its commit id).
    fn handle<FS: Filesystem>(&mut self, ch: &Channel, event_loop: &SessionEventLoop<FS>) -> u64 {
        const IN_HEADER: usize = size_of::<abi::fuse_in_header>();
        // SAFETY: the kernel is done writing (its CQE arrived) until the next submit.
        let (in_out, op_in, ent) = unsafe {
            let h = self.header.as_ptr();
            ((*h).in_out, (*h).op_in, (*h).ent)
        };
        let len = u32::from_ne_bytes([in_out[0], in_out[1], in_out[2], in_out[3]]) as usize;
        let unique = u64::from_ne_bytes(in_out[8..16].try_into().expect("8 bytes"));
        let payload_len = ent.payload_sz as usize;
        let op_len = len.checked_sub(IN_HEADER + payload_len);
        let Some(op_len) = op_len.filter(|&n| n <= OP_IN_SZ && payload_len <= self.payload_size)
        else {
            error!(
                "FUSE over io_uring: malformed request (len {len}, payload {payload_len}); \
                 answering EIO"
            );
            self.reply_error(unique, libc::EIO);
            return unique;
        };
        // Make the request contiguous (header, first argument, payload), as fuser parses
        // it, by copying the two headers just before the payload. Argument structs are
        // multiples of 8 bytes, so the start stays aligned for `fuse_in_header`.
        let start = PREFIX - IN_HEADER - op_len;
        let mut unaligned = Vec::new();
        // SAFETY: `start..PREFIX + payload_len` lies within `buf`, which nothing else
        // uses until the next submit.
        let data: &[u8] = unsafe {
            let base = self.buf.ptr.as_ptr();
            std::ptr::copy_nonoverlapping(in_out.as_ptr(), base.add(start), IN_HEADER);
            std::ptr::copy_nonoverlapping(op_in.as_ptr(), base.add(start + IN_HEADER), op_len);
            std::slice::from_raw_parts(base.add(start), len)
        };
        let data = if start % align_of::<abi::fuse_in_header>() == 0 {
            data
        } else {
            unaligned.resize(len.div_ceil(8), 0u64);
            let bytes: &mut [u8] = zerocopy::IntoBytes::as_mut_bytes(unaligned.as_mut_slice());
            bytes[..len].copy_from_slice(data);
            &bytes[..len]
        };
        self.reply.expect(unique);
        match RequestWithSender::new(ch.sender(), data) {
            Some(req) => {
                let req = req.over_ring(EntryReply {
                    slot: self.reply.clone(),
                    ch: ch.sender(),
                });
                let no_reply = matches!(
                    req.request.operation(),
                    Ok(ll::Operation::Forget(_) | ll::Operation::BatchForget(_))
                );
                req.dispatch(event_loop);
                if no_reply {
                    // The kernel sends these through /dev/fuse; should one come here,
                    // the entry still needs a commit.
                    self.reply.take_if_none(unique);
                }
            }
            None => {
                error!("FUSE over io_uring: unparsable request; answering EIO");
                self.reply_error(unique, libc::EIO);
                return unique;
            }
        }
        // The reply may come from another thread: wait for it before committing.
        let reply = self.reply.wait();
        self.write_reply(unique, &reply);
        self.reply.recycle(reply);
        unique
    }

    fn reply_error(&mut self, unique: u64, errno: i32) {
        let mut reply = Vec::with_capacity(16);
        reply.extend_from_slice(&16u32.to_ne_bytes());
        reply.extend_from_slice(&(-errno).to_ne_bytes());
        reply.extend_from_slice(&unique.to_ne_bytes());
        self.write_reply(unique, &reply);
    }

    /// Copies a reply (`fuse_out_header` then the reply's arguments) into the buffers.
    fn write_reply(&mut self, unique: u64, reply: &[u8]) {
        const OUT_HEADER: usize = size_of::<abi::fuse_out_header>();
        if reply.len() < OUT_HEADER || reply.len() - OUT_HEADER > self.payload_size {
            error!(
                "FUSE over io_uring: reply of {} bytes does not fit; answering EIO",
                reply.len()
            );
            return self.reply_error(unique, libc::EIO);
        }
        let payload = &reply[OUT_HEADER..];
        // SAFETY: the kernel does not touch the buffers until the next submit.
        unsafe {
            let h = &mut *self.header.as_ptr();
            h.in_out[..OUT_HEADER].copy_from_slice(&reply[..OUT_HEADER]);
            h.ent.payload_sz = payload.len() as u32;
            std::ptr::copy_nonoverlapping(
                payload.as_ptr(),
                self.buf.ptr.as_ptr().add(PREFIX),
                payload.len(),
            );
        }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        // SAFETY: allocated in `Entry::new` with this layout (the payload mapping is
        // unmapped by its own drop); an entry the kernel may still write into is
        // forgotten instead of dropped.
        unsafe { std::alloc::dealloc(self.header.as_ptr().cast(), Layout::new::<ReqHeader>()) };
    }
}

/// Where a reply to a ring request goes: the filesystem may send it from any thread.
#[derive(Debug, Default)]
struct Slot {
    state: Mutex<SlotState>,
    sent: Condvar,
}

#[derive(Debug, Default)]
struct SlotState {
    /// The request now being served.
    unique: u64,
    /// Its reply, once sent.
    reply: Option<Vec<u8>>,
    /// The ring thread waits for the reply (a notification is a system call, only
    /// needed then).
    waiting: bool,
    /// A buffer kept for the next reply.
    spare: Vec<u8>,
}

impl Slot {
    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn expect(&self, unique: u64) {
        let mut s = self.lock();
        s.unique = unique;
        s.reply = None;
    }

    fn send(&self, data: &[IoSlice<'_>]) -> io::Result<()> {
        let mut s = self.lock();
        let unique = data
            .first()
            .and_then(|h| h.get(8..16))
            .map(|u| u64::from_ne_bytes(u.try_into().expect("8 bytes")));
        if unique != Some(s.unique) || s.reply.is_some() {
            warn!("FUSE over io_uring: dropping a reply to a request no longer served");
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        let mut buf = std::mem::take(&mut s.spare);
        buf.clear();
        for d in data {
            buf.extend_from_slice(d);
        }
        s.reply = Some(buf);
        let waiting = s.waiting;
        drop(s);
        if waiting {
            self.sent.notify_all();
        }
        Ok(())
    }

    /// For a request that never gets a reply: answer it with ENOSYS.
    fn take_if_none(&self, unique: u64) {
        let mut s = self.lock();
        if s.reply.is_none() {
            let mut buf = Vec::with_capacity(16);
            buf.extend_from_slice(&16u32.to_ne_bytes());
            buf.extend_from_slice(&(-libc::ENOSYS).to_ne_bytes());
            buf.extend_from_slice(&unique.to_ne_bytes());
            s.reply = Some(buf);
        }
    }

    fn wait(&self) -> Vec<u8> {
        let mut s = self.lock();
        s.waiting = true;
        let mut s = self
            .sent
            .wait_while(s, |s| s.reply.is_none())
            .unwrap_or_else(|e| e.into_inner());
        s.waiting = false;
        // No later reply may match: unique 0 is never a request.
        s.unique = 0;
        s.reply.take().unwrap_or_default()
    }

    fn recycle(&self, buf: Vec<u8>) {
        self.lock().spare = buf;
    }
}

/// The reply channel of one ring request (see [`crate::reply::ReplySender`]).
#[derive(Debug, Clone)]
pub(crate) struct EntryReply {
    slot: Arc<Slot>,
    /// For what a reply does besides answering (passthrough backing files).
    ch: ChannelSender,
}

impl EntryReply {
    pub(crate) fn send(&self, data: &[IoSlice<'_>]) -> io::Result<()> {
        self.slot.send(data)
    }

    pub(crate) fn open_backing(&self, fd: std::os::fd::BorrowedFd<'_>) -> io::Result<BackingId> {
        self.ch.open_backing(fd)
    }

    pub(crate) unsafe fn wrap_backing(&self, id: u32) -> BackingId {
        // SAFETY: the caller's contract, as for `ChannelSender::wrap_backing`.
        unsafe { self.ch.wrap_backing(id) }
    }
}

const IORING_OP_URING_CMD: u8 = 46;
const IORING_SETUP_SQE128: u32 = 1 << 10;
const IORING_SETUP_SINGLE_ISSUER: u32 = 1 << 12;
const IORING_SETUP_DEFER_TASKRUN: u32 = 1 << 13;
const IORING_FEAT_SINGLE_MMAP: u32 = 1 << 0;
const IORING_ENTER_GETEVENTS: u32 = 1 << 0;
const IORING_OFF_SQ_RING: i64 = 0;
const IORING_OFF_CQ_RING: i64 = 0x0800_0000;
const IORING_OFF_SQES: i64 = 0x1000_0000;

/// `struct io_sqring_offsets` / `struct io_cqring_offsets` (same size and shape).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct RingOffsets {
    head: u32,
    tail: u32,
    ring_mask: u32,
    ring_entries: u32,
    /// sq: flags; cq: overflow.
    flags_or_overflow: u32,
    /// sq: dropped; cq: cqes.
    dropped_or_cqes: u32,
    /// sq: array; cq: flags.
    array_or_flags: u32,
    resv1: u32,
    user_addr: u64,
}

/// `struct io_uring_params`.
#[repr(C)]
#[derive(Debug, Default)]
struct Params {
    sq_entries: u32,
    cq_entries: u32,
    flags: u32,
    sq_thread_cpu: u32,
    sq_thread_idle: u32,
    features: u32,
    wq_fd: u32,
    resv: [u32; 3],
    sq_off: RingOffsets,
    cq_off: RingOffsets,
}

const _: () = assert!(size_of::<Params>() == 120);

/// A mapping of the ring's shared memory.
#[derive(Debug)]
struct Map {
    ptr: NonNull<u8>,
    len: usize,
}

impl Map {
    fn new(fd: &OwnedFd, len: usize, offset: i64) -> io::Result<Map> {
        // SAFETY: a fresh shared mapping of the io_uring fd, checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Map {
            ptr: NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap returned 0"))?,
            len,
        })
    }

    /// Private zeroed memory, allocated as it is first touched.
    fn anonymous(len: usize) -> io::Result<Map> {
        // SAFETY: a fresh private anonymous mapping, checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Map {
            ptr: NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap returned 0"))?,
            len,
        })
    }

    /// # Safety
    /// `off` plus the size of `T` must be within the mapping, aligned for `T`.
    unsafe fn at<T>(&self, off: u32) -> *mut T {
        // SAFETY: the caller's contract.
        unsafe { self.ptr.as_ptr().add(off as usize).cast() }
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: mapped in `Map::new` with this length.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A minimal io_uring with 128-byte SQEs, used for one command at a time.
#[derive(Debug)]
struct Ring {
    sqes: Map,
    cq: Option<Map>,
    sq: Map,
    params: Params,
    fd: OwnedFd,
}

// SAFETY: the mappings are only used through `&self` methods of the owning thread (a
// ring without `SINGLE_ISSUER` may be moved to another thread before use).
unsafe impl Send for Ring {}

impl Ring {
    /// `owned`: the calling thread is the only one to submit and wait (single issuer,
    /// task work run when it waits), as for every ring thread.
    fn new(owned: bool) -> io::Result<Ring> {
        let flags = if owned {
            IORING_SETUP_SQE128 | IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN
        } else {
            IORING_SETUP_SQE128
        };
        match Ring::with_flags(flags) {
            Err(e) if owned && e.raw_os_error() == Some(libc::EINVAL) => {
                Ring::with_flags(IORING_SETUP_SQE128)
            }
            r => r,
        }
    }

    fn with_flags(flags: u32) -> io::Result<Ring> {
        let mut params = Params {
            flags,
            ..Params::default()
        };
        // SAFETY: io_uring_setup(2) with a valid params struct.
        let fd =
            unsafe { libc::syscall(libc::SYS_io_uring_setup, 2u32, &mut params as *mut Params) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: io_uring_setup returned a new fd owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let sq_len = params.sq_off.array_or_flags as usize + params.sq_entries as usize * 4;
        let cq_len = params.cq_off.dropped_or_cqes as usize + params.cq_entries as usize * 16;
        let (sq, cq) = if params.features & IORING_FEAT_SINGLE_MMAP != 0 {
            (Map::new(&fd, sq_len.max(cq_len), IORING_OFF_SQ_RING)?, None)
        } else {
            (
                Map::new(&fd, sq_len, IORING_OFF_SQ_RING)?,
                Some(Map::new(&fd, cq_len, IORING_OFF_CQ_RING)?),
            )
        };
        let sqes = Map::new(&fd, params.sq_entries as usize * 128, IORING_OFF_SQES)?;
        Ok(Ring {
            sqes,
            cq,
            sq,
            params,
            fd,
        })
    }

    fn cq(&self) -> &Map {
        self.cq.as_ref().unwrap_or(&self.sq)
    }

    /// Queues one SQE (submitted by the next [`Ring::submit`] or [`Ring::wait`]).
    fn push(&self, sqe: &[u8; 128]) -> io::Result<()> {
        let off = self.params.sq_off;
        // SAFETY: the offsets come from the kernel for these mappings.
        unsafe {
            let tail = &*self.sq.at::<AtomicU32>(off.tail);
            let head = &*self.sq.at::<AtomicU32>(off.head);
            let mask = *self.sq.at::<u32>(off.ring_mask);
            let t = tail.load(Ordering::Relaxed);
            if t.wrapping_sub(head.load(Ordering::Acquire)) >= self.params.sq_entries {
                return Err(io::Error::other("io_uring submission queue full"));
            }
            let slot = t & mask;
            std::ptr::copy_nonoverlapping(sqe.as_ptr(), self.sqes.at::<u8>(slot * 128), 128);
            *self.sq.at::<u32>(off.array_or_flags + slot * 4) = slot;
            tail.store(t.wrapping_add(1), Ordering::Release);
        }
        Ok(())
    }

    /// Submits the queued SQEs without waiting.
    fn submit(&self) -> io::Result<()> {
        loop {
            match self.enter(self.unsubmitted(), 0) {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {
                    if self.unsubmitted() == 0 {
                        return Ok(());
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn unsubmitted(&self) -> u32 {
        let off = self.params.sq_off;
        // SAFETY: as in `submit`.
        unsafe {
            let tail = (*self.sq.at::<AtomicU32>(off.tail)).load(Ordering::Relaxed);
            let head = (*self.sq.at::<AtomicU32>(off.head)).load(Ordering::Acquire);
            tail.wrapping_sub(head)
        }
    }

    fn enter(&self, to_submit: u32, min_complete: u32) -> io::Result<i64> {
        let flags = if min_complete > 0 {
            IORING_ENTER_GETEVENTS
        } else {
            0
        };
        // SAFETY: io_uring_enter(2) on our ring, no signal mask.
        let r = unsafe {
            libc::syscall(
                libc::SYS_io_uring_enter,
                self.fd.as_raw_fd(),
                to_submit,
                min_complete,
                flags,
                std::ptr::null::<libc::sigset_t>(),
                0usize,
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }

    /// Takes a completion if there is one, returning its result.
    fn peek(&self) -> Option<i32> {
        let cq = self.cq();
        let off = self.params.cq_off;
        // SAFETY: the offsets come from the kernel for this mapping.
        unsafe {
            let head = &*cq.at::<AtomicU32>(off.head);
            let tail = &*cq.at::<AtomicU32>(off.tail);
            let mask = *cq.at::<u32>(off.ring_mask);
            let h = head.load(Ordering::Relaxed);
            if h == tail.load(Ordering::Acquire) {
                return None;
            }
            // struct io_uring_cqe: user_data u64, res i32, flags u32.
            let res = *cq.at::<i32>(off.dropped_or_cqes + (h & mask) * 16 + 8);
            head.store(h.wrapping_add(1), Ordering::Release);
            Some(res)
        }
    }

    /// Waits for the next completion (submitting what is still queued).
    fn wait(&self) -> io::Result<i32> {
        loop {
            if let Some(res) = self.peek() {
                return Ok(res);
            }
            match self.enter(self.unsubmitted(), 1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Makes the kernel give up io_uring for the connection, so that requests held for
    /// incomplete rings go to `/dev/fuse`: a registration the kernel must refuse (queue
    /// id out of range) resets its io_uring flag.
    fn disable_at_kernel(&self, ch: &Channel) -> io::Result<()> {
        let iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; 2];
        let mut sqe = [0u8; 128];
        sqe[0] = IORING_OP_URING_CMD;
        sqe[4..8].copy_from_slice(&ch.as_fd().as_raw_fd().to_ne_bytes());
        sqe[8..12].copy_from_slice(&CMD_REGISTER.to_ne_bytes());
        sqe[16..24].copy_from_slice(&(iov.as_ptr() as u64).to_ne_bytes());
        sqe[24..28].copy_from_slice(&2u32.to_ne_bytes());
        sqe[64..66].copy_from_slice(&u16::MAX.to_ne_bytes());
        self.push(&sqe)?;
        match self.wait()? {
            res if res < 0 => Ok(()),
            _ => Err(io::Error::other(
                "the kernel accepted an invalid registration",
            )),
        }
    }
}

/// The kernel's number of queues: `num_possible_cpus()`.
fn possible_cpus() -> usize {
    std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| parse_cpu_list(s.trim()))
        .map(|cpus| cpus.len())
        .unwrap_or_else(|| {
            // SAFETY: sysconf has no preconditions.
            let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
            usize::try_from(n).unwrap_or(1).max(1)
        })
}

/// `0-3,8,10-11` -> the listed CPUs.
fn parse_cpu_list(s: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in s.split(',') {
        match part.split_once('-') {
            Some((a, b)) => cpus.extend(a.parse::<usize>().ok()?..=b.parse::<usize>().ok()?),
            None => cpus.push(part.parse().ok()?),
        }
    }
    Some(cpus)
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is valid; sched_getaffinity fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Pins the calling thread to `cpu`, so that it runs where the requests of its queue
/// come from.
fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET stays within it for cpu < CPU_SETSIZE.
    let r = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set)
    };
    if r != 0 {
        warn!(
            "cannot pin ring thread to CPU {cpu}: {}",
            io::Error::last_os_error()
        );
    }
}
