//! `-o` option lists, parsed once for every subcommand that takes them:
//! the list syntax as qemu-img reads it (`key=value` pairs split at commas,
//! `,,` for a literal comma, a bare key meaning `on`), and the values of
//! the creation options (`create`, `convert`, `measure`) and of the
//! options `amend` changes.

use qcow2_io::{
    AmendOptions, Compat, Compression, CreateOptions, Encryption, Preallocation, Secret,
};

use crate::error::CliError;
use crate::size::parse_size;

/// Splits `-o key=value,key=value` as qemu-img does: a bare `key` means
/// `key=on`, `,,` stands for a comma inside a value, and an empty item (a
/// leading, trailing or doubled separator) makes the whole list invalid.
pub fn parse_options(text: &str) -> Result<Vec<(String, String)>, CliError> {
    let invalid = || CliError::Usage(format!("Invalid option list: {text}"));
    let mut items = Vec::new();
    let mut item = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ',' if chars.peek() == Some(&',') => {
                chars.next();
                item.push(',');
            }
            ',' => items.push(std::mem::take(&mut item)),
            c => item.push(c),
        }
    }
    items.push(item);
    items
        .into_iter()
        .map(|kv| match kv.split_once('=') {
            _ if kv.is_empty() => Err(invalid()),
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            Some(_) => Err(invalid()),
            None => Ok((kv, "on".to_string())),
        })
        .collect()
}

/// Parses `on`/`off` (and the usual synonyms).
pub fn parse_bool(key: &str, value: &str) -> Result<bool, CliError> {
    match value {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(CliError::Usage(format!(
            "{key} must be on or off, not {value:?}"
        ))),
    }
}

/// A `-o` list as the parser hands it over: its `key=value` pairs, in
/// order (parsed when the command line is, so a malformed list is refused
/// before anything runs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionList(pub Vec<(String, String)>);

impl std::str::FromStr for OptionList {
    type Err = CliError;

    fn from_str(text: &str) -> Result<Self, CliError> {
        parse_options(text).map(OptionList)
    }
}

impl OptionList {
    /// Several `-o` lists as one, in order (a later key overrides an
    /// earlier one where the options are applied in order); `None` for
    /// no list.
    pub fn merged(lists: &[OptionList]) -> Option<OptionList> {
        if lists.is_empty() {
            return None;
        }
        Some(OptionList(
            lists.iter().flat_map(|l| l.0.iter().cloned()).collect(),
        ))
    }
}

/// Applies a `-o` list to creation options.
pub fn apply_create_options(
    options: &mut CreateOptions,
    list: Option<&OptionList>,
) -> Result<(), CliError> {
    let pairs = list.map(|l| l.0.as_slice()).unwrap_or_default();
    for (key, value) in pairs {
        match key.as_str() {
            "cluster_size" => options.cluster_size = parse_size(value)?,
            "refcount_bits" => options.refcount_bits = parse_refcount_bits(value)?,
            "compat" => options.compat = parse_compat(value)?,
            "lazy_refcounts" => options.lazy_refcounts = parse_bool(key, value)?,
            "dedup" => options.dedup = parse_bool(key, value)?,
            "backing_file" => {
                let format = options.backing.take().map(|(_, f)| f).unwrap_or_default();
                options.backing = Some((value.clone(), format));
            }
            "backing_fmt" => {
                let name = options.backing.take().map(|(n, _)| n).unwrap_or_default();
                options.backing = Some((name, value.clone()));
            }
            "data_file" => options.data_file = Some(value.clone()),
            "extended_l2" => options.extended_l2 = parse_bool(key, value)?,
            "data_file_raw" => options.data_file_raw = parse_bool(key, value)?,
            "preallocation" => {
                options.preallocation = parse_preallocation(value).map_err(CliError::Usage)?
            }
            "compression_type" => {
                options.compression = match value.as_str() {
                    "zlib" => Compression::Zlib,
                    "zstd" => Compression::Zstd,
                    _ => {
                        return Err(CliError::Usage(format!(
                            "compression_type must be zlib or zstd, not {value:?}"
                        )))
                    }
                }
            }
            "size" => options.size = parse_size(value)?,
            key if key.starts_with("encrypt.") => apply_encryption(options, key, value)?,
            _ => {
                return Err(CliError::Usage(format!(
                    "unknown option {key:?} for qcow2 images"
                )))
            }
        }
    }
    Ok(())
}

