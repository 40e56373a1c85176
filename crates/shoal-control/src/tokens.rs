//! `/api/v1/tokens` (admin) and `/api/v1/auth/whoami` (any token): create
//! a token (its secret is in this answer only), list them, revoke one.

use std::sync::Arc;

use axum::Extension;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use shoal_api::auth::{CreatedToken, NewToken, Role, TokenInfo, Whoami, new_token, token_hash};
use shoal_http::extract::{Json, Path};
use shoal_http::{ApiError, json_response};
use shoal_registry::{Audit, TokenRecord};

use crate::Control;
use crate::api::registry_error;
use crate::auth::Caller;

/// Create a token; the answer is the only time its secret is shown.
#[utoipa::path(post, path = "/api/v1/tokens", request_body = NewToken, responses((status = 201, body = CreatedToken), (status = 400, description = "invalid name"), (status = 401, description = "no valid token"), (status = 403, description = "not an admin token"), (status = 409, description = "the name is taken")), security(("bearer" = [])))]
pub(crate) async fn create_token(
    State(control): State<Arc<Control>>,
    Extension(caller): Extension<Caller>,
    Json(new): Json<NewToken>,
) -> Result<Response, ApiError> {
    // Token names follow model names: safe in logs, URLs and labels.
    shoal_core::ModelName::new(&new.name)
        .map_err(|e| ApiError::bad_request(format!("token name: {e}")))?;
    let token = new_token();
    control
        .store
        .create_token(
            TokenRecord::new(&new.name, new.role, token_hash(&token), &caller.name),
            Audit::by(&caller.name, "created"),
        )
        .await
        .map_err(registry_error)?;
    Ok(json_response(
        StatusCode::CREATED,
        &CreatedToken {
            name: new.name,
            role: new.role,
            token,
        },
    ))
}

/// Every token (names, roles, who made them; never the secrets).
#[utoipa::path(get, path = "/api/v1/tokens", responses((status = 200, body = Vec<TokenInfo>), (status = 401, description = "no valid token"), (status = 403, description = "not an admin token")), security(("bearer" = [])))]
pub(crate) async fn list_tokens(State(control): State<Arc<Control>>) -> Result<Response, ApiError> {
    let tokens = control.store.list_tokens().await.map_err(registry_error)?;
    Ok(json_response(StatusCode::OK, &tokens))
}

/// Revoke a token: it stops working at once, on every control plane.
#[utoipa::path(delete, path = "/api/v1/tokens/{name}", params(("name" = String, Path, description = "token name")), responses((status = 200, description = "revoked"), (status = 401, description = "no valid token"), (status = 403, description = "not an admin token"), (status = 404, description = "no such token"), (status = 409, description = "the last admin token")), security(("bearer" = [])))]
pub(crate) async fn revoke_token(
    State(control): State<Arc<Control>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let tokens = control.store.list_tokens().await.map_err(registry_error)?;
    let Some(token) = tokens.iter().find(|t| t.name == name) else {
        return Err(ApiError::not_found(format!(
            "no token named {name:?}; `shoal token list` shows them"
        )));
    };
    if token.role == Role::Admin && tokens.iter().filter(|t| t.role == Role::Admin).count() == 1 {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "{name:?} is the last admin token; create another admin token first, or nobody \
                 could manage tokens again"
            ),
        ));
    }
    control
        .store
        .revoke_token(&name, Audit::by(&caller.name, "revoked"))
        .await
        .map_err(registry_error)?;
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({"revoked": name}),
    ))
}

/// Who the presented token is: lets a client check its token, and
/// replicas check a peer's.
#[utoipa::path(get, path = "/api/v1/auth/whoami", responses((status = 200, body = Whoami), (status = 401, description = "no valid token")), security(("bearer" = [])))]
pub(crate) async fn whoami(Extension(caller): Extension<Caller>) -> Response {
    json_response(
        StatusCode::OK,
        &Whoami {
            name: caller.name,
            role: caller.role,
        },
    )
}
