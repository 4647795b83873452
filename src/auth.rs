//! Developers, API keys and tokens: who may connect, and as what.
//!
//! Owns the developer and publisher tables (keys kept only as SHA-256 digests), the token signing secret,
//! token minting (JWT, HS256) and single-use redemption. Produces a [`Principal`] for the
//! connection layer. Imports nothing above it: no sockets, no hub, no store. The only files it
//! touches are its own in the data directory: the secret, the demo developer, and the journal
//! of redeemed token ids ([`RedeemJournal`]).

use dashmap::DashMap;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::{DeveloperConfig, EndpointTokenConfig, PublisherConfig};

/// File in the data directory holding the generated token secret.
pub const SECRET_FILE: &str = "token_secret";
/// File in the data directory holding the demo developer made on first run.
pub const DEMO_FILE: &str = "demo-developer.toml";
/// Directory in the data directory holding the journal of redeemed token ids.
pub const REDEEMED_DIR: &str = "redeemed-tokens";

/// What a connection is allowed to do; the IDENTIFY `type` must agree with the token's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// IDENTIFY type 0: a user's app that SUBMITs readings.
    User,
    /// IDENTIFY type 1: a developer's backend that receives DISPATCH and may REPLAY.
    Developer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Developer => "developer",
        }
    }
}

/// An authenticated identity, as the rest of the server sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub role: Role,
    pub developer: Arc<str>,
    /// The user id for [`Role::User`]; empty for developers.
    pub user: Arc<str>,
    /// A user minted as an employee (seed 002's staff): counted on
    /// `/v1/topic/online-employees`.
    pub employee: bool,
    /// The redeemed token's id: cluster mode burns it cluster-wide too.
    pub token_id: Arc<str>,
}

/// Why a credential or token was refused. HTTP maps these to 400/403, IDENTIFY to close 4001.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing credentials")]
    MissingCredentials,
    #[error("missing user id")]
    MissingUser,
    #[error("invalid user id")]
    InvalidUser,
    #[error("unknown developer or wrong api key")]
    BadCredentials,
    #[error("token invalid: {0:?}")]
    InvalidToken(jsonwebtoken::errors::ErrorKind),
    #[error("token is for a {0}, IDENTIFY asked for another type")]
    WrongRole(&'static str),
    #[error("token already redeemed")]
    Redeemed,
    #[error("developer no longer configured")]
    UnknownDeveloper,
    /// The redemption could not be written down: honouring the token anyway would let it
    /// be used again after a restart, so it is refused (it stays valid for a retry).
    #[error("the token's redemption could not be recorded: {0:?}")]
    Journal(std::io::ErrorKind),
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    /// The user id for user tokens, the developer id for developer tokens.
    sub: String,
    dev: String,
    role: Role,
    iat: u64,
    exp: u64,
    jti: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    emp: bool,
}

/// The developer table and the token machinery. Cheap to share behind an `Arc`.
pub struct Auth {
    developers: HashMap<String, [u8; 32]>,
    /// Publisher ids with their key digests.
    publishers: Vec<(String, [u8; 32])>,
    /// Static `/stream` and `/json` tokens: owner ids with the tokens' digests.
    endpoint_tokens: Vec<(String, [u8; 32])>,
    /// The developer each publisher and each static token acts for, by "publisher:<id>" and
    /// "token:<id>".
    acts_for: HashMap<String, String>,
    /// STOMP destinations each may publish to, by developer id and "publisher:<id>".
    grants: HashMap<String, Vec<String>>,
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl_s: u64,
    /// Redeemed token ids with their expiry; pruned as they expire.
    redeemed: DashMap<String, u64>,
    next_prune: AtomicU64,
    /// Where redeemed ids are also written, so a restart does not make them usable again.
    journal: Option<RedeemJournal>,
}

impl Auth {
    pub fn new(developers: &[DeveloperConfig], secret: &[u8], ttl_s: u64) -> Self {
        let developers = developers
            .iter()
            .map(|d| (d.id.clone(), digest_of(d)))
            .collect();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Self {
            developers,
            publishers: Vec::new(),
            endpoint_tokens: Vec::new(),
            acts_for: HashMap::new(),
            grants: HashMap::new(),
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            ttl_s,
            redeemed: DashMap::new(),
            next_prune: AtomicU64::new(0),
            journal: None,
        }
    }

