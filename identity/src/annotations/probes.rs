//! App probes the injector moved to the sidecar's admin port: the JSON the injector records in the
//! `meshid.io/app-probes` annotation, read back when the kubelet calls
//! `/app-health/CONTAINER/KIND`.

/// An app probe the sidecar's admin port answers at `/app-health/CONTAINER/KIND` by calling the app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppProbe {
    pub port: u16,
    pub path: String,
    /// As recorded: always `HTTP`, the only scheme the sidecar forwards (the injector refuses to
    /// move an HTTPS probe); another value is answered 502.
    pub scheme: String,
    pub headers: Vec<(String, String)>,
}

/// The probe recorded for `CONTAINER/KIND` (e.g. `app/readiness`) in the JSON value of the
/// `meshid.io/app-probes` annotation; `None` when it is missing or malformed.
pub(super) fn probe_in(json: &str, key: &str) -> Option<AppProbe> {
    let all: serde_json::Value = serde_json::from_str(json).ok()?;
    let probe = all.get(key)?;
    let port = u16::try_from(probe.get("port")?.as_u64()?).ok()?;
    let path = probe
        .get("path")
        .and_then(|p| p.as_str())
        .unwrap_or("/")
        .to_owned();
    let scheme = probe
        .get("scheme")
        .and_then(|s| s.as_str())
        .unwrap_or("HTTP")
        .to_owned();
    let headers = probe
        .get("httpHeaders")
        .and_then(|h| h.as_array())
        .map(|hs| {
            hs.iter()
                .filter_map(|h| {
                    Some((
                        h["name"].as_str()?.to_owned(),
                        h["value"].as_str()?.to_owned(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    Some(AppProbe {
        port,
        path,
        scheme,
        headers,
    })
}
