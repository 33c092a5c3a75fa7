//! Object IDs: 32 bytes shown as 64 hex digits, unforgeable.
//!
//! Layout (all integers big-endian):
//!
//! ```text
//! unique: [kind=1][home colo tag: 2][jurisdiction tag: 2][random: 11][MAC: 16]
//! named:  [kind=2][jurisdiction tag: 2][name hash: 13]            [MAC: 16]
//! ```
//!
//! The MAC is HMAC-SHA256 over `(namespace, first 16 bytes)` keyed by the namespace's ID key, so an
//! ID that was made up, altered, or minted for another namespace fails verification. The name hash
//! of a named ID is a keyed hash of `(namespace, jurisdiction, name)`, hence deterministic.
//!
//! Keys rotate without orphaning anything: new unique IDs are signed with the newest key, every key
//! in the ring verifies, and named IDs are always derived with the first (original) key so the same
//! name keeps mapping to the same ID forever.

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use std::fmt;
use std::str::FromStr;

type HmacSha256 = Hmac<Sha256>;

pub const ID_LEN: usize = 32;
const BODY_LEN: usize = 16;
pub(crate) const KIND_UNIQUE: u8 = 1;
pub(crate) const KIND_NAMED: u8 = 2;

/// A verified-or-not object ID. Obtain a verified one through [`IdKeys::verify`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectId([u8; ID_LEN]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("an object ID is 64 hexadecimal digits; got {0} characters")]
    BadLength(usize),
    #[error("an object ID is 64 hexadecimal digits; found a character that is not one")]
    NotHex,
    #[error(
        "this is not a valid object ID for this namespace (unknown kind, altered, or minted elsewhere)"
    )]
    NotAuthentic,
}

/// Whether an ID was minted at random or derived from a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdKind {
    Unique,
    Named,
}

impl ObjectId {
    pub fn from_bytes(bytes: [u8; ID_LEN]) -> Self {
        ObjectId(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; ID_LEN] {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn kind(&self) -> Option<IdKind> {
        match self.0[0] {
            KIND_UNIQUE => Some(IdKind::Unique),
            KIND_NAMED => Some(IdKind::Named),
            _ => None,
        }
    }

    /// The home colo tag of a unique ID (see [`tag16`]); named IDs carry none.
    pub fn home_colo_tag(&self) -> Option<u16> {
        (self.0[0] == KIND_UNIQUE).then(|| u16::from_be_bytes([self.0[1], self.0[2]]))
    }

    /// The jurisdiction tag (0 = no jurisdiction).
    pub fn jurisdiction_tag(&self) -> u16 {
        match self.0[0] {
            KIND_UNIQUE => u16::from_be_bytes([self.0[3], self.0[4]]),
            _ => u16::from_be_bytes([self.0[1], self.0[2]]),
        }
    }

    /// The slot this object belongs to among `slot_count` slots. The MAC bytes are uniformly
    /// distributed for every kind of ID, so they spread objects evenly without further hashing.
    pub fn slot(&self, slot_count: u32) -> u32 {
        let mut tail = [0u8; 8];
        tail.copy_from_slice(&self.0[24..32]);
        (u64::from_be_bytes(tail) % u64::from(slot_count.max(1))) as u32
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ObjectId({})", self.to_hex())
    }
}

impl FromStr for ObjectId {
    type Err = IdError;

    /// Parses the hex form only; authenticity is checked by [`IdKeys::verify`].
    fn from_str(s: &str) -> Result<Self, IdError> {
        if s.len() != ID_LEN * 2 {
            return Err(IdError::BadLength(s.chars().count()));
        }
        let mut bytes = [0u8; ID_LEN];
        hex::decode_to_slice(s, &mut bytes).map_err(|_| IdError::NotHex)?;
        Ok(ObjectId(bytes))
    }
}

/// A 16-bit tag naming a colo or jurisdiction inside IDs. 0 is reserved for "none".
pub fn tag16(kind: &str, name: &str) -> u16 {
    let digest = Sha256::new()
        .chain_update(b"colony-tag\0")
        .chain_update(kind.as_bytes())
        .chain_update(b"\0")
        .chain_update(name.as_bytes())
        .finalize();
    match u16::from_be_bytes([digest[0], digest[1]]) {
        0 => 1,
        t => t,
    }
}

/// The key ring of one namespace. `keys[0]` is the original key (named IDs), the last one is the
/// current key (new unique IDs); all of them verify.
#[derive(Clone)]
pub struct IdKeys {
    namespace: String,
    keys: Vec<Vec<u8>>,
}

impl fmt::Debug for IdKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdKeys")
            .field("namespace", &self.namespace)
            .field("keys", &self.keys.len())
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("namespace {0:?} has no ID key")]
    NoKeys(String),
    #[error("an ID key of namespace {0:?} is shorter than 32 bytes")]
    TooShort(String),
}

