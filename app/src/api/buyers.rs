//! Whom a buyer call acts for. With `buyer_key_file` set, a buyer call carries a buyer token
//! (`xcluster_proto::buyer`) and acts for its user alone: that user's orders, flash-sale attempts, payments
//! from the wallet, cancels, order list and wallet. Without it, `user` is trusted as sent (a gateway in front
//! sets it). The admin token acts for any buyer (a gateway that authenticates buyers itself, `xcluster
//! load`).

use http::{HeaderValue, Request, Response, StatusCode, header};
use xcluster_runtime::http::{Body, bearer, bearer_ok, error};

use crate::Config;

/// Whom a buyer call may act for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Buyer {
    /// Any user: no key is configured, or the admin token came.
    Any,
    /// The user a buyer token names.
    Only(String),
}

impl Buyer {
    /// Who calls, from `req`'s `Authorization`: the refusal (401) when a token is needed and missing, bad or
    /// expired.
    pub fn of<B>(cfg: &Config, req: &Request<B>) -> Result<Buyer, Response<Body>> {
        let Some(key) = &cfg.buyer_key else {
            return Ok(Buyer::Any);
        };
        if bearer_ok(req, &cfg.admin_token) {
            return Ok(Buyer::Any);
        }
        let Some(token) = bearer(req) else {
            return Err(unauthorized(
                "a buyer call needs a buyer token: Authorization: Bearer xb1.<user>.<expires>.<mac>",
            ));
        };
        let limits = xcluster_proto::buyer::Limits {
            now_unix: u64::try_from(crate::domain::now_ms() / 1000).unwrap_or(0),
            max_life_secs: cfg.buyer_token_max_life_secs,
        };
        match xcluster_proto::buyer::verify_with_any(key.each(), token, limits) {
            Ok(user) => Ok(Buyer::Only(user)),
            Err(e) => Err(unauthorized(&e.to_string())),
        }
    }

    /// Whether a call may act for `user`.
    pub fn may_act_for(&self, user: &str) -> bool {
        match self {
            Buyer::Any => true,
            Buyer::Only(own) => own == user,
        }
    }

    /// `Ok` when a call may act for `user`, the refusal (403) when not.
    pub fn check(&self, user: &str) -> Result<(), Response<Body>> {
        match self {
            Buyer::Only(own) if own != user => Err(error(
                StatusCode::FORBIDDEN,
                "not_your_user",
                &format!("the buyer token is {own}'s, and this call acts for another user"),
            )),
            _ => Ok(()),
        }
    }
}

/// A 401 saying why, with the challenge RFC 6750 asks for; answered in microseconds, it is kept out of the
/// service time the balancers weigh by (a crowd of stale tokens made an instance look fast).
fn unauthorized(why: &str) -> Response<Body> {
    let mut resp = error(StatusCode::UNAUTHORIZED, "unauthorized", why);
    let challenge = HeaderValue::from_static("Bearer realm=\"xbuy\"");
    resp.headers_mut().insert(header::WWW_AUTHENTICATE, challenge);
    resp.extensions_mut().insert(crate::stats::BeforeWork);
    resp
}
