//! A target driven through etcd's JSON gateway (`POST /v3/kv/put`, `/v3/kv/range`) with one
//! HTTP/1.1 client (hyper's pooled client, keep-alive), the same code for etcd and kvset: the
//! gateway column of `bench compare`.
//!
//! Only the put and get workloads: the others (transactions, watches, keep-alive streams) are
//! refused with `unsupported-over-gateway`.

use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// etcd's JSON gateway of one server.
#[derive(Clone)]
pub struct Gateway {
    client: Client<HttpConnector, Full<Bytes>>,
    /// `http://host:port`.
    base: String,
    /// The name in reports.
    pub name: &'static str,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gateway({}, {})", self.name, self.base)
    }
}

/// Standard base64 with padding (what the gateway reads for bytes fields).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    out
}

impl Gateway {
    /// The gateway at `endpoint` (`host:port`), named `name` in reports.
    pub fn new(endpoint: &str, name: &'static str) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(1024).build(connector);
        Self { client, base: format!("http://{endpoint}"), name }
    }

    /// POSTs `body` to `path`; an answer other than 200 is an error named by its status.
    async fn post(&self, path: &str, body: String) -> Result<Bytes, String> {
        let req = http::Request::post(format!("{}{path}", self.base))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let resp = self.client.request(req).await.map_err(|_| "gateway-transport".to_string())?;
        let status = resp.status();
        let body = resp.into_body().collect().await.map_err(|_| "gateway-transport".to_string())?.to_bytes();
        if status != http::StatusCode::OK {
            return Err(format!("gateway-http-{}", status.as_u16()));
        }
        Ok(body)
    }

    /// Puts `key` = `value`.
    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<(), String> {
        let body = format!(r#"{{"key":"{}","value":"{}"}}"#, base64(key), base64(value));
        self.post("/v3/kv/put", body).await.map(|_| ())
    }

    /// Gets `key`, linearizably unless `serializable`.
    pub async fn get(&self, key: &[u8], serializable: bool) -> Result<(), String> {
        let body = format!(r#"{{"key":"{}","serializable":{serializable}}}"#, base64(key));
        self.post("/v3/kv/range", body).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_is_standard_with_padding() {
        assert_eq!(super::base64(b"foo"), "Zm9v");
        assert_eq!(super::base64(b"fo"), "Zm8=");
        assert_eq!(super::base64(b"f"), "Zg==");
        assert_eq!(super::base64(&[0xfb, 0xff]), "+/8=");
    }
}
