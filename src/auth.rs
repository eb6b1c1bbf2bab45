//! Who may do what: scopes, the configured tokens, and the principal a request acts as.
//! Transport-agnostic: the HTTP layer finds the credential (header or query), this module decides.

use std::fmt;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::model::StreamName;

/// What a credential allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Append to streams.
    Publish,
    /// Read from streams and acknowledge.
    Consume,
    /// Inspect and administer.
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::Publish, Scope::Consume, Scope::Admin];

    pub fn parse(text: &str) -> Option<Scope> {
        match text {
            "publish" => Some(Scope::Publish),
            "consume" => Some(Scope::Consume),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Publish => "publish",
            Scope::Consume => "consume",
            Scope::Admin => "admin",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stream glob such as `orders.*` (`*`, `?` and `[…]` as in shell globs; `/` is not special).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamPattern(glob::Pattern);

impl StreamPattern {
    pub fn parse(text: &str) -> Result<StreamPattern, glob::PatternError> {
        glob::Pattern::new(text).map(StreamPattern)
    }

    pub fn matches(&self, stream: &str) -> bool {
        self.0.matches(stream)
    }
}

impl Serialize for StreamPattern {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.0.as_str())
    }
}

/// A configured `[[tokens]]` entry. Only the SHA-256 of the token is kept.
#[derive(Debug, Clone, Serialize)]
pub struct StaticToken {
    pub name: String,
    #[serde(rename = "token_sha256", serialize_with = "crate::config::redacted")]
    pub sha256: [u8; 32],
    pub scopes: Vec<Scope>,
    /// Streams the token may touch; `None` means all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub streams: Option<Vec<StreamPattern>>,
}

/// Who a request acts as, and what it may do.
#[derive(Debug, Clone)]
pub struct Principal {
    pub name: String,
    scopes: Vec<Scope>,
    streams: Option<Vec<StreamPattern>>,
    /// When the credential stops being valid (a JWT's `exp` plus the clock-skew leeway): the
    /// streams it opened end then.
    pub expires_at: Option<SystemTime>,
}

impl Principal {
    /// A principal with every scope on every stream.
    pub fn full_access(name: impl Into<String>) -> Principal {
        Principal {
            name: name.into(),
            scopes: Scope::ALL.to_vec(),
            streams: None,
            expires_at: None,
        }
    }

    pub fn new(name: String, scopes: Vec<Scope>, streams: Option<Vec<StreamPattern>>) -> Principal {
        Principal {
            name,
            scopes,
            streams,
            expires_at: None,
        }
    }

    /// How long the credential stays valid from now (`None`: it does not expire).
    pub fn valid_for(&self) -> Option<Duration> {
        self.expires_at.map(|at| {
            at.duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
        })
    }

    pub fn has_scope(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }

    /// Whether the principal may act on `stream` at all (by its stream patterns).
    pub fn may_touch(&self, stream: &StreamName) -> bool {
        match &self.streams {
            None => true,
            Some(patterns) => patterns
                .iter()
                .any(|pattern| pattern.matches(stream.as_str())),
        }
    }

    /// Whether the principal may act on every stream (no stream patterns).
    pub fn is_unrestricted(&self) -> bool {
        self.streams.is_none()
    }

    /// Whether the principal has `scope` on `stream`.
    pub fn may(&self, scope: Scope, stream: &StreamName) -> bool {
        self.has_scope(scope) && self.may_touch(stream)
    }
}

/// SHA-256 of a token.
pub fn token_digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Verifies JSON Web Tokens: an HS256 secret, or an RS256/ES256 public key. Scopes come from the
/// `scope` claim (space-separated, the OAuth convention) and the `scopes` claim (an array), their
/// union; stream globs from `streams` (absent: every stream). `exp` is required.
#[derive(Clone)]
pub struct JwtVerifier {
    key: jsonwebtoken::DecodingKey,
    validation: jsonwebtoken::Validation,
}

impl fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("algorithms", &self.validation.algorithms)
            .finish()
    }
}

#[derive(serde::Deserialize)]
struct Claims {
    exp: u64,
    sub: Option<String>,
    scope: Option<String>,
    scopes: Option<Vec<String>>,
    streams: Option<Vec<String>>,
}

impl JwtVerifier {
    /// With an HS256 shared secret.
    pub fn hs256(secret: &str, audience: Option<&str>, issuer: Option<&str>) -> JwtVerifier {
        let key = jsonwebtoken::DecodingKey::from_secret(secret.as_bytes());
        JwtVerifier::with(key, jsonwebtoken::Algorithm::HS256, audience, issuer)
    }

