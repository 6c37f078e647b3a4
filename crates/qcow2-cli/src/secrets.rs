//! qemu-img's way of giving passphrases: `--object secret,id=ID,data=TEXT`
//! (or `file=PATH`) defines a secret, and an encrypted image names it,
//! with `--image-opts` (the image argument becomes an option list:
//! `driver=qcow2,file.filename=PATH,encrypt.key-secret=ID`) when opened,
//! or with `-o encrypt.key-secret=ID` when created. The secrets of one run
//! are kept here for every image the command opens.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use qcow2_io::{OpenOptions, Secret};

use crate::error::CliError;

/// The secrets and whether image arguments are option lists.
#[derive(Debug, Default)]
struct Registry {
    secrets: HashMap<String, Secret>,
    image_opts: bool,
}

static REGISTRY: OnceLock<Registry> = OnceLock::new();

/// Parses `--object` definitions (only `secret` objects, with `data=` or
/// `file=`, `format=raw`) and records them with the `--image-opts` flag.
pub fn install(objects: &[String], image_opts: bool) -> Result<(), CliError> {
    let mut secrets = HashMap::new();
    for object in objects {
        let mut fields = object.split(',');
        if fields.next() != Some("secret") {
            return Err(CliError::Usage(format!(
                "--object {object:?}: only secret objects are supported"
            )));
        }
        let (mut id, mut value) = (None, None);
        for field in fields {
            match field.split_once('=') {
                Some(("id", v)) => id = Some(v.to_string()),
                Some(("data", v)) => value = Some(Secret::new(v)),
                Some(("file", v)) => {
                    let bytes = std::fs::read(v).map_err(CliError::io(Path::new(v)))?;
                    value = Some(Secret::new(bytes));
                }
                Some(("format", "raw")) => {}
                _ => {
                    return Err(CliError::Usage(format!(
                        "--object {object:?}: unsupported field {field:?} (id=, data=, file=, format=raw)"
                    )))
                }
            }
        }
        match (id, value) {
            (Some(id), Some(value)) => {
                secrets.insert(id, value);
            }
            _ => {
                return Err(CliError::Usage(format!(
                    "--object {object:?}: a secret needs id= and data= or file="
                )))
            }
        }
    }
    let _ = REGISTRY.set(Registry {
        secrets,
        image_opts,
    });
    Ok(())
}

fn registry() -> &'static Registry {
    REGISTRY.get_or_init(Registry::default)
}

/// The secret defined with `id`.
pub fn secret(id: &str) -> Result<Secret, CliError> {
    registry()
        .secrets
        .get(id)
        .cloned()
        .ok_or_else(|| CliError::Usage(format!("No secret with id '{id}'")))
}

/// The file an image argument names and the passphrase it is opened with:
/// with `--image-opts`, the argument is `driver=qcow2,file.filename=PATH`
/// with an optional `encrypt.key-secret=ID`; otherwise it is the path.
pub fn resolve(argument: &Path) -> Result<(PathBuf, Option<Secret>), CliError> {
    if !registry().image_opts {
        return Ok((argument.to_path_buf(), None));
    }
    let text = argument.to_string_lossy();
    let (mut path, mut key) = (None, None);
    for field in text.split(',') {
        match field.split_once('=') {
            Some(("driver", "qcow2" | "raw")) => {}
            Some(("file.filename" | "filename", v)) => path = Some(PathBuf::from(v)),
            Some(("encrypt.key-secret", id)) => key = Some(secret(id)?),
            _ => {
                return Err(CliError::Usage(format!(
                    "--image-opts {text:?}: unsupported option {field:?} (driver=, file.filename=, encrypt.key-secret=)"
                )))
            }
        }
    }
    let path =
        path.ok_or_else(|| CliError::Usage(format!("--image-opts {text:?}: no file.filename=")))?;
    Ok((path, key))
}

/// Passphrases by the path of the image they open (set by
/// [`resolve_argument`]).
fn keys() -> &'static std::sync::Mutex<HashMap<PathBuf, Secret>> {
    static KEYS: OnceLock<std::sync::Mutex<HashMap<PathBuf, Secret>>> = OnceLock::new();
    KEYS.get_or_init(Default::default)
}

/// Replaces an image argument by the path it names (with `--image-opts`)
/// and remembers its passphrase for every open of that path.
pub fn resolve_argument(argument: &mut PathBuf) -> Result<(), CliError> {
    let (path, key) = resolve(argument)?;
    if let Some(key) = key {
        keys()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(path.clone(), key);
    }
    *argument = path;
    Ok(())
}

/// `options` with the passphrase given for the image at `path`, if any.
pub fn with_key(path: &Path, options: OpenOptions) -> OpenOptions {
    let key_secret = keys()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(path)
        .cloned();
    let fallback = options.key_secret.clone();
    options.key_secret(key_secret.or(fallback))
}
