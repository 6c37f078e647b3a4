//! Compressed clusters, read and written: raw deflate (QEMU's default,
//! "zlib") and zstd (`compression_type=zstd`).
//!
//! Writing packs compressed pieces back to back into shared host clusters,
//! as QEMU does, each host cluster's refcount counting the pieces in it.
//! Only clusters with nothing allocated are written compressed (QEMU
//! refuses the rest; here they get an ordinary write); a cluster that does
//! not shrink is written as it is. Overwriting a compressed cluster later
//! is an ordinary write: a new cluster, and the piece's references dropped.
//! Deduplicated images take no compressed writes: their dedup table names
//! one content per host cluster, which shared pieces would break.

use qcow2_alloc::Storage;
use qcow2_format::l2::{CompressedDescriptor, L2Mapping};
use qcow2_format::{Geometry, GuestOffset};

use crate::{image::Device, is_zero, ImageError, Result};

/// Decompresses the cluster `descriptor` points at into `out` (resized to
/// one cluster). The compressed size is bounded by the descriptor's sector
/// count, so a corrupt entry cannot make this allocate more.
pub(crate) fn decompress_cluster(
    storage: &dyn Storage,
    descriptor: CompressedDescriptor,
    geometry: Geometry,
    compression_type: u8,
    out: &mut Vec<u8>,
) -> Result<()> {
    let (start, end) = descriptor.host_range();
    let file_size = storage
        .len()
        .map_err(ImageError::io("reading the image size"))?;
    if start >= file_size {
        return Err(ImageError::Corrupt(format!(
            "compressed cluster at {start:#x} lies past the end of the file"
        )));
    }
    let mut input = vec![0u8; (end.min(file_size) - start) as usize];
    storage
        .read_at(&mut input, start)
        .map_err(ImageError::io("reading a compressed cluster"))?;
    let cs = geometry.cluster_size() as usize;
    out.clear();
    out.resize(cs, 0);
    match compression_type {
        0 => inflate(&input, out, start),
        1 => unzstd(&input, out, start),
        other => Err(ImageError::Unsupported(format!("compression type {other}"))),
    }
}

/// Decodes the zstd frame at the start of `input` (which may run on into
/// the next compressed cluster) into exactly one cluster.
fn unzstd(input: &[u8], out: &mut [u8], start: u64) -> Result<()> {
    let bad = |why: String| {
        ImageError::Corrupt(format!(
            "zstd cluster at {start:#x} does not decode to one cluster: {why}"
        ))
    };
    let mut decoder = zstd::stream::raw::Decoder::new().map_err(|e| bad(e.to_string()))?;
    let mut input = zstd::stream::raw::InBuffer::around(input);
    let mut output = zstd::stream::raw::OutBuffer::around(out);
    use zstd::stream::raw::Operation;
    loop {
        let before = (input.pos(), output.pos());
        let hint = decoder
            .run(&mut input, &mut output)
            .map_err(|e| bad(e.to_string()))?;
        if hint == 0 {
            break;
        }
        if (input.pos(), output.pos()) == before {
            return Err(bad("the frame is cut short or too long".into()));
        }
    }
    if output.pos() != output.capacity() {
        return Err(bad(format!("{} bytes", output.pos())));
    }
    Ok(())
}

/// Inflates raw deflate data into exactly one cluster.
fn inflate(input: &[u8], out: &mut [u8], start: u64) -> Result<()> {
    let mut state = flate2::Decompress::new(false);
    let status = state.decompress(input, out, flate2::FlushDecompress::Finish);
    let written = state.total_out();
    match status {
        Ok(_) if written == out.len() as u64 => Ok(()),
        other => Err(ImageError::Corrupt(format!(
            "compressed cluster at {start:#x} does not inflate to one cluster ({other:?}, {written} bytes)"
        ))),
    }
}

