//! Test harness: starts the real `ingestion` binary on a free loopback port with its own folders,
//! users and keys, and drives it with real clients (OpenSSH sftp/scp, curl).
//!
//! Peers that are not installed make a test print why it is skipped, except under CI=true, where a
//! missing peer fails the test.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Whether a peer program exists; under CI a missing one fails the test, elsewhere it is skipped.
pub fn require(program: &str, test: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()));
    peer_found(found, &format!("`{program}` is not installed"), test)
}

/// Whether a Python module imports (for moto, boto3 and the like).
pub fn require_python(module: &str, test: &str) -> bool {
    let found = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    peer_found(
        found,
        &format!("the Python module `{module}` is not installed"),
        test,
    )
}

fn peer_found(found: bool, missing: &str, test: &str) -> bool {
    if !found {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{test}: {missing}, and CI=true requires every peer");
        }
        // Written straight to the stderr handle so that the test harness does not capture it.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: {missing} (./scripts/test installs every peer)"
        );
    }
    found
}

/// The PostgreSQL server of this test run (`scripts/test` starts one), for tests that need it.
pub fn require_postgres(test: &str) -> Option<String> {
    let url = std::env::var("INGESTION_TEST_POSTGRES").ok();
    peer_found(
        url.is_some(),
        "no PostgreSQL server (INGESTION_TEST_POSTGRES is not set)",
        test,
    )
    .then_some(url)
    .flatten()
}

/// Creates a database with a random name on the PostgreSQL server at `url`; returns its URL.
pub fn fresh_postgres_database(url: &str) -> String {
    use sqlx::{Connection, Executor};
    let name = format!(
        "test_{}",
        ingestion::storage::hex(&rand::random::<[u8; 8]>())
    );
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut connection = sqlx::postgres::PgConnection::connect(url).await.unwrap();
        connection
            .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await
            .unwrap();
    });
    let mut fresh = url::Url::parse(url).unwrap();
    fresh.set_path(&name);
    fresh.to_string()
}

/// The state database for a new test server: SQLite in its folder, or a fresh PostgreSQL database
/// when the run asks for one (`INGESTION_TEST_STATE=postgres`, `scripts/test`'s second pass).
fn test_database(dir: &Path) -> ingestion::config::Database {
    if std::env::var("INGESTION_TEST_STATE").is_ok_and(|v| v == "postgres") {
        let server = require_postgres("INGESTION_TEST_STATE=postgres")
            .expect("INGESTION_TEST_STATE=postgres needs INGESTION_TEST_POSTGRES");
        ingestion::config::Database::Postgres {
            url: fresh_postgres_database(&server),
        }
    } else {
        ingestion::config::Database::Sqlite {
            path: dir.join("state/ingestion.db"),
        }
    }
}

/// Whether something listens on the loopback `port`. A connection to a port nothing listens on can
/// connect to itself (TCP simultaneous open, when the kernel picks that port as the source): such a
/// socket, whose two ends are the same address, is not a listener.
pub fn listening(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port))
        .is_ok_and(|stream| stream.local_addr().ok() != stream.peer_addr().ok())
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn sha256_file(path: &Path) -> String {
    use std::io::Read;
    let mut file = std::fs::File::open(path).unwrap();
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; 1 << 20];
    loop {
        let read = file.read(&mut buffer).unwrap();
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    ingestion::storage::hex(&hasher.finalize())
}

/// Writes `size` pseudo-random bytes (deterministic per seed) to `path`.
pub fn random_file(path: &Path, size: u64, seed: u64) {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut remaining = size;
    let mut block = vec![0u8; 1 << 16];
    while remaining > 0 {
        for chunk in block.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let bytes = state.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        let n = remaining.min(block.len() as u64) as usize;
        file.write_all(&block[..n]).unwrap();
        remaining -= n as u64;
    }
    file.flush().unwrap();
}

/// A client key pair made by ssh-keygen.
pub struct Key {
    pub private: PathBuf,
    pub public_line: String,
}

pub fn keygen(dir: &Path, name: &str, kind: &[&str]) -> Key {
    let private = dir.join(name);
    let status = Command::new("ssh-keygen")
        .args(kind)
        .args(["-q", "-N", "", "-C", name, "-f"])
        .arg(&private)
        .status()
        .unwrap();
    assert!(status.success());
    let public_line = std::fs::read_to_string(private.with_extension("pub"))
        .or_else(|_| std::fs::read_to_string(format!("{}.pub", private.display())))
        .unwrap()
        .trim()
        .to_string();
    Key {
        private,
        public_line,
    }
}