/// One `encrypt.*` option of `create`/`convert`: `format=luks`,
/// `key-secret=ID` (an `--object secret`), `cipher-alg=aes-256|serpent-128|...`,
/// `cipher-mode=xts|cbc`, `ivgen-alg=plain|plain64|essiv`,
/// `ivgen-hash-alg=sha256`, `hash-alg=sha1|sha256|sha512`, `iter-time=MS`.
fn apply_encryption(options: &mut CreateOptions, key: &str, value: &str) -> Result<(), CliError> {
    let e = options
        .encryption
        .get_or_insert_with(|| Encryption::luks(Secret::new(Vec::new())));
    let (mode, ivgen) = e.cipher_mode.split_once('-').unwrap_or(("xts", "plain64"));
    let (mode, ivgen) = (mode.to_string(), ivgen.to_string());
    match key {
        "encrypt.format" if value == "luks" => {}
        "encrypt.format" => {
            return Err(CliError::Usage(format!(
                "encrypt.format={value}: only luks can be created (the legacy aes is refused, as in QEMU)"
            )))
        }
        "encrypt.key-secret" => e.secret = crate::secrets::secret(value)?,
        "encrypt.cipher-alg" => {
            let (cipher, bits) = value.rsplit_once('-').unwrap_or((value, ""));
            e.cipher = cipher.to_string();
            e.key_bits = bits.parse().map_err(|_| {
                CliError::Usage(format!(
                    "encrypt.cipher-alg={value}: aes-128|192|256, serpent-N, twofish-N or cast5-128"
                ))
            })?;
        }
        "encrypt.cipher-mode" => e.cipher_mode = format!("{value}-{ivgen}"),
        "encrypt.ivgen-alg" if value == "essiv" => e.cipher_mode = format!("{mode}-essiv:sha256"),
        "encrypt.ivgen-alg" => e.cipher_mode = format!("{mode}-{value}"),
        "encrypt.ivgen-hash-alg" if value == "sha256" => {}
        "encrypt.hash-alg" => e.hash = value.to_string(),
        "encrypt.iter-time" => {
            e.iter_time_ms = value
                .parse()
                .map_err(|_| CliError::Usage(format!("encrypt.iter-time={value}: milliseconds")))?
        }
        _ => return Err(CliError::Usage(format!("unsupported option {key}={value}"))),
    }
    Ok(())
}

/// `compat=`: `0.10` (or `v2`) and `1.1` (or `v3`).
pub fn parse_compat(value: &str) -> Result<Compat, CliError> {
    match value {
        "0.10" | "v2" => Ok(Compat::V2),
        "1.1" | "v3" => Ok(Compat::V3),
        _ => Err(CliError::Usage(format!(
            "compat must be 0.10 or 1.1, not {value:?}"
        ))),
    }
}

/// `refcount_bits=`: a number (its range is the library's to check).
pub fn parse_refcount_bits(value: &str) -> Result<u32, CliError> {
    value
        .parse()
        .map_err(|_| CliError::Usage(format!("invalid refcount_bits {value:?}")))
}

/// What `amend -o` asks for: the format changes, and `dedup=` apart (it
/// is a separate operation on the image).
/// A change of LUKS key slots (`encrypt.*` options of `amend`).
#[derive(Debug, Default)]
pub struct KeyChange {
    /// `encrypt.state`: true adds a key, false erases.
    pub activate: Option<bool>,
    /// `encrypt.new-secret`: the passphrase to add.
    pub new_secret: Option<Secret>,
    /// `encrypt.old-secret`: erase the slots it opens.
    pub old_secret: Option<Secret>,
    /// `encrypt.keyslot`.
    pub slot: Option<usize>,
    /// `encrypt.iter-time` in milliseconds (2000 by default, as QEMU).
    pub iter_time_ms: Option<u64>,
}

