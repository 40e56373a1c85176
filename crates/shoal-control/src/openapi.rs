//! The OpenAPI document served at `/api/v1/openapi.json`, generated from
//! the handlers' annotations and the `shoal-api` types, so it cannot drift
//! from the code.

use utoipa::OpenApi;

use crate::api;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Shoal control plane",
        description = "Registry, artifacts, deployments and fleet of Shoal."
    ),
    paths(
        api::upload_artifact,
        api::get_manifest,
        api::get_chunk,
        api::list_models,
        api::get_model,
        api::create_version,
        api::get_version,
        api::rollback,
        api::list_deployments,
        api::get_deployment,
        api::deploy,
        api::set_traffic,
        api::get_rollout,
        api::promote_rollout,
        api::abort_rollout,
        api::gateway_report,
        api::register,
        api::deregister,
        api::heartbeat,
        api::desired,
        api::watch,
        api::routing,
        api::watch_routing,
        api::status,
        api::audit,
        crate::tokens::create_token,
        crate::tokens::list_tokens,
        crate::tokens::revoke_token,
        crate::tokens::whoami,
    ),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

/// Declares the bearer-token scheme every guarded operation uses.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The document.
pub(crate) fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}
