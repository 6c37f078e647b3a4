//! `qcow2 info [-f FMT] [--output human|json] FILE`
//!
//! The JSON output is qemu-img's (`children` with the file node, members in
//! qemu-img's order), plus `dedup` and `dedup-stats` in the qcow2-specific
//! data of a deduplicated image.

use std::path::Path;

use std::os::unix::fs::MetadataExt;

use qcow2_format::snapshot::Snapshot;
use qcow2_io::{BitmapInfo, DedupStats, EncryptionInfo, ImageInfo, LuksInfo, OpenOptions};
use serde_json::{json, Value};

use crate::args::{ImageFormat, InfoArgs, OutputFormat};
use crate::disk::resolve_format;
use crate::error::CliError;
use crate::output::say;
use crate::qemu_json::to_qemu_json;
use crate::size::human;
use crate::snapshot_list::{icount, print_snapshot_table};

/// Runs the command.
pub fn run(args: &InfoArgs) -> Result<u8, CliError> {
    let json = args.output.format == OutputFormat::Json;
    let mut path = args.file.clone();
    let mut format = resolve_format(&path, args.format.value)?;
    let mut values = Vec::new();
    for depth in 0.. {
        if depth > qcow2_io::backing::MAX_CHAIN_DEPTH {
            return Err(CliError::Usage("backing chain too long".into()));
        }
        if depth > 0 && !json {
            say!("");
        }
        let (value, backing) = describe(&path, format, json, args.share.force_share)?;
        values.extend(value);
        let Some((name, backing_format)) = backing.filter(|_| args.backing_chain) else {
            break;
        };
        let next = full_backing_name(&path, &name);
        format = match backing_format.as_deref() {
            Some("raw") => ImageFormat::Raw,
            Some(_) => ImageFormat::Qcow2,
            None => resolve_format(Path::new(&next), None)?,
        };
        path = next.into();
    }
    if json {
        let out = if args.backing_chain {
            Value::Array(values)
        } else {
            values.pop().unwrap_or(Value::Null)
        };
        say!("{}", to_qemu_json(&out));
    }
    Ok(0)
}

/// A backing file as an image names it: name and, if recorded, format.
type BackingName = (String, Option<String>);

/// Shows one image: returns its JSON (when `json`; else prints it) and its
/// backing file, if any.
fn describe(
    path: &Path,
    format: ImageFormat,
    json: bool,
    force_share: bool,
) -> Result<(Option<Value>, Option<BackingName>), CliError> {
    let meta = std::fs::metadata(path).map_err(CliError::io(path))?;
    let actual = meta.blocks() * 512;
    if format == ImageFormat::Raw {
        if json {
            let v = json!({
                "children": [file_child(path, meta.len().next_multiple_of(512), actual)],
                "virtual-size": meta.len(),
                "filename": path,
                "format": "raw",
                "actual-size": actual,
                "dirty-flag": false,
            });
            return Ok((Some(v), None));
        }
        say!(
            "image: {path}\nfile format: raw\nvirtual size: {} ({} bytes)\ndisk size: {}",
            human(meta.len()),
            meta.len(),
            human(actual),
            path = path.display()
        );
        return Ok((None, None));
    }
    let options = OpenOptions::read_only().force_share(force_share);
    let image = crate::disk::open_read_only(path, &options)?;
    let info = image.info().map_err(CliError::image(path))?;
    let stats = image.dedup().stats().map_err(CliError::image(path))?;
    let snapshots = image.snapshots().list().map_err(CliError::image(path))?;
    let value = if json {
        Some(info_json(path, actual, &info, stats.as_ref(), &snapshots))
    } else {
        print_human(path, actual, &info, stats.as_ref(), &snapshots);
        None
    };
    if info.corrupt {
        eprintln!("qcow2: warning: {path} is marked corrupt; it opens read-only until repaired with `qcow2 check -r all`", path = path.display());
    }
    let backing = info
        .backing_file
        .clone()
        .map(|name| (name, info.backing_format.clone()));
    Ok((value, backing))
}

/// The `children` entry for the image's file node, as qemu-img 10 shows it.
fn file_child(path: &Path, length: u64, actual: u64) -> Value {
    json!({
        "name": "file",
        "info": {
            "children": [],
            "virtual-size": length,
            "filename": path,
            "format": "file",
            "actual-size": actual,
            "format-specific": {"type": "file", "data": {}},
            "dirty-flag": false,
        },
    })
}

