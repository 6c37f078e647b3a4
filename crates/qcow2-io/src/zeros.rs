//! Zero detection, shared by the write paths and the command-line tool.

/// Whether every byte of `buf` is zero (sixteen bytes at a time).
pub fn is_zero(buf: &[u8]) -> bool {
    let split = buf.len() % 16;
    buf[..split].iter().all(|&b| b == 0)
        && buf[split..]
            .chunks_exact(16)
            .all(|w| u128::from_ne_bytes(w.try_into().unwrap_or([1; 16])) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sees_every_byte() {
        let mut buf = vec![0u8; 4099];
        assert!(is_zero(&buf));
        for i in [0, 2, 3, 17, 4098] {
            buf[i] = 1;
            assert!(!is_zero(&buf), "byte {i}");
            buf[i] = 0;
        }
        assert!(is_zero(&[]));
    }
}
