//! The conformance suite every [`RegistryStore`] must pass:
//! `suite::test_all(&store).await` on a fresh, empty store. Each
//! implementation's tests call it, so all of them behave the same.

use shoal_api::deploy::{Deployment, RolloutState, RolloutView, Strategy, TrafficTarget};
use shoal_api::fleet::Registration;
use shoal_api::registry::VersionStatus;

use crate::{
    Audit, Fence, Precondition, RegistryError, RegistryStore, StoredDeployment, TokenRecord,
    VersionDraft,
};

fn draft(sha: char) -> VersionDraft {
    VersionDraft {
        sha256: sha.to_string().repeat(64),
        size: 100,
        ..VersionDraft::default()
    }
}

fn who() -> Audit {
    Audit::by("suite", "test")
}

/// Runs every check against an empty `store`.
pub async fn test_all(store: &dyn RegistryStore) {
    versions_number_and_conflict(store).await;
    statuses_and_last_known_good(store).await;
    deployments_bump_the_revision(store).await;
    replicas_register_and_leave(store).await;
    tokens_are_found_by_hash_until_revoked(store).await;
    audit_log_records_every_mutation(store).await;
    the_revision_advances_but_never_goes_back(store).await;
    one_lease_whose_terms_fence_deposed_leaders(store).await;
    conditional_writes_refuse_a_changed_deployment(store).await;
    heartbeats_are_shared_newest_last(store).await;
    options_change_and_bump_the_revision(store).await;
}

fn plain(model: &str) -> StoredDeployment {
    StoredDeployment {
        deployment: Deployment {
            placement: None,
            scale: None,
            model: model.into(),
            targets: vec![TrafficTarget {
                version: "1".into(),
                weight: 100,
            }],
            regions: None,
            shadow: None,
            split_header: None,
            warm: Vec::new(),
            rollout: None,
            revision: 0,
            updated_at: 0,
        },
        controller: serde_json::Value::Null,
    }
}

async fn one_lease_whose_terms_fence_deposed_leaders(store: &dyn RegistryStore) {
    use std::time::Duration;
    let long = Duration::from_secs(600);
    let a = store.campaign("a", "1", "a:1", long).await.unwrap();
    assert!(a.held_by("a", "1"), "{a:?}");
    let term = a.term;
    assert!(term >= 1);
    // Another candidate finds it held; the holder renews in the same term.
    let b = store.campaign("b", "1", "b:1", long).await.unwrap();
    assert!(
        b.held_by("a", "1") && !b.held_by("b", "1") && b.term == term,
        "{b:?}"
    );
    assert_eq!(
        store.campaign("a", "1", "a:1", long).await.unwrap().term,
        term
    );
    // A restarted a (another process) waits for the lease of the one it
    // replaces to lapse.
    let restarted = store.campaign("a", "2", "a:1", long).await.unwrap();
    assert!(!restarted.held_by("a", "2") && restarted.held_by("a", "1"));
    let (lease, members) = store.leadership(long).await.unwrap();
    assert_eq!(
        (lease.holder.as_str(), lease.address.as_str()),
        ("a", "a:1")
    );
    let ids: Vec<&str> = members.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["a", "b"]);
    assert!(members.iter().all(|m| m.last_seen > 0));

    // The leader's fenced write goes through.
    let fence = |holder: &str, term: u64| Precondition {
        revision: None,
        fence: Some(Fence {
            holder: holder.into(),
            term,
        }),
    };
    store
        .put_deployment_if(plain("fenced"), &fence("a", term), "deploy", who())
        .await
        .unwrap();
    // A lease that lapses (here: renewed for no time) is taken in the
    // next term; the deposed holder's writes are refused from then on.
    store
        .campaign("a", "1", "a:1", Duration::ZERO)
        .await
        .unwrap();
    let b = store.campaign("b", "1", "b:1", long).await.unwrap();
    assert!(b.held_by("b", "1") && b.term == term + 1, "{b:?}");
    let before = store.revision().await.unwrap();
    match store
        .put_deployment_if(plain("fenced"), &fence("a", term), "deploy", who())
        .await
    {
        Err(RegistryError::Fenced(why)) => assert!(why.contains("no longer the leader"), "{why}"),
        other => panic!("a deposed leader wrote: {other:?}"),
    }
    assert_eq!(store.revision().await.unwrap(), before, "nothing written");
    store
        .create_version("fenced", draft('f'), who())
        .await
        .unwrap();
    let stale_fence = Fence {
        holder: "a".into(),
        term,
    };
    assert!(matches!(
        store
            .set_status_if(
                "fenced",
                "1",
                VersionStatus::Production,
                false,
                Some(&stale_fence),
                who()
            )
            .await,
        Err(RegistryError::Fenced(_))
    ));
    assert!(matches!(
        store
            .note("leader.elected", "a", Some(&stale_fence), who())
            .await,
        Err(RegistryError::Fenced(_))
    ));
    let kept = store.get_version("fenced", "1").await.unwrap().unwrap();
    assert_eq!(kept.status, VersionStatus::Registered);
    let current = Fence {
        holder: "b".into(),
        term: term + 1,
    };
    store
        .set_status_if(
            "fenced",
            "1",
            VersionStatus::Production,
            false,
            Some(&current),
            who(),
        )
        .await
        .unwrap();
    store
        .note("leader.elected", "b", Some(&current), who())
        .await
        .unwrap();
    let log = store.audit_log(0, 10_000).await.unwrap();
    let elected: Vec<&str> = log
        .iter()
        .filter(|e| e.action == "leader.elected")
        .map(|e| e.target.as_str())
        .collect();
    assert_eq!(elected, ["b"], "only the current leader's note is kept");
    // A holder that resigns hands over at once, in a new term.
    store.resign("b", "1").await.unwrap();
    let a = store.campaign("a", "1", "a:2", long).await.unwrap();
    assert!(
        a.held_by("a", "1") && a.term == term + 2 && a.address == "a:2",
        "{a:?}"
    );
    store.resign("a", "1").await.unwrap();
    // Resigning a lease one does not hold changes nothing.
    store.campaign("b", "1", "b:1", long).await.unwrap();
    store.resign("a", "1").await.unwrap();
    assert!(store.leadership(long).await.unwrap().0.held_by("b", "1"));
    store.resign("b", "1").await.unwrap();
}

