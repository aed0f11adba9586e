//! A relay in front of a real registry that fails the requests a test
//! names, a given number of times: for the faults a registry cannot be told
//! to make (a transient 503 on one manifest PUT). Everything else passes
//! through unchanged, `Host` included (so the registry's own `Location`s
//! name the relay). Bodies are buffered: test-sized. It runs on a runtime
//! of its own (the harness's readiness probes block the test's), and stops
//! on drop.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// One planned failure.
struct Fault {
    method: String,
    path: String,
    status: u16,
    left: usize,
}

/// The running relay.
pub struct Relay {
    port: u16,
    faults: Arc<Mutex<Vec<Fault>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Relay {
    /// Relays to `upstream` (`http://127.0.0.1:PORT`) from a free loopback
    /// port.
    pub fn start(upstream: &str) -> Relay {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding the relay");
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let faults: Arc<Mutex<Vec<Fault>>> = Arc::default();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (upstream, plan) = (upstream.to_owned(), faults.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("the relay's runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let client = reqwest::Client::builder()
                    .redirect(reqwest::redirect::Policy::none())
                    .build()
                    .unwrap();
                let serve = async {
                    while let Ok((sock, _)) = listener.accept().await {
                        let (client, upstream, plan) =
                            (client.clone(), upstream.clone(), plan.clone());
                        tokio::spawn(async move {
                            let service = service_fn(move |req| {
                                let (client, upstream, plan) =
                                    (client.clone(), upstream.clone(), plan.clone());
                                async move {
                                    Ok::<_, Infallible>(relay(&client, &upstream, &plan, req).await)
                                }
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(sock), service)
                                .await;
                        });
                    }
                };
                tokio::select! {
                    _ = serve => {}
                    _ = stopped => {}
                }
            });
        });
        Relay {
            port,
            faults,
            stop: Some(stop),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Answers the next `times` `method` requests whose path is `path` with
    /// `status` (an OCI error body), instead of relaying them.
    pub fn fail(&self, method: &str, path: &str, status: u16, times: usize) {
        self.faults.lock().unwrap().push(Fault {
            method: method.to_owned(),
            path: path.to_owned(),
            status,
            left: times,
        });
    }

    /// How many planned failures are still to come.
    pub fn failures_left(&self) -> usize {
        self.faults.lock().unwrap().iter().map(|f| f.left).sum()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn relay(
    client: &reqwest::Client,
    upstream: &str,
    plan: &Mutex<Vec<Fault>>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let failed = {
        let mut plan = plan.lock().unwrap();
        plan.iter_mut()
            .find(|f| f.left > 0 && f.method == req.method().as_str() && f.path == req.uri().path())
            .map(|f| {
                f.left -= 1;
                f.status
            })
    };
    if let Some(status) = failed {
        let body = r#"{"errors":[{"code":"UNAVAILABLE","message":"injected by the test relay"}]}"#;
        return Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
    }
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut up = client.request(parts.method.clone(), format!("{upstream}{path}"));
    for (name, value) in &parts.headers {
        if name != "content-length" && name != "transfer-encoding" && name != "connection" {
            up = up.header(name, value);
        }
    }
    let resp = match up.body(body).send().await {
        Ok(r) => r,
        Err(e) => {
            return Response::builder()
                .status(502)
                .body(Full::new(Bytes::from(format!("relay: {e}"))))
                .unwrap()
        }
    };
    let mut out = Response::builder().status(resp.status().as_u16());
    for (name, value) in resp.headers() {
        if name != "content-length" && name != "transfer-encoding" && name != "connection" {
            out = out.header(name, value);
        }
    }
    let bytes = resp.bytes().await.unwrap_or_default();
    out.body(Full::new(bytes)).unwrap()
}
