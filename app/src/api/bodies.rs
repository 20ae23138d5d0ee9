//! The request bodies of XBuy's API and their checks, apart from the handlers so they can be decoded and
//! checked without a store (the `app_bodies` fuzz target drives [`decode_and_check`]). Each body type is
//! decoded with `deny_unknown_fields`; `check` names the offending value and returns the error code the
//! handler answers with.

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::domain::request::{MAX_LINES, MAX_ORDER_TOTAL, MAX_PRICE, bad_id, validate, validate_lines};
use crate::domain::{Cents, OrderKind, OrderLineReq, fingerprint, valid_id};
use crate::store::{PaymentCallback, StockUpdate};

/// Most wallets credited in one call.
pub const MAX_CREDIT_USERS: usize = 10_000;
/// Largest single credit, in cents.
pub const MAX_CREDIT: Cents = 1_000_000_000;
/// Most updates in one merchant batch.
pub const MAX_UPDATES: usize = 1000;

/// A refused body: the JSON error code and a message naming the value.
pub type Refusal = (&'static str, String);

/// `POST /v1/orders`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateOrder {
    pub user: String,
    pub lines: Vec<OrderLineReq>,
}

impl CreateOrder {
    pub fn check(&self) -> Result<(), Refusal> {
        validate(&self.user, &self.lines).map_err(|m| ("invalid_order", m))
    }
}

/// `POST /v1/seckill/{sku}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeckillReq {
    pub user: String,
    #[serde(default = "one")]
    pub qty: u32,
}

fn one() -> u32 {
    1
}

impl SeckillReq {
    /// The order lines this request stands for, checked.
    pub fn lines(&self, sku: &str) -> Result<Vec<OrderLineReq>, Refusal> {
        let lines = vec![OrderLineReq {
            sku: sku.to_string(),
            qty: self.qty,
        }];
        validate(&self.user, &lines).map_err(|m| ("invalid_order", m))?;
        Ok(lines)
    }
}

/// `POST /v1/refunds`: the whole order (all units not refunded yet), or the units `lines` names.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefundReq {
    pub order_id: String,
    /// At most one entry per SKU (an order has one line per SKU; two entries are refused, not summed, as an
    /// order request's are), at most `MAX_LINES` of them: no refund can name more lines than an order holds.
    #[serde(default)]
    pub lines: Option<Vec<OrderLineReq>>,
}

impl RefundReq {
    pub fn check(&self) -> Result<(), Refusal> {
        if !valid_id(&self.order_id) {
            return Err(("bad_id", bad_id("order id", &self.order_id)));
        }
        let Some(lines) = &self.lines else {
            return Ok(());
        };
        if lines.is_empty() || lines.len() > MAX_LINES {
            return Err((
                "invalid_refund",
                format!(
                    "a partial refund names 1..={MAX_LINES} lines, got {} (leave lines out to refund the rest)",
                    lines.len()
                ),
            ));
        }
        validate_lines(lines).map_err(|m| ("invalid_refund", m))
    }
}

/// `POST /admin/credit`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreditReq {
    pub users: Vec<String>,
    pub amount_cents: Cents,
}

impl CreditReq {
    pub fn check(&self) -> Result<(), Refusal> {
        let bad = |m: String| Err(("invalid_credit", m));
        if self.users.is_empty() || self.users.len() > MAX_CREDIT_USERS {
            return bad(format!("users must hold 1..={MAX_CREDIT_USERS} ids"));
        }
        if let Some(u) = self.users.iter().find(|u| !valid_id(u)) {
            return bad(bad_id("user", u));
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = self.users.iter().find(|u| !seen.insert(u.as_str())) {
            return bad(format!("user {dup:?} is listed twice"));
        }
        if !(1..=MAX_CREDIT).contains(&self.amount_cents) {
            return bad(format!(
                "amount_cents {} is not in 1..={MAX_CREDIT}",
                self.amount_cents
            ));
        }
        Ok(())
    }
}

/// Checks a payment provider's callback (`POST /v1/payments/callback`).
pub fn check_callback(cb: &PaymentCallback) -> Result<(), Refusal> {
    let bad = |m: String| Err(("invalid_callback", m));
    if !valid_id(&cb.payment_id) || !valid_id(&cb.order_id) {
        return bad("payment_id and order_id must be 1..=64 bytes of [A-Za-z0-9._:-]".into());
    }
    if cb.status != "succeeded" && cb.status != "failed" {
        return bad(format!("status {:?} is not succeeded or failed", cb.status));
    }
    if !(0..=MAX_ORDER_TOTAL).contains(&cb.amount_cents) {
        return bad(format!("amount_cents {} is out of range", cb.amount_cents));
    }
    Ok(())
}

/// `POST /admin/degrade`: `auto` or a level name.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DegradeReq {
    pub level: String,
}

/// `POST /v1/merchant/stock`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StockReq {
    pub updates: Vec<StockUpdate>,
}

