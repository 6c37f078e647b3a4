//! Reading compressed clusters: raw deflate (QEMU's default, "zlib") and
//! zstd (`compression_type=zstd`).

use qcow2_alloc::Storage;
use qcow2_format::l2::CompressedDescriptor;
use qcow2_format::Geometry;

use crate::{ImageError, Result};

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

/// Decodes one zstd frame into exactly one cluster.
fn unzstd(input: &[u8], out: &mut [u8], start: u64) -> Result<()> {
    use std::io::Read;
    let mut source = input;
    let mut decoder = ruzstd::decoding::StreamingDecoder::new(&mut source).map_err(|e| {
        ImageError::Corrupt(format!(
            "zstd cluster at {start:#x} has a bad frame header: {e}"
        ))
    })?;
    decoder.read_exact(out).map_err(|e| {
        ImageError::Corrupt(format!(
            "zstd cluster at {start:#x} does not decode to one cluster: {e}"
        ))
    })
}

/// Inflates raw deflate data into exactly one cluster.
fn inflate(input: &[u8], out: &mut [u8], start: u64) -> Result<()> {
    let cs = out.len();
    let mut state = miniz_oxide::inflate::core::DecompressorOxide::new();
    let (status, _, written) = miniz_oxide::inflate::core::decompress(
        &mut state,
        input,
        out,
        0,
        miniz_oxide::inflate::core::inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF,
    );
    use miniz_oxide::inflate::TINFLStatus;
    match status {
        TINFLStatus::Done | TINFLStatus::HasMoreOutput if written == cs => Ok(()),
        _ => Err(ImageError::Corrupt(format!(
            "compressed cluster at {start:#x} does not inflate to one cluster ({status:?}, {written} bytes)"
        ))),
    }
}
