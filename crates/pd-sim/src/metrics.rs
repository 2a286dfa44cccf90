//! The engines' `/metrics`: vLLM's queue gauge, which pd-proxy reads, and
//! pd-sim's own counters of what reached the engines.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::{Fault, Role, Sim};

impl Sim {
    pub(crate) fn metrics_text(&self, role: Role) -> String {
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let model = self.config.model.replace('\\', "\\\\").replace('"', "\\\"");
        let requests = match role {
            Role::Prefiller => load(&c.prefill_requests),
            Role::Decoder => load(&c.decode_requests),
        };
        let role = match role {
            Role::Prefiller => "prefiller",
            Role::Decoder => "decoder",
        };
        format!(
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n\
             # TYPE vllm:num_requests_waiting gauge\n\
             vllm:num_requests_waiting{{model_name=\"{model}\"}} 0.0\n\
             # HELP pdsim_requests_total Completions requests received.\n\
             # TYPE pdsim_requests_total counter\n\
             pdsim_requests_total{{role=\"{role}\"}} {requests}\n\
             # HELP pdsim_decode_streams_total Decoder response bodies by outcome.\n\
             # TYPE pdsim_decode_streams_total counter\n\
             pdsim_decode_streams_total{{outcome=\"completed\"}} {}\n\
             pdsim_decode_streams_total{{outcome=\"cancelled\"}} {}\n\
             # HELP pdsim_prefills_cancelled_total Prefills dropped before answering.\n\
             # TYPE pdsim_prefills_cancelled_total counter\n\
             pdsim_prefills_cancelled_total {}\n\
             # HELP pdsim_telemetry_posts_total Telemetry POST attempts by result.\n\
             # TYPE pdsim_telemetry_posts_total counter\n\
             pdsim_telemetry_posts_total{{result=\"ok\"}} {}\n\
             pdsim_telemetry_posts_total{{result=\"failed\"}} {}\n\
             # HELP pdsim_faults_total Faults injected by --fault-rate, by kind.\n\
             # TYPE pdsim_faults_total counter\n{}",
            load(&c.decode_completed),
            load(&c.decode_cancelled),
            load(&c.prefills_cancelled),
            load(&c.telemetry_ok),
            load(&c.telemetry_failed),
            Fault::ALL
                .iter()
                .map(|f| format!(
                    "pdsim_faults_total{{fault=\"{f}\"}} {}\n",
                    load(&c.faults[f.index()])
                ))
                .collect::<String>(),
        )
    }
}
