//! The tokens of the control planes a test started, so requests and CLI
//! calls to them authenticate as an operator would: tests register a
//! control plane's admin token once ([`remember_admin_token`]), and
//! [`crate::HttpClient`] and [`crate::cli_json`] present it to any URL
//! under that control plane's base. Tests of authentication itself send
//! their own headers ([`crate::HttpClient::send_as`]).

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

static ADMIN: Mutex<BTreeMap<String, String>> = Mutex::new(BTreeMap::new());
static FLEET: Mutex<BTreeMap<String, String>> = Mutex::new(BTreeMap::new());

/// The `host:port` of `url`, or of its first member when it names several
/// members of one control plane (`http://a:1,http://b:2`).
fn base(url: &str) -> String {
    let url = url.split(',').next().unwrap_or(url);
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host = rest.split('/').next().unwrap_or(rest);
    host.to_owned()
}

/// Remembers `token` as the admin token of the control plane at `url`
/// (of each member, when it names several).
pub fn remember_admin_token(url: &str, token: &str) {
    let mut admin = ADMIN.lock().unwrap_or_else(PoisonError::into_inner);
    for member in url.split(',') {
        admin.insert(base(member), token.to_owned());
    }
}

/// The admin token of the control plane `url` points into, if a test
/// registered one.
pub fn admin_token_for(url: &str) -> Option<String> {
    ADMIN
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&base(url))
        .cloned()
}

/// A `fleet` token of the control plane at `control` (created through the
/// CLI `program` once, then reused): what replicas and gateways present.
pub fn fleet_token(program: &std::path::Path, control: &str) -> String {
    if let Some(t) = FLEET
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&base(control))
    {
        return t.clone();
    }
    let created = crate::cli_json(
        program,
        control,
        &[
            "token",
            "create",
            "--name",
            &format!("fleet-{}", rand_suffix()),
            "--role",
            "fleet",
        ],
    );
    let token = created["token"].as_str().expect("a token").to_owned();
    FLEET
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(base(control), token.clone());
    token
}

fn rand_suffix() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{:x}{nanos:x}", std::process::id())
}
