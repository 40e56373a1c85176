//! Who may do what: token roles, the permission each endpoint needs, and
//! the documents of `/api/v1/tokens`.
//!
//! Tokens are random secrets shown once; the control plane stores only
//! their SHA-256 ([`token_hash`]). A role grants permissions:
//!
//! | role       | read | deploy | fleet | admin |
//! |------------|------|--------|-------|-------|
//! | `viewer`   | ✓    |        |       |       |
//! | `deployer` | ✓    | ✓      |       |       |
//! | `fleet`    |      |        | ✓     |       |
//! | `admin`    | ✓    | ✓      | ✓     | ✓     |
//!
//! `fleet` is what replicas and gateways need (register, heartbeat,
//! desired state, watch streams, routing, manifests and chunks) and
//! nothing else: a leaked replica token cannot deploy, and a viewer
//! cannot download model weights.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use crate::UnixMillis;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads: models, deployments, rollouts, status, audit log.
    Viewer,
    /// Reads, plus push, deploy, traffic, rollout promote/abort, rollback.
    Deployer,
    /// Everything, including tokens and backups.
    Admin,
    /// Replicas and gateways: registration, heartbeats, desired state,
    /// routing, artifacts.
    Fleet,
}

/// What an endpoint needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Permission {
    /// Any valid token (who am I).
    Any,
    /// Read the registry and the fleet's state.
    Read,
    /// Change what the fleet serves.
    Deploy,
    /// Act as a replica or gateway.
    Fleet,
    /// Manage tokens, backups and restores.
    Admin,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 4] = [Role::Viewer, Role::Deployer, Role::Admin, Role::Fleet];

    /// The role's name, as in JSON and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Deployer => "deployer",
            Role::Admin => "admin",
            Role::Fleet => "fleet",
        }
    }

    /// True when the role grants `permission`.
    pub fn allows(self, permission: Permission) -> bool {
        match self {
            _ if permission == Permission::Any => true,
            Role::Admin => true,
            Role::Viewer => permission == Permission::Read,
            Role::Deployer => matches!(permission, Permission::Read | Permission::Deploy),
            Role::Fleet => permission == Permission::Fleet,
        }
    }

    /// The roles that grant `permission`, in words ("deployer or admin").
    pub fn granting(permission: Permission) -> String {
        let roles: Vec<&str> = Role::ALL
            .iter()
            .filter(|r| r.allows(permission))
            .map(|r| r.as_str())
            .collect();
        match roles.as_slice() {
            [only] => (*only).to_owned(),
            [init @ .., last] => format!("{} or {last}", init.join(", ")),
            [] => String::new(),
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Role, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown role {s:?}: one of viewer, deployer, admin, fleet"))
    }
}

/// The SHA-256 (hex) of a token: what is stored and compared.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A new random token: `shoal_` and 256 random bits in hex.
pub fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("shoal_{}", hex::encode(bytes))
}

/// A token as listed (never the secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TokenInfo {
    /// Its name, as the audit log shows it.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// When it was created.
    pub created_at: UnixMillis,
    /// Who created it.
    pub created_by: String,
}

/// Body of `POST /api/v1/tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    /// Name (`[A-Za-z0-9._-]`, at most 128 bytes), unique.
    pub name: String,
    /// Role.
    pub role: Role,
}

/// Answer of `POST /api/v1/tokens`: the only time the secret is shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CreatedToken {
    /// Name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// The secret: `Authorization: Bearer TOKEN`.
    pub token: String,
}

/// Answer of `GET /api/v1/auth/whoami`: who the presented token is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Whoami {
    /// Token name.
    pub name: String,
    /// Its role.
    pub role: Role,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_grant_what_the_table_says() {
        use Permission::*;
        let table = [
            (Role::Viewer, [true, false, false, false]),
            (Role::Deployer, [true, true, false, false]),
            (Role::Fleet, [false, false, true, false]),
            (Role::Admin, [true, true, true, true]),
        ];
        for (role, grants) in table {
            for (p, granted) in [Read, Deploy, Fleet, Admin].into_iter().zip(grants) {
                assert_eq!(role.allows(p), granted, "{role} {p:?}");
            }
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
        }
        assert_eq!(Role::granting(Deploy), "deployer or admin");
        assert_eq!(Role::granting(Admin), "admin");
        assert_eq!(Role::granting(Read), "viewer, deployer or admin");
        assert!("root".parse::<Role>().unwrap_err().contains("viewer"));
    }

    #[test]
    fn tokens_are_random_and_only_their_hash_is_kept() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert!(a.starts_with("shoal_") && a.len() == 6 + 64, "{a}");
        assert_eq!(token_hash(&a), token_hash(&a));
        assert_eq!(token_hash(&a).len(), 64);
        assert!(!token_hash(&a).contains(&a[6..]));
    }
}
