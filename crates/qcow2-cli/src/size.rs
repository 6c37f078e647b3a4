//! Sizes as people write them (`10G`, `1.5M`, `4096`) and as qemu-img prints
//! them (`1 GiB`, `196 KiB`).

use crate::error::CliError;

const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];

/// Parses a size with an optional binary suffix (k, M, G, T, P, E; also
/// with a trailing `B`, `iB`) and optional fraction.
pub fn parse_size(text: &str) -> Result<u64, CliError> {
    let invalid = || CliError::Usage(format!("invalid size {text:?} (examples: 4096, 64k, 10G)"));
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (number, suffix) = t.split_at(split);
    let shift = match suffix
        .trim_end_matches("iB")
        .trim_end_matches('B')
        .to_ascii_lowercase()
        .as_str()
    {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        "e" => 60,
        _ => return Err(invalid()),
    };
    if number.is_empty() {
        return Err(invalid());
    }
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let whole: u64 = whole.parse().map_err(|_| invalid())?;
    let mut bytes = whole
        .checked_shl(shift)
        .filter(|v| v >> shift == whole)
        .ok_or_else(invalid)?;
    if !fraction.is_empty() {
        let digits: u32 = fraction.len().try_into().map_err(|_| invalid())?;
        let frac: u64 = fraction.parse().map_err(|_| invalid())?;
        let scale = 10u64.checked_pow(digits).ok_or_else(invalid)?;
        let extra = (u128::from(frac) << shift) / u128::from(scale);
        bytes = bytes
            .checked_add(u64::try_from(extra).map_err(|_| invalid())?)
            .ok_or_else(invalid)?;
    }
    Ok(bytes)
}

/// `resize`'s size: absolute, or `+SIZE` / `-SIZE` relative to the
/// current one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeChange {
    /// The new size.
    To(u64),
    /// Grow by this much.
    Grow(u64),
    /// Shrink by this much.
    Shrink(u64),
}

impl std::str::FromStr for SizeChange {
    type Err = CliError;

    fn from_str(text: &str) -> Result<Self, CliError> {
        Ok(match text.as_bytes().first() {
            Some(b'+') => Self::Grow(parse_size(&text[1..])?),
            Some(b'-') => Self::Shrink(parse_size(&text[1..])?),
            _ => Self::To(parse_size(text)?),
        })
    }
}

impl SizeChange {
    /// The size it makes of `current`, or `None` out of range.
    pub fn apply(self, current: u64) -> Option<u64> {
        match self {
            Self::To(size) => Some(size),
            Self::Grow(by) => current.checked_add(by),
            Self::Shrink(by) => current.checked_sub(by),
        }
    }
}

/// Formats bytes like qemu-img: three significant digits and a binary unit.
pub fn human(bytes: u64) -> String {
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        return format!("{bytes} B");
    }
    let text = if value >= 100.0 {
        format!("{value:.0}")
    } else if value >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    };
    let text = if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    };
    format!("{text} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_suffixes_and_fractions() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("1.5M").unwrap(), 3 << 19);
        assert_eq!(parse_size("2MiB").unwrap(), 2 << 20);
        assert!(parse_size("").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("99999999999E").is_err());
    }

    #[test]
    fn prints_like_qemu_img() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(200_704), "196 KiB");
        assert_eq!(human(1 << 30), "1 GiB");
        assert_eq!(human(3 << 29), "1.5 GiB");
        assert_eq!(human(10_800_000), "10.3 MiB");
    }
}
