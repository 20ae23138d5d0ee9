//! The dashboard: one self-contained HTML page (inline CSS and JS, no framework, nothing fetched from elsewhere)
//! that reads `/v1/status`, `/v1/cluster` and the `/v1/events` stream, with start/stop/restart buttons that send
//! the token a person typed in.

use http::{HeaderValue, Response, StatusCode, header};
use xcluster_runtime::http::{Body, with_type};

const PAGE: &str = include_str!("dashboard.html");

/// The page with the current status, cluster view and recent events embedded, so it renders complete at once.
/// The page may not be framed: it fills the token box from the browser's storage, so another site that
/// framed it (the monitor's address is a guessable loopback one) could trick a click on its stop or drain
/// buttons into an authorized call. Its policy lets run only the page's own script and style, which carry
/// a nonce fresh for each answer: the page renders strings from elsewhere (instance ids from agents'
/// reports, program output in events) through `innerHTML`, escaped, and were one ever missed, markup it
/// made could neither run a script nor send the token anywhere (`connect-src 'self'`).
pub(crate) fn page(initial: &serde_json::Value) -> Response<Body> {
    let nonce: String = (rand::random::<[u8; 16]>().iter())
        .map(|b| format!("{b:02x}"))
        .collect();
    // The nonce first: the data put in after may hold any text, the placeholder's too.
    let html = PAGE
        .replace("NONCE", &nonce)
        .replace("/*INITIAL*/", &script_safe_json(initial));
    let mut resp = with_type(StatusCode::OK, "text/html; charset=utf-8", html);
    let policy = format!(
        "default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; \
         img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    );
    let headers = resp.headers_mut();
    // Hex digits only: always a valid header value.
    if let Ok(v) = HeaderValue::from_str(&policy) {
        headers.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    // For browsers that predate CSP's frame-ancestors.
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    resp
}

/// `value` as JSON that is inert inside a `<script>` element. The data holds strings from elsewhere (instance
/// ids from agents' reports, balancers' status): escaping only `</` left `<!--<script>` able to switch the
/// HTML tokenizer into the script's "double-escaped" state, which swallows the page's own script. Every `<`,
/// `>` and `&` becomes a `\uXXXX` escape, so no markup can form, and U+2028/U+2029 too (line terminators to
/// older JavaScript parsers). Each escape only ever lands inside a JSON string (outside strings JSON has none
/// of these characters), so the text stays valid JSON with the same value.
fn script_safe_json(value: &serde_json::Value) -> String {
    let json = value.to_string();
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use http_body_util::BodyExt;
    use serde_json::json;

    /// An instance id that opens an HTML comment and a script used to put the tokenizer in the script's
    /// double-escaped state, so the page's own script never ran. The embedded data must hold no markup at
    /// all, and still parse back to the same value.
    #[tokio::test]
    async fn embedded_state_is_inert_html_and_the_same_json() {
        let hostile = "<!--<script></script>&amp;\u{2028}\u{2029}-->";
        let initial =
            json!({ "cluster": { "balancers": [{ "status": { "instances": [{ "id": hostile }] } }] } });
        let resp = super::page(&initial);
        let html = resp.into_body().collect().await.unwrap().to_bytes();
        let html = String::from_utf8(html.to_vec()).unwrap();
        let start = html
            .find(r#"<script id="initial" type="application/json">"#)
            .unwrap();
        let data_start = html[start..].find('>').unwrap() + start + 1;
        let data_end = html[data_start..].find("</script>").unwrap() + data_start;
        let data = &html[data_start..data_end];
        for bad in ['<', '>', '&', '\u{2028}', '\u{2029}'] {
            assert!(!data.contains(bad), "{bad:?} in {data}");
        }
        let back: serde_json::Value = serde_json::from_str(data).unwrap();
        assert_eq!(back, initial);
        // The page's main script follows, untouched.
        assert!(
            html[data_end..].contains("JSON.parse("),
            "the page's script is after the data"
        );
    }

    /// A security walk framed the dashboard from another origin: nothing stopped it, and the framed page
    /// filled its token box from storage, ready for a click tricked onto its stop buttons.
    #[test]
    fn the_page_refuses_to_be_framed() {
        let resp = super::page(&json!({}));
        let h = resp.headers();
        let csp = h["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        assert_eq!(h["x-frame-options"], "DENY");
    }

    /// Only the page's own script and style run: each carries the nonce the policy names, which is new for
    /// every answer, and the policy allows no other source of script, style or connection.
    #[tokio::test]
    async fn only_the_pages_own_script_and_style_run() {
        let nonces: Vec<String> = futures_util::future::join_all((0..2).map(|_| async {
            let resp = super::page(&json!({}));
            let csp = resp.headers()["content-security-policy"]
                .to_str()
                .unwrap()
                .to_string();
            let html = resp.into_body().collect().await.unwrap().to_bytes();
            let html = String::from_utf8(html.to_vec()).unwrap();
            let nonce = csp
                .split("script-src 'nonce-")
                .nth(1)
                .and_then(|r| r.split('\'').next())
                .unwrap()
                .to_string();
            assert!(csp.starts_with("default-src 'none';"), "{csp}");
            assert!(csp.contains(&format!("style-src 'nonce-{nonce}'")), "{csp}");
            assert!(csp.contains("connect-src 'self'"), "{csp}");
            assert!(!csp.contains("unsafe"), "{csp}");
            // Every executable script and every style element carries it; the JSON data needs none.
            let tags = |open: &str| html.matches(open).count();
            assert_eq!(
                tags("<script"),
                2,
                "the page's scripts changed; check their nonces"
            );
            assert_eq!(html.matches(&format!("<script nonce=\"{nonce}\">")).count(), 1);
            assert_eq!(tags("<style"), 1);
            assert_eq!(html.matches(&format!("<style nonce=\"{nonce}\">")).count(), 1);
            assert!(!html.contains("NONCE"), "a placeholder left in the page");
            nonce
        }))
        .await;
        assert_eq!(nonces[0].len(), 32);
        assert_ne!(nonces[0], nonces[1], "the nonce is the same in two answers");
    }
}