/// Compresses one cluster as QEMU does: raw deflate with a 4 KiB window
/// (type 0), or one zstd frame at zstd's default level (type 1). QEMU
/// deflates at zlib's default level 6; zlib-rs reaches that ratio at its
/// level 9 (its level 6 is 2–3 % larger), so level 9 it is. `None` when the result would not be smaller than the
/// cluster by at least one byte: QEMU then stores the cluster as it is.
pub(crate) fn compress_cluster(data: &[u8], compression_type: u8) -> Result<Option<Vec<u8>>> {
    let limit = data.len().saturating_sub(1);
    let out = match compression_type {
        0 => {
            let mut state =
                flate2::Compress::new_with_window_bits(flate2::Compression::new(9), false, 12);
            let mut out = Vec::with_capacity(limit);
            match state.compress_vec(data, &mut out, flate2::FlushCompress::Finish) {
                Ok(flate2::Status::StreamEnd) => out,
                Ok(_) => return Ok(None),
                Err(e) => return Err(compression_failed(e)),
            }
        }
        1 => match zstd::bulk::compress(data, zstd::DEFAULT_COMPRESSION_LEVEL) {
            Ok(out) => out,
            Err(e) => return Err(compression_failed(e)),
        },
        other => return Err(ImageError::Unsupported(format!("compression type {other}"))),
    };
    Ok((out.len() <= limit).then_some(out))
}

fn compression_failed(e: impl std::error::Error + Send + Sync + 'static) -> ImageError {
    ImageError::Io {
        op: "compressing a cluster",
        source: std::io::Error::other(e),
    }
}

impl Device {
    pub(crate) fn write_compressed(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        if self.encrypted {
            return Err(ImageError::Unsupported(
                "compressed writes to an encrypted image (as in QEMU)".into(),
            ));
        }
        self.check_bounds(offset, buf.len() as u64)?;
        let g = self.geometry;
        let cs = g.cluster_size();
        let whole = buf.len() as u64 == cs || offset + buf.len() as u64 == self.size();
        if g.offset_in_cluster(offset) != 0 || buf.len() as u64 > cs || !whole || buf.is_empty() {
            return Err(ImageError::InvalidOption(format!(
                "a compressed write covers one whole cluster: {} bytes at {offset} do not",
                buf.len()
            )));
        }
        if self.meta.lock().external_data() {
            return Err(ImageError::Unsupported(
                "compressed writes with an external data file (QEMU refuses them too)".into(),
            ));
        }
        if self.is_dedup() {
            return Err(ImageError::Unsupported(
                "compressed writes to a deduplicated image (its dedup table names whole clusters)"
                    .into(),
            ));
        }
        if is_zero(buf) {
            return self.write_zeroes(offset, buf.len() as u64);
        }
        let compression_type = self.header().compression_type;
        let compressed = if buf.len() as u64 == cs {
            compress_cluster(buf, compression_type)?
        } else {
            let mut padded = buf.to_vec();
            padded.resize(cs as usize, 0);
            compress_cluster(&padded, compression_type)?
        };
        let Some(compressed) = compressed else {
            return self.write_at(buf, offset);
        };
        let _range = self.lock_for_change(self.cluster_span(offset, cs))?;
        let guest = GuestOffset::new(offset);
        let host = {
            let mut meta = self.meta.lock();
            meta.format_changes()
                .note_guest_change(offset, buf.len() as u64)?;
            let (old, _) = meta.mappings().lookup(guest)?;
            if !matches!(
                old,
                L2Mapping::Unallocated
                    | L2Mapping::Zero {
                        preallocated: None,
                        ..
                    }
            ) {
                drop(meta);
                drop(_range);
                return self.write_at(buf, offset);
            }
            meta.references().allocate_bytes(compressed.len() as u64)?
        };
        self.storage
            .write_at(&compressed, host.get())
            .map_err(ImageError::io("writing a compressed cluster"))?;
        let descriptor = CompressedDescriptor::for_piece(host, compressed.len() as u64);
        self.meta
            .lock()
            .mappings()
            .set_mapping(guest, L2Mapping::Compressed(descriptor))
    }
}
