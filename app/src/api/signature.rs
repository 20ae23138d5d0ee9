//! Payment-provider callbacks signed with a shared secret (`payment_callback_secret`), as providers sign
//! their webhooks: the header `X-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`. The
//! time is inside what is signed, so a captured delivery can be replayed only within [`TOLERANCE_SECS`],
//! and a replay is one more delivery of the same `payment_id`, which has one effect anyway.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// How far a signature's time may be from this host's clock.
pub const TOLERANCE_SECS: u64 = 300;

/// The header that carries the signature.
pub const HEADER: &str = "x-signature";

type HmacSha256 = Hmac<Sha256>;

fn mac(secret: &str, t: u64, body: &[u8]) -> HmacSha256 {
    // HMAC takes a key of any length, so this cannot fail.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("hmac takes any key length"));
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The header value a provider sends for `body` at time `t`.
pub fn sign(secret: &str, t: u64, body: &[u8]) -> String {
    format!(
        "t={t},v1={}",
        hex::encode(mac(secret, t, body).finalize().into_bytes())
    )
}

/// Checks `header` (the value of [`HEADER`], if any) against `body` at `now` (unix seconds); the error says
/// what is wrong, never what was expected.
pub fn verify(secret: &str, header: Option<&str>, body: &[u8], now: u64) -> Result<(), String> {
    let header = header.ok_or_else(|| format!("a signed callback needs the {HEADER} header"))?;
    // Every `v1`: a provider rolling its secret signs with the old and the new one for a while (as Stripe
    // does), and checking only the last refused each callback whose last was made with the other secret.
    let (mut t, mut v1s) = (None, Vec::new());
    for part in header.split(',').take(MAX_PARTS) {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.parse::<u64>().ok(),
            Some(("v1", v)) => v1s.extend(hex::decode(v).ok()),
            _ => {}
        }
    }
    let Some(t) = t.filter(|_| !v1s.is_empty()) else {
        return Err(format!("{HEADER} must be t=<unix seconds>,v1=<hex HMAC-SHA256>"));
    };
    if t.abs_diff(now) > TOLERANCE_SECS {
        return Err(format!(
            "the signature's time {t} is more than {TOLERANCE_SECS} s from this host's ({now})"
        ));
    }
    let signed = mac(secret, t, body);
    (v1s.iter().any(|v1| signed.clone().verify_slice(v1).is_ok()))
        .then_some(())
        .ok_or_else(|| "the signature does not match the body".to_string())
}

/// Most comma-separated parts of a signature header looked at (a header is bounded by the server's limit on
/// head size too; this bounds the MACs checked).
const MAX_PARTS: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_holds_for_its_body_and_time_only() {
        let body = br#"{"payment_id":"p1"}"#;
        let h = sign("s3cret", 1_000_000, body);
        assert_eq!(verify("s3cret", Some(&h), body, 1_000_000), Ok(()));
        assert_eq!(
            verify("s3cret", Some(&h), body, 1_000_000 + TOLERANCE_SECS),
            Ok(())
        );
        let late = verify("s3cret", Some(&h), body, 1_000_000 + TOLERANCE_SECS + 1);
        assert!(late.unwrap_err().contains("more than 300 s"));
        assert!(verify("other", Some(&h), body, 1_000_000).is_err());
        assert!(verify("s3cret", Some(&h), br#"{"payment_id":"p2"}"#, 1_000_000).is_err());
        assert!(
            verify("s3cret", None, body, 1_000_000)
                .unwrap_err()
                .contains("needs")
        );
        for bad in ["", "t=1", "v1=00", "t=x,v1=00", "t=1000000,v1=zz"] {
            assert!(verify("s3cret", Some(bad), body, 1_000_000).is_err(), "{bad}");
        }
        // While a secret rolls, either of two `v1`s may be the one made with this secret.
        let v1 = |secret| {
            sign(secret, 1_000_000, body)
                .split_once(",v1=")
                .unwrap()
                .1
                .to_string()
        };
        let both = format!("t=1000000,v1={},v1={}", v1("s3cret"), v1("old"));
        assert_eq!(verify("s3cret", Some(&both), body, 1_000_000), Ok(()));
        assert_eq!(verify("old", Some(&both), body, 1_000_000), Ok(()));
        assert!(verify("other", Some(&both), body, 1_000_000).is_err());
        // Another time, same MAC: refused (the time is signed).
        let moved = h.replace("t=1000000", "t=1000001");
        assert!(verify("s3cret", Some(&moved), body, 1_000_000).is_err());
    }
}
