//! Request ids that name their owner, so that a fleet of replicas behind
//! one telemetry URL behaves as one.
//!
//! LMCache posts every "store finished" event to one fixed URL, and the
//! payload names no sender: with several pd-proxy replicas behind one
//! telemetry Service, an event lands on a replica chosen by the load
//! balancer. The request id is the only thing that travels from the
//! parking replica, through vLLM and LMCache, to the telemetry endpoint;
//! so with a cluster key each id carries the address where its owner's
//! telemetry listener is reachable, and a keyed MAC over the whole id. A
//! replica that receives an event for another's id forwards it there. The
//! owner's address is taken only from an id whose MAC checks, so a
//! telemetry sender can never make a replica connect where it pleases.
//!
//! Wire form, as hex (no `-`, fixed length, parsed in O(1)):
//! `ip (16 bytes, IPv4 mapped) | port (2) | request id (16) | MAC (12)`,
//! 92 hex digits. Without a key, ids are today's 32 hex digits.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::pending::{RequestId, ID_LEN};

type HmacSha256 = Hmac<Sha256>;

const ADDR_BYTES: usize = 18;
const MAC_BYTES: usize = 12;
const ROUTED_BYTES: usize = ADDR_BYTES + 16 + MAC_BYTES;
/// Hex digits of an owner-routed id.
pub const ROUTED_LEN: usize = ROUTED_BYTES * 2;

/// Domain separation: the key signs nothing else.
const MAC_CONTEXT: &[u8] = b"pd-proxy owner-routed request id v1";

/// A cluster key shorter than this is refused: the MAC is only as strong
/// as the key.
pub const MIN_KEY_BYTES: usize = 16;

/// What an id token from a telemetry event turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// One of this replica's requests.
    Local(RequestId),
    /// Another replica's, whose telemetry listener is at this address.
    Remote(SocketAddr, RequestId),
    /// Not an id this fleet made: wrong length or digits, or a MAC that
    /// does not check (forged, or made with another key).
    Invalid,
}

/// Makes and reads the ids of one replica.
pub struct Ids {
    /// `None`: no cluster key, plain 32-hex ids.
    routed: Option<Routed>,
}

struct Routed {
    mac: HmacSha256,
    /// This replica's telemetry address, as written into its ids.
    me_bytes: [u8; ADDR_BYTES],
}

impl Ids {
    /// Plain ids: a single replica.
    pub const fn local() -> Self {
        Ids { routed: None }
    }

    /// Owner-routed ids signed with `key`, naming `me` (the address where
    /// this replica's telemetry listener is reachable from the
    /// prefillers).
    pub fn routed(key: &[u8], me: SocketAddr) -> Result<Self, String> {
        if key.len() < MIN_KEY_BYTES {
            return Err(format!(
                "the cluster key has {} bytes; at least {MIN_KEY_BYTES}",
                key.len()
            ));
        }
        let mac = HmacSha256::new_from_slice(key).map_err(|e| e.to_string())?;
        Ok(Ids {
            routed: Some(Routed {
                mac,
                me_bytes: addr_bytes(me),
            }),
        })
    }

    pub fn is_routed(&self) -> bool {
        self.routed.is_some()
    }

    /// The id as it goes upstream in `X-Request-Id`.
    pub fn wire(&self, id: RequestId) -> String {
        let Some(routed) = &self.routed else {
            return id.to_string();
        };
        let mut bytes = [0u8; ROUTED_BYTES];
        bytes[..ADDR_BYTES].copy_from_slice(&routed.me_bytes);
        bytes[ADDR_BYTES..ADDR_BYTES + 16].copy_from_slice(&id.to_bytes());
        let tag = routed.tag(&bytes[..ADDR_BYTES + 16]);
        bytes[ADDR_BYTES + 16..].copy_from_slice(&tag[..MAC_BYTES]);
        let mut out = String::with_capacity(ROUTED_LEN);
        for b in bytes {
            let _ = write!(out, "{b:02x}");
        }
        out
    }

