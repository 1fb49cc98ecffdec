//! Identifier and secret newtypes.
//!
//! IDs are UUIDs in canonical form (lowercase, hyphenated). Parsing is strict:
//! `FromStr` accepts only the canonical form, so that one ID has exactly one
//! spelling in URIs, Redis keys, headers and logs.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// Why an identifier did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The text is not a canonical (lowercase, hyphenated, 36 character) UUID.
    #[error("not a canonical lowercase hyphenated UUID")]
    NotCanonicalUuid,
    /// A serial number is not 1 to 40 hexadecimal digits, is zero, or is
    /// negative (as a DER integer).
    #[error("serial number must be 1 to 40 hex digits, positive and below 2^159")]
    BadSerial,
    /// A certificate serial number is longer than RFC 5280's 20 octets
    /// (2^159 or more).
    #[error("serial number longer than 20 octets")]
    SerialTooLong,
    /// A fingerprint is not 64 hexadecimal digits.
    #[error("fingerprint must be 64 hex digits")]
    BadFingerprint,
}

/// Parses a UUID only in its canonical form: 36 characters, lowercase hex,
/// hyphens at positions 8, 13, 18 and 23. Rejects braces, `urn:uuid:`,
/// uppercase and the simple (unhyphenated) form that `Uuid::parse_str` allows.
pub(crate) fn parse_canonical_uuid(s: &str) -> Result<Uuid, IdError> {
    let b = s.as_bytes();
    if b.len() != 36 {
        return Err(IdError::NotCanonicalUuid);
    }
    for (i, c) in b.iter().enumerate() {
        let ok = match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_digit() || (b'a'..=b'f').contains(c),
        };
        if !ok {
            return Err(IdError::NotCanonicalUuid);
        }
    }
    Uuid::parse_str(s).map_err(|_| IdError::NotCanonicalUuid)
}

