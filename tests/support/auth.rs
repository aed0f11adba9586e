//! Registry credentials: an htpasswd file distribution accepts (bcrypt
//! entries), HTTP Basic header values, and clients that send them on every
//! request (pushes included: the upload `Location` a registry hands back is
//! asked with the same credentials, as docker does).

use std::fs;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION};

/// A user and password.
#[derive(Clone, Debug)]
pub struct Creds {
    /// The user name.
    pub user: String,
    /// The password, in clear.
    pub password: String,
}

impl Creds {
    /// `user` with `password`.
    pub fn new(user: &str, password: &str) -> Creds {
        Creds {
            user: user.into(),
            password: password.into(),
        }
    }

    /// The same user with another password.
    pub fn with_password(&self, password: &str) -> Creds {
        Creds::new(&self.user, password)
    }

    /// `base64(user:password)`, the secret part of the header.
    pub fn basic_token(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", self.user, self.password))
    }

    /// `Basic base64(user:password)`.
    pub fn authorization(&self) -> String {
        format!("Basic {}", self.basic_token())
    }
}

/// An htpasswd file (in a temp dir) holding bcrypt entries for `users`;
/// distribution's `auth: htpasswd` reads only bcrypt. Cost 4, the lowest
/// bcrypt allows: the registry checks it on every request, and the tests
/// need correctness, not resistance to brute force.
pub struct Htpasswd {
    /// Keeps the file alive.
    dir: tempfile::TempDir,
}

impl Htpasswd {
    /// Writes the file.
    pub fn new(users: &[&Creds]) -> Htpasswd {
        let dir = tempfile::Builder::new()
            .prefix("archmerge-htpasswd-")
            .tempdir()
            .expect("creating the htpasswd temp dir");
        let mut text = String::new();
        for c in users {
            let hash = bcrypt::hash_with_result(&c.password, 4)
                .expect("bcrypt hashing")
                .format_for_version(bcrypt::Version::TwoY);
            text.push_str(&format!("{}:{hash}\n", c.user));
        }
        fs::write(dir.path().join("htpasswd"), text).expect("writing htpasswd");
        Htpasswd { dir }
    }

    /// The file, for `RegistryOpts::htpasswd`.
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("htpasswd")
    }

    /// The directory holding the file.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// A client like [`super::http`] that sends `creds` (HTTP Basic) on every
/// request; `None` gives an anonymous client.
pub fn http_as(creds: Option<&Creds>) -> reqwest::Client {
    let mut headers = HeaderMap::new();
    if let Some(c) = creds {
        let mut v = HeaderValue::from_str(&c.authorization()).expect("a header value");
        v.set_sensitive(true);
        headers.insert(AUTHORIZATION, v);
    }
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(std::time::Duration::from_secs(5))
        .default_headers(headers)
        .build()
        .expect("building the HTTP client")
}
