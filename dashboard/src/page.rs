//! The page and its scripts, embedded in the binary.

use axum::http::header;
use axum::response::IntoResponse;

const CHART_JS: &[u8] = include_bytes!(env!("CHART_JS"));

fn asset(kind: &'static str, body: &'static [u8]) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, kind), (header::CACHE_CONTROL, "no-cache")], body)
}

pub(crate) async fn index() -> impl IntoResponse {
    asset("text/html; charset=utf-8", include_bytes!("../web/index.html"))
}

pub(crate) async fn app_js() -> impl IntoResponse {
    asset("text/javascript; charset=utf-8", include_bytes!("../web/app.js"))
}

pub(crate) async fn style() -> impl IntoResponse {
    asset("text/css; charset=utf-8", include_bytes!("../web/style.css"))
}

pub(crate) async fn chart_js() -> impl IntoResponse {
    asset("text/javascript; charset=utf-8", CHART_JS)
}
