//! The fleet's per-endpoint series: their set follows the endpoints the
//! fleet has, so they are written afresh for each render of the page.

use metrics::{Key, Label, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusRecorder};

use super::{
    ENDPOINT_EJECTIONS, ENDPOINT_HEALTHY, ENDPOINT_IN_FLIGHT, ENDPOINT_REQUESTS, ENDPOINT_RETRIES,
    METADATA,
};

/// The fleet's per-endpoint series, for one render of the page.
///
/// They go through a recorder made for that render rather than the one
/// that keeps the proxy's own series. The exporter keeps every series it
/// was given for as long as its recorder lives, and its one way to drop
/// them, the idle timeout, applies to every series of a kind: it would
/// take the proxy's quiet counters too, and leave the handles held for
/// them counting into nothing. An endpoint gone from DNS must leave the
/// page with it, so that label sets stay bounded by the live fleet; and
/// the values are the fleet's own counts, so each render writes them
/// whole.
pub struct EndpointSeries {
    recorder: PrometheusRecorder,
}

/// One endpoint's numbers, as the fleet reads them.
pub struct EndpointSample<'a> {
    pub role: &'static str,
    /// `ip:port` (`[ip]:port` for IPv6).
    pub endpoint: &'a str,
    pub healthy: bool,
    pub in_flight: u32,
    pub requests: u64,
    pub ejections: u64,
    pub retries: u64,
}

impl EndpointSeries {
    pub(super) fn new() -> Self {
        let recorder = PrometheusBuilder::new().build_recorder();
        for (name, help) in [
            (
                ENDPOINT_HEALTHY,
                "1 while the endpoint takes requests (health checks pass, not ejected).",
            ),
            (
                ENDPOINT_IN_FLIGHT,
                "Requests this proxy has in flight at the endpoint.",
            ),
            (
                ENDPOINT_REQUESTS,
                "Requests sent to the endpoint, retries included.",
            ),
            (
                ENDPOINT_EJECTIONS,
                "Times the endpoint was taken out of rotation (health checks or failed requests).",
            ),
            (
                ENDPOINT_RETRIES,
                "Requests that failed at the endpoint and were tried on another.",
            ),
        ] {
            recorder.describe_counter(name.into(), None, help.into());
        }
        EndpointSeries { recorder }
    }

    pub(super) fn render(&self) -> String {
        self.recorder.handle().render()
    }

    pub fn endpoint(&self, sample: EndpointSample<'_>) {
        let labels = [
            Label::from_static_parts("role", sample.role),
            Label::new("endpoint", sample.endpoint.to_owned()),
        ];
        let key = |name: &'static str| Key::from_parts(name, labels.to_vec());
        let gauge = |name, value: f64| {
            self.recorder
                .register_gauge(&key(name), &METADATA)
                .set(value);
        };
        let counter = |name, value: u64| {
            self.recorder
                .register_counter(&key(name), &METADATA)
                .absolute(value);
        };
        gauge(ENDPOINT_HEALTHY, f64::from(u8::from(sample.healthy)));
        gauge(ENDPOINT_IN_FLIGHT, f64::from(sample.in_flight));
        counter(ENDPOINT_REQUESTS, sample.requests);
        counter(ENDPOINT_EJECTIONS, sample.ejections);
        counter(ENDPOINT_RETRIES, sample.retries);
    }
}

#[cfg(test)]
mod tests {
    use super::super::Metrics;
    use super::*;

    #[test]
    fn a_render_shows_only_the_endpoints_written_for_it() {
        let metrics = Metrics::new();
        let sample = |endpoint| EndpointSample {
            role: "decoder",
            endpoint,
            healthy: true,
            in_flight: 2,
            requests: 7,
            ejections: 1,
            retries: 0,
        };
        let page = metrics.render_with(|series| {
            series.endpoint(sample("10.0.0.1:8000"));
            series.endpoint(sample("[::1]:8000"));
        });
        for line in [
            "pd_proxy_endpoint_healthy{role=\"decoder\",endpoint=\"10.0.0.1:8000\"} 1\n",
            "pd_proxy_endpoint_in_flight{role=\"decoder\",endpoint=\"[::1]:8000\"} 2\n",
            "pd_proxy_endpoint_requests_total{role=\"decoder\",endpoint=\"[::1]:8000\"} 7\n",
            "# TYPE pd_proxy_endpoint_ejections_total counter\n",
        ] {
            assert!(page.contains(line), "{line} in {page}");
        }
        // The first is gone from DNS: it leaves the page.
        let page = metrics.render_with(|series| series.endpoint(sample("[::1]:8000")));
        assert!(!page.contains("10.0.0.1:8000"), "{page}");
        assert!(page.contains(
            "pd_proxy_endpoint_retries_total{role=\"decoder\",endpoint=\"[::1]:8000\"} 0\n"
        ));
    }
}