impl IdKeys {
    pub fn new(namespace: &str, keys: Vec<Vec<u8>>) -> Result<Self, KeyError> {
        if keys.is_empty() {
            return Err(KeyError::NoKeys(namespace.to_string()));
        }
        if keys.iter().any(|k| k.len() < 32) {
            return Err(KeyError::TooShort(namespace.to_string()));
        }
        Ok(IdKeys {
            namespace: namespace.to_string(),
            keys,
        })
    }

    /// A fresh random 32-byte key.
    pub fn generate_key() -> Vec<u8> {
        let mut key = vec![0u8; 32];
        rand::fill(&mut key[..]);
        key
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    fn mac(&self, key: &[u8], body: &[u8]) -> HmacSha256 {
        // `new_from_slice` accepts keys of any length for HMAC; lengths were checked in `new`.
        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(key)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
        mac.update(b"colony-id-v1\0");
        mac.update(self.namespace.as_bytes());
        mac.update(b"\0");
        mac.update(body);
        mac
    }

    fn seal(&self, key: &[u8], body: [u8; BODY_LEN]) -> ObjectId {
        let tag = self.mac(key, &body).finalize().into_bytes();
        let mut id = [0u8; ID_LEN];
        id[..BODY_LEN].copy_from_slice(&body);
        id[BODY_LEN..].copy_from_slice(&tag[..ID_LEN - BODY_LEN]);
        ObjectId(id)
    }

    fn current_key(&self) -> &[u8] {
        self.keys.last().map_or(&[][..], |k| &k[..])
    }

    fn original_key(&self) -> &[u8] {
        self.keys.first().map_or(&[][..], |k| &k[..])
    }

    /// A new random ID whose home is `colo` and whose data stays in `jurisdiction` (if any).
    pub fn new_unique(&self, colo: &str, jurisdiction: Option<&str>) -> ObjectId {
        let mut body = [0u8; BODY_LEN];
        body[0] = KIND_UNIQUE;
        body[1..3].copy_from_slice(&tag16("colo", colo).to_be_bytes());
        let juris = jurisdiction.map_or(0, |j| tag16("jurisdiction", j));
        body[3..5].copy_from_slice(&juris.to_be_bytes());
        rand::fill(&mut body[5..]);
        self.seal(self.current_key(), body)
    }

    /// The deterministic ID for `name` (within `jurisdiction`, if any).
    pub fn from_name(&self, name: &str, jurisdiction: Option<&str>) -> ObjectId {
        let juris = jurisdiction.map_or(0, |j| tag16("jurisdiction", j));
        let mut hasher = <HmacSha256 as KeyInit>::new_from_slice(self.original_key())
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
        hasher.update(b"colony-name-v1\0");
        hasher.update(self.namespace.as_bytes());
        hasher.update(b"\0");
        hasher.update(&juris.to_be_bytes());
        hasher.update(name.as_bytes());
        let hash = hasher.finalize().into_bytes();
        let mut body = [0u8; BODY_LEN];
        body[0] = KIND_NAMED;
        body[1..3].copy_from_slice(&juris.to_be_bytes());
        body[3..].copy_from_slice(&hash[..BODY_LEN - 3]);
        self.seal(self.original_key(), body)
    }

    /// Parses and authenticates an ID string.
    pub fn verify(&self, text: &str) -> Result<ObjectId, IdError> {
        let id: ObjectId = text.parse()?;
        self.verify_id(&id)?;
        Ok(id)
    }

    /// Authenticates an already parsed ID against every key in the ring.
    pub fn verify_id(&self, id: &ObjectId) -> Result<(), IdError> {
        if id.kind().is_none() {
            return Err(IdError::NotAuthentic);
        }
        let (body, tag) = id.0.split_at(BODY_LEN);
        let authentic = self
            .keys
            .iter()
            .any(|key| self.mac(key, body).verify_truncated_left(tag).is_ok());
        if authentic {
            Ok(())
        } else {
            Err(IdError::NotAuthentic)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(ns: &str, seed: u8) -> IdKeys {
        IdKeys::new(ns, vec![vec![seed; 32]]).expect("valid key")
    }

    #[test]
    fn unique_ids_verify_and_encode_home_and_jurisdiction() {
        let k = keys("chat", 1);
        let id = k.new_unique("ams", Some("eu"));
        assert_eq!(id.to_hex().len(), 64);
        assert_eq!(k.verify(&id.to_hex()), Ok(id));
        assert_eq!(id.kind(), Some(IdKind::Unique));
        assert_eq!(id.home_colo_tag(), Some(tag16("colo", "ams")));
        assert_eq!(id.jurisdiction_tag(), tag16("jurisdiction", "eu"));
        assert_ne!(k.new_unique("ams", None), k.new_unique("ams", None));
        assert_eq!(k.new_unique("ams", None).jurisdiction_tag(), 0);
    }

    #[test]
    fn named_ids_are_deterministic_and_distinct_per_name_namespace_and_jurisdiction() {
        let k = keys("chat", 1);
        assert_eq!(k.from_name("room-1", None), k.from_name("room-1", None));
        assert_ne!(k.from_name("room-1", None), k.from_name("room-2", None));
        assert_ne!(
            k.from_name("room-1", None),
            k.from_name("room-1", Some("eu"))
        );
        assert_ne!(
            k.from_name("room-1", None),
            keys("other", 1).from_name("room-1", None)
        );
        let id = k.from_name("room-1", None);
        assert_eq!(id.kind(), Some(IdKind::Named));
        assert_eq!(k.verify(&id.to_hex()), Ok(id));
    }

    #[test]
    fn every_single_bit_flip_is_rejected() {
        let k = keys("chat", 1);
        for id in [k.new_unique("ams", None), k.from_name("x", None)] {
            for byte in 0..ID_LEN {
                for bit in 0..8 {
                    let mut bytes = *id.as_bytes();
                    bytes[byte] ^= 1 << bit;
                    let altered = ObjectId::from_bytes(bytes);
                    assert_eq!(
                        k.verify(&altered.to_hex()),
                        Err(IdError::NotAuthentic),
                        "flip of bit {bit} in byte {byte} must be rejected"
                    );
                }
            }
        }
    }

    #[test]
    fn ids_of_another_namespace_or_key_are_rejected() {
        let chat = keys("chat", 1);
        let other_ns = keys("games", 1);
        let other_key = keys("chat", 2);
        let id = chat.new_unique("ams", None);
        assert_eq!(other_ns.verify(&id.to_hex()), Err(IdError::NotAuthentic));
        assert_eq!(other_key.verify(&id.to_hex()), Err(IdError::NotAuthentic));
        let named = chat.from_name("room", None);
        assert_eq!(other_ns.verify(&named.to_hex()), Err(IdError::NotAuthentic));
    }

    #[test]
    fn malformed_strings_say_what_is_wrong() {
        let k = keys("chat", 1);
        assert_eq!(k.verify("abc"), Err(IdError::BadLength(3)));
        assert_eq!(k.verify(&"zz".repeat(32)), Err(IdError::NotHex));
        assert_eq!(k.verify(&"00".repeat(32)), Err(IdError::NotAuthentic));
    }

    #[test]
    fn rotation_keeps_old_ids_valid_and_names_stable() {
        let old = IdKeys::new("chat", vec![vec![1; 32]]).expect("key");
        let rotated = IdKeys::new("chat", vec![vec![1; 32], vec![9; 32]]).expect("keys");
        let before = old.new_unique("ams", None);
        assert_eq!(rotated.verify(&before.to_hex()), Ok(before));
        assert_eq!(old.from_name("room", None), rotated.from_name("room", None));
        let after = rotated.new_unique("ams", None);
        assert_eq!(rotated.verify(&after.to_hex()), Ok(after));
        // An ID signed with a key the old ring never had does not verify there.
        assert_eq!(old.verify(&after.to_hex()), Err(IdError::NotAuthentic));
    }

    #[test]
    fn short_or_missing_keys_are_refused() {
        assert!(matches!(IdKeys::new("a", vec![]), Err(KeyError::NoKeys(_))));
        assert!(matches!(
            IdKeys::new("a", vec![vec![0; 8]]),
            Err(KeyError::TooShort(_))
        ));
    }

    #[test]
    fn slots_spread_evenly() {
        let k = keys("chat", 3);
        let mut counts = vec![0u32; 16];
        for i in 0..16_000 {
            counts[k.from_name(&format!("n{i}"), None).slot(16) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
    }
}