/// How a test user is set up.
pub struct UserSpec<'a> {
    pub name: &'a str,
    pub keys: Vec<&'a Key>,
    pub allowed_ips: Vec<&'a str>,
    pub egress: Option<String>,
    /// Defaults to `buckets/delivered/<name>` beside the config.
    pub destination: Option<String>,
    pub destination_kms_key: Option<String>,
    /// More top-level lines for the user file (notify targets, …).
    pub extra: String,
}

impl<'a> UserSpec<'a> {
    pub fn new(name: &'a str, key: &'a Key) -> UserSpec<'a> {
        UserSpec {
            name,
            keys: vec![key],
            allowed_ips: vec!["127.0.0.1/32"],
            egress: None,
            destination: None,
            destination_kms_key: None,
            extra: String::new(),
        }
    }
}

/// Config sections for servers that test the front door alone: a clamd address where nothing
/// listens, so every upload stays in landing.
pub const NO_SCANNER: &str = "[scanner]\nengine = \"clamd\"\nclamd = \"tcp://127.0.0.1:9\"\n";

/// Where the landing bucket is.
#[derive(Clone)]
pub enum Landing {
    Local,
    S3 { endpoint: String, bucket: String },
}

/// A running server with its folders.
pub struct Server {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub child: Child,
    pub landing: Landing,
    pub database: ingestion::config::Database,
}

impl Server {
    /// A front-door server: uploads are never scanned, so they stay in landing.
    pub fn start(users: &[UserSpec], extra_server: &str, landing: Landing) -> Server {
        Server::launch(users, extra_server, NO_SCANNER, landing, &[])
    }

    /// A server with `sections` (scanner, pipeline, …) appended to its config and `env` set.
    pub fn launch(
        users: &[UserSpec],
        extra_server: &str,
        sections: &str,
        landing: Landing,
        env: &[(&str, &str)],
    ) -> Server {
        Server::launch_with(users, extra_server, sections, landing, env, None)
    }

    /// [`Server::launch`] with its state in `database` (default: see `test_database`).
    pub fn launch_with(
        users: &[UserSpec],
        extra_server: &str,
        sections: &str,
        landing: Landing,
        env: &[(&str, &str)],
        database: Option<ingestion::config::Database>,
    ) -> Server {
        let mut server = Server::spawn_with(users, extra_server, sections, landing, env, database);
        server.wait_ready();
        server
    }

