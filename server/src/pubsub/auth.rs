//! Built-in authentication: an HS256 JWT from the `token` query parameter, an
//! `Authorization: Bearer` header or the `crosswire_token` cookie, checked
//! before any upgrade. The token's claims carry the user id and the topic
//! patterns the peer may subscribe and publish to. Permissions fail closed: a
//! token without a `subscribe` or `publish` claim gets the configured
//! defaults (`--jwt-default-subscribe`, `--jwt-default-publish`; none unless
//! set), never every topic, so a token signed with the same secret for some
//! other purpose grants nothing here.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crosswire_shared::{Topic, TopicPattern};
use http::{header, HeaderValue, StatusCode};
use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

use crate::{
    hooks::UpgradeRequest,
    response::{text_response, HttpResponse},
};

/// The cookie a token may travel in.
pub const TOKEN_COOKIE: &str = "crosswire_token";

/// What a crosswire token says about its holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user id, shown in presence.
    pub sub: String,
    /// Expiry, in seconds since the Unix epoch.
    pub exp: u64,
    /// Topic patterns the holder may subscribe to (and read the history and
    /// presence of). `None` (the claim absent) allows no topic; [`JwtAuth`]
    /// fills an absent claim with its configured defaults, so the claims of a
    /// verified token say what the holder may do. A `null` claim is refused
    /// as malformed rather than read as absent.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "patterns_not_null")]
    pub subscribe: Option<Vec<TopicPattern>>,
    /// Topic patterns the holder may publish to; `None` allows no topic (and
    /// is filled with the defaults as for `subscribe`), `null` is refused.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "patterns_not_null")]
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

/// Only called when the claim is present (`default` covers absence), so a
/// `None` here is an explicit `null`.
fn patterns_not_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<TopicPattern>>, D::Error> {
    match Option::<Vec<TopicPattern>>::deserialize(d)? {
        Some(list) => Ok(Some(list)),
        None => Err(serde::de::Error::custom("a topic claim must be a list of patterns, not null")),
    }
}

fn allowed(patterns: &Option<Vec<TopicPattern>>, topic: &Topic) -> bool {
    patterns.as_ref().is_some_and(|list| list.iter().any(|p| p.matches(topic)))
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
    /// The token's `nbf` (not before) is still in the future.
    #[error("token is not valid yet")]
    NotYetValid,
    /// The token's `aud` is not the audience this server expects, or it has
    /// one while the server expects none.
    #[error("token is meant for another audience")]
    WrongAudience,
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
    /// What a token without a `subscribe` claim may subscribe to.
    default_subscribe: Vec<TopicPattern>,
    /// What a token without a `publish` claim may publish to.
    default_publish: Vec<TopicPattern>,
}

impl std::fmt::Debug for JwtAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JwtAuth { .. }") // never print the secret
    }
}

impl JwtAuth {
    /// Verifies tokens signed with `secret` (HS256). Tokens carrying an `aud`
    /// claim are refused unless [`with_audience`](Self::with_audience) names it.
    pub fn new(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        // Clocks of token issuers drift a little; five seconds, not the crate's
        // default minute. The same leeway applies to `nbf`.
        validation.leeway = 5;
        validation.validate_nbf = true;
        Self {
            key: DecodingKey::from_secret(secret),
            validation,
            default_subscribe: Vec::new(),
            default_publish: Vec::new(),
        }
    }

    /// The topic patterns a token without a `subscribe` (or `publish`)
    /// claim gets; without this, such a token may do nothing. A token that
    /// has the claim gets exactly what it says: the claim replaces the
    /// defaults rather than adding to them, so an issuer can always narrow a
    /// token below what every user gets.
    pub fn with_defaults(mut self, subscribe: Vec<TopicPattern>, publish: Vec<TopicPattern>) -> Self {
        self.default_subscribe = subscribe;
        self.default_publish = publish;
        self
    }

    /// Also requires the `aud` claim to be (or contain) `audience`.
    pub fn with_audience(mut self, audience: &str) -> Self {
        self.validation.set_audience(&[audience]);
        self.validation.set_required_spec_claims(&["exp", "sub", "aud"]);
        self
    }