    /// With a PEM public key: RSA (RS256) or elliptic curve P-256 (ES256).
    pub fn public_key(
        pem: &str,
        audience: Option<&str>,
        issuer: Option<&str>,
    ) -> Result<JwtVerifier, String> {
        use jsonwebtoken::{Algorithm, DecodingKey};
        let (key, algorithm) = match DecodingKey::from_rsa_pem(pem.as_bytes()) {
            Ok(key) => (key, Algorithm::RS256),
            Err(_) => match DecodingKey::from_ec_pem(pem.as_bytes()) {
                Ok(key) => (key, Algorithm::ES256),
                Err(error) => return Err(format!("not an RSA or EC public key in PEM: {error}")),
            },
        };
        Ok(JwtVerifier::with(key, algorithm, audience, issuer))
    }

    fn with(
        key: jsonwebtoken::DecodingKey,
        algorithm: jsonwebtoken::Algorithm,
        audience: Option<&str>,
        issuer: Option<&str>,
    ) -> JwtVerifier {
        let mut validation = jsonwebtoken::Validation::new(algorithm);
        validation.leeway = 30;
        validation.set_required_spec_claims(&["exp"]);
        match audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        if let Some(issuer) = issuer {
            validation.set_issuer(&[issuer]);
        }
        JwtVerifier { key, validation }
    }

    /// The principal a valid token names; `None` for anything invalid, expired or not ours.
    pub fn verify(&self, token: &str) -> Option<Principal> {
        let claims = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .ok()?
            .claims;
        let words = claims
            .scope
            .iter()
            .flat_map(|scope| scope.split_whitespace());
        let listed = claims.scopes.iter().flatten().map(String::as_str);
        let mut scopes: Vec<Scope> = words.chain(listed).filter_map(Scope::parse).collect();
        scopes.sort_by_key(|scope| scope.as_str());
        scopes.dedup();
        let streams = match claims.streams {
            Some(globs) => Some(
                globs
                    .iter()
                    .map(|glob| StreamPattern::parse(glob).ok())
                    .collect::<Option<Vec<_>>>()?,
            ),
            None => None,
        };
        let name = format!("jwt:{}", claims.sub.as_deref().unwrap_or("anonymous"));
        let valid_for = Duration::from_secs(claims.exp.saturating_add(self.validation.leeway));
        Some(Principal {
            expires_at: SystemTime::UNIX_EPOCH.checked_add(valid_for),
            ..Principal::new(name, scopes, streams)
        })
    }
}

/// Turns presented tokens into principals.
#[derive(Debug, Clone, Default)]
pub struct Authenticator {
    tokens: Vec<([u8; 32], Principal)>,
    jwt: Option<JwtVerifier>,
}

impl Authenticator {
    /// From the full-access bearer token (if any), the scoped tokens and the JWT verifier.
    pub fn new(
        bearer_token: Option<&str>,
        tokens: &[StaticToken],
        jwt: Option<JwtVerifier>,
    ) -> Authenticator {
        let mut entries = Vec::with_capacity(tokens.len() + 1);
        if let Some(token) = bearer_token {
            entries.push((token_digest(token), Principal::full_access("bearer_token")));
        }
        for token in tokens {
            let principal = Principal::new(
                token.name.clone(),
                token.scopes.clone(),
                token.streams.clone(),
            );
            entries.push((token.sha256, principal));
        }
        Authenticator {
            tokens: entries,
            jwt,
        }
    }

    /// The principal for a presented token. Every configured token is compared, each in constant
    /// time, so the time taken says nothing about how close a guess was or which token matched.
    pub fn authenticate(&self, presented: &str) -> Option<Principal> {
        let digest = token_digest(presented);
        let mut found = None;
        for (expected, principal) in &self.tokens {
            let equal: bool = expected.ct_eq(&digest).into();
            if equal && found.is_none() {
                found = Some(principal);
            }
        }
        match (found, &self.jwt) {
            (Some(principal), _) => Some(principal.clone()),
            // A JWT has three dot-separated parts.
            (None, Some(jwt)) if presented.matches('.').count() == 2 => jwt.verify(presented),
            (None, _) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(name: &str) -> StreamName {
        StreamName::parse(name).unwrap()
    }

    #[test]
    fn tokens_map_to_their_principals() {
        let scoped = StaticToken {
            name: "orders-writer".into(),
            sha256: token_digest("s3cret"),
            scopes: vec![Scope::Publish],
            streams: Some(vec![StreamPattern::parse("orders.*").unwrap()]),
        };
        let auth = Authenticator::new(Some("root"), &[scoped], None);
        assert_eq!(auth.authenticate("root").unwrap().name, "bearer_token");
        let writer = auth.authenticate("s3cret").unwrap();
        assert!(writer.may(Scope::Publish, &stream("orders.eu")));
        assert!(!writer.may(Scope::Publish, &stream("payments")));
        assert!(!writer.may(Scope::Consume, &stream("orders.eu")));
        assert!(auth.authenticate("s3cre").is_none());
        assert!(auth.authenticate("").is_none());
    }
}
