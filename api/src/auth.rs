//! Local validation of the auth-service's HS256 access tokens, and the scope a token grants.

use axum::extract::{FromRef, FromRequestParts};
use axum::http::request::Parts;
use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::scope::Scope;

/// The claims the auth-service puts in an access token.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub role: String,
    pub exp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub university_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub faculty_id: Option<i64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    SuperAdmin,
    Curator,
    Operator,
}

impl Role {
    fn parse(text: &str) -> Option<Self> {
        match text {
            "super_admin" => Some(Role::SuperAdmin),
            "curator" => Some(Role::Curator),
            "operator" => Some(Role::Operator),
            _ => None,
        }
    }
}

/// The authenticated caller.
#[derive(Clone, Debug)]
pub struct Principal {
    pub user_id: String,
    pub role: Role,
    pub scope: Scope,
}

impl Principal {
    pub fn require_super_admin(&self) -> Result<(), ApiError> {
        if self.role == Role::SuperAdmin {
            Ok(())
        } else {
            Err(ApiError::Forbidden)
        }
    }
}

/// Shortest HS256 secret accepted: RFC 7518 §3.2 asks for a key of at least the hash's size
/// (256 bits), and a shorter one can be guessed offline from any token.
pub const MIN_SECRET_BYTES: usize = 32;

/// Verifies tokens with the shared secret; only HS256 is accepted (so never `alg: none`).
#[derive(Clone)]
pub struct TokenVerifier {
    key: DecodingKey,
    /// The secret before the last rotation, still accepted while tokens signed with it live.
    previous_key: Option<DecodingKey>,
    validation: Validation,
}

impl TokenVerifier {
    /// `audience` empty: the `aud` claim is not checked (the auth-service's tokens carry none,
    /// and only it holds the secret). Otherwise every token must carry an `aud` naming one of
    /// them. `nbf`, when present, is honoured; both checks allow 5 s of clock skew.
    pub fn new(secret: &SecretString, audience: &[String]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        validation.validate_nbf = true;
        if audience.is_empty() {
            validation.validate_aud = false;
            validation.set_required_spec_claims(&["exp", "sub"]);
        } else {
            validation.set_audience(audience);
            validation.set_required_spec_claims(&["exp", "sub", "aud"]);
        }
        Self {
            key: DecodingKey::from_secret(secret.expose_secret().as_bytes()),
            previous_key: None,
            validation,
        }
    }

    /// Also accepts tokens signed with `previous` (a rotation: the auth-service signs with the
    /// new secret at once, and tokens it signed before stay valid until they expire).
    pub fn with_previous_secret(mut self, previous: Option<&SecretString>) -> Self {
        self.previous_key =
            previous.map(|secret| DecodingKey::from_secret(secret.expose_secret().as_bytes()));
        self
    }

    /// Requires every token to carry `iss` equal to `issuer` (`JWT_ISSUER`); `None` leaves
    /// `iss` unchecked.
    pub fn with_issuer(mut self, issuer: Option<&str>) -> Self {
        if let Some(issuer) = issuer {
            self.validation.set_issuer(&[issuer]);
            let mut required: Vec<String> = self
                .validation
                .required_spec_claims
                .iter()
                .cloned()
                .collect();
            required.push("iss".to_owned());
            self.validation.set_required_spec_claims(&required);
        }
        self
    }

    /// The claims of a token signed with the current secret or, failing its signature, the
    /// previous one.
    fn decode(&self, token: &str) -> jsonwebtoken::errors::Result<Claims> {
        let current = decode::<Claims>(token, &self.key, &self.validation);
        match (&current, &self.previous_key) {
            (Err(e), Some(previous))
                if *e.kind() == jsonwebtoken::errors::ErrorKind::InvalidSignature =>
            {
                decode::<Claims>(token, previous, &self.validation).map(|data| data.claims)
            }
            _ => current.map(|data| data.claims),
        }
    }

