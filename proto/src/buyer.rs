//! Buyer tokens: how a shop's login service tells XBuy who a buyer is. With the directory, a buyer's client
//! connects to an app instance directly, past any gateway that could vouch for it, so the instance checks
//! the buyer itself: `Authorization: Bearer xb1.<user>.<expires>.<mac>`, where `expires` is a Unix time in
//! seconds and `mac` the hex HMAC-SHA256, under the key both sides hold (`buyer_key_file`), of
//! [`signed_text`]. Stateless, as a JWT with one algorithm and no header to trust: an instance needs no
//! session store and no call to the login service per request.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// What a token starts with: its format's version.
pub const PREFIX: &str = "xb1.";
/// Longest token taken: a user id is at most 64 bytes, a time 20 digits, the MAC 64 hex digits.
pub const MAX_TOKEN_BYTES: usize = 192;

/// Why a token was refused. The messages say what to fix, never what the MAC should have been.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("not a buyer token (xb1.<user>.<expires>.<mac>, the MAC 64 lower-case hex digits)")]
    Malformed,
    #[error("the buyer token's signature does not match (another key, or an altered token)")]
    BadSignature,
    #[error("the buyer token expired at {0} (Unix seconds)")]
    Expired(u64),
    #[error(
        "the buyer token lives until {expires} (Unix seconds), past the longest life taken ({max_secs} s from now)"
    )]
    TooLong { expires: u64, max_secs: u64 },
}

/// What a token must meet besides its signature: the time now, and the longest life it may still have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub now_unix: u64,
    /// A token that expires further ahead than this (beyond [`CLOCK_SLACK_SECS`]) is refused: one that leaks
    /// works this long at most, where a token minted for years worked until the key was changed.
    pub max_life_secs: u64,
}

/// How far the signer's clock may run ahead of the checker's: a token minted for the longest life on a clock
/// a little ahead is still taken.
pub const CLOCK_SLACK_SECS: u64 = 60;

/// The text a token's MAC covers: a fixed label first, so a MAC made for something else under the same
/// key (a load report's) is never a token's.
fn signed_text(user: &str, expires_unix: u64) -> String {
    format!("xbuy buyer token\n{user}\n{expires_unix}")
}

fn mac(key: &[u8], user: &str, expires_unix: u64) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("hmac takes any key length"));
    mac.update(signed_text(user, expires_unix).as_bytes());
    mac
}

/// A token that says `user` until `expires_unix` (Unix seconds).
pub fn mint(key: &[u8], user: &str, expires_unix: u64) -> String {
    let mac = hex::encode(mac(key, user, expires_unix).finalize().into_bytes());
    format!("{PREFIX}{user}.{expires_unix}.{mac}")
}

/// The user `token` names, when `key` signed it, it has not expired and it lives no longer than `limits`
/// allow. The MAC is compared in constant time. A user id may hold dots: the last two fields are the time
/// and the MAC.
pub fn verify(key: &[u8], token: &str, limits: Limits) -> Result<String, TokenError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(TokenError::Malformed);
    }
    let rest = token.strip_prefix(PREFIX).ok_or(TokenError::Malformed)?;
    let (rest, mac_hex) = rest.rsplit_once('.').ok_or(TokenError::Malformed)?;
    let (user, expires) = rest.rsplit_once('.').ok_or(TokenError::Malformed)?;
    // Lower-case hex of 32 bytes, as `mint` writes it: one token, one spelling.
    if mac_hex.len() != 64 || !mac_hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(TokenError::Malformed);
    }
    // The one spelling `mint` writes: `parse` takes a leading `+` or zeros, and two tokens of one text would
    // both verify.
    let expires = match expires.parse::<u64>() {
        Ok(n) if !user.is_empty() && expires == n.to_string() => n,
        _ => return Err(TokenError::Malformed),
    };
    let given = hex::decode(mac_hex).map_err(|_| TokenError::Malformed)?;
    (mac(key, user, expires).verify_slice(&given)).map_err(|_| TokenError::BadSignature)?;
    if expires <= limits.now_unix {
        return Err(TokenError::Expired(expires));
    }
    let longest = (limits.now_unix)
        .saturating_add(limits.max_life_secs)
        .saturating_add(CLOCK_SLACK_SECS);
    if expires > longest {
        return Err(TokenError::TooLong {
            expires,
            max_secs: limits.max_life_secs,
        });
    }
    Ok(user.to_string())
}

