//! The real `shoal replica` binary: starts on port 0, serves the bundled
//! model, stops cleanly on SIGTERM, holds no more connections than
//! `--max-connections` (by default half its raised open-file limit), and
//! refuses bad command lines clearly.

use std::time::Duration;

use nix::sys::signal::Signal;
use shoal_testkit::{HttpClient, Samples, model_path, spawn_server};

mod common;
use common::shoal;

async fn wait_ready(http: &HttpClient, base: &str) {
    // A separate process: the only way to learn it is ready is to ask.
    let mut backoff = Duration::from_millis(5);
    for _ in 0..200 {
        if http.get(&format!("{base}/ready")).await.status == 200 {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(100));
    }
    panic!("replica at {base} never became ready");
}

/// `shoal replica` on port 0 with its data in `data`, serving digits-v1,
/// with `more` arguments.
fn spawn_digits(data: &std::path::Path, more: &[&str]) -> (shoal_testkit::ChildGuard, String) {
    let v1 = format!("digits={}", model_path("digits-v1.onnx").display());
    let mut args = vec![
        "replica",
        "--addr",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
        "--model",
        &v1,
    ];
    args.extend_from_slice(more);
    spawn_server(shoal(), &args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_replica_serves_and_stops_on_sigterm() {
    let data = std::env::temp_dir().join(format!("shoal-cli-test-{}", std::process::id()));
    let ocr = format!(
        "ocr={}@3",
        model_path("ch_ppocr_mobile_v2.0_cls_infer.onnx").display()
    );
    let (mut child, addr) = spawn_digits(
        &data,
        &["--model", &ocr, "--input-shape", "ocr:x=-1,3,48,192"],
    );
    let base = format!("http://{addr}");
    let http = HttpClient::new();
    wait_ready(&http, &base).await;

    let samples = Samples::load();
    let r = http
        .post_json(
            &format!("{base}/v2/models/digits/infer"),
            samples.request(0..5),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let labels: Vec<i64> = r.json()["outputs"][1]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(labels.len(), 5);
    let meta = http
        .get(&format!("{base}/v2/models/ocr/versions/3"))
        .await
        .json();
    assert_eq!(
        meta["inputs"][0]["shape"],
        serde_json::json!([-1, 3, 48, 192])
    );
    // The default cap: half the open-file limit, raised to its hard limit.
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    let metrics = http.get(&format!("{base}/metrics")).await.text();
    assert!(
        metrics.contains(&format!("shoal_connections_max {}\n", hard / 2)),
        "{metrics}"
    );

    child.signal(Signal::SIGTERM);
    let status = tokio::task::spawn_blocking(move || child.wait_timeout(Duration::from_secs(10)))
        .await
        .unwrap()
        .expect("replica exits after SIGTERM");
    assert!(status.success(), "{status}");
    let _ = std::fs::remove_dir_all(&data);
}

/// Sends a GET on `stream` and reads its answer: status and body.
async fn get(stream: &mut tokio::net::TcpStream, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut read = Vec::new();
    loop {
        let text = String::from_utf8_lossy(&read).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().unwrap())
                })
                .expect("a content-length");
            if read.len() >= end + 4 + length {
                let status = text[9..12].parse().unwrap();
                return (status, text[end + 4..end + 4 + length].to_owned());
            }
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&read));
        read.extend_from_slice(&chunk[..n]);
    }
}

