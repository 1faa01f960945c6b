//! Consistent Overhead Byte Stuffing: removes every 0x00 from a frame so that
//! 0x00 can delimit frames on the wire. Encoding adds one byte per started
//! 254-byte run; decoding can run in place.

/// Largest encoded length for `len` input bytes (without the delimiter).
pub const fn max_encoded_len(len: usize) -> usize {
    len + len / 254 + 1
}

/// COBS-encode `input` into `out`, returning the encoded length (no delimiter
/// is written). Returns `None` if `out` is shorter than
/// [`max_encoded_len`]`(input.len())`.
pub fn encode(input: &[u8], out: &mut [u8]) -> Option<usize> {
    if out.len() < max_encoded_len(input.len()) {
        return None;
    }
    let mut code_at = 0; // where the current block's code byte goes
    let mut w = 1;
    let mut code: u8 = 1;
    for &b in input {
        if b == 0 {
            out[code_at] = code;
            code_at = w;
            w += 1;
            code = 1;
        } else {
            out[w] = b;
            w += 1;
            code += 1;
            if code == 0xFF {
                out[code_at] = code;
                code_at = w;
                w += 1;
                code = 1;
            }
        }
    }
    out[code_at] = code;
    Some(w)
}

/// Why a COBS block could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CobsError {
    /// A code byte of 0x00 inside the frame (cannot happen after framing on 0x00,
    /// but the function accepts any slice).
    #[error("zero byte inside a COBS frame")]
    ZeroByte,
    /// A code byte points past the end of the frame.
    #[error("COBS block runs past the end of the frame")]
    Truncated,
}

/// Decode a COBS frame (delimiter already removed) in place, returning the
/// decoded length. The decoded bytes occupy `buf[..len]`.
pub fn decode_in_place(buf: &mut [u8]) -> Result<usize, CobsError> {
    let n = buf.len();
    let mut r = 0;
    let mut w = 0;
    while r < n {
        let code = buf[r];
        if code == 0 {
            return Err(CobsError::ZeroByte);
        }
        let run = usize::from(code - 1);
        r += 1;
        if r + run > n {
            return Err(CobsError::Truncated);
        }
        for i in 0..run {
            let b = buf[r + i];
            if b == 0 {
                return Err(CobsError::ZeroByte);
            }
            buf[w + i] = b;
        }
        w += run;
        r += run;
        // A block shorter than 254 data bytes stands for "data then a zero",
        // except at the very end of the frame.
        if code != 0xFF && r < n {
            buf[w] = 0;
            w += 1;
        }
    }
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(data: &[u8]) {
        let mut enc = vec![0u8; max_encoded_len(data.len())];
        let n = encode(data, &mut enc).expect("buffer sized by max_encoded_len");
        assert!(!enc[..n].contains(&0), "encoded output has no zero");
        let mut buf = enc[..n].to_vec();
        let m = decode_in_place(&mut buf).expect("decodes");
        assert_eq!(&buf[..m], data);
    }

    #[test]
    fn known_vectors() {
        let cases: &[(&[u8], &[u8])] = &[
            (&[], &[0x01]),
            (&[0x00], &[0x01, 0x01]),
            (&[0x00, 0x00], &[0x01, 0x01, 0x01]),
            (&[0x11, 0x22, 0x00, 0x33], &[0x03, 0x11, 0x22, 0x02, 0x33]),
            (&[0x11, 0x00, 0x00, 0x00], &[0x02, 0x11, 0x01, 0x01, 0x01]),
        ];
        for (raw, want) in cases {
            let mut out = [0u8; 16];
            let n = encode(raw, &mut out).expect("fits");
            assert_eq!(&out[..n], *want, "encoding {raw:02x?}");
            roundtrip(raw);
        }
    }

    #[test]
    fn long_runs() {
        for len in [253, 254, 255, 300, 508, 509, 600] {
            let data: Vec<u8> = (0..len).map(|i| (i % 255 + 1) as u8).collect();
            roundtrip(&data);
            let mut with_zeros = data.clone();
            with_zeros[len / 2] = 0;
            roundtrip(&with_zeros);
        }
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(
            decode_in_place(&mut [0x05, 0x01]),
            Err(CobsError::Truncated)
        );
        assert_eq!(
            decode_in_place(&mut [0x03, 0x00, 0x01]),
            Err(CobsError::ZeroByte)
        );
        assert_eq!(decode_in_place(&mut [0x00]), Err(CobsError::ZeroByte));
    }
}