/// The backing file name as QEMU resolves it from the image's path.
fn full_backing_name(path: &Path, backing: &str) -> String {
    let dir = std::path::Path::new(path).parent();
    let dir = dir.filter(|d| !d.as_os_str().is_empty());
    qcow2_io::backing::resolve(backing, dir)
        .to_string_lossy()
        .into_owned()
}

/// A bitmap's flags as qemu-img names them, in its order.
fn bitmap_flags(b: &BitmapInfo) -> Vec<&'static str> {
    let mut flags = Vec::new();
    if b.in_use {
        flags.push("in-use");
    }
    if b.auto {
        flags.push("auto");
    }
    flags
}

fn info_json(
    path: &Path,
    actual: u64,
    info: &ImageInfo,
    stats: Option<&DedupStats>,
    snapshots: &[Snapshot],
) -> Value {
    let data = qcow2_specific_json(info, stats);
    let mut v = json!({
        "filename": path,
        "format": "qcow2",
        "dirty-flag": info.dirty,
        "actual-size": actual,
        "virtual-size": info.virtual_size,
        "cluster-size": info.cluster_size,
    });
    if let Some(b) = &info.backing_file {
        v["backing-filename"] = json!(b);
        v["full-backing-filename"] = json!(full_backing_name(path, b));
        if let Some(f) = &info.backing_format {
            v["backing-filename-format"] = json!(f);
        }
    }
    if !snapshots.is_empty() {
        v["snapshots"] = snapshots_json(snapshots);
    }
    v["format-specific"] = json!({"type": "qcow2", "data": data});
    if info.encryption.is_some() {
        v["encrypted"] = json!(true);
    }
    v["children"] = json!([file_child(
        path,
        info.file_length.next_multiple_of(512),
        actual
    )]);
    v
}

/// The `format-specific` data of a qcow2 image, in qemu-img's member
/// order (dedup images add `dedup` and `dedup-stats`).
fn qcow2_specific_json(info: &ImageInfo, stats: Option<&DedupStats>) -> Value {
    // A compat=0.10 image has no feature bits: qemu-img gives its compat,
    // refcount width and compression type only.
    let v3 = info.version >= 3;
    let mut data = json!({"compat": if v3 { "1.1" } else { "0.10" }});
    if v3 {
        data["extended-l2"] = json!(info.extended_l2);
        data["lazy-refcounts"] = json!(info.lazy_refcounts);
    }
    if !info.bitmaps.is_empty() {
        data["bitmaps"] = info
            .bitmaps
            .iter()
            .map(|b| {
                json!({
                    "flags": bitmap_flags(b),
                    "name": b.name,
                    "granularity": b.granularity,
                })
            })
            .collect();
    }
    if v3 {
        data["corrupt"] = json!(info.corrupt);
    }
    data["refcount-bits"] = json!(info.refcount_bits);
    if let Some(f) = &info.data_file {
        data["data-file"] = json!(f);
        data["data-file-raw"] = json!(info.data_file_raw);
    }
    data["compression-type"] = json!(info.compression_type);
    if let Some(e) = &info.encryption {
        data["encrypt"] = encrypt_json(e);
    }
    if info.dedup {
        data["dedup"] = json!(true);
    }
    if let Some(s) = stats {
        data["dedup-stats"] = json!({
            "unique-clusters": s.unique_clusters,
            "references": s.references,
            "bytes-saved": s.bytes_saved,
            "crc-failures": s.crc_failures,
        });
    }
    data
}

/// The `encrypt` member of an encrypted image.
fn encrypt_json(e: &EncryptionInfo) -> Value {
    match e {
        EncryptionInfo::Luks(luks) => luks_json(luks),
        EncryptionInfo::LegacyAes => json!({"format": "aes"}),
        _ => json!({}),
    }
}

/// A LUKS image's `encrypt` member, in QAPI's field order (the union's
/// `format` first).
fn luks_json(e: &LuksInfo) -> Value {
    let mut v = json!({
        "format": "luks",
        "cipher-alg": e.cipher_alg,
        "cipher-mode": e.cipher_mode,
        "ivgen-alg": e.ivgen_alg,
    });
    if let Some(h) = &e.ivgen_hash_alg {
        v["ivgen-hash-alg"] = json!(h);
    }
    v["hash-alg"] = json!(e.hash_alg);
    v["detached-header"] = json!(false);
    v["payload-offset"] = json!(e.payload_offset);
    v["master-key-iters"] = json!(e.master_key_iters);
    v["uuid"] = json!(e.uuid);
    v["slots"] = e
        .slots
        .iter()
        .map(|s| {
            let mut slot = json!({"active": s.active});
            if let Some(i) = s.iters {
                slot["iters"] = json!(i);
            }
            if let Some(n) = s.stripes {
                slot["stripes"] = json!(n);
            }
            slot["key-offset"] = json!(s.key_offset);
            slot
        })
        .collect();
    v
}

