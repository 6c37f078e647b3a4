//! The handshake: fixed newstyle negotiation, from the greeting to the
//! choice of the export (`NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`).
//!
//! Every malformed option gets the protocol's error reply and the
//! negotiation goes on; only what the protocol says must end the session
//! (a bad magic, unknown client flags, an unknown export asked for by
//! `NBD_OPT_EXPORT_NAME`, `NBD_OPT_ABORT`) closes it. Option data is
//! bounded ([`MAX_OPTION`]) before anything is allocated for it.

use std::io::{self, Read, Write};

use crate::contexts::{self, MetaContext};
use crate::export::Export;
use crate::proto::*;
use crate::session::Session;
use crate::wire::{read_u32, read_u64, skip, Fields, Message};

/// How a negotiation ended.
#[derive(Debug)]
pub enum Outcome {
    /// The client chose the export: transmission starts.
    Transmission(Session),
    /// The client went away or aborted, or broke the protocol.
    Closed,
}

fn reply(w: &mut impl Write, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let msg = Message::with_capacity(20 + data.len())
        .u64(OPTION_REPLY_MAGIC)
        .u32(option)
        .u32(kind)
        .u32(data.len() as u32)
        .bytes(data);
    w.write_all(&msg.0)
}

fn error(w: &mut impl Write, option: u32, kind: u32, message: &str) -> io::Result<()> {
    reply(w, option, kind, message.as_bytes())
}

/// Runs the negotiation on `stream` for `export`.
pub fn negotiate(
    stream: &mut (impl Read + Write),
    export: &Export,
    multi_conn: bool,
) -> io::Result<Outcome> {
    let greeting = Message::default()
        .u64(NBD_MAGIC)
        .u64(IHAVEOPT)
        .u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    stream.write_all(&greeting.0)?;
    let client_flags = read_u32(stream)?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Ok(Outcome::Closed);
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    let mut session = Session {
        multi_conn,
        ..Session::default()
    };
    loop {
        if read_u64(stream)? != IHAVEOPT {
            return Ok(Outcome::Closed);
        }
        let option = read_u32(stream)?;
        let len = read_u32(stream)?;
        if len > MAX_OPTION {
            if option == opt::EXPORT_NAME {
                return Ok(Outcome::Closed);
            }
            skip(stream, u64::from(len))?;
            error(stream, option, rep::ERR_TOO_BIG, "option data too long")?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        stream.read_exact(&mut data)?;
        match option {
            opt::EXPORT_NAME => {
                if !export.answers_to(&data) {
                    return Ok(Outcome::Closed);
                }
                answer_export_name(stream, export, &session, no_zeroes)?;
                return Ok(Outcome::Transmission(session));
            }
            opt::ABORT => {
                let _ = reply(stream, option, rep::ACK, &[]);
                return Ok(Outcome::Closed);
            }
            opt::LIST => answer_list(stream, len, export)?,
            opt::INFO | opt::GO => {
                if answer_info(stream, option, &data, export, &session)? && option == opt::GO {
                    return Ok(Outcome::Transmission(session));
                }
            }
            opt::STRUCTURED_REPLY => {
                if len != 0 || session.structured {
                    error(
                        stream,
                        option,
                        rep::ERR_INVALID,
                        "structured replies: bad request",
                    )?;
                    continue;
                }
                session.structured = true;
                reply(stream, option, rep::ACK, &[])?;
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                answer_meta_context(stream, option, &data, export, &mut session)?;
            }
            _ => error(stream, option, rep::ERR_UNSUP, "option not supported")?,
        }
    }
}

/// Ends the old-style `NBD_OPT_EXPORT_NAME`: size and flags, padded
/// unless the client asked for no zeroes.
fn answer_export_name(
    stream: &mut impl Write,
    export: &Export,
    session: &Session,
    no_zeroes: bool,
) -> io::Result<()> {
    let mut msg = Message::default()
        .u64(export.size())
        .u16(export.transmission_flags(session));
    if !no_zeroes {
        msg = msg.bytes(&[0u8; 124]);
    }
    stream.write_all(&msg.0)
}

/// Answers `NBD_OPT_LIST` with the one export.
fn answer_list(stream: &mut impl Write, len: u32, export: &Export) -> io::Result<()> {
    if len != 0 {
        return error(stream, opt::LIST, rep::ERR_INVALID, "LIST takes no data");
    }
    let name = export.name().as_bytes();
    let entry = Message::default()
        .u32(name.len() as u32)
        .bytes(name)
        .bytes(export.description().as_bytes());
    reply(stream, opt::LIST, rep::SERVER, &entry.0)?;
    reply(stream, opt::LIST, rep::ACK, &[])
}

/// Answers `NBD_OPT_INFO`/`NBD_OPT_GO`; `true` when the export was found.
fn answer_info(
    stream: &mut impl Write,
    option: u32,
    data: &[u8],
    export: &Export,
    session: &Session,
) -> io::Result<bool> {
    let mut fields = Fields::new(data);
    let parsed = (|| {
        let name_len = fields.u32()? as usize;
        let name = fields.take(name_len)?;
        let count = fields.u16()?;
        let mut requests = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            requests.push(fields.u16()?);
        }
        fields.is_empty().then_some((name, requests))
    })();
    let Some((name, requests)) = parsed else {
        error(
            stream,
            option,
            rep::ERR_INVALID,
            "malformed INFO/GO request",
        )?;
        return Ok(false);
    };
    if !export.answers_to(name) {
        error(stream, option, rep::ERR_UNKNOWN, "no such export")?;
        return Ok(false);
    }
    let flags = export.transmission_flags(session);
    let export_info = Message::default()
        .u16(info::EXPORT)
        .u64(export.size())
        .u16(flags);
    reply(stream, option, rep::INFO, &export_info.0)?;
    let (min, preferred, max) = export.block_sizes();
    let sizes = Message::default()
        .u16(info::BLOCK_SIZE)
        .u32(min)
        .u32(preferred)
        .u32(max);
    reply(stream, option, rep::INFO, &sizes.0)?;
    if requests.contains(&info::NAME) {
        let msg = Message::default()
            .u16(info::NAME)
            .bytes(export.name().as_bytes());
        reply(stream, option, rep::INFO, &msg.0)?;
    }
    if requests.contains(&info::DESCRIPTION) && !export.description().is_empty() {
        let msg = Message::default()
            .u16(info::DESCRIPTION)
            .bytes(export.description().as_bytes());
        reply(stream, option, rep::INFO, &msg.0)?;
    }
    reply(stream, option, rep::ACK, &[])?;
    Ok(true)
}