/// `--max-connections 2`: at the cap an idle connection makes room for a
/// new one at once; while both are busy a third is not served, and it is
/// as soon as one is idle again; `/metrics` counts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_holds_no_more_connections_than_its_cap() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    let data = std::env::temp_dir().join(format!("shoal-cap-test-{}", std::process::id()));
    let (_child, addr) = spawn_digits(&data, &["--max-connections", "2"]);
    let base = format!("http://{addr}");
    {
        // Its pooled connection closes with it.
        let http = HttpClient::new();
        wait_ready(&http, &base).await;
    }
    let body = Samples::load().request(0..1).into_bytes();
    let head = format!(
        "POST /v2/models/digits/infer HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    // Sends an inference's head: the connection is busy until its body.
    let start_inference = async |stream: &mut TcpStream| {
        stream.write_all(head.as_bytes()).await.unwrap();
    };
    let closed = async |stream: &mut TcpStream| {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut byte)).await;
        assert_eq!(
            read.expect("an idle connection kept at the cap").unwrap(),
            0
        );
    };

    let mut first = TcpStream::connect(&addr).await.unwrap();
    assert_eq!(get(&mut first, "/health").await.0, 200);
    let mut second = TcpStream::connect(&addr).await.unwrap();
    let (code, metrics) = get(&mut second, "/metrics").await;
    assert_eq!(code, 200);
    assert!(metrics.contains("shoal_connections_max 2\n"), "{metrics}");
    assert!(metrics.contains("shoal_connections_open 2\n"), "{metrics}");

    // The first is idle: it closes for a third.
    start_inference(&mut second).await;
    let mut third = TcpStream::connect(&addr).await.unwrap();
    let answered = tokio::time::timeout(Duration::from_secs(30), get(&mut third, "/health"))
        .await
        .expect("an idle connection kept at the cap while a new one waits");
    assert_eq!(answered.0, 200);
    closed(&mut first).await;

    // Both busy: a fourth waits. (A bounded look for an answer that must
    // not come: a correct replica never fails it.)
    start_inference(&mut third).await;
    let mut fourth = TcpStream::connect(&addr).await.unwrap();
    fourth
        .write_all(b"GET /health HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .unwrap();
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(300), fourth.read(&mut byte)).await;
    assert!(early.is_err(), "answered past the cap: {early:?}");

    // The second's inference ends; idle, it makes room for the fourth.
    second.write_all(&body).await.unwrap();
    let mut answer = vec![0u8; 12];
    second.read_exact(&mut answer).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&answer), "HTTP/1.1 200");
    let answered = tokio::time::timeout(Duration::from_secs(30), async {
        let mut answer = vec![0u8; 12];
        fourth.read_exact(&mut answer).await.unwrap();
        String::from_utf8_lossy(&answer).into_owned()
    })
    .await
    .expect("the fourth connection was not served once one was idle");
    assert_eq!(answered, "HTTP/1.1 200");
    third.write_all(&body).await.unwrap();
    let mut answer = vec![0u8; 12];
    third.read_exact(&mut answer).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&answer), "HTTP/1.1 200");
    let _ = std::fs::remove_dir_all(&data);
}

#[test]
fn bad_command_lines_say_what_is_wrong() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(shoal())
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["replica", "--addr", "127.0.0.1:0"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("nothing to serve: give --control URL"),
        "{err}"
    );
    let (code, err) = run(&[
        "replica",
        "--addr",
        "127.0.0.1:0",
        "--model",
        "digits=/nonexistent.onnx",
    ]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("model file /nonexistent.onnx (for --model digits) does not exist"),
        "{err}"
    );
    let (code, err) = run(&["replica", "--max-connections", "0"]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("invalid value '0' for '--max-connections <MAX_CONNECTIONS>'"),
        "{err}"
    );
    let (code, err) = run(&["replica", "--model", "digits"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("expected NAME=PATH[@VERSION]"), "{err}");
    let v1 = format!("digits={}", model_path("digits-v1.onnx").display());
    let (code, err) = run(&[
        "replica",
        "--addr",
        "127.0.0.1:0",
        "--model",
        &v1,
        "--input-shape",
        "input=1,x",
    ]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("--input-shape input=1,x: expected D,D,… (-1 for dynamic)"),
        "{err}"
    );
    // With two models, a shape must say which one it is for.
    let ocr = format!(
        "ocr={}",
        model_path("ch_ppocr_mobile_v2.0_cls_infer.onnx").display()
    );
    let (code, err) = run(&[
        "replica",
        "--addr",
        "127.0.0.1:0",
        "--model",
        &v1,
        "--model",
        &ocr,
        "--input-shape",
        "x=-1,3,48,192",
    ]);
    assert_eq!(code, Some(1));
    assert!(err.contains("say which model it is for"), "{err}");
}
