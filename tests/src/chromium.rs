//! Debian's headless Chromium, driven from the command line: `--dump-dom` gives the page's DOM
//! after its scripts ran for a virtual-time budget (network fetches pause the virtual clock, so
//! the page's polls complete), `--screenshot` a PNG. One short-lived browser per call, with its
//! own profile directory: nothing to keep alive or clean up between calls.
//!
//! Tests that need it skip, saying so, only when no Chromium is installed
//! (`scripts/check.sh` installs Debian's `chromium`; `KVSET_TEST_CHROMIUM` names another).

use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;

/// The Chromium binary, if one is installed.
pub fn find() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("KVSET_TEST_CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    let paths = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| std::env::split_paths(&paths).map(move |dir| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

/// Longest one browser run may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

async fn run(browser: &Path, args: &[String]) -> Result<String, String> {
    let profile = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut cmd = tokio::process::Command::new(browser);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",
        "--ignore-certificate-errors",
        "--hide-scrollbars",
        "--lang=en-US",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .args(args)
    .stdin(std::process::Stdio::null())
    .kill_on_drop(true);
    let out = tokio::time::timeout(RUN_TIMEOUT, cmd.output())
        .await
        .map_err(|_| format!("chromium did not finish within {RUN_TIMEOUT:?}"))?
        .map_err(|e| format!("cannot run {}: {e}", browser.display()))?;
    if !out.status.success() {
        return Err(format!("chromium failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The DOM of `url` after its scripts ran for `budget` of virtual time.
pub async fn dump_dom(browser: &Path, url: &str, budget: Duration) -> Result<String, String> {
    run(browser, &[format!("--virtual-time-budget={}", budget.as_millis()), "--dump-dom".into(), url.into()])
        .await
}

/// A PNG screenshot of `url` (`width` × `height`) after `budget` of virtual time, into `png`.
pub async fn screenshot(
    browser: &Path,
    url: &str,
    png: &Path,
    (width, height): (u32, u32),
    budget: Duration,
) -> Result<(), String> {
    run(
        browser,
        &[
            format!("--virtual-time-budget={}", budget.as_millis()),
            format!("--window-size={width},{height}"),
            format!("--screenshot={}", png.display()),
            url.into(),
        ],
    )
    .await?;
    match std::fs::metadata(png) {
        Ok(m) if m.len() > 0 => Ok(()),
        _ => Err(format!("chromium wrote no screenshot at {}", png.display())),
    }
}

/// The attributes of every element of the DOM text whose opening tag starts with `prefix`
/// (e.g. `<tr data-member=`), in document order: `name → value`.
pub fn elements(dom: &str, prefix: &str) -> Vec<std::collections::BTreeMap<String, String>> {
    let mut out = Vec::new();
    let mut rest = dom;
    while let Some(at) = rest.find(prefix) {
        let tag = &rest[at..];
        let end = tag.find('>').unwrap_or(tag.len());
        let mut attrs = std::collections::BTreeMap::new();
        let mut text = &tag[..end];
        while let Some(eq) = text.find("=\"") {
            let name = text[..eq].rsplit(|c: char| c.is_whitespace()).next().unwrap_or_default().to_string();
            let value_and_rest = &text[eq + 2..];
            let close = value_and_rest.find('"').unwrap_or(value_and_rest.len());
            attrs.insert(name, value_and_rest[..close].to_string());
            text = value_and_rest.get(close + 1..).unwrap_or_default();
        }
        out.push(attrs);
        rest = &tag[end.min(tag.len())..];
        if rest.is_empty() {
            break;
        }
        rest = &rest[1.min(rest.len())..];
    }
    out
}

/// The text of the element with `id` (its inner HTML up to the next tag).
pub fn text_of<'a>(dom: &'a str, id: &str) -> Option<&'a str> {
    let at = dom.find(&format!("id=\"{id}\""))?;
    let open_end = at + dom[at..].find('>')? + 1;
    let close = dom[open_end..].find('<').map_or(dom.len(), |c| open_end + c);
    Some(&dom[open_end..close])
}