/// Answers `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`:
/// the contexts the export offers (see `contexts`).
fn answer_meta_context(
    stream: &mut impl Write,
    option: u32,
    data: &[u8],
    export: &Export,
    session: &mut Session,
) -> io::Result<()> {
    if !session.structured {
        return error(
            stream,
            option,
            rep::ERR_INVALID,
            "negotiate structured replies first",
        );
    }
    let mut fields = Fields::new(data);
    let parsed = (|| {
        let name_len = fields.u32()? as usize;
        let name = fields.take(name_len)?;
        let count = fields.u32()?;
        let mut queries = Vec::new();
        for _ in 0..count {
            queries.push(fields.string()?);
        }
        fields.is_empty().then_some((name, queries))
    })();
    let Some((name, queries)) = parsed else {
        return error(
            stream,
            option,
            rep::ERR_INVALID,
            "malformed meta context request",
        );
    };
    if !export.answers_to(name) {
        return error(stream, option, rep::ERR_UNKNOWN, "no such export");
    }
    let listing = option == opt::LIST_META_CONTEXT;
    let offered = contexts::offered(export);
    let mut selected: Vec<(u32, MetaContext)> = if listing && queries.is_empty() {
        offered.clone()
    } else {
        queries
            .iter()
            .flat_map(|q| contexts::matching(&offered, q, listing))
            .collect()
    };
    selected.sort_by_key(|(id, _)| *id);
    selected.dedup();
    for (id, context) in &selected {
        let id = if listing { 0 } else { *id };
        let msg = Message::default().u32(id).bytes(context.name().as_bytes());
        reply(stream, option, rep::META_CONTEXT, &msg.0)?;
    }
    if !listing {
        session.contexts = selected;
    }
    reply(stream, option, rep::ACK, &[])
}