    /// Reads an id token cut out of an engine id. Constant time in the
    /// number of parked requests; the MAC is checked before the address
    /// is believed.
    pub fn resolve(&self, token: &str) -> Owner {
        let Some(routed) = &self.routed else {
            return match RequestId::parse(token) {
                Some(id) if token.len() == ID_LEN => Owner::Local(id),
                _ => Owner::Invalid,
            };
        };
        let mut bytes = [0u8; ROUTED_BYTES];
        if token.len() != ROUTED_LEN || !decode_hex(token, &mut bytes) {
            return Owner::Invalid;
        }
        let (signed, tag) = bytes.split_at(ADDR_BYTES + 16);
        let mut mac = routed.mac.clone();
        mac.update(MAC_CONTEXT);
        mac.update(signed);
        if mac.verify_truncated_left(tag).is_err() {
            return Owner::Invalid;
        }
        let id = RequestId::from_bytes(signed[ADDR_BYTES..].try_into().expect("16 bytes"));
        if signed[..ADDR_BYTES] == routed.me_bytes {
            return Owner::Local(id);
        }
        Owner::Remote(bytes_addr(&signed[..ADDR_BYTES]), id)
    }
}

impl Routed {
    fn tag(&self, signed: &[u8]) -> [u8; 32] {
        let mut mac = self.mac.clone();
        mac.update(MAC_CONTEXT);
        mac.update(signed);
        mac.finalize().into_bytes().into()
    }
}

fn addr_bytes(addr: SocketAddr) -> [u8; ADDR_BYTES] {
    let ip = match addr.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let mut out = [0u8; ADDR_BYTES];
    out[..16].copy_from_slice(&ip.octets());
    out[16..].copy_from_slice(&addr.port().to_be_bytes());
    out
}

fn bytes_addr(bytes: &[u8]) -> SocketAddr {
    let ip = Ipv6Addr::from(<[u8; 16]>::try_from(&bytes[..16]).expect("16 bytes"));
    let port = u16::from_be_bytes([bytes[16], bytes[17]]);
    let ip = match ip.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(ip),
    };
    SocketAddr::new(ip, port)
}

/// Lowercase hex only, the form [`Ids::wire`] writes.
fn decode_hex(text: &str, out: &mut [u8]) -> bool {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let text = text.as_bytes();
    if text.len() != out.len() * 2 {
        return false;
    }
    for (i, pair) in text.chunks_exact(2).enumerate() {
        match (digit(pair[0]), digit(pair[1])) {
            (Some(hi), Some(lo)) => out[i] = hi << 4 | lo,
            _ => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn ids(addr: &str) -> Ids {
        Ids::routed(KEY, addr.parse().unwrap()).unwrap()
    }

    #[test]
    fn routed_ids_name_their_owner_and_resist_forgery() {
        let a = ids("10.1.2.3:5768");
        let b = ids("[fd00::7]:5768");
        let id = RequestId::random();
        let wire = a.wire(id);
        assert_eq!(wire.len(), ROUTED_LEN);
        assert!(!wire.contains('-'));
        assert_eq!(a.resolve(&wire), Owner::Local(id));
        assert_eq!(
            b.resolve(&wire),
            Owner::Remote("10.1.2.3:5768".parse().unwrap(), id)
        );
        assert_eq!(
            a.resolve(&b.wire(id)),
            Owner::Remote("[fd00::7]:5768".parse().unwrap(), id)
        );
        // Any changed digit breaks the MAC: the address cannot be steered.
        for i in 0..wire.len() {
            let mut forged = wire.clone().into_bytes();
            forged[i] = if forged[i] == b'0' { b'1' } else { b'0' };
            let forged = String::from_utf8(forged).unwrap();
            assert_eq!(b.resolve(&forged), Owner::Invalid, "digit {i}");
        }
        let other_key = Ids::routed(
            b"another key, just as long!!",
            "10.1.2.3:5768".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(other_key.resolve(&wire), Owner::Invalid);
        assert_eq!(a.resolve(&wire.to_uppercase()), Owner::Invalid);
        assert_eq!(a.resolve(&id.to_string()), Owner::Invalid, "a plain id");
        assert_eq!(a.resolve(""), Owner::Invalid);
    }

    #[test]
    fn plain_ids_without_a_key() {
        let plain = Ids::local();
        let id = RequestId::random();
        assert_eq!(plain.wire(id), id.to_string());
        assert_eq!(plain.resolve(&id.to_string()), Owner::Local(id));
        assert_eq!(plain.resolve(&ids("10.0.0.1:1").wire(id)), Owner::Invalid);
    }

    #[test]
    fn short_keys_are_refused() {
        assert!(Ids::routed(b"short", "10.0.0.1:1".parse().unwrap()).is_err());
    }
}