async fn conditional_writes_refuse_a_changed_deployment(store: &dyn RegistryStore) {
    let absent = Precondition {
        revision: Some(0),
        fence: None,
    };
    let first = store
        .put_deployment_if(plain("cas"), &absent, "deploy", who())
        .await
        .unwrap();
    // A second "first deploy" lost the race.
    assert!(matches!(
        store
            .put_deployment_if(plain("cas"), &absent, "deploy", who())
            .await,
        Err(RegistryError::Stale(_))
    ));
    let read = Precondition {
        revision: Some(first),
        fence: None,
    };
    let second = store
        .put_deployment_if(plain("cas"), &read, "deploy", who())
        .await
        .unwrap();
    // Another write based on the same read is refused and changes nothing.
    match store
        .put_deployment_if(plain("cas"), &read, "deploy", who())
        .await
    {
        Err(RegistryError::Stale(why)) => assert!(why.contains("changed meanwhile"), "{why}"),
        other => panic!("a stale write went through: {other:?}"),
    }
    let stored = store.get_deployment("cas").await.unwrap().unwrap();
    assert_eq!(stored.deployment.revision, second);
    assert_eq!(store.revision().await.unwrap(), second);
}

async fn heartbeats_are_shared_newest_last(store: &dyn RegistryStore) {
    assert!(store.heartbeats_after(0).await.unwrap().is_empty());
    store.put_heartbeat("r1", "{\"n\":1}").await.unwrap();
    store.put_heartbeat("r2", "{\"n\":2}").await.unwrap();
    store.put_heartbeat("r1", "{\"n\":3}").await.unwrap();
    let all = store.heartbeats_after(0).await.unwrap();
    let seen: Vec<(&str, &str)> = all
        .iter()
        .map(|h| (h.replica.as_str(), h.body.as_str()))
        .collect();
    assert_eq!(seen, [("r2", "{\"n\":2}"), ("r1", "{\"n\":3}")]);
    assert!(all.iter().all(|h| (-1000..60_000).contains(&h.age_ms)));
    let later = store.heartbeats_after(all[0].seq).await.unwrap();
    assert_eq!(later.len(), 1);
    assert!(store.heartbeats_after(all[1].seq).await.unwrap().is_empty());
}

async fn the_revision_advances_but_never_goes_back(store: &dyn RegistryStore) {
    let now = store.revision().await.unwrap();
    assert_eq!(store.advance_revision(now, who()).await.unwrap(), now);
    assert_eq!(
        store.advance_revision(now + 10, who()).await.unwrap(),
        now + 10
    );
    assert_eq!(store.revision().await.unwrap(), now + 10);
    assert_eq!(store.advance_revision(1, who()).await.unwrap(), now + 10);
    let log = store.audit_log(0, 10_000).await.unwrap();
    let advanced: Vec<_> = log
        .iter()
        .filter(|e| e.action == "revision.advance")
        .collect();
    assert_eq!(advanced.len(), 1, "only a move is recorded");
}

