//! Validated order requests and idempotency fingerprints. Everything from the network passes through
//! `validate` here before the store sees it.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::OrderKind;

/// Most lines in one order.
pub const MAX_LINES: usize = 50;
/// Most units of one SKU in one order line.
pub const MAX_QTY: u32 = 10_000;
/// Highest unit price a merchant may set, in cents.
pub const MAX_PRICE: i64 = 1_000_000_000;
/// Largest total an order can reach, so the largest payment a provider can report for one.
pub const MAX_ORDER_TOTAL: i64 = MAX_LINES as i64 * MAX_QTY as i64 * MAX_PRICE;

/// One line of an order request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderLineReq {
    pub sku: String,
    pub qty: u32,
}

/// An order ready for the store: validated, with its id, idempotency key and fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOrder {
    pub id: String,
    pub user: String,
    pub kind: OrderKind,
    pub lines: Vec<OrderLineReq>,
    pub idem_key: Option<String>,
    /// SHA-256 of the canonical request, so a key reused with another body is caught.
    pub fingerprint: String,
    pub created_ms: i64,
    pub expires_ms: i64,
    /// Flash-sale limit per user (only for `Seckill`).
    pub per_user_limit: u32,
}

/// Ids and names from the network: 1..=64 bytes of `[A-Za-z0-9._:-]`.
pub fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Why `id` (a `what`: "user", "sku id", ...) is not a [`valid_id`], quoting at most 64 characters of it:
/// a 10 KB id is not sent back whole.
pub fn bad_id(what: &str, id: &str) -> String {
    let shown: String = id.chars().take(64).collect();
    let cut = if shown.len() < id.len() { "…" } else { "" };
    format!("{what} {shown:?}{cut} is not 1..=64 bytes of [A-Za-z0-9._:-]")
}

/// Checks an idempotency key: 1..=128 printable ASCII bytes.
pub fn valid_idem_key(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic())
}

/// Validates the parts of an order request; the message names the offending value.
pub fn validate(user: &str, lines: &[OrderLineReq]) -> Result<(), String> {
    if !valid_id(user) {
        return Err(bad_id("user", user));
    }
    if lines.is_empty() || lines.len() > MAX_LINES {
        return Err(format!(
            "an order needs 1..={MAX_LINES} lines, got {}",
            lines.len()
        ));
    }
    validate_lines(lines)
}

/// Checks each line of an order or refund request (the count is the caller's): a well-formed SKU, a
/// quantity in `1..=MAX_QTY`, and no SKU twice, so a line's units are named in one place.
pub fn validate_lines(lines: &[OrderLineReq]) -> Result<(), String> {
    let mut seen = std::collections::HashSet::new();
    for l in lines {
        if !valid_id(&l.sku) {
            return Err(bad_id("sku", &l.sku));
        }
        if l.qty == 0 || l.qty > MAX_QTY {
            return Err(format!("qty {} for sku {} is not in 1..={MAX_QTY}", l.qty, l.sku));
        }
        if !seen.insert(l.sku.as_str()) {
            return Err(format!("sku {} appears twice; merge the lines", l.sku));
        }
    }
    Ok(())
}

/// The fingerprint of a request: kind, user and lines in a canonical order.
pub fn fingerprint(kind: OrderKind, user: &str, lines: &[OrderLineReq]) -> String {
    let mut h = Sha256::new();
    h.update(kind.as_str().as_bytes());
    h.update([0]);
    h.update(user.as_bytes());
    hash_lines(&mut h, lines);
    hex::encode(h.finalize())
}

/// Hashes `lines` in SKU order, each as `\0 sku \0 qty`, for the fingerprints (stored: the bytes must not
/// change, or a retry after an upgrade would read as another request).
fn hash_lines(h: &mut Sha256, lines: &[OrderLineReq]) {
    let mut sorted: Vec<_> = lines.iter().collect();
    sorted.sort_by(|a, b| a.sku.cmp(&b.sku));
    for l in sorted {
        h.update([0]);
        h.update(l.sku.as_bytes());
        h.update([0]);
        h.update(l.qty.to_le_bytes());
    }
}

/// The fingerprint of a refund request: its order and the units it names in SKU order, or (`None`) "every
/// unit left", so a key reused for another refund of the order is caught.
pub fn refund_fingerprint(order_id: &str, lines: Option<&[OrderLineReq]>) -> String {
    let mut h = Sha256::new();
    h.update(b"refund\0");
    h.update(order_id.as_bytes());
    match lines {
        None => h.update(b"\0all"),
        Some(lines) => hash_lines(&mut h, lines),
    }
    hex::encode(h.finalize())
}

/// One merchant stock change as its fingerprint reads it: SKU, units received, units written off, new price.
pub type StockChange<'a> = (&'a str, u32, u32, Option<i64>);

/// The fingerprint of a merchant stock batch, its changes in the order sent: the store applies them in that
/// order (a write-off may need the units an earlier change received), so another order is another batch.
pub fn stock_fingerprint<'a>(changes: impl IntoIterator<Item = StockChange<'a>>) -> String {
    let mut h = Sha256::new();
    h.update(b"stock");
    for (sku, receive, write_off, price) in changes {
        h.update([0]);
        h.update(sku.as_bytes());
        h.update([0]);
        h.update(receive.to_le_bytes());
        h.update(write_off.to_le_bytes());
        // A price left as it was and a price set differ by more than their bytes.
        match price {
            None => h.update([0]),
            Some(p) => {
                h.update([1]);
                h.update(p.to_le_bytes());
            }
        }
    }
    hex::encode(h.finalize())
}

