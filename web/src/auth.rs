//! HTTP authentication as the Mesos master's basic authenticator does it:
//! principals and secrets from `--credentials` (Mesos's JSON, or its
//! "principal secret" lines), checked per request in the realm of the
//! endpoint (`mesos-master-scheduler`, `-readwrite`, `-readonly`) where the
//! operator turned that realm on. A refused request gets 401 with
//! `WWW-Authenticate`; an address that keeps failing is refused for a while
//! without its credentials being looked at (429). Secrets are compared in
//! constant time and never logged.

use std::collections::HashMap;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use subtle::ConstantTimeEq;

/// Which flag guards an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Realm {
    /// `/api/v1/scheduler`: `--authenticate-frameworks`.
    Scheduler,
    /// Endpoints that change state (the operator API): `--authenticate-http-readwrite`.
    ReadWrite,
    /// Endpoints that only show state: `--authenticate-http-readonly`.
    ReadOnly,
}

impl Realm {
    fn name(self) -> &'static str {
        match self {
            Realm::Scheduler => "mesos-master-scheduler",
            Realm::ReadWrite => "mesos-master-readwrite",
            Realm::ReadOnly => "mesos-master-readonly",
        }
    }
}

/// Why the credentials file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot read the credentials file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the credentials file {path} can be read by others (mode {mode:04o}); its secrets must be the master's alone: chmod 600 {path}"
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error(
        "the credentials file {path} is neither Mesos's JSON ({{\"credentials\": [{{\"principal\": ..., \"secret\": ...}}]}}) nor lines of \"principal secret\": {reason}"
    )]
    Format { path: PathBuf, reason: String },
    #[error("{flag} needs --credentials: there is nobody to authenticate against")]
    Missing { flag: &'static str },
}

/// Principals and their secrets. Its Debug shows the principals only.
#[derive(Default, Clone)]
pub struct Credentials {
    secrets: HashMap<String, Vec<u8>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut principals: Vec<&String> = self.secrets.keys().collect();
        principals.sort();
        f.debug_struct("Credentials")
            .field("principals", &principals)
            .finish()
    }
}

#[derive(serde::Deserialize)]
struct CredentialsFile {
    credentials: Vec<Credential>,
}

#[derive(serde::Deserialize)]
struct Credential {
    principal: String,
    #[serde(default)]
    secret: String,
}

impl Credentials {
    /// Reads `path`, refusing a file that others can read.
    pub fn load(path: &Path) -> Result<Self, CredentialsError> {
        let read = |source| CredentialsError::Read {
            path: path.to_owned(),
            source,
        };
        let mode = std::fs::metadata(path).map_err(read)?.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(CredentialsError::Exposed {
                path: path.to_owned(),
                mode,
            });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        Self::parse(&text).map_err(|reason| CredentialsError::Format {
            path: path.to_owned(),
            reason,
        })
    }

    /// Mesos's JSON, or one "principal secret" pair a line.
    pub fn parse(text: &str) -> Result<Self, String> {
        let pairs: Vec<(String, String)> = if text.trim_start().starts_with('{') {
            let file: CredentialsFile =
                serde_json::from_str(text).map_err(|e| format!("bad JSON: {e}"))?;
            file.credentials
                .into_iter()
                .map(|c| (c.principal, c.secret))
                .collect()
        } else {
            text.lines()
                .map(str::trim)
                .filter(|line| !line.is_empty() && !line.starts_with('#'))
                .enumerate()
                .map(
                    |(n, line)| match line.split_whitespace().collect::<Vec<_>>()[..] {
                        [principal, secret] => Ok((principal.to_owned(), secret.to_owned())),
                        _ => Err(format!("entry {} is not \"principal secret\"", n + 1)),
                    },
                )
                .collect::<Result<_, _>>()?
        };
        let mut secrets = HashMap::new();
        for (principal, secret) in pairs {
            if principal.is_empty() || principal.contains(':') {
                return Err(format!(
                    "principal {principal:?} is empty or holds a ':', which HTTP Basic cannot carry"
                ));
            }
            if secrets
                .insert(principal.clone(), secret.into_bytes())
                .is_some()
            {
                return Err(format!("principal {principal:?} is listed twice"));
            }
        }
        if secrets.is_empty() {
            return Err("it lists no principal".into());
        }
        Ok(Self { secrets })
    }

