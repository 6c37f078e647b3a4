//! The transmission phase: requests are read in order, served
//! concurrently by a small pool of workers, and answered as they finish
//! (out of order, matched by the client's cookie).
//!
//! Bounds, before any buffer is allocated: a request longer than
//! [`MAX_REQUEST`] is answered `EINVAL` (a write's payload is read and
//! dropped in small pieces to stay in step); requests past the end get
//! `EINVAL` (`ENOSPC` for writes), as qemu-nbd answers. Write payloads in
//! flight on one connection are limited by a byte budget, so a client that
//! pipelines many large writes waits instead of growing the server.

use std::io::{self, Read, Write};
use std::sync::mpsc::{sync_channel, Receiver};

use parking_lot::{Condvar, Mutex};
use qcow2_io::ImageError;

use crate::buffers::Buffers;
use crate::contexts;
use crate::export::{DetectZeroes, DiscardMode, Export};
use crate::proto::*;
use crate::session::Session;
use crate::wire::{read_u16, read_u32, read_u64, skip, Message, Stream};

/// Requests served at once per connection.
const WORKERS: usize = 8;
/// Write payload bytes in flight per connection.
const PAYLOAD_BUDGET: u64 = 4 * MAX_REQUEST as u64;

/// One request as read from the wire.
#[derive(Debug)]
struct Request {
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    length: u32,
    /// The payload of a write (empty for everything else).
    payload: Vec<u8>,
    /// Set when the request was refused while being read.
    refused: Option<u32>,
}

/// The bytes of write payloads in flight, and who waits for room.
#[derive(Default)]
struct Budget {
    used: Mutex<u64>,
    freed: Condvar,
}

impl Budget {
    fn take(&self, n: u64) {
        let mut used = self.used.lock();
        while *used > 0 && *used + n > PAYLOAD_BUDGET {
            self.freed.wait(&mut used);
        }
        *used += n;
    }

    fn give(&self, n: u64) {
        *self.used.lock() -= n;
        self.freed.notify_all();
    }
}

/// Serves requests on `stream` until the client disconnects (or sends
/// `NBD_CMD_DISC`, or breaks the protocol). Every request read is answered
/// before this returns, if the client is still there to read the answer.
pub fn serve(stream: Stream, export: &Export, session: &Session) -> io::Result<()> {
    let writer = Mutex::new(stream.try_clone()?);
    let budget = Budget::default();
    let buffers = Buffers::default();
    let (tx, rx) = sync_channel::<Request>(WORKERS * 2);
    let rx = Mutex::new(rx);
    std::thread::scope(|scope| {
        for _ in 0..WORKERS {
            scope.spawn(|| work(&rx, export, session, &writer, &budget, &buffers));
        }
        let result = read_requests(stream, &budget, &buffers, |r| {
            tx.send(r).map_err(|_| io::Error::other("workers gone"))
        });
        drop(tx);
        result
    })
}

fn read_requests(
    mut stream: Stream,
    budget: &Budget,
    buffers: &Buffers,
    mut dispatch: impl FnMut(Request) -> io::Result<()>,
) -> io::Result<()> {
    loop {
        let magic = match read_u32(&mut stream) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        if magic != REQUEST_MAGIC {
            return Ok(());
        }
        let flags = read_u16(&mut stream)?;
        let kind = read_u16(&mut stream)?;
        let cookie = read_u64(&mut stream)?;
        let offset = read_u64(&mut stream)?;
        let length = read_u32(&mut stream)?;
        if kind == cmd::DISC {
            return Ok(());
        }
        let mut request = Request {
            flags,
            kind,
            cookie,
            offset,
            length,
            payload: Vec::new(),
            refused: None,
        };
        if kind == cmd::WRITE {
            if length > MAX_REQUEST {
                skip(&mut stream, u64::from(length))?;
                request.refused = Some(errno::EINVAL);
            } else {
                budget.take(u64::from(length));
                request.payload = buffers.take_zeroed(length as usize);
                if let Err(e) = stream.read_exact(&mut request.payload) {
                    budget.give(u64::from(length));
                    return Err(e);
                }
            }
        }
        dispatch(request)?;
    }
}

fn work(
    rx: &Mutex<Receiver<Request>>,
    export: &Export,
    session: &Session,
    writer: &Mutex<Stream>,
    budget: &Budget,
    buffers: &Buffers,
) {
    loop {
        let request = match rx.lock().recv() {
            Ok(r) => r,
            Err(_) => return,
        };
        let paid = request.payload.len() as u64;
        let reply = answer(&request, export, session, buffers);
        buffers.give(request.payload);
        if paid > 0 {
            budget.give(paid);
        }
        let mut w = writer.lock();
        // A failed write means the client is gone; the request was served
        // all the same.
        let _ = w.write_all(&reply).and_then(|()| w.flush());
        drop(w);
        buffers.give(reply);
    }
}