async fn tokens_are_found_by_hash_until_revoked(store: &dyn RegistryStore) {
    use shoal_api::auth::Role;
    assert!(store.list_tokens().await.unwrap().is_empty());
    let hash = |c: char| c.to_string().repeat(64);
    let ops = TokenRecord::new("ops", Role::Deployer, hash('1'), "admin");
    store.create_token(ops.clone(), who()).await.unwrap();
    store
        .create_token(
            TokenRecord::new("ci", Role::Viewer, hash('2'), "admin"),
            who(),
        )
        .await
        .unwrap();
    // Names and secrets are unique.
    for dup in [
        TokenRecord::new("ops", Role::Admin, hash('3'), "admin"),
        TokenRecord::new("other", Role::Admin, hash('1'), "admin"),
    ] {
        assert!(matches!(
            store.create_token(dup, who()).await,
            Err(RegistryError::Conflict(_))
        ));
    }
    assert_eq!(
        store.token_by_hash(&hash('1')).await.unwrap(),
        Some(ops.info.clone())
    );
    assert_eq!(store.token_by_hash(&hash('9')).await.unwrap(), None);
    let names: Vec<String> = store
        .list_tokens()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, ["ci", "ops"]);
    assert!(store.revoke_token("ops", who()).await.unwrap());
    assert!(!store.revoke_token("ops", who()).await.unwrap());
    assert_eq!(store.token_by_hash(&hash('1')).await.unwrap(), None);
    let log = store.audit_log(0, 10_000).await.unwrap();
    let created = log
        .iter()
        .find(|e| e.action == "token.create" && e.target == "ops")
        .expect("token.create in the audit log");
    assert!(
        !created.detail.contains(&hash('1')),
        "the hash is not logged"
    );
}

async fn versions_number_and_conflict(store: &dyn RegistryStore) {
    let v1 = store
        .create_version("alpha", draft('a'), who())
        .await
        .unwrap();
    assert_eq!((v1.model.as_str(), v1.version.as_str()), ("alpha", "1"));
    assert_eq!(v1.status, VersionStatus::Registered);
    let mut named = draft('b');
    named.version = Some("3".into());
    named.labels.insert("team".into(), "vision".into());
    named.metrics.insert("accuracy".into(), 0.98);
    named.lineage = Some("1".into());
    named.input_shapes.insert("x".into(), vec![-1, 3]);
    named.max_shapes.insert("x".into(), vec![64, -1]);
    named.engine = shoal_core::Engine::Auto;
    let v3 = store.create_version("alpha", named, who()).await.unwrap();
    assert_eq!(v3.engine, shoal_core::Engine::Auto);
    assert_eq!(v1.engine, shoal_core::Engine::Tract);
    assert_eq!(v3.labels["team"], "vision");
    assert_eq!(v3.metrics["accuracy"], 0.98);
    assert_eq!(v3.lineage.as_deref(), Some("1"));
    assert_eq!(v3.input_shapes["x"], vec![-1, 3]);
    assert_eq!(v3.max_shapes["x"], vec![64, -1]);
    let read = store.get_version("alpha", "3").await.unwrap().unwrap();
    assert_eq!(read.engine, shoal_core::Engine::Auto, "read back");
    // Numbering continues after the highest number.
    let v4 = store
        .create_version("alpha", draft('c'), who())
        .await
        .unwrap();
    assert_eq!(v4.version, "4");
    let mut dup = draft('d');
    dup.version = Some("3".into());
    assert!(matches!(
        store.create_version("alpha", dup, who()).await,
        Err(RegistryError::Conflict(_))
    ));
    let mut orphan = draft('d');
    orphan.lineage = Some("99".into());
    assert!(matches!(
        store.create_version("alpha", orphan, who()).await,
        Err(RegistryError::Invalid(_))
    ));
    assert!(matches!(
        store.create_version("bad name", draft('e'), who()).await,
        Err(RegistryError::Invalid(_))
    ));
    let detail = store.get_model("alpha").await.unwrap().unwrap();
    let names: Vec<&str> = detail.versions.iter().map(|v| v.version.as_str()).collect();
    assert_eq!(names, ["1", "3", "4"]);
    assert_eq!(detail.model.latest.as_deref(), Some("4"));
    assert!(store.get_model("nope").await.unwrap().is_none());
    assert!(store.get_version("alpha", "2").await.unwrap().is_none());
    assert_eq!(store.list_models().await.unwrap().len(), 1);
}