impl StockReq {
    pub fn check(&self) -> Result<(), Refusal> {
        let bad = |m: String| Err(("invalid_update", m));
        if self.updates.is_empty() || self.updates.len() > MAX_UPDATES {
            return bad(format!("updates must hold 1..={MAX_UPDATES} items"));
        }
        for u in &self.updates {
            if !valid_id(&u.sku) {
                return Err(("bad_id", bad_id("sku id", &u.sku)));
            }
            if u.price_cents.is_some_and(|p| !(0..=MAX_PRICE).contains(&p)) {
                return bad(format!("price_cents of {} is out of range", u.sku));
            }
        }
        Ok(())
    }
}

/// `POST /v1/merchant/flash-sales/{sku}`.
#[derive(Debug, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct FlashSaleReq {
    pub buckets: Option<u32>,
}

/// Decodes a JSON body of type `T`; the message is what the handler's `bad_json` error says.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("invalid JSON body: {e}"))
}

/// Decodes `bytes` as every body type in turn and runs each one's checks, as the handlers would; returns how
/// many decoded and passed. For the fuzzer and tests: nothing here may panic, whatever the bytes.
pub fn decode_and_check(bytes: &[u8]) -> usize {
    let mut passed = 0;
    let mut count = |ok: bool| passed += usize::from(ok);
    if let Ok(b) = decode::<CreateOrder>(bytes) {
        let ok = b.check().is_ok();
        if ok {
            let _ = fingerprint(OrderKind::Regular, &b.user, &b.lines);
        }
        count(ok);
    }
    if let Ok(b) = decode::<SeckillReq>(bytes) {
        match b.lines("flash-1") {
            Ok(lines) => {
                let _ = fingerprint(OrderKind::Seckill, &b.user, &lines);
                count(true);
            }
            Err(_) => count(false),
        }
    }
    if let Ok(b) = decode::<RefundReq>(bytes) {
        let ok = b.check().is_ok();
        if ok {
            let _ = crate::domain::refund_fingerprint(&b.order_id, b.lines.as_deref());
        }
        count(ok);
    }
    if let Ok(b) = decode::<CreditReq>(bytes) {
        count(b.check().is_ok());
    }
    if let Ok(b) = decode::<PaymentCallback>(bytes) {
        count(check_callback(&b).is_ok());
    }
    if let Ok(b) = decode::<DegradeReq>(bytes) {
        count(b.level == "auto" || crate::degrade::Level::parse(&b.level).is_some());
    }
    if let Ok(b) = decode::<StockReq>(bytes) {
        count(b.check().is_ok());
    }
    if let Ok(b) = decode::<FlashSaleReq>(bytes) {
        count(b.buckets.is_none_or(|n| (1..=64).contains(&n)));
    }
    passed
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn good_bodies_pass_and_bad_ones_name_the_value() {
        assert_eq!(
            decode_and_check(br#"{"user":"u1","lines":[{"sku":"s1","qty":2}]}"#),
            1
        );
        let c: CreditReq = decode(br#"{"users":["a","a"],"amount_cents":5}"#).unwrap();
        assert!(c.check().unwrap_err().1.contains("\"a\" is listed twice"));
        let s: StockReq = decode(br#"{"updates":[{"sku":"x","price_cents":-1}]}"#).unwrap();
        assert_eq!(s.check().unwrap_err().0, "invalid_update");
        assert!(decode::<DegradeReq>(br#"{"level":"sync","x":1}"#).is_err());
        assert_eq!(decode_and_check(b"\xff\x00{"), 0);
    }

    #[test]
    fn a_refund_names_each_line_once_within_bounds() {
        let ok: RefundReq = decode(br#"{"order_id":"o1","lines":[{"sku":"a","qty":1}]}"#).unwrap();
        assert!(ok.check().is_ok());
        let whole: RefundReq = decode(br#"{"order_id":"o1"}"#).unwrap();
        assert!(whole.check().is_ok() && whole.lines.is_none());
        for (body, says) in [
            (r#"{"order_id":"o1","lines":[]}"#, "1..=50 lines, got 0"),
            (
                r#"{"order_id":"o1","lines":[{"sku":"a","qty":1},{"sku":"a","qty":2}]}"#,
                "sku a appears twice",
            ),
            (
                r#"{"order_id":"o1","lines":[{"sku":"a","qty":0}]}"#,
                "qty 0 for sku a",
            ),
            (r#"{"order_id":"o 1"}"#, "order id"),
        ] {
            let b: RefundReq = decode(body.as_bytes()).unwrap();
            let (_, msg) = b.check().unwrap_err();
            assert!(msg.contains(says), "{body}: {msg}");
        }
        let many: Vec<String> = (0..=MAX_LINES)
            .map(|i| format!(r#"{{"sku":"s{i}","qty":1}}"#))
            .collect();
        let big: RefundReq =
            decode(format!(r#"{{"order_id":"o1","lines":[{}]}}"#, many.join(",")).as_bytes()).unwrap();
        assert_eq!(big.check().unwrap_err().0, "invalid_refund");
        assert!(decode::<RefundReq>(br#"{"order_id":"o1","lines":[{"sku":"a","qty":-1}]}"#).is_err());
    }
}