/// The snapshot list as qemu-img's JSON gives it.
fn snapshots_json(snapshots: &[Snapshot]) -> Value {
    snapshots
        .iter()
        .map(|s| {
            let mut e = json!({
                "id": s.id,
                "name": s.name,
                "vm-state-size": s.vm_state_size,
                "date-sec": s.date_sec,
                "date-nsec": s.date_nsec,
                "vm-clock-sec": s.vm_clock_nsec / 1_000_000_000,
                "vm-clock-nsec": s.vm_clock_nsec % 1_000_000_000,
            });
            if let Some(n) = icount(s) {
                e["icount"] = json!(n);
            }
            e
        })
        .collect()
}

/// The "Format specific information" section, as qemu-img prints it.
fn print_qcow2_specific(info: &ImageInfo, stats: Option<&DedupStats>) {
    say!("Format specific information:");
    say!(
        "    compat: {}",
        if info.version == 2 { "0.10" } else { "1.1" }
    );
    let v3 = info.version >= 3;
    say!("    compression type: {}", info.compression_type);
    if v3 {
        say!("    lazy refcounts: {}", info.lazy_refcounts);
    }
    if !info.bitmaps.is_empty() {
        say!("    bitmaps:");
        for (i, b) in info.bitmaps.iter().enumerate() {
            say!("        [{i}]:");
            say!("            flags:");
            for (j, flag) in bitmap_flags(b).iter().enumerate() {
                say!("                [{j}]: {flag}");
            }
            say!("            name: {}", b.name);
            say!("            granularity: {}", b.granularity);
        }
    }
    say!("    refcount bits: {}", info.refcount_bits);
    if let Some(e) = &info.encryption {
        say!("    encrypt:");
        crate::qemu_json::print_human(&encrypt_json(e), 2);
    }
    if let Some(f) = &info.data_file {
        say!("    data file: {f}");
        say!("    data file raw: {}", info.data_file_raw);
    }
    if v3 {
        say!("    corrupt: {}", info.corrupt);
        say!("    extended l2: {}", info.extended_l2);
    }
    if info.dedup {
        say!("    dedup: true");
    }
    if let Some(s) = stats {
        say!("    dedup unique clusters: {}", s.unique_clusters);
        say!("    dedup references: {}", s.references);
        say!(
            "    dedup space saved: {} ({} bytes)",
            human(s.bytes_saved),
            s.bytes_saved
        );
        if s.crc_failures > 0 {
            say!(
                "    dedup damaged clusters: {} (run `qcow2 check -r all`)",
                s.crc_failures
            );
        }
    }
    if info.dirty {
        say!("    dirty: true (not closed cleanly; refcounts are repaired on the next read-write open)");
    }
}

fn print_human(
    path: &Path,
    actual: u64,
    info: &ImageInfo,
    stats: Option<&DedupStats>,
    snapshots: &[Snapshot],
) {
    say!("image: {path}", path = path.display());
    say!("file format: qcow2");
    say!(
        "virtual size: {} ({} bytes)",
        human(info.virtual_size),
        info.virtual_size
    );
    say!("disk size: {}", human(actual));
    if info.encryption.is_some() {
        say!("encrypted: yes");
    }
    say!("cluster_size: {}", info.cluster_size);
    if let Some(b) = &info.backing_file {
        let full = full_backing_name(path, b);
        if full == *b {
            say!("backing file: {b}");
        } else {
            say!("backing file: {b} (actual path: {full})");
        }
        if let Some(f) = &info.backing_format {
            say!("backing file format: {f}");
        }
    }
    if !snapshots.is_empty() {
        print_snapshot_table(snapshots);
    }
    print_qcow2_specific(info, stats);
    say!("Child node '/file':");
    say!("    filename: {path}", path = path.display());
    say!("    protocol type: file");
    let length = info.file_length.next_multiple_of(512);
    say!("    file length: {} ({length} bytes)", human(length));
    say!("    disk size: {}", human(actual));
}