/// Serves one request and returns the bytes of its reply.
fn answer(request: &Request, export: &Export, session: &Session, buffers: &Buffers) -> Vec<u8> {
    let structured =
        session.structured && (request.kind == cmd::READ || request.kind == cmd::BLOCK_STATUS);
    let result = match request.refused {
        Some(errno) => Err(errno),
        None => execute(request, export, session),
    };
    let result = match result {
        Ok(Done::Read) => read_reply(request, export, session.structured, buffers),
        Ok(Done::Status(contexts)) => Ok(status_reply(request.cookie, contexts)),
        Ok(Done::Nothing) => Ok(simple(request.cookie, 0, &[])),
        Err(errno) => Err(errno),
    };
    result.unwrap_or_else(|errno| error_reply(request.cookie, errno, structured))
}

/// The chunks of a block status reply, one per context.
fn status_reply(cookie: u64, contexts: Vec<(u32, Vec<(u32, u32)>)>) -> Vec<u8> {
    let mut reply = Vec::new();
    let last = contexts.len().saturating_sub(1);
    for (i, (id, extents)) in contexts.into_iter().enumerate() {
        let mut payload = Message::with_capacity(4 + 8 * extents.len()).u32(id);
        for (len, flags) in extents {
            payload = payload.u32(len).u32(flags);
        }
        let done = if i == last { chunk::FLAG_DONE } else { 0 };
        reply.extend(chunk_of(cookie, done, chunk::BLOCK_STATUS, &payload.0));
    }
    reply
}

/// A failed request's reply: an error chunk where the client takes
/// structured replies for this command, else a simple reply.
fn error_reply(cookie: u64, errno: u32, as_chunk: bool) -> Vec<u8> {
    if !as_chunk {
        return simple(cookie, errno, &[]);
    }
    let message = b"request failed";
    let payload = Message::default()
        .u32(errno)
        .u16(message.len() as u16)
        .bytes(message);
    structured(cookie, chunk::ERROR, &payload.0)
}

/// The reply to a read, built in a kept buffer (for large reads) around
/// the data read straight into it: no copy of the data.
fn read_reply(
    request: &Request,
    export: &Export,
    structured: bool,
    buffers: &Buffers,
) -> Result<Vec<u8>, u32> {
    let len = request.length as usize;
    let header = if structured { 20 + 8 } else { 16 };
    let mut out = buffers.take_zeroed(header + len);
    let (head, data) = out.split_at_mut(header);
    if let Err(e) = export.image().read_at(data, request.offset) {
        buffers.give(out);
        return Err(errno_of(&e));
    }
    let mut fields = if structured {
        Message::with_capacity(header)
            .u32(STRUCTURED_REPLY_MAGIC)
            .u16(chunk::FLAG_DONE)
            .u16(chunk::OFFSET_DATA)
            .u64(request.cookie)
            .u32(8 + request.length)
            .u64(request.offset)
    } else {
        Message::with_capacity(header)
            .u32(SIMPLE_REPLY_MAGIC)
            .u32(0)
            .u64(request.cookie)
    };
    head.copy_from_slice(&std::mem::take(&mut fields.0));
    Ok(out)
}

fn simple(cookie: u64, errno: u32, data: &[u8]) -> Vec<u8> {
    Message::with_capacity(16 + data.len())
        .u32(SIMPLE_REPLY_MAGIC)
        .u32(errno)
        .u64(cookie)
        .bytes(data)
        .0
}

fn structured(cookie: u64, kind: u16, payload: &[u8]) -> Vec<u8> {
    chunk_of(cookie, chunk::FLAG_DONE, kind, payload)
}

/// One structured reply chunk with `flags` (`FLAG_DONE` on the last).
fn chunk_of(cookie: u64, flags: u16, kind: u16, payload: &[u8]) -> Vec<u8> {
    Message::with_capacity(20 + payload.len())
        .u32(STRUCTURED_REPLY_MAGIC)
        .u16(flags)
        .u16(kind)
        .u64(cookie)
        .u32(payload.len() as u32)
        .bytes(payload)
        .0
}

/// What a served request hands back.
enum Done {
    Nothing,
    /// A read, checked and ready to be served into the reply.
    Read,
    /// Block status: the extents of each selected context, by id.
    Status(Vec<(u32, Vec<(u32, u32)>)>),
}

/// The NBD errno of an image error, by its [`ImageError::kind`], as
/// qemu-nbd answers.
fn errno_of(e: &ImageError) -> u32 {
    match e.kind() {
        std::io::ErrorKind::InvalidInput => errno::EINVAL,
        std::io::ErrorKind::PermissionDenied => errno::EPERM,
        std::io::ErrorKind::StorageFull => errno::ENOSPC,
        _ => errno::EIO,
    }
}