    /// Whether `secret` is the principal's, compared in constant time (an
    /// unknown principal is compared against a secret of its own too).
    fn verify(&self, principal: &str, secret: &[u8]) -> bool {
        match self.secrets.get(principal) {
            Some(expected) => bool::from(expected.as_slice().ct_eq(secret)),
            None => {
                let _ = b"no such principal".as_slice().ct_eq(secret);
                false
            }
        }
    }
}

/// Failures counted per address, and how long one that keeps failing waits.
const FAILURES_ALLOWED: u32 = 10;
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Addresses remembered at most (the oldest go first): a flood from many
/// addresses cannot grow this without bound.
const ADDRESSES_KEPT: usize = 10_000;

#[derive(Clone, Copy)]
struct Failures {
    count: u32,
    since: Instant,
}

/// The realms turned on, the credentials and the per-address failures.
pub struct Authenticator {
    credentials: Credentials,
    realms: Vec<Realm>,
    failures: Mutex<HashMap<IpAddr, Failures>>,
}

/// Who made a request: an authenticated principal, or nobody (its realm is
/// not authenticated).
pub type Principal = Option<String>;

impl Authenticator {
    /// From the master's flags; None where no realm is authenticated.
    pub fn from_flags(
        credentials: Option<&Path>,
        realms: &[(Realm, bool, &'static str)],
    ) -> Result<Option<Self>, CredentialsError> {
        let on: Vec<Realm> = realms
            .iter()
            .filter(|(_, on, _)| *on)
            .map(|(realm, _, _)| *realm)
            .collect();
        let Some(&(_, _, flag)) = realms.iter().find(|(_, on, _)| *on) else {
            return Ok(None);
        };
        let Some(path) = credentials else {
            return Err(CredentialsError::Missing { flag });
        };
        let credentials = Credentials::load(path)?;
        tracing::info!(?credentials, realms = ?on, "HTTP authentication on");
        Ok(Some(Self {
            credentials,
            realms: on,
            failures: Mutex::new(HashMap::new()),
        }))
    }

    /// The request's principal, or the answer that refuses it.
    pub fn authenticate(
        &self,
        realm: Realm,
        headers: &HeaderMap,
        peer: IpAddr,
    ) -> Result<Principal, Box<Response>> {
        if !self.realms.contains(&realm) {
            return Ok(None);
        }
        let now = Instant::now();
        if let Some(wait) = self.blocked(peer, now) {
            return Err(Box::new(too_many(wait)));
        }
        match basic(headers) {
            Some((principal, secret)) if self.credentials.verify(&principal, &secret) => {
                self.lock_failures().remove(&peer);
                Ok(Some(principal))
            }
            given => {
                self.failed(peer, now);
                let why = match given {
                    Some((principal, _)) => {
                        tracing::warn!(%peer, principal, realm = realm.name(), "HTTP authentication failed");
                        "the principal or secret is wrong"
                    }
                    None => {
                        "this endpoint needs HTTP Basic credentials (a principal and its secret)"
                    }
                };
                Err(Box::new(unauthorized(realm, why)))
            }
        }
    }

    fn lock_failures(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Failures>> {
        self.failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How long `peer` still waits, if it failed too often lately.
    fn blocked(&self, peer: IpAddr, now: Instant) -> Option<Duration> {
        let failures = *self.lock_failures().get(&peer)?;
        let ends = failures.since + FAILURE_WINDOW;
        (failures.count >= FAILURES_ALLOWED && now < ends).then(|| ends - now)
    }

    fn failed(&self, peer: IpAddr, now: Instant) {
        let mut failures = self.lock_failures();
        if failures.len() >= ADDRESSES_KEPT && !failures.contains_key(&peer) {
            failures.retain(|_, f| now < f.since + FAILURE_WINDOW);
            if failures.len() >= ADDRESSES_KEPT
                && let Some(oldest) = failures
                    .iter()
                    .min_by_key(|(_, f)| f.since)
                    .map(|(a, _)| *a)
            {
                failures.remove(&oldest);
            }
        }
        let entry = failures.entry(peer).or_insert(Failures {
            count: 0,
            since: now,
        });
        if now >= entry.since + FAILURE_WINDOW {
            *entry = Failures {
                count: 0,
                since: now,
            };
        }
        entry.count += 1;
    }
}

/// The principal and secret of an `Authorization: Basic` header.
fn basic(headers: &HeaderMap) -> Option<(String, Vec<u8>)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    let principal = String::from_utf8(decoded[..colon].to_vec()).ok()?;
    Some((principal, decoded[colon + 1..].to_vec()))
}

fn unauthorized(realm: Realm, why: &str) -> Response {
    let mut response = (
        StatusCode::UNAUTHORIZED,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{why}\n"),
    )
        .into_response();
    if let Ok(value) = HeaderValue::from_str(&format!("Basic realm=\"{}\"", realm.name())) {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, value);
    }
    response
}

fn too_many(wait: Duration) -> Response {
    let seconds = wait.as_secs().max(1);
    let mut response = (
        StatusCode::TOO_MANY_REQUESTS,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!(
            "too many failed authentications from this address; try again in {seconds} s with the right credentials\n"
        ),
    )
        .into_response();
    if let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn with_basic(principal: &str, secret: &str) -> HeaderMap {
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(format!("{principal}:{secret}"));
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {encoded}")).unwrap(),
        );
        headers
    }

    fn authenticator(realms: Vec<Realm>) -> Authenticator {
        Authenticator {
            credentials: Credentials::parse(
                r#"{"credentials": [{"principal": "alice", "secret": "s3cret"}]}"#,
            )
            .unwrap(),
            realms,
            failures: Mutex::new(HashMap::new()),
        }
    }

    #[test]
    fn both_of_mesos_formats_are_read_and_bad_ones_say_why() {
        let json = Credentials::parse(
            r#"{"credentials": [{"principal": "a", "secret": "x"}, {"principal": "b", "secret": "y"}]}"#,
        )
        .unwrap();
        assert!(json.verify("a", b"x") && json.verify("b", b"y") && !json.verify("a", b"y"));
        let lines = Credentials::parse("# ops\na x\n\nb y\n").unwrap();
        assert!(lines.verify("b", b"y"));
        assert!(Credentials::parse("a x y").unwrap_err().contains("entry 1"));
        assert!(
            Credentials::parse("a x\na z")
                .unwrap_err()
                .contains("twice")
        );
        assert!(Credentials::parse("{}").unwrap_err().contains("bad JSON"));
        assert!(format!("{json:?}").contains("\"a\"") && !format!("{json:?}").contains('x'));
    }

    #[test]
    fn a_credentials_file_others_can_read_is_refused() {
        let path = std::env::temp_dir().join(format!("butte-creds-{}", std::process::id()));
        std::fs::write(&path, "a x\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let refused = Credentials::load(&path).unwrap_err().to_string();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let loaded = Credentials::load(&path);
        std::fs::remove_file(&path).unwrap();
        assert!(
            refused.contains("0644") && refused.contains("chmod 600"),
            "{refused}"
        );
        assert!(loaded.is_ok());
    }

    #[test]
    fn only_turned_on_realms_ask_and_wrong_secrets_get_401_then_429() {
        let auth = authenticator(vec![Realm::Scheduler]);
        let peer: IpAddr = [10, 0, 0, 1].into();
        let other: IpAddr = [10, 0, 0, 2].into();
        assert_eq!(
            auth.authenticate(Realm::ReadOnly, &HeaderMap::new(), peer)
                .unwrap(),
            None
        );
        assert_eq!(
            auth.authenticate(Realm::Scheduler, &with_basic("alice", "s3cret"), peer)
                .unwrap(),
            Some("alice".into())
        );
        let missing = auth
            .authenticate(Realm::Scheduler, &HeaderMap::new(), peer)
            .unwrap_err();
        assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            missing.headers()[header::WWW_AUTHENTICATE],
            "Basic realm=\"mesos-master-scheduler\""
        );
        for _ in 1..FAILURES_ALLOWED {
            let wrong = auth
                .authenticate(Realm::Scheduler, &with_basic("alice", "guess"), peer)
                .unwrap_err();
            assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
        }
        // Now even the right secret waits, from that address only.
        let blocked = auth
            .authenticate(Realm::Scheduler, &with_basic("alice", "s3cret"), peer)
            .unwrap_err();
        assert_eq!(blocked.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(blocked.headers().contains_key(header::RETRY_AFTER));
        assert!(
            auth.authenticate(Realm::Scheduler, &with_basic("alice", "s3cret"), other)
                .is_ok()
        );
    }

    #[test]
    fn a_flood_from_many_addresses_keeps_a_bounded_table() {
        let auth = authenticator(vec![Realm::ReadOnly]);
        for n in 0..(ADDRESSES_KEPT as u32 + 500) {
            let peer = IpAddr::from(n.to_be_bytes());
            let _ = auth.authenticate(Realm::ReadOnly, &with_basic("x", "y"), peer);
        }
        assert!(auth.lock_failures().len() <= ADDRESSES_KEPT);
    }
}
