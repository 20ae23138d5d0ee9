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
    let (mut t, mut v1) = (None, None);
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.parse::<u64>().ok(),
            Some(("v1", v)) => v1 = hex::decode(v).ok(),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return Err(format!("{HEADER} must be t=<unix seconds>,v1=<hex HMAC-SHA256>"));
    };
    if t.abs_diff(now) > TOLERANCE_SECS {
        return Err(format!(
            "the signature's time {t} is more than {TOLERANCE_SECS} s from this host's ({now})"
        ));
    }
    mac(secret, t, body)
        .verify_slice(&v1)
        .map_err(|_| "the signature does not match the body".to_string())
}

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
        // Another time, same MAC: refused (the time is signed).
        let moved = h.replace("t=1000000", "t=1000001");
        assert!(verify("s3cret", Some(&moved), body, 1_000_000).is_err());
    }
}
