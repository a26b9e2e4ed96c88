//! The in-repo Consul server answers as Consul's HTTP API documentation says, so the
//! Consul leaser tests mean something. Raw HTTP, no leaser involved.

use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

use crate::consul_server::{ConsulServer, ConsulServerOptions, Fault};

fn short(factor: f64) -> ConsulServer {
    ConsulServer::start_with(ConsulServerOptions {
        expiry_factor: factor,
        min_ttl: Duration::from_millis(100),
        acl_token: None,
    })
}

struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    fn new(s: &ConsulServer) -> Api {
        Api {
            base: s.url(),
            http: reqwest::Client::new(),
        }
    }

    async fn req(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &str,
    ) -> (u16, Option<u64>, String) {
        let resp = self
            .http
            .request(method, format!("{}{path}", self.base))
            .body(body.to_string())
            .timeout(Duration::from_secs(20))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let index = resp
            .headers()
            .get("X-Consul-Index")
            .map(|v| v.to_str().unwrap().parse().unwrap());
        (status, index, resp.text().await.unwrap())
    }

    async fn put(&self, path: &str, body: &str) -> (u16, String) {
        let (s, _, b) = self.req(reqwest::Method::PUT, path, body).await;
        (s, b)
    }

    async fn get(&self, path: &str) -> (u16, Option<u64>, String) {
        self.req(reqwest::Method::GET, path, "").await
    }

    async fn session(&self, body: Value) -> String {
        let (status, text) = self.put("/v1/session/create", &body.to_string()).await;
        assert_eq!(status, 200, "{text}");
        serde_json::from_str::<Value>(&text).unwrap()["ID"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

#[tokio::test]
async fn sessions_create_renew_info_destroy() {
    let s = short(2.0);
    let api = Api::new(&s);
    let id = api
        .session(json!({"Name": "x", "TTL": "10s", "LockDelay": "2s", "Behavior": "delete"}))
        .await;
    let (status, index, body) = api.get(&format!("/v1/session/info/{id}")).await;
    assert_eq!(status, 200);
    assert!(index.unwrap() > 0);
    let info: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info[0]["ID"], id.as_str());
    assert_eq!(info[0]["Name"], "x");
    assert_eq!(info[0]["TTL"], "10s");
    assert_eq!(info[0]["LockDelay"], 2_000_000_000u64);
    assert_eq!(info[0]["Behavior"], "delete");

    let (status, body) = api.put(&format!("/v1/session/renew/{id}"), "").await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()[0]["ID"],
        id.as_str()
    );

    assert_eq!(
        api.put(&format!("/v1/session/destroy/{id}"), "").await,
        (200, "true".into())
    );
    let (status, body) = api.put(&format!("/v1/session/renew/{id}"), "").await;
    assert_eq!(status, 404);
    assert!(body.contains("not found"), "{body}");
    let (status, _, body) = api.get(&format!("/v1/session/info/{id}")).await;
    assert_eq!((status, body.as_str()), (200, "[]"));

    // Consul's rules for TTL and LockDelay.
    let (status, body) = api.put("/v1/session/create", r#"{"TTL": "50ms"}"#).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("Invalid Session TTL"));
    let strict = ConsulServer::start();
    let (status, _) = Api::new(&strict)
        .put("/v1/session/create", r#"{"TTL": "5s"}"#)
        .await;
    assert_eq!(status, 400, "Consul's own minimum TTL is 10s");
    let (status, _) = api
        .put("/v1/session/create", r#"{"Behavior": "explode"}"#)
        .await;
    assert_eq!(status, 400);
    // LockDelay as a number: seconds below 1000, nanoseconds above.
    let secs = api.session(json!({"LockDelay": 15})).await;
    let nanos = api.session(json!({"LockDelay": 500_000_000u64})).await;
    for (id, want) in [(secs, 15_000_000_000u64), (nanos, 500_000_000)] {
        let (_, _, body) = api.get(&format!("/v1/session/info/{id}")).await;
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap()[0]["LockDelay"],
            want
        );
    }
}

#[tokio::test]
async fn kv_put_get_raw_cas_delete() {
    let s = short(2.0);
    let api = Api::new(&s);
    let (status, index, _) = api.get("/v1/kv/a/b").await;
    assert_eq!(status, 404);
    assert!(index.is_some(), "404 carries X-Consul-Index");

    assert_eq!(
        api.put("/v1/kv/a/b?flags=7", "hello").await,
        (200, "true".into())
    );
    let (status, index, body) = api.get("/v1/kv/a/b").await;
    assert_eq!(status, 200);
    let entry = &serde_json::from_str::<Value>(&body).unwrap()[0];
    assert_eq!(entry["Key"], "a/b");
    assert_eq!(entry["Flags"], 7);
    assert_eq!(
        entry["Value"],
        base64::engine::general_purpose::STANDARD.encode("hello")
    );
    assert!(entry.get("Session").is_none());
    let modify = entry["ModifyIndex"].as_u64().unwrap();
    assert_eq!(index, Some(modify));
    assert_eq!(api.get("/v1/kv/a/b?raw").await.2, "hello");

    // cas=0: only if absent; cas=N: only if ModifyIndex is N.
    assert_eq!(api.put("/v1/kv/a/b?cas=0", "x").await.1, "false");
    assert_eq!(
        api.put(&format!("/v1/kv/a/b?cas={}", modify + 5), "x")
            .await
            .1,
        "false"
    );
    assert_eq!(
        api.put(&format!("/v1/kv/a/b?cas={modify}"), "y").await.1,
        "true"
    );
    assert_eq!(api.get("/v1/kv/a/b?raw").await.2, "y");
    let (_, _, body) = api
        .req(reqwest::Method::DELETE, "/v1/kv/a/b?cas=1", "")
        .await;
    assert_eq!(body, "false", "delete with a stale cas index is refused");
    let (status, _, body) = api.req(reqwest::Method::DELETE, "/v1/kv/a/b", "").await;
    assert_eq!((status, body.as_str()), (200, "true"));
    assert_eq!(api.get("/v1/kv/a/b").await.0, 404);
}

#[tokio::test]
async fn kv_acquire_and_release() {
    let s = short(2.0);
    let api = Api::new(&s);
    let one = api.session(json!({"TTL": "10s", "LockDelay": "0s"})).await;
    let two = api.session(json!({"TTL": "10s", "LockDelay": "0s"})).await;

    assert_eq!(
        api.put(&format!("/v1/kv/k?acquire={one}"), "v1").await.1,
        "true"
    );
    assert_eq!(
        api.put(&format!("/v1/kv/k?acquire={two}"), "v2").await.1,
        "false"
    );
    // The holder may acquire again to update the value; LockIndex stays.
    assert_eq!(
        api.put(&format!("/v1/kv/k?acquire={one}"), "v1b").await.1,
        "true"
    );
    let entry = &serde_json::from_str::<Value>(&api.get("/v1/kv/k").await.2).unwrap()[0];
    assert_eq!(entry["Session"], one.as_str());
    assert_eq!(entry["LockIndex"], 1);
    assert_eq!(api.get("/v1/kv/k?raw").await.2, "v1b");

    assert_eq!(
        api.put(&format!("/v1/kv/k?release={two}"), "").await.1,
        "false"
    );
    assert_eq!(
        api.put(&format!("/v1/kv/k?release={one}"), "").await.1,
        "true"
    );
    let entry = &serde_json::from_str::<Value>(&api.get("/v1/kv/k").await.2).unwrap()[0];
    assert!(entry.get("Session").is_none());
    assert_eq!(
        entry["Value"],
        Value::Null,
        "release writes the (empty) body"
    );

    // An explicit release starts no lock-delay.
    assert_eq!(
        api.put(&format!("/v1/kv/k?acquire={two}"), "v2").await.1,
        "true"
    );
    assert_eq!(
        serde_json::from_str::<Value>(&api.get("/v1/kv/k").await.2).unwrap()[0]["LockIndex"],
        2
    );
    // An unknown session is an error, not "false".
    let (status, body) = api.put("/v1/kv/k?acquire=nope", "").await;
    assert_eq!(status, 500, "{body}");
}

#[tokio::test]
async fn invalidation_deletes_or_releases_and_starts_the_lock_delay() {
    let s = short(2.0);
    let api = Api::new(&s);
    let del = api
        .session(json!({"LockDelay": "400ms", "Behavior": "delete"}))
        .await;
    let rel = api
        .session(json!({"LockDelay": "0s", "Behavior": "release"}))
        .await;
    let other = api.session(json!({"LockDelay": "0s"})).await;
    assert_eq!(
        api.put(&format!("/v1/kv/d?acquire={del}"), "x").await.1,
        "true"
    );
    assert_eq!(
        api.put(&format!("/v1/kv/r?acquire={rel}"), "y").await.1,
        "true"
    );

    let destroyed = Instant::now();
    api.put(&format!("/v1/session/destroy/{del}"), "").await;
    api.put(&format!("/v1/session/destroy/{rel}"), "").await;
    assert_eq!(
        api.get("/v1/kv/d").await.0,
        404,
        "behaviour delete removes the key"
    );
    let entry = &serde_json::from_str::<Value>(&api.get("/v1/kv/r").await.2).unwrap()[0];
    assert!(
        entry.get("Session").is_none(),
        "behaviour release unlocks the key"
    );
    assert_eq!(api.get("/v1/kv/r?raw").await.2, "y", "and keeps its value");

    // Lock-delay: refused until 400 ms after the invalidation.
    let got = loop {
        if api.put(&format!("/v1/kv/d?acquire={other}"), "z").await.1 == "true" {
            break destroyed.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(got >= Duration::from_millis(400), "{got:?}");
    assert!(got < Duration::from_millis(800), "{got:?}");
}

async fn ttl_expiry(factor: f64) -> (Duration, Duration) {
    let s = short(factor);
    let api = Api::new(&s);
    let created = Instant::now();
    let id = api
        .session(json!({"TTL": "500ms", "Behavior": "delete"}))
        .await;
    assert_eq!(
        api.put(&format!("/v1/kv/k?acquire={id}"), "x").await.1,
        "true"
    );
    let mut last_seen = Duration::ZERO;
    loop {
        let (status, _, _) = api.get("/v1/kv/k").await;
        if status == 404 {
            break;
        }
        last_seen = created.elapsed();
        assert!(last_seen < Duration::from_secs(3));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(api.put(&format!("/v1/session/renew/{id}"), "").await.0, 404);
    (last_seen, created.elapsed())
}

#[tokio::test]
async fn ttl_expiry_at_both_edges_of_consuls_window() {
    let ttl = Duration::from_millis(500);
    // At TTL exactly ...
    let (seen, gone) = ttl_expiry(1.0).await;
    assert!(
        gone >= ttl && gone < ttl + Duration::from_millis(250),
        "{gone:?}"
    );
    assert!(seen < ttl + Duration::from_millis(50), "{seen:?}");
    // ... and at 2x TTL: still there well after the TTL.
    let (seen, gone) = ttl_expiry(2.0).await;
    assert!(
        seen >= ttl.mul_f64(1.8),
        "gone too early: last seen {seen:?}"
    );
    assert!(
        gone >= ttl * 2 && gone < ttl * 2 + Duration::from_millis(250),
        "{gone:?}"
    );
}

#[tokio::test]
async fn renew_resets_the_ttl() {
    let s = short(1.0);
    let api = Api::new(&s);
    let id = api.session(json!({"TTL": "300ms"})).await;
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(api.put(&format!("/v1/session/renew/{id}"), "").await.0, 200);
    }
    assert!(s.has_session(&id), "alive after 900 ms of renewals");
}

#[tokio::test]
async fn blocking_queries_wait_for_a_change_or_the_wait_time() {
    let s = short(2.0);
    let api = Api::new(&s);
    api.put("/v1/kv/w", "1").await;
    let (_, index, _) = api.get("/v1/kv/w").await;
    let index = index.unwrap();

    let started = Instant::now();
    let (status, same, _) = api.get(&format!("/v1/kv/w?index={index}&wait=300ms")).await;
    assert_eq!(status, 200);
    assert_eq!(same, Some(index));
    assert!(started.elapsed() >= Duration::from_millis(300));

    let base = s.url();
    let writer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        reqwest::Client::new()
            .put(format!("{base}/v1/kv/w"))
            .body("2")
            .send()
            .await
            .unwrap();
    });
    let started = Instant::now();
    let (status, newer, _) = api
        .get(&format!("/v1/kv/w?index={index}&wait=10s&raw"))
        .await;
    assert_eq!(status, 200);
    assert!(newer.unwrap() > index);
    assert!(started.elapsed() < Duration::from_secs(2));
    writer.await.unwrap();
    assert_eq!(api.get("/v1/kv/w?raw").await.2, "2");

    // A delete also wakes a blocked reader (404 with the new index).
    let (_, index, _) = api.get("/v1/kv/w").await;
    let base = s.url();
    let deleter = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        reqwest::Client::new()
            .delete(format!("{base}/v1/kv/w"))
            .send()
            .await
            .unwrap();
    });
    let (status, after, _) = api
        .get(&format!("/v1/kv/w?index={}&wait=10s", index.unwrap()))
        .await;
    assert_eq!(status, 404);
    assert!(after.unwrap() > index.unwrap());
    deleter.await.unwrap();
}