async fn options_change_and_bump_the_revision(store: &dyn RegistryStore) {
    use shoal_api::registry::{Batching, VersionOptions};
    let v = store
        .create_version("opts", draft('f'), who())
        .await
        .unwrap();
    let before = store.revision().await.unwrap();
    let options = VersionOptions {
        batching: Some(Batching {
            max_batch: 8,
            delay_us: 500,
            preferred: vec![4],
        }),
        engine: shoal_core::Engine::Ort,
    };
    let (record, revision) = store
        .set_options("opts", &v.version, &options, who())
        .await
        .unwrap();
    assert!(revision > before, "replicas must hear of it");
    assert_eq!(store.revision().await.unwrap(), revision);
    assert_eq!(VersionOptions::of(&record), options);
    // Only the options changed.
    assert_eq!(
        (record.sha256.as_str(), record.size),
        (v.sha256.as_str(), v.size)
    );
    let read = store
        .get_version("opts", &v.version)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(VersionOptions::of(&read), options);
    // Batching off again.
    let (record, _) = store
        .set_options("opts", &v.version, &VersionOptions::default(), who())
        .await
        .unwrap();
    assert_eq!(record.batching, None);
    assert_eq!(record.engine, shoal_core::Engine::Tract);
    let tail = store.audit_tail(1).await.unwrap();
    assert_eq!(tail[0].action, "version.options");
    assert!(matches!(
        store.set_options("opts", "99", &options, who()).await,
        Err(RegistryError::NotFound(_))
    ));
}

async fn statuses_and_last_known_good(store: &dyn RegistryStore) {
    for _ in 0..3 {
        store
            .create_version("beta", draft('f'), who())
            .await
            .unwrap();
    }
    store
        .set_status("beta", "1", VersionStatus::Production, false, who())
        .await
        .unwrap();
    store
        .set_status("beta", "2", VersionStatus::Production, false, who())
        .await
        .unwrap();
    store
        .set_status("beta", "1", VersionStatus::Deprecated, false, who())
        .await
        .unwrap();
    let m = store.get_model("beta").await.unwrap().unwrap().model;
    assert_eq!(m.production.as_deref(), Some("2"));
    assert_eq!(m.last_known_good.as_deref(), Some("2"));
    // Rolling 2 back makes 1 the last known good again.
    store
        .set_status("beta", "2", VersionStatus::Deprecated, true, who())
        .await
        .unwrap();
    let m = store.get_model("beta").await.unwrap().unwrap().model;
    assert_eq!(m.last_known_good.as_deref(), Some("1"));
    assert_eq!(m.production, None);
    let v1 = store.get_version("beta", "1").await.unwrap().unwrap();
    assert!(v1.reached_production && !v1.rolled_back);
    assert!(matches!(
        store
            .set_status("beta", "9", VersionStatus::Canary, false, who())
            .await,
        Err(RegistryError::NotFound(_))
    ));
}

async fn deployments_bump_the_revision(store: &dyn RegistryStore) {
    let before = store.revision().await.unwrap();
    let deployment = Deployment {
        placement: None,
        scale: None,
        model: "alpha".into(),
        targets: vec![TrafficTarget {
            version: "3".into(),
            weight: 100,
        }],
        regions: Some(vec!["eu-west".into()]),
        shadow: None,
        split_header: None,
        warm: Vec::new(),
        rollout: Some(RolloutView {
            strategy: Strategy::Rolling,
            state: RolloutState::Progressing,
            from: Some("1".into()),
            to: "3".into(),
            step: 1,
            weights: [("3".to_owned(), 100)].into(),
            reason: "started".into(),
            replicas_done: 0,
            replicas_total: 3,
            started_at: 1,
            updated_at: 1,
            shadow: None,
            arms: Vec::new(),
            significant: None,
        }),
        revision: 0,
        updated_at: 0,
    };
    let stored = StoredDeployment {
        deployment,
        controller: serde_json::json!({"moved": ["r1"]}),
    };
    let rev = store
        .put_deployment(stored.clone(), "deploy", who())
        .await
        .unwrap();
    assert!(rev > before);
    assert_eq!(store.revision().await.unwrap(), rev);
    let back = store.get_deployment("alpha").await.unwrap().unwrap();
    assert_eq!(back.deployment.revision, rev);
    assert_eq!(back.deployment.targets, stored.deployment.targets);
    assert_eq!(back.deployment.rollout, stored.deployment.rollout);
    assert_eq!(back.controller, stored.controller);
    let rev2 = store
        .put_deployment(back, "deploy.step", who())
        .await
        .unwrap();
    assert_eq!(rev2, rev + 1);
    assert_eq!(store.list_deployments().await.unwrap().len(), 1);
    assert!(store.get_deployment("beta").await.unwrap().is_none());
}