impl KeyChange {
    fn set(&mut self, key: &str, value: &str) -> Result<(), CliError> {
        let number = |what: &str| {
            value
                .parse::<u64>()
                .map_err(|_| CliError::Usage(format!("{what}={value}: a number")))
        };
        match key {
            "encrypt.state" => {
                self.activate = Some(match value {
                    "active" => true,
                    "inactive" => false,
                    _ => {
                        return Err(CliError::Usage(format!(
                            "encrypt.state={value}: active or inactive"
                        )))
                    }
                })
            }
            "encrypt.new-secret" => self.new_secret = Some(crate::secrets::secret(value)?),
            "encrypt.old-secret" => self.old_secret = Some(crate::secrets::secret(value)?),
            "encrypt.keyslot" => self.slot = Some(number(key)? as usize),
            "encrypt.iter-time" => self.iter_time_ms = Some(number(key)?),
            _ => {
                return Err(CliError::Usage(format!(
                    "amending {key:?} is not supported"
                )))
            }
        }
        Ok(())
    }
}

pub fn parse_amend_options(
    list: &OptionList,
) -> Result<(AmendOptions, Option<bool>, Option<KeyChange>), CliError> {
    let mut dedup = None;
    let mut amend = AmendOptions::default();
    let mut keys: Option<KeyChange> = None;
    for (key, value) in &list.0 {
        match key.as_str() {
            k if k.starts_with("encrypt.") => {
                keys.get_or_insert_with(KeyChange::default).set(k, value)?
            }
            "dedup" => dedup = Some(parse_bool(key, value)?),
            "lazy_refcounts" => amend.lazy_refcounts = Some(parse_bool(key, value)?),
            "compat" => amend.compat = Some(parse_compat(value)?),
            "refcount_bits" => amend.refcount_bits = Some(parse_refcount_bits(value)?),
            "size" => amend.size = Some(parse_size(value)?),
            "data_file" => amend.data_file = Some(value.clone()),
            "data_file_raw" => amend.data_file_raw = Some(parse_bool(key, value)?),
            "backing_file" | "backing_fmt" => {
                return Err(CliError::Usage(
                    "Cannot amend the backing file; use `qcow2 rebase` instead (as qemu-img)"
                        .into(),
                ))
            }
            other => {
                return Err(CliError::Usage(format!(
                    "amending {other:?} is not supported (compat, lazy_refcounts, refcount_bits, \
                     size, data_file, data_file_raw, dedup); the image is unchanged"
                )))
            }
        }
    }
    Ok((amend, dedup, keys))
}

/// A `preallocation=` / `--preallocation=` mode, by qemu-img's names.
pub fn parse_preallocation(value: &str) -> Result<Preallocation, String> {
    match value {
        "off" => Ok(Preallocation::Off),
        "metadata" => Ok(Preallocation::Metadata),
        "falloc" => Ok(Preallocation::Falloc),
        "full" => Ok(Preallocation::Full),
        _ => Err(format!(
            "preallocation must be off, metadata, falloc or full, not {value:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_lists_parse_as_qemu_img_parses_them() {
        let pairs = |t: &str| parse_options(t).map_err(|e| e.to_string());
        assert_eq!(
            pairs("cluster_size=4k,lazy_refcounts").unwrap(),
            vec![
                ("cluster_size".into(), "4k".into()),
                ("lazy_refcounts".into(), "on".into())
            ]
        );
        assert_eq!(
            pairs("backing_file=a,,b.qcow2").unwrap(),
            vec![("backing_file".into(), "a,b.qcow2".into())]
        );
        for bad in [
            "cluster_size=4k,",
            ",cluster_size=4k",
            "a=1,b=2,",
            "",
            "=4k",
        ] {
            assert!(
                pairs(bad).is_err_and(|e| e.starts_with("Invalid option list")),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn splits_option_lists() {
        assert_eq!(
            parse_options("cluster_size=4k,lazy_refcounts").unwrap(),
            vec![
                ("cluster_size".to_string(), "4k".to_string()),
                ("lazy_refcounts".to_string(), "on".to_string())
            ]
        );
        assert!(parse_options("=3").is_err());
    }
}