    /// Remembers redeemed token ids in `dir` across restarts, loading the unexpired ones
    /// written by earlier runs.
    pub fn with_journal(mut self, dir: &Path) -> std::io::Result<Self> {
        let journal = RedeemJournal::open(dir, self.ttl_s)?;
        for (jti, exp) in journal.load(unix_now())? {
            self.redeemed.insert(jti, exp);
        }
        self.journal = Some(journal);
        Ok(self)
    }

    /// Adds the backends that may publish to topics with a key of their own.
    pub fn with_publishers(mut self, publishers: &[PublisherConfig]) -> Self {
        self.publishers = publishers
            .iter()
            .map(|p| (p.id.clone(), digest_of(p)))
            .collect();
        for p in publishers {
            if let Some(dev) = &p.developer {
                self.acts_for
                    .insert(format!("publisher:{}", p.id), dev.clone());
            }
            let grants = p.prefixes.clone().unwrap_or_default();
            self.grants.insert(format!("publisher:{}", p.id), grants);
        }
        self
    }

    /// What each developer may publish to: its own `prefixes`, else `default`.
    pub fn with_developer_grants(
        mut self,
        developers: &[DeveloperConfig],
        default: &[String],
    ) -> Self {
        for d in developers {
            let grants = d.prefixes.clone().unwrap_or_else(|| default.to_vec());
            self.grants.insert(d.id.clone(), grants);
        }
        self
    }

    /// Adds the static tokens accepted on `/stream` and `/json`.
    pub fn with_endpoint_tokens(mut self, tokens: &[EndpointTokenConfig]) -> Self {
        self.endpoint_tokens = tokens
            .iter()
            .map(|t| (t.id.clone(), digest_of(t)))
            .collect();
        for t in tokens {
            if let Some(dev) = &t.developer {
                self.acts_for.insert(format!("token:{}", t.id), dev.clone());
            }
        }
        self
    }

    /// Checks a developer's API key in constant time (with respect to the key's content).
    pub fn check_key(&self, developer: &str, api_key: &str) -> Result<(), AuthError> {
        let expected = self
            .developers
            .get(developer)
            .ok_or(AuthError::BadCredentials)?;
        if same_digest(expected, &sha256(api_key.as_bytes())) {
            Ok(())
        } else {
            Err(AuthError::BadCredentials)
        }
    }

    /// The publisher whose key this is.
    pub fn check_publisher(&self, api_key: &str) -> Result<&str, AuthError> {
        find_key(&self.publishers, api_key)
    }

    /// Who a `/stream` or `/json` token belongs to: "developer/user" ("developer/" for a
    /// developer token) or "token:<id>" for a configured static token. A sensorgate token is
    /// checked (signature, expiry, developer) but not spent: BIMserver's clients send their
    /// one login token on the socket and with every call, so here it serves until it
    /// expires. It stays single-use on `/connect` and STOMP.
    pub fn endpoint_owner(&self, token: &str) -> Result<Arc<str>, AuthError> {
        if let Ok(id) = find_key(&self.endpoint_tokens, token) {
            return Ok(Arc::from(format!("token:{id}")));
        }
        let claims = self.verify(token, None)?;
        let user = match claims.role {
            Role::User => claims.sub.as_str(),
            Role::Developer => "",
        };
        Ok(Arc::from(format!("{}/{user}", claims.dev)))
    }

    /// The tenant an endpoint owner sees: the developer of "developer/user", the developer
    /// a static token is configured for, or (none configured) the token itself, which then
    /// sees nothing any publisher raises.
    pub fn tenant_of(&self, owner: &str) -> Arc<str> {
        match owner.split_once('/') {
            Some((developer, _)) => Arc::from(developer),
            None => Arc::from(self.acts_for.get(owner).map_or(owner, String::as_str)),
        }
    }

    /// Whether a developer (by id) or a publisher ("publisher:<id>") may publish to
    /// `destination`. Anyone not configured may publish nowhere.
    pub fn may_publish(&self, who: &str, destination: &str) -> bool {
        self.grants
            .get(who)
            .is_some_and(|g| crate::config::granted(g, destination))
    }

    /// The developer a publisher raises endpoint notifications for, if configured.
    pub fn publisher_tenant(&self, publisher: &str) -> Option<&str> {
        self.acts_for
            .get(&format!("publisher:{publisher}"))
            .map(String::as_str)
    }

    /// Mints a single-use token. `user` is required for [`Role::User`].
    pub fn mint(
        &self,
        developer: &str,
        role: Role,
        user: Option<&str>,
    ) -> Result<String, AuthError> {
        self.mint_as(developer, role, user, false)
    }

