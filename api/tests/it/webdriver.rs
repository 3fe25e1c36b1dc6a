//! A small W3C WebDriver client (over reqwest, already a dev-dependency) driving Debian's
//! headless Chromium through `chromedriver`, started here on a free port and stopped on drop.
//! It covers what the console test needs: navigate, find, type, click, run JavaScript (sync
//! and async), screenshots. (fantoccini would do the same with a second HTTP stack to build.)
//!
//! `CHROMEDRIVER` / `CHROMIUM` name the binaries (default `/usr/bin/chromedriver`,
//! `/usr/bin/chromium`, Debian's `chromium-driver` and `chromium`, which scripts/test installs).
//! Without them the test fails, saying how to install them; `SB_SKIP_BROWSER=1` (local use
//! only) skips it instead.

use std::time::Duration;

use serde_json::{Value, json};

const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Browser {
    http: reqwest::Client,
    base: String,
    session: String,
    driver: tokio::process::Child,
    _profile: tempdir::Dir,
}

/// A page element (its WebDriver reference).
#[derive(Clone, Debug)]
pub struct Element(String);

mod tempdir {
    /// A directory removed on drop (Chromium's profile).
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Browser {
    /// Start chromedriver and a headless Chromium session; `None` only when `SB_SKIP_BROWSER=1`
    /// and the binaries are missing.
    #[allow(clippy::print_stderr)]
    pub async fn start() -> Option<Self> {
        let driver_bin =
            std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".into());
        let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let missing = [&driver_bin, &chromium]
            .into_iter()
            .filter(|p| !std::path::Path::new(p).exists())
            .cloned()
            .collect::<Vec<_>>();
        if !missing.is_empty() {
            if std::env::var("SB_SKIP_BROWSER").as_deref() == Ok("1") {
                // said where the test output shows it: a skip must not look like a pass
                eprintln!("SB_SKIP_BROWSER=1: skipping the browser test ({missing:?} missing)");
                return None;
            }
            panic!(
                "the browser test needs Chromium and ChromeDriver ({missing:?} missing): \
                 scripts/test installs them (apt-get install chromium chromium-driver); \
                 SB_SKIP_BROWSER=1 skips this test for local runs only"
            );
        }
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let driver = tokio::process::Command::new(&driver_bin)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {driver_bin}: {e}"));
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let ready = http
                .get(format!("{base}/status"))
                .send()
                .await
                .ok()
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            if ready {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "chromedriver did not start on port {port}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = std::env::temp_dir().join(format!("sb-chromium-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&profile).unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1280,900", "--no-first-run", "--disable-extensions",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        }}});
        let r: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = r["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {r}"))
            .to_owned();
        Some(Self {
            http,
            base,
            session,
            driver,
            _profile: tempdir::Dir(profile),
        })
    }

    async fn cmd(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let mut rb = self.http.request(method, &url);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().await.unwrap();
        let status = r.status();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        assert!(status.is_success(), "WebDriver {path}: {status} {v}");
        v["value"].clone()
    }

    pub async fn goto(&self, url: &str) {
        self.cmd(reqwest::Method::POST, "/url", Some(json!({"url": url})))
            .await;
    }

    /// The first element matching `css`, waiting up to 10 s for it to exist.
    pub async fn find(&self, css: &str) -> Element {
        self.wait(&format!("document.querySelector({css:?}) !== null"), css)
            .await;
        let v = self
            .cmd(
                reqwest::Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        Element(
            v[ELEMENT_KEY]
                .as_str()
                .unwrap_or_else(|| panic!("{css}: no element in {v}"))
                .to_owned(),
        )
    }

    pub async fn click(&self, css: &str) {
        let e = self.find(css).await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{}/click", e.0),
            Some(json!({})),
        )
        .await;
    }

    /// Clear the field `css` and type `text` into it (as keystrokes).
    pub async fn fill(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{}/clear", e.0),
            Some(json!({})),
        )
        .await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{}/value", e.0),
            Some(json!({"text": text})),
        )
        .await;
    }

    /// Run `script` (a function body; `arguments` are `args`) in the page and return its value.
    pub async fn js(&self, script: &str, args: Value) -> Value {
        self.cmd(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
        .await
    }

    /// Run `script` asynchronously: it calls `arguments[arguments.length - 1](value)` when done.
    pub async fn js_async(&self, script: &str, args: Value) -> Value {
        self.cmd(
            reqwest::Method::POST,
            "/execute/async",
            Some(json!({"script": script, "args": args})),
        )
        .await
    }

    /// Wait (10 s at most) until the JavaScript expression `expr` is truthy; `what` names it in
    /// the failure, with the page's visible text.
    pub async fn wait(&self, expr: &str, what: &str) {
        self.wait_for(expr, what, Duration::from_secs(10)).await;
    }

    pub async fn wait_for(&self, expr: &str, what: &str, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        let script = format!("return !!({expr});");
        loop {
            if self.js(&script, json!([])).await == json!(true) {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                let page = self
                    .js(
                        "return document.body ? document.body.innerText : ''",
                        json!([]),
                    )
                    .await;
                panic!("timed out waiting for {what} ({expr}); the page shows:\n{page}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The text of the first element matching `css` (its `textContent`).
    pub async fn text(&self, css: &str) -> String {
        self.js(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;",
            json!([css]),
        )
        .await
        .as_str()
        .unwrap_or_else(|| panic!("no element {css}"))
        .to_owned()
    }

    pub async fn screenshot_png(&self) -> Vec<u8> {
        use base64::Engine as _;
        let v = self.cmd(reqwest::Method::GET, "/screenshot", None).await;
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .unwrap()
    }
}

impl Drop for Browser {
    /// End the session (Chromium exits with it), also when a test fails midway, then stop
    /// chromedriver (`kill_on_drop`). Plain blocking HTTP: there is no async drop.
    fn drop(&mut self) {
        use std::io::{Read, Write};
        let addr = self.base.trim_start_matches("http://");
        if let Ok(mut s) = std::net::TcpStream::connect(addr) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let req = format!(
                "DELETE /session/{} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                self.session
            );
            if s.write_all(req.as_bytes()).is_ok() {
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink);
            }
        }
        let _ = self.driver.start_kill();
    }
}
