//! The PROXY protocol v2 header a TCP inbound listener can send to the app before the peer's
//! bytes (`--inbound LISTEN=TARGET,tcp,proxy-v2`, or the `meshid.io/proxy-protocol` annotation),
//! so that a TCP app (a database, a broker, haproxy, nginx `stream`) learns who called: the
//! peer's address, and the SPIFFE ID this sidecar verified.
//!
//! Layout (the PROXY protocol specification, section 2.2):
//! - the 12-byte signature, `0x21` (version 2, `PROXY`), `0x11` (TCP over IPv4) or `0x21` (TCP
//!   over IPv6), and the length of the rest;
//! - source address, destination address, source port, destination port: the peer as this
//!   sidecar saw it, and the address the peer connected to;
//! - `PP2_TYPE_SSL` (`0x20`): client flags `PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN |
//!   PP2_CLIENT_CERT_SESS`, verify result `0` (the certificate was verified: the header is only
//!   ever sent for an authenticated peer), and the `PP2_SUBTYPE_SSL_VERSION` sub-TLV `TLSv1.3`;
//! - [`PP2_TYPE_MESHID_SPIFFE_ID`] (`0xE4`, in the range the specification reserves for custom
//!   use): the peer's verified SPIFFE ID, UTF-8.
//!
//! Nothing the peer sent goes into the header: the address is the socket's, the ID is the one the
//! certificate verifier established.

use std::net::{IpAddr, SocketAddr};

/// The 12 bytes every PROXY protocol v2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// TLV type of the verified peer's SPIFFE ID (custom range `0xE0`–`0xEF`).
pub const PP2_TYPE_MESHID_SPIFFE_ID: u8 = 0xE4;
/// TLV type of the TLS details.
pub const PP2_TYPE_SSL: u8 = 0x20;
/// Sub-TLV of [`PP2_TYPE_SSL`]: the TLS version.
pub const PP2_SUBTYPE_SSL_VERSION: u8 = 0x21;
const PP2_CLIENT_SSL: u8 = 0x01;
const PP2_CLIENT_CERT_CONN: u8 = 0x02;
const PP2_CLIENT_CERT_SESS: u8 = 0x04;
const VERSION_2_PROXY: u8 = 0x21;
const TCP_OVER_IPV4: u8 = 0x11;
const TCP_OVER_IPV6: u8 = 0x21;
const TLS_VERSION: &[u8] = b"TLSv1.3";

/// The header for a connection from `source` (the peer) to `destination` (this listener's address
/// as the peer reached it), whose certificate verified as `spiffe_id`.
///
/// Both addresses are IPv4 when both are (IPv4-mapped IPv6 counts as IPv4); otherwise both are
/// sent as IPv6, an IPv4 address in its mapped form.
pub fn encode(source: SocketAddr, destination: SocketAddr, spiffe_id: &str) -> Vec<u8> {
    let (src, dst) = (source.ip().to_canonical(), destination.ip().to_canonical());
    let mut addresses = Vec::with_capacity(36);
    let family = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            addresses.extend_from_slice(&s.octets());
            addresses.extend_from_slice(&d.octets());
            TCP_OVER_IPV4
        }
        _ => {
            addresses.extend_from_slice(&v6(src).octets());
            addresses.extend_from_slice(&v6(dst).octets());
            TCP_OVER_IPV6
        }
    };
    addresses.extend_from_slice(&source.port().to_be_bytes());
    addresses.extend_from_slice(&destination.port().to_be_bytes());

    let mut ssl = vec![
        PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS,
        0,
        0,
        0,
        0,
    ];
    tlv(&mut ssl, PP2_SUBTYPE_SSL_VERSION, TLS_VERSION);
    let mut rest = addresses;
    tlv(&mut rest, PP2_TYPE_SSL, &ssl);
    tlv(&mut rest, PP2_TYPE_MESHID_SPIFFE_ID, spiffe_id.as_bytes());

    let mut header = Vec::with_capacity(16 + rest.len());
    header.extend_from_slice(&SIGNATURE);
    header.push(VERSION_2_PROXY);
    header.push(family);
    // A SPIFFE ID is at most 2,048 bytes, so the whole stays far below 64 KiB.
    let len = u16::try_from(rest.len()).unwrap_or(u16::MAX);
    header.extend_from_slice(&len.to_be_bytes());
    header.extend_from_slice(&rest);
    header
}

fn v6(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

fn tlv(out: &mut Vec<u8>, kind: u8, value: &[u8]) {
    out.push(kind);
    let len = u16::try_from(value.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&value[..usize::from(len)]);
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "spiffe://cluster.local/ns/shop/sa/frontend";

    #[test]
    fn ipv4_header_byte_for_byte() {
        let h = encode(
            "10.1.2.3:40000".parse().unwrap(),
            "10.9.8.7:5432".parse().unwrap(),
            ID,
        );
        let mut want = SIGNATURE.to_vec();
        want.extend_from_slice(&[0x21, 0x11]);
        let ssl_len = 5 + 3 + TLS_VERSION.len();
        let len = 12 + (3 + ssl_len) + (3 + ID.len());
        want.extend_from_slice(&u16::try_from(len).unwrap().to_be_bytes());
        want.extend_from_slice(&[10, 1, 2, 3, 10, 9, 8, 7]);
        want.extend_from_slice(&40000u16.to_be_bytes());
        want.extend_from_slice(&5432u16.to_be_bytes());
        want.extend_from_slice(&[0x20, 0, u8::try_from(ssl_len).unwrap(), 0x07, 0, 0, 0, 0]);
        want.extend_from_slice(&[0x21, 0, 7]);
        want.extend_from_slice(b"TLSv1.3");
        want.extend_from_slice(&[0xE4, 0, u8::try_from(ID.len()).unwrap()]);
        want.extend_from_slice(ID.as_bytes());
        assert_eq!(h, want);
    }

    #[test]
    fn mapped_ipv4_is_ipv4_and_mixed_families_are_ipv6() {
        let h = encode(
            "[::ffff:10.1.2.3]:1".parse().unwrap(),
            "10.9.8.7:2".parse().unwrap(),
            ID,
        );
        assert_eq!(h[13], 0x11);
        let h = encode(
            "10.1.2.3:1".parse().unwrap(),
            "[fd00::7]:2".parse().unwrap(),
            ID,
        );
        assert_eq!(h[13], 0x21);
        let addresses = &h[16..16 + 36];
        assert_eq!(
            &addresses[..16],
            &"::ffff:10.1.2.3"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
        assert_eq!(
            &addresses[16..32],
            &"fd00::7".parse::<std::net::Ipv6Addr>().unwrap().octets()
        );
        assert_eq!(&addresses[32..], &[0, 1, 0, 2]);
    }

    #[test]
    fn the_length_field_covers_everything_after_it() {
        let id = format!("spiffe://td/{}", "a".repeat(2000));
        let h = encode(
            "[fd00::1]:1".parse().unwrap(),
            "[fd00::2]:2".parse().unwrap(),
            &id,
        );
        let len = usize::from(u16::from_be_bytes([h[14], h[15]]));
        assert_eq!(h.len(), 16 + len);
        assert!(h.ends_with(id.as_bytes()));
    }
}
