//! A client given several members of one control plane: calls go to the
//! one that answered last, and past members that cannot be reached.

use axum::Router;
use axum::routing::{get, post};
use shoal_client::{ApiClient, ClientError};

/// A member answering its name on GET and POST.
async fn member(name: &'static str) -> String {
    let app = Router::new()
        .route("/who", get(move || async move { name }))
        .route("/act", post(move || async move { name }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

/// An address nothing listens on.
async fn dead() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

#[tokio::test]
async fn calls_pass_over_unreachable_members_and_stick_to_the_one_that_answers() {
    let (down, a, b) = (dead().await, member("a").await, member("b").await);
    let client = ApiClient::control(&format!("{down}, {a},{b}/"), None);
    assert_eq!(client.bases(), [down.clone(), a.clone(), b.clone()]);
    assert_eq!(client.base(), down);
    assert_eq!(&client.get_raw("/who").await.unwrap()[..], b"a");
    assert_eq!(client.base(), a, "sticks to the member that answered");
    // A clone shares the choice; a write whose connection failed (nothing
    // was sent) goes to the next member too.
    let writer = ApiClient::control(&format!("{down},{b}"), None);
    assert_eq!(
        &writer.post_json_raw("/act", "{}".into()).await.unwrap()[..],
        b"b"
    );
    assert_eq!(writer.clone().base(), b);
    // An error answer is the member's word: not retried elsewhere.
    match client.get_raw("/nothing-here").await {
        Err(ClientError::Status { status, .. }) => assert_eq!(status.as_u16(), 404),
        other => panic!("{other:?}"),
    }
    assert_eq!(client.base(), a);
}

#[tokio::test]
async fn with_every_member_down_the_error_names_one_and_is_transient() {
    let (x, y) = (dead().await, dead().await);
    let client = ApiClient::control(&format!("{x},{y}"), None);
    let err = client.get_raw("/who").await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(
        err.to_string().contains("cannot reach the control plane"),
        "{err}"
    );
}

#[tokio::test]
async fn errors_name_the_kind_of_server_called() {
    let down = dead().await;
    for (client, says) in [
        (ApiClient::peer(&down, None), "cannot reach peer replica at"),
        (ApiClient::replica(&down, None), "cannot reach replica at"),
        (ApiClient::gateway(&down, None), "cannot reach gateway at"),
    ] {
        let err = client.get_raw("/health").await.unwrap_err();
        assert!(err.to_string().starts_with(says), "{err}");
        assert!(!err.to_string().contains("control plane"), "{err}");
        let Err(err) = client.chunk_stream("abc").await else {
            panic!("a chunk stream from nothing");
        };
        assert!(err.to_string().starts_with(says), "{err}");
    }
}
