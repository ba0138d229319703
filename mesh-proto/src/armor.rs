//! Text forms for files: one-line base64 (as `wg genkey`/`wg pubkey` write
//! keys) and PEM-like armored blocks for everything else.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::CodecError;

const LINE: usize = 64;

/// Standard base64 with padding, the form `wg` uses.
pub fn to_base64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// Decodes base64, ignoring surrounding white space.
pub fn from_base64(text: &str) -> Result<Vec<u8>, CodecError> {
    STANDARD
        .decode(text.trim())
        .map_err(|e| CodecError::Base64(e.to_string()))
}

/// Decodes base64 into exactly `N` bytes.
pub fn from_base64_array<const N: usize>(text: &str) -> Result<[u8; N], CodecError> {
    let bytes = from_base64(text)?;
    <[u8; N]>::try_from(bytes.as_slice()).map_err(|_| CodecError::Length {
        expected: N,
        found: bytes.len(),
    })
}

/// Wraps `bytes` in a `-----BEGIN label-----` block.
pub fn encode(label: &str, bytes: &[u8]) -> String {
    let body = to_base64(bytes);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in body.as_bytes().chunks(LINE) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Finds the first armored block in `text` and returns its label and bytes.
pub fn decode_any(text: &str) -> Result<(String, Vec<u8>), CodecError> {
    let mut lines = text.lines().map(str::trim);
    let label = lines
        .by_ref()
        .find_map(|l| l.strip_prefix("-----BEGIN ")?.strip_suffix("-----"))
        .ok_or(CodecError::MissingArmor {
            expected: "PQMESH ...",
        })?
        .to_string();
    let end = format!("-----END {label}-----");
    let mut body = String::new();
    for line in lines {
        if line == end {
            return Ok((label, from_base64(&body)?));
        }
        body.push_str(line);
    }
    Err(CodecError::UnterminatedArmor)
}

/// Decodes an armored block that must carry `label`.
pub fn decode(label: &'static str, text: &str) -> Result<Vec<u8>, CodecError> {
    let (found, bytes) = decode_any(text).map_err(|e| match e {
        CodecError::MissingArmor { .. } => CodecError::MissingArmor { expected: label },
        other => other,
    })?;
    if found != label {
        return Err(CodecError::WrongArmorLabel {
            expected: label,
            found,
        });
    }
    Ok(bytes)
}

/// Decodes a whole postcard value and refuses trailing bytes, so one value has
/// exactly one encoding on the wire.
pub fn postcard_exact<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, CodecError> {
    let (value, rest) = postcard::take_from_bytes(bytes)?;
    if !rest.is_empty() {
        return Err(CodecError::TrailingBytes(rest.len()));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn armor_round_trip_and_label_check() {
        let text = encode("PQMESH TEST", &[1, 2, 3, 250]);
        assert_eq!(decode("PQMESH TEST", &text).unwrap(), vec![1, 2, 3, 250]);
        assert!(matches!(
            decode("PQMESH OTHER", &text),
            Err(CodecError::WrongArmorLabel { .. })
        ));
        assert!(matches!(
            decode("PQMESH TEST", "no armor here"),
            Err(CodecError::MissingArmor { .. })
        ));
        let cut = &text[..text.len() - 20];
        assert_eq!(
            decode("PQMESH TEST", cut),
            Err(CodecError::UnterminatedArmor)
        );
    }

    #[test]
    fn base64_array_checks_length() {
        assert!(from_base64_array::<32>(&to_base64(&[7; 32])).is_ok());
        assert_eq!(
            from_base64_array::<32>(&to_base64(&[7; 31])),
            Err(CodecError::Length {
                expected: 32,
                found: 31
            })
        );
    }

    proptest! {
        #[test]
        fn armor_round_trips(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let text = encode("PQMESH X", &bytes);
            prop_assert_eq!(decode("PQMESH X", &text).unwrap(), bytes);
        }

        #[test]
        fn armor_decoder_never_panics(text in "\\PC*") {
            let _ = decode_any(&text);
        }
    }
}
