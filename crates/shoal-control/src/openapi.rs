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
        api::set_version_options,
        api::rollback,
        api::list_deployments,
        api::get_deployment,
        api::deploy,
        api::set_traffic,
        api::set_scale,
        api::get_scale,
        api::fleet_scale,
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
        crate::dashboard::history,
        crate::dashboard::stream,
        api::status,
        api::leader,
        api::audit,
        crate::tokens::create_token,
        crate::tokens::list_tokens,
        crate::tokens::revoke_token,
        crate::tokens::whoami,
        crate::backups::create_backup,
    ),
    modifiers(&BearerAuth, &Uniform)
)]
struct ApiDoc;

/// What every operation of the router does alike, declared once: path
/// parameters are strings; every operation needs a bearer token (401
/// without a valid one, 403 with the wrong role); any request can be
/// malformed (400: a bad path parameter, query or body); operations with a
/// body refuse one that is too large (413) or not JSON (415); operations
/// naming something in their path may not find it (404); and every error
/// is `{"error": "…"}`.
struct Uniform;

impl utoipa::Modify for Uniform {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::path::{ParameterBuilder, ParameterIn};
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        use utoipa::openapi::security::SecurityRequirement;
        use utoipa::openapi::{ContentBuilder, Ref, Required, ResponseBuilder};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.schemas.insert(
            "Error".into(),
            ObjectBuilder::new()
                .property(
                    "error",
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .description(Some("What is wrong, and what to do about it.")),
                )
                .required("error")
                .into(),
        );
        let error = |description: &str| {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("Error")))
                        .build(),
                )
                .build()
        };
        for (path, item) in openapi.paths.paths.iter_mut() {
            let names: Vec<String> = path
                .split('/')
                .filter_map(|part| part.strip_prefix('{')?.strip_suffix('}'))
                .map(str::to_owned)
                .collect();
            let operations = [
                item.get.as_mut(),
                item.put.as_mut(),
                item.post.as_mut(),
                item.delete.as_mut(),
            ];
            for operation in operations.into_iter().flatten() {
                let parameters = operation.parameters.get_or_insert_with(Vec::new);
                for name in &names {
                    if !parameters
                        .iter()
                        .any(|p| &p.name == name && p.parameter_in == ParameterIn::Path)
                    {
                        parameters.push(
                            ParameterBuilder::new()
                                .name(name)
                                .parameter_in(ParameterIn::Path)
                                .required(Required::True)
                                .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
                                .build(),
                        );
                    }
                }
                operation.security.get_or_insert_with(|| {
                    vec![SecurityRequirement::new("bearer", Vec::<String>::new())]
                });
                let mut add = |code: &str, description: &str| {
                    operation
                        .responses
                        .responses
                        .entry(code.to_owned())
                        .or_insert_with(|| error(description).into());
                };
                add(
                    "400",
                    "the request is malformed: a path parameter, the query or the body",
                );
                add("401", "no token, or one that is unknown or revoked");
                add("403", "the token's role does not allow this");
                if !names.is_empty() {
                    add("404", "what the path names does not exist");
                }
                if operation.request_body.is_some() {
                    add("413", "the body is larger than the limit");
                    add("415", "the body is not of the declared content type");
                }
                // Documented error responses carry the error body.
                for (code, response) in operation.responses.responses.iter_mut() {
                    if (code.starts_with('4') || code.starts_with('5'))
                        && let utoipa::openapi::RefOr::T(r) = response
                        && r.content.is_empty()
                    {
                        let description = r.description.clone();
                        *response = error(&description).into();
                    }
                }
            }
        }
    }
}

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
