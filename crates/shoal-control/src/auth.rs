//! Who is calling: every `/api/v1/` route but the OpenAPI document needs a
//! bearer token whose role grants the route's [`Permission`]. Tokens live
//! in the registry as SHA-256 hashes and are looked up on every request,
//! so a revoked token stops working at once on every control plane that
//! shares the registry. The caller's token name is what the audit log
//! records.
//!
//! The dashboard signs in with the same tokens: it trades one for a
//! session cookie ([`crate::dashboard`]) that stands for the token's hash,
//! so a revoked token ends its sessions too. A change made with a session
//! must carry the dashboard's header (no other site can send it).
//!
//! At its first start (no token in the registry) a control plane creates
//! an `admin` token and writes it to `DATA_DIR/admin.token` (mode 0600).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use shoal_api::auth::{Permission, Role, new_token, token_hash};
use shoal_client::secret;
use shoal_http::ApiError;
use shoal_registry::{Audit, RegistryStore, TokenRecord};

use crate::Control;

/// The caller of a request, as the route's guard found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Token name (what the audit log records).
    pub name: String,
    /// Its role.
    pub role: Role,
}

/// Name of the token a control plane creates at its first start.
pub const FIRST_ADMIN: &str = "admin";

/// The file the first admin token is written to.
pub fn admin_token_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.token")
}

/// Creates the first admin token when the registry has none: written to
/// `DATA_DIR/admin.token` first, then stored, so a crash in between leaves
/// a file the next start adopts rather than a token nobody holds.
pub async fn ensure_admin_token(store: &dyn RegistryStore, data_dir: &Path) -> anyhow::Result<()> {
    if !store.list_tokens().await?.is_empty() {
        return Ok(());
    }
    let path = admin_token_path(data_dir);
    let token = match secret::read(&path) {
        Ok(token) => token,
        Err(_) => {
            let token = new_token();
            secret::write(&path, &token)
                .with_context(|| format!("cannot write the admin token to {}", path.display()))?;
            token
        }
    };
    store
        .create_token(
            TokenRecord::new(
                FIRST_ADMIN,
                Role::Admin,
                token_hash(&token),
                "control plane",
            ),
            Audit::by("control plane", "first start: the admin token"),
        )
        .await?;
    tracing::info!(
        file = %path.display(),
        "created the first admin token; the CLI reads it from .shoal/admin.token under the \
         working directory, or pass it with --token / SHOAL_TOKEN"
    );
    Ok(())
}

/// What a route needs, and the control plane to check it against.
#[derive(Clone)]
pub(crate) struct Guard {
    pub(crate) control: Arc<Control>,
    pub(crate) permission: Permission,
}

fn unauthorized(message: String) -> Response {
    let mut response = ApiError::new(StatusCode::UNAUTHORIZED, message).into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"shoal\""),
    );
    response
}

/// How a request proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Credential {
    /// `Authorization: Bearer TOKEN` (the CLI, replicas, gateways, scripts).
    Bearer,
    /// The dashboard's session cookie.
    Session,
    /// Authentication is off.
    None,
}

/// Finds the caller of `headers` — by its bearer token, else by the
/// dashboard's session cookie — or the response refusing it: 401 for no
/// credential or an unknown one, 403 for a role without `permission`.
pub(crate) async fn authenticate(
    control: &Control,
    headers: &http::HeaderMap,
    permission: Permission,
) -> Result<(Caller, Credential), Response> {
    if !control.config.auth {
        let caller = Caller {
            name: "anonymous".into(),
            role: Role::Admin,
        };
        return Ok((caller, Credential::None));
    }
    let (hash, credential) = match shoal_http::bearer(headers) {
        Ok(Some(token)) => (token_hash(token), Credential::Bearer),
        Ok(None) => match control.sessions.token_hash(headers) {
            Some(hash) => (hash, Credential::Session),
            None => {
                return Err(unauthorized(format!(
                    "this needs a token with role {}: pass --token or set SHOAL_TOKEN (the CLI \
                     also reads .shoal/admin.token under its working directory), or send \
                     `Authorization: Bearer TOKEN`",
                    Role::granting(permission)
                )));
            }
        },
        Err(why) => return Err(unauthorized(why)),
    };
    let info = match control.store.token_by_hash(&hash).await {
        Ok(Some(info)) => info,
        Ok(None) => {
            return Err(unauthorized(
                "the token is not valid: unknown or revoked; ask an admin for a new one \
                 (shoal token create)"
                    .into(),
            ));
        }
        Err(e) => {
            return Err(ApiError::internal(format!("token lookup: {e}")).into_response());
        }
    };
    if !info.role.allows(permission) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "token {:?} has role {}; this needs {}",
                info.name,
                info.role,
                Role::granting(permission)
            ),
        )
        .into_response());
    }
    let caller = Caller {
        name: info.name,
        role: info.role,
    };
    Ok((caller, credential))
}

/// Middleware: lets the request through with its [`Caller`] in the
/// extensions, or answers 401/403.
pub(crate) async fn require(
    State(guard): State<Guard>,
    mut request: Request,
    next: Next,
) -> Response {
    match authenticate(&guard.control, request.headers(), guard.permission).await {
        Ok((_, Credential::Session))
            if !request.method().is_safe()
                && !request
                    .headers()
                    .contains_key(crate::dashboard::CSRF_HEADER) =>
        {
            // A cookie travels with requests other sites make; a custom
            // header cannot be sent cross-site without a CORS grant.
            ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "a change made with the dashboard's session must carry the {} header",
                    crate::dashboard::CSRF_HEADER
                ),
            )
            .into_response()
        }
        Ok((caller, _)) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(refused) => refused,
    }
}