/// A new order id, unique across processes: time, then 64 random bits.
pub fn new_order_id() -> String {
    format!("o{:x}{:016x}", now_ms(), rand::random::<u64>())
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(sku: &str, qty: u32) -> OrderLineReq {
        OrderLineReq { sku: sku.into(), qty }
    }

    #[test]
    fn stock_fingerprint_reads_every_field_and_the_order() {
        let fp = |c: &[StockChange<'_>]| stock_fingerprint(c.iter().copied());
        let a = fp(&[("a", 5, 0, None), ("b", 0, 1, Some(10))]);
        assert_eq!(a, fp(&[("a", 5, 0, None), ("b", 0, 1, Some(10))]));
        for other in [
            fp(&[("b", 0, 1, Some(10)), ("a", 5, 0, None)]),
            fp(&[("a", 6, 0, None), ("b", 0, 1, Some(10))]),
            fp(&[("a", 5, 0, None), ("b", 0, 2, Some(10))]),
            fp(&[("a", 5, 0, None), ("b", 0, 1, None)]),
            fp(&[("a", 5, 0, Some(0)), ("b", 0, 1, Some(10))]),
            fp(&[("a", 5, 0, None)]),
        ] {
            assert_ne!(a, other);
        }
    }

    #[test]
    fn fingerprint_ignores_line_order_but_not_content() {
        let a = fingerprint(OrderKind::Regular, "u1", &[line("a", 1), line("b", 2)]);
        let b = fingerprint(OrderKind::Regular, "u1", &[line("b", 2), line("a", 1)]);
        let c = fingerprint(OrderKind::Regular, "u1", &[line("a", 1), line("b", 3)]);
        let d = fingerprint(OrderKind::Seckill, "u1", &[line("a", 1), line("b", 2)]);
        let e = fingerprint(OrderKind::Regular, "u2", &[line("a", 1), line("b", 2)]);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
        assert_ne!(a, e);
    }

    #[test]
    fn a_refund_fingerprint_ignores_line_order_and_tells_all_from_some() {
        let a = refund_fingerprint("o1", Some(&[line("a", 1), line("b", 2)]));
        assert_eq!(a, refund_fingerprint("o1", Some(&[line("b", 2), line("a", 1)])));
        assert_ne!(a, refund_fingerprint("o1", Some(&[line("a", 1), line("b", 1)])));
        assert_ne!(a, refund_fingerprint("o2", Some(&[line("a", 1), line("b", 2)])));
        assert_ne!(a, refund_fingerprint("o1", None));
        assert_ne!(refund_fingerprint("o1", None), refund_fingerprint("o2", None));
    }

    /// Fingerprints are stored with orders and refunds: their bytes are pinned, so a change that moved them
    /// (a retry after an upgrade would read as another request) fails here.
    #[test]
    fn fingerprints_keep_their_bytes() {
        assert_eq!(
            fingerprint(OrderKind::Regular, "u1", &[line("b", 1), line("a", 2)]),
            "445cf685ec88435a3c7d8c6da7934522df7c26b186a92fba7f07a9698f538be0"
        );
        assert_eq!(
            refund_fingerprint("o1", Some(&[line("a", 1)])),
            "e4fdda74ff302c3b0e340fec26829b8ac6ab0d73806b5f6f23a48870275801c7"
        );
    }

    #[test]
    fn a_long_bad_id_is_quoted_cut() {
        let msg = bad_id("user", &"x".repeat(10_000));
        assert!(msg.len() < 150 && msg.contains("…"), "{msg}");
        assert_eq!(
            bad_id("sku", "a b"),
            "sku \"a b\" is not 1..=64 bytes of [A-Za-z0-9._:-]"
        );
    }

    #[test]
    fn validation_names_the_problem() {
        assert!(validate("u1", &[line("sku-1", 1)]).is_ok());
        assert!(validate("", &[line("a", 1)]).unwrap_err().contains("user"));
        assert!(validate("u 1", &[line("a", 1)]).is_err());
        assert!(validate("u1", &[]).unwrap_err().contains("lines"));
        assert!(validate("u1", &[line("a", 0)]).unwrap_err().contains("qty"));
        assert!(validate("u1", &[line("a", MAX_QTY + 1)]).is_err());
        assert!(
            validate("u1", &[line("a", 1), line("a", 2)])
                .unwrap_err()
                .contains("twice")
        );
        assert!(validate("u1", &[line("a/b", 1)]).is_err());
        assert!(valid_idem_key("k-1"));
        assert!(!valid_idem_key("k 1"));
        assert!(!valid_idem_key(&"k".repeat(129)));
    }

    #[test]
    fn ids_are_unique() {
        let a: std::collections::HashSet<_> = (0..1000).map(|_| new_order_id()).collect();
        assert_eq!(a.len(), 1000);
    }
}