    /// [`Auth::mint`] for a user who is an employee (seed 002's staff side).
    pub fn mint_employee(&self, developer: &str, user: &str) -> Result<String, AuthError> {
        self.mint_as(developer, Role::User, Some(user), true)
    }

    fn mint_as(
        &self,
        developer: &str,
        role: Role,
        user: Option<&str>,
        employee: bool,
    ) -> Result<String, AuthError> {
        if !self.developers.contains_key(developer) {
            return Err(AuthError::UnknownDeveloper);
        }
        let sub = match role {
            Role::User => {
                let user = user.ok_or(AuthError::MissingUser)?;
                if !valid_user_id(user) {
                    return Err(AuthError::InvalidUser);
                }
                user.to_owned()
            }
            Role::Developer => developer.to_owned(),
        };
        let now = unix_now();
        let claims = Claims {
            sub,
            dev: developer.to_owned(),
            role,
            iat: now,
            exp: now + self.ttl_s,
            jti: random_hex(16),
            emp: employee && role == Role::User,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| AuthError::InvalidToken(e.into_kind()))
    }

    /// Verifies a token for IDENTIFY and burns it: a second redemption of the same token fails
    /// until it would have expired anyway.
    pub fn redeem(&self, token: &str, role: Role) -> Result<Principal, AuthError> {
        self.redeem_as(token, Some(role))
    }

    /// [`Auth::redeem`] for either role: the token says which (STOMP's CONNECT names none).
    pub fn redeem_any(&self, token: &str) -> Result<Principal, AuthError> {
        self.redeem_as(token, None)
    }

    /// A token's claims if it is signed by us, unexpired, of the wanted role, and for a
    /// developer still configured.
    fn verify(&self, token: &str, want: Option<Role>) -> Result<Claims, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| AuthError::InvalidToken(e.into_kind()))?;
        let claims = data.claims;
        if want.is_some_and(|r| r != claims.role) {
            return Err(AuthError::WrongRole(claims.role.as_str()));
        }
        if !self.developers.contains_key(&claims.dev) {
            return Err(AuthError::UnknownDeveloper);
        }
        Ok(claims)
    }

    fn redeem_as(&self, token: &str, want: Option<Role>) -> Result<Principal, AuthError> {
        let claims = self.verify(token, want)?;
        let role = claims.role;
        let now = unix_now();
        self.prune(now);
        let token_id: Arc<str> = Arc::from(claims.jti.as_str());
        match self.redeemed.entry(claims.jti) {
            dashmap::Entry::Occupied(_) => return Err(AuthError::Redeemed),
            dashmap::Entry::Vacant(v) => {
                if let Some(journal) = &self.journal {
                    journal
                        .record(v.key(), claims.exp)
                        .map_err(|e| AuthError::Journal(e.kind()))?;
                }
                v.insert(claims.exp);
            }
        }
        let user: Arc<str> = match role {
            Role::User => claims.sub.into(),
            Role::Developer => Arc::from(""),
        };
        Ok(Principal {
            role,
            developer: claims.dev.into(),
            user,
            employee: claims.emp,
            token_id,
        })
    }

    /// The configured developer ids.
    pub fn developer_ids(&self) -> impl Iterator<Item = &str> {
        self.developers.keys().map(String::as_str)
    }

    /// Drops redeemed ids whose tokens have expired, at most once a second.
    fn prune(&self, now: u64) {
        let due = self.next_prune.load(Ordering::Relaxed);
        if now < due
            || self
                .next_prune
                .compare_exchange(due, now + 1, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        self.redeemed.retain(|_, exp| *exp >= now);
        if let Some(journal) = &self.journal {
            journal.drop_expired(now);
        }
    }
}

/// Redeemed token ids on disk: one file per window of expiry times, `<dir>/<window>`, with a
/// line `<exp> <jti>` per redemption. A file whose whole window lies in the past holds only
/// expired ids and is deleted; nothing is ever rewritten. Lines are written without fsync: a
/// killed process loses none (they are in the page cache), a power cut may lose the last
/// few seconds of redemptions.
pub struct RedeemJournal {
    dir: PathBuf,
    window_s: u64,
    current: parking_lot::Mutex<Option<(u64, File)>>,
}