    /// [`Server::launch_with`] without waiting for the server to listen (see [`Server::wait_ready`]).
    pub fn spawn_with(
        users: &[UserSpec],
        extra_server: &str,
        sections: &str,
        landing: Landing,
        env: &[(&str, &str)],
        database: Option<ingestion::config::Database>,
    ) -> Server {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("users")).unwrap();
        let port = free_port();
        let database = database.unwrap_or_else(|| test_database(dir.path()));
        let state_section = match &database {
            ingestion::config::Database::Postgres { url } => {
                format!("[state]\ndatabase = \"{url}\"\n")
            }
            ingestion::config::Database::Sqlite { .. } => String::new(),
        };
        let (landing_url, quarantine_url) = match &landing {
            Landing::Local => (
                "buckets/landing".to_string(),
                "buckets/quarantine".to_string(),
            ),
            Landing::S3 { bucket, .. } => (
                format!("s3://{bucket}/landing-prefix"),
                format!("s3://{bucket}-quarantine"),
            ),
        };
        // Many servers run at once: each admin plane takes a free port unless a test chooses.
        let admin_section = if sections.contains("[admin]") {
            ""
        } else {
            "[admin]\nlisten = \"127.0.0.1:0\"\n"
        };
        std::fs::write(
            dir.path().join("ingestion.toml"),
            format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\n{extra_server}\n[buckets]\nlanding = \"{landing_url}\"\n\
                 quarantine = \"{quarantine_url}\"\n[users]\ndir = \"users\"\n{state_section}{admin_section}{sections}"
            ),
        )
        .unwrap();
        for user in users {
            let keys: Vec<String> = user
                .keys
                .iter()
                .map(|k| format!("\"{}\"", k.public_line))
                .collect();
            let ips: Vec<String> = user
                .allowed_ips
                .iter()
                .map(|ip| format!("\"{ip}\""))
                .collect();
            let egress = user
                .egress
                .as_ref()
                .map(|location| format!("[egress]\nlocation = \"{location}\"\n"))
                .unwrap_or_default();
            let destination = user
                .destination
                .clone()
                .unwrap_or_else(|| format!("buckets/delivered/{}", user.name));
            let kms = user
                .destination_kms_key
                .as_ref()
                .map(|key| format!("destination_kms_key = \"{key}\"\n"))
                .unwrap_or_default();
            std::fs::write(
                dir.path().join(format!("users/{}.toml", user.name)),
                format!(
                    "username = \"{}\"\nname = \"Test Supplier\"\nemail = \"test.supplier@example.org\"\n\
                     ssh_keys = [{}]\nallowed_ips = [{}]\ndestination = \"{destination}\"\n{kms}{}\n{egress}",
                    user.name,
                    keys.join(", "),
                    ips.join(", "),
                    user.extra,
                ),
            )
            .unwrap();
        }
        let child = spawn_server(dir.path(), &landing, env);
        Server {
            dir,
            port,
            child,
            landing,
            database,
        }
    }

    /// The admin plane's base URL (`http://127.0.0.1:port`), from the last start's audit event.
    pub fn admin_url(&self) -> String {
        let started = self.events("service_started");
        let address = started
            .last()
            .and_then(|event| event["admin"].as_str())
            .expect("the admin plane is listening");
        format!("http://{address}")
    }

    /// Kills the server with SIGKILL (no chance to clean up) and waits for it to be gone.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Another node of the same service: its own folder, port and audit log, the same users, host
    /// key, state database and buckets (so the database must be PostgreSQL and the buckets S3).
    pub fn second_node(&self, env: &[(&str, &str)]) -> Server {
        let mut node = self.spawn_second_node(env);
        node.wait_ready();
        node
    }

    /// [`Server::second_node`] without waiting for it to listen (see [`Server::wait_ready`]).
    pub fn spawn_second_node(&self, env: &[(&str, &str)]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("users")).unwrap();
        for entry in std::fs::read_dir(self.dir.path().join("users")).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(
                entry.path(),
                dir.path().join("users").join(entry.file_name()),
            )
            .unwrap();
        }
        let port = free_port();
        let config = std::fs::read_to_string(self.dir.path().join("ingestion.toml"))
            .unwrap()
            .replace(
                &format!("listen = \"127.0.0.1:{}\"", self.port),
                &format!(
                    "listen = \"127.0.0.1:{port}\"\nhost_key_dir = \"{}\"",
                    self.dir.path().join("state/host_keys").display()
                ),
            );
        std::fs::write(dir.path().join("ingestion.toml"), config).unwrap();
        let child = spawn_server(dir.path(), &self.landing, env);
        Server {
            dir,
            port,
            child,
            landing: self.landing.clone(),
            database: self.database.clone(),
        }
    }

    /// Sends SIGTERM (a graceful stop).
    pub fn terminate(&self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    }

    /// Starts the server again on the same folders and port.
    pub fn restart(&mut self, env: &[(&str, &str)]) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn_server(self.dir.path(), &self.landing, env);
        self.wait_ready();
    }

    /// Runs an `ingestion` command against this server's configuration.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_env(args, &[])
    }

    /// [`Server::cli`] with environment variables (secrets named in the configuration).
    pub fn cli_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ingestion"));
        command.envs(env.iter().copied());
        command
            .args(args)
            .arg("--config")
            .arg(self.dir.path().join("ingestion.toml"));
        command.output().unwrap()
    }

    /// Waits (up to `seconds`) until `done` holds for the jobs, returning them.
    pub fn wait_for_jobs(
        &self,
        seconds: u64,
        what: &str,
        done: impl Fn(&[ingestion::state::Job]) -> bool,
    ) -> Vec<ingestion::state::Job> {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        loop {
            let jobs = self.jobs();
            if done(&jobs) {
                return jobs;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; jobs: {jobs:#?}\nserver log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Files under a local folder of the server (`buckets/delivered`, `buckets/quarantine`, …).
    pub fn files_in(&self, folder: &str) -> Vec<String> {
        let root = self.dir.path().join(folder);
        let mut found = Vec::new();
        walk(&root, &root, &mut found);
        found.sort();
        found
    }

    /// Waits (up to 30 s) until the server accepts connections; panics if it exits first.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the server exited with {status}:\n{}", self.log());
            }
            if listening(self.port) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the server did not start listening:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    pub fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("state/audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    /// Audit events named `event`.
    /// Waits (up to 30 s) until `count` audit events named `event` are written, and returns them.
    /// Outcomes are committed to the database just before they are audited, so a test that has
    /// seen a job finish waits here for its audit line.
    pub fn wait_events(&self, event: &str, count: usize) -> Vec<serde_json::Value> {
        wait_until(30, &format!("{count} `{event}` audit events"), || {
            let events = self.events(event);
            (events.len() >= count).then_some(events)
        })
    }

    pub fn events(&self, event: &str) -> Vec<serde_json::Value> {
        self.audit()
            .into_iter()
            .filter(|e| e["event"] == event)
            .collect()
    }

    /// Runs `query` on the server's state database.
    pub fn query<T, F: Future<Output = T>>(
        &self,
        query: impl FnOnce(ingestion::state::State) -> F,
    ) -> T {
        tokio::runtime::Runtime::new().unwrap().block_on(async {
            query(ingestion::state::State::open(&self.database).await.unwrap()).await
        })
    }

    /// Jobs recorded in the server's state database, newest first.
    pub fn jobs(&self) -> Vec<ingestion::state::Job> {
        self.query(|state| async move {
            state
                .jobs(&ingestion::state::JobFilter::default())
                .await
                .unwrap()
        })
    }

    /// Waits (up to 120 s) until the server has stored and recorded at least `bytes` of the upload
    /// to `path`, and returns its partial.
    pub fn wait_for_stored(&self, path: &str, bytes: u64) -> ingestion::state::Partial {
        wait_until(120, &format!("{bytes} bytes of /{path} stored"), || {
            self.partials()
                .into_iter()
                .find(|partial| partial.path == path && partial.size >= bytes)
        })
    }

    /// Opens each of `paths` for upload as acme with paramiko (WRITE | CREAT | TRUNC, whose refusals
    /// carry the server's message, unlike the OpenSSH client's) and writes a line; one outcome per
    /// path: `<path> ok` or `<path> refused: <the server's message>`.
    pub fn paramiko_uploads(&self, key: &Key, paths: &[&str]) -> Vec<String> {
        let (port, key) = (self.port.to_string(), key.private.display().to_string());
        let mut args = vec![port.as_str(), key.as_str()];
        args.extend_from_slice(paths);
        let output = python(PARAMIKO_UPLOADS, &args);
        assert_success(&output, "paramiko uploads");
        text(&output).lines().map(str::to_string).collect()
    }

    /// Interrupted uploads recorded in the server's state database.
    pub fn partials(&self) -> Vec<ingestion::state::Partial> {
        self.query(|state| async move { state.partials(None).await.unwrap() })
    }

    pub fn known_hosts(&self) -> PathBuf {
        self.dir.path().join("known_hosts")
    }

    /// Common OpenSSH client options: this key only, no agent, no prompts.
    fn ssh_options(&self, key: &Key) -> Vec<String> {
        [
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "IdentityAgent=none",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "LogLevel=ERROR",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([
            "-o".to_string(),
            format!("UserKnownHostsFile={}", self.known_hosts().display()),
            "-i".to_string(),
            key.private.display().to_string(),
        ])
        .collect()
    }

    /// Runs OpenSSH sftp in batch mode with `script` (one command a line).
    pub fn sftp(&self, user: &str, key: &Key, script: &str) -> Output {
        self.sftp_from(user, key, script, None)
    }

    pub fn sftp_from(&self, user: &str, key: &Key, script: &str, bind: Option<&str>) -> Output {
        let bind = bind.map(|address| format!("BindAddress={address}"));
        let options: Vec<&str> = bind.iter().flat_map(|b| ["-o", b.as_str()]).collect();
        self.sftp_spawn(user, key, script, &options)
            .wait_with_output()
            .unwrap()
    }

    /// Starts OpenSSH sftp in batch mode with `script` and more `options` (`-l KBIT` to throttle,
    /// …), without waiting for it: for tests that act while a transfer is under way.
    pub fn sftp_spawn(&self, user: &str, key: &Key, script: &str, options: &[&str]) -> Child {
        let mut child = Command::new("sftp")
            .args(self.ssh_options(key))
            .args(options)
            .args(["-P", &self.port.to_string(), "-b", "-"])
            .arg(format!("{user}@127.0.0.1"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        child
    }

    pub fn scp_upload(&self, user: &str, key: &Key, local: &Path, remote: &str) -> Output {
        Command::new("scp")
            .args(self.ssh_options(key))
            .args(["-P", &self.port.to_string()])
            .arg(local)
            .arg(format!("{user}@127.0.0.1:{remote}"))
            .output()
            .unwrap()
    }

    pub fn curl_upload(
        &self,
        user: &str,
        key: &Key,
        local: &Path,
        remote_url_path: &str,
    ) -> Output {
        Command::new("curl")
            .args(["-sS", "--insecure", "--key"])
            .arg(&key.private)
            .arg("--pubkey")
            .arg(format!("{}.pub", key.private.display()))
            .arg("-T")
            .arg(local)
            .arg(format!(
                "sftp://{user}@127.0.0.1:{}/{remote_url_path}",
                self.port
            ))
            .output()
            .unwrap()
    }

    /// The landed object for `user`'s home path `path`, read from local disk or S3.
    pub fn landed(&self, user: &str, path: &str) -> Option<Vec<u8>> {
        match &self.landing {
            Landing::Local => std::fs::read(
                self.dir
                    .path()
                    .join("buckets/landing")
                    .join(user)
                    .join(path),
            )
            .ok(),
            Landing::S3 { endpoint, bucket } => {
                s3_get(endpoint, bucket, &format!("landing-prefix/{user}/{path}"))
            }
        }
    }

    /// Every object key in the landing bucket, staging files included (local) or all keys (S3).
    pub fn landing_listing(&self) -> Vec<String> {
        match &self.landing {
            Landing::Local => {
                let root = self.dir.path().join("buckets/landing");
                let mut found = Vec::new();
                walk(&root, &root, &mut found);
                found.sort();
                found
            }
            Landing::S3 { endpoint, bucket } => s3_list(endpoint, bucket),
        }
    }

    pub fn stop(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.log()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_server(dir: &Path, landing: &Landing, env: &[(&str, &str)]) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ingestion"));
    command
        .args(["serve", "--config"])
        .arg(dir.join("ingestion.toml"))
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("server.log"))
                .unwrap(),
        );
    if let Landing::S3 { endpoint, .. } = landing {
        s3_env(&mut command, endpoint);
    }
    for (name, value) in env {
        command.env(name, value);
    }
    command.spawn().unwrap()
}

fn walk(root: &Path, dir: &Path, found: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            walk(root, &path, found);
        } else {
            found.push(path.strip_prefix(root).unwrap().display().to_string());
        }
    }
}

pub fn assert_success(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

pub fn assert_failure(output: &Output, what: &str) {
    assert!(
        !output.status.success(),
        "{what} should have failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

pub fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

// ---- S3 (moto) ----

fn s3_env(command: &mut Command, endpoint: &str) {
    command
        .env("AWS_ENDPOINT_URL", endpoint)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", "eu-west-2")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE");
}

fn boto(endpoint: &str, script: &str, args: &[&str]) -> Output {
    let mut command = Command::new("python3");
    command.arg("-c").arg(script).args(args);
    s3_env(&mut command, endpoint);
    command.output().unwrap()
}

const BOTO_PRELUDE: &str = "import sys, boto3\n\
s3 = boto3.client('s3', region_name='eu-west-2', config=boto3.session.Config(s3={'addressing_style': 'path'}))\n";

fn s3_get(endpoint: &str, bucket: &str, key: &str) -> Option<Vec<u8>> {
    let script = format!(
        "{BOTO_PRELUDE}try:\n    body = s3.get_object(Bucket=sys.argv[1], Key=sys.argv[2])['Body'].read()\nexcept s3.exceptions.NoSuchKey:\n    sys.exit(3)\nsys.stdout.buffer.write(body)\n"
    );
    let output = boto(endpoint, &script, &[bucket, key]);
    match output.status.code() {
        Some(0) => Some(output.stdout),
        Some(3) => None,
        _ => panic!("boto3 get failed: {}", text(&output)),
    }
}

/// `head_object` as JSON (SSEKMSKeyId, Metadata, ContentLength), or `None` if absent.
pub fn s3_head(endpoint: &str, bucket: &str, key: &str) -> Option<serde_json::Value> {
    let script = format!(
        "{BOTO_PRELUDE}import json\ntry:\n    h = s3.head_object(Bucket=sys.argv[1], Key=sys.argv[2])\nexcept Exception:\n    sys.exit(3)\n\
         t = s3.get_object_tagging(Bucket=sys.argv[1], Key=sys.argv[2]).get('TagSet', [])\n\
         print(json.dumps({{'SSEKMSKeyId': h.get('SSEKMSKeyId'), 'ServerSideEncryption': h.get('ServerSideEncryption'), \
         'Metadata': h.get('Metadata', {{}}), 'ContentLength': h['ContentLength'], 'Tags': {{x['Key']: x['Value'] for x in t}}}}))\n"
    );
    let output = boto(endpoint, &script, &[bucket, key]);
    match output.status.code() {
        Some(0) => Some(serde_json::from_slice(&output.stdout).unwrap()),
        Some(3) => None,
        _ => panic!("boto3 head failed: {}", text(&output)),
    }
}

pub fn s3_get_object(endpoint: &str, bucket: &str, key: &str) -> Option<Vec<u8>> {
    s3_get(endpoint, bucket, key)
}

pub fn s3_keys(endpoint: &str, bucket: &str) -> Vec<String> {
    s3_list(endpoint, bucket)
}

fn s3_list(endpoint: &str, bucket: &str) -> Vec<String> {
    let script = format!(
        "{BOTO_PRELUDE}p = s3.get_paginator('list_objects_v2')\nfor page in p.paginate(Bucket=sys.argv[1]):\n    for o in page.get('Contents', []):\n        print(o['Key'])\n\
         for u in s3.list_multipart_uploads(Bucket=sys.argv[1]).get('Uploads', []):\n    print('MULTIPART ' + u['Key'])\n"
    );
    let output = boto(endpoint, &script, &[bucket]);
    assert_success(&output, "boto3 list");
    let mut keys: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    keys.sort();
    keys
}

/// Where a test's buckets live: local folders, or moto S3 with landing in `landing-bucket`, quarantine
/// in `landing-bucket-quarantine` and user acme's destination under `team-bucket/acme`.
pub enum Buckets<'a> {
    Local,
    S3(&'a Moto),
}

impl Buckets<'_> {
    pub fn landing(&self) -> Landing {
        match self {
            Buckets::Local => Landing::Local,
            Buckets::S3(moto) => Landing::S3 {
                endpoint: moto.endpoint.clone(),
                bucket: "landing-bucket".into(),
            },
        }
    }

    /// A user's destination (`None`: the harness's local default).
    pub fn destination(&self, user: &str) -> Option<String> {
        match self {
            Buckets::Local => None,
            Buckets::S3(_) => Some(format!("s3://team-bucket/{user}")),
        }
    }

    /// Names of the files delivered to acme.
    pub fn delivered(&self, server: &Server) -> Vec<String> {
        match self {
            Buckets::Local => server.files_in("buckets/delivered/acme"),
            Buckets::S3(moto) => s3_keys(&moto.endpoint, "team-bucket")
                .into_iter()
                .map(|key| key.trim_start_matches("acme/").to_string())
                .collect(),
        }
    }

    /// The bytes of a file delivered to acme.
    pub fn delivered_bytes(&self, server: &Server, name: &str) -> Option<Vec<u8>> {
        match self {
            Buckets::Local => {
                std::fs::read(server.dir.path().join("buckets/delivered/acme").join(name)).ok()
            }
            Buckets::S3(moto) => {
                s3_get_object(&moto.endpoint, "team-bucket", &format!("acme/{name}"))
            }
        }
    }

    pub fn quarantined(&self, server: &Server) -> Vec<String> {
        match self {
            Buckets::Local => server.files_in("buckets/quarantine"),
            Buckets::S3(moto) => s3_keys(&moto.endpoint, "landing-bucket-quarantine"),
        }
    }
}

/// A moto S3 server started for one test, with the buckets it needs.
/// moto with the three buckets the S3 tests use (landing, its quarantine, a team's destination),
/// or `None` (the test skips) when moto or boto3 is missing outside CI.
pub fn require_moto(test: &str) -> Option<Moto> {
    if !require_python("moto.server", test) || !require_python("boto3", test) {
        return None;
    }
    Some(Moto::start(&[
        "landing-bucket",
        "landing-bucket-quarantine",
        "team-bucket",
    ]))
}

pub struct Moto {
    child: Child,
    pub endpoint: String,
}

impl Moto {
    pub fn start(buckets: &[&str]) -> Moto {
        let port = free_port();
        let child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let endpoint = format!("http://127.0.0.1:{port}");
        wait_for_port(port, "moto_server");
        let script = format!(
            "{BOTO_PRELUDE}for b in sys.argv[1:]:\n    s3.create_bucket(Bucket=b, CreateBucketConfiguration={{'LocationConstraint': 'eu-west-2'}})\n"
        );
        assert_success(
            &boto(&endpoint, &script, buckets),
            "creating buckets in moto",
        );
        Moto { child, endpoint }
    }

    pub fn put(&self, bucket: &str, key: &str, file: &Path) {
        let script =
            format!("{BOTO_PRELUDE}s3.upload_file(sys.argv[3], sys.argv[1], sys.argv[2])\n");
        assert_success(
            &boto(
                &self.endpoint,
                &script,
                &[bucket, key, &file.display().to_string()],
            ),
            "boto3 put",
        );
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- ClamAV (clamd) ----

/// The EICAR test file.
pub const EICAR: &[u8] = br"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";

/// A clamd started for one test, with a one-signature database (EICAR) and small size limits:
/// StreamMaxLength 10M, so an 11 MiB file is unscannable.
pub struct ClamdPeer {
    dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
}

impl ClamdPeer {
    /// Writes the configuration for `port` without starting clamd.
    pub fn prepare(port: u16) -> ClamdPeer {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("db")).unwrap();
        let hex: String = EICAR.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(
            dir.path().join("db/custom.ndb"),
            format!("Custom.Test.EICAR-NDB:0:*:{hex}\n"),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("clamd.conf"),
            format!(
                "DatabaseDirectory {db}\nTCPSocket {port}\nTCPAddr 127.0.0.1\nForeground yes\n\
                 StreamMaxLength 10M\nMaxFileSize 10M\nMaxScanSize 40M\nAlertExceedsMax yes\n\
                 LogFile {log}\nTemporaryDirectory {tmp}\n",
                db = dir.path().join("db").display(),
                log = dir.path().join("clamd.log").display(),
                tmp = dir.path().display(),
            ),
        )
        .unwrap();
        ClamdPeer {
            dir,
            port,
            child: None,
        }
    }

    pub fn start_on_free_port() -> ClamdPeer {
        let mut clamd = ClamdPeer::prepare(free_port());
        clamd.start();
        clamd
    }

    pub fn address(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    /// Starts clamd and waits until it answers PING.
    pub fn start(&mut self) {
        let child = Command::new(clamd_binary())
            .arg("--config-file")
            .arg(self.dir.path().join("clamd.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) {
                use std::io::Read;
                stream.write_all(b"zPING\0").unwrap();
                let mut reply = [0u8; 5];
                if stream.read_exact(&mut reply).is_ok() && &reply == b"PONG\0" {
                    return;
                }
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "clamd exited with {status}: {}",
                    std::fs::read_to_string(self.dir.path().join("clamd.log")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "clamd did not start");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ClamdPeer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Debian installs clamd in /usr/sbin, which a non-root PATH may lack.
pub fn clamd_binary() -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("clamd"))
        .find(|path| path.is_file())
        .unwrap_or_else(|| PathBuf::from("clamd"))
}

/// Whether clamd is installed (see [`require`]).
pub fn require_clamd(test: &str) -> bool {
    peer_found(
        clamd_binary().is_file(),
        "`clamd` (Debian's clamav-daemon) is not installed",
        test,
    )
}

/// A zip archive holding `name` with `content` (made by Python's zipfile).
pub fn zip_file(path: &Path, name: &str, content: &[u8]) {
    let inner = path.with_extension("inner");
    std::fs::write(&inner, content).unwrap();
    let output = Command::new("python3")
        .args(["-c", "import sys, zipfile\nwith zipfile.ZipFile(sys.argv[1], 'w', zipfile.ZIP_DEFLATED) as z: z.write(sys.argv[2], sys.argv[3])"])
        .arg(path)
        .arg(&inner)
        .arg(name)
        .output()
        .unwrap();
    assert_success(&output, "making a zip");
}

// ---- alert receivers: an HTTP stand-in for Slack and webhooks, and aiosmtpd ----

/// The HTTP receiver of tests/peers/http_receiver.py.
pub struct Receiver {
    _dir: tempfile::TempDir,
    log: PathBuf,
    child: Child,
    pub port: u16,
}

impl Receiver {
    /// Starts it; `plan` lists statuses to answer per path before answering 200.
    pub fn start(plan: &[(&str, &str)]) -> Receiver {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("requests.jsonl");
        let port = free_port();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/http_receiver.py");
        let child = Command::new("python3")
            .arg(script)
            .arg(port.to_string())
            .arg(&log)
            .args(
                plan.iter()
                    .map(|(path, statuses)| format!("{path}={statuses}")),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for_port(port, "the HTTP receiver");
        Receiver {
            _dir: dir,
            log,
            child,
            port,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The requests received on `path`.
    pub fn requests(&self, path: &str) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
            .filter(|request| request["path"] == path)
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !listening(port) {
        assert!(Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An aiosmtpd server storing each message as a file (Mailbox handler).
pub struct SmtpSink {
    dir: tempfile::TempDir,
    child: Option<Child>,
    pub port: u16,
}

impl SmtpSink {
    /// Reserves a port without starting the server (to test SMTP being down).
    pub fn prepare() -> SmtpSink {
        SmtpSink {
            dir: tempfile::tempdir().unwrap(),
            child: None,
            port: free_port(),
        }
    }

    pub fn start(&mut self) {
        let child = Command::new("python3")
            .args([
                "-m",
                "aiosmtpd",
                "-n",
                "-l",
                &format!("127.0.0.1:{}", self.port),
                "-c",
                "aiosmtpd.handlers.Mailbox",
            ])
            .arg(self.dir.path().join("mail"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        wait_for_port(self.port, "aiosmtpd");
    }

    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    /// The messages received, as text.
    pub fn messages(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.dir.path().join("mail/new")) else {
            return Vec::new();
        };
        let mut messages: Vec<String> = entries
            .flatten()
            .map(|entry| std::fs::read_to_string(entry.path()).unwrap_or_default())
            .collect();
        messages.sort();
        messages
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls `probe` until it returns `Some`, for up to `seconds`.
pub fn wait_until<T>(seconds: u64, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    loop {
        if let Some(found) = probe() {
            return found;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An HTTP answer as curl got it.
#[derive(Debug)]
pub struct HttpAnswer {
    pub status: u16,
    pub headers: String,
    pub body: String,
}

impl HttpAnswer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|error| panic!("not JSON ({error}): {}", self.body))
    }
}

/// A GET with curl, with a bearer token when given.
pub fn http_get(url: &str, token: Option<&str>) -> HttpAnswer {
    let dir = tempfile::tempdir().unwrap();
    let headers = dir.path().join("headers");
    let mut command = Command::new("curl");
    command.args(["-sS", "--max-time", "30", "-o", "-", "-D"]);
    command.arg(&headers);
    command.args(["-w", "\n%{http_code}"]);
    if let Some(token) = token {
        command.args(["-H", &format!("Authorization: Bearer {token}")]);
    }
    let output = command.arg(url).output().unwrap();
    assert!(output.status.success(), "curl {url}: {}", text(&output));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, status) = stdout.rsplit_once('\n').unwrap();
    HttpAnswer {
        status: status.trim().parse().unwrap(),
        headers: std::fs::read_to_string(headers).unwrap_or_default(),
        body: body.to_string(),
    }
}

/// Whether there are `count` jobs, each delivered or quarantined.
pub fn all_final(jobs: &[ingestion::state::Job], count: usize) -> bool {
    use ingestion::state::JobState;
    jobs.len() == count
        && jobs
            .iter()
            .all(|job| matches!(job.state, JobState::Delivered | JobState::Quarantined))
}

/// The job of `path` among `jobs`.
pub fn job<'a>(jobs: &'a [ingestion::state::Job], path: &str) -> &'a ingestion::state::Job {
    jobs.iter()
        .find(|job| job.path == path)
        .unwrap_or_else(|| panic!("no job for {path}: {jobs:#?}"))
}

/// Runs a Python script (`python3 -c`) with arguments and returns what it printed.
pub fn python(script: &str, args: &[&str]) -> Output {
    Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap()
}

/// See [`Server::paramiko_uploads`].
const PARAMIKO_UPLOADS: &str = r#"
import sys, paramiko
port, key, paths = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
t = paramiko.Transport(("127.0.0.1", port))
t.connect(username="acme", pkey=paramiko.Ed25519Key.from_private_key_file(key))
s = paramiko.SFTPClient.from_transport(t)
for path in paths:
    try:
        with s.open(path, "w") as f:
            f.write(b"1,2,3\n")
        print(path, "ok")
    except IOError as error:
        print(path, "refused:", error.args[-1] if error.args else error)
t.close()
"#;