macro_rules! uuid_id {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Uuid);

        impl $name {
            /// A new random (version 4) ID.
            pub fn random() -> Self {
                Self(Uuid::new_v4())
            }

            /// Wraps an existing UUID.
            pub const fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }

            /// The UUID inside.
            pub const fn as_uuid(&self) -> &Uuid {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0.hyphenated(), f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self.0.hyphenated())
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                parse_canonical_uuid(s).map(Self)
            }
        }

        impl From<Uuid> for $name {
            fn from(uuid: Uuid) -> Self {
                Self(uuid)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(&self.0.hyphenated())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

uuid_id!(
    /// A tenant (one customer organisation). Every record, certificate and
    /// event belongs to exactly one tenant.
    TenantId
);
uuid_id!(
    /// One managed device's agent. Assigned by the enroll-api at exchange time,
    /// never chosen by the agent.
    AgentId
);
uuid_id!(
    /// The public identifier of an enrollment token (never the secret).
    TokenId
);

/// The octets of the longest serial RFC 5280 allows (§4.1.2.2: at most 20
/// octets as a DER INTEGER, so a positive value below 2^159).
pub const SERIAL_MAX_OCTETS: usize = 20;

/// A certificate serial number: a positive integer below 2^159 (RFC 5280
/// §4.1.2.2 allows 20 octets; `openssl ca -rand_serial` makes 159-bit
/// serials), held as 20 big-endian bytes. The enroll-api issues 128-bit
/// random serials.
///
/// Displayed as 32 lowercase hex digits (leading zeros kept) when the value
/// fits in 128 bits, else as 40: one spelling per value, used in Redis keys,
/// headers, events and the API, and unchanged for every 128-bit serial.
/// `FromStr` accepts 1 to 40 hex digits of either case; leading zeros are
/// insignificant. A serial of zero is refused (RFC 5280 requires a positive
/// integer).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SerialNumber([u8; SERIAL_MAX_OCTETS]);

impl SerialNumber {
    /// Wraps a 128-bit serial given as 16 big-endian bytes. Returns `None`
    /// for an all-zero value.
    pub fn from_bytes(bytes: [u8; 16]) -> Option<Self> {
        let mut out = [0u8; SERIAL_MAX_OCTETS];
        out[SERIAL_MAX_OCTETS - 16..].copy_from_slice(&bytes);
        Self::from_full(out)
    }

    fn from_full(bytes: [u8; SERIAL_MAX_OCTETS]) -> Option<Self> {
        // Positive (the top bit is the sign of a 20-octet INTEGER), not zero.
        (bytes != [0; SERIAL_MAX_OCTETS] && bytes[0] & 0x80 == 0).then_some(Self(bytes))
    }

    /// Converts the content octets of a DER INTEGER (as found in a
    /// certificate, possibly with a leading 0x00 sign byte) to a serial.
    ///
    /// Refuses negative values (high bit set without a sign byte), zero, and
    /// values of 2^159 or more (longer than RFC 5280's 20 octets).
    pub fn from_der_integer(bytes: &[u8]) -> Result<Self, IdError> {
        if bytes.first().is_some_and(|b| b & 0x80 != 0) {
            return Err(IdError::BadSerial);
        }
        let significant = match bytes.iter().position(|b| *b != 0) {
            Some(first) => &bytes[first..],
            None => return Err(IdError::BadSerial),
        };
        if significant.len() > SERIAL_MAX_OCTETS
            || (significant.len() == SERIAL_MAX_OCTETS && significant[0] & 0x80 != 0)
        {
            return Err(IdError::SerialTooLong);
        }
        let mut out = [0u8; SERIAL_MAX_OCTETS];
        out[SERIAL_MAX_OCTETS - significant.len()..].copy_from_slice(significant);
        Ok(Self(out))
    }

    /// The 20 big-endian bytes.
    pub const fn as_bytes(&self) -> &[u8; SERIAL_MAX_OCTETS] {
        &self.0
    }

    /// Whether the value fits in 128 bits (the enroll-api's serials do).
    pub fn fits_128_bits(&self) -> bool {
        self.0[..SERIAL_MAX_OCTETS - 16] == [0; SERIAL_MAX_OCTETS - 16]
    }

    /// The bytes to put in a certificate's serial field: the value without
    /// leading zero bytes (an encoder adds the DER sign byte where needed).
    pub fn to_significant_bytes(&self) -> &[u8] {
        let first = self
            .0
            .iter()
            .position(|b| *b != 0)
            .unwrap_or(SERIAL_MAX_OCTETS - 1);
        &self.0[first..]
    }

    /// The displayed digits' bytes: the low 16 when the value fits in 128
    /// bits, else all 20.
    fn shown(&self) -> &[u8] {
        if self.fits_128_bits() {
            &self.0[SERIAL_MAX_OCTETS - 16..]
        } else {
            &self.0
        }
    }
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    for b in bytes {
        write!(f, "{b:02x}")?;
    }
    Ok(())
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn parse_hex_right_aligned<const N: usize>(s: &str) -> Option<[u8; N]> {
    let digits = s.as_bytes();
    if digits.is_empty() || digits.len() > 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    // Walk from the least significant digit so odd lengths align right.
    for (i, c) in digits.iter().rev().enumerate() {
        let v = hex_value(*c)?;
        out[N - 1 - i / 2] |= if i % 2 == 0 { v } else { v << 4 };
    }
    Some(out)
}

impl fmt::Display for SerialNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, self.shown())
    }
}

impl fmt::Debug for SerialNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SerialNumber(")?;
        write_hex(f, self.shown())?;
        f.write_str(")")
    }
}

impl FromStr for SerialNumber {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        parse_hex_right_aligned::<SERIAL_MAX_OCTETS>(s)
            .and_then(Self::from_full)
            .ok_or(IdError::BadSerial)
    }
}

/// The SHA-256 digest of a certificate's DER encoding.
///
/// This is the key pingora's rustls backend exposes per request; the gateway
/// looks the connection's identity up by it. Displayed as 64 lowercase hex
/// digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CertFingerprint([u8; 32]);

impl CertFingerprint {
    /// The fingerprint of a DER-encoded certificate.
    pub fn of_der(der: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, der);
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        Self(out)
    }

    /// Wraps an existing 32-byte SHA-256 digest.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The 32 digest bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for CertFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for CertFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CertFingerprint(")?;
        write_hex(f, &self.0)?;
        f.write_str(")")
    }
}

