//! Events through a real `nats-server -js` the test starts: a follower
//! starts from the latest state, sees new ones in order, and after the
//! server is killed and restarted (same store) finds the newest state
//! again, whether it was published before or after the restart.

use std::time::Duration;

use futures::StreamExt;
use shoal_api::fleet::DesiredState;
use shoal_events::Events;
use shoal_testkit::NatsServer;

fn state(revision: u64) -> DesiredState {
    DesiredState {
        revision,
        models: Vec::new(),
        peers: Vec::new(),
    }
}

/// The next revision a follower of `id` sees, following again (as the
/// sync agent does) whenever the consumer gives up.
async fn next_revision(events: &Events, id: &str, above: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no revision above {above}"
        );
        if let Ok(follow) = events.follow_desired(id).await {
            let mut follow = std::pin::pin!(follow);
            while let Ok(Some(item)) =
                tokio::time::timeout(Duration::from_secs(5), follow.next()).await
            {
                match item {
                    Ok(s) if s.revision > above => return s.revision,
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_resume_from_the_latest_state_across_a_server_restart() {
    let mut nats = NatsServer::start();
    let publisher = Events::connect(&nats.url()).await.unwrap();
    publisher.ensure_stream().await.unwrap();
    publisher.publish_desired("r1", &state(1)).await.unwrap();
    publisher.publish_desired("r1", &state(2)).await.unwrap();
    // A repeat of a message is stored once (same id), and other
    // replicas' subjects are not mixed in.
    publisher.publish_desired("r1", &state(2)).await.unwrap();
    publisher.publish_desired("r2", &state(9)).await.unwrap();

    let follower = Events::connect(&nats.url()).await.unwrap();
    let follow = follower.follow_desired("r1").await.unwrap();
    let mut follow = std::pin::pin!(follow);
    let first = follow.next().await.unwrap().unwrap();
    assert_eq!(first.revision, 2, "starts from the latest, not the first");
    publisher.publish_desired("r1", &state(3)).await.unwrap();
    assert_eq!(follow.next().await.unwrap().unwrap().revision, 3);

    // The server dies and comes back with its store: the latest state is
    // still there for anyone who follows anew.
    nats.restart();
    assert_eq!(next_revision(&follower, "r1", 2).await, 3);
    // And what is published after the restart reaches followers too.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while publisher.publish_desired("r1", &state(4)).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "cannot publish after the restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(next_revision(&follower, "r1", 3).await, 4);
    // The follow begun before the restart carried on by itself: after the
    // reconnection it read the latest again and took what came live.
    let mut latest = 3;
    while latest < 4 {
        let item = tokio::time::timeout(Duration::from_secs(30), follow.next())
            .await
            .expect("the follow from before the restart went quiet")
            .expect("the follow from before the restart ended");
        if let Ok(s) = item {
            assert!(s.revision >= 2, "went back to {}", s.revision);
            latest = latest.max(s.revision);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_made_by_an_older_version_is_updated_and_keeps_its_messages() {
    let nats = NatsServer::start();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    // As the first version made it: no direct gets.
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "SHOAL".into(),
        subjects: vec!["shoal.>".into()],
        max_messages_per_subject: 1,
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .unwrap();
    js.publish(
        "shoal.desired.r1",
        serde_json::to_vec(&state(5)).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();

    let events = Events::connect(&nats.url()).await.unwrap();
    events.ensure_stream().await.unwrap();
    let follow = events.follow_desired("r1").await.unwrap();
    let mut follow = std::pin::pin!(follow);
    assert_eq!(follow.next().await.unwrap().unwrap().revision, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_states_arrives_in_order_and_ends_on_the_newest() {
    let nats = NatsServer::start();
    let publisher = Events::connect(&nats.url()).await.unwrap();
    publisher.ensure_stream().await.unwrap();
    publisher.publish_desired("r1", &state(1)).await.unwrap();
    let follower = Events::connect(&nats.url()).await.unwrap();
    let follow = follower.follow_desired("r1").await.unwrap();
    let mut follow = std::pin::pin!(follow);
    assert_eq!(follow.next().await.unwrap().unwrap().revision, 1);
    // Published back to back, without waiting for each acknowledgement:
    // live deliveries and reads race each other on the wire.
    let burst: Vec<(String, DesiredState)> = (2..=300).map(|r| ("r1".into(), state(r))).collect();
    let (stored, result) = publisher.publish_desired_all(&burst).await;
    result.unwrap();
    assert_eq!(stored, burst.len());
    let mut last = 1;
    while last < 300 {
        let next = tokio::time::timeout(Duration::from_secs(30), follow.next())
            .await
            .expect("the newest state never came")
            .unwrap()
            .unwrap();
        assert!(next.revision > last, "{} after {last}", next.revision);
        last = next.revision;
    }
}

#[tokio::test]
async fn a_bad_url_is_refused_with_what_to_pass() {
    let err = Events::connect("redis://127.0.0.1:1").await.unwrap_err();
    assert!(err.to_string().contains("nats://HOST:PORT"), "{err}");
}