#[tokio::test]
async fn acl_token_and_faults() {
    let s = ConsulServer::start_with(ConsulServerOptions {
        acl_token: Some("t0k".into()),
        ..ConsulServerOptions::default()
    });
    let api = Api::new(&s);
    assert_eq!(api.get("/v1/kv/x").await.0, 403);
    assert_eq!(api.get("/v1/kv/x?token=t0k").await.0, 404);
    let with_header = reqwest::Client::new()
        .get(format!("{}/v1/kv/x", s.url()))
        .header("X-Consul-Token", "t0k")
        .send()
        .await
        .unwrap();
    assert_eq!(with_header.status(), 404);

    s.set_fault(Fault::Unavailable);
    let (status, _, body) = api.get("/v1/kv/x?token=t0k").await;
    assert_eq!((status, body.as_str()), (500, "No cluster leader"));

    s.set_fault(Fault::Blackhole);
    let before = s.requests();
    let hung = reqwest::Client::new()
        .get(format!("{}/v1/kv/x?token=t0k", s.url()))
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(
        hung.unwrap_err().is_timeout(),
        "a blackholed request never answers"
    );
    assert_eq!(s.requests(), before + 1, "it did arrive");

    s.set_fault(Fault::None);
    assert_eq!(api.get("/v1/kv/x?token=t0k").await.0, 404);
}