    /// Turns an `Authorization` header value into a principal: 401 for anything that is not a
    /// valid, unexpired token of ours, 403 for a valid token with a role we do not know.
    pub fn verify(&self, header: Option<&str>) -> Result<Principal, ApiError> {
        let header = header.ok_or(ApiError::Unauthorized("missing bearer token"))?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(ApiError::Unauthorized(
                "authorization header is not a bearer token",
            ))?;
        let claims = self.decode(token).map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => {
                ApiError::Unauthorized("token has expired")
            }
            jsonwebtoken::errors::ErrorKind::InvalidSignature => {
                ApiError::Unauthorized("token signature is invalid")
            }
            jsonwebtoken::errors::ErrorKind::ImmatureSignature => {
                ApiError::Unauthorized("token is not valid yet (nbf)")
            }
            jsonwebtoken::errors::ErrorKind::InvalidAudience => {
                ApiError::Unauthorized("token is for another audience (aud)")
            }
            jsonwebtoken::errors::ErrorKind::MissingRequiredClaim(claim) if claim == "aud" => {
                ApiError::Unauthorized("token has no audience (aud); JWT_AUDIENCE requires one")
            }
            jsonwebtoken::errors::ErrorKind::InvalidIssuer => {
                ApiError::Unauthorized("token is from another issuer (iss)")
            }
            jsonwebtoken::errors::ErrorKind::MissingRequiredClaim(claim) if claim == "iss" => {
                ApiError::Unauthorized("token has no issuer (iss); JWT_ISSUER requires one")
            }
            jsonwebtoken::errors::ErrorKind::InvalidClaimFormat(_) => {
                ApiError::Unauthorized("token has a claim of the wrong type (exp, nbf, iss)")
            }
            _ => ApiError::Unauthorized("token is malformed or not signed with HS256"),
        })?;
        let role = Role::parse(&claims.role).ok_or(ApiError::Forbidden)?;
        let scope = match role {
            Role::SuperAdmin => Scope::All,
            Role::Curator | Role::Operator => match claims.university_id.map(i32::try_from) {
                Some(Ok(id)) => Scope::University(id),
                _ => Scope::Nothing,
            },
        };
        Ok(Principal {
            user_id: claims.sub,
            role,
            scope,
        })
    }
}

/// Signs a token the way the auth-service does; `api token` and the tests use it.
pub fn sign(
    secret: &SecretString,
    claims: &impl Serialize,
) -> Result<String, jsonwebtoken::errors::Error> {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.expose_secret().as_bytes()),
    )
}

impl<S> FromRequestParts<S> for Principal
where
    TokenVerifier: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .map(|value| {
                value
                    .to_str()
                    .map_err(|_| ApiError::Unauthorized("authorization header is not text"))
            })
            .transpose()?;
        TokenVerifier::from_ref(state).verify(header)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> SecretString {
        SecretString::from("test-secret-test-secret".to_owned())
    }

    fn claims(role: &str, university_id: Option<i64>, exp: i64) -> Claims {
        Claims {
            sub: "7".into(),
            role: role.into(),
            exp,
            university_id,
            branch_id: None,
            faculty_id: None,
        }
    }

    fn in_an_hour() -> i64 {
        chrono::Utc::now().timestamp() + 3600
    }

    fn bearer(token: &str) -> String {
        format!("Bearer {token}")
    }

    #[test]
    fn roles_map_to_scopes() {
        let verifier = TokenVerifier::new(&secret(), &[]);
        let admin = sign(&secret(), &claims("super_admin", None, in_an_hour())).unwrap();
        assert_eq!(
            verifier.verify(Some(&bearer(&admin))).unwrap().scope,
            Scope::All
        );
        let curator = sign(&secret(), &claims("curator", Some(3), in_an_hour())).unwrap();
        assert_eq!(
            verifier.verify(Some(&bearer(&curator))).unwrap().scope,
            Scope::University(3)
        );
        let operator = sign(&secret(), &claims("operator", None, in_an_hour())).unwrap();
        assert_eq!(
            verifier.verify(Some(&bearer(&operator))).unwrap().scope,
            Scope::Nothing
        );
        let unknown = sign(&secret(), &claims("superadmin", None, in_an_hour())).unwrap();
        assert!(matches!(
            verifier.verify(Some(&bearer(&unknown))),
            Err(ApiError::Forbidden)
        ));
    }

    #[test]
    fn tokens_that_are_not_ours_are_unauthorized() {
        let verifier = TokenVerifier::new(&secret(), &[]);
        let expired = sign(&secret(), &claims("super_admin", None, 1_000)).unwrap();
        let foreign = sign(
            &SecretString::from("another-secret-entirely".to_owned()),
            &claims("super_admin", None, in_an_hour()),
        )
        .unwrap();
        for header in [
            None,
            Some("Basic abc".to_owned()),
            Some("Bearer ".to_owned()),
            Some(bearer("not.a.jwt")),
            Some(bearer(&expired)),
            Some(bearer(&foreign)),
        ] {
            assert!(
                matches!(
                    verifier.verify(header.as_deref()),
                    Err(ApiError::Unauthorized(_))
                ),
                "{header:?}"
            );
        }
    }
}