impl FromStr for CertFingerprint {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        if s.len() != 64 {
            return Err(IdError::BadFingerprint);
        }
        parse_hex_right_aligned::<32>(s)
            .map(Self)
            .ok_or(IdError::BadFingerprint)
    }
}

macro_rules! hex_serde {
    ($name:ident) => {
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
hex_serde!(SerialNumber);
hex_serde!(CertFingerprint);

macro_rules! secret {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, PartialEq, Eq)]
        pub struct $name(String);

        impl $name {
            /// Wraps a secret value.
            pub fn new(value: impl Into<String>) -> Self {
                Self(value.into())
            }

            /// The secret itself. Call only where the value must leave the
            /// process (the one creation response) or be hashed.
            pub fn expose_secret(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(concat!(stringify!($name), "([redacted])"))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("[redacted]")
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                String::deserialize(d).map(Self)
            }
        }
    };
}

secret!(
    /// An enrollment token secret (`opet_…`). Shown once at creation, stored
    /// only as a keyed hash. `Debug` and `Display` print `[redacted]`; it has
    /// no `Serialize` so it cannot slip into an event or a log record.
    TokenSecret
);
secret!(
    /// A tenant-admin API key (`opak_…`). Shown once at creation, stored only
    /// as a keyed hash. `Debug` and `Display` print `[redacted]`.
    AdminKeySecret
);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn uuid_ids_round_trip_and_reject_non_canonical() {
        let s = "6f1e0c9a-3a51-4c1b-9a57-0c7f2f6d8e10";
        let t: TenantId = s.parse().unwrap();
        assert_eq!(t.to_string(), s);
        assert_eq!(format!("{t:?}"), format!("TenantId({s})"));
        for bad in [
            "6F1E0C9A-3A51-4C1B-9A57-0C7F2F6D8E10",
            "{6f1e0c9a-3a51-4c1b-9a57-0c7f2f6d8e10}",
            "urn:uuid:6f1e0c9a-3a51-4c1b-9a57-0c7f2f6d8e10",
            "6f1e0c9a3a514c1b9a570c7f2f6d8e10",
            "6f1e0c9a-3a51-4c1b-9a57-0c7f2f6d8e1",
            "6f1e0c9a-3a51-4c1b-9a57-0c7f2f6d8e100",
            "6f1e0c9a-3a51-4c1b-9a570c7f2f6d-8e10",
            "g f1e0c9a-3a51-4c1b-9a57-0c7f2f6d8e1",
            "",
        ] {
            assert_eq!(
                bad.parse::<AgentId>(),
                Err(IdError::NotCanonicalUuid),
                "{bad}"
            );
        }
    }

    #[test]
    fn ids_serde_as_strings() {
        let a = AgentId::random();
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(json, format!("\"{a}\""));
        assert_eq!(serde_json::from_str::<AgentId>(&json).unwrap(), a);
        assert!(serde_json::from_str::<AgentId>("\"nope\"").is_err());
    }

    #[test]
    fn serial_display_parse_and_der() {
        let s: SerialNumber = "01".parse().unwrap();
        assert_eq!(s.to_string(), "00000000000000000000000000000001");
        assert_eq!(s.to_significant_bytes(), &[1]);
        let full = "ff".repeat(16);
        let s: SerialNumber = full.to_uppercase().parse().unwrap();
        assert_eq!(s.to_string(), full);
        // DER: a sign byte before a high-bit value is fine, the value is not.
        let mut der = vec![0u8];
        der.extend_from_slice(&[0xff; 16]);
        assert_eq!(SerialNumber::from_der_integer(&der).unwrap(), s);
        assert_eq!(
            SerialNumber::from_der_integer(&[0xff; 16]),
            Err(IdError::BadSerial)
        );
        // RFC 5280 allows 20 octets: 159 bits (`openssl ca -rand_serial`).
        let long = SerialNumber::from_der_integer(&[0x7f; 20]).unwrap();
        assert_eq!(long.to_string(), "7f".repeat(20));
        assert_eq!(long.to_string().parse::<SerialNumber>().unwrap(), long);
        assert_eq!(long.to_significant_bytes(), &[0x7f; 20]);
        assert!(!long.fits_128_bits());
        let mut der = vec![0u8];
        der.extend_from_slice(&[0x7f; 19]);
        assert_eq!(
            SerialNumber::from_der_integer(&der)
                .unwrap()
                .to_string()
                .len(),
            40
        );
        // 17 significant octets: above 128 bits, 40 digits.
        let s17 = SerialNumber::from_der_integer(&[1; 17]).unwrap();
        assert_eq!(s17.to_string(), format!("000000{}", "01".repeat(17)));
        // A 128-bit value spelled with leading zeros keeps its 32 digits.
        let padded: SerialNumber = format!("{}{}", "0".repeat(8), "ab".repeat(16))
            .parse()
            .unwrap();
        assert_eq!(padded.to_string(), "ab".repeat(16));
        // 2^159 needs 21 octets (a sign byte): too long.
        let mut der = vec![0u8, 0x80];
        der.extend_from_slice(&[0; 19]);
        assert_eq!(
            SerialNumber::from_der_integer(&der),
            Err(IdError::SerialTooLong)
        );
        assert_eq!(
            SerialNumber::from_der_integer(&[1; 21]),
            Err(IdError::SerialTooLong)
        );
        assert!(format!("8{}", "0".repeat(39))
            .parse::<SerialNumber>()
            .is_err());
        assert_eq!(
            SerialNumber::from_der_integer(&[0, 0]),
            Err(IdError::BadSerial)
        );
        assert_eq!(SerialNumber::from_der_integer(&[]), Err(IdError::BadSerial));
        for bad in ["", "0", "00", "xyz", &"1".repeat(41), "0x01", " 01"] {
            assert!(bad.parse::<SerialNumber>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn fingerprint_of_der_matches_sha256() {
        let fp = CertFingerprint::of_der(b"abc");
        assert_eq!(
            fp.to_string(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(fp.to_string().parse::<CertFingerprint>().unwrap(), fp);
        assert!("ba78".parse::<CertFingerprint>().is_err());
        assert!("zz".repeat(32).parse::<CertFingerprint>().is_err());
    }

    #[test]
    fn secrets_are_redacted() {
        let t = TokenSecret::new("opet_supersecret");
        assert_eq!(format!("{t}"), "[redacted]");
        assert_eq!(format!("{t:?}"), "TokenSecret([redacted])");
        assert_eq!(t.expose_secret(), "opet_supersecret");
        let k = AdminKeySecret::new("opak_x");
        assert!(!format!("{k:?} {k}").contains("opak_x"));
    }

    proptest! {
        #[test]
        fn serial_round_trips(bytes in proptest::array::uniform16(any::<u8>())) {
            prop_assume!(bytes != [0; 16]);
            let s = SerialNumber::from_bytes(bytes).unwrap();
            prop_assert_eq!(s.to_string().parse::<SerialNumber>().unwrap(), s);
            let mut der = s.to_significant_bytes().to_vec();
            if der[0] & 0x80 != 0 { der.insert(0, 0); }
            prop_assert_eq!(SerialNumber::from_der_integer(&der).unwrap(), s);
        }

        #[test]
        fn long_serial_round_trips(bytes in proptest::array::uniform20(any::<u8>())) {
            let mut bytes = bytes;
            bytes[0] &= 0x7f;
            prop_assume!(bytes != [0; 20]);
            let mut der = bytes.to_vec();
            while der.len() > 1 && der[0] == 0 { der.remove(0); }
            if der[0] & 0x80 != 0 { der.insert(0, 0); }
            let s = SerialNumber::from_der_integer(&der).unwrap();
            prop_assert_eq!(s.as_bytes(), &bytes);
            prop_assert_eq!(s.to_string().parse::<SerialNumber>().unwrap(), s);
            let len = s.to_string().len();
            prop_assert!(len == 32 || len == 40);
        }

        #[test]
        fn uuid_round_trips(n in any::<u128>()) {
            let id = TokenId::from_uuid(Uuid::from_u128(n));
            prop_assert_eq!(id.to_string().parse::<TokenId>().unwrap(), id);
        }

        #[test]
        fn only_canonical_uuids_parse(s in "\\PC{0,40}") {
            if let Ok(id) = s.parse::<TenantId>() {
                prop_assert_eq!(id.to_string(), s);
            }
        }
    }
}
