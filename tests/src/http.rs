//! A small HTTP/1.1 client over a plain socket, for etcd's JSON gateway: unary calls (whole
//! answer, chunked or not, with trailers) and streams (each HTTP chunk as it arrives, so a
//! test can check that one JSON line is one chunk, as clients such as python etcd3gw need).
//! Also `curl`, the client the README shows.

use std::time::Duration;
use std::time::Instant;

use tokio::io::AsyncBufReadExt;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;
use tokio::io::BufReader;
use tokio::net::TcpStream;

/// An HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    /// Header names lowercased, in the order sent.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Trailers of a chunked answer.
    pub trailers: Vec<(String, String)>,
}

impl Answer {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON (`Null` if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// One request's text: `method path`, `headers`, and `body` with its length.
fn request_text(endpoint: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut text =
        format!("{method} {path} HTTP/1.1\r\nHost: {endpoint}\r\nContent-Length: {}\r\n", body.len());
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    text.push_str("\r\n");
    let mut bytes = text.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// An open connection with an answer being read.
#[derive(Debug)]
pub struct Stream {
    reader: BufReader<TcpStream>,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    chunked: bool,
    /// Bytes left of a Content-Length body.
    left: usize,
    done: bool,
    pub trailers: Vec<(String, String)>,
}

async fn line(reader: &mut BufReader<TcpStream>) -> std::io::Result<String> {
    let mut line = String::new();
    if reader.read_line(&mut line).await? == 0 {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed"));
    }
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

async fn header_lines(reader: &mut BufReader<TcpStream>) -> std::io::Result<Vec<(String, String)>> {
    let mut headers = Vec::new();
    loop {
        let l = line(reader).await?;
        if l.is_empty() {
            return Ok(headers);
        }
        if let Some((name, value)) = l.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
    }
}

impl Stream {
    /// Sends a request and reads the answer's head (skipping `100 Continue`).
    pub async fn open(
        endpoint: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Self> {
        let socket = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(endpoint))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
        socket.set_nodelay(true)?;
        let mut reader = BufReader::new(socket);
        reader.get_mut().write_all(&request_text(endpoint, method, path, headers, body)).await?;
        loop {
            let status_line = line(&mut reader).await?;
            let status: u16 = status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
            let headers = header_lines(&mut reader).await?;
            if status == 100 {
                continue;
            }
            let find = |n: &str| headers.iter().find(|(h, _)| h == n).map(|(_, v)| v.clone());
            let chunked = find("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked"));
            let left = find("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
            let done = method == "HEAD" || (!chunked && left == 0);
            return Ok(Self { reader, status, headers, chunked, left, done, trailers: Vec::new() });
        }
    }

    /// The next piece of the body: one chunk of a chunked answer (the rest of a sized one);
    /// `None` at its end.
    pub async fn chunk(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        if self.done {
            return Ok(None);
        }
        if !self.chunked {
            let mut body = vec![0; self.left];
            self.reader.read_exact(&mut body).await?;
            self.done = true;
            return Ok(Some(body));
        }
        let size_line = line(&mut self.reader).await?;
        let size =
            usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16).map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("chunk size {size_line:?}: {e}"))
            })?;
        if size == 0 {
            self.trailers = header_lines(&mut self.reader).await?;
            self.done = true;
            return Ok(None);
        }
        let mut chunk = vec![0; size + 2];
        self.reader.read_exact(&mut chunk).await?;
        chunk.truncate(size);
        Ok(Some(chunk))
    }

    /// The next chunk within `timeout`; `Ok(None)` at the end, `Err` on timeout too.
    pub async fn chunk_within(&mut self, timeout: Duration) -> std::io::Result<Option<Vec<u8>>> {
        tokio::time::timeout(timeout, self.chunk())
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no chunk in time"))?
    }

    /// Reads the whole rest of the body.
    pub async fn finish(mut self) -> std::io::Result<Answer> {
        let mut body = Vec::new();
        while let Some(chunk) = self.chunk().await? {
            body.extend_from_slice(&chunk);
        }
        Ok(Answer { status: self.status, headers: self.headers, body, trailers: self.trailers })
    }

    /// The JSON lines of a stream's answer, `n` of them, each within `timeout`; each chunk must
    /// hold exactly one line (as etcd sends them).
    pub async fn lines(&mut self, n: usize, timeout: Duration) -> Result<Vec<serde_json::Value>, String> {
        let mut out = Vec::new();
        let deadline = Instant::now() + timeout;
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.chunk_within(left).await {
                Ok(Some(chunk)) => {
                    let text = String::from_utf8_lossy(&chunk).into_owned();
                    let Some(json) = text.strip_suffix('\n').filter(|t| !t.contains('\n')) else {
                        return Err(format!("a chunk that is not one line: {text:?}"));
                    };
                    out.push(serde_json::from_str(json).map_err(|e| format!("{e}: {json}"))?);
                }
                Ok(None) => {
                    return Err(format!("the stream ended after {} of {n} lines: {out:?}", out.len()))
                }
                Err(e) => return Err(format!("{e} after {} of {n} lines: {out:?}", out.len())),
            }
        }
        Ok(out)
    }
}

/// Sends one request and reads the whole answer.
pub async fn call(endpoint: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Answer {
    let stream = Stream::open(endpoint, method, path, headers, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {path} on {endpoint}: {e}"));
    tokio::time::timeout(Duration::from_secs(30), stream.finish())
        .await
        .unwrap_or_else(|_| panic!("{method} {path} on {endpoint}: no whole answer in 30 s"))
        .unwrap_or_else(|e| panic!("{method} {path} on {endpoint}: {e}"))
}

/// `POST path` with a JSON body.
pub async fn post(endpoint: &str, path: &str, body: &str) -> Answer {
    call(endpoint, "POST", path, &[], body.as_bytes()).await
}

/// `curl` (Debian's `curl`).
pub fn curl_path() -> std::path::PathBuf {
    crate::etcd::tool("curl", "KVSET_TEST_CURL", "curl")
}

/// Runs `curl -sS -D <headers> -o <body> ARGS`; returns the answer (interim 1xx heads dropped)
/// and curl's exit code.
pub fn curl(args: &[&str]) -> (Answer, i32) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (head, body) = (dir.path().join("head"), dir.path().join("body"));
    let out = std::process::Command::new(curl_path())
        .arg("-sS")
        .arg("-D")
        .arg(&head)
        .arg("-o")
        .arg(&body)
        .args(args)
        .output()
        .expect("run curl");
    let head = std::fs::read_to_string(&head).unwrap_or_default();
    let blocks: Vec<&str> = head.split("\r\n\r\n").collect();
    // The last block with a status line is the final head; anything after it is trailers.
    let at = blocks.iter().rposition(|b| b.starts_with("HTTP/")).unwrap_or(0);
    let mut lines = blocks.get(at).copied().unwrap_or("").lines();
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok()).unwrap_or(0);
    let pairs = |lines: &mut dyn Iterator<Item = &str>| {
        lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect::<Vec<_>>()
    };
    let headers = pairs(&mut lines);
    let trailers = blocks.get(at + 1).map(|t| pairs(&mut t.lines())).unwrap_or_default();
    let body = std::fs::read(&body).unwrap_or_default();
    (Answer { status, headers, body, trailers }, out.status.code().unwrap_or(-1))
}