#[cfg(test)]
mod claim_tests {
    use super::*;

    fn secret() -> SecretString {
        SecretString::from("unit-test-secret-0123456789".to_owned())
    }

    /// Signs arbitrary claims, for tokens the auth-service might send.
    fn token(claims: serde_json::Value) -> String {
        let key = EncodingKey::from_secret(secret().expose_secret().as_bytes());
        format!(
            "Bearer {}",
            encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap()
        )
    }

    fn now() -> i64 {
        chrono::Utc::now().timestamp()
    }

    fn verdict(verifier: &TokenVerifier, claims: serde_json::Value) -> Result<(), &'static str> {
        match verifier.verify(Some(&token(claims))) {
            Ok(_) => Ok(()),
            Err(ApiError::Unauthorized(why)) => Err(why),
            Err(other) => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn nbf_in_the_future_is_refused_and_in_the_past_accepted() {
        let verifier = TokenVerifier::new(&secret(), &[]);
        let base = serde_json::json!({"sub": "1", "role": "super_admin", "exp": now() + 600});
        let mut later = base.clone();
        later["nbf"] = (now() + 120).into();
        assert_eq!(
            verdict(&verifier, later),
            Err("token is not valid yet (nbf)")
        );
        let mut earlier = base.clone();
        earlier["nbf"] = (now() - 10).into();
        assert_eq!(verdict(&verifier, earlier), Ok(()));
        assert_eq!(verdict(&verifier, base), Ok(()));
    }

    /// GHSA-h395-gr6q-cpjc (CVE-2026-25537): jsonwebtoken 9 skipped the `nbf` check when the
    /// claim was a string, so a token "not valid before" the year 5138 was accepted today.
    #[test]
    fn nbf_given_as_a_string_is_refused() {
        let verifier = TokenVerifier::new(&secret(), &[]);
        let base = serde_json::json!({"sub": "1", "role": "super_admin", "exp": now() + 600});
        for nbf in [
            serde_json::json!("99999999999"),
            serde_json::json!((now() - 10).to_string()),
            serde_json::json!(99_999_999_999_i64),
        ] {
            let mut claims = base.clone();
            claims["nbf"] = nbf.clone();
            assert!(
                verdict(&verifier, claims).is_err(),
                "nbf {nbf} was accepted"
            );
        }
    }

    #[test]
    fn without_an_expected_audience_aud_is_not_checked_and_with_one_it_is_required() {
        let claims = |aud: Option<serde_json::Value>| {
            let mut claims =
                serde_json::json!({"sub": "1", "role": "super_admin", "exp": now() + 600});
            if let Some(aud) = aud {
                claims["aud"] = aud;
            }
            claims
        };
        let open = TokenVerifier::new(&secret(), &[]);
        assert_eq!(verdict(&open, claims(None)), Ok(()));
        assert_eq!(verdict(&open, claims(Some("anything".into()))), Ok(()));

        let strict = TokenVerifier::new(&secret(), &["participants-api".to_owned()]);
        assert_eq!(
            verdict(&strict, claims(Some("participants-api".into()))),
            Ok(())
        );
        assert_eq!(
            verdict(
                &strict,
                claims(Some(serde_json::json!(["other", "participants-api"])))
            ),
            Ok(())
        );
        assert_eq!(
            verdict(&strict, claims(Some("other-service".into()))),
            Err("token is for another audience (aud)")
        );
        assert_eq!(
            verdict(&strict, claims(None)),
            Err("token has no audience (aud); JWT_AUDIENCE requires one")
        );
    }
}

#[cfg(test)]
mod rotation_and_issuer_tests {
    use super::*;