impl RedeemJournal {
    fn open(dir: &Path, ttl_s: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
            window_s: ttl_s.max(60),
            current: parking_lot::Mutex::new(None),
        })
    }

    /// The windows on disk, by number.
    fn windows(&self) -> std::io::Result<Vec<(u64, PathBuf)>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let window = path
                .file_name()
                .and_then(|n| n.to_str()?.parse::<u64>().ok());
            if let Some(window) = window {
                out.push((window, path));
            }
        }
        Ok(out)
    }

    /// The ids that have not expired at `now`.
    fn load(&self, now: u64) -> std::io::Result<Vec<(String, u64)>> {
        let mut ids = Vec::new();
        for (window, path) in self.windows()? {
            if (window + 1) * self.window_s <= now {
                continue;
            }
            for line in BufReader::new(File::open(&path)?).lines() {
                let line = line?;
                // A line cut short by a crash fails to parse and is skipped.
                if let Some((exp, jti)) = line.split_once(' ') {
                    if let Ok(exp) = exp.parse::<u64>() {
                        if exp >= now && !jti.is_empty() {
                            ids.push((jti.to_owned(), exp));
                        }
                    }
                }
            }
        }
        Ok(ids)
    }

    /// Writes one redemption down; an error means the token must not be honoured.
    fn record(&self, jti: &str, exp: u64) -> std::io::Result<()> {
        let window = exp / self.window_s;
        let mut current = self.current.lock();
        let result = (|| {
            if current.as_ref().map(|(w, _)| *w) != Some(window) {
                let file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.join(window.to_string()))?;
                *current = Some((window, file));
            }
            let (_, file) = current.as_mut().expect("opened above");
            file.write_all(format!("{exp} {jti}\n").as_bytes())
        })();
        if let Err(e) = &result {
            // The file may be gone or broken: open it again next time.
            *current = None;
            tracing::error!(error = %e, "could not journal a redeemed token id; refusing the token");
        }
        result
    }

    fn drop_expired(&self, now: u64) {
        let Ok(windows) = self.windows() else { return };
        for (window, path) in windows {
            if (window + 1) * self.window_s <= now {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// A user id is printable ASCII without quotes or backslashes, so it can be written into
/// DISPATCH frames without escaping, and at most 128 bytes.
pub fn valid_user_id(user: &str) -> bool {
    !user.is_empty()
        && user.len() <= 128
        && user
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
}

/// Reads the token secret from the data directory, creating it (0600) on first use.
pub fn load_or_create_secret(data_dir: &Path) -> std::io::Result<Vec<u8>> {
    let path = data_dir.join(SECRET_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) if text.trim().len() >= 32 => Ok(text.trim().as_bytes().to_vec()),
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} is shorter than 32 characters", path.display()),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secret = random_hex(32);
            write_private(&path, secret.as_bytes())?;
            Ok(secret.into_bytes())
        }
        Err(e) => Err(e),
    }
}

/// The demo developer: read from the data directory, or created there with a random key.
/// Returns the developer and whether it was created now.
pub fn load_or_create_demo(data_dir: &Path) -> std::io::Result<(DeveloperConfig, bool)> {
    let path = demo_path(data_dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let dev: DeveloperConfig = toml::from_str(&text).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            })?;
            Ok((dev, false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let dev = DeveloperConfig {
                id: "demo".into(),
                api_key: Some(random_hex(24)),
                api_key_sha256: None,
                developer: None,
                prefixes: None,
            };
            let text = toml::to_string(&dev).expect("a developer always renders as TOML");
            write_private(&path, text.as_bytes())?;
            Ok((dev, true))
        }
        Err(e) => Err(e),
    }
}

pub fn demo_path(data_dir: &Path) -> PathBuf {
    data_dir.join(DEMO_FILE)
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// The SHA-256 of a configured key, given in clear or as hex. A key with neither (refused
/// by config validation) gets a digest no input hashes to in practice.
fn digest_of(k: &DeveloperConfig) -> [u8; 32] {
    match (&k.api_key, &k.api_key_sha256) {
        (Some(key), _) => sha256(key.as_bytes()),
        (None, Some(hex)) => decode_hex32(hex).unwrap_or([0; 32]),
        (None, None) => [0; 32],
    }
}

/// The id whose key this is. Every entry is compared, so the time taken does not say
/// which one came close.
fn find_key<'a>(keys: &'a [(String, [u8; 32])], key: &str) -> Result<&'a str, AuthError> {
    let given = sha256(key.as_bytes());
    let mut found = None;
    for (id, digest) in keys {
        if same_digest(digest, &given) {
            found = Some(id.as_str());
        }
    }
    found.ok_or(AuthError::BadCredentials)
}

