//! Browsing: products with their SKUs, price and stock (`browse` type).

use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use xcluster_runtime::http::{Body, error, json, query_pairs};

use super::{App, store_failed};

/// `GET /v1/products?after=ID&limit=N` (limit 1..=100, default 20).
pub async fn list(app: &Arc<App>, req: &Request<Incoming>) -> Response<Body> {
    let pairs = match query_pairs(req.uri().query()) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_query", &e),
    };
    let (mut after, mut limit) = (0i64, 20u32);
    for (k, v) in pairs {
        match k.as_str() {
            "after" => match v.parse::<i64>() {
                Ok(n) if n >= 0 => after = n,
                _ => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "bad_query",
                        &format!("after={v:?} is not a non-negative integer"),
                    );
                }
            },
            "limit" => match v.parse::<u32>() {
                Ok(n) if (1..=100).contains(&n) => limit = n,
                _ => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "bad_query",
                        &format!("limit={v:?} is not in 1..=100"),
                    );
                }
            },
            other => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_query",
                    &format!("unknown query parameter {other:?}"),
                );
            }
        }
    }
    match app.exec.read(move |s| s.list_products(after, limit)).await {
        Ok(products) => {
            let next = products
                .last()
                .map(|p| p.id)
                .filter(|_| products.len() == limit as usize);
            json(
                StatusCode::OK,
                &serde_json::json!({ "products": products, "next_after": next }),
            )
        }
        Err(e) => store_failed(&e),
    }
}

/// `GET /v1/products/{id}`.
pub async fn product(app: &Arc<App>, id: &str) -> Response<Body> {
    let Ok(id) = id.parse::<i64>() else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_id",
            &format!("product id {id:?} is not an integer"),
        );
    };
    match app.exec.read(move |s| s.get_product(id)).await {
        Ok(Some(p)) => json(StatusCode::OK, &p),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no such product: {id}"),
        ),
        Err(e) => store_failed(&e),
    }
}