    /// The authentication `config` asks for: `None` without a JWT secret.
    pub fn from_config(config: &crate::ServerConfig) -> Option<Self> {
        let auth = Self::new(config.jwt_secret.as_deref()?.as_bytes())
            .with_defaults(config.jwt_default_subscribe.clone(), config.jwt_default_publish.clone());
        Some(match &config.jwt_audience {
            Some(audience) => auth.with_audience(audience),
            None => auth,
        })
    }

    /// The token a request carries, from the first place it is found.
    pub fn token(request: &UpgradeRequest) -> Option<&str> {
        request
            .query_param("token")
            .filter(|t| !t.is_empty())
            .or_else(|| request.header("authorization").and_then(bearer))
            .or_else(|| request.cookie(TOKEN_COOKIE))
    }

    /// Checks the request's token and returns its claims.
    pub fn authenticate(&self, request: &UpgradeRequest) -> Result<Claims, AuthError> {
        let token = Self::token(request).ok_or(AuthError::MissingToken)?;
        self.verify(token)
    }

    /// Checks one token; its claims come back with absent topic claims
    /// filled with the configured defaults.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let mut claims = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map(|data| data.claims)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                ErrorKind::InvalidAudience => AuthError::WrongAudience,
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                _ => AuthError::Malformed(e.to_string()),
            })?;
        claims.subscribe.get_or_insert_with(|| self.default_subscribe.clone());
        claims.publish.get_or_insert_with(|| self.default_publish.clone());
        Ok(claims)
    }
}

/// The credentials of an `Authorization: Bearer` header; the scheme name is
/// case-insensitive (RFC 9110 §11.1).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(claims: serde_json::Value) -> String {
        let key = jsonwebtoken::EncodingKey::from_secret(SECRET);
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).unwrap()
    }

    const SECRET: &[u8] = b"unit-test-secret-0123";

    fn patterns(list: &[&str]) -> Vec<TopicPattern> {
        list.iter().map(|p| TopicPattern::new(p).unwrap()).collect()
    }

    fn topic(name: &str) -> Topic {
        Topic::new(name).unwrap()
    }

    #[test]
    fn absent_topic_claims_grant_the_defaults_and_nothing_else() {
        let exp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 600;
        let bare = sign(serde_json::json!({"sub": "u", "exp": exp}));
        let claims = JwtAuth::new(SECRET).verify(&bare).unwrap();
        assert_eq!((claims.subscribe.as_deref(), claims.publish.as_deref()), (Some(&[][..]), Some(&[][..])));
        assert!(!claims.may_subscribe(&topic("admin:secret")) && !claims.may_publish(&topic("admin:secret")));

        let auth = JwtAuth::new(SECRET).with_defaults(patterns(&["chat:*"]), patterns(&["chat:lobby"]));
        let claims = auth.verify(&bare).unwrap();
        assert!(claims.may_subscribe(&topic("chat:x")) && !claims.may_subscribe(&topic("admin:secret")));
        assert!(claims.may_publish(&topic("chat:lobby")) && !claims.may_publish(&topic("chat:x")));

        // A claim present replaces the default, even an empty one.
        let own = sign(serde_json::json!({"sub": "u", "exp": exp, "subscribe": ["news:*"], "publish": []}));
        let claims = auth.verify(&own).unwrap();
        assert!(claims.may_subscribe(&topic("news:a")) && !claims.may_subscribe(&topic("chat:x")));
        assert!(!claims.may_publish(&topic("chat:lobby")));
    }

    #[test]
    fn claims_without_topic_patterns_allow_nothing() {
        let claims = Claims { sub: "u".into(), exp: 0, subscribe: None, publish: None };
        assert!(!claims.may_subscribe(&topic("t")) && !claims.may_publish(&topic("t")));
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer abc"), Some("abc"));
        assert_eq!(bearer("BEARER  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("Bearerabc"), None);
    }
}