/// Compares in time independent of where the digests differ.
fn same_digest(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Hex SHA-256 of an API key, for `api_key_sha256` in the config.
pub fn api_key_digest(api_key: &str) -> String {
    sha256(api_key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn decode_hex32(hex: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if hex.len() != 64 {
        return None;
    }
    for (i, chunk) in hex.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(chunk).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).expect("the OS random source is available");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(ttl: u64) -> Auth {
        let devs = vec![
            DeveloperConfig {
                id: "acme".into(),
                api_key: Some("k1".into()),
                api_key_sha256: None,
                developer: None,
                prefixes: None,
            },
            DeveloperConfig {
                id: "hashed".into(),
                api_key: None,
                api_key_sha256: Some(api_key_digest("k2")),
                developer: None,
                prefixes: None,
            },
        ];
        Auth::new(&devs, &[7u8; 32], ttl)
    }

    #[test]
    fn keys_are_checked_in_clear_and_hashed_form() {
        let a = auth(60);
        assert_eq!(a.check_key("acme", "k1"), Ok(()));
        assert_eq!(a.check_key("hashed", "k2"), Ok(()));
        assert_eq!(a.check_key("acme", "k2"), Err(AuthError::BadCredentials));
        assert_eq!(a.check_key("nobody", "k1"), Err(AuthError::BadCredentials));
    }

    #[test]
    fn publisher_keys_name_their_publisher() {
        let a = auth(60).with_publishers(&[
            PublisherConfig {
                id: "chat".into(),
                api_key: Some("pk".into()),
                api_key_sha256: None,
                developer: None,
                prefixes: None,
            },
            PublisherConfig {
                id: "gym".into(),
                api_key: None,
                api_key_sha256: Some(api_key_digest("gk")),
                developer: None,
                prefixes: None,
            },
        ]);
        assert_eq!(a.check_publisher("pk"), Ok("chat"));
        assert_eq!(a.check_publisher("gk"), Ok("gym"));
        // A developer's key is not a publisher key.
        assert_eq!(a.check_publisher("k1"), Err(AuthError::BadCredentials));
    }

    #[test]
    fn endpoint_tokens_are_reusable_and_name_their_owner() {
        let a = auth(60).with_endpoint_tokens(&[EndpointTokenConfig {
            id: "bimviews".into(),
            api_key: Some("static-token".into()),
            api_key_sha256: None,
            developer: None,
            prefixes: None,
        }]);
        assert_eq!(
            &*a.endpoint_owner("static-token").unwrap(),
            "token:bimviews"
        );
        let user = a.mint("acme", Role::User, Some("u-1")).unwrap();
        // BIMserver clients send one token many times: checking does not spend it.
        for _ in 0..2 {
            assert_eq!(&*a.endpoint_owner(&user).unwrap(), "acme/u-1");
        }
        // ... and it is still good, once, where tokens are single-use.
        a.redeem(&user, Role::User).unwrap();
        let dev = a.mint("acme", Role::Developer, None).unwrap();
        assert_eq!(&*a.endpoint_owner(&dev).unwrap(), "acme/");
        assert!(a.endpoint_owner("nope").is_err());
        assert!(a.endpoint_owner("").is_err());
    }

    #[test]
    fn only_employee_tokens_carry_the_employee_flag() {
        let a = auth(60);
        let e = a.mint_employee("acme", "e-1").unwrap();
        let p = a.redeem_any(&e).unwrap();
        assert_eq!((&*p.user, p.role, p.employee), ("e-1", Role::User, true));
        let u = a.mint("acme", Role::User, Some("u-1")).unwrap();
        assert!(!a.redeem_any(&u).unwrap().employee);
        assert_eq!(
            a.mint_employee("acme", "bad\"id"),
            Err(AuthError::InvalidUser)
        );
    }

    #[test]
    fn a_token_is_redeemed_once_for_its_role() {
        let a = auth(60);
        let t = a.mint("acme", Role::User, Some("u-1")).unwrap();
        assert_eq!(
            a.redeem(&t, Role::Developer),
            Err(AuthError::WrongRole("user"))
        );
        let p = a.redeem(&t, Role::User).unwrap();
        assert_eq!(
            (&*p.developer, &*p.user, p.role),
            ("acme", "u-1", Role::User)
        );
        assert_eq!(a.redeem(&t, Role::User), Err(AuthError::Redeemed));
        let d = a.mint("acme", Role::Developer, None).unwrap();
        assert_eq!(&*a.redeem(&d, Role::Developer).unwrap().developer, "acme");
    }

    /// A redemption that cannot be written down is refused (else the token would work
    /// again after a restart), and the token stays good for a retry once it can be.
    #[test]
    fn a_redemption_that_cannot_be_journaled_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let journal = dir.path().join(REDEEMED_DIR);
        let a = auth(60).with_journal(&journal).unwrap();
        let t = a.mint("acme", Role::User, Some("u-1")).unwrap();
        // A file where the journal's directory was: no window file can be opened (root
        // included, unlike a permission).
        std::fs::remove_dir_all(&journal).unwrap();
        std::fs::write(&journal, b"").unwrap();
        assert!(matches!(
            a.redeem(&t, Role::User),
            Err(AuthError::Journal(_))
        ));
        std::fs::remove_file(&journal).unwrap();
        std::fs::create_dir(&journal).unwrap();
        assert!(a.redeem(&t, Role::User).is_ok());
        assert_eq!(a.redeem(&t, Role::User), Err(AuthError::Redeemed));
    }

    #[test]
    fn a_redeemed_token_stays_redeemed_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let journal = dir.path().join(REDEEMED_DIR);
        let first = auth(60).with_journal(&journal).unwrap();
        let used = first.mint("acme", Role::User, Some("u-1")).unwrap();
        let unused = first.mint("acme", Role::User, Some("u-2")).unwrap();
        first.redeem(&used, Role::User).unwrap();
        drop(first);
        let restarted = auth(60).with_journal(&journal).unwrap();
        assert_eq!(
            restarted.redeem(&used, Role::User),
            Err(AuthError::Redeemed)
        );
        assert!(restarted.redeem(&unused, Role::User).is_ok());
        // Only unexpired ids are loaded, and expired windows are deleted.
        let j = RedeemJournal::open(&journal, 60).unwrap();
        let later = unix_now() + 10_000;
        assert!(j.load(later).unwrap().is_empty());
        j.drop_expired(later);
        assert!(j.windows().unwrap().is_empty());
    }

    #[test]
    fn forged_expired_and_garbage_tokens_fail() {
        let a = auth(60);
        let other = Auth::new(
            &[DeveloperConfig {
                id: "acme".into(),
                api_key: Some("k1".into()),
                api_key_sha256: None,
                developer: None,
                prefixes: None,
            }],
            &[9u8; 32],
            60,
        );
        let forged = other.mint("acme", Role::User, Some("u")).unwrap();
        assert!(matches!(
            a.redeem(&forged, Role::User),
            Err(AuthError::InvalidToken(_))
        ));
        assert!(matches!(
            a.redeem("not.a.token", Role::User),
            Err(AuthError::InvalidToken(_))
        ));
        // alg=none: header {"alg":"none","typ":"JWT"}, no signature.
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ1IiwiZGV2IjoiYWNtZSIsInJvbGUiOiJ1c2VyIiwiaWF0IjowLCJleHAiOjk5OTk5OTk5OTksImp0aSI6IngifQ.";
        assert!(matches!(
            a.redeem(none, Role::User),
            Err(AuthError::InvalidToken(_))
        ));
        let short = auth(0);
        let t = short.mint("acme", Role::User, Some("u")).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1100));
        assert!(matches!(
            short.redeem(&t, Role::User),
            Err(AuthError::InvalidToken(_))
        ));
    }

    #[test]
    fn user_ids_are_checked() {
        let a = auth(60);
        assert_eq!(
            a.mint("acme", Role::User, None),
            Err(AuthError::MissingUser)
        );
        assert_eq!(
            a.mint("acme", Role::User, Some("a\"b")),
            Err(AuthError::InvalidUser)
        );
        assert_eq!(
            a.mint("acme", Role::User, Some(&"x".repeat(129))),
            Err(AuthError::InvalidUser)
        );
        assert_eq!(
            a.mint("ghost", Role::Developer, None),
            Err(AuthError::UnknownDeveloper)
        );
    }

    #[test]
    fn secret_and_demo_persist() {
        let dir = tempfile::tempdir().unwrap();
        let s1 = load_or_create_secret(dir.path()).unwrap();
        let s2 = load_or_create_secret(dir.path()).unwrap();
        assert_eq!(s1, s2);
        let (d1, created) = load_or_create_demo(dir.path()).unwrap();
        assert!(created);
        let (d2, created) = load_or_create_demo(dir.path()).unwrap();
        assert!(!created);
        assert_eq!(d1, d2);
    }
}