async fn replicas_register_and_leave(store: &dyn RegistryStore) {
    let reg = Registration {
        tier: Default::default(),
        id: "r1".into(),
        address: "127.0.0.1:9001".into(),
        region: "us-east".into(),
        labels: Default::default(),
        pid: Some(42),
        standby: false,
    };
    let r1 = store.register_replica(&reg).await.unwrap();
    // Re-registering unchanged does not move the revision…
    assert_eq!(store.register_replica(&reg).await.unwrap(), r1);
    // …a new address does.
    let moved = Registration {
        address: "127.0.0.1:9002".into(),
        ..reg.clone()
    };
    let r2 = store.register_replica(&moved).await.unwrap();
    assert!(r2 > r1);
    // …and so does becoming a standby (gateways route to it differently).
    let standby = Registration {
        standby: true,
        ..moved.clone()
    };
    assert!(store.register_replica(&standby).await.unwrap() > r2);
    let moved = standby;
    let listed = store.list_replicas().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].registration, moved);
    assert!(store.remove_replica("r1", who()).await.unwrap());
    assert!(!store.remove_replica("r1", who()).await.unwrap());
    assert!(store.list_replicas().await.unwrap().is_empty());
}

async fn audit_log_records_every_mutation(store: &dyn RegistryStore) {
    let log = store.audit_log(0, 1000).await.unwrap();
    let actions: Vec<&str> = log.iter().map(|e| e.action.as_str()).collect();
    for expected in [
        "version.create",
        "version.status",
        "version.rolled_back",
        "deploy",
        "deploy.step",
        "replica.register",
        "replica.remove",
        "token.create",
        "token.revoke",
    ] {
        assert!(
            actions.contains(&expected),
            "audit log lacks {expected}: {actions:?}"
        );
    }
    assert!(log.windows(2).all(|w| w[0].seq < w[1].seq));
    let tail = store.audit_log(log[log.len() - 3].seq, 10).await.unwrap();
    assert_eq!(tail.len(), 2);
    let newest = store.audit_tail(3).await.unwrap();
    assert_eq!(
        newest,
        log[log.len() - 3..],
        "the newest three, oldest first"
    );
    assert_eq!(store.audit_tail(100_000).await.unwrap(), log);
    assert!(
        log.iter()
            .any(|e| e.target == "alpha:3" && e.actor == "suite")
    );
}

/// A dump of `source` (a store the suite has filled) loads into the empty
/// `target`, which then dumps to the same value and answers the same
/// reads; a second load is refused, and so is an invalid dump, with
/// nothing written.
pub async fn dump_and_load(source: &dyn RegistryStore, target: &dyn RegistryStore) {
    let dump = source.dump().await.unwrap();
    assert!(!dump.versions.is_empty() && !dump.audit.is_empty());
    dump.validate().unwrap();

    let mut broken = dump.clone();
    broken.versions[0].status = "sideways".into();
    assert!(matches!(
        target.load_dump(&broken).await,
        Err(RegistryError::Invalid(_))
    ));
    assert_eq!(target.revision().await.unwrap(), 0);

    target.load_dump(&dump).await.unwrap();
    assert_eq!(target.dump().await.unwrap(), dump);
    assert_eq!(target.revision().await.unwrap(), dump.revision);
    assert_eq!(
        target.list_models().await.unwrap(),
        source.list_models().await.unwrap()
    );
    assert_eq!(
        target.list_tokens().await.unwrap(),
        source.list_tokens().await.unwrap()
    );
    assert!(matches!(
        target.load_dump(&dump).await,
        Err(RegistryError::Conflict(_))
    ));

    // Writes continue where the dump left off: the next revision and the
    // next audit position follow the restored ones.
    let model = &dump.models[0].name;
    let next = target
        .create_version(model, draft('f'), who())
        .await
        .unwrap();
    assert!(!next.version.is_empty());
    let last_seq = dump.audit.last().map(|a| a.seq).unwrap_or(0);
    let log = target.audit_log(last_seq, 10).await.unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].seq, last_seq + 1);
    let stored = target.list_deployments().await.unwrap();
    if let Some(first) = stored.into_iter().next() {
        let revision = target.put_deployment(first, "deploy", who()).await.unwrap();
        assert_eq!(revision, dump.revision + 1);
    }
}