fn execute(request: &Request, export: &Export, session: &Session) -> Result<Done, u32> {
    let image = export.image();
    let (offset, len) = (request.offset, u64::from(request.length));
    let writes = matches!(request.kind, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
    let known = matches!(
        request.kind,
        cmd::READ
            | cmd::WRITE
            | cmd::FLUSH
            | cmd::TRIM
            | cmd::CACHE
            | cmd::WRITE_ZEROES
            | cmd::BLOCK_STATUS
    );
    if !known {
        return Err(errno::EINVAL);
    }
    if writes && export.options().read_only {
        return Err(errno::EPERM);
    }
    if request.kind != cmd::FLUSH && offset.checked_add(len).is_none_or(|end| end > image.size()) {
        let write = matches!(request.kind, cmd::WRITE | cmd::WRITE_ZEROES);
        return Err(if write { errno::ENOSPC } else { errno::EINVAL });
    }
    let fua = request.flags & cmd_flag::FUA != 0;
    let io = |r: qcow2_io::Result<()>| r.map_err(|e| errno_of(&e));
    match request.kind {
        cmd::READ => {
            if request.length > MAX_REQUEST {
                return Err(errno::EINVAL);
            }
            return Ok(Done::Read);
        }
        cmd::WRITE => io(write(export, &request.payload, offset))?,
        cmd::FLUSH => io(image.flush())?,
        cmd::TRIM => {
            if export.options().discard == DiscardMode::Unmap {
                io(image.discard(offset, len))?;
            }
        }
        cmd::WRITE_ZEROES => {
            let no_hole = request.flags & cmd_flag::NO_HOLE != 0;
            let fast = request.flags & cmd_flag::FAST_ZERO != 0;
            if no_hole {
                if fast && !export.zeroes_fast_with_allocation() {
                    return Err(errno::ENOTSUP);
                }
                io(image.write_zeroes_allocated(offset, len))?;
            } else {
                io(image.write_zeroes(offset, len))?;
            }
        }
        cmd::CACHE => {}
        cmd::BLOCK_STATUS => return block_status(request, export, session),
        _ => return Err(errno::EINVAL),
    }
    if fua && writes {
        io(image.flush())?;
    }
    Ok(Done::Nothing)
}

/// `NBD_CMD_WRITE`: writes of zeros become zero clusters as
/// `--detect-zeroes` asks (deallocated with `--discard=unmap`).
fn write(export: &Export, payload: &[u8], offset: u64) -> qcow2_io::Result<()> {
    let image = export.image();
    let len = payload.len() as u64;
    let zeros = export.options().detect_zeroes != DetectZeroes::Off && qcow2_io::is_zero(payload);
    let unmap = export.options().detect_zeroes == DetectZeroes::Unmap
        && export.options().discard == DiscardMode::Unmap;
    if zeros && unmap {
        image.write_zeroes(offset, len)
    } else if zeros {
        image.write_zeroes_allocated(offset, len)
    } else {
        image.write_at(payload, offset)
    }
}

/// `NBD_CMD_BLOCK_STATUS`: the extents of every selected context over the
/// range (only the first of each with `REQ_ONE`).
fn block_status(request: &Request, export: &Export, session: &Session) -> Result<Done, u32> {
    let len = u64::from(request.length);
    if !session.structured || session.contexts.is_empty() || len == 0 {
        return Err(errno::EINVAL);
    }
    let mut out = Vec::with_capacity(session.contexts.len());
    for (id, context) in &session.contexts {
        let mut extents = contexts::extents(export.image(), context, request.offset, len)
            .map_err(|e| errno_of(&e))?;
        if request.flags & cmd_flag::REQ_ONE != 0 {
            extents.truncate(1);
        }
        out.push((*id, extents));
    }
    Ok(Done::Status(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_have_the_wire_layout() {
        let s = simple(0x0102_0304_0506_0708, 22, &[9, 9]);
        assert_eq!(&s[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&s[4..8], &22u32.to_be_bytes());
        assert_eq!(&s[8..16], &0x0102_0304_0506_0708u64.to_be_bytes());
        assert_eq!(&s[16..], &[9, 9]);
        let c = structured(7, chunk::BLOCK_STATUS, &[1, 2, 3]);
        assert_eq!(&c[..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&c[4..6], &chunk::FLAG_DONE.to_be_bytes());
        assert_eq!(&c[6..8], &chunk::BLOCK_STATUS.to_be_bytes());
        assert_eq!(&c[16..20], &3u32.to_be_bytes());
        assert_eq!(c.len(), 23);
    }

    #[test]
    fn the_payload_budget_admits_one_oversized_request_at_a_time() {
        let b = Budget::default();
        b.take(PAYLOAD_BUDGET + 1);
        assert_eq!(*b.used.lock(), PAYLOAD_BUDGET + 1);
        b.give(PAYLOAD_BUDGET + 1);
        b.take(10);
        b.take(20);
        assert_eq!(*b.used.lock(), 30);
    }
}
