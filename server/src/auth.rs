//! Built-in authentication: an HS256 JWT from the `token` query parameter, an
//! `Authorization: Bearer` header or the `crosswire_token` cookie, checked
//! before any upgrade. The token's claims carry the user id and the topic
//! patterns the peer may subscribe and publish to.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crosswire_shared::{Topic, TopicPattern};
use http::{header, HeaderValue, StatusCode};
use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

use crate::{routes::text_response, HttpResponse, UpgradeRequest};

/// The cookie a token may travel in.
pub const TOKEN_COOKIE: &str = "crosswire_token";

/// What a crosswire token says about its holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user id, shown in presence.
    pub sub: String,
    /// Expiry, in seconds since the Unix epoch.
    pub exp: u64,
    /// Topic patterns the holder may subscribe to; `None` allows any topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscribe: Option<Vec<TopicPattern>>,
    /// Topic patterns the holder may publish to; `None` allows any topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish: Option<Vec<TopicPattern>>,
}

impl Claims {
    /// Whether the holder may subscribe to `topic`.
    pub fn may_subscribe(&self, topic: &Topic) -> bool {
        allowed(&self.subscribe, topic)
    }

    /// Whether the holder may publish to `topic`.
    pub fn may_publish(&self, topic: &Topic) -> bool {
        allowed(&self.publish, topic)
    }

    /// How long until the token expires (zero if it already has).
    pub fn expires_in(&self) -> Duration {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        Duration::from_secs(self.exp).saturating_sub(now)
    }
}

fn allowed(patterns: &Option<Vec<TopicPattern>>, topic: &Topic) -> bool {
    patterns.as_ref().is_none_or(|list| list.iter().any(|p| p.matches(topic)))
}

/// Why a request was not authenticated; every variant answers HTTP 401.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No token in the query, the `Authorization` header or the cookie.
    #[error("a token is required: pass ?token=, an Authorization: Bearer header or the crosswire_token cookie")]
    MissingToken,
    /// The token is not a well-formed HS256 JWT with the required claims.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The token's signature does not match the server's secret.
    #[error("token signature is invalid")]
    BadSignature,
    /// The token has expired.
    #[error("token has expired")]
    Expired,
}

impl AuthError {
    /// The 401 response, with `WWW-Authenticate: Bearer` and the reason as text.
    pub fn response(&self) -> HttpResponse {
        let mut res = text_response(StatusCode::UNAUTHORIZED, format!("{self}\n"));
        res.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"crosswire\""));
        res
    }
}

/// Verifies crosswire tokens signed with one shared secret.
#[derive(Clone)]
pub struct JwtAuth {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for JwtAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JwtAuth { .. }") // never print the secret
    }
}

impl JwtAuth {
    /// Verifies tokens signed with `secret` (HS256).
    pub fn new(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        // Clocks of token issuers drift a little; five seconds, not the crate's default minute.
        validation.leeway = 5;
        Self { key: DecodingKey::from_secret(secret), validation }
    }

    /// The token a request carries, from the first place it is found.
    pub fn token(request: &UpgradeRequest) -> Option<&str> {
        request
            .query_param("token")
            .filter(|t| !t.is_empty())
            .or_else(|| request.header("authorization").and_then(|v| v.strip_prefix("Bearer ")).map(str::trim))
            .or_else(|| request.cookie(TOKEN_COOKIE))
    }

    /// Checks the request's token and returns its claims.
    pub fn authenticate(&self, request: &UpgradeRequest) -> Result<Claims, AuthError> {
        let token = Self::token(request).ok_or(AuthError::MissingToken)?;
        self.verify(token)
    }

    /// Checks one token.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map(|data| data.claims).map_err(|e| match e
            .kind()
        {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::InvalidSignature => AuthError::BadSignature,
            _ => AuthError::Malformed(e.to_string()),
        })
    }
}