    fn current() -> SecretString {
        SecretString::from("current-secret-0123456789abcdef-0123".to_owned())
    }

    fn previous() -> SecretString {
        SecretString::from("previous-secret-0123456789abcdef-012".to_owned())
    }

    fn signed(secret: &SecretString, claims: serde_json::Value) -> String {
        let key = EncodingKey::from_secret(secret.expose_secret().as_bytes());
        format!(
            "Bearer {}",
            encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap()
        )
    }

    fn claims(extra: serde_json::Value) -> serde_json::Value {
        let mut claims = serde_json::json!({"sub": "1", "role": "super_admin",
            "exp": chrono::Utc::now().timestamp() + 600});
        if let serde_json::Value::Object(extra) = extra {
            claims.as_object_mut().unwrap().extend(extra);
        }
        claims
    }

    fn refusal(verifier: &TokenVerifier, token: &str) -> Option<&'static str> {
        match verifier.verify(Some(token)) {
            Ok(_) => None,
            Err(ApiError::Unauthorized(why)) => Some(why),
            Err(other) => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn during_a_rotation_tokens_of_the_previous_secret_are_still_accepted() {
        let rotating = TokenVerifier::new(&current(), &[]).with_previous_secret(Some(&previous()));
        let old_token = signed(&previous(), claims(serde_json::json!({})));
        let new_token = signed(&current(), claims(serde_json::json!({})));
        assert_eq!(refusal(&rotating, &old_token), None);
        assert_eq!(refusal(&rotating, &new_token), None);
        // An expired token of the previous secret says so, like one of the current secret.
        let expired = signed(&previous(), claims(serde_json::json!({"exp": 1_000})));
        assert_eq!(refusal(&rotating, &expired), Some("token has expired"));
        let foreign = SecretString::from("someone-elses-secret-0123456789abcdef".to_owned());
        assert_eq!(
            refusal(&rotating, &signed(&foreign, claims(serde_json::json!({})))),
            Some("token signature is invalid")
        );

        // Once the rotation is over, the previous secret's tokens are refused.
        let rotated = TokenVerifier::new(&current(), &[]).with_previous_secret(None);
        assert_eq!(
            refusal(&rotated, &old_token),
            Some("token signature is invalid")
        );
    }

    #[test]
    fn with_an_issuer_set_iss_must_match_and_without_one_it_is_not_checked() {
        let open = TokenVerifier::new(&current(), &[]).with_issuer(None);
        let strict = TokenVerifier::new(&current(), &[]).with_issuer(Some("auth-service"));
        let ours = signed(
            &current(),
            claims(serde_json::json!({"iss": "auth-service"})),
        );
        let theirs = signed(
            &current(),
            claims(serde_json::json!({"iss": "other-service"})),
        );
        let none = signed(&current(), claims(serde_json::json!({})));
        let a_number = signed(&current(), claims(serde_json::json!({"iss": 42})));
        for token in [&ours, &theirs, &none] {
            assert_eq!(refusal(&open, token), None);
        }
        assert_eq!(refusal(&strict, &ours), None);
        assert_eq!(
            refusal(&strict, &theirs),
            Some("token is from another issuer (iss)")
        );
        assert_eq!(
            refusal(&strict, &none),
            Some("token has no issuer (iss); JWT_ISSUER requires one")
        );
        assert!(refusal(&strict, &a_number).is_some());
    }
}