/// [`verify`] under each of `keys` (while a key is changed, the new one and the old): the user of the first
/// that signed it. A malformed token is so under any key, and an expired one was signed by this one.
pub fn verify_with_any<'k>(
    keys: impl IntoIterator<Item = &'k [u8]>,
    token: &str,
    limits: Limits,
) -> Result<String, TokenError> {
    for key in keys {
        match verify(key, token, limits) {
            Err(TokenError::BadSignature) => {}
            decided => return decided,
        }
    }
    Err(TokenError::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"buyer-key-0123456789";

    /// At `now_unix`, taking any life.
    fn at(now_unix: u64) -> Limits {
        Limits {
            now_unix,
            max_life_secs: u64::MAX,
        }
    }

    #[test]
    fn a_token_names_its_user_until_it_expires() {
        let token = mint(KEY, "demo.7", 1_000);
        assert!(token.starts_with("xb1.demo.7.1000."), "{token}");
        assert_eq!(verify(KEY, &token, at(999)), Ok("demo.7".to_string()));
        assert_eq!(verify(KEY, &token, at(1_000)), Err(TokenError::Expired(1_000)));
        assert_eq!(
            verify(b"another-key-0123456789", &token, at(999)),
            Err(TokenError::BadSignature)
        );
    }

    /// Any change to a token, its user's above all, is refused.
    #[test]
    fn an_altered_token_is_refused() {
        let token = mint(KEY, "demo-7", 1_000);
        let mac = token.rsplit_once('.').unwrap().1;
        for (altered, want) in [
            (format!("xb1.demo-8.1000.{mac}"), TokenError::BadSignature),
            (format!("xb1.demo-7.2000.{mac}"), TokenError::BadSignature),
            (format!("xb1.demo-7.+1000.{mac}"), TokenError::Malformed),
            (format!("xb1.demo-7.01000.{mac}"), TokenError::Malformed),
            (format!("xb1.demo-7.1000.{}", &mac[..62]), TokenError::Malformed),
            (format!("xb1.demo-7.1000.{mac}zz"), TokenError::Malformed),
            (
                format!("xb1.demo-7.1000.{}", mac.to_uppercase()),
                TokenError::Malformed,
            ),
            (format!("xb2.demo-7.1000.{mac}"), TokenError::Malformed),
            (format!("xb1..1000.{mac}"), TokenError::Malformed),
            (format!("xb1.1000.{mac}"), TokenError::Malformed),
            ("xb1.".to_string(), TokenError::Malformed),
            (
                format!("xb1.{}.1000.{mac}", "u".repeat(200)),
                TokenError::Malformed,
            ),
        ] {
            assert_eq!(verify(KEY, &altered, at(0)), Err(want), "{altered}");
        }
    }

    /// While a key is changed, a token signed with either the new or the old one passes.
    #[test]
    fn a_token_passes_under_any_key_held() {
        let old: &[u8] = b"old-key-0123456789";
        let token = mint(old, "demo-7", 1_000);
        let keys = [KEY, old];
        assert_eq!(verify_with_any(keys, &token, at(0)), Ok("demo-7".into()));
        assert_eq!(
            verify_with_any([KEY], &token, at(0)),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            verify_with_any(keys, &token, at(1_000)),
            Err(TokenError::Expired(1_000))
        );
        assert_eq!(verify_with_any(keys, "xb1.x", at(0)), Err(TokenError::Malformed));
    }

    /// A token that lives longer than the limit from now (a minute of slack for the signer's clock) is
    /// refused, however well signed.
    #[test]
    fn a_token_that_lives_too_long_is_refused() {
        let week = 7 * 86_400;
        let limits = Limits {
            now_unix: 1_000,
            max_life_secs: week,
        };
        let edge = 1_000 + week + CLOCK_SLACK_SECS;
        assert_eq!(
            verify(KEY, &mint(KEY, "demo-7", edge), limits),
            Ok("demo-7".into())
        );
        let past = mint(KEY, "demo-7", edge + 1);
        assert_eq!(
            verify(KEY, &past, limits),
            Err(TokenError::TooLong {
                expires: edge + 1,
                max_secs: week
            })
        );
        // Decided under the key that signed it.
        assert!(matches!(
            verify_with_any([b"other-key-0123456789" as &[u8], KEY], &past, limits),
            Err(TokenError::TooLong { .. })
        ));
        // A forged one is refused for its signature first.
        let forged = mint(b"other-key-0123456789", "demo-7", edge + 1);
        assert_eq!(verify(KEY, &forged, limits), Err(TokenError::BadSignature));
    }
}
